"""Layer names, output shapes, and running a model only up to its split layer.

A layer is addressed by its dotted ``named_modules()`` name (``features.3``,
``layer2.0.conv1``, names inside a ``ModuleDict``), by an FX graph node name where the
model traces (``layer1.0.add``), or as ``output`` for the whole model. A module whose
output is a tuple (many transformer blocks return one) is addressed by one element,
``NAME[i]``: element ``i`` of its output, recorded by a hook.

:func:`truncate` returns an encoder that computes the layer's output and nothing after
it: an FX graph cut at the layer where the model traces (checked once against a hook
capture on a real batch), otherwise a forward hook that stops the forward pass as soon
as the layer has produced its output — so models with data-dependent control flow work.

Everything here runs the model in eval mode — BatchNorm on its running statistics, Dropout
off — whatever mode it was given in, and leaves every submodule's mode as it found it
(:func:`eval_mode`): what is measured must be what the deployed model computes, and the
caller's model must come back untouched.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from leakaudit.errors import LeakAuditError, UnknownNameError, UsageError

OUTPUT = "output"


@dataclass(frozen=True)
class LayerInfo:
    """One addressable layer: name, module type, output shape (without batch) and parameter count."""

    name: str
    type: str
    output_shape: tuple[int, ...] | None
    params: int
    calls: int = 1


class _StopForward(Exception):
    """Raised by a stopping :class:`LayerCapture` to end the forward pass at the split layer."""

    def __init__(self, output: object) -> None:
        super().__init__()
        self.output = output


@contextlib.contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Run the block with every submodule of ``modules`` in eval mode, then restore each one's mode.

    ``Module.eval()`` is not enough on either side: it cannot be undone by ``train(was_training)``
    when submodules had modes of their own (a frozen BatchNorm inside a training model), and
    tracers such as torch.fx's feature extraction switch a model to training mode and leave it
    there when tracing fails. The flags are set directly rather than through ``train()``, which
    exported programs refuse and user modules may override. Every flag is put back, also those
    that code inside the block changed; a flag is written only where it differs, so a block on
    a model already in eval mode writes nothing and may run in several threads at once.
    """
    saved = [(m, m.training) for module in modules for m in module.modules()]
    for m, training in saved:
        if training:
            m.training = False
    try:
        yield
    finally:
        for m, training in saved:
            if m.training != training:
                m.training = training


_ELEMENT = re.compile(r"^(?P<name>.+)\[(?P<index>\d+)\]$")


def split_element(layer: str) -> tuple[str, int | None]:
    """``NAME[i]`` → (``NAME``, i), element i of module NAME's output; any other name → (name, None)."""
    match = _ELEMENT.match(layer)
    return (match["name"], int(match["index"])) if match else (layer, None)


def _elements(out: object) -> tuple[object, ...] | None:
    """The elements of a tuple-like output (a tuple, a list, a transformers ModelOutput), else None."""
    if isinstance(out, (tuple, list)):
        return tuple(out)
    to_tuple = getattr(out, "to_tuple", None)
    return tuple(to_tuple()) if callable(to_tuple) else None


def select_element(out: object, index: int, layer: str) -> object:
    """Element ``index`` of a module's tuple-like output, for layer ``NAME[index]``."""
    elements = _elements(out)
    if elements is None:
        raise UsageError(f"layer {layer!r}: the module outputs a {type(out).__name__}, which has no elements; drop the [{index}].")
    if index >= len(elements):
        raise UsageError(f"layer {layer!r}: the module outputs {len(elements)} elements (0–{len(elements) - 1}).")
    if elements[index] is None:
        raise UsageError(f"layer {layer!r} is None in this forward pass; choose an element that is a tensor.")
    return elements[index]


def _replace_element(out: object, index: int, value: object, layer: str) -> object:
    if isinstance(out, tuple):
        return (*out[:index], value, *out[index + 1 :])
    if isinstance(out, list):
        return [*out[:index], value, *out[index + 1 :]]
    raise UsageError(f"layer {layer!r}: an element of a {type(out).__name__} cannot be replaced; choose a tensor layer.")


def module_names(module: nn.Module) -> list[str]:
    return [name for name, _ in module.named_modules() if name]


def _is_script(module: nn.Module) -> bool:
    return isinstance(module, torch.jit.ScriptModule)


