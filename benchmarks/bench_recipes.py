"""The hardening recipes on Fashion-MNIST, measured end to end with the tool's own commands.

LeNet-5 split after its third convolution (``conv3``, 120 features), as in the Scrunch paper.
Public task: the coarse grouping of ``examples/fashion-groups.yaml`` (tops / full-length /
footwear / bags); private task: the 10 labels. Every number comes from ``leakaudit train``
and ``leakaudit harden`` (which dumps each model with ``leakaudit.dump``, attacks it with the
classifier attack — and with ``--decoder`` the decoder attack — and measures dCor and the
intra-class distance with ``leakaudit.metrics``); this script only runs the commands and
turns their ``harden.json`` into the Markdown of ``benchmarks/RESULTS-recipes.md``.

Usage::

    python benchmarks/bench_recipes.py                  # --limit 20000 (the stated subset)
    python benchmarks/bench_recipes.py --limit 60000    # the whole training file (slow on 2 cores)
    python benchmarks/bench_recipes.py --report-only    # re-read existing outputs
    python benchmarks/bench_recipes.py --quick          # digits train + center loss, 2 epochs, in .bench/quick

Commands run with ``OMP_NUM_THREADS=1``: on this shared 2-core machine a LeNet-5 training step
took 7 ms with one thread and 395 ms with two while another process held a core.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FASHION = "idx:/usr/share/datasets/fashion-mnist"
GROUPS = "map:examples/fashion-groups.yaml"


def digits_commands(out: Path) -> dict[str, list[str]]:
    """The same on scikit-learn's digits (public parity): what the slow acceptance test runs."""
    base = out / "lenet5-parity.safetensors"
    common = ["harden", "lenet5", "--weights", str(base), "--num-classes", "2", "--layer", "conv3",
              "--data", "digits", "--task", "public=parity", "--task", "private=label", "--batch-size", "64",
              "--force"]
    return {
        "digits-train": ["train", "lenet5", "--data", "digits", "--task", "public=parity", "--epochs", "30",
                         "--lr", "3e-3", "--batch-size", "64", "--patience", "8", "-o", str(base), "--force"],
        "digits-center-loss": [*common, "--method", "center-loss", "--sweep", "lambda=0.5,0.7,0.9,0.99",
                               "--epochs", "40", "--lr", "3e-3", "--patience", "10", "-o", str(out / "digits-center-loss")],
        "digits-nopeek": [*common, "--method", "nopeek", "--sweep", "alpha=1,3,10", "--epochs", "40", "--lr", "1e-3",
                          "--decoder", "--decoder-arch", "upsample", "-o", str(out / "digits-nopeek")],
        "digits-shredder": [*common, "--method", "shredder", "--evaluate", "--epochs", "40", "--attack-epochs", "40",
                            "--decoder", "--decoder-arch", "upsample", "-o", str(out / "digits-shredder")],
    }


def commands(out: Path, limit: int) -> dict[str, list[str]]:
    """The runs, in order: the pre-trained baseline, then one command per recipe."""
    base = out / "lenet5-groups.safetensors"
    data = ["--data", FASHION, "--limit", str(limit)]
    uncapped = ["harden", "lenet5", "--weights", str(base), "--num-classes", "4", "--layer", "conv3", *data,
                "--task", f"public={GROUPS}", "--task", "private=label", "--force"]
    common = [*uncapped, "--attack-epochs", "60"]
    return {
        "train": ["train", "lenet5", *data, "--task", f"public={GROUPS}", "--epochs", "30",
                  "-o", str(base), "--force"],
        "center-loss": [*common, "--method", "center-loss", "--sweep", "lambda=0.5,0.7,0.9,0.99",
                        "--epochs", "30", "--lr", "1e-3", "--keep-stores", "-o", str(out / "center-loss")],
        # The same with twice the epochs at 3× the rate: at 30 epochs λ ≥ 0.7 was still improving.
        "center-loss-long": [*common, "--method", "center-loss", "--sweep", "lambda=0.5,0.7,0.9,0.99",
                             "--epochs", "60", "--lr", "3e-3", "--patience", "10", "-o", str(out / "center-loss-long")],
        # The scale-free centre loss (third session), attacked at the default budget (no cap).
        "center-loss-relative": [*uncapped, "--method", "center-loss", "--center-scale", "relative",
                                 "--sweep", "lambda=0.5,0.7,0.9,0.99", "--epochs", "60", "--lr", "3e-3",
                                 "--patience", "10", "--keep-stores", "-o", str(out / "center-loss-relative")],
        "nopeek": [*common, "--method", "nopeek", "--sweep", "alpha=1,3,10", "--epochs", "30", "--lr", "1e-3",
                   "--decoder", "--decoder-arch", "upsample", "-o", str(out / "nopeek")],
        "shredder": [*common, "--method", "shredder", "--evaluate", "--epochs", "30", "--decoder",
                     "--decoder-arch", "upsample", "-o", str(out / "shredder")],
    }


