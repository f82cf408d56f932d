"""Issue 16: every attacker tier against an undefended LeNet-5, per split layer, with the tool's own commands.

Trains LeNet-5 on a data set's public task with ``leakaudit train`` (parity; private task: the
class), dumps each layer with ``leakaudit dump``, and runs, with ``leakaudit attack --json``:
the decoder trained on all attacker pairs and on 1 % of them (``--leaked 0.01``), the white-box
``inversion`` and the black-box ``substitute``. Prints a Markdown table of SSIM mean / p95 and
PSNR per tier with the mean-image floor, the seconds each took and the load average.

    python benchmarks/bench_threats.py --data digits --out /tmp/threats
    python benchmarks/bench_threats.py --data idx:/usr/share/datasets/fashion-mnist --limit 6000 --out /tmp/threats-f

Extra attack settings go through ``--set-TIER KEY=VALUE`` (e.g. ``--set-decoder epochs=30``);
the table states every setting that differs from the defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

LAYERS = ("conv1", "pool1", "conv2", "pool2", "conv3")
TIERS = ("decoder", "inversion", "substitute")


def leakaudit(*args: str) -> str:
    exe = Path(sys.executable).with_name("leakaudit")
    done = subprocess.run([str(exe), *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"leakaudit {' '.join(args)} failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="digits")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--layers", default=",".join(LAYERS))
    parser.add_argument("--tiers", default=",".join(TIERS))
    parser.add_argument("--model", default=None, help="weights to attack (default: train LeNet-5 here)")
    parser.add_argument("--num-classes", default=None, help="classes of --model's head (as dump's --num-classes)")
    parser.add_argument("--store-suffix", default="", help="name suffix of the stores (one folder, several models)")
    parser.add_argument("--out", type=Path, required=True)
    for tier in TIERS:
        parser.add_argument(f"--set-{tier}", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    limit = ["--limit", str(args.limit)] if args.limit else []
    tasks = ["--task", "public=parity", "--task", "private=label"]
    weights = args.model
    if weights is None:
        weights = str(args.out / "lenet5.safetensors")
        if not Path(weights).exists():
            leakaudit("train", "lenet5", "--data", args.data, "--task", "public=parity", "-o", weights, *limit)
    rows = []
    for layer in args.layers.split(","):
        store = args.out / f"{layer}{args.store_suffix}.h5"
        if not store.exists():
            classes = ["--num-classes", args.num_classes] if args.num_classes else []
            leakaudit("dump", "lenet5", "--weights", weights, *classes, "--layer", layer, "--data", args.data, *tasks, *limit,
                      "-o", str(store))
        for tier in args.tiers.split(","):
            sets = [x for kv in getattr(args, f"set_{tier}") for x in ("--set", kv)]
            extra = ["--leaked", "0.01"] if tier == "decoder" else []
            start, load = time.perf_counter(), os.getloadavg()[0]
            out = leakaudit("attack", str(store), "--attack", tier, *extra, *sets, "--json", "-", "--report", str(args.out / "scratch.json"), "--force")
            seconds = time.perf_counter() - start
            result = json.loads(out)
            floor = result.get("mean_image") or {}
            points = [(tier, result)] if tier != "decoder" else []
            if tier == "decoder":
                for point in result.get("leaked", []):
                    label = "decoder (all pairs)" if point["share"] == 1.0 else f"decoder ({point['share']:.0%} pairs)"
                    points.append((label, point))
            for label, r in points:
                rows.append((layer, label, r.get("ssim_mean", (r.get("scores") or {}).get("ssim_mean")),
                             r.get("ssim_p95", (r.get("scores") or {}).get("ssim_p95")),
                             r.get("psnr", (r.get("scores") or {}).get("psnr")), floor.get("ssim_mean"),
                             seconds, load, " ".join(getattr(args, f"set_{tier}"))))  # fmt: skip
            (args.out / "scratch.json").unlink(missing_ok=True)
            print(f"{layer} {tier}: {seconds:.0f} s", file=sys.stderr, flush=True)
    print("| layer | attacker | SSIM mean | SSIM p95 | PSNR dB | mean-image SSIM mean | s (whole attack) | load | settings |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for layer, label, m, p95, psnr, floor, s, load, settings in rows:
        f = lambda v, d=3: "—" if v is None else f"{v:.{d}f}"  # noqa: E731
        print(f"| {layer} | {label} | {f(m)} | {f(p95)} | {f(psnr, 2)} | {f(floor)} | {s:.0f} | {load:.1f} | {settings or 'defaults'} |")
    shutil.rmtree(args.out / "tmp", ignore_errors=True)


if __name__ == "__main__":
    main()
