"""What a network costs in memory while :mod:`leakaudit.training.engine` trains it, known before it is built.

The memory budget (:mod:`leakaudit.store.stream`) bounds the rows an attack holds; the
networks it trains take memory beside them. :func:`network_footprint` builds a network on
PyTorch's ``meta`` device (shapes without storage: nothing is allocated, however large the
network) and runs one training forward of one batch there, so an attack can take the
networks' share out of the budget before it chooses how to read its rows.

What is counted, in bytes:

* **weights**: parameters and buffers, held :data:`PARAMETER_COPIES` times by the loop:
  the weights, their gradients, Adam's two moments and the best epoch's snapshot (buffers
  :data:`BUFFER_COPIES` times: themselves and the snapshot);
* **activations**: the distinct tensors autograd saves for backward in one forward of
  ``batch_size`` rows (``torch.autograd.graph.saved_tensors_hooks``; the weights it saves
  are not counted again), counted twice: backward holds their gradients while it frees them.

Not counted: the allocator's slack and the transient outputs of layers that save nothing.
This is an estimate of the order of magnitude a budget needs, not a bound.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

#: Copies of each parameter a training run holds: weights, gradients, Adam's two moments, the best snapshot.
PARAMETER_COPIES = 5
#: Copies of each buffer (batch-norm statistics): the buffer and the best snapshot.
BUFFER_COPIES = 2
#: Saved activations are held once by the forward and once more, as gradients, by the backward.
ACTIVATION_COPIES = 2


@dataclass(frozen=True)
class Footprint:
    """Bytes one network takes while it trains (the module docstring says what is counted)."""

    parameters: int = 0
    buffers: int = 0
    activations: int = 0  # saved for backward by one forward of one batch

    @property
    def total(self) -> int:
        return PARAMETER_COPIES * self.parameters + BUFFER_COPIES * self.buffers + ACTIVATION_COPIES * self.activations

    def __add__(self, other: Footprint) -> Footprint:
        return Footprint(self.parameters + other.parameters, self.buffers + other.buffers, self.activations + other.activations)

    def to_dict(self) -> dict[str, int]:
        return {"parameters": self.parameters, "buffers": self.buffers, "activations": self.activations, "total": self.total}


def network_footprint(build: Callable[[], nn.Module], input_shape: Sequence[int], batch_size: int) -> Footprint:
    """The footprint of the network ``build()`` returns, trained on float32 batches of ``batch_size`` rows.

    ``build`` runs with ``meta`` as the default device and torch's random state restored
    afterwards, so estimating a network changes neither memory nor the seeds of what follows.
    ``input_shape`` is one row's shape.
    """
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = build()
        model.train()
        parameters = {id(p): p for p in model.parameters()}
        weights = sum(p.numel() * p.element_size() for p in parameters.values())
        buffers = sum(b.numel() * b.element_size() for b in model.buffers())
        seen: dict[int, torch.Tensor] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            weight = id(tensor) in parameters or (tensor._base is not None and id(tensor._base) in parameters)
            if not weight:  # a weight, or a view of one (a transposed matrix), is counted with the weights
                seen.setdefault(id(tensor), tensor)  # the reference keeps ids from being reused
            return tensor

        batch = torch.empty((max(1, batch_size), *input_shape), dtype=torch.float32)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model(batch)
        saved = sum(t.numel() * t.element_size() for t in seen.values() if t.device.type == "meta")
    return Footprint(weights, buffers, saved)


def measured_footprint(model: nn.Module, batch: torch.Tensor) -> Footprint:
    """The footprint of ``model`` measured on a real training forward of ``batch``: what :func:`network_footprint` estimates.

    Saved tensors are counted by their distinct storages (views of one storage once), the
    weights' excluded. ``model`` is left in the mode it was in.
    """
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    was_training = model.training
    model.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model(batch)
    finally:
        model.train(was_training)
    parameters = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return Footprint(parameters, buffers, sum(storages.values()))


def side_by_side(footprints: Sequence[Footprint]) -> Footprint:
    """Networks trained at the same time (successive halving): their footprints added."""
    total = Footprint()
    for footprint in footprints:
        total = total + footprint
    return total


def one_at_a_time(footprints: Sequence[Footprint]) -> Footprint:
    """Networks trained one after the other: the largest."""
    return max(footprints, key=lambda f: f.total, default=Footprint())
