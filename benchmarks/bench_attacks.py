"""The classifier and decoder attacks on Fashion-MNIST through an undefended LeNet-5, on a CPU.

What runs, in order (every number comes from one run of this script):

1. ``leakaudit dump`` of LeNet-5 (random initialisation, seed 0) at ``pool2`` over the 60,000
   Fashion-MNIST training images (resized to 32×32), tasks ``public=parity`` and
   ``private=label``: this gives the stored inputs and the attacker split (40/40/20 %).
2. LeNet-5 is trained **here, with a plain loop** (``leakaudit train`` is another issue): Adam,
   lr 2e-3, batch 128, ``--model-epochs`` epochs on the 10-class label of the attacker-train
   rows only, so test rows are unseen by the model and the attacker alike.
3. The dump is repeated with those weights: the store that is attacked (Z = 16×5×5).
4. ``run_classifier`` with every head (linear, mlp, conv, continuation) and the raw-X
   references (raw-linear, raw-cnn), epochs capped at ``--classifier-epochs``.
5. ``run_decoder`` with all three decoders (upsample, alexnet, resnet) at the default width,
   epochs capped at ``--decoder-epochs``.

Everything else is the attacks' defaults (Adam 1e-3, early stopping on attacker-validation).
The caps keep the run well under 30 minutes on a shared 2-core machine: the defaults would
train longer (classifier up to 200 epochs, decoders up to 100) and only get stronger, so the
recorded accuracies and SSIMs are lower bounds of what the defaults reach.

Time per epoch includes the validation pass that early stopping needs (for decoders that is
SSIM on 24,000 validation images each epoch). The load average before and after the run is
printed, because other jobs sharing the CPU slow every number here down.

Usage::

    python benchmarks/bench_attacks.py                      # the recorded run
    python benchmarks/bench_attacks.py --limit 6000         # a quick rehearsal
    python benchmarks/bench_attacks.py --quick              # 3,000 rows, one epoch each: a smoke run
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from leakaudit.attacks import ClassifierConfig, DecoderConfig, run_classifier, run_decoder
from leakaudit.dump import DumpSettings, dump
from leakaudit.models import LeNet5, ModelSpec
from leakaudit.store import open_store

FASHION = "idx:/usr/share/datasets/fashion-mnist"
TASKS = (("public", "parity"), ("private", "label"))


def dump_store(out: Path, weights: Path | None, limit: int | None) -> float:
    started = time.perf_counter()
    dump(
        DumpSettings(
            model=ModelSpec("lenet5", weights=str(weights) if weights else None),
            layer="pool2",
            data=FASHION,
            output=out,
            tasks=TASKS,
            limit=limit,
            device="cpu",
            force=True,
        )
    )
    return time.perf_counter() - started


def train_lenet(store_path: Path, out: Path, epochs: int) -> tuple[float, float]:
    """Train LeNet-5 on the store's attacker-train rows; returns (seconds, test accuracy)."""
    from safetensors.torch import save_file

    started = time.perf_counter()
    with open_store(store_path) as store:
        train, test = store.rows("attacker-train"), store.rows("test")
        x_train, x_test = torch.from_numpy(store.inputs(train)), torch.from_numpy(store.inputs(test))
        labels = torch.from_numpy(store.labels("private"))
    y_train, y_test = labels[train], labels[test]
    torch.manual_seed(0)
    model = LeNet5()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=generator)
        for first in range(0, len(order), 128):
            index = order[first : first + 128]
            loss = torch.nn.functional.cross_entropy(model(x_train[index]), y_train[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
    save_file(model.state_dict(), str(out))
    return time.perf_counter() - started, accuracy


def progress(description: str, done: float, total: float | None) -> None:
    print(f"  {description}: epoch {int(done)}/{int(total or 0)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="rows of Fashion-MNIST (default: all 60,000)")
    parser.add_argument("--model-epochs", type=int, default=5)
    parser.add_argument("--classifier-epochs", type=int, default=10)
    parser.add_argument("--decoder-epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--workdir", type=Path, default=None, help="keep the stores here (default: a temporary folder)")
    parser.add_argument("--skip", choices=("classifier", "decoder"), action="append", default=[])
    parser.add_argument("--quick", action="store_true",
                        help="3,000 rows and one epoch for the model, the heads and the decoders (a smoke run, not a result)")
    args = parser.parse_args()
    if args.quick:
        args.limit = args.limit or 3_000
        args.model_epochs = args.classifier_epochs = args.decoder_epochs = 1
    torch.set_num_threads(args.threads)

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-attacks-"))
    work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    started = time.perf_counter()
    print(f"threads {args.threads}; load average before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}")

    seconds = dump_store(work / "random.h5", None, args.limit)
    print(f"dump (random LeNet-5): {seconds:.1f} s")
    seconds, accuracy = train_lenet(work / "random.h5", work / "lenet5.safetensors", args.model_epochs)
    print(f"LeNet-5 training ({args.model_epochs} epochs, plain loop): {seconds:.1f} s, test accuracy {accuracy:.4f}")
    seconds = dump_store(work / "trained.h5", work / "lenet5.safetensors", args.limit)
    print(f"dump (trained LeNet-5): {seconds:.1f} s")

    rows: list[str] = []
    with open_store(work / "trained.h5") as store:
        sizes = store.split_sizes()
        print(f"store: {len(store):,} rows, Z {store.layer_shape}, split {sizes}")
        if "classifier" not in args.skip:
            t0 = time.perf_counter()
            result = run_classifier(store, ClassifierConfig(epochs=args.classifier_epochs), progress)
            print(f"classifier attack: {time.perf_counter() - t0:.1f} s")
            for head in [*result.heads, *result.raw_heads]:
                if head.ok:
                    rows.append(
                        f"| classifier | {head.name} ({head.input}) | {head.epochs} ({head.best_epoch}) | "
                        f"{head.seconds_per_epoch:.1f} | accuracy {head.accuracy:.4f} (balanced {head.balanced_accuracy:.4f}) |"
                    )
                else:
                    rows.append(f"| classifier | {head.name} | — | — | skipped: {head.reason} |")
            rows.append(
                f"| classifier | **strongest: {result.best_head}** | | | private_accuracy {result.accuracy:.4f}, "
                f"private_accuracy_raw {result.private_accuracy_raw:.4f} ({result.raw_best_head}), "
                f"private_accuracy_drop {result.private_accuracy_drop:.4f}, chance {result.chance:.4f} |"
            )
        if "decoder" not in args.skip:
            t0 = time.perf_counter()
            result = run_decoder(store, DecoderConfig(epochs=args.decoder_epochs), progress)
            print(f"decoder attack: {time.perf_counter() - t0:.1f} s")
            for run in result.runs:
                s = run.test
                rows.append(
                    f"| decoder | {run.arch} | {run.epochs} ({run.best_epoch}) | {run.seconds_per_epoch:.1f} | "
                    f"SSIM mean {s.ssim_mean:.4f}, p5 {s.ssim_p5:.4f}, p95 {s.ssim_p95:.4f}, PSNR {s.psnr:.2f} dB |"
                )
            m = result.mean_image
            rows.append(
                f"| decoder | mean image (baseline) | | | SSIM mean {m.ssim_mean:.4f}, p5 {m.ssim_p5:.4f}, "
                f"p95 {m.ssim_p95:.4f}, PSNR {m.psnr:.2f} dB |"
            )

    load_after = os.getloadavg()
    print(f"\ntotal {time.perf_counter() - started:.0f} s; load average after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}\n")
    print("| attack | model | epochs run (best) | s/epoch | test result |")
    print("| --- | --- | --- | --- | --- |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
