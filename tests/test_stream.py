"""The memory budget and the streaming reader: budgets parsed, every row once per epoch, NaN caught late."""

from __future__ import annotations

from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch

from leakaudit.errors import ConfigError, NonFiniteError
from leakaudit.store import stream
from leakaudit.store.stream import Blocks, StreamReader, epoch_order, parse_budget


def _store(tmp_path, n=203, shape=(3, 4), dtype=np.float16):
    path = tmp_path / "s.h5"
    data = np.arange(n * int(np.prod(shape)), dtype=np.float64).reshape(n, *shape) % 1000
    with h5py.File(path, "w") as f:
        f.create_dataset("activations", data=data.astype(dtype))
        f.create_dataset("inputs", data=(data / 1000).astype(np.float32))
    return SimpleNamespace(file=h5py.File(path, "r+"), path=path), data


@pytest.mark.parametrize(("text", "expected"), [("1K", 1024), ("500M", 500 << 20), ("2G", 2 << 30), ("2gb", 2 << 30),
                                                ("123", 123), ("1.5K", 1536)])
def test_budgets_parse(text, expected):
    assert parse_budget(text) == expected


def test_fraction_of_available_memory(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 100 kB\nMemAvailable:    2048 kB\n")
    assert stream.available_memory(meminfo) == 2048 * 1024
    assert parse_budget("0.5") == int(0.5 * stream.available_memory())
    assert parse_budget(None) == int(stream.DEFAULT_FRACTION * stream.available_memory())


@pytest.mark.parametrize("text", ["lots", "-1G", "0", "1.5", "0.0", "2X", "", "1G1"])
def test_malformed_budgets_are_refused(text):
    with pytest.raises(ConfigError, match="--memory-budget"):
        parse_budget(text)


def test_budget_context_sets_and_restores():
    outside = stream.memory_budget()
    with stream.budget("1K") as inner:
        assert inner == 1024 and stream.memory_budget() == 1024
    assert stream.memory_budget() == outside


def test_one_window_is_the_in_memory_order():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(epoch_order(50, g1, Blocks(10, 5)), torch.randperm(50, generator=g2))


def test_every_row_once_per_epoch_in_shuffled_slices(tmp_path):
    store, data = _store(tmp_path)
    rows = np.sort(np.random.default_rng(0).choice(len(data), 120, replace=False))
    blocks = Blocks(block_rows=7, window_blocks=3)
    reader = StreamReader(store, ["activations", "inputs"], rows, "attacker-train", blocks)
    generator = torch.Generator().manual_seed(0)
    orders = []
    for _ in range(2):
        order = epoch_order(len(rows), generator, blocks)
        bounds = [(a, min(a + 16, len(order))) for a in range(0, len(order), 16)]
        seen = []
        for positions, (z, x) in reader.batches(order, bounds):
            assert z.dtype == np.float32 and x.dtype == np.float32
            np.testing.assert_array_equal(z, data[rows[positions]].astype(np.float16).astype(np.float32))
            np.testing.assert_allclose(x, data[rows[positions]] / 1000, rtol=1e-6)
            seen.extend(positions.tolist())
        assert sorted(seen) == list(range(len(rows)))  # every row exactly once
        orders.append(seen)
    assert orders[0] != orders[1] and orders[0] != sorted(orders[0])  # shuffled, differently per epoch
    # whole blocks are read as slices (each block once per epoch, since no block is needed again later)
    assert reader.slices_read <= 2 * -(-len(rows) // 7) * 2


def test_window_keeps_rows_of_its_blocks_together():
    order = epoch_order(100, torch.Generator().manual_seed(1), Blocks(block_rows=10, window_blocks=2))
    windows = order.reshape(5, 20) // 10
    assert all(len(set(w.tolist())) == 2 for w in windows)  # each window draws from exactly two blocks


def test_nan_in_a_later_slice_is_caught(tmp_path):
    store, data = _store(tmp_path, dtype=np.float32)
    store.file["activations"][190, 1, 2] = np.nan
    reader = StreamReader(store, ["activations"], np.arange(len(data)), "attacker-train", Blocks(10, 1))
    order = stream.sequential_order(len(data))
    bounds = [(a, min(a + 10, len(data))) for a in range(0, len(data), 10)]
    got = 0
    with pytest.raises(NonFiniteError, match=r"activations \(/activations, attacker-train rows\) .* 1 NaN and 0 infinite values in 1 rows"):
        for _ in reader.batches(order, bounds):
            got += 1
    assert got == 19  # the 19 batches before row 190 came through


def test_path_choice(tmp_path):
    store, data = _store(tmp_path)
    rows = np.arange(100)
    size = 100 * 12 * 4
    assert stream.choose_path(store, ["activations"], rows, "test", size).path == "memory"
    chosen = stream.choose_path(store, ["activations"], rows, "test", size - 1)
    assert chosen.path == "stream" and chosen.role_bytes == size and "exceed" in chosen.reason


def test_the_default_budget_is_recorded_as_default_where_it_changed_nothing(tmp_path):
    # Its bytes are a share of the memory free at the time: recording them would give two runs of
    # the same settings different reports.
    store, _ = _store(tmp_path)
    rows = np.arange(100)
    by_default = stream.choose_path(store, ["activations"], rows, "test").to_dict()
    assert by_default["data_path"] == "memory" and by_default["memory_budget"] == "default"
    assert "default memory budget" in by_default["reason"]
    with stream.budget("1K"):
        given = stream.choose_path(store, ["activations"], rows, "test").to_dict()
        assert stream.budget_record(1024, "memory") == (1024, "the memory budget of 1.0 KiB")
    assert given["data_path"] == "stream" and given["memory_budget"] == 1024
    assert stream.budget_record(10, "subsample")[0] == 10  # a default that chose a subsample is recorded


def test_contiguous_datasets_read_only_the_roles_rows_and_chunked_ones_through_hdf5(tmp_path):
    """A role's rows come straight from the file run by run (no other role's bytes); a chunked dataset reads as before."""
    store, data = _store(tmp_path, n=300, shape=(5, 6))
    rows = np.sort(np.random.default_rng(1).choice(300, 110, replace=False))  # gaps: other roles' rows between runs
    with h5py.File(tmp_path / "c.h5", "w") as f:
        f.create_dataset("activations", data=data.astype(np.float16), chunks=(16, 5, 6), compression="gzip")
        f.create_dataset("inputs", data=(data / 1000).astype(np.float32), chunks=(16, 5, 6))
    chunked = SimpleNamespace(file=h5py.File(tmp_path / "c.h5", "r"), path=tmp_path / "c.h5")
    blocks = Blocks(block_rows=9, window_blocks=2)
    got = {}
    for name, source in (("contiguous", store), ("chunked", chunked)):
        reader = StreamReader(source, ["activations", "inputs"], rows, "attacker-train", blocks)
        order = epoch_order(len(rows), torch.Generator().manual_seed(0), blocks)
        bounds = [(a, min(a + 16, len(order))) for a in range(0, len(order), 16)]
        got[name] = [(p.copy(), z, x) for p, (z, x) in reader.batches(order, bounds)]
        got[name + " bytes"] = reader.bytes_read
    for (p1, z1, x1), (p2, z2, x2) in zip(got["contiguous"], got["chunked"], strict=True):
        np.testing.assert_array_equal(p1, p2)
        np.testing.assert_array_equal(z1, z2)
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(z1, data[rows[p1]].astype(np.float16).astype(np.float32))
    assert got["contiguous bytes"] == len(rows) * 30 * (2 + 4)  # each row once, float16 Z and float32 X
    assert got["chunked bytes"] == 0


def test_a_sparse_selection_reads_its_rows_not_the_span_between_them(tmp_path):
    """ActivationStore.read of a few rows spread over the store holds those rows, not every row between them."""
    import tracemalloc

    from leakaudit.store import open_store
    from tests.attacks import synthetic_store

    n = 2000
    z = np.random.default_rng(0).standard_normal((n, 16, 16, 16)).astype(np.float32)  # 16 KiB a row, 32 MiB in all
    labels = np.arange(n) % 2
    path = synthetic_store(tmp_path / "wide.h5", z=z, labels={"t": labels}, split=(np.arange(n) % 3).astype(np.uint8))
    rows = np.array([1999, 3, 1000, 3, 1500, 0])  # unsorted, repeated, spanning the store
    with open_store(path) as store:
        tracemalloc.start()
        got = store.activations(rows)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        np.testing.assert_array_equal(got, z[rows])
        np.testing.assert_array_equal(store.activations(np.arange(n)[::-7]), z[::-7])
    assert peak < 2 << 20, peak  # a slice from row 0 to row 1999 would hold 32 MiB
    # a chunked dataset is read through HDF5 in bounded slices, with the same values
    with h5py.File(tmp_path / "wide.h5", "r") as f, h5py.File(tmp_path / "chunked.h5", "w") as g:
        for key, value in f.attrs.items():
            g.attrs[key] = value
        for name in f:
            f.copy(name, g)
        del g["activations"]
        g.create_dataset("activations", data=z, chunks=(8, 16, 16, 16), compression="gzip")
    from leakaudit.store.integrity import record_checksums

    record_checksums(tmp_path / "chunked.h5")
    with open_store(tmp_path / "chunked.h5") as store:
        np.testing.assert_array_equal(store.activations(rows), z[rows])