def list_layers(module: nn.Module, example: torch.Tensor, *, channels_hint: str = "") -> list[LayerInfo]:
    """Run ``example`` once through ``module`` and record every submodule's output shape.

    Shapes of submodules inside TorchScript archives cannot be observed (TorchScript runs
    no Python hooks); they are reported as ``None``. ``channels_hint`` is how the caller's
    interface changes the input channels (see :func:`forward_failure`).

    Raises:
        UsageError: the model fails on ``example`` (the message says why: channels, a too
            small input, …, and that ``--input-shape`` sets it).
    """
    shapes: dict[str, tuple[int, ...] | None] = {}
    element_shapes: dict[str, list[tuple[int, ...] | None]] = {}
    calls: dict[str, int] = {}
    handles = []
    named = list(module.named_modules())
    try:
        if not _is_script(module):
            for name, sub in named:
                if not name:
                    continue

                def hook(_m, _i, out, name: str = name) -> None:
                    calls[name] = calls.get(name, 0) + 1
                    if name not in shapes:  # the first call defines the split point, as in dumps
                        shapes[name] = tuple(out.shape[1:]) if isinstance(out, torch.Tensor) else None
                        elements = _elements(out) if shapes[name] is None else None
                        if elements is not None:
                            element_shapes[name] = [tuple(e.shape[1:]) if isinstance(e, torch.Tensor) else None for e in elements]

                handles.append(sub.register_forward_hook(hook))
        with torch.inference_mode(), eval_mode(module):
            out = module(example)
    except LeakAuditError:
        raise
    except Exception as exc:
        raise forward_failure(
            exc, tuple(example.shape[1:]), size_option="--input-shape C,H,W", channels_hint=channels_hint
        ) from None
    finally:
        for handle in handles:
            handle.remove()
    layers = []
    for name, sub in named:
        if not name:
            continue
        info = LayerInfo(
            name,
            type(sub).__name__ if not _is_script(sub) else getattr(sub, "original_name", "ScriptModule"),
            shapes.get(name),
            sum(p.numel() for p in sub.parameters()),
            calls.get(name, 0),
        )
        layers.append(info)
        # The tensor elements of a tuple output are split points too (NAME[i]).
        layers.extend(
            LayerInfo(f"{name}[{i}]", info.type, shape, info.params, info.calls)
            for i, shape in enumerate(element_shapes.get(name, ()))
            if shape is not None
        )
    out_shape = tuple(out.shape[1:]) if isinstance(out, torch.Tensor) else None
    layers.append(LayerInfo(OUTPUT, type(module).__name__, out_shape, sum(p.numel() for p in module.parameters())))
    return layers


def graph_node_names(module: nn.Module) -> list[str]:
    """FX node names of ``module`` in eval mode, or ``[]`` where it does not trace."""
    if _is_script(module):
        return []
    try:
        from torchvision.models.feature_extraction import get_graph_node_names

        # It traces in training mode too, and leaves that mode behind when tracing fails.
        with warnings.catch_warnings(), eval_mode(module):
            warnings.simplefilter("ignore")
            _, names = get_graph_node_names(module)
        return list(names[1:])  # the first node is the input placeholder
    except Exception:
        return []


def resolve_layer(module: nn.Module, layer: str) -> str:
    """Check that ``layer`` names a module or graph node; unknown names list the closest.

    Raises:
        UsageError: ``layer`` is empty (which ``named_modules()`` would resolve to the whole
            model, silently), or names nothing in the model.
    """
    if not layer.strip():
        raise UsageError(
            f"the layer name is empty ({layer!r}). Give a layer from `leakaudit layers MODEL`, or 'output' for the whole model."
        )
    modules = dict(module.named_modules())
    if layer == OUTPUT or layer in modules:
        return layer
    base, index = split_element(layer)
    if index is not None and base in modules and base:
        return layer
    nodes = graph_node_names(module)
    if layer in nodes:
        return layer
    raise UnknownNameError(
        "layer",
        layer,
        module_names(module) + nodes + [OUTPUT],
        hint="List them all with `leakaudit layers MODEL`.",
    )


#: The record ``harden`` stores inside the programs it exports (``torch.export`` extra files).
PROGRAM_RECORD = "leakaudit.json"
PROGRAM_SCHEMA = "leakaudit.program"


