"""Run the benchmarks one after another, each in its own process, and summarise.

    python benchmarks/run_all.py                  # dcor, ssim, dump at full size (an hour or more on 2 cores)
    python benchmarks/run_all.py --quick          # the same at small sizes: a few minutes
    python benchmarks/run_all.py --all            # also the attacks and recipes benchmarks (hours)
    python benchmarks/run_all.py --only ssim,dump # a subset, by name
    make bench                                    # the first line; `make bench BENCH_ARGS=--quick`

The benchmarks run in turn, never side by side: on a 2-core machine two of them at once would
each time the other. Every benchmark prints its own Markdown table; this script streams it to
the terminal, keeps a copy in ``--logs`` (default ``.bench/run_all/NAME.log``) and ends with
one line per benchmark: its command, exit status, wall time and the load average before and
after (the machine may be shared; the load says how much of it each number had). The tables
recorded in ``benchmarks/RESULTS*.md`` are copied from such logs, by hand, with the command.

``attacks`` and ``recipes`` train models for tens of minutes to hours and have their own
results files (RESULTS-attacks.md, RESULTS-recipes.md); they run only with ``--all`` or
``--only``. With ``--quick`` they run on a few thousand rows for an epoch or two: a check that
the scripts work, not a result.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# name -> (script, extra arguments for a full run, extra arguments for --quick)
BENCHMARKS: dict[str, tuple[str, list[str], list[str]]] = {
    "dcor": ("bench_dcor.py", [], ["--quick"]),
    "ssim": ("bench_ssim.py", [], ["--quick"]),
    "dump": ("bench_dump.py", [], ["--quick"]),
    "attacks": ("bench_attacks.py", ["--threads", "1", "--classifier-epochs", "10", "--decoder-epochs", "2"], ["--quick"]),
    "recipes": ("bench_recipes.py", [], ["--quick"]),
}
DEFAULT = ("dcor", "ssim", "dump")


def _load() -> float:
    return os.getloadavg()[0]


def run_one(name: str, quick: bool, logs: Path) -> dict:
    script, full_args, quick_args = BENCHMARKS[name]
    argv = [sys.executable, str(HERE / script), *(quick_args if quick else full_args)]
    shown = shlex.join(["python", f"benchmarks/{script}", *argv[2:]])
    log = logs / f"{name}{'-quick' if quick else ''}.log"
    print(f"\n=== {name}: {shown}  (load average {_load():.1f})", flush=True)
    load_before, started = _load(), time.perf_counter()
    with log.open("w") as handle:
        handle.write(f"$ {shown}\n")
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            handle.write(line)
        code = proc.wait()
    return {
        "name": name,
        "command": shown,
        "code": code,
        "seconds": time.perf_counter() - started,
        "load_before": load_before,
        "load_after": _load(),
        "log": log,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: checks the scripts in a few minutes")
    parser.add_argument("--all", action="store_true", help="also run the attacks and recipes benchmarks")
    parser.add_argument("--only", help=f"comma-separated subset of {', '.join(BENCHMARKS)}")
    parser.add_argument("--logs", type=Path, default=ROOT / ".bench" / "run_all", help="folder for one log per benchmark")
    args = parser.parse_args()

    if args.only:
        names = [name.strip() for name in args.only.split(",") if name.strip()]
        unknown = [name for name in names if name not in BENCHMARKS]
        if unknown:
            parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    else:
        names = list(BENCHMARKS) if args.all else list(DEFAULT)
    args.logs.mkdir(parents=True, exist_ok=True)

    print(f"{os.cpu_count()} CPUs; load average {_load():.1f}; running {', '.join(names)}"
          f"{' (quick)' if args.quick else ''}; logs in {args.logs}", flush=True)
    results = [run_one(name, args.quick, args.logs) for name in names]

    print("\n| benchmark | command | exit | wall s | load before → after | log |")
    print("|---|---|---:|---:|---|---|")
    for r in results:
        print(f"| {r['name']} | `{r['command']}` | {r['code']} | {r['seconds']:.0f} | "
              f"{r['load_before']:.1f} → {r['load_after']:.1f} | {r['log']} |")
    failed = [r["name"] for r in results if r["code"] != 0]
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
