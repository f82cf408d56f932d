"""Tests of independence on the exact statistics: the dCor t-test and the permutation test."""

from __future__ import annotations

import math

import torch
from scipy import stats as _scipy_stats

from leakaudit.metrics._dcor.exact import _centred, _distances
from leakaudit.metrics._dcor.rows import _Rows, _scan


def _t_test(r: float, n: int) -> tuple[float, float]:
    v = n * (n - 3) / 2
    if r >= 1.0:
        return math.inf, 0.0
    t = math.sqrt(v - 1) * r / math.sqrt(1 - r * r)
    return t, float(_scipy_stats.t.sf(t, df=v - 1))


def _u_centred(rows: _Rows, device: torch.device) -> torch.Tensor:
    # Unscaled: the permutation statistic is a distance covariance, in the data's units.
    g, norms = _centred(rows, 0, rows.n, _scan(rows, rows.n).mean.to(device), 1.0, torch.float64, device)
    a = _distances(g, norms, g, norms, True)
    n = rows.n
    row = a.sum(dim=1)
    total = row.sum()
    a -= row[:, None] / (n - 2)
    a -= row[None, :] / (n - 2)
    a += total / ((n - 1) * (n - 2))
    a.fill_diagonal_(0.0)
    return a


def _permutation_test(
    xr: _Rows, zr: _Rows, num_permutations: int, seed: int, device: str | torch.device | None
) -> tuple[float, float]:
    dev = torch.device(device) if device is not None else xr.device
    with torch.no_grad():
        a = _u_centred(xr, dev)
        b = _u_centred(zr, dev)
        observed = float(torch.dot(a.view(-1), b.view(-1)))
        generator = torch.Generator().manual_seed(seed)
        exceed = 0
        for _ in range(num_permutations):
            perm = torch.randperm(xr.n, generator=generator).to(dev)
            permuted = float(torch.dot(a.view(-1), b[perm][:, perm].reshape(-1)))
            exceed += permuted >= observed
    n = xr.n
    return observed / (n * (n - 3)), (1 + exceed) / (1 + num_permutations)
