"""How a dump writes and runs: direct page writes, the forward's tuning, threads, preprocessing."""

from __future__ import annotations

import errno
import os
import threading
import time

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from leakaudit.cli import app
from leakaudit.data import Preprocess, resize
from leakaudit.dump import MAX_WORKERS, DumpSettings, Tuning, dump, tune_forward
from leakaudit.errors import ConfigError, StoreError
from leakaudit.models import LeNet5
from leakaudit.store import StoreWriter, open_store
from leakaudit.store.writer import PAGE, _DirectWriter


def _writer(path, n, input_shape, layer_shape, dtype="float32", compression=None, output_shape=None):
    return StoreWriter(
        path,
        n=n,
        input_shape=input_shape,
        layer_shape=layer_shape,
        dtype=dtype,
        labels={"label": (np.arange(n) % 3, ["a", "b", "c"], "label")},
        index=np.arange(n),
        split=np.zeros(n, dtype=np.uint8),
        attrs={"layer": "x"},
        fingerprint={"test": 1},
        output_shape=output_shape,
        compression=compression,
    )


def _direct_io_works(folder) -> bool:
    """Whether this file system takes O_DIRECT writes (tmpfs on older kernels does not)."""
    probe = folder / "probe"
    probe.write_bytes(b"")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_DIRECT)
    except (AttributeError, OSError):
        return False
    try:
        buffer = np.zeros(2 * PAGE, dtype=np.uint8)
        start = (-buffer.ctypes.data) % PAGE
        os.pwrite(fd, buffer[start : start + PAGE], 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        probe.unlink()


# Row sizes that are not multiples of the page (12, 20, 7 × 4 bytes), uneven batches, an
# activation dtype the writer must not send as raw bytes (float64 into float16 storage).
@pytest.mark.parametrize("direct", [True, False], ids=["direct", "through-hdf5"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_rows_written_in_uneven_batches_read_back_exactly(tmp_path, monkeypatch, direct, dtype):
    if not direct:
        monkeypatch.setattr(_DirectWriter, "open", classmethod(lambda cls, path: None))
    n = 1_003
    rng = np.random.default_rng(0)
    inputs = rng.random((n, 3, 1, 1), dtype=np.float32)
    acts = rng.standard_normal((n, 5), dtype=np.float32).astype(dtype)
    outs = rng.standard_normal((n, 7), dtype=np.float32)
    writer = _writer(tmp_path / "s.h5", n, (3, 1, 1), (5,), dtype=dtype, output_shape=(7,))
    start = 0
    for size in [1, 2, 341, 256, 3, 400]:
        stop = min(n, start + size)
        z = acts[start:stop]
        if dtype == "float16" and size == 3:
            z = z.astype(np.float64)  # converted by HDF5, not written as bytes
        writer.write(start, inputs[start:stop], z, outs[start:stop])
        start = stop
    assert start == n
    if direct and _direct_io_works(tmp_path):
        assert writer._direct, "O_DIRECT works on this file system: the writer should use it"
    writer.checkpoint(n)
    path = writer.finish()
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["inputs"][()], inputs)
        np.testing.assert_array_equal(f["activations"][()], acts)
        np.testing.assert_array_equal(f["outputs"][()], outs)
        np.testing.assert_array_equal(f["labels/label"][()], np.arange(n) % 3)
        for name in ("inputs", "activations", "outputs"):
            assert f[name].id.get_offset() % PAGE == 0, f"{name} should start on a page boundary"


def test_channels_last_rows_are_stored_in_row_order(tmp_path):
    z = torch.randn(70, 4, 3, 5).contiguous(memory_format=torch.channels_last)
    x = np.random.default_rng(1).random((70, 1, 2, 2), dtype=np.float32)
    writer = _writer(tmp_path / "s.h5", 70, (1, 2, 2), (4, 3, 5))
    writer.write(0, x[:33], z[:33].numpy())
    writer.write(33, x[33:], z[33:].numpy())
    path = writer.finish()
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["activations"][()], z.contiguous().numpy())
        np.testing.assert_array_equal(f["inputs"][()], x)


def test_compressed_store_is_written_through_hdf5(tmp_path):
    x = np.random.default_rng(2).random((50, 1, 4, 4), dtype=np.float32)
    z = np.random.default_rng(3).random((50, 6), dtype=np.float32)
    writer = _writer(tmp_path / "s.h5", 50, (1, 4, 4), (6,), compression="gzip")
    writer.write(0, x, z)
    assert not writer._direct
    with h5py.File(writer.finish(), "r") as f:
        assert f["activations"].compression == "gzip"
        np.testing.assert_array_equal(f["activations"][()], z)


def test_direct_write_refused_by_the_file_system_falls_back(tmp_path, monkeypatch):
    real_pwrite = os.pwrite

    def refusing(fd, data, offset):
        if fd == writer._direct.direct_fd:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    n = 3 * PAGE // 4  # one input row is 4 bytes: three pages of inputs, whole pages go direct
    x = np.random.default_rng(4).random((n, 1, 1, 1), dtype=np.float32)
    z = np.random.default_rng(5).random((n, 2), dtype=np.float32)
    writer = _writer(tmp_path / "s.h5", n, (1, 1, 1), (2,))
    if not _direct_io_works(tmp_path):
        pytest.skip("this file system does not take O_DIRECT writes")
    writer.write(0, x[:10], z[:10])  # opens the direct writer
    assert writer._direct
    monkeypatch.setattr(os, "pwrite", refusing)
    writer.write(10, x[10:], z[10:])
    assert writer._direct is False  # given up for the rest of the store
    monkeypatch.setattr(os, "pwrite", real_pwrite)
    with h5py.File(writer.finish(), "r") as f:
        np.testing.assert_array_equal(f["inputs"][()], x)
        np.testing.assert_array_equal(f["activations"][()], z)


def test_no_space_for_the_store_is_one_clear_error(tmp_path, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    with pytest.raises(StoreError, match="not enough free disk space"):
        _writer(tmp_path / "s.h5", 10_000, (1, 32, 32), (120,))
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind


# --------------------------------------------------------------------------- forward tuning


def test_tuning_explicit_format_and_threads_run_no_trial():
    model = LeNet5().eval()
    calls = []

    def encoder(x):
        calls.append(x.shape)
        return model(x)

    example = torch.rand(8, 1, 32, 32)
    tuning = tune_forward(model, encoder, example, "channels_last", threads=1)
    assert tuning == Tuning("channels_last", 1) and calls == []
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    tuning = tune_forward(model, encoder, example, "contiguous")
    assert tuning == Tuning("contiguous", torch.get_num_threads()) and calls == []


def test_tuning_auto_times_every_configuration_and_restores_threads():
    torch.set_num_threads(2)  # the trial runs only where there are several threads (conftest restores)
    model = LeNet5().eval()
    seen = []
    main = threading.get_ident()

    def encoder(x):
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        seen.append((channels_last, torch.get_num_threads(), threading.get_ident() == main))
        return model(x)

    before = torch.get_num_threads()
    example = torch.rand(8, 1, 32, 32)
    tuning = tune_forward(model, encoder, example, "auto")
    assert torch.get_num_threads() == before
    later = []
    thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert later == [before]  # threads started after the trial get torch's count, not the pool's
    # The format is a rule (a timing would change the bits between runs): channels_last for a
    # convolutional model.
    assert tuning.memory_format == "channels_last"
    # Only the passes at once are timed, each pass with the same share of the cores (the same
    # numbers): where there are several cores, one pass per core side by side in worker threads
    # against one pass here.
    passes = min(before, MAX_WORKERS)
    share = before // passes
    shapes = {(share, True)} | ({(share, False)} if before > 1 else set())
    assert {(threads, here) for _, threads, here in seen} == shapes
    assert (tuning.threads, tuning.workers) in {(share, 1), (share, passes)}
    # Each configuration: one warm-up and the same number of timed rounds (×workers passes).
    counts = {}
    for config in seen:
        counts[config] = counts.get(config, 0) + 1
    per_pass = {config: count // (1 if config[2] else passes) for config, count in counts.items()}
    assert len(set(per_pass.values())) == 1


def test_trial_keeps_side_by_side_passes_within_the_margin():
    from leakaudit.dump import WORKERS_MARGIN
    from leakaudit.dump.tuning import _choose

    shapes = [(1, 2), (1, 1)]
    assert _choose({(1, 2): 1.2, (1, 1): 1.0}, shapes) == (1, 2)
    slow = 1.0 * WORKERS_MARGIN * 1.1
    assert _choose({(1, 2): slow, (1, 1): 1.0}, shapes) == (1, 1)


def test_trial_times_each_pass_with_the_preprocessing_it_will_do():
    torch.set_num_threads(2)  # the trial runs only where there are several threads (conftest restores)
    model = LeNet5().eval()
    made, fed = [], []

    def prepare():
        x = torch.rand(8, 1, 32, 32)
        made.append(x)
        return x

    def encoder(x):
        fed.append(x)
        return model(x)

    tune_forward(model, encoder, torch.rand(8, 1, 32, 32), "auto", prepare=prepare)
    # Every timed pass ran on a freshly prepared input (in the format being timed).
    assert len(made) == len(fed) > 0
    assert all(torch.equal(a, b) for a, b in zip(made, fed))


def test_workers_write_the_same_store_in_order_whatever_order_batches_finish(tmp_path, monkeypatch):
    import random

    import leakaudit.dump.pipeline as pipeline_module

    # One memory format for both: the trial could pick different kernels (bits) otherwise.
    base = dict(model="lenet5", layer="conv3", data="digits", limit=700, batch_size=32, tasks=(("label", "label"),),
                memory_format="contiguous")
    serial = dump(DumpSettings(**base, output=tmp_path / "serial.h5", threads=1, workers=1))
    assert serial.workers == 1
    # Batches finish in a scrambled order: each pass sleeps a random time before its forward.
    pad, rng, order = pipeline_module._pad, random.Random(0), []

    def slow_pad(x, fixed_batch):
        time.sleep(rng.random() * 0.02)
        order.append(threading.get_ident())
        return pad(x, fixed_batch)

    monkeypatch.setattr(pipeline_module, "_pad", slow_pad)
    checkpoints = []
    real_checkpoint = StoreWriter.checkpoint

    def checkpoint(self, rows_done):
        checkpoints.append(rows_done)
        return real_checkpoint(self, rows_done)

    monkeypatch.setattr(StoreWriter, "checkpoint", checkpoint)
    progress = []
    parallel = dump(DumpSettings(**base, output=tmp_path / "parallel.h5", workers=3), on_progress=lambda d, n: progress.append(d))
    assert parallel.workers == 3 and parallel.threads == max(1, torch.get_num_threads() // 3)
    assert len(set(order)) == 3  # three threads ran forward passes
    assert progress == sorted(progress) and progress[-1] == 700
    assert checkpoints == sorted(checkpoints)
    with open_store(tmp_path / "serial.h5") as a, open_store(tmp_path / "parallel.h5") as b:
        for name in ("inputs", "activations", "index", "split"):
            assert np.array_equal(a.read(name), b.read(name)), name
        assert b.attrs["workers"] == 3


def test_workers_are_refused_where_passes_cannot_overlap(tmp_path):
    with pytest.raises(ConfigError, match="--workers 2: this forward pass cannot run in several threads at once "
                                          r"\(--with-outputs records the split layer with a forward hook\)"):
        dump(DumpSettings(model="lenet5", layer="conv3", data="digits", output=tmp_path / "o.h5", with_outputs=True,
                          workers=2, tasks=(("label", "label"),)))  # fmt: skip
    assert not any(tmp_path.iterdir())
    with pytest.raises(ConfigError, match="--workers must be positive"):
        DumpSettings(model="lenet5", layer="conv3", data="digits", output="x.h5", workers=0)


def test_dump_restores_torch_threads_and_records_its_choice(tmp_path):
    before = torch.get_num_threads()
    out = tmp_path / "s.h5"
    report = dump(DumpSettings(model="lenet5", layer="conv3", data="digits", output=out, limit=600, batch_size=64,
                               tasks=(("label", "label"),), threads=1))  # fmt: skip
    assert torch.get_num_threads() == before
    assert report.threads == 1
    assert report.wait_reader_s >= 0 and report.forward_s > 0 and report.reader_cpu_s > 0
    with open_store(out) as store:
        assert store.attrs["threads"] == 1


def test_cpu_passes_preprocess_their_own_batches_and_a_bad_later_image_loses_nothing(tmp_path, monkeypatch):
    from leakaudit.errors import DataError
    from leakaudit.store import partial_path

    # On a CPU the reader only reads; each forward pass resizes its batch in its own thread.
    threads_resizing = set()
    images = Preprocess.images

    def spy(self, block):
        threads_resizing.add(threading.current_thread().name)
        return images(self, block)

    monkeypatch.setattr(Preprocess, "images", spy)
    out = tmp_path / "s.h5"
    report = dump(DumpSettings(model="lenet5", layer="conv3", data="digits", output=out, limit=600, batch_size=64,
                               tasks=(("label", "label"),), workers=2, memory_format="contiguous"))  # fmt: skip
    assert report.preprocess_s > 0
    assert "leakaudit-reader" not in threads_resizing
    assert {"MainThread", "leakaudit-forward-1"} <= threads_resizing
    # A float image out of [0, 1] in a later batch: refused where it is preprocessed, the
    # error reaches the caller, and no store (complete or partial) is left.
    x = np.random.default_rng(0).random((300, 1, 32, 32), dtype=np.float32)
    x[250, 0, 3, 3] = 2.0
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(300) % 3)
    bad = tmp_path / "bad.h5"
    with pytest.raises(DataError, match=r"float images must lie in \[0, 1\]; found values in \[.*, 2\]"):
        dump(DumpSettings(model="lenet5", layer="conv3", data=f"npz:{tmp_path / 'd.npz'}", output=bad, batch_size=32,
                          tasks=(("label", "y"),), workers=2, memory_format="contiguous"))  # fmt: skip
    assert not bad.exists() and not partial_path(bad).exists()


def test_threads_must_be_positive():
    with pytest.raises(ConfigError, match="--threads must be positive"):
        DumpSettings(model="lenet5", layer="conv3", data="digits", output="x.h5", threads=0)


def test_cli_threads_option(tmp_path):
    from typer.testing import CliRunner

    out = tmp_path / "s.h5"
    result = CliRunner().invoke(app, ["dump", "lenet5", "--layer", "conv3", "--data", "digits", "--limit", "100",
                                      "--threads", "1", "-o", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "1 thread)" in result.output
    result = CliRunner().invoke(app, ["dump", "lenet5", "--layer", "conv3", "--data", "digits", "--threads", "-2",
                                      "-o", str(tmp_path / "t.h5")])  # fmt: skip
    assert result.exit_code == 2 and "--threads must be positive" in result.output
    assert not (tmp_path / "t.h5").exists()
    result = CliRunner().invoke(app, ["dump", "lenet5", "--layer", "conv3", "--data", "digits", "--limit", "100",
                                      "--workers", "2", "--threads", "1", "-o", str(tmp_path / "w.h5")])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "2 workers × 1 thread)" in result.output
    result = CliRunner().invoke(app, ["dump", "lenet5", "--layer", "conv3", "--data", "digits", "--with-outputs",
                                      "--workers", "2", "-o", str(tmp_path / "v.h5")])  # fmt: skip
    assert result.exit_code == 2 and "cannot run in several threads at once" in result.output
    assert not (tmp_path / "v.h5").exists() and not (tmp_path / "v.h5.partial").exists()


# --------------------------------------------------------------------------- preprocessing


def test_gray_to_rgb_after_resizing_equals_before():
    block = np.random.default_rng(6).integers(0, 256, size=(9, 1, 28, 28), dtype=np.uint8)
    ours = Preprocess(input_size=(32, 32), in_chans=3).images(block)
    x = torch.from_numpy(block).float().div_(255.0).expand(-1, 3, -1, -1)
    reference = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False, antialias=True).clamp_(0.0, 1.0)
    assert ours.shape == (9, 3, 32, 32) and ours.is_contiguous()
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("shape", "size"),
    [((5, 1, 28, 28), (32, 32)), ((4, 1, 8, 8), (32, 32)), ((3, 3, 32, 32), (28, 28)),
     ((2, 3, 17, 40), (64, 23)), ((2, 1, 64, 64), (100, 80)), ((2, 3, 120, 90), (32, 32))],
)
@pytest.mark.parametrize("dtype", ["uint8", "float32"])
def test_resize_equals_interpolate(shape, size, dtype):
    # Small images go through matrix products, large ones through interpolate; both must give
    # interpolate's bilinear antialiased image of the [0, 1] input.
    rng = np.random.default_rng(7)
    block = rng.integers(0, 256, size=shape, dtype=np.uint8) if dtype == "uint8" else rng.random(shape, dtype=np.float32)
    ours = Preprocess(input_size=size, in_chans=shape[1]).images(block)
    x = torch.from_numpy(block).float()
    if dtype == "uint8":
        x = x / 255.0
    reference = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True).clamp_(0.0, 1.0)
    assert ours.shape == reference.shape
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("n_in", "n_out"), [(28, 32), (8, 32), (1, 5), (17, 64), (32, 28), (40, 23), (5, 5)])
def test_two_tap_rows_rebuild_the_resize_operator(n_in, n_out):
    from leakaudit.data.preprocessing import _resize_operator, _two_taps

    operator = _resize_operator(n_in, n_out)
    taps = _two_taps(n_in, n_out)
    if n_out < n_in:  # antialiased reduction: wider filters, the matrix product path
        assert taps is None
        return
    first, second, w_first, w_second = taps
    rebuilt = torch.zeros(n_out, n_in)
    rows = torch.arange(n_out)
    rebuilt[rows, first] += w_first.flatten()
    rebuilt[rows, second] += w_second.flatten()
    torch.testing.assert_close(rebuilt, operator, rtol=0, atol=0)


def test_resize_of_one_pixel_wide_images():
    # interpolate's antialiased bilinear mode returns wrong values for width-1 inputs
    # (torch 2.14: every output equals the first input); the matrix path must not inherit that.
    column = torch.arange(6.0).view(1, 1, 6, 1) / 5.0
    ours = resize(column, (8, 1))
    wide = F.interpolate(column.expand(1, 1, 6, 2), size=(8, 2), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(ours, wide[..., :1], rtol=0, atol=1e-6)
    assert len(torch.unique(ours)) == 8
