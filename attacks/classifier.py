"""The classifier attack (Scrunch §3.2): retrain a classifier on Z for a task of the store.

Whoever receives Z can train any classifier on it with labels of their own; what they
reach on a *private* task is the leakage. A weak attacker would give false assurance, so
several heads are trained and the strongest, chosen on attacker-validation rows, is
reported:

==================  ===============================================================
head                what it is
==================  ===============================================================
``linear``          a linear probe on standardised Z: L2-penalised logistic regression
                    fitted to convergence by L-BFGS, its penalty chosen on validation
``svm``             an RBF support-vector machine on standardised Z (scikit-learn's
                    ``SVC``, C and γ chosen on validation; a seeded subsample of at
                    most ``svm_rows`` attacker-train rows)
``mlp``             two hidden layers (512, 256) with batch norm and dropout
``conv``            a small CNN over spatial Z ([C, H, W] with H·W > 1)
``continuation``    the original model after the split, re-initialised and retrained
                    with a K-way output, as the paper does; rebuilt from the store's
                    provenance (model spec, checkpoint, layer)
``best``            all of the above (the default)
``fresh``           all but ``continuation``: an attacker who knows nothing of the model
==================  ===============================================================

:mod:`leakaudit.attacks.classifier_fit` says how the linear probe and the SVM are fitted.

Every attacker pair is used. A head, and its settings (epochs, the penalty, C and γ), is
chosen on attacker-validation; the chosen head (``refit: chosen``; every head with
``refit: all``) is then trained again, with those settings, on attacker-train and
attacker-validation together and scored on test, the usual protocol with twice the pairs.
Each head reports both: ``accuracy`` (fitted on attacker-train, the *selection* protocol)
and ``refit_accuracy`` (the *refit* protocol), each with its interval. The headline
``private_accuracy`` is the chosen head's higher of the two and ``protocol`` says which
gave it; the raw-X reference takes the higher of its own two the same way
(``raw_protocol``), so that the drop compares like with like. Taking the higher of two test
scores leans the headline up a little (never down): the careful direction for a leakage
audit.

The same task is trained on raw X (a linear probe on pixels and a small CNN): the best of
these is ``private_accuracy_raw``, the reference that ``private_accuracy_drop`` =
1 − private_accuracy / private_accuracy_raw is normalised by. ``private_chance`` is the
accuracy of always predicting the most frequent attacker-train class.

Every accuracy comes with a 95 % interval (``<name>_ci95``), a bootstrap over the test rows
(:mod:`leakaudit.intervals`) with the trained heads held fixed. The drops have one too,
``private_accuracy_drop_ci95``: each resample scores the attack and its raw-X reference on
the same rows, so the interval keeps what the two share (rows hard for both) — the ratio of
two separate intervals would not be a 95 % interval of the drop.

An attack that scores below chance has not learnt the task (a constant guess beats it), so
its low accuracy and high drop say nothing about privacy; the result then carries a warning
saying so, which the command line and the HTML report show. A reference on raw X below
chance makes the drop's denominator meaningless and is flagged the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from leakaudit import distributed
from leakaudit.attacks._data import AttackRows, attack_rows, check_class_rows
from leakaudit.attacks._training import Progress
from leakaudit.attacks.classifier_data import classifier_data
from leakaudit.attacks.classifier_heads import continuation_head, raw_cnn  # noqa: F401 - re-exported
from leakaudit.attacks.classifier_raw import RawReference, content_key, raw_reference, shared_reference
from leakaudit.attacks.classifier_train import (  # noqa: F401 - balanced_accuracy, LINEAR_HEADS re-exported
    FRESH_HEADS,
    HEADS,
    LINEAR_HEADS,
    RAW_HEADS,
    HeadResult,
    balanced_accuracy,
    build_head,
    head_footprint,
    refit_head,
    stronger,
    train_head,
    val_accuracy,
)
from leakaudit.attacks.display import classifier_html
from leakaudit.config import positive
from leakaudit.data import check_task_roles
from leakaudit.errors import UnknownNameError, UsageError
from leakaudit.glossary import relative, with_intervals
from leakaudit.intervals import drop_interval
from leakaudit.registry import ATTACKS
from leakaudit.runtime import resolve_device
from leakaudit.store import ActivationStore
from leakaudit.store.stream import networks_over_budget
from leakaudit.threat import Scope, Threat, leaked_pairs
from leakaudit.training.engine import PRECISIONS, seed_for

HEAD_CHOICES = (*HEADS, "best", "fresh")
#: Which heads are refitted on attacker-train + attacker-validation.
REFITS = ("chosen", "all", "none")


@dataclass(frozen=True)
class ClassifierConfig:
    """Settings of the classifier attack.

    Attributes:
        task: the store's task to attack (``--task``).
        head: ``linear``, ``svm``, ``mlp``, ``conv``, ``continuation``, ``best`` (all of them) or
            ``fresh`` (all but ``continuation``, the one head whose attacker knows the model's architecture).
        raw_reference: also train the task on raw X (needs ``/inputs``) for ``private_accuracy_raw``.
        epochs: the most epochs per head; early stopping usually ends sooner.
        batch_size: rows per step.
        lr: Adam's learning rate.
        weight_decay: Adam's L2 penalty.
        patience: epochs without a better validation accuracy before a head stops.
        seed: seeds initialisation and minibatch order (results are deterministic per seed).
        device: ``auto``, ``cpu`` or ``cuda[:N]``.
        precision: ``fp32``, or ``bf16`` to train under bfloat16 autocast (scores stay float32).
        refit: ``chosen`` (refit the chosen head on Z and the chosen raw-X reference on
            attacker-train + attacker-validation), ``all`` (every trained head) or ``none``.
        svm_rows: the most training rows the SVM is fitted on (a seeded subsample above it).
        cache: keep the raw-X reference on disk beside the cached dumps and reuse one trained
            earlier on the same content (:mod:`leakaudit.attacks.classifier_raw`); it never
            changes a number, only whether the reference is trained again.
    """

    task: str = "private"
    head: str = "best"
    raw_reference: bool = True
    epochs: int = 200
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 20
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"
    refit: str = "chosen"
    svm_rows: int = 10_000
    cache: bool = True

    def __post_init__(self) -> None:
        if self.head not in HEAD_CHOICES:
            raise UnknownNameError("classifier head", self.head, HEAD_CHOICES, hint=f"Heads: {', '.join(HEAD_CHOICES)}.")
        if self.precision not in PRECISIONS:
            raise UnknownNameError("precision", self.precision, PRECISIONS)
        if self.refit not in REFITS:
            raise UnknownNameError("refit", self.refit, REFITS)
        for name in ("epochs", "batch_size", "patience", "svm_rows"):
            positive(name, getattr(self, name))
        positive("lr", self.lr)
        positive("weight_decay", self.weight_decay, allow_zero=True)


@dataclass
class ClassifierResult:
    """What the classifier attack found; :meth:`to_dict` is its JSON form.

    Attributes:
        task: the attacked task.
        class_names: its classes.
        rows: rows per role the best head used (fewer where it was fitted on a subsample, see ``data_path``).
        layer_shape: shape of one Z row.
        heads: every head on Z, trained or skipped.
        raw_heads: the references trained on raw X (empty without ``/inputs``).
        best_head: the head with the best attacker-validation accuracy.
        accuracy: that head's test accuracy (``private_accuracy``): the higher of its
            selection and refit accuracies.
        balanced_accuracy: that head's test balanced accuracy, under the same protocol.
        chance: test accuracy of always predicting the most frequent attacker-train class.
        chance_balanced: balanced accuracy of any constant prediction (1 / classes).
        raw_best_head: the raw-X reference with the best validation accuracy.
        private_accuracy_raw: its test accuracy, the higher of its selection and refit accuracies.
        private_accuracy_drop: 1 − accuracy / private_accuracy_raw.
        config: the settings used.
        warnings: what the user should know (skipped heads, missing reference).
        accuracy_ci95: the 95 % interval of ``accuracy`` (the best head's).
        balanced_accuracy_ci95: that of ``balanced_accuracy``.
        private_accuracy_raw_ci95: that of ``private_accuracy_raw``.
        private_accuracy_drop_ci95: that of ``private_accuracy_drop``, resampling the rows of
            both attackers together.
        private_accuracy_drop_continuation_ci95: the same for the continuation head's drop.
        protocol: which gave ``accuracy``: ``selection`` (the head fitted on attacker-train) or
            ``refit`` (refitted on attacker-train + attacker-validation).
        raw_protocol: the same for ``private_accuracy_raw``.
        raw_reference_shared: the raw-X heads are those an earlier store of the same content
            trained in this process or recorded in the cache (:mod:`leakaudit.attacks.classifier_raw`),
            not trained again.
        raw_reference_entry: the cache entry the raw-X heads were read from or written to.
        data_path: ``{"attacker roles": ...}`` ``memory`` when every row fits in the memory budget;
            otherwise, per group of heads, ``stream`` (the network heads, every row) or ``subsample``
            (the heads that need all rows at once, with the rows kept and the seed), each with the
            budget, the bytes and why (:mod:`leakaudit.attacks.classifier_data`).
    """

    task: str
    class_names: list[str]
    rows: dict[str, int]
    layer_shape: list[int]
    heads: list[HeadResult]
    raw_heads: list[HeadResult]
    best_head: str
    accuracy: float
    balanced_accuracy: float
    chance: float
    chance_balanced: float
    raw_best_head: str | None
    private_accuracy_raw: float | None
    private_accuracy_drop: float | None
    config: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    accuracy_ci95: list[float] | None = None
    balanced_accuracy_ci95: list[float] | None = None
    private_accuracy_raw_ci95: list[float] | None = None
    private_accuracy_drop_ci95: list[float] | None = None
    private_accuracy_drop_continuation_ci95: list[float] | None = None
    protocol: str = "selection"
    raw_protocol: str | None = None
    raw_reference_shared: bool = False
    raw_reference_entry: str | None = None
    data_path: dict[str, Any] = field(default_factory=dict)
    #: Per test row, behind the reported numbers: whether each scored attacker got it right, and its label.
    test_correct: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    attack = "classifier"

    @property
    def private_accuracy(self) -> float:
        return self.accuracy

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(dataclasses.replace(self, test_correct={}))
        data.pop("test_correct")
        data = {"attack": self.attack, **data}
        data["private_accuracy"] = self.accuracy
        data["private_accuracy_ci95"] = self.accuracy_ci95
        data["private_chance"] = self.chance
        data["threat"] = self.threat.to_dict()
        return data

    @property
    def threat(self) -> Threat:
        """The attacker behind the headline: the best head's (the continuation head knows the architecture)."""
        knows = "architecture" if self.best_head == "continuation" else "nothing"
        train, val = self.rows["attacker-train"], self.rows["attacker-validation"]
        return leaked_pairs(f"(Z, {self.task} label)", train, val, knows=knows)

    def report_metrics(self) -> dict[str, Any]:
        """The numbers the report records, each with its ``_ci95`` interval; the raw-X ones only when a reference ran.

        ``private_accuracy_drop`` is not among them: the report derives it
        (:mod:`leakaudit.glossary`), from these, as it derives every drop. Its interval is
        here, because only the per-row values behind both numbers define it.
        """
        metrics: dict[str, Any] = {
            "private_accuracy": self.accuracy,
            "private_accuracy_ci95": self.accuracy_ci95,
            "private_balanced_accuracy": self.balanced_accuracy,
            "private_balanced_accuracy_ci95": self.balanced_accuracy_ci95,
            "private_chance": self.chance,
        }
        if self.private_accuracy_raw is not None:
            metrics["private_accuracy_raw"] = self.private_accuracy_raw
            metrics["private_accuracy_raw_ci95"] = self.private_accuracy_raw_ci95
            metrics["private_accuracy_drop_ci95"] = self.private_accuracy_drop_ci95
        continuation = next((h for h in self.heads if h.name == "continuation" and h.ok), None)
        if continuation is not None and continuation.accuracy is not None:  # a trained head has its accuracy
            metrics["private_accuracy_continuation"] = continuation.accuracy
            metrics["private_accuracy_continuation_ci95"] = continuation.accuracy_ci95
            if self.private_accuracy_raw is not None:
                metrics["private_accuracy_drop_continuation_ci95"] = self.private_accuracy_drop_continuation_ci95
        return {name: value for name, value in metrics.items() if value is not None}

    def row_statistics(self) -> dict[str, Any]:
        """The per-row values behind each number with an interval, to combine training seeds on the same rows."""
        from leakaudit.intervals import balanced_accuracy_rows, mean_rows

        rows = self.test_correct
        out: dict[str, Any] = {}
        if "best" in rows:
            out["private_accuracy"] = mean_rows(rows["best"])
            out["private_balanced_accuracy"] = balanced_accuracy_rows(rows["best"], rows["labels"])
        for name, key in (("private_accuracy_raw", "raw"), ("private_accuracy_continuation", "continuation")):
            if key in rows:
                out[name] = mean_rows(rows[key])
        return out

    def render(self) -> list[Any]:
        """Rich renderables for the terminal (see :mod:`leakaudit.attacks.display`)."""
        from leakaudit.attacks.display import classifier_renderables

        return classifier_renderables(self)


# --------------------------------------------------------------------------- the attack


def _audit_default(tasks: Sequence[str]) -> dict[str, Any]:
    """Run by an audit that lists no attacks: on its ``private`` task, else on its first."""
    return {"task": "private" if "private" in tasks else tasks[0]}


def _threat(config: ClassifierConfig) -> Threat:
    return Threat("architecture" if config.head in ("best", "continuation") else "nothing", "pairs")


def _narrow(config: ClassifierConfig, scope: Scope) -> ClassifierConfig | None:
    """Within a scope whose attacker knows nothing of the model: the fresh heads only."""
    if config.head == "best" and scope.allows(Threat("nothing", "pairs")):
        return dataclasses.replace(config, head="fresh")
    return None


@ATTACKS.register(
    "classifier",
    config=ClassifierConfig,
    metrics=with_intervals(
        {
            "private_accuracy": "best accuracy of a classifier retrained on Z for the private task",
            "private_balanced_accuracy": "balanced accuracy (mean recall over classes) of that classifier",
            "private_accuracy_raw": "accuracy of the same task trained on raw X",
            "private_accuracy_continuation": "test accuracy of the Scrunch paper's attacker: the rest of the model, retrained",
            "private_chance": "accuracy of always predicting the most frequent private class",
        },
        "private_accuracy", "private_balanced_accuracy", "private_accuracy_raw", "private_accuracy_continuation",
        "private_accuracy_drop", "private_accuracy_drop_continuation",
    ),
    audit_default=_audit_default,
    html=lambda result: classifier_html(result),
    threat=_threat,
    narrow=_narrow,
)
def run_classifier(store: ActivationStore, config: ClassifierConfig, progress: Progress | None = None) -> ClassifierResult:
    """Retrain classifiers on Z for a task of the store; report the strongest (Scrunch §3.2).

    Under ``torchrun`` every rank runs this on the same store and trains with
    DistributedDataParallel; every rank returns the same result.

    Args:
        store: an open activation store.
        config: the attack's settings.
        progress: optional ``progress(description, done, total)`` for progress bars.

    Raises:
        UnknownNameError: the store has no such task (the message lists its tasks).
        DataError: a class has too few rows in some role.
        NonFiniteError: Z (or X) holds NaN or infinite values.
        UsageError: the one head asked for cannot apply to this store.
    """
    device = resolve_device(config.device)
    ctx = distributed.current(device)
    names = {"best": HEADS, "fresh": FRESH_HEADS}.get(config.head, (config.head,))
    # Under torchrun, a rank that cannot read the store stops every rank here, before training.
    with distributed.agreed(ctx):
        labels_all = store.labels(config.task)
        class_names = store.class_names(config.task)
        classes = len(class_names)
        rows = attack_rows(store)
        with_raw = config.raw_reference and store.has_inputs
        datasets = ("activations", "inputs") if with_raw else ("activations",)
        every_head = (*names, *(RAW_HEADS if with_raw else ()))
        input_shape = tuple(int(s) for s in store.input_shape or ()) if with_raw else None
        networks = head_footprint(every_head, tuple(int(s) for s in store.layer_shape), input_shape, classes, config.batch_size)
        source = classifier_data(store, rows, labels_all, datasets, seed_for(config.seed, "subsample"), every_head,
                                 networks=networks.total)  # fmt: skip
        check_task_roles(config.task, {role: labels_all[r] for r, role in _roles(rows)})
        check_class_rows(labels_all, rows, class_names, config.task)
        train_y = torch.from_numpy(labels_all[rows.train]).long()
        test_y = labels_all[rows.test]
        layer_shape = tuple(int(s) for s in store.layer_shape)
        source.load("activations")

    warnings_: list[str] = [
        f"classifier ran on a subsample for {group}: {record['reason']}."
        for group, record in source.records.items() if record["data_path"] == "subsample"
    ]  # fmt: skip
    limit = next(iter(source.records.values()))["memory_budget"]
    if isinstance(limit, int) and networks.total >= limit:
        warnings_.append(networks_over_budget("classifier's network heads", networks.total, limit))
    heads: list[HeadResult] = []
    correct: dict[str, np.ndarray] = {}  # per trained head, whether it got each test row right
    for name in names:
        torch.manual_seed(seed_for(config.seed, name))  # initialisation of this head
        try:
            model, data = build_head(name, store, layer_shape, classes, source.inputs(name, "activations"))
        except UsageError as exc:
            reason = str(exc).rstrip(".")
            if config.head not in ("best", "fresh"):
                raise UsageError(f"the {name} head cannot be used on {str(store.path)!r}: {reason}.") from None
            heads.append(HeadResult(name=name, input="Z", status="skipped", reason=reason))
            warnings_.append(f"classifier head {name!r} skipped: {reason}.")
            continue
        head, correct[name] = train_head(name, "Z", model, data, source.head_labels(name), classes, config, device, progress)
        source.note_rows(head)
        heads.append(head)
        del model, data

    raw = RawReference([], {})
    if config.raw_reference:
        if store.has_inputs:
            with distributed.agreed(ctx):
                source.load("inputs")
            if source.path == "memory":
                world_size = ctx.world_size if ctx is not None else 1
                x = source.inputs("raw-linear", "inputs")
                key = content_key(x, source.head_labels("raw-linear"), config, classes, device, world_size)
                raw = shared_reference(key, lambda: raw_reference(source, classes, config, device, progress),
                                       disk=config.cache and ctx is None, warn=warnings_.append)
                del x
            else:
                # Not shared: the key hashes X's rows, which the streamed path never holds, and a key from the
                # store's recorded checksum of /inputs could match bytes changed since (plain opening does not
                # re-read /inputs), a wrong reuse; a streamed reference is trained for its store alone.
                raw = raw_reference(source, classes, config, device, progress)
            source.release("inputs")
            correct.update(raw.correct)
        else:
            warnings_.append(
                "no raw-X reference: the store has no /inputs (dumped with --no-inputs), so "
                "private_accuracy_raw and private_accuracy_drop are not reported."
            )
    raw_heads = raw.heads

    trained = [h for h in heads if h.ok]
    best = max(trained, key=val_accuracy)  # selection on attacker-validation only
    raw_best = max(raw_heads, key=val_accuracy) if raw_heads else None

    # Refit the chosen heads on every pair the attacker holds, from the same initialisation.
    refitted: dict[str, np.ndarray | None] = dict(raw.refitted)
    if config.refit != "none":
        for head in trained if config.refit == "all" else [best]:
            torch.manual_seed(seed_for(config.seed, head.name))
            model, data = build_head(head.name, store, layer_shape, classes, source.pooled_inputs(head.name, "activations"))
            refitted[head.name] = refit_head(head, model, data, source.pooled_labels(head.name), classes, config, device,
                                             progress)  # fmt: skip
    source.release("activations")

    protocol, best_correct = stronger(best, correct[best.name], refitted.get(best.name))
    prefix = "refit_" if protocol == "refit" else ""
    accuracy, balanced = getattr(best, prefix + "accuracy"), getattr(best, prefix + "balanced_accuracy")
    assert accuracy is not None and balanced is not None  # a trained head is scored
    raw_protocol = raw_accuracy = raw_ci95 = raw_correct = None
    if raw_best is not None:
        raw_protocol, raw_correct = stronger(raw_best, correct[raw_best.name], refitted.get(raw_best.name))
        raw_prefix = "refit_" if raw_protocol == "refit" else ""
        raw_accuracy, raw_ci95 = getattr(raw_best, raw_prefix + "accuracy"), getattr(raw_best, raw_prefix + "accuracy_ci95")
    majority = int(np.bincount(train_y.numpy(), minlength=classes).argmax())
    drop = relative("drop", accuracy, raw_accuracy)
    chance = float(np.mean(test_y == majority))
    warnings_ += below_chance_warnings(config.task, accuracy, raw_accuracy, chance)
    drop_ci95 = continuation_drop_ci95 = None
    if raw_correct is not None:
        drop_ci95 = drop_interval(best_correct, raw_correct)
        if "continuation" in correct:
            continuation_drop_ci95 = drop_interval(correct["continuation"], raw_correct)
    return ClassifierResult(
        task=config.task,
        class_names=class_names,
        rows=source.sizes(best.name),
        layer_shape=list(layer_shape),
        heads=heads,
        raw_heads=raw_heads,
        best_head=best.name,
        accuracy=accuracy,
        balanced_accuracy=balanced,
        chance=chance,
        chance_balanced=1.0 / classes,
        raw_best_head=raw_best.name if raw_best is not None else None,
        private_accuracy_raw=raw_accuracy,
        private_accuracy_drop=drop,
        config=dataclasses.asdict(config),
        warnings=warnings_,
        accuracy_ci95=getattr(best, prefix + "accuracy_ci95"),
        balanced_accuracy_ci95=getattr(best, prefix + "balanced_accuracy_ci95"),
        private_accuracy_raw_ci95=raw_ci95,
        private_accuracy_drop_ci95=drop_ci95,
        private_accuracy_drop_continuation_ci95=continuation_drop_ci95,
        protocol=protocol,
        raw_protocol=raw_protocol,
        raw_reference_shared=raw.cached,
        raw_reference_entry=raw.entry,
        data_path=source.records,
        test_correct={"best": best_correct, "labels": test_y,
                      **({"raw": raw_correct} if raw_correct is not None else {}),
                      **({"continuation": correct["continuation"]} if "continuation" in correct else {})},  # fmt: skip
    )


def below_chance_warnings(task: str, accuracy: float, raw_accuracy: float | None, chance: float) -> list[str]:
    """Warnings for an attack (or its raw-X reference) that scored below chance on the test rows."""

    def pair(value: float) -> tuple[str, str]:
        # Enough digits that "below" is visible: 0.499 against 0.5 must not read 0.50 < 0.50.
        digits = next((d for d in range(2, 6) if f"{value:.{d}f}" != f"{chance:.{d}f}"), 6)
        return f"{value:.{digits}f}", f"{chance:.{digits}f}"

    warnings_ = []
    if accuracy < chance:
        shown, floor = pair(accuracy)
        warnings_.append(
            f"{task}: accuracy {shown} is below chance {floor}; the attack failed to learn, "
            "the drop is not evidence of privacy."
        )
    if raw_accuracy is not None and raw_accuracy < chance:
        shown, floor = pair(raw_accuracy)
        warnings_.append(
            f"{task}: the raw-X reference accuracy {shown} is below chance {floor}; it failed "
            "to learn, so private_accuracy_drop has no meaningful reference."
        )
    return warnings_


def _roles(rows: AttackRows) -> tuple[tuple[np.ndarray, str], ...]:
    return ((rows.train, "attacker-train"), (rows.val, "attacker-validation"), (rows.test, "test"))
