"""The heads of the classifier attack: what is retrained on Z (or on raw X) for a private task.

``mlp`` and ``conv`` are fresh networks of growing capacity (the linear probe and the SVM are
not networks trained by epochs: :mod:`leakaudit.attacks.classifier_fit`); ``continuation`` is the
Scrunch paper's own attacker, the rest of the model after the split rebuilt from the store's
recorded spec and retrained; ``raw_cnn`` is the reference trained on raw X.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from leakaudit.errors import UsageError
from leakaudit.store import ActivationStore


def mlp_head(features: int, classes: int, width: int = 512) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(features, width),
        nn.BatchNorm1d(width),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Linear(width, width // 2),
        nn.BatchNorm1d(width // 2),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Linear(width // 2, classes),
    )


def _conv_block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


def conv_head(shape: tuple[int, ...], classes: int) -> nn.Module:
    """A small CNN over spatial Z ``[C, H, W]``: two 3×3 blocks, a pool when H, W ≥ 4, one more block."""
    channels, height, width = shape
    w = 64 if channels <= 64 else 128
    layers = [*_conv_block(channels, w), *_conv_block(w, w)]
    if min(height, width) >= 4:
        layers.append(nn.MaxPool2d(2))
        height, width = height // 2, width // 2
    layers += _conv_block(w, 2 * w)
    pooled = (min(2, height), min(2, width))
    layers += [nn.AdaptiveAvgPool2d(pooled), nn.Flatten(), nn.Dropout(0.3), nn.Linear(2 * w * pooled[0] * pooled[1], classes)]
    return nn.Sequential(*layers)


def raw_cnn(shape: tuple[int, ...], classes: int) -> nn.Module:
    """The raw-X reference CNN: 3×3 conv/BN/ReLU/max-pool stages (16, 32, 64, 128 channels) down to ≤ 4 pixels.

    One convolution per stage keeps it cheap on a CPU (about 2.5 M multiply-adds per 32×32
    image); it still beats the linear probe on pixels by a wide margin.
    """
    channels, height, width = shape
    layers: list[nn.Module] = []
    # Large images are averaged down to ≤ 64 pixels first: the reference must stay cheap on a CPU.
    factor = math.ceil(max(height, width) / 64)
    if factor > 1:
        layers.append(nn.AvgPool2d(factor, ceil_mode=True))
        height, width = math.ceil(height / factor), math.ceil(width / factor)
    cin = channels
    for cout in (16, 32, 64, 128):
        if min(height, width) <= 4 and cin != channels:
            break
        layers += _conv_block(cin, cout)
        if min(height, width) >= 2:
            layers.append(nn.MaxPool2d(2))
            height, width = height // 2, width // 2
        cin = cout
    pooled = (min(2, height), min(2, width))
    layers += [nn.AdaptiveAvgPool2d(pooled), nn.Flatten(), nn.Dropout(0.3), nn.Linear(cin * pooled[0] * pooled[1], classes)]
    return nn.Sequential(*layers)


def continuation_head(store: ActivationStore, classes: int, z_example: torch.Tensor) -> nn.Module:
    """The original model after the split, re-initialised, with a ``classes``-way output.

    The model is rebuilt from the store's provenance: ``model_spec``, ``model_options``, the
    ``weights`` file (which must still have the recorded SHA-256, so the architecture is the
    one that produced Z) and ``layer``. Its parameters are then re-initialised: the attacker
    retrains the rest of the network, as in the Scrunch paper. If the head's output does not
    have ``classes`` logits, its last ``nn.Linear`` is replaced by one that does.

    Raises:
        UsageError: the model cannot be rebuilt or split there; the message says why.
    """
    from leakaudit.provenance import rebuild_split

    split = rebuild_split(store)
    head = split.head
    for module in head.modules():
        reset = getattr(module, "reset_parameters", None) if module is not head else None
        if reset is not None:
            reset()
    head.eval()
    try:
        with torch.no_grad():
            out = head(z_example)
    except Exception as exc:  # noqa: BLE001 - any failure means the head does not fit this Z
        raise UsageError(f"the rebuilt head fails on the stored Z ({type(exc).__name__})") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise UsageError("the model's output after the split is not a [batch, logits] tensor")
    if out.shape[1] != classes:
        last = _last_linear(head)
        if last is None:
            raise UsageError(
                f"the model outputs {out.shape[1]} logits, the task has {classes} classes, and it ends in no nn.Linear to resize"
            )
        name, linear = last
        parent_name, _, attr = name.rpartition(".")
        parent = head.get_submodule(parent_name) if parent_name else head
        setattr(parent, attr, nn.Linear(linear.in_features, classes, bias=linear.bias is not None))
        with torch.no_grad():
            out = head(z_example)
        if out.shape[1] != classes:
            raise UsageError(f"resizing the model's last layer to {classes} classes did not change its output")
    return head


def _last_linear(head: nn.Module) -> tuple[str, nn.Linear] | None:
    graph = getattr(head, "graph", None)
    if graph is not None:  # the FX graph gives the order of calls, not of definitions
        for node in reversed(list(graph.nodes)):
            if node.op == "call_module" and isinstance(module := head.get_submodule(node.target), nn.Linear):
                return str(node.target), module
        return None
    linears = [(name, m) for name, m in head.named_modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None
