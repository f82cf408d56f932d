"""The classifier attack's raw-X reference, trained once per content and shared.

The reference heads (``raw-linear``, ``raw-cnn``) learn the private task from the raw inputs
X, never from Z: what they report depends on X's rows, the labels, the split and the attack's
settings, not on the model that was split. An audit with a baseline, a sweep or the demo
runs the classifier on several stores of the same data, and trained the same references
again for each; the raw-X CNN is the most expensive head there is. They are kept here,
keyed by a SHA-256 of everything they depend on (the inputs and labels of every role, the
settings but the choice of Z heads, the device and the number of ranks), and a later store
with the same content gets a copy of the same result: the same numbers a retraining with
the same seed gives. The cache lives in the process and holds the last few references.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from leakaudit.attacks._training import Progress
from leakaudit.attacks.classifier_train import RAW_HEADS, HeadResult, build_raw, refit_head, train_head, val_accuracy
from leakaudit.training.engine import seed_for

if TYPE_CHECKING:
    from leakaudit.attacks.classifier import ClassifierConfig
    from leakaudit.attacks.classifier_data import ClassifierData

#: References kept (each holds a few test-row arrays and head results).
CACHE_SIZE = 8

_CACHE: OrderedDict[str, RawReference] = OrderedDict()


@dataclass
class RawReference:
    """The raw-X heads' results, their per-test-row correctness, and the refit of the chosen one."""

    heads: list[Any]
    correct: dict[str, np.ndarray]
    refitted: dict[str, np.ndarray | None] = field(default_factory=dict)
    cached: bool = False


def content_key(x: Any, labels: tuple[torch.Tensor, torch.Tensor, np.ndarray], config: Any, classes: int,
                device: torch.device, world_size: int) -> str:  # fmt: skip
    """SHA-256 of what the raw-X reference depends on (``x`` holds the train/val/test inputs)."""
    digest = hashlib.sha256()
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k != "head"}
    digest.update(json.dumps({"settings": settings, "classes": classes, "device": str(device), "world_size": world_size},
                             sort_keys=True, default=str).encode())  # fmt: skip
    for part in (x.train, x.val, x.test, *labels):
        array = part.numpy() if isinstance(part, torch.Tensor) else np.asarray(part)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()


def raw_reference(
    source: ClassifierData, classes: int, config: ClassifierConfig, device: torch.device, progress: Progress | None,
) -> RawReference:  # fmt: skip
    """Train the raw-X heads on X, and refit the chosen one (or all) on attacker-train + attacker-validation."""
    heads: list[HeadResult] = []
    correct: dict[str, np.ndarray] = {}
    for name in RAW_HEADS:
        torch.manual_seed(seed_for(config.seed, name))
        model, data = build_raw(name, classes, source.inputs(name, "inputs"))
        head, correct[name] = train_head(name, "X", model, data, source.head_labels(name), classes, config, device, progress)
        source.note_rows(head)
        heads.append(head)
        del model, data
    refitted: dict[str, np.ndarray | None] = {}
    if config.refit != "none":
        chosen = max(heads, key=val_accuracy)
        for head in heads if config.refit == "all" else [chosen]:
            torch.manual_seed(seed_for(config.seed, head.name))
            model, data = build_raw(head.name, classes, source.pooled_inputs(head.name, "inputs"))
            refitted[head.name] = refit_head(head, model, data, source.pooled_labels(head.name), classes, config, device,
                                             progress)  # fmt: skip
    return RawReference(heads, correct, refitted)


def shared_reference(key: str, compute: Callable[[], RawReference]) -> RawReference:
    """The reference for ``key``: a copy of the kept one, or ``compute()``'s, kept for the next store."""
    kept = _CACHE.get(key)
    if kept is not None:
        _CACHE.move_to_end(key)
        reused = copy.deepcopy(kept)
        reused.cached = True
        return reused
    reference = compute()
    _CACHE[key] = copy.deepcopy(reference)
    while len(_CACHE) > CACHE_SIZE:
        _CACHE.popitem(last=False)
    return reference


def clear() -> None:
    """Forget every kept reference (tests)."""
    _CACHE.clear()
