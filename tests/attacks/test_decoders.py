"""The decoder attack: reconstructs X from a trained LeNet-5's Z, learns nothing from noise."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import structural_similarity as skimage_ssim

from leakaudit.attacks import DecoderConfig, run_decoder
from leakaudit.attacks.decoders import ARCHS, build_decoder, geometry
from leakaudit.attacks.reconstructions import image_grid, save_grid, save_reconstructions
from leakaudit.config import from_mapping
from leakaudit.errors import ConfigError, DataError, StoreError, UnknownNameError
from leakaudit.registry import ATTACKS
from leakaudit.store import open_store
from tests.attacks import balanced_split, single_thread, synthetic_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")
# epochs, patience 10) reach SSIM ≈ 0.96 on this store — see test_default_decoders_are_strong.
FAST = {"width": 16, "epochs": 12, "patience": 3}


@pytest.fixture(scope="module")
def trained_result(trained_digits_store):
    with single_thread(), open_store(trained_digits_store) as store:
        return run_decoder(store, DecoderConfig(arch="upsample", **FAST))


def test_upsample_reconstructs_digits_from_trained_lenet(trained_result):
    result = trained_result
    assert result.best == "upsample" and [r.arch for r in result.runs] == ["upsample"]
    assert result.scores.ssim_mean >= 0.8
    assert result.mean_image.ssim_mean < 0.4  # about 0.33 for the mean image
    assert result.scores.ssim_p5 <= result.scores.ssim_p50 <= result.scores.ssim_p95
    assert result.scores.psnr > result.mean_image.psnr + 6


def test_scores_agree_with_scikit_image(trained_digits_store, trained_result):
    with open_store(trained_digits_store) as store:
        originals = store.inputs(trained_result.test_rows)
    for i in range(20):
        expected = skimage_ssim(
            originals[i, 0],
            trained_result.reconstructions[i, 0],
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=1.0,
        )
        assert trained_result.ssim_per_image["upsample"][i] == pytest.approx(expected, abs=1e-4)
    per_image_mse = np.mean((trained_result.reconstructions.astype(np.float64) - originals) ** 2, axis=(1, 2, 3))
    assert trained_result.scores.mse == pytest.approx(per_image_mse.mean(), rel=1e-5)
    assert trained_result.scores.psnr == pytest.approx(np.mean(10 * np.log10(1 / per_image_mse)), rel=1e-5)
    assert trained_result.scores.ssim_p95 == pytest.approx(np.percentile(trained_result.ssim_per_image["upsample"], 95))


def test_noise_z_reconstructs_no_better_than_the_mean_image(noise_store):
    with open_store(noise_store) as store:
        result = run_decoder(store, DecoderConfig(arch="best", width=8, epochs=8, patience=2))
    for run in result.runs:
        assert abs(run.test.ssim_mean - result.mean_image.ssim_mean) <= 0.05, run.arch
    assert abs(result.scores.ssim_p95 - result.mean_image.ssim_p95) <= 0.05


def test_result_json_and_report_metrics(trained_result):
    data = json.loads(json.dumps(trained_result.to_dict()))
    assert data["attack"] == "decoder" and data["best"] == "upsample"
    scores = ("ssim_mean", "ssim_p5", "ssim_p50", "ssim_p95", "psnr", "mse")
    assert set(data["scores"]) == {*scores, *(s + "_ci95" for s in scores)}
    assert "reconstructions" not in data and "test_rows" not in data
    s, m = trained_result.scores, trained_result.mean_image
    assert trained_result.report_metrics() == {
        "ssim_mean": s.ssim_mean, "ssim_mean_ci95": s.ssim_mean_ci95,
        "ssim_p95": s.ssim_p95, "ssim_p95_ci95": s.ssim_p95_ci95,
        "psnr": s.psnr, "psnr_ci95": s.psnr_ci95, "mse": s.mse, "mse_ci95": s.mse_ci95,
        "ssim_p95_mean_image": m.ssim_p95, "ssim_p95_mean_image_ci95": m.ssim_p95_ci95,
    }  # fmt: skip
    assert data["prior"] == "a prior learned from leaked (X, Z) pairs"
    for scored in (data["scores"], data["mean_image"], *(r["test"] for r in data["runs"])):
        for score in scores:
            lo, hi = scored[score + "_ci95"]
            assert lo <= scored[score] <= hi, score


def test_score_intervals_are_bootstraps_of_the_per_image_values(trained_result):
    from leakaudit.intervals import mean_interval, percentile_interval

    ssim = trained_result.ssim_per_image["upsample"].astype(np.float64)
    s = trained_result.scores
    assert s.ssim_p95_ci95 == pytest.approx(percentile_interval(ssim, 95), abs=1e-6)  # float32 storage of ssim
    assert s.ssim_p5_ci95 == pytest.approx(percentile_interval(ssim, 5), abs=1e-6)
    # The mean's bootstrap interval is close to the normal one, mean ± 1.96·sd/√n.
    half = 1.96 * ssim.std(ddof=1) / np.sqrt(len(ssim))
    assert s.ssim_mean_ci95 == pytest.approx([ssim.mean() - half, ssim.mean() + half], abs=0.25 * half)
    assert mean_interval(ssim) == pytest.approx(s.ssim_mean_ci95, abs=1e-6)


def test_reconstructions_and_grid_are_written(tmp_path, trained_digits_store, trained_result):
    out = save_reconstructions(trained_result, tmp_path / "rec.h5", store_path=trained_digits_store)
    with h5py.File(out, "r") as f:
        assert f.attrs["schema"] == "leakaudit.reconstructions" and f.attrs["decoder"] == "upsample"
        assert f["reconstructions"].shape == (len(trained_result.test_rows), 1, 32, 32)
        np.testing.assert_array_equal(f["rows"][()], trained_result.test_rows)
        assert set(f["ssim"]) == {"upsample", "mean-image"}
    with open_store(trained_digits_store) as store:
        png = save_grid(trained_result, store, tmp_path / "grid.png", columns=5)
    with Image.open(png) as image:
        assert image.mode == "L" and image.size == (2 + 5 * (64 + 2), 2 + 2 * (64 + 2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png", "rec.h5"]  # no temporary files left


def test_image_grid_puts_originals_above_reconstructions():
    originals = np.zeros((2, 1, 2, 2), dtype=np.float32)
    recon = np.ones((2, 1, 2, 2), dtype=np.float32)
    grid = image_grid(originals, recon, scale=1, pad=1)
    assert grid.shape == (7, 7, 1)
    assert (grid[1:3, 1:3] == 0).all() and (grid[4:6, 4:6] == 255).all()
    assert (grid[0] == 255).all()  # padding is white


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    ("z_shape", "x_shape"),
    [
        ((16, 5, 5), (1, 32, 32)),  # LeNet-5 pool2
        ((120, 1, 1), (1, 32, 32)),  # LeNet-5 conv3: flat in effect
        ((84,), (1, 32, 32)),
        ((1,), (1, 28, 28)),  # one feature
        ((64, 8, 8), (3, 32, 32)),
        ((512, 4, 4), (3, 128, 128)),
        ((4, 3, 5), (3, 24, 40)),  # non-square
        ((8, 40, 40), (1, 32, 32)),  # Z larger than X
    ],
)
def test_every_decoder_maps_z_to_x_shape(arch, z_shape, x_shape):
    mean = torch.rand(x_shape)
    torch.manual_seed(0)
    decoder = build_decoder(arch, z_shape, x_shape, width=8, mean_image=mean).eval()
    with torch.no_grad():
        out = decoder(torch.randn(2, *z_shape))
    assert out.shape == (2, *x_shape)
    # Untrained, every decoder predicts the mean image (clamped away from 0 and 1).
    torch.testing.assert_close(out[0], mean.clamp(1e-3, 1 - 1e-3), atol=1e-5, rtol=1e-4)


def test_geometry_doubles_within_x_then_resizes():
    assert geometry((16, 5, 5), (1, 32, 32)).ups == 2  # 5 → 10 → 20, then resized to 32
    flat = geometry((120, 1, 1), (1, 32, 32))
    assert not flat.spatial and flat.start == (4, 4) and flat.ups == 3 and flat.reached() == (32, 32)
    assert geometry((512, 4, 4), (3, 128, 128)).widths(32) == [256, 256, 256, 128, 64, 32]


def test_mse_ssim_loss_trains(small_digits_store):
    with open_store(small_digits_store) as store:
        result = run_decoder(store, DecoderConfig(arch="resnet", loss="mse+ssim", width=8, epochs=2))
    assert result.runs[0].epochs == 2 and np.isfinite(result.scores.ssim_mean)


def test_store_without_inputs_is_refused(tmp_path):
    labels = np.repeat([0, 1], 30)
    z = np.random.default_rng(0).standard_normal((60, 8)).astype(np.float32)
    path = synthetic_store(tmp_path / "noinputs.h5", z=z, labels={"private": labels}, split=balanced_split(labels))
    with open_store(path) as store, pytest.raises(StoreError, match=r"has no /inputs: it was dumped with --no-inputs"):
        run_decoder(store, DecoderConfig())


def test_images_smaller_than_the_ssim_window_are_refused(tmp_path):
    labels = np.repeat([0, 1], 30)
    rng = np.random.default_rng(0)
    path = synthetic_store(
        tmp_path / "tiny.h5",
        z=rng.standard_normal((60, 8)).astype(np.float32),
        x=rng.random((60, 1, 8, 8)).astype(np.float32),
        labels={"private": labels},
        split=balanced_split(labels),
    )
    with open_store(path) as store, pytest.raises(DataError, match=r"the stored images are 8×8; SSIM's Gaussian window"):
        run_decoder(store, DecoderConfig())


def test_config_names_and_keys():
    with pytest.raises(UnknownNameError, match=r"unknown decoder 'alexnt'\. Closest: alexnet\."):
        from_mapping(DecoderConfig, {"arch": "alexnt"})
    with pytest.raises(UnknownNameError, match=r"unknown decoder loss 'ssim'"):
        from_mapping(DecoderConfig, {"loss": "ssim"})
    with pytest.raises(ConfigError, match=r"widht: unknown key\. Did you mean 'width'\?"):
        from_mapping(DecoderConfig, {"widht": 8})
    assert ATTACKS.get("decoder").config_cls is DecoderConfig and ATTACKS.get("decoder").target is run_decoder


@pytest.mark.slow
def test_default_decoders_are_strong(trained_digits_store):
    """All three decoders with their default settings, each to its own stop (several minutes on 2 cores),
    and the default successive halving, as strong: its headline within the full run's interval or above."""
    with open_store(trained_digits_store) as store:
        result = run_decoder(store, DecoderConfig(budget="full"))
        halving = run_decoder(store, DecoderConfig())
    low = result.scores.ssim_mean_ci95[0]
    assert halving.scores.ssim_mean >= low, (halving.best, halving.scores.ssim_mean, result.best, result.scores.ssim_mean)
    for run in result.runs:  # shown with -s; recorded in benchmarks/RESULTS-attacks.md
        print(f"{run.arch}: SSIM {run.test.ssim_mean:.4f} (p95 {run.test.ssim_p95:.4f}), epochs {run.epochs} "
              f"(best {run.best_epoch}), {run.seconds_per_epoch:.2f} s/epoch")  # fmt: skip
    assert {run.arch for run in result.runs} == set(ARCHS)
    assert all(run.test.ssim_mean >= 0.85 for run in result.runs), [(r.arch, r.test.ssim_mean) for r in result.runs]
    assert result.best == max(result.runs, key=lambda r: r.val_ssim).arch


def test_same_seed_same_reconstructions(small_digits_store):
    def run(seed: int):
        with open_store(small_digits_store) as store:
            return run_decoder(store, DecoderConfig(arch="upsample", width=4, epochs=1, seed=seed))

    first, second = run(0), run(0)
    np.testing.assert_array_equal(first.reconstructions, second.reconstructions)
    assert first.scores == second.scores
    assert json.dumps(first.report_metrics()) == json.dumps(second.report_metrics())  # intervals included, to the byte
    assert not np.array_equal(run(1).reconstructions, first.reconstructions)
