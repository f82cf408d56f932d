"""Running ``torchrun`` in tests: a clean environment, its own session, and cleanup on failure."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")

#: Tests that start real ``torchrun`` subprocesses: ``pytest -m torchrun`` selects them
#: (``-m "not torchrun"`` leaves them out); without torchrun beside this Python they skip, visibly.
TORCHRUN_MARKS = [
    pytest.mark.torchrun,
    pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed beside this Python"),
]


def needs_torchrun(test):
    """Decorate a test with :data:`TORCHRUN_MARKS`."""
    for mark in TORCHRUN_MARKS:
        test = mark(test)
    return test


def torchrun_env() -> dict[str, str]:
    """This environment without a surrounding group's variables, one thread per rank."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def torchrun(*args: str | os.PathLike, nproc: int = 2, module: bool = True) -> subprocess.Popen:
    """``torchrun --standalone`` (a free port of its own) in a session of its own, so a failed test can end it."""
    entry = ["-m", "leakaudit"] if module else []
    command = [str(TORCHRUN), "--standalone", f"--nproc-per-node={nproc}", *entry, *map(str, args)]
    return subprocess.Popen(
        command, cwd=ROOT, env=torchrun_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def finish(process: subprocess.Popen, timeout: float = 600) -> tuple[str, str]:
    """Wait for ``process``; if the test failed or timed out, kill everything it started."""
    try:
        return process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
