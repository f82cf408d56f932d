"""Distributed dumps under real `torchrun` subprocesses (2 CPU ranks, gloo)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from leakaudit.dump import DumpSettings, dump, shard_path
from leakaudit.errors import StoreError
from leakaudit.store import open_store, partial_path, write_virtual_store
from tests.torchrun import TORCHRUN_MARKS

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
DATASETS = ("inputs", "activations", "outputs", "index", "split", "labels/label")

pytestmark = TORCHRUN_MARKS


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _args(model: str, out: Path, *extra: str, limit: int = 600, batch: int = 64) -> list[str]:
    return [
        "--quiet", "dump", model, "--layer", "features" if "tests." in model else "conv3",
        "--data", "digits", "--limit", str(limit), "--batch-size", str(batch), "--task", "label=label",
        "--with-outputs", "--memory-format", "contiguous", "-o", str(out), *extra,
    ]  # fmt: skip


def _torchrun(*args: str, nproc: int = 2, **kwargs) -> subprocess.Popen:
    command = [str(TORCHRUN), f"--nproc-per-node={nproc}", "--master-port", str(29500 + os.getpid() % 1000), "-m", "leakaudit", *args]
    return subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _single(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "leakaudit", *args], cwd=ROOT, env=_env(), capture_output=True, text=True)


def _assert_same(a: Path, b: Path) -> None:
    with h5py.File(a, "r") as x, h5py.File(b, "r") as y:
        for name in DATASETS:
            np.testing.assert_array_equal(x[name][()], y[name][()], err_msg=name)


def test_torchrun_dump_equals_single_process_dump(tmp_path):
    distributed = tmp_path / "dist.h5"
    process = _torchrun(*_args("lenet5", distributed))
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    assert out.count("wrote ") == 1  # rank 0 speaks for the group
    single = tmp_path / "single.h5"
    done = _single(*_args("lenet5", single))
    assert done.returncode == 0, done.stderr
    _assert_same(distributed, single)
    with open_store(distributed) as store:
        assert store.file["activations"].is_virtual and store.attrs["world_size"] == 2
        assert len(store) == 600
    # The store and its shards move together; a missing shard is an error, never zeros.
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.move(distributed, moved / "dist.h5")
    shutil.move(str(distributed) + ".shards", moved / "dist.h5.shards")
    _assert_same(moved / "dist.h5", single)
    (moved / "dist.h5.shards" / "rank-00001-of-00002.h5").unlink()
    with pytest.raises(StoreError, match="is missing its shard"):
        open_store(moved / "dist.h5")


def test_shards_from_different_runs_are_not_stitched(tmp_path):
    # Two shards written as rank 0 and rank 1 of runs with different seeds.
    fingerprints = []
    for rank, seed in ((0, 0), (1, 1)):
        out = tmp_path / f"run{seed}.h5"
        dump(DumpSettings(model="lenet5", layer="conv3", data="digits", output=out, limit=200, seed=seed, tasks=(("label", "label"),)))
        target = shard_path(tmp_path / "stitched.h5", rank, 2)
        target.parent.mkdir(exist_ok=True)
        shutil.copy(out, target)
        with h5py.File(target, "r+") as f:
            fingerprint = {"rows": 200, "seed": seed, "layer": "conv3"}
            f.attrs["shard_fingerprint"] = json.dumps(fingerprint, sort_keys=True)
            f.attrs["shard_rows"] = json.dumps([rank * 100, rank * 100 + 100])
            fingerprints.append(fingerprint)
    shards = [shard_path(tmp_path / "stitched.h5", r, 2) for r in range(2)]
    with pytest.raises(StoreError, match=r"shard 'rank-00001-of-00002.h5' comes from a different run \(seed differ\)"):
        write_virtual_store(tmp_path / "stitched.h5", shards, fingerprints[0], {})
    assert not (tmp_path / "stitched.h5").exists()


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@pytest.mark.slow
def test_a_rank_killed_leaves_no_complete_store_and_resume_continues_per_shard(tmp_path):
    out = tmp_path / "dist.h5"
    args = _args("tests.models_for_tests:slow", out, limit=640, batch=16)
    process = _torchrun(*args)
    journal = Path(str(partial_path(shard_path(out, 1, 2))) + ".json")
    deadline = time.time() + 180
    while time.time() < deadline and not (journal.exists() and json.loads(journal.read_text())["rows_done"] >= 32):
        time.sleep(0.2)
    workers = _children(process.pid)
    assert len(workers) == 2, "torchrun should run two workers"
    os.kill(workers[1], signal.SIGKILL)  # one rank dies mid-dump
    process.communicate(timeout=120)
    assert process.returncode != 0
    assert not out.exists(), "no store may claim to be complete"
    single_resume = _single(*args, "--resume")
    assert single_resume.returncode == 2
    assert "resume it under torchrun with --nproc-per-node=2" in single_resume.stderr
    resumed = _torchrun(*args, "--resume")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    reference = tmp_path / "single.h5"
    done = _single(*_args("tests.models_for_tests:slow", reference, limit=640, batch=16))
    assert done.returncode == 0, done.stderr
    _assert_same(out, reference)
