"""Training and scoring one head of the classifier attack: the selection fit and the refit.

A head is fitted on attacker-train, its epoch (or penalty, or C and γ) chosen on
attacker-validation and scored on test (:func:`train_head`, the *selection* protocol);
:func:`refit_head` then fits it again with those settings on attacker-train and
attacker-validation together and scores it on test (the *refit* protocol). Networks train
through :mod:`leakaudit.attacks._training`; the linear probes and the SVM are fitted as
:mod:`leakaudit.attacks.classifier_fit` says.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from leakaudit.attacks._sources import Source
from leakaudit.attacks._training import EVAL_BATCH, Progress, Standardizer, fit, parameter_count, predict
from leakaudit.attacks.classifier_fit import SvmFit, linear_probe, logistic_regression, refit_network, svm_probe, svm_refit
from leakaudit.attacks.classifier_heads import continuation_head, conv_head, mlp_head, raw_cnn
from leakaudit.errors import UnknownNameError, UsageError
from leakaudit.intervals import accuracy_interval, balanced_accuracy_interval
from leakaudit.store import ActivationStore
from leakaudit.training.engine import autocast_dtype, seed_for
from leakaudit.training.footprint import Footprint, network_footprint, one_at_a_time

if TYPE_CHECKING:
    from leakaudit.attacks.classifier import ClassifierConfig

HEADS = ("linear", "svm", "mlp", "conv", "continuation")
#: The heads that know nothing of the model (``fresh``): the continuation head knows its architecture.
FRESH_HEADS = ("linear", "svm", "mlp", "conv")
RAW_HEADS = ("raw-linear", "raw-cnn")
#: The heads fitted as logistic regressions by L-BFGS rather than trained by epochs.
LINEAR_HEADS = ("linear", "raw-linear")


@dataclass
class HeadResult:
    """One trained head: test accuracy of its best validation epoch, or why it was skipped.

    Attributes:
        name: ``linear``, ``svm``, ``mlp``, ``conv``, ``continuation``, ``raw-linear`` or ``raw-cnn``.
        input: ``Z`` (activations) or ``X`` (raw inputs).
        status: ``ok`` or ``skipped``.
        reason: why a head was skipped.
        accuracy: test accuracy of the head fitted on attacker-train (the selection protocol).
        epochs: epochs run; for the linear probes, L-BFGS iterations of the chosen fit (each a
            full pass over the rows); ``None`` for the SVM.
        accuracy_ci95: the 95 % bootstrap interval of ``accuracy`` over test rows.
        balanced_accuracy_ci95: that of ``balanced_accuracy``.
        chosen: the settings chosen on attacker-validation beyond epochs: ``c`` (the linear
            probes' inverse L2 strength, the SVM's C) and ``gamma`` (the SVM's γ).
        train_rows: rows the head was fitted on, where fewer than attacker-train (the SVM's subsample).
        refit_accuracy: test accuracy of the head refitted on attacker-train +
            attacker-validation with the chosen settings (``None`` when not refitted).
        refit_accuracy_ci95: its interval; ``refit_balanced_accuracy`` and its
            ``_ci95`` likewise.
        refit_epochs: epochs (L-BFGS iterations for the linear probes) of the refit.
        refit_rows: rows the refit was fitted on.
    """

    name: str
    input: str
    status: str = "ok"
    reason: str = ""
    accuracy: float | None = None
    balanced_accuracy: float | None = None
    val_accuracy: float | None = None
    epochs: int | None = None
    best_epoch: int | None = None
    params: int | None = None
    seconds: float | None = None
    seconds_per_epoch: float | None = None
    accuracy_ci95: list[float] | None = None
    balanced_accuracy_ci95: list[float] | None = None
    chosen: dict[str, float] | None = None
    train_rows: int | None = None
    refit_accuracy: float | None = None
    refit_accuracy_ci95: list[float] | None = None
    refit_balanced_accuracy: float | None = None
    refit_balanced_accuracy_ci95: list[float] | None = None
    refit_epochs: int | None = None
    refit_rows: int | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y)


def _correct(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (out.argmax(dim=1) == y).float()


def balanced_accuracy(pred: np.ndarray, y: np.ndarray) -> float:
    """Mean recall over the classes present in ``y``."""
    classes = np.unique(y)
    return float(np.mean([np.mean(pred[y == c] == c) for c in classes]))


@dataclass
class HeadData:
    """One input (Z or X) of every role: tensors in memory, or sources (:mod:`leakaudit.attacks._sources`).

    A network head takes sources for all three roles (streamed from the store, labels inside). The
    heads that need all their rows at once (the linear probes, the SVM) take tensors for
    ``train`` and ``val``; their ``test`` may be a source, predicted chunk by chunk, and where
    ``val`` is a subsample, ``val_all`` holds every attacker-validation row, on which their
    ``val_accuracy`` (what heads are compared by) is then measured.
    """

    train: torch.Tensor | Source
    val: torch.Tensor | Source
    test: torch.Tensor | Source
    val_all: Source | None = None

    def transformed(self, standardizer: Standardizer) -> HeadData:
        assert isinstance(self.train, torch.Tensor) and isinstance(self.val, torch.Tensor) and isinstance(self.test, torch.Tensor)
        return HeadData(standardizer(self.train), standardizer(self.val), standardizer(self.test))


def _tensor(x: torch.Tensor | Source) -> torch.Tensor:
    assert isinstance(x, torch.Tensor), "the linear probes and the SVM fit rows held in memory"
    return x


def _pairs(x: torch.Tensor | Source, y: torch.Tensor) -> Source | tuple[torch.Tensor, torch.Tensor]:
    """What :func:`fit` trains on: a source as it is (its labels inside), a tensor with its labels."""
    return (x, y) if isinstance(x, torch.Tensor) else x


def predictions(x: torch.Tensor | Source, predict_rows: Callable[[torch.Tensor], np.ndarray]) -> np.ndarray:
    """``predict_rows`` of every row of ``x``: at once in memory, chunk by chunk from a source."""
    if isinstance(x, torch.Tensor):
        return predict_rows(x)
    parts = [predict_rows(xb) for xb, _ in x.chunks(EVAL_BATCH, None)]
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


def _source_accuracy(source: Source, predict_rows: Callable[[torch.Tensor], np.ndarray]) -> float:
    right = total = 0
    for xb, yb in source.chunks(EVAL_BATCH, None):
        right += int(np.sum(predict_rows(xb) == yb.numpy()))
        total += len(yb)
    return right / max(total, 1)


#: Labels of the three roles: attacker-train and attacker-validation as tensors, test as an array.
Labels = tuple[torch.Tensor, torch.Tensor, np.ndarray]


def _scored(head: HeadResult, pred: np.ndarray, test_y: np.ndarray, *, refit: bool = False) -> np.ndarray:
    """Put the test accuracy of ``pred`` (and its intervals) on ``head``; whether each test row was right."""
    correct = pred == test_y
    values = (float(np.mean(correct)), balanced_accuracy(pred, test_y), accuracy_interval(correct),
              balanced_accuracy_interval(correct, test_y))  # fmt: skip
    prefix = "refit_" if refit else ""
    for name, value in zip(("accuracy", "balanced_accuracy", "accuracy_ci95", "balanced_accuracy_ci95"), values):
        setattr(head, prefix + name, value)
    return correct


def train_head(
    name: str,
    input_name: str,
    model: nn.Module | None,
    data: HeadData,
    labels: Labels,
    classes: int,
    config: ClassifierConfig,
    device: torch.device,
    progress: Progress | None,
) -> tuple[HeadResult, np.ndarray]:
    """The trained, test-scored head, and whether it got each test row right (for the drops' intervals).

    ``model`` is ``None`` for the heads that are not networks trained by epochs (the linear
    probes and the SVM, :mod:`leakaudit.attacks.classifier_fit`).
    """
    train_y, val_y, test_y = labels
    description = f"classifier {name}"
    on_progress = (lambda done, total: progress(description, done, total)) if progress else None
    started = time.perf_counter()
    if name in LINEAR_HEADS:
        fitted = linear_probe((_tensor(data.train), train_y), (_tensor(data.val), val_y), classes, device=device,
                              on_progress=on_progress)  # fmt: skip
        seconds = time.perf_counter() - started
        val_score = fitted.val_accuracy if data.val_all is None else _source_accuracy(data.val_all, fitted.predict)
        head = HeadResult(name=name, input=input_name, val_accuracy=val_score, epochs=fitted.iterations,
                          best_epoch=fitted.iterations, params=fitted.params, seconds=round(seconds, 3),
                          seconds_per_epoch=round(seconds / max(fitted.iterations, 1), 4), chosen={"c": fitted.c})  # fmt: skip
        return head, _scored(head, predictions(data.test, fitted.predict), test_y)
    if name == "svm":
        in_memory = isinstance(data.test, torch.Tensor)
        svm = svm_probe((_tensor(data.train), train_y), (_tensor(data.val), val_y), data.test if in_memory else None,  # type: ignore[arg-type]
                        max_rows=config.svm_rows, seed=seed_for(config.seed, name), device=device, on_progress=on_progress)  # fmt: skip
        val_score = svm.val_accuracy if data.val_all is None else _source_accuracy(data.val_all, _svm_rows(svm))
        head = HeadResult(name=name, input=input_name, val_accuracy=val_score, params=svm.params,
                          seconds=round(time.perf_counter() - started, 3), chosen={"c": svm.c, "gamma": svm.gamma},
                          train_rows=svm.rows if svm.rows < len(train_y) else None)  # fmt: skip
        return head, _scored(head, svm.test_pred if in_memory else predictions(data.test, _svm_rows(svm)), test_y)
    assert model is not None  # every other head is a network
    result = fit(
        model,
        _pairs(data.train, train_y),
        _pairs(data.val, val_y),
        loss_fn=_cross_entropy,
        score_fn=_correct,
        epochs=config.epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        patience=config.patience,
        seed=seed_for(config.seed, name),
        device=device,
        weight_decay=config.weight_decay,
        autocast=autocast_dtype(config.precision, device),
        on_progress=on_progress,
    )
    head = HeadResult(
        name=name,
        input=input_name,
        val_accuracy=result.val_score,
        epochs=result.epochs,
        best_epoch=result.best_epoch,
        params=parameter_count(model),
        seconds=round(result.seconds, 3),
        seconds_per_epoch=round(result.seconds_per_epoch, 4),
    )
    pred = predict(model, data.test, device).argmax(dim=1).numpy()
    return head, _scored(head, pred, test_y)


def refit_head(
    head: HeadResult,
    model: nn.Module | None,
    data: HeadData,
    labels: tuple[torch.Tensor, np.ndarray],
    classes: int,
    config: ClassifierConfig,
    device: torch.device,
    progress: Progress | None,
) -> np.ndarray | None:
    """Refit ``head`` with its chosen settings on ``data.train`` (attacker-train + attacker-validation rows).

    ``model`` and ``data`` are built as for the selection fit, from the same seed; the refit's
    numbers go on ``head`` (``refit_*``). Returns whether each test row was right, or ``None``
    when there is nothing to refit (a network whose first epoch already diverged).
    """
    train_y, test_y = labels
    description = f"classifier {head.name} refit"
    on_progress = (lambda done, total: progress(description, done, total)) if progress else None
    if head.name in LINEAR_HEADS:
        assert head.chosen is not None  # set by _train_head
        fitted = logistic_regression(_tensor(data.train), train_y, classes, head.chosen["c"], device=device)
        pred, head.refit_epochs, head.refit_rows = predictions(data.test, fitted.predict), fitted.iterations, len(train_y)
    elif head.name == "svm":
        assert head.chosen is not None
        chosen = SvmFit(head.chosen["c"], head.chosen["gamma"], 0, 0, np.empty(0))
        in_memory = isinstance(data.test, torch.Tensor)
        svm = svm_refit((_tensor(data.train), train_y), data.test if in_memory else None, chosen,  # type: ignore[arg-type]
                        max_rows=config.svm_rows, seed=seed_for(config.seed, head.name), device=device)  # fmt: skip
        pred = svm.test_pred if in_memory else predictions(data.test, _svm_rows(svm))
        head.refit_rows = svm.rows
    else:
        assert model is not None
        if not head.best_epoch:
            return None
        refit_network(
            model, _pairs(data.train, train_y), loss_fn=_cross_entropy, epochs=head.best_epoch, batch_size=config.batch_size,
            lr=config.lr, patience=config.patience, seed=seed_for(config.seed, head.name), device=device,
            weight_decay=config.weight_decay, autocast=autocast_dtype(config.precision, device), on_progress=on_progress,
        )  # fmt: skip
        pred = predict(model, data.test, device).argmax(dim=1).numpy()
        head.refit_epochs, head.refit_rows = head.best_epoch, len(train_y)
    return _scored(head, pred, test_y, refit=True)


def _svm_rows(svm: SvmFit) -> Callable[[torch.Tensor], np.ndarray]:
    return lambda x: svm.model.predict(x.numpy().astype(np.float64))


def stronger(head: HeadResult, selection: np.ndarray, refit: np.ndarray | None) -> tuple[str, np.ndarray]:
    """The protocol whose test accuracy is higher (ties: selection), and its per-row correctness."""
    if (
        refit is not None
        and head.refit_accuracy is not None
        and head.accuracy is not None
        and head.refit_accuracy > head.accuracy
    ):
        return "refit", refit
    return "selection", selection


def val_accuracy(head: HeadResult) -> float:
    assert head.val_accuracy is not None  # set on every trained head, the only ones compared
    return head.val_accuracy


def build_head(
    name: str, store: ActivationStore, layer_shape: tuple[int, ...], classes: int, z: HeadData
) -> tuple[nn.Module | None, HeadData]:
    """The head ``name`` (``None`` for a head that is not a network) and its input.

    Raises:
        UsageError: the head cannot apply to this store; the message says why.
    """
    features = math.prod(layer_shape)
    spatial = len(layer_shape) == 3
    if name in ("linear", "svm"):
        return None, standardised(z, flat=True)
    if name == "mlp":
        return mlp_head(features, classes), standardised(z, flat=True)
    if name == "conv":
        if not spatial:
            shape = "×".join(map(str, layer_shape))
            raise UsageError(f"Z ({shape}) is not spatial [C, H, W]; the conv head needs a feature map")
        if layer_shape[1] * layer_shape[2] == 1:
            raise UsageError(f"Z is {layer_shape[0]}×1×1, with no spatial extent; the conv head would add nothing to mlp")
        return conv_head(layer_shape, classes), standardised(z, flat=False)
    if name == "continuation":
        per_channel = standardised(z, flat=False)
        return continuation_head(store, classes, first_rows(per_channel.train, 2)), per_channel
    raise UnknownNameError("classifier head", name, HEADS)


def head_footprint(names: Sequence[str], layer_shape: tuple[int, ...], input_shape: tuple[int, ...] | None, classes: int,
                   batch_size: int) -> Footprint:  # fmt: skip
    """The memory the largest of the network heads ``names`` takes while it trains (they train one at a time).

    ``mlp``, ``conv`` and ``raw-cnn`` are counted; ``continuation`` (the rest of the store's own model) is not:
    measuring it would load the model, which the data path is chosen before.
    """
    features = math.prod(layer_shape)
    spatial = len(layer_shape) == 3 and layer_shape[1] * layer_shape[2] > 1
    builds: list[tuple[Callable[[], nn.Module], tuple[int, ...]]] = []
    if "mlp" in names:
        builds.append((lambda: mlp_head(features, classes), (features,)))
    if "conv" in names and spatial:
        builds.append((lambda: conv_head(layer_shape, classes), layer_shape))
    if "raw-cnn" in names and input_shape is not None:
        builds.append((lambda: raw_cnn(input_shape, classes), input_shape))
    return one_at_a_time([network_footprint(build, shape, batch_size) for build, shape in builds])


def build_raw(name: str, classes: int, x: HeadData) -> tuple[nn.Module | None, HeadData]:
    """The raw-X reference ``name`` and its input."""
    if name == "raw-linear":
        return None, standardised(x, flat=True)
    shape = tuple(int(s) for s in first_rows(x.train, 1).shape[1:])
    return raw_cnn(shape, classes), standardised(x, flat=False)


def first_rows(x: torch.Tensor | Source, n: int) -> torch.Tensor:
    """The first ``n`` rows of ``x`` (as the head will see them: a source's transform applied)."""
    if isinstance(x, torch.Tensor):
        return x[:n]
    return next(iter(x.chunks(n, None)))[0]


def _flatten(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1)


def standardised(data: HeadData, *, flat: bool) -> HeadData:
    """``data`` standardised on its training rows: per feature of flattened rows (``flat``), else per channel.

    Tensors are transformed at once; a source gets the standardizer as its transform, fitted on
    a streamed training source by a pass over it (:meth:`Standardizer.fit_source`).
    """
    parts = [data.train, data.val, data.test, data.val_all]
    if flat:
        parts = [None if p is None else p.flatten(1) if isinstance(p, torch.Tensor) else p.mapped(_flatten) for p in parts]
    train = parts[0]
    assert train is not None
    if isinstance(train, torch.Tensor):
        standardizer = Standardizer.fit(train, per_channel=not flat)
    else:
        standardizer = Standardizer.fit_source(train, per_channel=not flat)
    out = [None if p is None else standardizer(p) if isinstance(p, torch.Tensor) else p.mapped(standardizer) for p in parts]
    assert out[0] is not None and out[1] is not None and out[2] is not None
    val_all = out[3]
    assert val_all is None or not isinstance(val_all, torch.Tensor)
    return HeadData(out[0], out[1], out[2], val_all)


def pooled(data: HeadData) -> HeadData:
    """Attacker-train and attacker-validation rows as the training rows of a refit (standardised on them both)."""
    train, val = _tensor(data.train), _tensor(data.val)
    return HeadData(torch.cat([train, val]), val, data.test)
