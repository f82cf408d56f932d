"""The exact distance correlation split across ranks under real `torchrun` subprocesses (gloo).

Each rank computes its tiles' partial sums and one float64 all-reduce adds them, so only the
order of float64 additions differs from one process: the statistics must agree to 1e-12
(measured here: 7e-15 on 700 rows, 21 tiles, 2 ranks).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from leakaudit.metrics.dcor import distance_correlation_stats
from leakaudit.store import open_store
from tests.torchrun import needs_torchrun

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = Path(sys.executable).with_name("torchrun")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

TOLERANCE = 1e-12
#: 700 rows in 128-row tiles: 6 row blocks, 21 tiles — an odd count, so ranks get unequal shares.
SETTINGS = ("--set", "dcor.block_size=128", "--set", "dcor.pvalue=t-test")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """``leakaudit dump lenet5 --layer conv3 --data digits --limit 700`` (random weights)."""
    from leakaudit.dump import DumpSettings, dump

    path = tmp_path_factory.mktemp("distributed-dcor") / "digits-conv3.h5"
    dump(DumpSettings(model="lenet5", layer="conv3", data="digits", output=path, limit=700, tasks=(("label", "label"),)))
    return path


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _torchrun(*args: str | os.PathLike, nproc: int) -> tuple[int, str, str]:
    command = [str(TORCHRUN), "--standalone", f"--nproc-per-node={nproc}", "-m", "leakaudit", *map(str, args)]
    process = subprocess.Popen(
        command, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = process.communicate(timeout=300)
    finally:
        if process.poll() is None:  # the test failed or timed out: end what it started
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    return process.returncode, out, err


def _single_process(store: Path, device: str = "cpu"):
    with open_store(store) as handle:
        return distance_correlation_stats(
            handle.file["inputs"], handle.file["activations"], pvalue="t-test", block_size=128, device=device
        )


@needs_torchrun
@pytest.mark.parametrize("nproc", [2, 3])
def test_torchrun_dcor_equals_single_process_dcor_and_only_rank_0_writes(store, tmp_path, nproc):
    json_out, report = tmp_path / "dcor.json", tmp_path / "report.json"
    code, out, err = _torchrun(
        "metrics", store, "--only", "dcor", *SETTINGS, "--json", json_out, "--report", report, nproc=nproc
    )
    assert code == 0, err
    assert out.count("merged into") == 1, out  # rank 0 speaks for the group
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dcor.json", "report.json"]
    result = json.loads(json_out.read_text())["results"]["dcor"]
    assert result["details"]["world_size"] == nproc
    alone = _single_process(store)
    assert 0.3 < alone.dcor < 1.0  # a real dependence, not a degenerate 0 or 1
    assert abs(result["dcor"] - alone.dcor) <= TOLERANCE
    assert abs(result["dcor_u2"] - alone.dcor_u2) <= TOLERANCE
    assert result["details"]["statistic"] == pytest.approx(alone.statistic, rel=1e-9)
    assert json.loads(report.read_text())["metrics"]["dcor"] == result["dcor"]


@pytest.mark.cuda
@needs_cuda
def test_dcor_on_cuda_equals_the_cpu(store):
    gpu, cpu = _single_process(store, "cuda"), _single_process(store, "cpu")
    assert abs(gpu.dcor - cpu.dcor) <= TOLERANCE and abs(gpu.dcor_u2 - cpu.dcor_u2) <= TOLERANCE


@needs_torchrun
@pytest.mark.cuda
@needs_cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (nccl, one rank per GPU)")
def test_torchrun_dcor_on_two_gpus_equals_single_process(store, tmp_path):
    json_out = tmp_path / "dcor.json"
    code, _, err = _torchrun(
        "metrics", store, "--only", "dcor", *SETTINGS, "--set", "dcor.device=cuda", "--json", json_out,
        "--report", tmp_path / "report.json", nproc=2,
    )  # fmt: skip
    assert code == 0, err
    result = json.loads(json_out.read_text())["results"]["dcor"]
    assert abs(result["dcor"] - _single_process(store).dcor) <= TOLERANCE
