"""Data and models for the training workflows (``leakaudit train``, ``leakaudit harden``).

Every row of the source is read and preprocessed once into a :class:`PreparedData`, with
its tasks and the roles of :func:`leakaudit.data.split_roles`, the split every command
shares: the model is trained on attacker-train rows, selected (early stopping) on
attacker-validation rows and scored on test rows, which a later ``leakaudit dump`` with the
same data, fractions and seed assigns to the same roles. :func:`batches` cuts rows into the
:class:`~leakaudit.recipes.base.Batch` objects an objective sees.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from leakaudit import roles
from leakaudit.data import DataSource, Preprocess, Task, open_source, preprocess_for, resolve_task, split_roles
from leakaudit.distributed import Context
from leakaudit.errors import ConfigError, DataError, UsageError
from leakaudit.layers import OUTPUT, resolve_layer
from leakaudit.models import LoadedModel
from leakaudit.models.spec import ModelSpec
from leakaudit.recipes.base import Batch
from leakaudit.training.engine import epoch_order, step_bounds, step_rows_of

ROLE_TRAIN, ROLE_VAL, ROLE_TEST = roles.ATTACKER_TRAIN, roles.ATTACKER_VALIDATION, roles.TEST

# --------------------------------------------------------------------------- settings


def check_fit_settings(settings: Any) -> None:
    """Settle and validate what every training command's settings share (``TrainSettings``, ``HardenSettings``).

    A bare spec string given as ``model`` becomes ``ModelSpec(spec)``; the options are checked
    as the command line spells them.

    Raises:
        ConfigError: the first option out of range.
    """
    if isinstance(settings.model, str):
        object.__setattr__(settings, "model", ModelSpec(settings.model))
    epochs, batch_size, lr, patience = settings.epochs, settings.batch_size, settings.lr, settings.patience
    split, limit = settings.split, settings.limit
    if epochs <= 0:
        raise ConfigError(f"--epochs must be positive, got {epochs}.")
    if batch_size < 2:
        raise ConfigError(f"--batch-size must be at least 2, got {batch_size}.")
    if lr is not None and not (lr > 0 and math.isfinite(lr)):
        raise ConfigError(f"--lr must be a positive number, got {lr}.")
    if patience <= 0:
        raise ConfigError(f"--patience must be positive, got {patience}.")
    if len(split) != 3 or any(f <= 0 for f in split) or abs(sum(split) - 1.0) > 1e-6:
        raise ConfigError(f"--split needs three positive fractions TRAIN,VAL,TEST summing to 1, got {tuple(split)}.")
    if limit is not None and limit <= 0:
        raise ConfigError(f"--limit must be positive, got {limit}.")


def load_for_training(model: ModelSpec, *, default_num_classes: int | None = None) -> LoadedModel:
    """Build the model to train; ``default_num_classes`` is used where the model accepts it.

    Raises:
        UsageError: the model cannot be trained (an exported program has no trainable
            Python module).
    """
    spec = model.spec
    if model.num_classes is None and default_num_classes is not None:
        try:
            loaded = dataclasses.replace(model, num_classes=default_num_classes).load()
        except (ConfigError, UsageError):
            # The spec takes no num_classes (an archive, a factory without it): build it as
            # given; a head of the wrong width is reported by check_outputs.
            loaded = model.load()
    else:
        loaded = model.load()
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

    With a distributed ``group``, each batch is this rank's share. Training: the order and
    steps of :func:`leakaudit.training.engine.fit` (the permutation sharded with
    :func:`leakaudit.distributed.shard_strided`, padded so every rank takes the same number of
    steps, and cut into ``batch_size // world`` rows). Evaluation: the single-process batches
    (a trailing one merged when it has fewer rows than ranks), each split strided across
    ranks. Either way the rank holds rows ``rank``, ``rank + world``, … of the group's batch,
    in single-process order.
    """
    order = torch.from_numpy(rows)
    if generator is not None:
        positions = epoch_order(len(order), generator, group)
        for first, stop in step_bounds(len(positions), step_rows_of(batch_size, group), "merge"):
            yield make_batch(data, order[positions[first:stop]], device, group)
        return
    world = 1 if group is None else group.world_size
    starts = list(range(0, len(order), batch_size))
    if len(starts) > 1 and len(order) - starts[-1] < max(2, world):
        starts.pop()
    for i, start in enumerate(starts):
        index = order[start : starts[i + 1] if i + 1 < len(starts) else len(order)]
        group_rows = len(index)
        if group is not None:
            index = index[group.rank :: world]
        yield make_batch(data, index, device, group, group_rows)


def make_batch(
    data: PreparedData, index: torch.Tensor, device: torch.device, group: Context | None, group_rows: int | None = None
) -> Batch:
    """The :class:`Batch` of rows ``index``; ``group_rows`` defaults to a training step's (``len(index) × world``)."""
    world = 1 if group is None else group.world_size
    inputs = data.inputs.index_select(0, index).to(device)
    return Batch(
        inputs=inputs,
        model_input=data.prep.model_input(inputs),
        labels={name: data.labels(name).index_select(0, index).to(device) for name in data.tasks},
        public=data.public.name,
        group=group,
        group_rows=len(index) * world if group_rows is None else group_rows,
    )


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

