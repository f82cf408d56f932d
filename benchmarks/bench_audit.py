"""Time to a verdict: a whole ``leakaudit audit`` in seconds and in reference epochs, per stage.

The audit is issue 19's: LeNet-5 split at ``conv3``, trained for the public task, hardened with
Scrunch's centre loss (λ 0.9) and audited against the model as trained (so every attack and
metric runs on two stores), with the attacks' default budgets unless ``--classifier-epochs`` /
``--decoder-epochs`` cut them. Fashion-MNIST's training images (``--rows`` of them) when the
Debian package is installed, else digits.

A wall time says as much about the machine and its load as about the audit, so the audit's
cost is also given in **reference epochs**: one epoch (batch 64, Adam 1e-3, MSE) over as many
rows as the store's attacker-train role holds, of the fixed network

    Linear(k → 16·8·8) – ReLU – Unflatten – Upsample×2 – Conv3×3(16→16) – ReLU – Upsample×2
    – Conv3×3(16→C) – Sigmoid           (32×32 outputs, random Z of the store's width k)

timed in this process just before and just after the audit (both printed; the mean is the
unit). That unit does not move when leakaudit's own networks change, and a loaded machine
slows it about as much as it slows the audit.

Per stage: the audit reports progress as ``(description, done, total)`` (one description per
trained model: ``dump``, each classifier head, each decoder, ...); the time between two
progress calls is charged to the later call's description, within the phase it belongs to
(harden, the hardened model's store, the baseline's), except that what runs after a pipeline
step's last call (a refit, scoring, writing its files) is charged to that last description.
What follows the audit's last call (the report, the HTML page) is the ``report`` stage. The one-minute load average is printed beside it all.

Usage::

    python benchmarks/bench_audit.py --rows 20000                   # default budgets (hours on 2 cores)
    python benchmarks/bench_audit.py --rows 20000 --classifier-epochs 40 --decoder-epochs 15
    python benchmarks/bench_audit.py --quick                        # digits, tiny budgets: a check that it runs
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

FASHION = "/usr/share/datasets/fashion-mnist"
GROUPS = Path(__file__).resolve().parent.parent / "examples" / "fashion-groups.yaml"


def reference_epoch(rows: int, width: int, channels: int, *, seed: int = 0) -> float:
    """Seconds of one reference epoch over ``rows`` random (Z, X) pairs (see the module docstring)."""
    import torch
    from torch import nn

    generator = torch.Generator().manual_seed(seed)
    z = torch.rand(rows, width, generator=generator)
    x = torch.rand(rows, channels, 32, 32, generator=generator)
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Linear(width, 16 * 8 * 8), nn.ReLU(), nn.Unflatten(1, (16, 8, 8)),
        nn.Upsample(scale_factor=2), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.Upsample(scale_factor=2), nn.Conv2d(16, channels, 3, padding=1), nn.Sigmoid(),
    )  # fmt: skip
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    order = torch.randperm(rows, generator=generator)
    start = time.perf_counter()
    for i in range(0, rows, 64):
        batch = order[i : i + 64]
        optimizer.zero_grad(set_to_none=True)
        nn.functional.mse_loss(net(z[batch]), x[batch]).backward()
        optimizer.step()
    return time.perf_counter() - start


class StageClock:
    """Charges the time between progress calls to the later call's (phase, description)."""

    def __init__(self, phases: list[str], unit: float | None = None) -> None:
        self.phases = phases
        self.unit = unit
        self.began = time.perf_counter()
        self.phase = 0
        self.last = time.perf_counter()
        self.previous: str | None = None
        self.first: str | None = None
        self.seconds: dict[tuple[str, str], float] = defaultdict(float)

    def __call__(self, description: str, done: float, total: float | None) -> None:
        now = time.perf_counter()
        # A phase ends where its first step (after the dump) comes back: the next store's steps
        # run in the same order, and its dump may be a cache hit that reports nothing. Only the
        # first step counts, since a later one may come back within the phase (successive
        # halving returns to the decoder it kept).
        moved = description != self.previous
        if self.previous is not None and moved:
            self.report(self.previous)
        again = moved and description == self.first
        if (again or (description == "dump" and self.previous not in (None, "dump"))) and self.phase + 1 < len(self.phases):
            self.phase += 1
            self.first = None
        if self.first is None and description != "dump":
            self.first = description
        self.seconds[(self.phases[self.phase], description)] += now - self.last
        self.last, self.previous = now, description

    def boundary(self) -> None:
        """Charge what ran since the last progress call to the previous description.

        Called where a pipeline step starts or ends: that time was the step's tail (a refit,
        scoring, writing), not the next step's.
        """
        if self.previous is not None:
            now = time.perf_counter()
            self.seconds[(self.phases[self.phase], self.previous)] += now - self.last
            self.last = now

    def timed(self, run_step: Any) -> Any:
        """``pipeline.run_step`` wrapped so that each step's start and end are boundaries."""

        def wrapped(step: Any, *args: Any, **kwargs: Any) -> Any:
            self.boundary()
            try:
                return run_step(step, *args, **kwargs)
            finally:
                self.boundary()

        return wrapped

    def report(self, stage: str) -> None:
        """Print a stage's running total as the audit moves on from it (a long run shows where it is)."""
        if self.unit is None:
            return
        key = (self.phases[self.phase], stage)
        seconds = self.seconds.get(key, 0.0)
        print(f"[{time.perf_counter() - self.began:7.0f} s, load {os.getloadavg()[0]:.1f}] {key[0]} / {stage}: "
              f"{seconds:.1f} s = {seconds / self.unit:.1f} reference epochs so far", flush=True)  # fmt: skip

    def finish(self) -> None:
        if self.previous is not None:
            self.report(self.previous)
        self.seconds[(self.phases[self.phase], "report")] += time.perf_counter() - self.last


