"""The training machinery shared by ``leakaudit train`` and the hardening recipes.

One loop serves every objective: plain cross-entropy (``train``), Scrunch's centre loss,
NoPeek's distance correlation and Shredder's learned noise. An :class:`Objective` sees the
batch, the model's logits and the split-layer activations Z, and returns the loss; Z is
recorded by a forward hook on the split module that keeps the forward going (and keeps
gradients), so any model whose split layer is a module works, traceable or not.

The rows come from :func:`leakaudit.data.split_roles`, the split every command shares:
the model is trained on attacker-train rows, selected (early stopping) on
attacker-validation rows and scored on test rows, which a later ``leakaudit dump`` with
the same data, fractions and seed assigns to the same roles.

Under ``torchrun`` (``WORLD_SIZE`` > 1; ``group`` below is this process's
:class:`~leakaudit.distributed.Context`) the same loop trains with DistributedDataParallel
(gloo on CPU, nccl on CUDA), as the attacks' loop does: every rank draws the same seeded
permutation each epoch and takes every ``world``-th row of it (padded as
``DistributedSampler`` pads), in batches of ``batch_size // world`` rows, so the group's
step ``k`` covers the rows of the single-process batch ``k``. Evaluation splits each
single-process evaluation batch the same way and all-reduces the sums, so every rank sees
the same validation numbers and takes the same early-stopping and selection decisions;
validation Z is gathered in row order. Batch-norm buffers are averaged over ranks after
each epoch; the objective's own state (centres, Shredder's noise) is broadcast from rank 0
at the start and kept identical after (centre updates use the whole group's batch, noise
gradients are averaged). A non-finite loss on any rank stops every rank. With a model
without batch norm or dropout, a run on ``world`` ranks follows the single-process run
with the same ``--batch-size`` up to float noise, the padded rows of each epoch's last
step and where its last short batch falls (tests/recipes/test_distributed_harden.py
states the tolerance).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from leakaudit import distributed
from leakaudit.data import DataSource, Preprocess, Task, open_source, preprocess_for, resolve_task, split_roles
from leakaudit.errors import ConfigError, DataError, LeakAuditError, UsageError
from leakaudit.distributed import Context
from leakaudit.layers import OUTPUT, resolve_layer
from leakaudit.models import LoadedModel, load_model

ROLE_TRAIN, ROLE_VAL, ROLE_TEST = 0, 1, 2

#: ``progress(description, done, total)``: what domain code reports to a progress bar.
Progress = Callable[[str, float, "float | None"], None]


# --------------------------------------------------------------------------- settings


def check_fit_options(
    *, epochs: int, batch_size: int, lr: float | None, patience: int, split: Sequence[float], limit: int | None
) -> None:
    """Validate the options every training command shares (raises ``ValueError``)."""
    if epochs <= 0:
        raise ValueError(f"--epochs must be positive, got {epochs}.")
    if batch_size < 2:
        raise ValueError(f"--batch-size must be at least 2, got {batch_size}.")
    if lr is not None and not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"--lr must be a positive number, got {lr}.")
    if patience <= 0:
        raise ValueError(f"--patience must be positive, got {patience}.")
    if len(split) != 3 or any(f <= 0 for f in split) or abs(sum(split) - 1.0) > 1e-6:
        raise ValueError(f"--split needs three positive fractions TRAIN,VAL,TEST summing to 1, got {tuple(split)}.")
    if limit is not None and limit <= 0:
        raise ValueError(f"--limit must be positive, got {limit}.")


def load_for_training(
    spec: str,
    *,
    weights: str | None,
    num_classes: int | None,
    in_chans: int | None,
    model_args: Mapping[str, Any],
    trust_checkpoint: bool,
    default_num_classes: int | None = None,
) -> LoadedModel:
    """Build the model to train; ``default_num_classes`` is used where the model accepts it.

    Raises:
        UsageError: the model cannot be trained (an exported program has no trainable
            Python module).
    """
    kwargs = dict(weights=weights, in_chans=in_chans, model_args=model_args, trust_checkpoint=trust_checkpoint)
    if num_classes is None and default_num_classes is not None:
        try:
            loaded = load_model(spec, num_classes=default_num_classes, **kwargs)
        except (ConfigError, UsageError):
            # The spec takes no num_classes (an archive, a factory without it): build it as
            # given; a head of the wrong width is reported by check_outputs.
            loaded = load_model(spec, **kwargs)
    else:
        loaded = load_model(spec, num_classes=num_classes, **kwargs)
    if loaded.kind == "export":
        raise UsageError(
            f"{spec!r} is an exported program, which cannot be trained. Give the architecture "
            "(lenet5, timm:NAME, file.py:Factory) with --weights instead."
        )
    if not any(p.requires_grad for p in loaded.module.parameters()):
        raise UsageError(f"model {spec!r} has no trainable parameters.")
    return loaded


def split_module(module: nn.Module, layer: str) -> str:
    """Check that ``layer`` is a module Z can be recorded at (a hook needs a module)."""
    layer = resolve_layer(module, layer)
    if layer == OUTPUT:
        raise UsageError("cannot harden at 'output': there would be no server-side classifier. Choose an inner layer.")
    if layer not in dict(module.named_modules()):
        raise UsageError(
            f"layer {layer!r} is a graph node, not a module; hardening records Z with a module hook. "
            "Choose a module name (see `leakaudit layers MODEL`)."
        )
    return layer


# --------------------------------------------------------------------------- data


@dataclass
class PreparedData:
    """Every row of the source, preprocessed once, with its tasks and roles.

    Attributes:
        inputs: float32 ``[n, C, H, W]`` in [0, 1], exactly as stored by ``dump``.
        prep: how inputs become the model's input (normalisation).
        roles: role code of every row (0 attacker-train, 1 attacker-validation, 2 test).
        public: the task the model is trained for.
        tasks: every task by name (the public one included).
        stratified_by: what the split was stratified by.
        source_rows: rows in the whole source (before ``--limit``).
    """

    inputs: torch.Tensor
    prep: Preprocess
    roles: np.ndarray
    public: Task
    tasks: dict[str, Task]
    stratified_by: str
    source_rows: int

    def rows(self, role: int) -> np.ndarray:
        return np.flatnonzero(self.roles == role)

    def labels(self, task: str) -> torch.Tensor:
        return torch.from_numpy(self.tasks[task].labels[: len(self.roles)])

    @property
    def num_classes(self) -> int:
        return len(self.public.class_names)


def prepare_data(
    data: str | DataSource,
    tasks: Sequence[tuple[str, str]],
    public: str,
    loaded: LoadedModel,
    *,
    input_size: tuple[int, int] | None,
    normalize: str | None,
    split: tuple[float, float, float],
    seed: int,
    limit: int | None,
) -> PreparedData:
    """Open ``data``, resolve the tasks, preprocess every row and assign the shared roles."""
    names = [name for name, _ in tasks]
    if len(set(names)) != len(names):
        raise ConfigError("task names given with --task must be unique.")
    if public not in names:
        raise ConfigError(f"no public task: pass --task {public}=SOURCE (e.g. --task {public}=parity).")
    source = open_source(data) if isinstance(data, str) else data
    n = len(source) if limit is None else min(limit, len(source))
    resolved = {name: resolve_task(name, src, source) for name, src in tasks}
    for task in resolved.values():
        _check_task_classes(task, n)
    prep = preprocess_for(
        source,
        model_input_size=loaded.input_size,
        model_in_chans=loaded.in_chans,
        input_size=input_size,
        normalize=normalize,
    )
    roles, stratified_by = split_roles(source, n, split, seed, list(resolved.values()))
    return PreparedData(
        inputs=_read_all(source, prep, n),
        prep=prep,
        roles=roles,
        public=resolved[public],
        tasks=resolved,
        stratified_by=stratified_by,
        source_rows=len(source),
    )


def _check_task_classes(task: Task, n: int) -> None:
    present = np.unique(task.labels[:n])
    if len(present) < 2:
        raise DataError(
            f"task {task.name!r} ({task.source}) has a single class in the {n:,} rows used; "
            "there is nothing to learn. Check the task source (and --limit)."
        )


def _read_all(source: DataSource, prep: Preprocess, n: int, block: int = 4096) -> torch.Tensor:
    shape = (n, prep.in_chans, *prep.input_size)
    out = torch.empty(shape, dtype=torch.float32)
    for start in range(0, n, block):
        stop = min(n, start + block)
        out[start:stop] = prep.images(source.read(start, stop))
    return out


@dataclass
class Batch:
    """One minibatch: raw inputs in [0, 1], the model's input, and labels of every task.

    Under ``torchrun`` a batch is this rank's share of the group's batch: rows ``rank``,
    ``rank + world``, … of its ``group_rows`` rows (see :func:`batches`), which
    :func:`leakaudit.distributed.gather_strided` puts back together.
    """

    inputs: torch.Tensor
    model_input: torch.Tensor
    labels: dict[str, torch.Tensor]
    public: str
    group: Context | None = None
    group_rows: int = 0

    @property
    def target(self) -> torch.Tensor:
        return self.labels[self.public]

    def __len__(self) -> int:
        return self.inputs.shape[0]


def batches(
    data: PreparedData,
    rows: np.ndarray,
    batch_size: int,
    device: torch.device,
    generator: torch.Generator | None,
    group: Context | None = None,
) -> Iterator[Batch]:
    """Minibatches of ``rows``: shuffled by ``generator`` (training) or in order (evaluation).

    A trailing batch of a single row is merged into the previous one: batch statistics
    (BatchNorm, distance correlation) are undefined on one row.

    With a distributed ``group``, each batch is this rank's share. Training: the permutation
    is sharded with :func:`leakaudit.distributed.shard_strided` (padded, so every rank takes
    the same number of steps) and cut into ``batch_size // world`` rows. Evaluation: the
    single-process batches (a trailing one merged when it has fewer rows than ranks), each
    split strided across ranks. Either way the rank holds rows ``rank``, ``rank + world``, …
    of the group's batch, in single-process order.
    """
    order = torch.from_numpy(rows)
    if generator is not None:
        order = order[torch.randperm(len(order), generator=generator)]
    world = 1 if group is None else group.world_size
    if group is not None and generator is not None:
        order = distributed.shard_strided(order, group)
        batch_size = max(1, batch_size // world)
    starts = list(range(0, len(order), batch_size))
    shortest = 2 if group is None or generator is not None else max(2, world)
    if len(starts) > 1 and len(order) - starts[-1] < shortest:
        starts.pop()
    labels = {name: data.labels(name) for name in data.tasks}
    for i, start in enumerate(starts):
        stop = starts[i + 1] if i + 1 < len(starts) else len(order)
        index = order[start:stop]
        group_rows = len(index) * world if generator is not None else len(index)
        if group is not None and generator is None:
            index = index[group.rank :: world]
        inputs = data.inputs.index_select(0, index).to(device)
        yield Batch(
            inputs=inputs,
            model_input=data.prep.model_input(inputs),
            labels={name: values.index_select(0, index).to(device) for name, values in labels.items()},
            public=data.public.name,
            group=group,
            group_rows=group_rows,
        )


# --------------------------------------------------------------------------- objectives


class Objective:
    """A training objective over the logits and the split-layer activations Z.

    The base class is plain cross-entropy on the public task (``leakaudit train`` and the
    λ = 0 baseline); recipes override what they change.

    Attributes:
        name: how results name it.
        layer: the split module whose output is Z, or ``None`` when Z is not needed.
        trains_model: whether the model's own parameters are trained (Shredder freezes them).
        default_lr: learning rate when the user gives none.
    """

    name = "cross-entropy"
    layer: str | None = None
    trains_model = True
    default_lr = 1e-3
    #: keep validation Z for :meth:`epoch_metrics` (costs memory on wide layers)
    needs_val_z = False

    def parameters(self) -> list[nn.Parameter]:
        """Trainable tensors of the objective itself (Shredder's noise)."""
        return []

    def transform(self, z: torch.Tensor) -> torch.Tensor:
        """What the deployed encoder adds at the split (Shredder's noise); identity here."""
        return z

    def loss(self, batch: Batch, logits: torch.Tensor, z: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of one batch and its named parts (logged per epoch)."""
        ce = F.cross_entropy(logits, batch.target)
        return ce, {"cross_entropy": ce}

    def after_step(self, batch: Batch, z: torch.Tensor | None) -> None:
        """Update non-gradient state after an optimiser step (Wen et al.'s centres)."""

    def epoch_metrics(self, z: torch.Tensor | None, labels: torch.Tensor) -> dict[str, float]:
        """Extra per-epoch numbers from the validation activations."""
        return {}

    def is_better(self, candidate: EpochStats, best: EpochStats | None) -> bool:
        """Model selection (early stopping): lower validation loss wins."""
        return best is None or candidate.val_loss < best.val_loss

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        return None

    def shared_tensors(self) -> list[torch.Tensor]:
        """Tensors that must be identical on every rank under ``torchrun``, broadcast from rank 0 before training.

        The live tensors of :meth:`state_dict` (which holds trainable ones too, such as Shredder's noise).
        """
        return list(self.state_dict().values())

    def wrap_encoder(self, encoder: nn.Module) -> nn.Module:
        """The client's encoder as deployed: the model's prefix plus whatever :meth:`transform` adds."""
        return encoder

    def describe(self) -> dict[str, Any]:
        """Settings that go into ``harden.json``."""
        return {}


# --------------------------------------------------------------------------- Z capture


class ZCapture:
    """Records the split layer's output on every forward, keeping the forward (and gradients) going.

    The objective's :meth:`Objective.transform` replaces the output (Shredder's noise),
    so the rest of the model computes on what the deployed encoder would send. Only the
    first call of the module per forward counts, as in ``dump``. One hook at a time per
    model; removed on :meth:`close`.
    """

    _active: set[int] = set()

    def __init__(
        self,
        model: nn.Module,
        layer: str | None,
        transform: Callable[[torch.Tensor], torch.Tensor],
        runner: nn.Module | None = None,
    ) -> None:
        """Hook ``layer`` of ``model``; forwards run through ``runner`` (its DistributedDataParallel wrapper) if given."""
        self.model, self.layer, self.transform = model, layer, transform
        self.runner = runner if runner is not None else model
        self.z: torch.Tensor | None = None
        self.handle = None
        if layer is None:
            return
        if id(model) in ZCapture._active:
            raise LeakAuditError("the model already has a Z capture hook; remove it before adding another.")
        target = dict(model.named_modules())[layer]
        self.handle = target.register_forward_hook(self._hook)
        ZCapture._active.add(id(model))

    def _hook(self, _module: nn.Module, _inputs: object, output: object) -> object:
        if self.z is not None:
            return None
        if not isinstance(output, torch.Tensor):
            raise UsageError(f"layer {self.layer!r} outputs a {type(output).__name__}, not a tensor.")
        self.z = self.transform(output)
        return self.z

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits, Z) of one forward pass."""
        self.z = None
        logits = self.runner(x)
        if not isinstance(logits, torch.Tensor):
            raise UsageError(f"the model returns a {type(logits).__name__}; training needs a logits tensor.")
        if self.layer is not None and self.z is None:
            raise LeakAuditError(f"the hook on layer {self.layer!r} obtained no output: the layer was not called.")
        z, self.z = self.z, None
        return logits, z

    def close(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
            ZCapture._active.discard(id(self.model))

    def __enter__(self) -> ZCapture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- evaluation


@dataclass
class Evaluation:
    """A pass over some rows in eval mode: mean loss, public accuracy, loss parts, Z."""

    loss: float
    accuracy: float
    parts: dict[str, float]
    z: torch.Tensor | None
    labels: torch.Tensor
    rows: int


def evaluate(
    model: nn.Module,
    objective: Objective,
    data: PreparedData,
    rows: np.ndarray,
    *,
    batch_size: int,
    device: torch.device,
    keep_z: bool = False,
    max_z_rows: int = 20_000,
    layer: str | None = None,
    group: Context | None = None,
) -> Evaluation:
    """Run ``model`` (with the objective's transform at the split) over ``rows``.

    ``layer`` records Z at another layer than the objective's (the plain objective has none).
    With a distributed ``group`` each rank runs its share of every batch, the sums are
    all-reduced and Z is gathered in row order: every rank returns the same evaluation.
    """
    was_training = model.training
    model.eval()
    total = correct = 0
    loss_sum = 0.0
    parts_sum: dict[str, float] = {}
    zs: list[torch.Tensor] = []
    kept = 0
    try:
        with ZCapture(model, layer or objective.layer, objective.transform) as hook, torch.no_grad():
            for batch in batches(data, rows, batch_size, device, None, group):
                logits, z = hook.forward(batch.model_input)
                loss, parts = objective.loss(batch, logits, z)
                size = len(batch)
                total += size
                correct += int((logits.argmax(1) == batch.target).sum())
                if size:  # under torchrun a rank may hold no rows of a batch (its loss is then NaN)
                    loss_sum += float(loss) * size
                    for name, value in parts.items():
                        parts_sum[name] = parts_sum.get(name, 0.0) + float(value) * size
                if keep_z and z is not None and kept < max_z_rows:
                    if group is not None:  # every rank keeps the whole batch's Z, in row order
                        z = distributed.gather_strided(z.detach(), batch.group_rows, group)
                    zs.append(z[: max_z_rows - kept].flatten(1).float().cpu())
                    kept += zs[-1].shape[0]
    finally:
        model.train(was_training)
    if group is not None:
        names = sorted(parts_sum)
        sums = distributed.all_reduce_sum([loss_sum, correct, total, *(parts_sum[k] for k in names)], device)
        loss_sum, correct, total = sums[0], sums[1], int(sums[2])
        parts_sum = dict(zip(names, sums[3:]))
    labels = data.labels(data.public.name)[torch.from_numpy(rows)]
    return Evaluation(
        loss=loss_sum / max(total, 1),
        accuracy=correct / max(total, 1),
        parts={k: v / max(total, 1) for k, v in parts_sum.items()},
        z=torch.cat(zs) if zs else None,
        labels=labels[:kept] if zs else labels,
        rows=total,
    )


# --------------------------------------------------------------------------- the loop


@dataclass
class EpochStats:
    """One epoch: training loss, validation loss and public accuracy, the objective's numbers."""

    epoch: int
    train_loss: float | None
    val_loss: float
    val_public_accuracy: float
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "train_loss": _round(self.train_loss),
            "val_loss": _round(self.val_loss),
            "val_public_accuracy": _round(self.val_public_accuracy),
            **{k: _round(v) for k, v in self.metrics.items()},
            "seconds": round(self.seconds, 3),
        }


def _round(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return value
    return float(f"{value:.6g}")


@dataclass(frozen=True)
class Diverged:
    """Where the loss or its gradient became non-finite (global step, epoch, batch index; -1 for validation)."""

    step: int
    epoch: int
    batch: int
    what: str


@dataclass
class FitOutcome:
    """What :func:`fit` did: the per-epoch history and the selected epoch (restored into the model)."""

    history: list[EpochStats]
    best_epoch: int
    stopped_early: bool
    diverged: Diverged | None = None
    steps: int = 0


def snapshot(model: nn.Module, objective: Objective) -> dict[str, dict[str, torch.Tensor]]:
    return {
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "objective": {k: v.detach().clone() for k, v in objective.state_dict().items()},
    }


def restore(model: nn.Module, objective: Objective, state: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    model.load_state_dict(state["model"])
    objective.load_state_dict(state["objective"])


def fit(
    model: nn.Module,
    objective: Objective,
    data: PreparedData,
    *,
    device: torch.device,
    epochs: int,
    batch_size: int,
    lr: float,
    patience: int,
    generator: torch.Generator,
    progress: Progress | None = None,
    description: str = "train",
    on_epoch: Callable[[EpochStats], None] | None = None,
    group: Context | None = None,
) -> FitOutcome:
    """Train ``model`` on attacker-train rows with ``objective``, early-stopping on validation.

    Epoch 0 is the model as given; the selected epoch (by :meth:`Objective.is_better`) is
    restored into ``model`` and ``objective`` at the end — also when the loss diverges, in
    which case the outcome carries where (and nothing after the last good epoch is kept).

    With a distributed ``group`` every rank calls this with the same arguments (the same
    ``generator`` seed) and trains its share of each batch with DistributedDataParallel (see
    the module docstring); every rank ends with the same weights, objective state and outcome.
    """
    train_rows, val_rows = data.rows(ROLE_TRAIN), data.rows(ROLE_VAL)
    if len(train_rows) < 2 or len(val_rows) < 1:
        raise DataError(
            f"too few rows to train: {len(train_rows)} attacker-train and {len(val_rows)} attacker-validation. "
            "Use more data (--limit) or other --split fractions."
        )
    if objective.trains_model:
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        model.requires_grad_(False)
        params = []
    own = objective.parameters()  # not the model's: DistributedDataParallel does not average their gradients
    params += own
    trainee: nn.Module = model
    if group is not None:
        check_group(data, batch_size, group)
        distributed.broadcast_tensors([*model.state_dict().values(), *objective.shared_tensors()])
        # Dropout masks and Shredder's noise: each rank draws its own, or every rank would
        # perturb its rows the same way.
        torch.manual_seed((generator.initial_seed() + group.rank) % 2**63)
        if objective.trains_model:
            trainee = distributed.data_parallel(model, device)
    optimizer = torch.optim.Adam(params, lr=lr)
    steps_per_epoch = sum(1 for _ in _step_starts(len(train_rows), batch_size, group))
    total_steps = epochs * steps_per_epoch

    def validate(epoch: int, train_loss: float | None, started: float, train_parts: dict[str, float]) -> EpochStats:
        val = evaluate(
            model, objective, data, val_rows, batch_size=batch_size, device=device, keep_z=objective.needs_val_z, group=group
        )
        metrics = {f"train_{k}": v for k, v in train_parts.items()}
        metrics.update({f"val_{k}": v for k, v in val.parts.items()})
        metrics.update(objective.epoch_metrics(val.z, val.labels))
        return EpochStats(epoch, train_loss, val.loss, val.accuracy, time.perf_counter() - started, metrics)

    history = [validate(0, None, time.perf_counter(), {})]
    if on_epoch is not None:
        on_epoch(history[0])
    best, best_state = history[0], snapshot(model, objective)
    since_best = 0
    step = 0
    stopped_early = False
    if progress is not None:
        progress(description, 0, total_steps)
    for epoch in range(1, epochs + 1):
        started = time.perf_counter()
        if objective.trains_model:
            model.train()
        else:
            model.eval()  # frozen model: BatchNorm statistics and dropout as deployed
        loss_sum, seen = 0.0, 0
        parts_sum: dict[str, float] = {}
        # The hook lives for the training batches only: validation installs its own.
        with ZCapture(model, objective.layer, objective.transform, runner=trainee) as hook:
            for index, batch in enumerate(batches(data, train_rows, batch_size, device, generator, group)):
                step += 1
                logits, z = hook.forward(batch.model_input)
                loss, parts = objective.loss(batch, logits, z)
                bad = not bool(torch.isfinite(loss))
                if group is not None:
                    bad = distributed.any_rank(bad, device)  # a rank that stops alone leaves the others waiting
                if bad:
                    return _diverged(model, objective, best_state, history, best, step, epoch, index, "loss")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if group is not None and own:
                    _average_gradients(own, group)
                norm = torch.nn.utils.clip_grad_norm_(params, float("inf"))
                if not torch.isfinite(norm):
                    return _diverged(model, objective, best_state, history, best, step, epoch, index, "gradient")
                optimizer.step()
                objective.after_step(batch, None if z is None else z.detach())
                size = len(batch)
                seen += size
                loss_sum += float(loss.detach()) * size
                for name, value in parts.items():
                    parts_sum[name] = parts_sum.get(name, 0.0) + float(value.detach()) * size
                if progress is not None:
                    progress(description, step, total_steps)
        if group is not None:
            names = sorted(parts_sum)
            sums = distributed.all_reduce_sum([loss_sum, seen, *(parts_sum[k] for k in names)], device)
            loss_sum, seen, parts_sum = sums[0], int(sums[1]), dict(zip(names, sums[2:]))
            if objective.trains_model:
                distributed.average_floating_buffers(model, group)
        stats = validate(epoch, loss_sum / seen, started, {k: v / seen for k, v in parts_sum.items()})
        history.append(stats)
        if on_epoch is not None:
            on_epoch(stats)
        if not math.isfinite(stats.val_loss):
            return _diverged(model, objective, best_state, history, best, step, epoch, -1, "validation loss")
        if objective.is_better(stats, best):
            best, best_state, since_best = stats, snapshot(model, objective), 0
        else:
            since_best += 1
            if since_best >= patience:
                stopped_early = epoch < epochs
                break
    if progress is not None:
        progress(description, total_steps, total_steps)
    restore(model, objective, best_state)
    model.eval()
    return FitOutcome(history, best.epoch, stopped_early, steps=step)


def check_group(data: PreparedData, batch_size: int, group: Context) -> None:
    """Refuse what a run on ``group.world_size`` ranks cannot split: every rank needs rows of every batch."""
    world = group.world_size
    if batch_size < 2 * world:
        raise ConfigError(
            f"--batch-size is the group's batch under torchrun and each of the {world} ranks needs at least 2 rows "
            f"of it: give at least {2 * world}, got {batch_size}."
        )
    for role, name in ((ROLE_TRAIN, "attacker-train"), (ROLE_VAL, "attacker-validation"), (ROLE_TEST, "test")):
        if len(data.rows(role)) < 2 * world:
            raise DataError(
                f"{len(data.rows(role))} {name} rows cannot be split across {world} ranks (at least {2 * world} needed). "
                "Use more data (--limit) or fewer ranks."
            )


def _step_starts(n: int, batch_size: int, group: Context | None) -> list[int]:
    """First positions of the training steps over ``n`` rows (this rank's share under ``torchrun``)."""
    if group is not None:
        n, batch_size = -(-n // group.world_size), max(1, batch_size // group.world_size)
    starts = list(range(0, n, batch_size))
    if len(starts) > 1 and n - starts[-1] < 2:
        starts.pop()
    return starts


def _average_gradients(params: Sequence[torch.Tensor], group: Context) -> None:
    """Average the gradients of tensors DistributedDataParallel does not cover (the objective's own)."""
    import torch.distributed as dist

    for param in params:
        if param.grad is not None:
            dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
            param.grad.div_(group.world_size)


def _diverged(model, objective, best_state, history, best, step, epoch, batch, what) -> FitOutcome:
    restore(model, objective, best_state)
    model.eval()
    return FitOutcome(history, best.epoch, True, Diverged(step, epoch, batch, what), steps=step)


def divergence_message(diverged: Diverged, best_epoch: int, kept: Path, hint: str) -> str:
    """The one-line error for a diverged run (see :class:`leakaudit.errors.NonFiniteError`)."""
    where = f"epoch {diverged.epoch}, batch {diverged.batch + 1}" if diverged.batch >= 0 else f"epoch {diverged.epoch}"
    return (
        f"the {diverged.what} became NaN or infinite at step {diverged.step} ({where}); training stopped. "
        f"The last good checkpoint (epoch {best_epoch}) is in {str(kept)!r}. {hint}"
    )


def accuracy_on(
    model: nn.Module,
    objective: Objective,
    data: PreparedData,
    role: int,
    *,
    batch_size: int,
    device: torch.device,
    group: Context | None = None,
) -> float:
    """Public-task accuracy of ``model`` (with the objective's transform) on the rows of ``role``."""
    return evaluate(model, objective, data, data.rows(role), batch_size=batch_size, device=device, group=group).accuracy


def check_outputs(module: nn.Module, data: PreparedData, device: torch.device, spec: str) -> None:
    """The model's output must be one logit per public class."""
    rows = data.rows(ROLE_TRAIN)[:2]
    batch = next(batches(data, rows, 2, device, None))
    was = module.training
    module.eval()
    try:
        with torch.no_grad():
            out = module(batch.model_input)
    except Exception as exc:
        raise UsageError(
            f"model {spec!r} failed on inputs of shape {tuple(batch.model_input.shape[1:])}: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. Check --input-size and --in-chans."
        ) from None
    finally:
        module.train(was)
    k = data.num_classes
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] != k:
        got = tuple(out.shape[1:]) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UsageError(
            f"model {spec!r} outputs {got} per row, but public task {data.public.name!r} ({data.public.source}) "
            f"has {k} classes; the model needs {k} logits (pass --num-classes {k}, or weights trained for that task)."
        )


# --------------------------------------------------------------------------- recipes


@dataclass
class RecipeContext:
    """What a recipe's factory may look at to build its objective.

    Attributes:
        model: the pre-trained model (on ``device``), before any hardening.
        layer: the split module.
        data: every row, task and role.
        device: where training runs.
        batch_size: rows per step.
        baseline: the pre-trained model on attacker-validation rows (public accuracy, loss).
        layer_shape: shape of one row of Z.
        group: this process's place under ``torchrun``; ``None`` when alone.
    """

    model: nn.Module
    layer: str
    data: PreparedData
    device: torch.device
    batch_size: int
    baseline: Evaluation
    layer_shape: tuple[int, ...]
    group: Context | None = None

    def train_activations(self, max_rows: int = 20_000) -> tuple[torch.Tensor, torch.Tensor]:
        """Flattened Z of the pre-trained model on (up to ``max_rows``) attacker-train rows, and their public labels."""
        rows = self.data.rows(ROLE_TRAIN)[:max_rows]
        evaluation = evaluate(
            self.model, Objective(), self.data, rows, batch_size=self.batch_size, device=self.device,
            keep_z=True, max_z_rows=max_rows, layer=self.layer, group=self.group,
        )
        assert evaluation.z is not None
        return evaluation.z, evaluation.labels
