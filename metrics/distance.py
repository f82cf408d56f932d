"""Intra-class distance of activations: how tightly Z clusters around its class centres.

Scrunch (Fig. 4) hardens a split layer with a center loss, which pulls every activation
towards the centre of its *public* class; the mean distance to that centre shows how far the
activations have collapsed (and with them, what an attacker can still tell apart inside a
class).

The distance is in the units of Z, so a network can lower it by shrinking every activation
and letting the next layer scale them back up; an attacker that standardises Z sees no
change. ``scatter_ratio`` — within-class scatter over total scatter, Σ‖z − c_y‖² / Σ‖z − z̄‖²
(1 − the correlation ratio η²) — is the scale-free companion: 0 when every class is a point,
about 1 when the classes are indistinguishable.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from leakaudit.errors import DataError, NonFiniteError

__all__ = ["IntraClassDistance", "intra_class_distance", "intra_class_distance_stats"]


@dataclass(frozen=True)
class IntraClassDistance:
    """Distances of activations to their class centres.

    Attributes:
        value: Mean over all rows of the Euclidean distance of the flattened row to its
            class centre (classes weighted by their size).
        per_class: Mean distance within each class, keyed by label.
        counts: Rows per class, keyed by label.
        scatter_ratio: Within-class over total scatter (sums of squared distances to the
            class centres and to the overall mean); unchanged by rescaling Z. NaN when all
            rows are equal.
    """

    value: float
    per_class: dict[int, float]
    counts: dict[int, int]
    scatter_ratio: float = float("nan")


def _labels(labels: object, n: int) -> np.ndarray:
    array = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    array = array.reshape(-1)
    if array.shape[0] != n:
        raise DataError(f"labels must have one entry per row of Z; got {array.shape[0]:,} labels for {n:,} rows.")
    if array.dtype.kind not in "iub":
        if array.dtype.kind == "f" and np.isfinite(array).all() and np.all(array == np.round(array)):
            array = array.astype(np.int64)
        else:
            raise DataError(f"labels must be integer class indices; got dtype {array.dtype}.")
    return array.astype(np.int64)


def intra_class_distance_stats(
    z: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    *,
    block_size: int = 4_096,
) -> IntraClassDistance:
    """Mean Euclidean distance of each row of Z to the centre (mean) of its class.

    Two passes over Z in blocks of rows (an ``h5py.Dataset`` works as well as an array):
    class centres in float64, then distances. Memory O(classes · features + block · features).

    Args:
        z: Activations ``[n, ...]``; rows are flattened.
        labels: Class index of each row, ``[n]`` (e.g. the public task's labels).
        block_size: Rows per block.

    Returns:
        The overall mean, the per-class means and the class sizes.

    Raises:
        DataError: No rows, labels that do not match the rows or are not integers.
        NonFiniteError: NaN or infinite values in Z.
    """
    if not hasattr(z, "shape"):
        z = np.asarray(z)
    shape = tuple(z.shape)
    if len(shape) < 1 or shape[0] == 0:
        raise DataError(f"intra_class_distance needs at least one row; got shape {shape}.")
    n = int(shape[0])
    y = _labels(labels, n)
    classes, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    inverse_t = torch.from_numpy(inverse)

    def blocks() -> Iterator[tuple[int, int, torch.Tensor]]:
        for start in range(0, n, block_size):
            stop = min(start + block_size, n)
            chunk = z[start:stop]
            if isinstance(chunk, torch.Tensor):
                tensor = chunk.detach().to(device="cpu", dtype=torch.float64)
            else:
                array = np.asarray(chunk)
                if array.dtype.kind not in "biuf":
                    raise DataError(f"Z must hold numbers; got dtype {array.dtype}.")
                tensor = torch.from_numpy(array.astype(np.float64))
            tensor = tensor.reshape(stop - start, -1)
            yield start, stop, tensor

    sums: torch.Tensor | None = None
    for start, stop, tensor in blocks():
        if not bool(torch.isfinite(tensor).all()):
            raise NonFiniteError(
                "Z contains non-finite values (NaN or ±inf); intra-class distance needs finite numbers."
            )
        if sums is None:
            sums = torch.zeros(classes.size, tensor.shape[1], dtype=torch.float64)
        sums.index_add_(0, inverse_t[start:stop], tensor)
    assert sums is not None
    centres = sums / torch.from_numpy(counts).to(torch.float64)[:, None]
    mean = sums.sum(0) / n
    distance_sums = torch.zeros(classes.size, dtype=torch.float64)
    within = total = 0.0
    for start, stop, tensor in blocks():
        index = inverse_t[start:stop]
        distances = torch.linalg.vector_norm(tensor - centres[index], dim=1)
        distance_sums.index_add_(0, index, distances)
        within += float(distances.square().sum())
        total += float((tensor - mean).square().sum())
    per_class = (distance_sums / torch.from_numpy(counts)).tolist()
    return IntraClassDistance(
        value=float(distance_sums.sum()) / n,
        per_class={int(c): float(v) for c, v in zip(classes, per_class)},
        counts={int(c): int(k) for c, k in zip(classes, counts)},
        scatter_ratio=within / total if total > 0 else float("nan"),
    )


def intra_class_distance(
    z: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    *,
    block_size: int = 4_096,
) -> float:
    """Mean Euclidean distance of each row of Z (flattened) to its class centre.

    The overall number of :func:`intra_class_distance_stats`, which also gives per-class values.

    Args:
        z: Activations ``[n, ...]``.
        labels: Class index of each row, ``[n]``.
        block_size: Rows per block.

    Returns:
        The mean distance over all rows.

    Raises:
        DataError: No rows, or labels that do not match the rows or are not integers.
        NonFiniteError: NaN or infinite values in Z.
    """
    return intra_class_distance_stats(z, labels, block_size=block_size).value