def run(args: argparse.Namespace) -> None:
    import torch

    from leakaudit import pipeline
    from leakaudit.audit import AuditConfig, DumpSection, ModelSection, run_audit
    from leakaudit.models import ModelSpec
    from leakaudit.pipeline import step
    from leakaudit.registry import ATTACKS
    from leakaudit.store import open_store
    from leakaudit.train import TrainSettings, train

    quick = args.quick
    fashion = Path(args.fashion_dir).is_dir() and not quick
    data = f"idx:{args.fashion_dir}" if fashion else "digits"
    public = f"map:{GROUPS}" if fashion else "parity"
    rows = None if quick else args.rows
    classifier: dict[str, Any] = {"task": "private", "head": "best"}
    decoder: dict[str, Any] = {"arch": args.decoder}
    if args.classifier_epochs or quick:
        classifier["epochs"] = args.classifier_epochs or 3
    if args.decoder_epochs or quick:
        decoder["epochs"] = args.decoder_epochs or 1
    harden = {"method": "center-loss", "lambda": 0.9, "lr": 3e-3, "patience": 10}
    if args.harden_epochs or quick:
        harden["epochs"] = args.harden_epochs or 2
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        folder = Path(tmp)
        started = time.perf_counter()
        trained = train(TrainSettings(model=ModelSpec("lenet5"), data=data, output=folder / "lenet5.safetensors",
                                      task=("public", public), epochs=2 if quick else args.train_epochs, lr=3e-3,
                                      patience=8, limit=rows))  # fmt: skip
        train_s = time.perf_counter() - started
        print(f"trained the public-task model in {train_s:.0f} s", flush=True)
        config = AuditConfig(
            model=ModelSection(spec="lenet5", weights=str(folder / "lenet5.safetensors"), num_classes=trained.num_classes),
            layer="conv3", data=data, tasks={"public": public, "private": "label"},
            dump=DumpSection(limit=rows), attacks=(step(ATTACKS, "classifier", classifier), step(ATTACKS, "decoder", decoder)),
            harden=harden, cache=str(folder / "cache"),
        )  # fmt: skip
        # The unit needs the attacker-train rows and the width of Z: dump the unhardened model
        # first, into the audit's cache, where the audit finds it for its baseline store (so
        # this dump's time is charged to that store).
        started = time.perf_counter()
        probe = run_audit_dump(config, folder)
        baseline_dump_s = time.perf_counter() - started
        with open_store(probe) as store:
            train_rows, width = len(store.rows("attacker-train")), _prod(store.layer_shape)
            channels = store.input_shape[0] if store.input_shape else 1
        torch.manual_seed(0)
        load_before = os.getloadavg()[0]
        unit_before = reference_epoch(train_rows, width, channels)
        print(f"reference epoch before the audit: {unit_before:.2f} s over {train_rows:,} rows of width {width} "
              f"(load {load_before:.1f}); stages as they finish, in that unit:", flush=True)  # fmt: skip
        clock = StageClock(["harden", "hardened store", "baseline store"], unit=unit_before)
        pipeline.run_step = clock.timed(pipeline.run_step)
        started = time.perf_counter()
        result = run_audit(config, folder / "audit", force=True, progress=clock)
        clock.finish()
        clock.seconds[("baseline store", "dump (before the audit, reused from its cache)")] += baseline_dump_s
        audit_s = time.perf_counter() - started
        load_after = os.getloadavg()[0]
        unit_after = reference_epoch(train_rows, width, channels)
    unit = (unit_before + unit_after) / 2
    print(f"lenet5 at conv3 on {data}, {rows or 'all'} rows ({train_rows:,} attacker-train, Z width {width}); "
          f"classifier {classifier}, decoder {decoder}, harden {harden}; {os.cpu_count()} cores, "
          f"load average {load_before:.1f} before, {load_after:.1f} after; training the model: {train_s:.0f} s")  # fmt: skip
    print(f"reference epoch: {unit_before:.2f} s before the audit, {unit_after:.2f} s after (unit: {unit:.2f} s)")
    audit_s += baseline_dump_s
    print(f"audit: {audit_s:.0f} s = **{audit_s / unit:.0f} reference epochs** (with the baseline's dump); "
          f"headline: {', '.join(f'{k} {v:.3f}' for k, v in sorted(result.metrics.items()) if isinstance(v, float) and not k.endswith('_ci95'))}")  # fmt: skip
    print("\n| phase | stage | s | reference epochs |\n|---|---|---:|---:|")
    for (phase, stage), seconds in clock.seconds.items():
        print(f"| {phase} | {stage} | {seconds:.1f} | {seconds / unit:.1f} |")


