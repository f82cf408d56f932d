"""Distance correlation: time and peak memory, ours against the `dcor` package.

    python benchmarks/bench_dcor.py            # the full table (n up to 60,000; 30-60 min on 2 shared cores)
    python benchmarks/bench_dcor.py --quick    # n ≤ 2,000, a minute or two

Every case runs in its own subprocess, so "peak RSS" is that process's ``ru_maxrss``: the
honest peak of everything it held, the input arrays included (listed separately). The `dcor`
package runs under an address-space limit (``--dcor-limit-gb``) so that its O(n² · d)
broadcast fails with MemoryError instead of taking the machine down; "fails" in the table
means that. It is tried at every n up to ``--dcor-max-n`` (default 10,000; beyond that the
broadcast alone is stated in GB instead of generating the data only to watch it fail). Data: X uniform in [0, 1) (images), Z = ReLU(X W + noise) (activations), float32,
seeded. The package gets the same arrays in float64.

Cost model: dCor needs the two n × n distance matrices, 2 n² (d + k) flops when computed in
full; ours computes the upper triangle only, n² (d + k) flops. "achieved" is the latter
divided by the time, against this machine's matrix-multiply rate measured in the same
subprocess just before the pass, with tiles of our shape (the physical limit; the machine is
shared, so it moves); "effective" uses the full-matrix count. "cpu s" is the user + system CPU
time of the pass: on a 2-core machine it can reach 2 × wall; far less means other processes
held the cores. The load average at the start of each case is recorded beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

GIB = 1 << 30


# --------------------------------------------------------------------------- child side


def _data(n: int, d: int, k: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.random((n, d), dtype=np.float32)
    w = rng.standard_normal((d, k), dtype=np.float32) / np.float32(np.sqrt(d))
    z = np.empty((n, k), dtype=np.float32)
    for start in range(0, n, 4_096):  # in blocks, so no n × k temporary inflates the peak
        block = x[start : start + 4_096] @ w
        block += np.float32(0.3) * rng.standard_normal(block.shape, dtype=np.float32)
        z[start : start + 4_096] = np.maximum(block, 0)
    return x, z


def _gemm_rates(width: int, repeats: int = 5) -> dict[str, float]:
    """Best-of-``repeats`` matrix-multiply rate (GFLOP/s) for tiles of our shape, 1024 × width."""
    import torch

    out = {}
    for name, dtype in (("float64", torch.float64), ("float32", torch.float32)):
        a = torch.randn(1024, width, dtype=dtype)
        b = torch.randn(1024, width, dtype=dtype)
        best = 0.0
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(3):
                torch.mm(a, b.T)
            best = max(best, 3 * 2 * 1024 * 1024 * width / (time.perf_counter() - start))
        out[name] = best / 1e9
    return out


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _child(task: dict) -> dict:
    kind = task["kind"]
    if kind == "gemm":
        return _gemm_rates(task["width"])
    n, d, k = task["n"], task["d"], task["k"]
    if kind == "dcor":
        limit = int(task["limit_gb"] * GIB)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        try:
            import dcor

            x, z = _data(n, d, k)
            x, z = x.astype("float64"), z.astype("float64")
            start, cpu = time.perf_counter(), _cpu_s()
            value = float(dcor.distance_correlation(x, z))
            return {"seconds": time.perf_counter() - start, "cpu_s": _cpu_s() - cpu, "dcor": value, "peak_mb": _peak_mb()}
        except MemoryError:
            return {"error": f"MemoryError under a {task['limit_gb']:g} GB limit", "peak_mb": _peak_mb()}
    if kind == "ours":
        from leakaudit.metrics.dcor import distance_correlation_stats

        x, z = _data(n, d, k)
        data_mb = (x.nbytes + z.nbytes) / 2**20
        # The machine is shared: measure the physical limit right before the pass it bounds.
        gemm = _gemm_rates(d + k, repeats=3)[task["precision"]]
        start, cpu = time.perf_counter(), _cpu_s()
        stats = distance_correlation_stats(x, z, pvalue="t-test", precision=task["precision"])
        seconds = time.perf_counter() - start
        return {
            "gemm_gflops": gemm,
            "seconds": seconds,
            "cpu_s": _cpu_s() - cpu,
            "dcor": stats.dcor,
            "dcor_u2": stats.dcor_u2,
            "pvalue": stats.pvalue,
            "peak_mb": _peak_mb(),
            "data_mb": data_mb,
        }
    if kind == "projection":
        from leakaudit.metrics.dcor import distance_correlation_projection

        x, z = _data(n, d, k)
        start = time.perf_counter()
        stats = distance_correlation_projection(x, z, num_projections=task["projections"], seed=task["seed"])
        return {"seconds": time.perf_counter() - start, "dcor": stats.dcor, "dcor_u2": stats.dcor_u2, "peak_mb": _peak_mb()}
    raise ValueError(kind)


# --------------------------------------------------------------------------- parent side


def _targets(rows: list) -> None:
    """The targets of issue 4, each checked against this run's rows."""
    print()
    print("Targets (issue 4), from the rows above:")
    compared = [(n, d, k, pkg["seconds"] / o64["seconds"]) for n, d, k, o64, _, pkg in rows
                if "seconds" in pkg and "seconds" in o64]
    if compared:
        worst = min(compared, key=lambda row: row[3])
        print(f"- >= 10x faster than the dcor package wherever it runs ({len(compared)} row(s)): worst "
              f"{worst[3]:.0f}x at n={worst[0]:,}, d={worst[1]:,}, k={worst[2]:,} -> {'met' if worst[3] >= 10 else 'NOT met'}")
    else:
        print("- >= 10x faster than the dcor package: the package ran at no size -> not measurable")
    for n, d, k, o64, _, _ in rows:
        if n != 60_000:
            continue
        if "seconds" not in o64:
            print(f"- n=60,000, d={d:,}, k={k:,}: {o64.get('error', '?')} -> NOT met")
            continue
        limit_s = 180 if (d, k) == (784, 400) else 900 if k == 8_192 else None
        memory_ok = o64["peak_mb"] * 2**20 < 4e9
        line = f"- n=60,000, d={d:,}, k={k:,} exact: peak {o64['peak_mb'] / 1024:.2f} GiB (< 4 GB: {'met' if memory_ok else 'NOT met'})"
        if limit_s is not None:
            line += (f", {o64['seconds']:.0f} s (< {limit_s} s: {'met' if o64['seconds'] < limit_s else 'NOT met'}; "
                     f"load {o64.get('load', 0):.1f}, cpu {o64.get('cpu_s', 0):.0f} s)")
        print(line)


