"""A decoder's test role streamed from the store: every image scored chunk by chunk, as in memory, and few kept."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from leakaudit.attacks._data import attack_rows, read_activations, read_inputs
from leakaudit.attacks._sources import StreamSource, TensorSource
from leakaudit.attacks._training import EVAL_BATCH, Standardizer, as_tensor
from leakaudit.attacks.decoder_nets import build_decoder
from leakaudit.attacks.image_scores import KEPT_WHEN_STREAMED, HeldOutImages, score_images
from leakaudit.store import open_store
from leakaudit.store.stream import Blocks
from tests.conftest import error_line

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _sources(store):
    rows = attack_rows(store)
    z = as_tensor(read_activations(store, rows.test, "test"))
    x = as_tensor(read_inputs(store, rows.test, "test"))
    memory = TensorSource(z, x)
    streamed = StreamSource(store, rows.test, "test", Blocks(block_rows=9, window_blocks=2), y_name="inputs")
    return memory, streamed, z, x


def test_streamed_scores_equal_in_memory_scores(small_digits_store):
    """Same model, same chunks: per-image SSIM and MSE agree exactly, and the first reconstructions are kept."""
    torch.manual_seed(0)
    with open_store(small_digits_store) as store:
        memory, streamed, z, x = _sources(store)
        model = build_decoder("upsample", tuple(z.shape[1:]), tuple(x.shape[1:]), 4, x.mean(dim=0))
        standardizer = Standardizer.fit(z)
        in_memory = HeldOutImages(memory).score_model(model, standardizer, torch.device("cpu"))
        stream = HeldOutImages(streamed).score_model(model, standardizer, torch.device("cpu"))
        mean_image = x.mean(dim=0)
        floor_memory, floor_stream = HeldOutImages(memory).score_image(mean_image), HeldOutImages(streamed).score_image(mean_image)
        other = build_decoder("upsample", tuple(z.shape[1:]), tuple(x.shape[1:]), 4, 1.0 - x.mean(dim=0))
        other_ssim = HeldOutImages(streamed).score_model(other, standardizer, torch.device("cpu")).ssim
    assert len(z) > KEPT_WHEN_STREAMED and len(z) < EVAL_BATCH  # one chunk; the equality is over the same rows
    np.testing.assert_array_equal(stream.ssim, in_memory.ssim)
    np.testing.assert_array_equal(stream.mse, in_memory.mse)
    assert stream.scores == in_memory.scores
    assert len(in_memory.kept) == len(z) and len(stream.kept) == KEPT_WHEN_STREAMED
    torch.testing.assert_close(stream.kept, in_memory.kept[:KEPT_WHEN_STREAMED], rtol=0, atol=0)
    np.testing.assert_array_equal(floor_stream.ssim, floor_memory.ssim)
    assert floor_stream.scores == floor_memory.scores
    # and the scores are the decoders' own (score_images), not a second implementation
    expected, ssim = score_images(in_memory.kept, x)
    assert expected == in_memory.scores
    np.testing.assert_array_equal(ssim, in_memory.ssim)
    # a different model scores differently: the equality above can fail
    assert not np.array_equal(other_ssim, stream.ssim)


def test_decoder_streams_its_test_role_end_to_end(cli, small_digits_store, tmp_path):
    out, grid = tmp_path / "d.json", tmp_path / "grid.png"
    result = cli("attack", small_digits_store, "--decoder", "upsample", "--epochs", "1", "--memory-budget", "1K",
                 "--set", "width=4", "--json", out, "--grid", grid, "--report", tmp_path / "r.json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["data_path"]["test"]["data_path"] == "stream"
    assert any("the test role was streamed" in w for w in data["warnings"])
    assert grid.stat().st_size > 0
    with open_store(small_digits_store) as store:
        test_rows = len(store.rows("test"))
    assert data["rows"]["test"] == test_rows  # every test image scored, not a subsample


def test_saving_all_reconstructions_of_a_streamed_test_role_is_refused(cli, small_digits_store, tmp_path):
    target = tmp_path / "recon.h5"
    result = cli("attack", small_digits_store, "--decoder", "upsample", "--epochs", "1", "--memory-budget", "1K",
                 "--set", "width=4", "--reconstructions", target)
    assert result.exit_code != 0
    assert "only 8 of the" in error_line(result) and "--memory-budget" in error_line(result)
    assert not target.exists() and not list(tmp_path.glob(".recon.h5.*"))


def test_streamed_statistics_convert_a_bounded_chunk_of_wide_rows(small_digits_store, monkeypatch):
    """fit_source and mean_target take as many rows a chunk as 64 MiB of float64 holds, not a fixed 1,024."""
    from leakaudit.attacks import _sources
    from leakaudit.attacks._sources import STATISTIC_CHUNK_BYTES, mean_target, statistic_chunk_rows

    assert statistic_chunk_rows(128 * 16 * 16) == STATISTIC_CHUNK_BYTES // (8 * 128 * 16 * 16) < 1024
    assert statistic_chunk_rows(120) == 1024 and statistic_chunk_rows(10**9) == 1
    asked: list[int] = []
    real = StreamSource.chunks

    def recording(self, rows, ctx):
        asked.append(rows)
        return real(self, rows, ctx)

    monkeypatch.setattr(_sources.StreamSource, "chunks", recording)
    monkeypatch.setattr(_sources, "STATISTIC_CHUNK_BYTES", 8 * 120 * 7)  # 7 rows of Z, 1 row of X a chunk
    with open_store(small_digits_store) as store:
        rows = attack_rows(store).train
        source = StreamSource(store, rows, "attacker-train", Blocks(block_rows=9, window_blocks=2), y_name="inputs")
        fitted = Standardizer.fit_source(source)
        mean = mean_target(source)
        z, x = as_tensor(read_activations(store, rows, "t")), as_tensor(read_inputs(store, rows, "t"))
    assert asked == [7, 1]
    expected = Standardizer.fit(z)
    torch.testing.assert_close(fitted.mean, expected.mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(fitted.std, expected.std, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(mean, x.mean(dim=0), rtol=1e-5, atol=1e-6)
