"""The attacker-independent bounds beside the attacks they bound, undefended and defended.

LeNet-5 split after ``conv3`` (Scrunch's setting, as in ``benchmarks/RESULTS-recipes.md``):
the pre-trained model and five hardened ones (centre loss λ 0.9, NoPeek α 1, Shredder,
gaussian-noise at two σ with clipping) are dumped with ``leakaudit dump``; each store gets
``leakaudit metrics --only bayes-risk,fisher-leakage``, the classifier attack on the private
task retrained with ``--seeds N`` (its interval covers test rows and training seeds) and the
``upsample`` decoder. This script only runs those commands and turns their JSON into the
Markdown of ``benchmarks/RESULTS-bounds.md``.

Usage::

    python benchmarks/bench_bounds.py --data digits                  # .bench/bounds/digits
    python benchmarks/bench_bounds.py --data fashion --limit 20000   # Debian's Fashion-MNIST
    python benchmarks/bench_bounds.py --data fashion --limit 20000 --seeds 1 --decoders randomised \
        --decoder-epochs 15 --raw-reference first                    # what RESULTS-bounds.md ran
    python benchmarks/bench_bounds.py --data digits --report-only    # re-read existing outputs
    python benchmarks/bench_bounds.py --data digits --quick          # 2 epochs everywhere: a check that it runs

A step whose output exists is not run again (delete it to redo it), so an interrupted run
resumes. Commands run with ``OMP_NUM_THREADS=1`` (see RESULTS-recipes.md: on this shared
2-core machine a LeNet-5 step took 7 ms with one thread and 395 ms with two while another
process held a core).
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
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FASHION_DIR = "/usr/share/datasets/fashion-mnist"
GROUPS = "map:examples/fashion-groups.yaml"

# (name, harden arguments); None is the pre-trained model, dumped at conv3.
DEFENCES: list[tuple[str, list[str] | None]] = [
    ("undefended", None),
    ("center-loss λ 0.9", ["--method", "center-loss", "--lambda", "0.9", "--lr", "3e-3", "--patience", "10"]),
    ("nopeek α 1", ["--method", "nopeek", "--alpha", "1", "--lr", "1e-3", "--patience", "10"]),
    ("shredder", ["--method", "shredder", "--lr", "1e-3"]),
    ("gaussian-noise σ 0.5, C 6", ["--method", "gaussian-noise", "--sigma", "0.5", "--clip", "6", "--lr", "1e-3",
                                   "--patience", "6"]),
    ("gaussian-noise σ 2, C 6", ["--method", "gaussian-noise", "--sigma", "2", "--clip", "6", "--lr", "1e-3",
                                 "--patience", "6"]),
]


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.replace("λ", "lambda").replace("α", "alpha")
                   .replace("σ", "sigma")).strip("-").replace("--", "-")


def dataset(args: argparse.Namespace) -> dict[str, Any]:
    if args.data == "digits":
        return {"data": ["--data", "digits"], "public": "public=parity", "classes": "2", "batch": ["--batch-size", "64"],
                "train": ["--epochs", "30", "--lr", "3e-3", "--patience", "8"], "harden_epochs": "40"}
    return {"data": ["--data", f"idx:{args.fashion_dir}", "--limit", str(args.limit)], "public": f"public={GROUPS}",
            "classes": "4", "batch": [], "train": ["--epochs", "30"], "harden_epochs": "30"}


RANDOMISED = ("shredder", "gaussian-noise σ 0.5, C 6", "gaussian-noise σ 2, C 6")


def plan(args: argparse.Namespace, out: Path) -> list[tuple[Path, list[str]]]:
    """(output that marks the step done, leakaudit arguments), in order: the cheap steps first.

    Every model is trained or hardened, dumped and bounded before any attack runs, then the
    classifier attacks, then the decoders, so that an interrupted run has the bound column of
    every store.
    """
    d = dataset(args)
    tasks = ["--task", d["public"], "--task", "private=label"]
    quick = ["--epochs", "2"] if args.quick else []
    weights = out / "lenet5.safetensors"
    prepare: list[tuple[Path, list[str]]] = [
        (weights, ["train", "lenet5", *d["data"], "--task", d["public"], *d["batch"], *d["train"], *quick,
                   "-o", str(weights)]),
    ]
    classify: list[tuple[Path, list[str]]] = []
    decode: list[tuple[Path, list[str]]] = []
    for name, harden in DEFENCES:
        store = out / f"{slug(name)}.h5"
        if harden is None:
            prepare.append((store, ["dump", "lenet5", "--weights", str(weights), "--num-classes", d["classes"],
                                    "--layer", "conv3", *d["data"], *tasks, "--seed", "0", "-o", str(store)]))
        else:
            folder = out / slug(name)
            prepare.append((folder / "harden.json", [
                "harden", "lenet5", "--weights", str(weights), "--num-classes", d["classes"], "--layer", "conv3",
                *d["data"], *tasks, *d["batch"], *harden, "--epochs", d["harden_epochs"], *quick,
                "--no-evaluate", "-o", str(folder)]))
            prepare.append((store, ["dump", str(folder / "encoder.pt2"), "--layer", "output", *d["data"], *tasks,
                                    "--seed", "0", "-o", str(store)]))
        stem = out / slug(name)
        prepare.append((stem.with_suffix(".bounds.json"), ["metrics", str(store), "--only", "bayes-risk,fisher-leakage",
                                                           "--json", str(stem.with_suffix(".bounds.json"))]))
        raw = ["--set", "raw_reference=false"] if args.raw_reference == "first" and harden is not None else []
        classify.append((stem.with_suffix(".classifier.json"), [
            "attack", str(store), "--classifier", "--task", "private", "--seeds", str(args.seeds), *raw, *quick,
            "--json", str(stem.with_suffix(".classifier.json"))]))
        if args.decoders == "all" or name in RANDOMISED:
            decode.append((stem.with_suffix(".decoder.json"), [
                "attack", str(store), "--decoder", "upsample", "--epochs",
                "2" if args.quick else str(args.decoder_epochs), "--json", str(stem.with_suffix(".decoder.json"))]))
    return prepare + classify + decode


def run(steps: list[tuple[Path, list[str]]], log: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    leakaudit = str(Path(sys.executable).with_name("leakaudit"))
    with log.open("a") as handle:
        for done, argv in steps:
            if done.exists():
                continue
            shown = shlex.join(["leakaudit", *argv])
            print(f"$ {shown}  (load {os.getloadavg()[0]:.1f})", flush=True)
            handle.write(f"$ {shown}  (load {os.getloadavg()[0]:.1f})\n")
            handle.flush()
            started = time.perf_counter()
            proc = subprocess.run([leakaudit, *argv], cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)
            seconds = time.perf_counter() - started
            handle.write(f"# exit {proc.returncode}, {seconds:.0f} s\n")
            handle.flush()
            print(f"  exit {proc.returncode}, {seconds:.0f} s", flush=True)
            if proc.returncode != 0:
                raise SystemExit(f"step failed (exit {proc.returncode}); see {log}")


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def _cell(value: Any, interval: Any = None, spec: str = ".4g", scale: float = 1.0) -> str:
    """``value`` (times ``scale``) in ``spec``, with its interval ``[lo, hi]`` beside it when it has one."""
    if not isinstance(value, (int, float)):
        return "—"
    text = f"{scale * value:{spec}}"
    if isinstance(interval, list) and len(interval) == 2 and all(isinstance(v, (int, float)) for v in interval):
        text += f" [{scale * interval[0]:{spec}}, {scale * interval[1]:{spec}}]"
    return text


def _pct(value: Any, interval: Any = None) -> str:
    return _cell(value, interval, ".1f", 100.0)


def _num(value: Any, interval: Any = None, digits: int = 4) -> str:
    return _cell(value, interval, f".{digits}g")


def row(out: Path, name: str) -> dict[str, Any]:
    """The numbers of one store, from the report its three commands merged into (STORE.report.json)."""
    stem = out / slug(name)
    report = _load(stem.with_suffix(".report.json"))
    metrics = report.get("metrics", {})
    classifier = report.get("results", {}).get("attack:classifier", {})
    harden = _load(stem / "harden.json")
    trained = _load((out / "lenet5.safetensors").with_suffix(".json")).get("trained", {})
    public = harden["runs"][0]["public_accuracy"] if harden.get("runs") else trained.get("public_accuracy")
    names = ("private_accuracy", "bayes_risk_knn", "private_accuracy_bound", "dfil", "mse_bound", "mse", "ssim_p95")
    return {
        "name": name,
        "public_accuracy": public,
        **{key: metrics.get(key) for name_ in names for key in (name_, f"{name_}_ci95")},
        "head": classifier.get("best_head"),
        "per_seed": [s["metrics"].get("private_accuracy") for s in classifier.get("per_seed", [])],
        "checks": [c.get("message") for c in report.get("checks", [])],
    }


def table(rows: list[dict[str, Any]], seeds: int) -> str:
    lines = [
        f"| run | public acc | private acc, classifier attack, {seeds} seeds [95 %] (head) | per seed "
        "| `bayes_risk_knn` [95 %] | `private_accuracy_bound` [95 %] | `dfil` | `mse_bound` = 1/dFIL "
        "| decoder MSE [95 %] | decoder SSIM p95 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        dfil = _num(r["dfil"]) if isinstance(r["dfil"], (int, float)) else "undefined (deterministic encoder)"
        head = f" ({r['head']})" if r["head"] else ""
        seeds_text = " / ".join(_pct(v) for v in r["per_seed"]) or "—"
        lines.append(
            f"| {r['name']} | {_pct(r['public_accuracy'])} | {_pct(r['private_accuracy'], r['private_accuracy_ci95'])}{head} "
            f"| {seeds_text} | {_pct(r['bayes_risk_knn'], r['bayes_risk_knn_ci95'])} "
            f"| {_pct(r['private_accuracy_bound'], r['private_accuracy_bound_ci95'])} | {dfil} | {_num(r['mse_bound'], digits=3)} "
            f"| {_num(r['mse'], r['mse_ci95'], digits=3)} | {_num(r['ssim_p95'], digits=3)} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=["digits", "fashion"], default="digits")
    parser.add_argument("--fashion-dir", default=FASHION_DIR, help="folder of the Fashion-MNIST idx files")
    parser.add_argument("--limit", type=int, default=20000, help="Fashion-MNIST: first N rows of the training file")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds of the classifier attack")
    parser.add_argument("--decoder-epochs", type=int, default=40)
    parser.add_argument("--raw-reference", choices=["all", "first"], default="all",
                        help="first: only the undefended store's classifier trains the raw-X reference (it depends on "
                             "the data alone; the others would read it from the cache, unless it was trained before "
                             "the cache existed)")
    parser.add_argument("--decoders", choices=["all", "randomised"], default="all",
                        help="randomised: the decoder only where dFIL is defined (Shredder, gaussian-noise)")
    parser.add_argument("--out", type=Path, help="default .bench/bounds/DATA (.bench/quick/bounds-DATA with --quick)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    out = args.out or (ROOT / ".bench" / ("quick" if args.quick else "bounds") / (
        f"bounds-{args.data}" if args.quick else args.data))
    out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        run(plan(args, out), out / "commands.log")
    rows = [row(out, name) for name, _ in DEFENCES]
    print(table(rows, args.seeds))
    for r in rows:
        for check in r["checks"]:
            print(f"check ({r['name']}): {check}")
    (out / "rows.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
