"""``leakaudit harden``: fine-tune a pre-trained split model with a recipe, and export it.

:func:`harden` loads the model exactly as ``dump`` does (any spec and weights), checks
up front that it can be split at the layer (the exports need the cut) and that it
predicts the public task, then trains with the recipe's objective on attacker-train rows,
early-stopping on attacker-validation rows, and scores public accuracy on test rows.

With a sweep (``lambda=0.5,0.7,0.9``) each value is trained from the same pre-trained
weights into its own sub-folder, and every value plus the unhardened model is dumped and
attacked with the tool's own ``dump``, classifier attack and metrics
(:mod:`leakaudit.sweep`): the privacy–utility table of Scrunch's Figs. 4–5.

Everything is written into a temporary folder that replaces ``output`` only at the end.

Under ``torchrun`` (``WORLD_SIZE`` > 1) every rank trains its share of each batch with
DistributedDataParallel (:mod:`leakaudit.training`) and evaluates its share of the
validation and test rows; every rank reaches the same weights, decisions and numbers, and
rank 0 alone writes the folder (weights, exports, ``harden.json``). A rank that fails makes
the group fail: rank 0's temporary folder is removed (or, when torchrun kills rank 0, left
behind as a hidden ``.OUTPUT.tmp-PID``), so no folder at ``output`` looks finished. The
privacy evaluation (``--sweep`` without ``--no-evaluate``, ``--evaluate``) is not run under
torchrun: run ``dump``, ``attack`` and ``metrics`` under torchrun on the hardened model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from leakaudit import __version__, distributed
from leakaudit.config import from_mapping
from leakaudit.distributed import Context
from leakaudit.errors import ConfigError, NonFiniteError, UsageError
from leakaudit.export import (
    check_output_dir,
    export_split,
    model_record,
    save_weights,
    staged_dir,
    write_json,
)
from leakaudit.models.spec import ModelSpec
from leakaudit.recipes.base import EpochStats, Objective, RecipeContext
from leakaudit.registry import RECIPES, Plugin
from leakaudit.runtime import resolve_device, seed_everything
from leakaudit.split import split_model
from leakaudit.training.objective import Progress, divergence_message, evaluate, fit, snapshot, z_capture
from leakaudit.training.prepared import (
    ROLE_TEST,
    ROLE_TRAIN,
    ROLE_VAL,
    PreparedData,
    batches,
    check_fit_settings,
    check_group,
    check_outputs,
    load_for_training,
    prepare_data,
    split_module,
)

HARDEN_SCHEMA = "leakaudit.harden"
HARDEN_SCHEMA_VERSION = 1


def field_name(option: str) -> str:
    """CLI/YAML spelling → config field (``lambda`` is a Python keyword: ``lambda_``)."""
    option = option.strip().lstrip("-").replace("-", "_")
    return "lambda_" if option == "lambda" else option


def option_name(name: str) -> str:
    """Config field → CLI spelling."""
    return "--lambda" if name == "lambda_" else "--" + name.replace("_", "-")


@dataclass(frozen=True)
class HardenSettings:
    """Everything that defines a hardening run; mirrors the options of ``leakaudit harden``.

    Attributes:
        options: the recipe's settings by CLI name (``lambda``, ``center_alpha``, ``alpha``,
            ``against``, …), mapped onto the recipe's config.
        sweep: a config field and the values to train, e.g. ``("lambda", (0.5, 0.9))``.
        private: the task the privacy evaluation attacks (default: ``private`` if given,
            else the first task other than ``public``).
        evaluate: dump, attack and measure each result (default: only for sweeps).
        decoder: also run the decoder attack in the evaluation (SSIM; slower).
        decoder_arch: which decoders (``best`` = all of the attack's architectures).
        keep_stores: keep the evaluation's activation stores in ``output/stores``.
        attack_epochs: cap on the attacks' epochs in the evaluation (``None``: their default).
        lr: learning rate; ``None`` takes the recipe's (a low one for fine-tuning).
    """

    #: The pre-trained model (a bare spec string is taken as ``ModelSpec(spec)``).
    model: ModelSpec
    data: str
    layer: str
    output: Path
    method: str
    tasks: tuple[tuple[str, str], ...] = ()
    options: dict[str, Any] = field(default_factory=dict)
    sweep: tuple[str, tuple[float, ...]] | None = None
    private: str | None = None
    evaluate: bool | None = None
    decoder: bool = False
    decoder_arch: str = "best"
    keep_stores: bool = False
    attack_epochs: int | None = None
    input_size: tuple[int, int] | None = None
    normalize: str | None = None
    split: tuple[float, float, float] = (0.4, 0.4, 0.2)
    limit: int | None = None
    seed: int = 0
    device: str = "auto"
    batch_size: int = 128
    epochs: int = 30
    lr: float | None = None
    patience: int = 5
    force: bool = False
    #: epochs after which the activations the server receives are written as stores (0: before training).
    record_sent: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        check_fit_settings(self)
        if any(e < 0 or e > self.epochs for e in self.record_sent):
            raise ConfigError(f"--record-sent epochs must lie in 0..{self.epochs} (--epochs), got {list(self.record_sent)}.")
        if self.attack_epochs is not None and self.attack_epochs <= 0:
            raise ConfigError(f"--attack-epochs must be positive, got {self.attack_epochs}.")

    @property
    def evaluates(self) -> bool:
        return self.evaluate if self.evaluate is not None else self.sweep is not None


def recipe_configs(settings: HardenSettings) -> tuple[Plugin, list[tuple[str, Any]]]:
    """The recipe and one (label, config) per run; every value is checked before training.

    Raises:
        UnknownNameError: no such recipe (the closest are listed).
        ConfigError: an option the recipe does not have, or a value out of range.
    """
    plugin = RECIPES.get(settings.method)
    cls = plugin.config_cls
    fields = {f.name for f in dataclasses.fields(cls)} if cls is not None else set()
    allowed = ", ".join(option_name(f) for f in sorted(fields)) or "none"
    values: dict[str, Any] = {}
    for key, value in settings.options.items():
        name = field_name(key)
        if name not in fields:
            raise ConfigError(f"{option_name(name)} does not apply to {settings.method}; its options: {allowed}.")
        values[name] = value
    runs: list[tuple[str, Any]] = []
    if settings.sweep is None:
        runs.append(("", from_mapping(cls, values) if cls is not None else None))
        return plugin, runs
    key, sweep_values = settings.sweep
    name = field_name(key)
    if name not in fields:
        raise ConfigError(f"--sweep {key}: {settings.method} has no such option; its options: {allowed}.")
    if name in values:
        raise ConfigError(f"{option_name(name)} is given and swept; give it only with --sweep.")
    if not sweep_values:
        raise ConfigError(f"--sweep {key} needs at least one value.")
    if len(set(sweep_values)) != len(sweep_values):
        raise ConfigError(f"--sweep {key} repeats a value.")
    assert cls is not None  # a recipe without a config has no fields: its sweep was refused above
    spelled = option_name(name).lstrip("-")
    for value in sweep_values:
        # Whole numbers as ints: they fit int settings (center_dim) and float ones alike.
        typed = int(value) if float(value).is_integer() else value
        runs.append((f"{spelled}={value:g}", from_mapping(cls, {**values, name: typed})))
    return plugin, runs


@dataclass
class RunResult:
    """One trained configuration: its history, test accuracy and exported files."""

    label: str
    folder: Path
    config: dict[str, Any]
    history: list[EpochStats]
    best_epoch: int
    stopped_early: bool
    public_accuracy: float
    public_accuracy_normalized: float
    lr: float
    files: dict[str, str]
    seconds: float
    privacy: dict[str, Any] | None = None
    burn_in: dict[str, Any] | None = None
    sent: dict[str, str] | None = None
    #: the ONNX export's opset, input shape and tolerance, or ``{"skipped": reason}``
    onnx: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "folder": str(self.folder),
            "config": self.config,
            "lr": self.lr,
            "best_epoch": self.best_epoch,
            "stopped_early": self.stopped_early,
            "public_accuracy": self.public_accuracy,
            "public_accuracy_normalized": self.public_accuracy_normalized,
            "files": self.files,
            "seconds": round(self.seconds, 3),
            "history": [h.to_dict() for h in self.history],
            **({"privacy": self.privacy} if self.privacy is not None else {}),
            **({"burn_in": self.burn_in} if self.burn_in is not None else {}),
            **({"sent": self.sent} if self.sent is not None else {}),
            **({"onnx": self.onnx} if self.onnx is not None else {}),
        }


@dataclass
class HardenResult:
    """What :func:`harden` produced; :meth:`to_dict` is ``harden.json``."""

    output: Path
    method: str
    layer: str
    runs: list[RunResult]
    baseline: dict[str, Any]
    settings: dict[str, Any]
    table: list[dict[str, Any]] | None
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": HARDEN_SCHEMA,
            "schema_version": HARDEN_SCHEMA_VERSION,
            "tool_version": __version__,
            "method": self.method,
            "layer": self.layer,
            "output": str(self.output),
            "seed": self.settings["seed"],
            "data": self.settings["data"],
            "settings": self.settings,
            "baseline": self.baseline,
            "runs": [r.to_dict() for r in self.runs],
            "table": self.table,
            "seconds": round(self.seconds, 3),
        }


def harden(
    settings: HardenSettings,
    progress: Progress | None = None,
    on_epoch: Callable[[str, EpochStats], None] | None = None,
) -> HardenResult:
    """Harden ``settings.model`` at ``settings.layer`` (see the module docstring).

    Args:
        settings: what to do.
        progress: ``progress(description, done, total)`` for progress bars.
        on_epoch: called with (run label, epoch statistics) after every epoch.

    Raises:
        UnknownNameError: unknown recipe, layer or task (closest names listed).
        ConfigError: an option out of range or not of this recipe.
        OutputExistsError: ``output`` exists and ``force`` is off.
        UsageError: the model cannot be split at the layer (the layers that can are listed),
            or does not predict the public task.
        NonFiniteError: the loss diverged; the last good checkpoint is kept in
            ``OUTPUT.last-good``.
    """
    started = time.perf_counter()
    plugin, runs = recipe_configs(settings)
    output = Path(settings.output)
    if settings.record_sent and distributed.world_size_from_env() > 1:
        raise UsageError("--record-sent does not run under torchrun; run it in one process.")
    if settings.evaluates and distributed.world_size_from_env() > 1:
        raise UsageError(
            "the privacy evaluation (--sweep, --evaluate) does not run under torchrun; pass --no-evaluate, "
            "then run `leakaudit dump`, `attack` and `metrics` under torchrun on the hardened model."
        )
    if distributed.world_size_from_env() <= 1:
        check_output_dir(output, settings.force)
    device = resolve_device(settings.device)  # `--device cuda` without CUDA: refused before joining a group
    group = distributed.current(device)
    device = distributed.rank_device(device, group)
    is_main = group is None or group.is_main
    if group is not None:
        with distributed.agreed(group):  # every rank starts, or none does
            if is_main:
                check_output_dir(output, settings.force)
    seed_everything(settings.seed)
    loaded = load_for_training(settings.model)
    layer = split_module(loaded.module, settings.layer)
    split_model(loaded.module, layer)  # fail now, not after training, where the exports cannot cut
    data = prepare_data(
        settings.data,
        settings.tasks,
        "public",
        loaded,
        input_size=settings.input_size,
        normalize=settings.normalize,
        split=settings.split,
        seed=settings.seed,
        limit=settings.limit,
    )
    private = _private_task(settings, data) if settings.evaluates else None
    model = loaded.module.to(device)
    check_outputs(model, data, device, settings.model.spec)
    if group is not None:
        check_group(data, settings.batch_size, group)
        distributed.broadcast_tensors(list(model.state_dict().values()))  # rank 0's weights, even random ones
    initial = snapshot(model, Objective())["model"]

    plain = Objective()
    rows_val, rows_test = data.rows(ROLE_VAL), data.rows(ROLE_TEST)
    baseline_val = evaluate(model, plain, data, rows_val, batch_size=settings.batch_size, device=device, group=group)
    baseline_test = evaluate(model, plain, data, rows_test, batch_size=settings.batch_size, device=device, group=group).accuracy
    layer_shape = _layer_shape(model, layer, data, device)
    baseline = {
        "public_accuracy": baseline_test,
        "val_public_accuracy": baseline_val.accuracy,
        "val_loss": baseline_val.loss,
    }
    summary = _settings_dict(settings, loaded, data, layer)

    results: list[RunResult] = []
    table = None
    # Rank 0 writes; the other ranks train beside it and write nothing.
    with staged_dir(output, settings.force) if is_main else _nowhere(output) as stage:
        for label, config in runs:
            folder = stage / label if label else stage
            if is_main:
                folder.mkdir(exist_ok=True)
            model.load_state_dict(initial)
            run = _run_one(
                settings, plugin, config, label, loaded, model, layer, tuple(layer_shape), data, device,
                baseline_val, baseline_test, folder, output / label if label else output, progress, on_epoch, group,
            )
            results.append(run)
        if settings.evaluates:
            from leakaudit.sweep import privacy_table

            assert private is not None  # chosen above whenever settings.evaluates

            table = privacy_table(
                settings, loaded, layer, data, private, initial, results, stage, output, baseline_test, progress
            )
        result = HardenResult(
            output=output,
            method=settings.method,
            layer=layer,
            runs=results,
            baseline=baseline,
            settings=summary,
            table=table,
            seconds=time.perf_counter() - started,
        )
        with distributed.agreed(group):
            if is_main:
                write_json(stage / "harden.json", result.to_dict())
        stage_name = stage.name
    if table is not None and settings.keep_stores:
        from leakaudit.sweep import retarget_stores

        retarget_stores(output, table, stage_name)
    if is_main:
        _retarget_sent(output, results, stage_name)
    return result


def _retarget_sent(output: Path, runs: list[RunResult], stage_name: str) -> None:
    """Point the ``--record-sent`` stores' weights from the staging folder at ``output``, where they now lie.

    The attacks that rebuild the model from a store's provenance (the continuation head,
    :func:`leakaudit.provenance.rebuild_split`) must find the weights after the swap.
    """
    from leakaudit.staging import Stage

    stage = Stage(output, output.with_name(stage_name))
    for run in runs:
        for name in (run.sent or {}).values():
            stage.rebase_store(run.folder / name)


@contextlib.contextmanager
def _nowhere(output: Path) -> Iterator[Path]:
    """What a rank other than 0 gets instead of :func:`staged_dir`: a path it never writes to."""
    yield output.with_name(f".{output.name}.not-written")


def _run_one(
    settings: HardenSettings,
    plugin: Plugin,
    config: Any,
    label: str,
    loaded,
    model: torch.nn.Module,
    layer: str,
    layer_shape: tuple[int, ...],
    data: PreparedData,
    device: torch.device,
    baseline_val,
    baseline_test: float,
    folder: Path,
    final_folder: Path,
    progress: Progress | None,
    on_epoch: Callable[[str, EpochStats], None] | None,
    group: Context | None = None,
) -> RunResult:
    started = time.perf_counter()
    is_main = group is None or group.is_main
    generator = seed_everything(settings.seed)
    context = RecipeContext(model, layer, data, device, settings.batch_size, baseline_val, layer_shape, group)
    objective: Objective = plugin.target(config, context)
    lr = settings.lr if settings.lr is not None else objective.default_lr
    description = f"{settings.method} {label}".strip()
    if settings.record_sent and not objective.trains_model:
        raise UsageError(f"--record-sent records a trained encoder; {settings.method} does not train the model.")
    # A recipe may fit the model on the client alone before training (NoPeek's burn-in).
    before_training = getattr(objective, "before_training", None)
    burn_in = before_training(model, data, device, settings.batch_size, settings.seed) if before_training else None
    sent: dict[str, str] = {}

    def epoch_done(stats: EpochStats) -> None:
        if stats.epoch in settings.record_sent:
            sent[f"epoch-{stats.epoch}"] = _record_sent(settings, loaded, model, layer, data, folder, f"epoch-{stats.epoch}")
        if on_epoch is not None:
            on_epoch(label, stats)

    outcome = fit(
        model,
        objective,
        data,
        device=device,
        epochs=settings.epochs,
        batch_size=settings.batch_size,
        lr=lr,
        patience=settings.patience,
        generator=generator,
        progress=progress,
        description=description,
        on_epoch=epoch_done,
        group=group,
    )
    record = model_record(
        loaded,
        weights_file="model.safetensors",
        layer=layer,
        input_size=data.prep.input_size,
        in_chans=data.prep.in_chans,
        normalize=settings.normalize,
        public={"name": data.public.name, "source": data.public.source, "class_names": data.public.class_names},
    )
    record["method"] = settings.method
    record["config"] = objective.describe()
    if outcome.diverged is not None:  # the same outcome on every rank
        kept = Path(settings.output).with_name(Path(settings.output).name + ".last-good")
        with distributed.agreed(group):
            if is_main:
                with staged_dir(kept, force=True) as stage:
                    save_weights(model, stage / "model.safetensors")
                    write_json(stage / "model.json", record)
                    write_json(stage / "harden.json", {
                        "status": "diverged", "run": label, "step": outcome.diverged.step,
                        "epoch": outcome.diverged.epoch, "best_epoch": outcome.best_epoch,
                        "history": [h.to_dict() for h in outcome.history],
                    })
        hint = "Lower --lr or the recipe's weight (--alpha, --lambda)."
        raise NonFiniteError(divergence_message(outcome.diverged, outcome.best_epoch, kept, hint))

    # Noise (Shredder) is drawn from torch's generator: seed it so the test accuracy is reproducible
    # (under torchrun each rank draws for its own rows: seed + rank).
    torch.manual_seed(settings.seed + (group.rank if group is not None else 0))
    test = evaluate(model, objective, data, data.rows(ROLE_TEST), batch_size=settings.batch_size, device=device, group=group)
    if settings.record_sent:
        sent["end"] = _record_sent(settings, loaded, model, layer, data, folder, "end")
    files = {"model.safetensors": "model.safetensors", "model.json": "model.json"}
    with distributed.agreed(group):
        if is_main:
            files.update(_write_run(settings, objective, model, layer, data, device, folder, record))
    return RunResult(
        label=label or settings.method,
        folder=final_folder,
        config=objective.describe(),
        history=outcome.history,
        best_epoch=outcome.best_epoch,
        stopped_early=outcome.stopped_early,
        public_accuracy=test.accuracy,
        public_accuracy_normalized=test.accuracy / baseline_test if baseline_test > 0 else math.nan,
        lr=lr,
        files=files,
        seconds=time.perf_counter() - started,
        burn_in=burn_in,
        sent=sent or None,
        onnx=record.get("onnx"),
    )


def _record_sent(settings: HardenSettings, loaded, model: torch.nn.Module, layer: str, data: PreparedData,
                 folder: Path, name: str) -> str:
    """Dump what the encoder would send now into ``folder/sent/NAME.h5``, as ``leakaudit dump`` writes stores.

    The model's current weights go to ``sent/NAME.safetensors`` (the store's provenance names
    them); torch's random state is put back, so recording does not change the training run.
    """
    from leakaudit.dump import DumpSettings, dump

    sent = folder / "sent"
    sent.mkdir(exist_ok=True)
    weights = sent / f"{name}.safetensors"
    save_weights(model, weights, metadata={"leakaudit": "harden --record-sent", "method": settings.method})
    spec = ModelSpec.from_options(settings.model.spec, loaded.options, weights=str(weights),
                                  trust_checkpoint=settings.model.trust_checkpoint)
    cpu_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        dump(DumpSettings(
            spec, layer, data=settings.data, output=sent / f"{name}.h5", tasks=tuple(settings.tasks),
            input_size=data.prep.input_size, normalize=settings.normalize, split=settings.split, seed=settings.seed,
            device=settings.device, limit=settings.limit, memory_format="contiguous",
            threads=torch.get_num_threads(), workers=1, force=True,
        ))
    finally:
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state_all(cuda_state)
    return f"sent/{name}.h5"


def _write_run(
    settings: HardenSettings,
    objective: Objective,
    model: torch.nn.Module,
    layer: str,
    data: PreparedData,
    device: torch.device,
    folder: Path,
    record: dict[str, Any],
) -> dict[str, str]:
    """Write one run's weights, exports and ``model.json`` into ``folder``; the files beyond the weights and record."""
    save_weights(model, folder / "model.safetensors", metadata={"leakaudit": "harden", "method": settings.method})
    files: dict[str, str] = {}
    extra = objective.state_dict()
    if extra and (objective.noise_at_split or not objective.trains_model):  # noise the weights lack
        save_weights(extra, folder / "noise.safetensors")
        files["noise.safetensors"] = "noise.safetensors"
    example = next(batches(data, data.rows(ROLE_TRAIN)[:8], 8, device, None)).model_input
    with z_capture(model, layer, objective.transform) as forward, torch.no_grad():
        torch.manual_seed(0)
        _, reference = forward(example)
    exported = export_split(model, layer, objective.wrap_encoder, example, folder, reference=reference, normalize=settings.normalize)
    model.to(device)
    files.update({name: name for name in exported["files"]})
    record["files"] = exported["files"]
    record["layer_shape"] = exported["layer_shape"]
    record["onnx"] = exported["onnx"]
    write_json(folder / "model.json", record)
    return files