def _run(task: dict, timeout: float) -> dict:
    load = os.getloadavg()[0]
    result = _run_child(task, timeout)
    result["load"] = load
    return result


def _run_child(task: dict, timeout: float) -> dict:
    env = dict(os.environ)
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "--child", json.dumps(task)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": f"exit {proc.returncode}: {tail[:120]}"}
    return json.loads(lines[-1])


def _fmt_time(result: dict) -> str:
    return f"{result['seconds']:.2f}" if "seconds" in result else "fails"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="n ≤ 2,000 only, one projection case")
    parser.add_argument("--dcor-limit-gb", type=float, default=16.0, help="address-space limit of the dcor package")
    parser.add_argument("--dcor-max-n", type=int, default=10_000, help="largest n at which the dcor package is tried")
    parser.add_argument("--f32-max-n", type=int, default=10_000,
                        help="largest n for the float32 variant (float64, the exact default, runs at every n)")
    parser.add_argument("--timeout", type=float, default=5_400, help="seconds per case before it is recorded as timed out")
    parser.add_argument("--no-projection", action="store_true", help="skip the random-projection table")
    parser.add_argument("--sizes", help="comma-separated n to run instead of the default list")
    parser.add_argument("--series", help="comma-separated d:k pairs instead of 784:400,1024:8192")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(json.loads(args.child))), flush=True)
        return

    import torch

    sizes = [1_000, 2_000] if args.quick else [1_000, 2_000, 5_000, 10_000, 60_000]
    if args.sizes:
        sizes = [int(v) for v in args.sizes.split(",")]
    series = [(784, 400), (1_024, 8_192)]
    if args.series:
        series = [tuple(int(v) for v in pair.split(":")) for pair in args.series.split(",")]
    print(f"machine: {os.cpu_count()} CPUs, {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / GIB:.0f} GiB, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.1f} at start; "
          f"started {time.strftime('%Y-%m-%d %H:%M:%S')}", flush=True)
    gemm = {width: _run({"kind": "gemm", "width": width}, 600) for width in sorted({d + k for d, k in series})}
    for width, rates in gemm.items():
        print(f"matrix multiply 1024 × {width} tiles: float64 {rates['float64']:.0f} GFLOP/s, "
              f"float32 {rates['float32']:.0f} GFLOP/s", flush=True)

    rows = []
    for d, k in series:
        for n in sizes:
            ours64 = _run({"kind": "ours", "n": n, "d": d, "k": k, "precision": "float64"}, args.timeout)
            ours32 = (
                _run({"kind": "ours", "n": n, "d": d, "k": k, "precision": "float32"}, args.timeout)
                if n <= args.f32_max_n
                else {"error": "not run"}
            )
            package = (
                _run({"kind": "dcor", "n": n, "d": d, "k": k, "limit_gb": args.dcor_limit_gb}, args.timeout)
                if n <= args.dcor_max_n
                else {"error": f"not run: its n×n×{max(d, k)} broadcast alone is {n * n * max(d, k) * 8 / GIB:,.0f} GiB"}
            )
            rows.append((n, d, k, ours64, ours32, package))
            print(json.dumps({"n": n, "d": d, "k": k, "ours64": ours64, "ours32": ours32, "dcor": package}), flush=True)

    print()
    print("| n | d | k | load | dcor pkg s | dcor pkg peak MB | ours f64 s (cpu s) | ours f32 s | speed-up f64 | ours f64 peak MB "
          "(data MB) | achieved f64 GFLOP/s (GEMM rate just before) | effective 2n²(d+k) | |Δ dCor| vs pkg | f32 rel. err |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, d, k, o64, o32, pkg in rows:
        limit = o64.get("gemm_gflops", gemm[d + k]["float64"])
        if "seconds" in o64:
            achieved = n * n * (d + k) / o64["seconds"] / 1e9
            rate = f"{achieved:.0f} ({limit:.0f})"
            effective = f"{2 * achieved:.0f}"
            memory = f"{o64['peak_mb']:,.0f} ({o64['data_mb']:,.0f})"
        else:
            rate = effective = memory = o64.get("error", "?")
        speedup = f"{pkg['seconds'] / o64['seconds']:.0f}×" if "seconds" in pkg and "seconds" in o64 else "–"
        delta = f"{abs(pkg['dcor'] - o64['dcor']):.1e}" if "dcor" in pkg and "dcor" in o64 else "–"
        rel32 = f"{abs(o32['dcor'] - o64['dcor']) / o64['dcor']:.1e}" if "dcor" in o32 and "dcor" in o64 else "–"
        pkg_time = _fmt_time(pkg) if "seconds" in pkg else pkg.get("error", "fails")
        pkg_mem = f"{pkg['peak_mb']:,.0f}" if "peak_mb" in pkg else "–"
        cpu = f" ({o64['cpu_s']:.1f})" if "cpu_s" in o64 else ""
        o32_time = _fmt_time(o32) if "seconds" in o32 else o32.get("error", "fails")
        print(f"| {n:,} | {d:,} | {k:,} | {o64.get('load', 0):.1f} | {pkg_time} | {pkg_mem} | {_fmt_time(o64)}{cpu} | "
              f"{o32_time} | {speedup} | {memory} | {rate} | {effective} | {delta} | {rel32} |")
    _targets(rows)
    print()
    print("| n | d | k | dCor | bias-corrected dCor² | t-test p |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n, d, k, o64, _, _ in rows:
        if "dcor" in o64:
            print(f"| {n:,} | {d:,} | {k:,} | {o64['dcor']:.6f} | {o64['dcor_u2']:.6f} | {o64['pvalue']:.2g} |")

    if not args.no_projection:
        print()
        print("Random projections (Huang & Huo 2017) against the exact values, d = 784, k = 400:")
        print()
        print("| n | projections | seed | time s | exact f64 s | dCor | exact dCor | Δ dCor | dCor² (u) | exact | Δ dCor² (u) |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        exact = {r[0]: r[3] for r in rows if r[1] == 784}
        for n in [m for m in ([max(sizes)] if args.quick else [5_000, 10_000, 60_000]) if m in exact]:
            ref = exact.get(n, {})
            for projections in (50, 200) if n < 60_000 and not args.quick else (50,):
                for seed in (0,) if args.quick else (0, 1):
                    res = _run({"kind": "projection", "n": n, "d": 784, "k": 400, "projections": projections, "seed": seed}, args.timeout)
                    if "dcor" not in res or "dcor" not in ref:
                        print(f"| {n:,} | {projections} | {seed} | {res.get('error', '?')} | | | | | | | |")
                        continue
                    print(
                        f"| {n:,} | {projections} | {seed} | {res['seconds']:.1f} | {ref['seconds']:.1f} | {res['dcor']:.4f} | "
                        f"{ref['dcor']:.4f} | {res['dcor'] - ref['dcor']:+.4f} | {res['dcor_u2']:.4f} | {ref['dcor_u2']:.4f} | "
                        f"{res['dcor_u2'] - ref['dcor_u2']:+.4f} |",
                        flush=True,
                    )
    print()
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
