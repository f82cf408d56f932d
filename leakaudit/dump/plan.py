"""Settings → plan: the model, its split layer and truncation, the data, tasks and split, and the tuning.

Everything here is decided before the first row is written, from one batch run through the
model; a failure leaves a model passed in by the caller as it was.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from leakaudit.data import open_source, preprocess_for, resolve_task, split_roles
from leakaudit.dump.settings import DumpSettings
from leakaudit.dump.tuning import Tuning, _format, draws_random, forward_shapes, tune_forward
from leakaudit.errors import ConfigError, LeakAuditError, OutputExistsError, UsageError
from leakaudit.layers import OUTPUT, eval_mode, exported_split, forward_failure, resolve_layer, truncate
from leakaudit.runtime import resolve_device
from leakaudit.store import StoreWriter


class _ModelGuard:
    """Puts a model in eval mode for a dump and, on :meth:`restore`, back as it was.

    The dump moves the model to its device and memory format and runs it in eval mode; a
    model passed in by the caller (a factory may return one it keeps) must come back with
    every submodule's mode, and every parameter's and buffer's device and memory format, as
    they were. Values are never written: eval mode updates no statistics.
    """

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self._modes = eval_mode(module)
        self._modes.__enter__()
        self._layout = {name: (t.device, _layout(t)) for name, t in _tensors(module)}

    def restore(self) -> None:
        for name, tensor in _tensors(self.module):
            if name not in self._layout:
                continue
            device, layout = self._layout[name]
            if tensor.device == device and _layout(tensor) == layout:
                continue
            moved = tensor.data.to(device)
            if layout in ("contiguous", "channels_last"):
                moved = moved.contiguous(memory_format=_format(layout))
            tensor.data = moved
        self._modes.__exit__(None, None, None)


def _tensors(module: torch.nn.Module):
    yield from module.named_parameters(remove_duplicate=False)
    yield from module.named_buffers(remove_duplicate=False)


def _layout(tensor: torch.Tensor) -> str:
    if tensor.is_contiguous():
        return "contiguous"
    if tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    return "strided"


@dataclass
class _Plan:
    """Everything decided before the first row is written."""

    guard: _ModelGuard
    loaded: Any
    layer: str
    source: Any
    tasks: list
    prep: Any
    n: int
    roles: np.ndarray
    stratified_by: str
    batch_size: int
    device: torch.device
    truncation: Any
    example: torch.Tensor
    layer_shape: tuple[int, ...]
    output_shape: tuple[int, ...] | None
    fingerprint: dict[str, Any]
    attrs: dict[str, Any]
    #: A multi-layer dump's layers, in the order of the encoder's outputs (empty for one layer).
    layers: tuple[str, ...] = ()


def _check_paths(settings: DumpSettings, output: Path) -> None:
    if output.exists() and not settings.force and not settings.resume:
        raise OutputExistsError(f"{str(output)!r} exists. Pass --force to overwrite it.")
    if output.is_dir():
        raise UsageError(f"{str(output)!r} is a directory; give a file name such as acts.h5.")


def _split_layer(settings: DumpSettings) -> tuple[str, str | None]:
    """The layer to dump, and the split an exported client encoder was cut at (if it is one)."""
    split = exported_split(settings.model.spec)
    if settings.layer is None:
        if split is None:
            raise UsageError(
                "--layer is missing: name the split layer (see `leakaudit layers MODEL`), or 'output' for the whole model."
            )
        return OUTPUT, split
    # The encoder's output is its split layer's: the name it was cut at means that output.
    return (OUTPUT if split is not None and settings.layer == split else settings.layer), split


def _plan(settings: DumpSettings, *, cut: bool = True) -> _Plan:
    """Load the model and data and run one batch; on failure, the model is left as it was.

    With ``cut=False`` the layer is resolved but not cut (``truncation`` None, ``layer_shape``
    empty): a multi-layer dump cuts all its layers at once and fills those in.
    """
    device = resolve_device(settings.device)
    # Seed before building the model: a randomly initialised model must be the same on resume.
    torch.manual_seed(settings.seed)
    loaded = settings.model.load()
    requested, split = _split_layer(settings)
    guard = _ModelGuard(loaded.module)
    try:
        return _plan_loaded(settings, loaded, guard, requested, split, device, cut)
    except BaseException:
        guard.restore()
        raise


def _plan_loaded(
    settings: DumpSettings, loaded: Any, guard: _ModelGuard, requested: str, split: str | None, device: torch.device,
    cut: bool = True,
) -> _Plan:
    module = loaded.module
    layer = resolve_layer(module, requested)
    source = open_source(settings.data)
    n = len(source) if settings.limit is None else min(settings.limit, len(source))
    if len(set(name for name, _ in settings.tasks)) != len(settings.tasks):
        raise ConfigError("task names given with --task must be unique.")
    tasks = [resolve_task(name, src, source) for name, src in settings.tasks]
    normalize = _normalize(settings, loaded)
    prep = preprocess_for(
        source,
        model_input_size=loaded.input_size,
        model_in_chans=loaded.in_chans,
        input_size=settings.input_size,
        normalize=normalize,
    )
    roles, stratified_by = split_roles(source, n, settings.split, settings.seed, tasks)
    batch_size = settings.batch_size
    if loaded.fixed_batch is not None and loaded.fixed_batch != batch_size:
        batch_size = loaded.fixed_batch  # the exported program only runs at its traced batch size

    module.to(device)
    example = prep.model_input(prep.images(source.read(0, min(n, batch_size)))).to(device)
    example = _pad(example, loaded.fixed_batch)
    truncation, layer_shape, output_shape = (_cut(settings, module, layer, example) if cut else (None, (), None))
    fingerprint = {
        "model": settings.model.spec,
        "checkpoint_sha256": loaded.checkpoint_sha256,
        "model_options": loaded.options,
        "layer": layer,
        "data": settings.data,
        "rows": n,
        "tasks": [list(t) for t in settings.tasks],
        "input_size": list(prep.input_size),
        "in_chans": prep.in_chans,
        "normalize": normalize,
        "split": list(settings.split),
        "seed": settings.seed,
        "dtype": settings.dtype,
        "batch_size": batch_size,
        "with_outputs": settings.with_outputs,
        "compression": settings.compression,
        "store_inputs": settings.store_inputs,
    }
    attrs = {
        "model_spec": settings.model.spec,
        "model_kind": loaded.kind,
        "model_options": loaded.options,
        "weights": str(settings.model.weights or ""),
        "checkpoint_sha256": loaded.checkpoint_sha256 or "",
        "layer": layer,
        "truncation": truncation.method if truncation is not None else "",
        "data_spec": settings.data,
        "source_rows": len(source),
        "input_shape": [prep.in_chans, *prep.input_size],
        "input_size": list(prep.input_size),
        "normalize": normalize or "",
        "seed": settings.seed,
        "split_fractions": list(settings.split),
        "stratified_by": stratified_by,
        "dtype": settings.dtype,
        "batch_size": batch_size,
        "device": str(device),
        "eval_mode": True,
    }
    if split is not None:
        attrs["encoder_split_layer"] = split
    return _Plan(
        guard=guard,
        loaded=loaded,
        layer=layer,
        source=source,
        tasks=tasks,
        prep=prep,
        n=n,
        roles=roles,
        stratified_by=stratified_by,
        batch_size=batch_size,
        device=device,
        truncation=truncation,
        example=example,
        layer_shape=layer_shape,
        output_shape=output_shape,
        fingerprint=fingerprint,
        attrs=attrs,
    )


def _normalize(settings: DumpSettings, loaded: Any) -> str | None:
    """``--normalize``, or the one the model's file records it was trained with (an ONNX encoder's)."""
    recorded = getattr(loaded, "normalize", None)
    if recorded is None or settings.normalize is None:
        return settings.normalize if settings.normalize is not None else recorded
    if settings.normalize != recorded:
        raise ConfigError(
            f"--normalize {settings.normalize} differs from the {recorded} that {settings.model.spec!r} records it was "
            "trained with; leave --normalize out to use the recorded one."
        )
    return recorded


def _cut(settings: DumpSettings, module: Any, layer: str, example: torch.Tensor) -> tuple[Any, tuple[int, ...], tuple[int, ...] | None]:
    """The layer's truncation, its output shape, and the model's output shape (``--with-outputs``) on ``example``."""
    try:
        truncation = truncate(module, layer, example)
        with torch.inference_mode():
            z_example = truncation.encoder(example)
            output_shape = tuple(module(example).shape[1:]) if settings.with_outputs else None
    except LeakAuditError:
        raise
    except Exception as exc:
        raise forward_failure(exc, tuple(example.shape[1:]), size_option="--input-size", channels_hint=_CHANNELS_HINT) from None
    if z_example.shape[0] != example.shape[0]:
        raise UsageError(
            f"layer {layer!r} output has {z_example.shape[0]} rows for a batch of {example.shape[0]}; "
            "its first dimension is not the batch, so it cannot be dumped."
        )
    return truncation, tuple(z_example.shape[1:]), output_shape


_CHANNELS_HINT = (
    "Inputs are converted to the channels a model declares: declare them on the model (input_size = "
    "({expected}, H, W)), build it for {got}-channel input with --in-chans {got} where its factory takes in_chans, "
    "or use {expected}-channel data."
)


def _open_writer(
    settings: DumpSettings, plan: _Plan, path: Path, lo: int, hi: int, *, resume: bool, tuning: Tuning,
    fingerprint: dict[str, Any], attrs: dict[str, Any],
) -> StoreWriter:  # fmt: skip
    return StoreWriter(
        path,
        n=hi - lo,
        input_shape=(plan.prep.in_chans, *plan.prep.input_size),
        layer_shape=plan.layer_shape,
        dtype=settings.dtype,
        labels={t.name: (t.labels[lo:hi], t.class_names, t.source) for t in plan.tasks},
        index=np.arange(lo, hi),
        split=plan.roles[lo:hi],
        attrs={**attrs, **tuning.state()},
        fingerprint=fingerprint,
        output_shape=plan.output_shape,
        compression=settings.compression,
        store_inputs=settings.store_inputs,
        resume=resume,
        state=tuning.state(),
        replace=settings.force or settings.resume or path != Path(settings.output),  # shards: as before
    )


def _apply_tuning(plan: _Plan, settings: DumpSettings, state: dict[str, Any]) -> Tuning:
    """The tuning of an interrupted dump (same kernels, same bits on resume), else a new trial."""
    if "memory_format" in state:
        random = state.get("random_forward")
        tuning = Tuning(str(state["memory_format"]), int(state.get("threads") or torch.get_num_threads()),
                        int(state.get("workers") or 1), str(state.get("tuning_chosen_by") or "resume"),
                        bool(random) if random is not None else draws_random(plan.truncation.encoder, plan.example))  # fmt: skip
        plan.loaded.module.to(memory_format=_format(tuning.memory_format))
        return tuning
    random = draws_random(plan.truncation.encoder, plan.example)
    serial = _serial_reason(plan, settings, random)
    if settings.workers is not None and settings.workers > 1 and serial is not None:
        raise ConfigError(f"--workers {settings.workers}: this forward pass cannot run in several threads at once ({serial}).")
    if plan.n <= 4 * plan.batch_size and settings.memory_format == "auto":
        # A trial would cost about as much as the dump itself: the preferred shape, whose
        # numbers are the same as any other candidate's.
        fmt, shapes = forward_shapes(plan.loaded.module, plan.example, settings.memory_format, settings.threads,
                                     settings.workers, serial is None)  # fmt: skip
        plan.loaded.module.to(memory_format=_format(fmt))
        chosen_by = "rule" if settings.threads is None and settings.workers is None else "options"
        return Tuning(fmt, *shapes[0], chosen_by=chosen_by, random_forward=random)
    prepare = None
    if _preprocess_in_forward(plan):  # each pass also makes its input, as in the dump
        prep, fixed_batch, block = plan.prep, plan.loaded.fixed_batch, plan.source.read(0, min(plan.n, plan.batch_size))

        def prepare() -> torch.Tensor:
            return _pad(prep.model_input(prep.images(block)), fixed_batch)

    tuning = tune_forward(
        plan.loaded.module, plan.truncation.encoder, plan.example, settings.memory_format, settings.threads,
        settings.workers, parallel=serial is None, prepare=prepare,
    )  # fmt: skip
    return dataclasses.replace(tuning, random_forward=random)


def _preprocess_in_forward(plan: _Plan) -> bool:
    """Whether the forward's threads preprocess their own batches (on a CPU) or the reader does.

    On a CPU every core already runs the forward, so a reader thread that resizes images
    takes its time from the forward, and more than its CPU time when the forward runs in
    parallel regions (a region waits for the thread it preempted). In the forward's threads
    the same work is shared as the forward is (benchmarks/RESULTS.md has the measurements).
    A GPU's forward leaves the CPU free, so there the reader preprocesses (and pins) while
    the GPU computes.
    """
    return plan.device.type == "cpu"


def _serial_reason(plan: _Plan, settings: DumpSettings, random: bool) -> str | None:
    """Why the forward passes must run one at a time, or None where they may overlap."""
    if random:
        # One default generator serves every thread: passes side by side would take each
        # other's draws in the order the scheduler ran them.
        return "it draws random numbers (a noise layer), and passes side by side would share one generator"
    if plan.device.type != "cpu":
        return f"on {plan.device.type} one pass fills the device"
    if plan.truncation.method == "hook":
        return "the model is cut by a forward hook, which passes in other threads would trip"
    if _captures_outputs(settings, plan):
        return "--with-outputs records the split layer with a forward hook"
    return None


def _captures_outputs(settings: DumpSettings, plan: _Plan) -> bool:
    module = plan.loaded.module
    return settings.with_outputs and plan.layer != OUTPUT and not isinstance(module, torch.jit.ScriptModule)



def _pad(x: torch.Tensor, fixed_batch: int | None) -> torch.Tensor:
    """Pad a batch to an exported program's static batch size (extra rows are dropped later)."""
    if fixed_batch is None or x.shape[0] == fixed_batch:
        return x
    if x.shape[0] > fixed_batch:
        raise UsageError(f"the exported program runs batches of {fixed_batch}; got {x.shape[0]} rows.")
    pad = x[-1:].expand(fixed_batch - x.shape[0], *x.shape[1:])
    return torch.cat([x, pad])
