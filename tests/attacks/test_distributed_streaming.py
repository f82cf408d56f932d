"""The streamed path under torchrun: each rank reads only its own rows, and two ranks train as one process does."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from leakaudit.attacks import _sources
from leakaudit.attacks._data import attack_rows
from leakaudit.attacks._sources import StreamSource
from leakaudit.distributed import Context
from leakaudit.store import open_store
from leakaudit.store.stream import Blocks, StreamReader
from tests.attacks.test_distributed_attacks import PSNR_TOLERANCE, SSIM_TOLERANCE, store  # noqa: F401 (fixture)
from tests.torchrun import finish, needs_torchrun, torchrun

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_each_rank_streams_only_the_rows_of_its_shard(store, monkeypatch):  # noqa: F811
    opened: list[np.ndarray] = []

    class Recording(StreamReader):
        def __init__(self, store, names, rows, role, blocks, queue_batches=2):
            opened.append(np.asarray(rows).copy())
            super().__init__(store, names, rows, role, blocks, queue_batches)

    monkeypatch.setattr(_sources, "StreamReader", Recording)
    read: dict[int, set[int]] = {}
    with open_store(store) as handle:
        rows = attack_rows(handle).train
        labels = torch.from_numpy(handle.labels("private"))[rows]
        source = StreamSource(handle, rows, "attacker-train", Blocks(block_rows=7, window_blocks=2), targets=labels)
        steps = set()
        for rank in (0, 1):
            ctx = Context(rank=rank, world_size=2, local_rank=rank)
            opened.clear()
            order = source.epoch_order(torch.Generator().manual_seed(0), ctx)
            bounds = [(a, min(a + 16, len(order))) for a in range(0, len(order), 16)]
            with source.epoch(order, bounds) as take:
                for a, b in bounds:
                    take(order[a:b])
            for _ in source.chunks(32, ctx):
                pass
            steps.add(len(order))
            read[rank] = {int(r) for o in opened for r in o}
    assert len(steps) == 1  # every rank takes as many steps (the shorter range is padded with its own rows)
    assert read[0].isdisjoint(read[1])
    assert read[0] | read[1] == {int(r) for r in rows}
    assert max(read[0]) < min(read[1])  # contiguous ranges: each rank reads one stretch of the role


@needs_torchrun
def test_two_ranks_streaming_match_one_process_streaming(store, tmp_path, cli):  # noqa: F811
    args = ("attack", store, "--decoder", "upsample", "--epochs", "6", "--patience", "3", "--seed", "0",
            "--set", "width=8", "--device", "cpu", "--memory-budget", "1K")
    process = torchrun(*args, "--json", tmp_path / "two.json", "--report", tmp_path / "two-report.json")
    out, err = finish(process)
    assert process.returncode == 0, err
    assert out.count("merged into") == 1, out  # rank 0 alone printed and wrote
    single = cli(*args, "--json", tmp_path / "one.json", "--report", tmp_path / "one-report.json")
    assert single.exit_code == 0, single.stderr
    two, one = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("two", "one"))
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert {p["data_path"] for p in two["data_path"].values()} == {"stream"}
    for name in ("ssim_mean", "ssim_p95"):
        assert abs(two[name] - one[name]) <= SSIM_TOLERANCE, (name, two[name], one[name])
    assert abs(two["psnr"] - one["psnr"]) <= PSNR_TOLERANCE
    assert two["scores"]["ssim_mean"] > two["mean_image"]["ssim_mean"] + 0.1  # it did learn
    assert two["mean_image"]["ssim_mean"] == pytest.approx(one["mean_image"]["ssim_mean"], rel=1e-9)
