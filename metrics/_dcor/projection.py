"""One-dimensional distance statistics in O(n log² n), and the projections that feed them."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from leakaudit.metrics._dcor.rows import _Rows


def _abs_row_sums(v: np.ndarray) -> np.ndarray:
    """Σ_j |v_i − v_j| for every i, in O(n log n)."""
    order = np.argsort(v, kind="stable")
    s = v[order]
    n = s.size
    csum = np.cumsum(s)
    before = csum - s
    rank = np.arange(n, dtype=np.float64)
    sums = s * (2.0 * rank - n + 1.0) - before + (csum[-1] - csum)
    out = np.empty(n, dtype=np.float64)
    out[order] = sums
    return out


def _sum_abs_products(x: np.ndarray, y: np.ndarray) -> float:
    """Σ_{i,j} |x_i − x_j| |y_i − y_j| in O(n log² n) (Huo & Székely 2016 in spirit).

    In x order, Σ_{i<j} (x_j − x_i)|y_j − y_i| = −Σ_{i<j}(x_j − x_i)(y_j − y_i) + 2 D with
    D = Σ over pairs i<j with y_i < y_j of (x_j − x_i)(y_j − y_i). The first term is
    n Σxy − Σx Σy; D needs, for every j, the count and the sums of x, y and xy over the
    "dominated" i (earlier in x order, smaller in y). Those come from a bottom-up merge sort
    on y, vectorised level by level with searchsorted.
    """
    n = x.size
    ox = np.argsort(x, kind="stable")
    xs, ys = x[ox], y[ox]
    rank = np.empty(n, dtype=np.int64)
    rank[np.argsort(ys, kind="stable")] = np.arange(n)  # unique ranks: ties in y add 0 anyway
    weights = np.stack([np.ones(n), xs, ys, xs * ys], axis=1)
    dominated = np.zeros((n, 4), dtype=np.float64)
    # Slot arrays: within each block of size s, sorted by y rank.
    slot_rank, slot_w, slot_id = rank.copy(), weights.copy(), np.arange(n)
    position = np.arange(n)
    s = 1
    while s < n:
        block = position // (2 * s)
        left = (position // s) % 2 == 0
        li, ri = np.nonzero(left)[0], np.nonzero(~left)[0]
        bl, br = block[li], block[ri]
        key_l = bl * n + slot_rank[li]
        key_r = br * n + slot_rank[ri]
        cum_l = np.zeros((li.size + 1, 4))
        np.cumsum(slot_w[li], axis=0, out=cum_l[1:])
        below_l = np.searchsorted(key_l, key_r)  # left keys below each right key
        # Every block before the last is full, so block b's left half starts at b·s.
        dominated[slot_id[ri]] += cum_l[below_l] - cum_l[br * s]
        below_r = np.searchsorted(key_r, key_l) - bl * s
        new_l = bl * 2 * s + (np.arange(li.size) - bl * s) + below_r
        new_r = br * 2 * s + (np.arange(ri.size) - br * s) + (below_l - br * s)
        order = np.empty(n, dtype=np.int64)
        order[new_l] = li
        order[new_r] = ri
        slot_rank, slot_w, slot_id = slot_rank[order], slot_w[order], slot_id[order]
        s *= 2
    c, sx, sy, sxy = dominated.T
    d = float(np.sum(c * xs * ys - xs * sy - ys * sx + sxy))
    pairs = n * float(np.dot(x, y)) - float(x.sum()) * float(y.sum())
    return 2.0 * (2.0 * d - pairs)


def _project(
    rows: _Rows, mean: torch.Tensor, directions: torch.Tensor, block: int, step: Callable[[], None]
) -> np.ndarray:
    """``(rows − mean) @ directions`` in float64, read block by block."""
    out = torch.empty(rows.n, directions.shape[1], dtype=torch.float64)
    for start in range(0, rows.n, block):
        stop = min(start + block, rows.n)
        chunk = rows.block(start, stop).to(torch.float64) - mean
        out[start:stop] = chunk @ directions
        step()
    return out.numpy()


def _sphere(generator: np.random.Generator, dim: int, count: int) -> torch.Tensor:
    u = generator.standard_normal((dim, count))
    u /= np.linalg.norm(u, axis=0, keepdims=True)
    return torch.from_numpy(u)