def exported_split(spec: str) -> str | None:
    """The split layer a client encoder exported by ``harden`` was cut at, or None for other models.

    The name comes from the record inside the archive, or for encoders exported before it
    was written, from the ``model.json`` of the output folder ``encoder.pt2`` sits in. Both
    are JSON read from the zip file: nothing is unpickled. An ``encoder.onnx`` holds the same
    record in its metadata.
    """
    import json
    import zipfile
    from pathlib import Path

    path = Path(spec)
    if path.suffix == ".onnx" and path.is_file():
        from leakaudit.models.onnx import read_record

        record = read_record(path)
        layer = record.get("split_layer") if record is not None and record.get("role") == "encoder" else None
        return layer if isinstance(layer, str) and layer.strip() else None
    if path.suffix != ".pt2" or not path.is_file():
        return None
    record = None
    try:
        with zipfile.ZipFile(path) as archive:
            members = [i for i in archive.infolist() if i.filename.split("/")[1:] == ["extra", PROGRAM_RECORD]]
            if members and members[0].file_size < 1 << 20:
                record = json.loads(archive.read(members[0]).decode("utf-8"))
    except (zipfile.BadZipFile, OSError, ValueError, UnicodeDecodeError):
        record = None
    if isinstance(record, dict) and record.get("schema") == PROGRAM_SCHEMA:
        layer = record.get("split_layer")
        return layer if record.get("role") == "encoder" and isinstance(layer, str) and layer.strip() else None
    side = path.with_name("model.json")
    if path.name != "encoder.pt2" or not side.is_file():
        return None
    try:
        folder_record = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(folder_record, dict) or folder_record.get("schema") != "leakaudit.model":
        return None
    layer = folder_record.get("layer")
    return layer if isinstance(layer, str) and layer.strip() else None


Encoder = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Truncation:
    """An encoder computing the split layer's output, and how it does it (``fx``, ``hook``, …)."""

    encoder: Encoder
    method: str


class LayerCapture:
    """The tool's one hook at a layer: records the first output of module ``layer`` on each forward.

    Every capture at a split layer goes through it:

    * ``stop=True`` ends the forward pass as soon as the layer has produced its output
      (:func:`capture`, the ``hook`` truncation): nothing after the split is computed.
    * ``transform`` replaces the layer's output, and the forward (with its gradients) goes on
      through the rest of the model on what it returns — training records Z this way, with a
      recipe's noise as the transform (:mod:`leakaudit.training.objective`).
    * neither: a full forward pass that also records Z, e.g. for a dump with
      ``--with-outputs`` (``with LayerCapture(module, layer) as hook: y, z = hook.run(x)``).

    Only the layer's first call in a forward counts. The hook is registered on ``__enter__``
    and removed on ``__exit__``; a model holds one transforming capture at a time (two would
    both change its forward). :meth:`run` returns ``None`` for the layer's output when the layer
    was not called, so that each caller raises the error that names its own remedy.
    """

    _transforming: set[int] = set()

    def __init__(
        self,
        model: nn.Module,
        layer: str,
        *,
        stop: bool = False,
        transform: Callable[[object], object] | None = None,
        runner: Callable[[torch.Tensor], object] | None = None,
    ) -> None:
        """Hook module ``layer`` of ``model``; :meth:`run` calls ``runner`` (a wrapper such as
        DistributedDataParallel's) if given, else ``model``.

        Raises:
            UsageError: ``layer`` is not a module of ``model`` (a graph node).
            LeakAuditError: a transforming capture is already installed on ``model``.
        """
        if stop and transform is not None:
            raise ValueError("a capture that stops the forward has nothing to transform for.")
        modules = dict(model.named_modules())
        base, index = split_element(layer)
        target = modules.get(layer)
        if target is None and index is not None:
            target = modules.get(base) if base else None
        else:
            index = None
        if target is None:
            raise UsageError(f"layer {layer!r} is a graph node, not a module; only FX truncation can reach it.")
        self.model, self.layer, self.target, self.index = model, layer, target, index
        self.stop, self.transform = stop, transform
        self.runner = runner if runner is not None else model
        self.output: object | None = None
        self._handle = None

    def __enter__(self) -> LayerCapture:
        if self.transform is not None:
            if id(self.model) in LayerCapture._transforming:
                raise LeakAuditError("the model already has a Z capture hook; remove it before adding another.")
            LayerCapture._transforming.add(id(self.model))
        self._handle = self.target.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
            if self.transform is not None:
                LayerCapture._transforming.discard(id(self.model))

    def _hook(self, _module: nn.Module, _inputs: object, output: object) -> object:
        value = output if self.index is None else select_element(output, self.index, self.layer)
        if self.stop:
            # Stateless, so that threads running forwards of one model at once each get their own output.
            raise _StopForward(value)
        if self.output is not None:
            return None
        self.output = value if self.transform is None else self.transform(value)
        if self.transform is None:
            return None
        return self.output if self.index is None else _replace_element(output, self.index, self.output, self.layer)

    def run(self, x: torch.Tensor) -> tuple[object | None, object | None]:
        """One forward pass: (the model's output, ``None`` when stopped; the layer's output, ``None`` when not called)."""
        self.output = None
        try:
            result = self.runner(x)
        except _StopForward as stop:
            return None, stop.output
        output, self.output = self.output, None
        return result, output