def _layer_shape(model: torch.nn.Module, layer: str, data: PreparedData, device: torch.device) -> list[int]:
    batch = next(batches(data, data.rows(ROLE_TRAIN)[:2], 2, device, None))
    with z_capture(model, layer, lambda z: z) as forward, torch.no_grad():
        model.eval()
        _, z = forward(batch.model_input)
    assert z is not None
    return list(z.shape[1:])


def _private_task(settings: HardenSettings, data: PreparedData) -> str:
    from leakaudit.errors import UnknownNameError

    others = [name for name in data.tasks if name != "public"]
    if settings.private is not None:
        if settings.private not in others:
            raise UnknownNameError(
                "private task", settings.private, others, hint="Give it with --task NAME=SOURCE (e.g. --task private=label)."
            )
        return settings.private
    if not others:
        raise ConfigError(
            "the privacy evaluation needs a private task to attack: add --task private=SOURCE (e.g. label), "
            "or pass --no-evaluate."
        )
    return "private" if "private" in others else others[0]


def _settings_dict(settings: HardenSettings, loaded, data: PreparedData, layer: str) -> dict[str, Any]:
    return {
        "model": settings.model.spec,
        "weights": settings.model.weights,
        "checkpoint_sha256": loaded.checkpoint_sha256,
        "model_options": dict(loaded.options),
        "layer": layer,
        "data": settings.data,
        "tasks": [list(t) for t in settings.tasks],
        "rows": len(data.roles),
        "source_rows": data.source_rows,
        "split": list(settings.split),
        "stratified_by": data.stratified_by,
        "seed": settings.seed,
        "input_size": list(data.prep.input_size),
        "normalize": settings.normalize,
        "method": settings.method,
        "options": dict(settings.options),
        "sweep": [settings.sweep[0], list(settings.sweep[1])] if settings.sweep else None,
        "batch_size": settings.batch_size,
        "epochs": settings.epochs,
        "lr": settings.lr,
        "patience": settings.patience,
        "limit": settings.limit,
        "record_sent": list(settings.record_sent),
    }
