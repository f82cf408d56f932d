"""SSIM: images per second and agreement with scikit-image, ours against pytorch-msssim.

    python benchmarks/bench_ssim.py            # 10,000 32×32 gray and 2,000 128×128 RGB pairs
    python benchmarks/bench_ssim.py --quick    # a tenth of that, one repeat: a smoke run

Images are real: scikit-learn's digits upsampled to 32 × 32 (gray) and 128 × 128 crops of
scikit-image's photographs (RGB); the second image of each pair is a blend with another
image plus noise, like a decoder's reconstruction. The reference is scikit-image's
``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
data_range=1, channel_axis=...)`` in float64, image by image; its speed is measured on a
subset (``--skimage-images``) and reported per image. pytorch-msssim is timed as usually
called (the whole batch at once) and at its best batch size among 4, 16, 64, 256, since it
is much faster in small batches on CPU. Each time is the best of ``--repeats`` runs,
interleaved across the contenders so that a shared machine's drifting load hits all alike.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch


def _gray(count: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    from skimage.transform import resize
    from sklearn.datasets import load_digits

    digits = load_digits().images / 16.0
    up = np.stack([resize(image, (32, 32), order=1) for image in digits])
    x = up[rng.integers(0, len(up), count)]
    y = np.clip(0.7 * x + 0.3 * x[rng.permutation(count)] + 0.05 * rng.standard_normal(x.shape), 0, 1)
    return torch.from_numpy(x[:, None].astype(np.float32)), torch.from_numpy(y[:, None].astype(np.float32))


def _rgb(count: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    crops = []
    for _ in range(count):
        photo = photos[rng.integers(len(photos))]
        top = rng.integers(0, photo.shape[0] - 128)
        left = rng.integers(0, photo.shape[1] - 128)
        crops.append(photo[top : top + 128, left : left + 128])
    x = np.stack(crops).transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    y = np.clip(0.8 * x + 0.2 * x[rng.permutation(count)] + 0.03 * rng.standard_normal(x.shape), 0, 1)
    return torch.from_numpy(x), torch.from_numpy(y.astype(np.float32))


def _best(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def _skimage(x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    from skimage.metrics import structural_similarity

    xs = x.double().permute(0, 2, 3, 1).numpy()
    ys = y.double().permute(0, 2, 3, 1).numpy()
    return np.array(
        [
            structural_similarity(
                a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0, channel_axis=2
            )
            for a, b in zip(xs, ys)
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tenth of the images, one repeat, 200 scikit-image images")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats, best kept (default 3; 1 with --quick)")
    parser.add_argument("--skimage-images", type=int, default=None,
                        help="images timed with the scikit-image loop (default 500; 200 with --quick)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.skimage_images is None:
        args.skimage_images = 200 if args.quick else 500
    if args.threads:
        torch.set_num_threads(args.threads)

    from pytorch_msssim import ssim as msssim

    from leakaudit.metrics.ssim import structural_similarity

    scale = 10 if args.quick else 1
    rng = np.random.default_rng(0)
    cases = [("32×32 gray", *_gray(10_000 // scale, rng)), ("128×128 RGB", *_rgb(2_000 // scale, rng))]
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"load average {os.getloadavg()[0]:.1f} at start")
    print()
    print("| images | count | ours img/s | pytorch-msssim img/s (whole batch) | pytorch-msssim img/s (best batch) "
          "| scikit-image loop img/s | ours / best msssim | max abs diff ours vs skimage | max abs diff msssim vs skimage |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, x, y in cases:
        n = x.shape[0]

        def msssim_batched(batch: int) -> torch.Tensor:
            return torch.cat(
                [msssim(x[i : i + batch], y[i : i + batch], data_range=1.0, size_average=False) for i in range(0, n, batch)]
            )

        contenders = {
            "ours": lambda: structural_similarity(x, y),
            "whole": lambda: msssim(x, y, data_range=1.0, size_average=False),
            **{batch: (lambda batch=batch: msssim_batched(batch)) for batch in (4, 16, 64, 256)},
        }
        # Interleaved repeats, best of each: the machine is shared and its load drifts.
        times = {key: float("inf") for key in contenders}
        outputs = {}
        for _ in range(args.repeats):
            for key, fn in contenders.items():
                seconds, outputs[key] = _best(fn, 1)
                times[key] = min(times[key], seconds)
        ours_time, ours, whole_time = times["ours"], outputs["ours"], times["whole"]
        best_batch = min((4, 16, 64, 256), key=lambda batch: times[batch])
        best_time = times[best_batch]
        chunked = outputs[best_batch]
        subset = min(n, args.skimage_images // (1 if x.shape[1] == 1 else 5))
        start = time.perf_counter()
        reference = _skimage(x[:subset], y[:subset])
        skimage_rate = subset / (time.perf_counter() - start)
        diff_ours = np.abs(ours[:subset].numpy() - reference).max()
        diff_ms = np.abs(chunked[:subset].double().numpy() - reference).max()
        print(f"| {name} | {n:,} | {n / ours_time:,.0f} | {n / whole_time:,.0f} | {n / best_time:,.0f} (batch {best_batch}) | "
              f"{skimage_rate:,.0f} (on {subset:,}) | {best_time / ours_time:.2f}× | {diff_ours:.1e} | {diff_ms:.1e} |", flush=True)
    print()
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