def capture(module: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    """The output of ``layer`` for input ``x`` in eval mode, by a :class:`LayerCapture` that stops the forward there."""
    if layer == OUTPUT:
        with eval_mode(module):
            return _as_tensor(module(x), layer)
    with LayerCapture(module, layer, stop=True) as hook, eval_mode(module):
        _, out = hook.run(x)
    if out is None:
        raise UsageError(
            f"layer {layer!r} was not called during the forward pass, so it produced no output. "
            "Choose a layer that `leakaudit layers MODEL` shows with an output shape."
        )
    return _as_tensor(out, layer)


def _as_tensor(out: object, layer: str) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    elements = _elements(out) if layer != OUTPUT else None
    first = next((i for i, e in enumerate(elements or ()) if isinstance(e, torch.Tensor)), None)
    if elements is not None and first is not None:
        kinds = ", ".join(type(e).__name__ for e in elements[:4]) + (", …" if len(elements) > 4 else "")
        raise UsageError(
            f"layer {layer!r} outputs a {type(out).__name__} of {len(elements)} ({kinds}), not a tensor; "
            f"choose one element with --layer {layer}[{first}]."
        )
    raise UsageError(
        f"layer {layer!r} outputs a {type(out).__name__}, not a tensor; choose a layer whose output is a tensor."
    )


def truncate(module: nn.Module, layer: str, example: torch.Tensor) -> Truncation:
    """Build an encoder that runs ``module`` only up to ``layer``.

    FX truncation is tried first and verified on ``example`` against a hook capture; where
    the model does not trace (data-dependent control flow, TorchScript), a stopping hook is
    used instead. The encoder runs the model in eval mode (:func:`eval_mode`) at every call.
    """
    return _truncate_checked(module, layer, example)[0]


def _truncate_checked(module: nn.Module, layer: str, example: torch.Tensor) -> tuple[Truncation, torch.Tensor | None]:
    """:func:`truncate`, and the FX encoder's output on ``example`` where its check computed it (else None).

    A multi-layer capture compares its one traced pass with each layer's own encoder on the
    same batch; the output the check already computed saves running that encoder again.
    """
    with eval_mode(module):
        layer = resolve_layer(module, layer)
        if layer == OUTPUT:
            return Truncation(_in_eval(module, lambda x: _as_tensor(module(x), layer)), "full"), None
        if _is_script(module):
            return Truncation(_in_eval(module, _script_prefix(module, layer)), "sequential"), None
        is_module = layer in dict(module.named_modules())
        if not is_module and split_element(layer)[1] is not None:  # an element of a module's output: a hook
            return Truncation(lambda x: capture(module, layer, x), "hook"), None
        extractor = _fx_extractor(module, layer)
        if extractor is not None:
            if not is_module:
                return Truncation(extractor, "fx"), None
            with torch.inference_mode():
                expected = same_draws(lambda x: capture(module, layer, x), example)
                got = same_draws(extractor, example)
            # Equal bits are the common case and cost one pass; allclose is the same decision.
            if got.shape == expected.shape and (torch.equal(got, expected) or torch.allclose(got, expected, rtol=1e-4, atol=1e-5)):
                return Truncation(extractor, "fx"), got
    return Truncation(lambda x: capture(module, layer, x), "hook"), None


def same_draws(encoder: Callable[[torch.Tensor], Any], x: torch.Tensor) -> Any:
    """``encoder(x)`` with torch's default generators seeded the same for every call, and restored after.

    Two ways of computing a layer are compared on one batch; where the forward draws random
    numbers (a noise layer) they must draw the same ones to be comparable.
    """
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        torch.manual_seed(0)
        return encoder(x)


def _in_eval(module: nn.Module, encoder: Encoder) -> Encoder:
    def run(x: torch.Tensor) -> torch.Tensor:
        with eval_mode(module):
            return encoder(x)

    return run


def _fx_extractor(module: nn.Module, layer: str) -> Encoder | None:
    from timm.models import create_feature_extractor

    # It traces in training mode too, and leaves that mode behind when tracing fails.
    with warnings.catch_warnings(), eval_mode(module):
        warnings.simplefilter("ignore")
        try:
            graph_module = create_feature_extractor(module, return_nodes={layer: "z"})
        except Exception:
            return None
        # Through train(): it is what selects the eval graph. Its submodules are the model's,
        # whose modes the block restores.
        graph_module.eval()

    def encoder(x: torch.Tensor) -> torch.Tensor:
        with eval_mode(module, graph_module):
            return _as_tensor(graph_module(x)["z"], layer)

    encoder.graph_module = graph_module  # type: ignore[attr-defined]
    return encoder


def _is_script_chain(module: nn.Module) -> bool:
    """Whether a TorchScript module's forward feeds its children one into the next, in order.

    This is what ``nn.Sequential`` (and subclasses that keep its forward) compile to; the
    check reads the compiled code rather than trusting the class name.
    """
    import re

    try:
        code = cast(str, module.code)  # a ScriptModule's forward as Python source; Module.__getattr__ is typed Tensor | Module
    except (AttributeError, RuntimeError):
        return False
    children = [name for name, _ in module.named_children()]
    aliases = dict(re.findall(r"(\w+) = self\.(\w+)\n", code))
    aliases.update(re.findall(r'(\w+) = getattr\(self, "(\w+)"\)\n', code))
    calls = re.findall(r"(?:(\w+) = |return )\((\w+)\)\.forward\((\w+), \)", code)
    signature = re.search(r"def forward\(self,\s*(\w+)", code)
    if not signature or len(calls) != len(children) or not code.rstrip().splitlines()[-1].lstrip().startswith("return ("):
        return False
    previous = signature.group(1)
    for (result, alias, argument), child in zip(calls, children):
        if aliases.get(alias) != child or argument != previous:
            return False
        previous = result
    return True


def _script_prefix(module: nn.Module, layer: str) -> Encoder:
    """Prefix of a TorchScript model along a path of chain-like (``Sequential``) modules."""
    path = layer.split(".")
    chain: list[tuple[nn.Module, int]] = []
    parent = module
    for part in path:
        if not _is_script_chain(parent):
            raise UsageError(
                f"cannot split the TorchScript archive at {layer!r}: TorchScript runs no Python hooks, "
                "so it can only be cut inside modules whose forward chains their children (nn.Sequential). "
                "Give the Python model spec (file.py:Factory + --weights) instead, or export the encoder up to the split."
            )
        names = [n for n, _ in parent.named_children()]
        chain.append((parent, names.index(part)))
        parent = getattr(parent, part)

    def encoder(x: torch.Tensor) -> torch.Tensor:
        # Run each container's children before the addressed one, descending, then the layer itself.
        for container, stop in chain:
            for child in list(container.children())[:stop]:
                x = child(x)
        return _as_tensor(parent(x), layer)

    return encoder


_CHANNELS = re.compile(r"expected input\[[^\]]*\] to have (\d+) channels, but got (\d+) channels")
_TOO_SMALL = (
    "Kernel size can't be greater than actual input size",
    "Output size is too small",
    "smaller than kernel",
    "padding should be at most half of effective kernel size",
)
_FC_MISMATCH = re.compile(r"mat1 and mat2 shapes cannot be multiplied")


def forward_failure(
    exc: BaseException, input_shape: tuple[int, ...], *, size_option: str, channels_hint: str = ""
) -> LeakAuditError:
    """The error to report for a forward pass that failed on an input of ``input_shape`` (C, H, W).

    A model fed the wrong number of channels or an input too small for its kernels fails
    deep inside torch; those are the user's settings, not bugs, so each gets its own message
    naming the option that fixes it (``size_option``; ``channels_hint`` says how to change
    the channels for this command). Any other failure is reported as the model's own
    (exit code 3) with torch's first line.
    """
    text = _first_line(exc)
    shape = "×".join(map(str, input_shape))
    channels = _CHANNELS.search(str(exc))
    if channels:
        expected, got = channels.groups()
        hint = channels_hint.format(expected=expected, got=got) if channels_hint else (
            f"Pass {size_option} with {expected} channels."
        )
        return UsageError(
            f"the model expects {expected} input channels but its input ({shape}) has {got}. {hint}"
        )
    if any(marker in str(exc) for marker in _TOO_SMALL):
        return UsageError(
            f"the input ({shape}) is too small for the model: it shrinks below the size of a kernel "
            f"inside the network ({text}). Pass a larger {size_option}, such as the size the model was built for."
        )
    if _FC_MISMATCH.search(str(exc)):
        return UsageError(
            f"the input ({shape}) does not fit the model's fully connected layers ({text}). "
            f"Pass the {size_option} the model was built for."
        )
    return LeakAuditError(
        f"the model's forward pass failed on an input of shape {shape}: {type(exc).__name__}: {text}. "
        f"Check {size_option} and the channels; run with --debug for the traceback."
    )


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0].rstrip(".") if lines else "no message"
