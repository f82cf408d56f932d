"""The substitute attack's encoder side: a re-initialised copy of the architecture, aligned to observed Z.

The attacker knows the encoder's architecture, not its weights (:func:`reinitialised`), and
holds auxiliary X without Z and observed Z without X; the copy is trained so that its outputs
on the auxiliary X are distributed as the observed Z (multi-kernel Gaussian MMD², unbiased,
:func:`gaussian_mmd2`), optionally through the public task (:class:`Alignment`).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from leakaudit.attacks._training import EVAL_BATCH, Standardizer
from leakaudit.training import engine
from leakaudit.training.engine import EpochTraining, StepLoss

# --------------------------------------------------------------------------- the substitute encoder


def reinitialised(encoder: nn.Module, seed: int) -> tuple[nn.Module, list[str]]:
    """A copy of ``encoder`` with every parameter and batch-norm statistic drawn afresh.

    ``encoder`` itself is left as it was. Modules are reset with their own ``reset_parameters``
    (PyTorch's default initialisations; batch norm's also resets its running statistics); a
    parameter no such module owns is drawn from a generic initialisation (Kaiming-uniform for
    matrices and kernels, ``U(−1/√n, 1/√n)`` otherwise), so no trained value survives.

    Returns:
        The substitute encoder (in train mode) and warnings about what had no reset of its own.
    """
    substitute = copy.deepcopy(encoder)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        covered: set[int] = set()
        for module in substitute.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset) and module is not substitute:
                reset()
                covered.update(id(p) for p in module.parameters(recurse=False))
                covered.update(id(b) for b in module.buffers(recurse=False))
        generic = 0
        with torch.no_grad():
            for parameter in substitute.parameters():
                if id(parameter) in covered:
                    continue
                generic += 1
                if parameter.dim() >= 2:
                    nn.init.kaiming_uniform_(parameter, a=math.sqrt(5))
                else:
                    bound = 1.0 / math.sqrt(max(parameter.numel(), 1))
                    nn.init.uniform_(parameter, -bound, bound)
    finally:
        torch.random.set_rng_state(generator_state)
    kept = [name for name, b in substitute.named_buffers() if id(b) not in covered and b.is_floating_point()]
    warnings = []
    if generic:
        warnings.append(f"{generic} parameter(s) of the encoder have no reset_parameters; they were drawn from a "
                        "generic initialisation.")  # fmt: skip
    if kept:
        warnings.append(f"{len(kept)} floating-point buffer(s) of the encoder ({', '.join(kept[:3])}) have no reset "
                        "and keep the checkpoint's values (treated as part of the architecture).")  # fmt: skip
    substitute.train()
    return substitute, warnings


# --------------------------------------------------------------------------- MMD


def gaussian_mmd2(a: torch.Tensor, b: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """Unbiased squared MMD between the rows of ``a`` [n, d] and ``b`` [m, d] (n, m ≥ 2).

    The kernel is a sum of Gaussians ``Σ_w exp(−‖x − y‖² / (2 w²))`` over ``widths``.
    """
    n, m = len(a), len(b)

    def kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        d2 = torch.cdist(x, y).pow(2)
        return torch.exp(-d2.unsqueeze(0) / (2 * widths.view(-1, 1, 1) ** 2)).sum(0)

    k_aa, k_bb, k_ab = kernel(a, a), kernel(b, b), kernel(a, b)
    same_a = (k_aa.sum() - k_aa.diagonal().sum()) / (n * (n - 1))
    same_b = (k_bb.sum() - k_bb.diagonal().sum()) / (m * (m - 1))
    return same_a + same_b - 2 * k_ab.mean()


def median_distance(z: torch.Tensor, rows: int = 512) -> float:
    """The median Euclidean distance between the first ``rows`` rows of ``z`` (flattened)."""
    flat = z[:rows].flatten(1).double()
    d = torch.pdist(flat)
    return float(d.median()) if len(d) else 1.0


@dataclass(frozen=True)
class AlignStats:
    epoch: int
    mmd2: float
    ce: float

    @property
    def loss(self) -> float:
        return self.mmd2 + self.ce


class Alignment(engine.Task[AlignStats]):
    """The engine's view of the alignment: minibatches of auxiliary X, each against as many observed Z."""

    def __init__(self, encoder: nn.Module, x: tuple[torch.Tensor, torch.Tensor], z: torch.Tensor,
                 y_x: tuple[torch.Tensor, torch.Tensor] | None, head: nn.Module | None, standardizer: Standardizer,
                 widths: torch.Tensor, ce_weight: float, seed: int, device: torch.device) -> None:  # fmt: skip
        self.encoder, (self.x_fit, self.x_hold), self.z_fit, self.z_hold = encoder, x, z[0], z[1]
        self.y_fit: torch.Tensor | None
        self.y_hold: torch.Tensor | None
        self.y_fit, self.y_hold = y_x if y_x is not None else (None, None)
        self.head, self.standardizer, self.widths = head, standardizer, widths.to(device)
        self.ce_weight, self.device = ce_weight, device
        self.z_order = torch.Generator().manual_seed(seed)
        self.rows = len(self.x_fit)
        has_batch_norm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in encoder.modules())
        self.short_batches = "drop" if has_batch_norm else "keep"

    def _features(self, forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return self.standardizer(forward(x).float())

    def _loss(self, features: torch.Tensor, z: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        mmd2 = gaussian_mmd2(features.flatten(1), z.flatten(1), self.widths)
        if self.head is None or y is None or self.ce_weight == 0:
            return mmd2, torch.zeros((), device=features.device)
        return mmd2, self.ce_weight * F.cross_entropy(self.head(features), y)

    @contextlib.contextmanager
    def training(self, forward: engine.Forward) -> Iterator[Callable[[torch.Tensor], StepLoss]]:
        self.encoder.train()
        if self.head is not None:
            self.head.eval()  # frozen: its batch norm and dropout as fitted

        def step(index: torch.Tensor) -> StepLoss:
            if len(index) < 2:
                return StepLoss(torch.zeros((), device=self.device, requires_grad=True), len(index))
            pick = torch.randint(len(self.z_fit), (max(len(index), 2),), generator=self.z_order)
            z = self.standardizer(self.z_fit[pick].to(self.device))
            features = self._features(forward, self.x_fit[index].to(self.device))
            y = self.y_fit[index].to(self.device) if self.y_fit is not None else None
            mmd2, ce = self._loss(features, z, y)
            return StepLoss(mmd2 + ce, len(index), parts={"mmd2": mmd2.detach(), "ce": ce.detach()})

        yield step

    @torch.no_grad()
    def validate(self, training: EpochTraining) -> AlignStats:
        self.encoder.eval()
        features = torch.cat([self._features(self.encoder, self.x_hold[i : i + EVAL_BATCH].to(self.device))
                              for i in range(0, len(self.x_hold), EVAL_BATCH)])  # fmt: skip
        z = self.standardizer(self.z_hold.to(self.device))
        y = self.y_hold.to(self.device) if self.y_hold is not None else None
        mmd2, ce = self._loss(features, z, y)
        return AlignStats(training.epoch, float(mmd2), float(ce))

    def val_loss(self, stats: AlignStats) -> float:
        return stats.loss

    def is_better(self, candidate: AlignStats, best: AlignStats | None) -> bool:
        return best is None or candidate.loss < best.loss - 1e-12

    def plateau_score(self, stats: AlignStats) -> float:
        return -stats.loss

    def snapshot(self) -> dict[str, torch.Tensor]:
        return copy.deepcopy(self.encoder.state_dict())

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        self.encoder.load_state_dict(state)


