"""Shared fixtures: small real models, real stores written to temporary directories."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from leakaudit.cli import app
from tests.attacks import _build as attacks_build
from tests.attacks import _dump as attacks_dump
from tests.attacks import train_lenet_on_digits as attacks_train

# Two cores: keep torch from oversubscribing them when pytest runs helper threads.
SESSION_THREADS = max(1, min(2, os.cpu_count() or 1))
torch.set_num_threads(SESSION_THREADS)


class Cli:
    """Runs ``leakaudit`` in-process and returns the click Result (stdout and stderr apart)."""

    def __init__(self) -> None:
        self.runner = CliRunner()

    def __call__(self, *args: str | os.PathLike):
        return self.runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def cli() -> Cli:
    return Cli()


def error_line(result) -> str:
    """The single ``Error: …`` line a failed command printed on stderr."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, f"expected one error line, got stderr: {result.stderr!r}"
    return lines[0]


@pytest.fixture(scope="session")
def digits_store(tmp_path_factory) -> Path:
    """LeNet-5 (random init, seed 0) cut at conv3 over all of digits, public parity / private label."""
    from leakaudit.dump import DumpSettings, dump

    path = tmp_path_factory.mktemp("stores") / "digits-conv3.h5"
    dump(
        DumpSettings(
            model="lenet5",
            layer="conv3",
            data="digits",
            output=path,
            tasks=(("public", "parity"), ("private", "label")),
            with_outputs=True,
        )
    )
    return path


@pytest.fixture
def npz_source(tmp_path) -> Path:
    """A small npz data source with RGB uint8 images, labels and an extra attribute array."""
    rng = np.random.default_rng(0)
    path = tmp_path / "tiny.npz"
    np.savez(
        path,
        x=rng.integers(0, 256, size=(60, 12, 12, 3), dtype=np.uint8),
        y=np.repeat(np.arange(3), 20),
        smiling=np.tile([0, 1], 30),
    )
    return path


# --------------------------------------------------------------------------- attack stores
# Built once per session (and cached across modules by tests.attacks._build).


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``)."""
    from tests.attacks import single_thread

    with single_thread():
        yield


@pytest.fixture(scope="session")
def trained_digits_store(tmp_path_factory) -> Path:
    def make() -> Path:
        directory = tmp_path_factory.mktemp("trained-lenet")
        with_random_weights = attacks_dump(directory / "random-pool2.h5", "pool2")
        weights = attacks_train(with_random_weights, directory / "lenet5-digits.safetensors")
        return attacks_dump(directory / "trained-pool2.h5", "pool2", weights=weights)

    return attacks_build("trained", make)


@pytest.fixture(scope="session")
def noise_store(tmp_path_factory, trained_digits_store) -> Path:
    def make() -> Path:
        path = tmp_path_factory.mktemp("noise") / "noise-pool2.h5"
        shutil.copyfile(trained_digits_store, path)
        with h5py.File(path, "r+") as f:
            z = f["activations"]
            z[...] = np.random.default_rng(123).standard_normal(z.shape).astype(z.dtype)
        from leakaudit.store import record_checksums

        record_checksums(path)  # a deliberate edit: the store vouches for the noise
        return path

    return attacks_build("noise", make)


@pytest.fixture(scope="session")
def small_digits_store(tmp_path_factory) -> Path:
    """300 digits rows through random-init LeNet-5 at ``conv3`` (120×1×1): cheap CLI runs."""
    return attacks_build("small", lambda: attacks_dump(tmp_path_factory.mktemp("small") / "small-conv3.h5", "conv3", limit=300))


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """Every test ends with the session's torch thread count, whatever it or a module-scoped
    fixture set (a module fixture runs before this one, so the count at a test's start may
    already be another's): the dump's tuning trials depend on it.
    """
    yield
    if torch.get_num_threads() != SESSION_THREADS:
        torch.set_num_threads(SESSION_THREADS)


@pytest.fixture(autouse=True, scope="session")
def _no_user_cache(tmp_path_factory):
    """Nothing the suite runs reads or fills the user's cache, session fixtures included."""
    before = os.environ.get("LEAKAUDIT_CACHE")
    os.environ["LEAKAUDIT_CACHE"] = str(tmp_path_factory.mktemp("session-cache"))
    yield
    if before is None:
        os.environ.pop("LEAKAUDIT_CACHE", None)
    else:
        os.environ["LEAKAUDIT_CACHE"] = before


@pytest.fixture(autouse=True)
def _raw_references_forgotten(tmp_path_factory, monkeypatch):
    """Each test trains its own raw-X references (the classifier shares them within a process and on disk)."""
    from leakaudit.attacks import classifier_raw

    monkeypatch.setenv("LEAKAUDIT_CACHE", str(tmp_path_factory.mktemp("cache")))
    classifier_raw.clear()
    yield
    classifier_raw.clear()
