"""Pieces of the differentiable batch dCor: a safe square root and double centring."""

from __future__ import annotations

from typing import Any

import torch


class _SafeSqrt(torch.autograd.Function):
    """sqrt whose gradient is 0 (a subgradient) where the argument is 0, not infinite.

    At a zero distance (the diagonal, duplicate rows) the squared distance has zero
    gradient too, and autograd's inf · 0 would give NaN. dCor = 0 is a minimum of a
    non-negative function, where 0 is the right subgradient as well.
    """

    @staticmethod
    def forward(ctx: Any, value: torch.Tensor) -> torch.Tensor:
        root = value.clamp_min(0).sqrt()
        ctx.save_for_backward(root)
        return root

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (root,) = ctx.saved_tensors
        positive = root > 0
        return torch.where(positive, grad / (2 * torch.where(positive, root, torch.ones_like(root))), 0.0)


def _double_centred(x: torch.Tensor) -> torch.Tensor:
    x = x - x.mean(dim=0, keepdim=True)  # translation invariance; keeps the Gram trick accurate
    norms = (x * x).sum(dim=1)
    d2 = norms[:, None] + norms[None, :] - 2.0 * (x @ x.T)
    eye = torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    d = _SafeSqrt.apply(d2.masked_fill(eye, 0.0))
    return d - d.mean(dim=0, keepdim=True) - d.mean(dim=1, keepdim=True) + d.mean()
