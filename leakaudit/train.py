"""``leakaudit train``: plain cross-entropy training of the public task.

The λ = 0 baseline of Scrunch, and the pre-trained model the recipes start from. The
model is trained on attacker-train rows, early-stopped on attacker-validation rows and
scored on test rows (:func:`leakaudit.data.split_roles`), and saved as safetensors with a
``.json`` record beside it (spec, options, task, per-epoch history).

Under ``torchrun`` every rank trains its share of each batch with DistributedDataParallel
(:mod:`leakaudit.training`) and rank 0 alone writes the weights and the record.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from leakaudit import distributed
from leakaudit.data import open_source, resolve_task
from leakaudit.errors import ConfigError, NonFiniteError, OutputExistsError, UsageError
from leakaudit.export import model_record, save_weights, write_json
from leakaudit.models.spec import ModelSpec
from leakaudit.recipes.base import EpochStats, Objective
from leakaudit.runtime import resolve_device, seed_everything
from leakaudit.training.objective import Progress, accuracy_on, divergence_message, fit
from leakaudit.training.prepared import (
    ROLE_TEST,
    PreparedData,
    check_fit_settings,
    check_group,
    check_outputs,
    load_for_training,
    prepare_data,
)


@dataclass(frozen=True)
class TrainSettings:
    """Everything that defines a training run; mirrors the options of ``leakaudit train``.

    ``num_classes`` defaults to the public task's class count where the model accepts it.
    """

    #: The model to train (a bare spec string is taken as ``ModelSpec(spec)``).
    model: ModelSpec
    data: str
    output: Path
    task: tuple[str, str] = ("public", "label")
    input_size: tuple[int, int] | None = None
    normalize: str | None = None
    split: tuple[float, float, float] = (0.4, 0.4, 0.2)
    limit: int | None = None
    seed: int = 0
    device: str = "auto"
    batch_size: int = 128
    epochs: int = 20
    lr: float = 1e-3
    patience: int = 5
    force: bool = False

    def __post_init__(self) -> None:
        check_fit_settings(self)
        if Path(self.output).suffix != ".safetensors":
            raise ConfigError(f"-o must name a .safetensors file, got {str(self.output)!r}.")


@dataclass
class TrainResult:
    """What a training run produced."""

    output: Path
    record: Path
    history: list[EpochStats]
    best_epoch: int
    stopped_early: bool
    test_public_accuracy: float
    num_classes: int
    seconds: float
    settings: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": str(self.output),
            "record": str(self.record),
            "best_epoch": self.best_epoch,
            "stopped_early": self.stopped_early,
            "public_accuracy": self.test_public_accuracy,
            "num_classes": self.num_classes,
            "seconds": round(self.seconds, 3),
            "settings": self.settings,
            "history": [h.to_dict() for h in self.history],
        }


def record_path(output: Path) -> Path:
    """``model.safetensors`` → ``model.json`` beside it."""
    return Path(output).with_suffix(".json")


def train(
    settings: TrainSettings,
    progress: Progress | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
) -> TrainResult:
    """Train ``settings.model`` on the public task and write the weights (see the module docstring).

    Args:
        settings: what to train.
        progress: ``progress(description, done, total)`` for a progress bar.
        on_epoch: called with each epoch's statistics (epoch 0 is the model before training).

    Raises:
        OutputExistsError: the output exists and ``force`` is off.
        NonFiniteError: the loss diverged; the last good checkpoint is written to
            ``MODEL.last-good.safetensors``.
    """
    started = time.perf_counter()
    output = Path(settings.output)
    record = record_path(output)
    for path in (output, record):
        if path.exists() and not settings.force:
            raise OutputExistsError(f"{str(path)!r} exists. Pass --force to overwrite it.")
    if output.is_dir():
        raise UsageError(f"{str(output)!r} is a directory; give a file name such as model.safetensors.")
    device = resolve_device(settings.device)
    group = distributed.current(device)
    device = distributed.rank_device(device, group)
    is_main = group is None or group.is_main
    generator = seed_everything(settings.seed)
    name, source = settings.task

    # Resolve the task before building the model: its class count sizes the head.
    opened = open_source(settings.data)
    classes = len(resolve_task(name, source, opened).class_names)
    loaded = load_for_training(settings.model, default_num_classes=classes)
    data = prepare_data(
        opened,
        [settings.task],
        name,
        loaded,
        input_size=settings.input_size,
        normalize=settings.normalize,
        split=settings.split,
        seed=settings.seed,
        limit=settings.limit,
    )
    model = loaded.module.to(device)
    check_outputs(model, data, device, settings.model.spec)
    if group is not None:
        check_group(data, settings.batch_size, group)
    objective = Objective()
    outcome = fit(
        model,
        objective,
        data,
        device=device,
        epochs=settings.epochs,
        batch_size=settings.batch_size,
        lr=settings.lr,
        patience=settings.patience,
        generator=generator,
        progress=progress,
        description=f"train {settings.model.spec} on {name}",
        on_epoch=on_epoch,
        group=group,
    )
    summary = _settings_dict(settings, data)
    rec = model_record(
        loaded,
        weights_file=output.name,
        layer=None,
        input_size=data.prep.input_size,
        in_chans=data.prep.in_chans,
        normalize=settings.normalize,
        public={"name": name, "source": source, "class_names": data.public.class_names},
    )
    if outcome.diverged is not None:  # the same outcome on every rank
        kept = output.with_name(output.stem + ".last-good.safetensors")
        with distributed.agreed(group):
            if is_main:
                save_weights(model, kept)
                write_json(kept.with_suffix(".json"), {**rec, "weights": kept.name, "status": "diverged",
                                                       "history": [h.to_dict() for h in outcome.history]})
        raise NonFiniteError(
            divergence_message(outcome.diverged, outcome.best_epoch, kept, "Lower --lr, or check the data and model.")
        )
    accuracy = accuracy_on(model, objective, data, ROLE_TEST, batch_size=settings.batch_size, device=device, group=group)
    result = TrainResult(
        output=output,
        record=record,
        history=outcome.history,
        best_epoch=outcome.best_epoch,
        stopped_early=outcome.stopped_early,
        test_public_accuracy=accuracy,
        num_classes=data.num_classes,
        seconds=time.perf_counter() - started,
        settings=summary,
    )
    rec.update(
        {
            "trained": {
                "public_accuracy": accuracy,
                "best_epoch": outcome.best_epoch,
                "stopped_early": outcome.stopped_early,
                "settings": summary,
                "history": [h.to_dict() for h in outcome.history],
            }
        }
    )
    with distributed.agreed(group):  # rank 0 writes, after every rank finished
        if is_main:
            save_weights(model, output, metadata={"leakaudit": "train", "spec": settings.model.spec})
            write_json(record, rec)
    return result


def _settings_dict(settings: TrainSettings, data: PreparedData) -> dict[str, Any]:
    return {
        "model": settings.model.spec,
        "weights": settings.model.weights,
        "data": settings.data,
        "task": list(settings.task),
        "rows": len(data.roles),
        "split": list(settings.split),
        "stratified_by": data.stratified_by,
        "seed": settings.seed,
        "input_size": list(data.prep.input_size),
        "normalize": settings.normalize,
        "batch_size": settings.batch_size,
        "epochs": settings.epochs,
        "lr": settings.lr,
        "patience": settings.patience,
        "limit": settings.limit,
    }