def _prod(shape: tuple[int, ...]) -> int:
    out = 1
    for n in shape:
        out *= n
    return out


def run_audit_dump(config: Any, folder: Path) -> Path:
    """Dump the unhardened model once into the audit's cache (the audit reuses it as its baseline store)."""
    from leakaudit.audit import _dump_kwargs
    from leakaudit.dump_cache import cache_dir, cached_dump

    path, _ = cached_dump(_dump_kwargs(config, config.model, config.layer), cache_dir(config.cache), None, None)
    return Path(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20000, help="Fashion-MNIST training images to use (default 20000)")
    parser.add_argument("--classifier-epochs", type=int, default=None, help="cut the classifier heads' budget (default: the attack's)")
    parser.add_argument("--decoder-epochs", type=int, default=None, help="cut the decoders' budget (default: the attack's)")
    parser.add_argument("--decoder", default="best", help="decoder arch (default best: all three)")
    parser.add_argument("--harden-epochs", type=int, default=None, help="Scrunch fine-tuning epochs (default: harden's)")
    parser.add_argument("--train-epochs", type=int, default=10, help="epochs of the public-task model (default 10)")
    parser.add_argument("--fashion-dir", default=FASHION, help=f"folder of the Fashion-MNIST idx files (default {FASHION})")
    parser.add_argument("--quick", action="store_true", help="digits and tiny budgets: a check that the script runs")
    parser.add_argument("--tmp", default=None, help="folder for the temporary stores")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