def _quick(argv: list[str]) -> list[str]:
    """The same command with 2 epochs, 2 attack epochs and the sweep cut to its first two values."""
    out = list(argv)
    for i, arg in enumerate(out[:-1]):
        if arg in ("--epochs", "--attack-epochs"):
            out[i + 1] = "2"
        elif arg == "--sweep":
            key, values = out[i + 1].split("=", 1)
            out[i + 1] = f"{key}={','.join(values.split(',')[:2])}"
    if out[0] == "harden" and "--attack-epochs" not in out:
        out += ["--attack-epochs", "2"]
    return out


def run(name: str, argv: list[str], log: Path) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    print(f"$ leakaudit {shlex.join(argv)}", flush=True)
    started = time.perf_counter()
    with log.open("w") as handle:
        done = subprocess.run([sys.executable, "-m", "leakaudit", "--quiet", *argv], cwd=ROOT, env=env,
                              stdout=handle, stderr=subprocess.STDOUT, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{name} failed (exit {done.returncode}); see {log}")
    print(f"  {name}: {seconds:.0f} s", flush=True)
    return seconds


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def _num(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def table_markdown(harden_json: Path, *, ssim: bool) -> str:
    data = json.loads(harden_json.read_text())
    rows = data["table"]
    base = rows[0]
    header = ["run", "public acc", "normalized", "private acc (best head)", "drop", "Δ drop vs unhardened",
              "private acc (continuation)", "drop (continuation)", "dCor(X,Z)", "dCor change", "intra-class dist"]
    scatter = all(row.get("intra_class_scatter_ratio") is not None for row in rows)
    if scatter:
        header += ["within/total scatter"]
    if ssim:
        header += ["SSIM p95"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [
            row["label"],
            _pct(row["public_accuracy"]),
            _num(row["public_accuracy_normalized"]),
            f"{_pct(row['private_accuracy'])} ({row['private_head']})",
            _pct(row["private_accuracy_drop"]),
            _pct(row["private_accuracy_drop"] - base["private_accuracy_drop"]) if row is not base else "—",
            _pct(row["private_accuracy_continuation"]),
            _pct(row["private_accuracy_drop_continuation"]),
            _num(row["dcor"]),
            (f"{100 * (row['dcor'] / base['dcor'] - 1):+.1f} %" if row is not base else "—"),
            _num(row["intra_class_distance"]),
        ]
        if scatter:
            cells.append(_num(row["intra_class_scatter_ratio"]))
        if ssim:
            cells.append(_num(row.get("ssim_p95")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=20_000)
    parser.add_argument("--out", type=Path, default=Path(".bench") / "fashion",
                        help="output folder, relative to the repository root (commands run there)")
    parser.add_argument("--only", nargs="*", help="run only these steps (digits-train, digits-center-loss, …, train, center-loss, center-loss-relative, nopeek, shredder)")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: the digits training and center-loss steps, 2 epochs, in .bench/quick")
    args = parser.parse_args()
    if args.quick:
        if args.out == Path(".bench") / "fashion":
            args.out = Path(".bench") / "quick"
        args.only = args.only or ["digits-train", "digits-center-loss"]
    os.chdir(ROOT)  # the printed commands are relative to the repository root
    args.out.mkdir(parents=True, exist_ok=True)
    plan = {**digits_commands(args.out), **commands(args.out, args.limit)}
    if args.quick:
        plan = {name: _quick(argv) for name, argv in plan.items()}
    if not args.report_only:
        for name, argv in plan.items():
            if args.only and name not in args.only:
                continue
            run(name, argv, args.out / f"{name}.log")
    for name, argv in plan.items():
        path = args.out / name / "harden.json"
        if name.endswith("train") or not path.exists():
            continue
        print(f"\n### {name}\n\n`leakaudit {shlex.join(argv)}`\n")
        print(table_markdown(path, ssim="center-loss" not in name))


if __name__ == "__main__":
    main()
