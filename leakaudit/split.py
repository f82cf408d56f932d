"""Cutting a model at a layer into a client encoder and a server head: :func:`split_model`.

The model is traced with FX in eval mode (and left in the modes it came in) and its graph cut
at the layer: the encoder maps the input to Z, the head maps Z to the output, sharing the
model's parameters. A model that does not trace, or whose later nodes use a value computed
before the split, cannot be cut there; the error says which.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from leakaudit.errors import UsageError
from leakaudit.layers import OUTPUT, eval_mode, graph_node_names, module_names, resolve_layer


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

    The model is traced in eval mode and left in the modes it came in; the two graph
    modules are in eval mode, and their submodules are the model's (modes included).

    Raises:
        UsageError: the model does not trace, or a value computed before the split is used
            after it (a skip connection crossing the cut); the message lists layers that can
            be split.
    """
    with eval_mode(module):
        return _split_model(module, layer)


def _split_model(module: nn.Module, layer: str) -> Split:
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
        encoder.training = head.training = False  # their own flags; the submodules keep the model's
        return Split(encoder, head, layer)
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
    with eval_mode(module):
        for name in module_names(module):
            try:
                _, z_node, y_node, _, _, crossing = _cut(module, name, nodes[-1])
            except Exception:
                continue
            if crossing is None and z_node is not y_node:
                names.append(name)
    return names
