"""Several split layers from one forward pass: one store per layer, each what ``dump --layer L`` writes.

A split-point scan needs every candidate layer's activations for the same rows. Running
one dump per layer repeats the forward pass up to each layer; here one pass, cut after the
deepest candidate, yields them all (:func:`truncate_many`), and the writer thread writes
each layer's rows into its own :class:`~leakaudit.store.StoreWriter`. Every store has the
attributes, fingerprint and datasets a single-layer dump of that layer with the same
settings writes, so readers, verifiers, attacks and the dump cache treat it as one.

How the pass is cut:

* ``fx``: where every layer's single-layer dump would use FX truncation, one feature
  extractor returns all of them; it is checked on a real batch to give each layer's output
  bit for bit as one hooked pass over all the layers does, else as each layer's own
  extractor does (else the hook path below is used).
* ``hook``: where the model does not trace (or a layer is ``output``), one
  :class:`~leakaudit.layers.LayerCapture` per layer records its first output, and the
  capture of the layer that finishes last stops the forward there (the whole model runs
  only when ``output`` is among the layers). A graph node cannot be hooked: a model that
  needs this path cannot be scanned at one.

TorchScript archives (cut as chains of ``Sequential`` children) and ``--with-outputs``,
``--resume`` and ``torchrun`` are single-layer features: they are refused here with the
way out.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from leakaudit.dump.pipeline import _Pipeline
from leakaudit.dump.plan import _apply_tuning, _check_paths, _open_writer, _plan
from leakaudit.dump.settings import DumpReport, DumpSettings
from leakaudit.errors import LeakAuditError, OutputExistsError, UsageError
from leakaudit.layers import OUTPUT, LayerCapture, Truncation, _as_tensor, _truncate_checked, eval_mode, resolve_layer, same_draws
from leakaudit.runtime import resolve_device
from leakaudit.store import StoreWriter, check_no_dump_running, partial_path


@dataclass
class MultiTruncation:
    """An encoder returning every layer's output (in the order of ``layers``) from one pass.

    Attributes:
        encoder: ``x`` → a list of tensors, one per layer.
        method: ``fx`` or ``hook`` (see the module docstring).
        layers: the layers, as resolved.
        methods: what each layer's store records as its truncation.
    """

    encoder: Callable[[torch.Tensor], list[torch.Tensor]]
    method: str
    layers: tuple[str, ...]
    methods: tuple[str, ...]
    #: The encoder's outputs on the example it was checked on (None where it was not run).
    example_outputs: list[torch.Tensor] | None = None


def execution_order(module: nn.Module, layers: Sequence[str], example: torch.Tensor) -> list[str]:
    """``layers`` in the order their first calls finish on ``example`` (``output`` last).

    The depth of a split point is where the forward pass reaches it, not where its name sorts;
    graph nodes, which no hook can see, keep their given order after the modules.
    """
    modules = dict(module.named_modules())
    finished: list[str] = []
    handles = []
    for name in layers:
        target = modules.get(name) if name != OUTPUT else None
        if target is None:
            continue

        def hook(_m, _i, _o, name: str = name) -> None:
            if name not in finished:
                finished.append(name)

        handles.append(target.register_forward_hook(hook))
    try:
        with torch.inference_mode(), eval_mode(module):
            module(example)
    finally:
        for handle in handles:
            handle.remove()
    rest = [name for name in layers if name not in finished and name != OUTPUT]
    return finished + rest + ([OUTPUT] if OUTPUT in layers else [])


def truncate_many(module: nn.Module, layers: Sequence[str], example: torch.Tensor) -> MultiTruncation:
    """One encoder computing the outputs of all ``layers`` (see the module docstring).

    Raises:
        UnknownNameError: a layer is not in the model (the message lists the closest names).
        UsageError: the layers are repeated, or cannot be reached from one pass (a TorchScript
            archive; a graph node of a model that needs hooks).
    """
    if isinstance(module, torch.jit.ScriptModule):
        raise UsageError(
            "a TorchScript archive runs no Python hooks, so several layers cannot be captured from one pass; "
            "dump each layer with `leakaudit dump --layer`, or give the Python model spec (file.py:Factory + --weights)."
        )
    resolved = tuple(resolve_layer(module, name) for name in layers)
    if len(set(resolved)) != len(resolved):
        repeated = sorted({n for n in resolved if resolved.count(n) > 1})
        raise UsageError(f"layer {repeated[0]!r} is given twice; name each layer once.")
    modules = dict(module.named_modules())
    hooked = None
    if OUTPUT not in resolved and all(n in modules for n in resolved):
        # One trace checked against one hooked pass, instead of a trace and two passes per
        # layer; any difference falls back to checking each layer as its own dump would.
        hooked = _hook_many(module, resolved, example)
        with torch.inference_mode():
            expected = same_draws(hooked, example)
        multi = _fx_many(module, resolved, [(None, z) for z in expected], example)
        if multi is not None:
            return multi
    checked = [_truncate_checked(module, name, example) for name in resolved]
    if all(t.method == "fx" for t, _ in checked):
        multi = _fx_many(module, resolved, checked, example)
        if multi is not None:
            return multi
    unhookable = [n for n in resolved if n != OUTPUT and n not in modules]
    if unhookable:
        raise UsageError(
            f"layer {unhookable[0]!r} is a graph node, reachable only by FX truncation, and the other layers "
            "cannot share one traced pass with it. Choose a module instead (see `leakaudit layers MODEL`)."
        )
    methods = tuple("full" if n == OUTPUT else "hook" for n in resolved)
    return MultiTruncation(hooked or _hook_many(module, resolved, example), "hook", resolved, methods)


def _fx_many(
    module: nn.Module, layers: tuple[str, ...], checked: Sequence[tuple[Truncation | None, torch.Tensor | None]],
    example: torch.Tensor,
) -> MultiTruncation | None:  # fmt: skip
    """One feature extractor for every layer, or None where it does not give each layer's bits.

    Each layer's expected output on ``example`` is the one its truncation check computed, or
    the one-pass hook capture's (run here only for a graph node, which neither computes).
    """
    from timm.models import create_feature_extractor

    with warnings.catch_warnings(), eval_mode(module):
        warnings.simplefilter("ignore")
        try:
            graph_module = create_feature_extractor(module, return_nodes={name: f"z{i}" for i, name in enumerate(layers)})
        except Exception:
            return None
        graph_module.eval()  # through train(): it selects the eval graph (as in layers._fx_extractor)

    def encoder(x: torch.Tensor) -> list[torch.Tensor]:
        with eval_mode(module, graph_module):
            out = graph_module(x)
        return [_as_tensor(out[f"z{i}"], name) for i, name in enumerate(layers)]

    with torch.inference_mode():
        got = same_draws(encoder, example)
        expected = [z if z is not None else same_draws(cast(Truncation, t).encoder, example) for t, z in checked]
    if not all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(got, expected)):
        return None
    return MultiTruncation(encoder, "fx", layers, tuple("fx" for _ in layers), example_outputs=got)


def _hook_many(module: nn.Module, layers: tuple[str, ...], example: torch.Tensor) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    """A pass recording each layer's first output through its own capture; the last to finish stops it."""
    order = execution_order(module, layers, example)
    last = order[-1]
    recorded = [n for n in layers if n != OUTPUT and n != last]

    def encoder(x: torch.Tensor) -> list[torch.Tensor]:
        with contextlib.ExitStack() as stack, eval_mode(module):
            captures = {n: stack.enter_context(LayerCapture(module, n)) for n in recorded}
            if last == OUTPUT:
                final = module(x)
            else:
                stopper = stack.enter_context(LayerCapture(module, last, stop=True))
                _, final = stopper.run(x)
            outputs = {n: c.output for n, c in captures.items()}
            outputs[last] = final
        missing = [n for n in layers if outputs.get(n) is None]
        if missing:
            raise UsageError(
                f"layer {missing[0]!r} was not called before layer {last!r} finished, so it produced no output. "
                "Choose layers that `leakaudit layers MODEL` shows with an output shape."
            )
        return [_as_tensor(outputs[n], n) for n in layers]

    return encoder


