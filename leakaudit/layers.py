"""Layer names, output shapes, and running a model only up to its split layer.

A layer is addressed by its dotted ``named_modules()`` name (``features.3``,
``layer2.0.conv1``, names inside a ``ModuleDict``), by an FX graph node name where the
model traces (``layer1.0.add``), or as ``output`` for the whole model.

:func:`truncate` returns an encoder that computes the layer's output and nothing after
it: an FX graph cut at the layer where the model traces (checked once against a hook
capture on a real batch), otherwise a forward hook that stops the forward pass as soon
as the layer has produced its output — so models with data-dependent control flow work.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

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
    """Raised by the capture hook to end the forward pass at the split layer."""

    def __init__(self, output: object) -> None:
        super().__init__()
        self.output = output


def module_names(module: nn.Module) -> list[str]:
    return [name for name, _ in module.named_modules() if name]


def _is_script(module: nn.Module) -> bool:
    return isinstance(module, torch.jit.ScriptModule)


def list_layers(module: nn.Module, example: torch.Tensor) -> list[LayerInfo]:
    """Run ``example`` once through ``module`` and record every submodule's output shape.

    Shapes of submodules inside TorchScript archives cannot be observed (TorchScript runs
    no Python hooks); they are reported as ``None``.
    """
    shapes: dict[str, tuple[int, ...] | None] = {}
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

                handles.append(sub.register_forward_hook(hook))
        with torch.inference_mode():
            out = module(example)
    except Exception as exc:
        raise UsageError(
            f"the model failed on an input of shape {tuple(example.shape[1:])}: {type(exc).__name__}: "
            f"{_first_line(exc)}. Pass the shape it expects with --input-shape C,H,W."
        ) from None
    finally:
        for handle in handles:
            handle.remove()
    layers = [
        LayerInfo(
            name,
            type(sub).__name__ if not _is_script(sub) else getattr(sub, "original_name", "ScriptModule"),
            shapes.get(name),
            sum(p.numel() for p in sub.parameters()),
            calls.get(name, 0),
        )
        for name, sub in named
        if name
    ]
    out_shape = tuple(out.shape[1:]) if isinstance(out, torch.Tensor) else None
    layers.append(LayerInfo(OUTPUT, type(module).__name__, out_shape, sum(p.numel() for p in module.parameters())))
    return layers


def graph_node_names(module: nn.Module) -> list[str]:
    """FX node names of ``module`` in eval mode, or ``[]`` where it does not trace."""
    if _is_script(module):
        return []
    try:
        from torchvision.models.feature_extraction import get_graph_node_names

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, names = get_graph_node_names(module)
        return list(names[1:])  # the first node is the input placeholder
    except Exception:
        return []


def resolve_layer(module: nn.Module, layer: str) -> str:
    """Check that ``layer`` names a module or graph node; unknown names list the closest."""
    if layer == OUTPUT or layer in dict(module.named_modules()):
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


Encoder = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Truncation:
    """An encoder computing the split layer's output, and how it does it (``fx``, ``hook``, …)."""

    encoder: Encoder
    method: str


def capture(module: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    """The output of ``layer`` for input ``x``, by a hook that stops the forward there."""
    if layer == OUTPUT:
        return _as_tensor(module(x), layer)
    target = dict(module.named_modules()).get(layer)
    if target is None:
        raise UsageError(f"layer {layer!r} is a graph node, not a module; only FX truncation can reach it.")

    def hook(_m, _i, out):
        raise _StopForward(out)

    handle = target.register_forward_hook(hook)
    try:
        module(x)
    except _StopForward as stop:
        return _as_tensor(stop.output, layer)
    finally:
        handle.remove()
    raise LeakAuditError(f"layer {layer!r} was not called during the forward pass, so it produced no output.")


def _as_tensor(out: object, layer: str) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    raise UsageError(
        f"layer {layer!r} outputs a {type(out).__name__}, not a tensor; choose a layer whose output is a tensor."
    )


def truncate(module: nn.Module, layer: str, example: torch.Tensor) -> Truncation:
    """Build an encoder that runs ``module`` only up to ``layer``.

    FX truncation is tried first and verified on ``example`` against a hook capture; where
    the model does not trace (data-dependent control flow, TorchScript), a stopping hook is
    used instead.
    """
    layer = resolve_layer(module, layer)
    if layer == OUTPUT:
        return Truncation(lambda x: _as_tensor(module(x), layer), "full")
    if _is_script(module):
        return Truncation(_script_prefix(module, layer), "sequential")
    extractor = _fx_extractor(module, layer)
    is_module = layer in dict(module.named_modules())
    if extractor is not None:
        if not is_module:
            return Truncation(extractor, "fx")
        with torch.inference_mode():
            expected = capture(module, layer, example)
            got = extractor(example)
        if got.shape == expected.shape and torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
            return Truncation(extractor, "fx")
    return Truncation(lambda x: capture(module, layer, x), "hook")


def _fx_extractor(module: nn.Module, layer: str) -> Encoder | None:
    try:
        from timm.models import create_feature_extractor

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph_module = create_feature_extractor(module, return_nodes={layer: "z"})
    except Exception:
        return None
    graph_module.eval()

    def encoder(x: torch.Tensor) -> torch.Tensor:
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
        code = module.code
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


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0].rstrip(".") if lines else "no message"


