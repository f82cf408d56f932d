"""Scoring reconstructions against the test images: per-image SSIM and MSE, their summaries and intervals.

The test images of an attack are :class:`HeldOutImages`: held in memory when the test role fits the
memory budget (the reconstructions are kept, for the HDF5 artifact), or streamed from the store
when it does not. A streamed test role is scored chunk by chunk, as the in-memory one is (the same
chunks of :data:`~leakaudit.attacks._training.EVAL_BATCH` rows, so the same numbers), and keeps
only the first :data:`KEPT_WHEN_STREAMED` reconstructions (the grid's); the rest are scored and
dropped, so memory holds a chunk, not the role.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from leakaudit import distributed
from leakaudit.attacks._sources import Source, TensorSource
from leakaudit.attacks._training import EVAL_BATCH, Standardizer, predict

#: Reconstructions a streamed test role keeps: the grid's columns (``save_grid``).
KEPT_WHEN_STREAMED = 8


@dataclass
class ImageScores:
    """Scores of reconstructions against the test images (data range 1).

    Each score has its 95 % interval (``<score>_ci95``, ``[lo, hi]``): a bootstrap over the
    test images (:mod:`leakaudit.intervals`), the reconstructions held fixed; ``None`` with
    fewer than two images.
    """

    ssim_mean: float
    ssim_p5: float
    ssim_p50: float
    ssim_p95: float
    psnr: float
    mse: float
    ssim_mean_ci95: list[float] | None = None
    ssim_p5_ci95: list[float] | None = None
    ssim_p50_ci95: list[float] | None = None
    ssim_p95_ci95: list[float] | None = None
    psnr_ci95: list[float] | None = None
    mse_ci95: list[float] | None = None

    #: The scores that have an interval, in field order.
    SCORES = ("ssim_mean", "ssim_p5", "ssim_p50", "ssim_p95", "psnr", "mse")

    @classmethod
    def from_per_image(cls, ssim: np.ndarray, mse: np.ndarray) -> ImageScores:
        from leakaudit.intervals import mean_interval, percentile_interval
        from leakaudit.metrics.ssim import ssim_percentiles

        percentiles = ssim_percentiles(ssim, (5, 50, 95))
        p5, p50, p95 = (percentiles[q] for q in (5, 50, 95))
        # An exact reconstruction has MSE 0; cap its PSNR at 100 dB instead of infinity.
        psnr = 10.0 * np.log10(1.0 / np.maximum(mse, 1e-10))
        return cls(
            ssim_mean=float(ssim.mean()),
            ssim_p5=float(p5),
            ssim_p50=float(p50),
            ssim_p95=float(p95),
            psnr=float(psnr.mean()),
            mse=float(mse.mean()),
            ssim_mean_ci95=mean_interval(ssim),
            ssim_p5_ci95=percentile_interval(ssim, 5),
            ssim_p50_ci95=percentile_interval(ssim, 50),
            ssim_p95_ci95=percentile_interval(ssim, 95),
            psnr_ci95=mean_interval(psnr),
            mse_ci95=mean_interval(mse),
        )

    def interval(self, score: str) -> list[float] | None:
        """The 95 % interval of ``score`` (a name of :attr:`SCORES`)."""
        return getattr(self, score + "_ci95")

    def numbers(self, *scores: str, as_name: str = "{}") -> dict[str, Any]:
        """``scores`` for report.json, each beside its ``_ci95`` interval (``as_name`` renames them)."""
        out: dict[str, Any] = {}
        for score in scores:
            out[as_name.format(score)] = getattr(self, score)
            if self.interval(score) is not None:
                out[as_name.format(score) + "_ci95"] = self.interval(score)
        return out


def _ssim_fn():
    from leakaudit.metrics.ssim import structural_similarity

    return structural_similarity


def ssim_per_image(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SSIM of each image pair, computed in batches (float32 [N])."""
    ssim = _ssim_fn()
    parts = [
        ssim(recon[i : i + EVAL_BATCH].float(), target[i : i + EVAL_BATCH].float(), data_range=1.0, reduction="none")
        for i in range(0, len(recon), EVAL_BATCH)
    ]
    return torch.cat(parts).float() if parts else torch.empty(0)


def mse_per_image(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (recon.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def score_images(recon: torch.Tensor, target: torch.Tensor) -> tuple[ImageScores, np.ndarray]:
    """Test scores and the per-image SSIM of reconstructions ``recon`` of ``target``."""
    ssim = ssim_per_image(recon, target).double().numpy()
    mse = mse_per_image(recon, target).double().numpy()
    return ImageScores.from_per_image(ssim, mse), ssim


@dataclass
class Scored:
    """Per-image SSIM and MSE (float64) of one set of reconstructions, their scores, and the reconstructions kept."""

    scores: ImageScores
    ssim: np.ndarray
    mse: np.ndarray
    kept: torch.Tensor


class HeldOutImages:
    """The test role's images, held in memory (``x``) or streamed from ``source`` (``x`` is ``None``)."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self.streamed = not isinstance(source, TensorSource)
        self.x: torch.Tensor | None = source.y if isinstance(source, TensorSource) else None

    def _scored(self, ssim: list[torch.Tensor], mse: list[torch.Tensor], kept: torch.Tensor) -> Scored:
        ssim_all = torch.cat(ssim).double().numpy() if ssim else np.empty(0)
        mse_all = torch.cat(mse).double().numpy() if mse else np.empty(0)
        return Scored(ImageScores.from_per_image(ssim_all, mse_all), ssim_all, mse_all, kept)

    def score_image(self, image: torch.Tensor) -> Scored:
        """Scores of predicting ``image`` [C, H, W] for every test image (the mean-image floor)."""
        if self.x is not None:
            guess = image.expand_as(self.x)
            return self._scored([ssim_per_image(guess, self.x)], [mse_per_image(guess, self.x)], guess[:0])
        ssim, mse = [], []
        for _, x in self.source.chunks(EVAL_BATCH, None):
            guess = image.expand_as(x)
            ssim.append(ssim_per_image(guess, x))
            mse.append(mse_per_image(guess, x))
        return self._scored(ssim, mse, image.expand(0, *image.shape))

    def score_model(self, model: nn.Module, standardizer: Standardizer, device: torch.device) -> Scored:
        """Scores of ``model``'s reconstructions (clamped to [0, 1]) from the standardised test Z."""
        if self.x is not None:
            recon = predict(model, self.source.mapped(standardizer), device).clamp_(0.0, 1.0)
            return self._scored([ssim_per_image(recon, self.x)], [mse_per_image(recon, self.x)], recon)
        # Every rank scores every test row (a chunk at a time), so every rank returns the same result.
        ctx = distributed.current(device)
        run_on = device if ctx is None else distributed.rank_device(device, ctx)
        model.to(run_on).eval()
        ssim, mse, kept = [], [], []
        held = 0
        with torch.no_grad():
            for z, x in self.source.mapped(standardizer).chunks(EVAL_BATCH, None):
                recon = model(z.to(run_on)).float().cpu().clamp_(0.0, 1.0)
                ssim.append(ssim_per_image(recon, x))
                mse.append(mse_per_image(recon, x))
                if held < KEPT_WHEN_STREAMED:
                    kept.append(recon[: KEPT_WHEN_STREAMED - held].clone())
                    held += len(kept[-1])
        return self._scored(ssim, mse, torch.cat(kept) if kept else torch.empty(0))