def dump_many(
    settings: DumpSettings,
    layers: Sequence[str],
    outputs: Sequence[Path],
    on_progress: Callable[[int, int], None] | None = None,
) -> list[DumpReport]:
    """Write one store per layer (``outputs[i]`` for ``layers[i]``) from one pass over the data.

    ``settings`` is what a single-layer dump would be given (its ``layer`` and ``output`` are
    ignored); store ``outputs[i]`` holds what ``dump(replace(settings, layer=layers[i],
    output=outputs[i]))`` writes. Each store is written as a dump writes it: a ``.partial``
    file under its own lock, renamed when complete; no store is replaced without ``force``,
    and a failure leaves none of them behind.
    """
    from leakaudit import distributed

    if len(layers) != len(outputs) or not layers:
        raise UsageError("give one output store for each layer.")
    if settings.resume:
        raise UsageError("a multi-layer dump cannot be resumed; run it again with --force.")
    if settings.with_outputs:
        raise UsageError("--with-outputs is a single-layer option; dump the layer that needs logits on its own.")
    if distributed.current(resolve_device(settings.device)) is not None:
        raise UsageError("a multi-layer dump runs in one process; run it without torchrun.")
    outputs = [Path(p) for p in outputs]
    if len({p.resolve() for p in outputs}) != len(outputs):
        raise UsageError("two layers would be written to the same store; give each its own path.")
    for path in outputs:
        _check_paths(settings, path)
        check_no_dump_running(path)
        if partial_path(path).exists() and not settings.force:
            raise OutputExistsError(
                f"an interrupted dump left {str(partial_path(path))!r}. Start over with --force."
            )
    # Cut below, all layers at once: the plan's own cut of one layer would repeat that work.
    plan = _plan(dataclasses.replace(settings, layer=layers[0], output=outputs[0]), cut=False)
    writers: list[StoreWriter] = []
    try:
        try:
            multi = truncate_many(plan.loaded.module, layers, plan.example)
            z_example = multi.example_outputs
            if z_example is None:
                with torch.inference_mode():
                    z_example = multi.encoder(plan.example)
        except LeakAuditError:
            raise
        except Exception as exc:
            from leakaudit.dump.plan import _CHANNELS_HINT
            from leakaudit.layers import forward_failure

            raise forward_failure(exc, tuple(plan.example.shape[1:]), size_option="--input-size", channels_hint=_CHANNELS_HINT) from None
        not_batched = [n for n, z in zip(multi.layers, z_example) if z.dim() == 0 or z.shape[0] != plan.example.shape[0]]
        if not_batched:
            raise UsageError(f"layer {not_batched[0]!r}'s first dimension is not the batch, so it cannot be dumped.")
        shapes = [tuple(z.shape[1:]) for z in z_example]
        plan.truncation = Truncation(multi.encoder, multi.method)  # type: ignore[arg-type]  # several outputs
        plan.layers = multi.layers
        tuning = _apply_tuning(plan, settings, {})
        for name, method, shape, path in zip(multi.layers, multi.methods, shapes, outputs):
            layer_settings = dataclasses.replace(settings, layer=name, output=path)
            layer_plan = dataclasses.replace(plan, layer=name, layer_shape=shape)
            writers.append(
                _open_writer(
                    layer_settings, layer_plan, path, 0, plan.n, resume=False, tuning=tuning,
                    fingerprint={**plan.fingerprint, "layer": name},
                    attrs={**plan.attrs, "layer": name, "truncation": method},
                )  # fmt: skip
            )
        writer = _Writers(writers)
        first = _Pipeline(settings, plan, writer, lo=0, hi=plan.n, tuning=tuning, on_progress=on_progress).run()  # type: ignore[arg-type]
    except BaseException:
        for w in writers:
            if getattr(w, "file", None) is not None and (w.file.id.valid or w.partial.exists()):
                w.abort()
        raise
    finally:
        plan.guard.restore()
    return [
        dataclasses.replace(first, path=path, layer_shape=shape, truncation=method)
        for path, shape, method in zip(outputs, shapes, multi.methods)
    ]


class _Writers:
    """The K stores of a multi-layer dump behind the one writer the pipeline talks to.

    The pipeline gives it a list of activations per batch, one per layer; each store gets
    the same inputs and its own layer's rows. Progress is checkpointed in every store alike.
    """

    def __init__(self, writers: Sequence[StoreWriter]) -> None:
        self.writers = list(writers)
        self.rows_done = 0

    def write(self, start: int, inputs: np.ndarray, activations: list[np.ndarray], outputs: Any = None) -> None:
        for writer, z in zip(self.writers, activations):
            writer.write(start, inputs, z)

    def checkpoint(self, rows_done: int) -> None:
        for writer in self.writers:
            writer.checkpoint(rows_done)
        self.rows_done = rows_done

    def finish(self, extra_attrs: dict[str, Any] | None = None) -> Path:
        for writer in self.writers:
            writer.finish(extra_attrs)
        return self.writers[0].path

    def close(self) -> None:
        self.abort()  # nothing to resume: a multi-layer dump starts over

    def abort(self) -> None:
        errors = []
        for writer in self.writers:
            try:
                if writer.file.id.valid or writer.partial.exists():
                    writer.abort()
            except BaseException as exc:  # abort the others first
                errors.append(exc)
        if errors:
            raise errors[0]