# --------------------------------------------------------------------------- split


@dataclass
class Split:
    """A model cut in two at a layer: ``head(encoder(x)) == model(x)``; both share its parameters."""

    encoder: nn.Module
    head: nn.Module
    layer: str


class _FirstOutput(nn.Module):
    def __init__(self, graph_module: nn.Module, key: str) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.key = key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.graph_module(x)[self.key]


def _cut(module: nn.Module, layer: str, last_node: str):
    """Trace ``module`` returning both ``layer`` and the output; find the nodes after the cut.

    Returns the traced module, the Z and Y nodes, the nodes up to Z, the nodes needed after
    it (in graph order) and the name of a node that crosses the cut, if any.
    """
    from timm.models import create_feature_extractor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        both = create_feature_extractor(module, return_nodes={layer: "z", last_node: "y"})
    out_node = next(n for n in both.graph.nodes if n.op == "output")
    z_node, y_node = out_node.args[0]["z"], out_node.args[0]["y"]
    before = _ancestors(z_node) | {z_node}
    needed = _ancestors(y_node) | {y_node}
    after = [n for n in both.graph.nodes if n in needed and n not in before]
    crossing = next(
        (
            src.name
            for n in after
            for src in n.all_input_nodes
            if src in before and src is not z_node and src.op != "get_attr"
        ),
        None,
    )
    return both, z_node, y_node, before, after, crossing


def split_model(module: nn.Module, layer: str) -> Split:
    """Cut ``module`` at ``layer`` into an encoder (input → Z) and a head (Z → output).

    Raises:
        UsageError: the model does not trace, or a value computed before the split is used
            after it (a skip connection crossing the cut); the message lists layers that can
            be split.
    """
    from torch import fx

    layer = resolve_layer(module, layer)
    if layer == OUTPUT:
        raise UsageError("cannot split at 'output': the head would be empty. Choose an inner layer.")
    nodes = graph_node_names(module)
    reason = "it does not trace with torch.fx (data-dependent control flow?)" if not nodes else None
    if nodes:
        try:
            both, z_node, y_node, before, after, crossing = _cut(module, layer, nodes[-1])
        except Exception as exc:
            reason = f"FX truncation failed ({type(exc).__name__})"
        else:
            if z_node is y_node:
                reason = "it is the model's output, so the head would be empty"
            elif crossing:
                reason = f"{crossing!r}, computed before it, is used after it (a connection crosses the cut)"
    if reason is None:
        head_graph = fx.Graph()
        env = {z_node: head_graph.placeholder("z")}
        after_set = set(after)
        for n in both.graph.nodes:
            if n in after_set or (n.op == "get_attr" and any(u in after_set for u in n.users)):
                env[n] = head_graph.node_copy(n, lambda a: env[a])
        head_graph.output(env[y_node])
        encoder_graph = fx.Graph()
        env = {}
        for n in both.graph.nodes:
            if n in before:
                env[n] = encoder_graph.node_copy(n, lambda a: env[a])
        encoder_graph.output(env[z_node])
        encoder = fx.GraphModule(both, encoder_graph, class_name="Encoder")
        head = fx.GraphModule(both, head_graph, class_name="Head")
        return Split(encoder.eval(), head.eval(), layer)
    candidates = splittable_layers(module) if nodes else []
    hint = f" Layers that can be split: {', '.join(candidates[:12])}." if candidates else ""
    raise UsageError(f"cannot split the model at {layer!r}: {reason}.{hint}")


def _ancestors(node) -> set:
    seen: set = set()
    stack = list(node.all_input_nodes)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def splittable_layers(module: nn.Module) -> list[str]:
    """Module names at which :func:`split_model` succeeds, in forward order."""
    nodes = graph_node_names(module)
    if not nodes:
        return []
    names = []
    for name in module_names(module):
        try:
            _, z_node, y_node, _, _, crossing = _cut(module, name, nodes[-1])
        except Exception:
            continue
        if crossing is None and z_node is not y_node:
            names.append(name)
    return names
