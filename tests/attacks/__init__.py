"""Stores the attack tests share, built once per test session.

* :func:`trained_digits_store` — LeNet-5 **trained** on digits (the digit label, on the
  store's attacker-train rows only, so test rows are unseen by model and attacker alike),
  cut after the second conv block (``pool2``, 16×5×5).
* :func:`noise_store` — the same rows and inputs, with Z replaced by Gaussian noise drawn
  independently of X: an attack that reports leakage there over-reports.
* :func:`synthetic_store` — a store written directly with :class:`StoreWriter`, for shapes
  and defects the dump would not produce (one-feature Z, NaN, thin classes).

Pytest imports the fixtures from here into each test module; the module-level cache keeps
the expensive stores from being built once per module.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from leakaudit.models import ModelSpec

_CACHE: dict[str, Path] = {}
TASKS = (("public", "parity"), ("private", "label"))


@contextmanager
def single_thread() -> Iterator[None]:
    """Train with one torch thread inside the block, restoring the setting afterwards.

    Measured on the shared 2-core machine while other jobs ran: a LeNet-5 step took 5 ms
    with one thread and 230–430 ms with two (OpenMP threads waiting on each other), a
    decoder step 51–61 ms against 265–600 ms. Results are valid with either setting; one
    thread keeps the suite's run time predictable.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _dump(output: Path, layer: str, weights: Path | None = None, limit: int | None = None) -> Path:
    from leakaudit.dump import DumpSettings, dump

    dump(
        DumpSettings(
            model=ModelSpec("lenet5", weights=str(weights) if weights else None),
            layer=layer,
            data="digits",
            output=output,
            tasks=TASKS,
            limit=limit,
            force=True,
        )
    )
    return output


def train_lenet_on_digits(store_path: Path, out: Path, epochs: int = 40, seed: int = 0) -> Path:
    """Train LeNet-5 on the digit label of ``store_path``'s attacker-train rows; save safetensors."""
    from safetensors.torch import save_file

    from leakaudit.models import LeNet5
    from leakaudit.store import open_store

    with open_store(store_path) as store:
        rows = store.rows("attacker-train")
        x = torch.from_numpy(store.inputs(rows))
        y = torch.from_numpy(store.labels("private")[rows])
    torch.manual_seed(seed)
    model = LeNet5()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for first in range(0, len(x), 32):
            index = order[first : first + 32]
            loss = torch.nn.functional.cross_entropy(model(x[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    save_file(model.state_dict(), str(out))
    return out


def _build(name: str, factory) -> Path:
    # Session fixtures are set up before function-scoped ones such as one_torch_thread.
    if name not in _CACHE:
        with single_thread():
            _CACHE[name] = factory()
    return _CACHE[name]


def synthetic_store(
    path: Path,
    *,
    z: np.ndarray,
    labels: Mapping[str, np.ndarray],
    split: np.ndarray,
    x: np.ndarray | None = None,
    class_names: Mapping[str, Sequence[str]] | None = None,
    attrs: Mapping[str, Any] | None = None,
) -> Path:
    """Write a complete store with exactly these arrays (no model involved)."""
    from leakaudit.store import StoreWriter

    n = len(z)
    names = dict(class_names or {})
    task_labels = {
        task: (values, names.get(task, [str(c) for c in range(int(values.max()) + 1)]), "synthetic")
        for task, values in labels.items()
    }
    writer = StoreWriter(
        path,
        n=n,
        input_shape=x.shape[1:] if x is not None else (1, 16, 16),
        layer_shape=z.shape[1:],
        dtype="float32",
        labels=task_labels,
        index=np.arange(n),
        split=split,
        attrs={"model_spec": "", "layer": "", "data_spec": "synthetic", **dict(attrs or {})},
        fingerprint={},
        store_inputs=x is not None,
    )
    writer.write(0, x if x is not None else np.zeros((n, 1, 16, 16), np.float32), z)
    writer.checkpoint(n)
    writer.finish()
    return path


def balanced_split(labels: np.ndarray, fractions: tuple[float, float, float] = (0.4, 0.4, 0.2), seed: int = 0) -> np.ndarray:
    from leakaudit.data import stratified_split

    return stratified_split(labels, fractions, seed)
