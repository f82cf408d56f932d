"""The gaussian-noise recipe: its noise module, its settings, and `harden` end to end on digits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from leakaudit.metrics.bounds import declared_noise
from leakaudit.recipes.gaussian_noise import GaussianNoise, GaussianNoiseConfig
from tests.conftest import error_line
from tests.recipes.test_recipes import one_thread


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


def test_noise_has_its_scale_and_stays_on_in_eval_mode():
    noise = GaussianNoise(0.5).eval()
    z = torch.zeros(4000, 8)
    torch.manual_seed(0)
    out = noise(z)
    assert float(out.std()) == pytest.approx(0.5, rel=0.03)
    assert abs(float(out.mean())) < 0.02
    torch.manual_seed(0)
    assert torch.equal(out, noise(z))  # seeded, it repeats
    assert not torch.equal(out, noise(z))


def test_clipping_scales_long_rows_to_the_norm_and_leaves_short_ones():
    noise = GaussianNoise(1e-6, clip=2.0)
    z = torch.tensor([[3.0, 4.0], [0.6, 0.8], [0.0, 0.0]])  # norms 5, 1, 0
    out = noise(z)
    torch.testing.assert_close(out, torch.tensor([[1.2, 1.6], [0.6, 0.8], [0.0, 0.0]]), atol=1e-4, rtol=0)
    images = torch.randn(16, 3, 4, 4) * 10  # per-row norm over all of a row's elements
    clipped = GaussianNoise(1e-6, clip=1.0)(images)
    assert torch.allclose(clipped.flatten(1).norm(dim=1), torch.ones(16), atol=1e-4)


def test_the_noise_declares_its_scale_and_clip_as_buffers_that_survive_export():
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), GaussianNoise(0.25, clip=3.0))
    program = torch.export.export(module, (torch.rand(2, 4),))
    unflattened = torch.export.unflatten(program)
    assert declared_noise(unflattened) == (0.25, 3.0, ["1.noise_sigma"])


@pytest.mark.parametrize(
    ("settings", "message"),
    [({"sigma": 0.0}, "--sigma must be a positive number, got 0."),
     ({"sigma": -1.0}, "--sigma must be a positive number, got -1."),
     ({"sigma": float("inf")}, "--sigma must be a positive number, got inf."),
     ({"clip": 0.0}, "--clip must be a positive number, got 0."),
     ({"clip": -2.0}, "--clip must be a positive number, got -2.")],
)  # fmt: skip
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(ValueError) as refused:
        GaussianNoiseConfig(**settings)
    assert str(refused.value) == message


HARDEN = ["harden", "lenet5", "--num-classes", "2", "--layer", "conv3", "--data", "digits", "--limit", "300",
          "--task", "public=parity", "--task", "private=label", "--batch-size", "64", "--method", "gaussian-noise"]  # fmt: skip


@pytest.mark.parametrize(
    ("option", "expected"),
    [("sigma=0", "Error: --sigma must be a positive number, got 0."),
     ("clip=-1", "Error: --clip must be a positive number, got -1."),
     ("scale=1", "Error: --scale does not apply to gaussian-noise; its options: --clip, --sigma.")],
)  # fmt: skip
def test_bad_options_on_the_command_line_are_one_line_usage_errors(cli, tmp_path, option, expected):
    out = tmp_path / "out"
    result = cli(*HARDEN, "--option", option, "-o", out)
    assert result.exit_code == 2
    assert error_line(result) == expected
    assert not out.exists()


def test_harden_end_to_end_keeps_the_noise_in_the_exported_encoder_and_the_dump(cli, tmp_path):
    from leakaudit.models import load_model
    from leakaudit.provenance import rebuild_encoder
    from leakaudit.split import split_model
    from leakaudit.store import open_store

    out = tmp_path / "noisy"
    result = cli(*HARDEN, "--option", "sigma=0.5", "--epochs", "1", "-o", out)
    assert result.exit_code == 0, result.stderr
    saved = json.loads((out / "harden.json").read_text())
    run = saved["runs"][0]
    assert run["config"]["sigma"] == 0.5 and run["config"]["clip"] is None
    # The noise is saved beside the weights, so the evaluation dumps encoder.pt2, not the bare architecture.
    assert {"noise.safetensors", "encoder.pt2", "classifier.pt2"} <= set(run["files"])
    from safetensors.torch import load_file

    assert float(load_file(str(out / "noise.safetensors"))["noise_sigma"]) == 0.5

    exported = load_model(str(out / "encoder.pt2")).module
    assert declared_noise(exported) == (0.5, None, ["noise.noise_sigma"])
    hardened = load_model("lenet5", weights=str(out / "model.safetensors"), num_classes=2).module.eval()
    clean = split_model(hardened, "conv3").encoder
    x = torch.rand(64, 1, 32, 32)
    with torch.no_grad():
        torch.manual_seed(1)
        noisy = exported(x)
        residual = noisy - clean(x)
        torch.manual_seed(1)
        assert torch.equal(noisy, exported(x))
    assert float(residual.std()) == pytest.approx(0.5, rel=0.05)  # 64 × 120 draws of N(0, 0.25)

    # The dump of the exported encoder holds noisy Z; fisher-leakage finds σ in it and matches
    # the exact Jacobian trace of the clean encoder (the noise is additive, so J is the same).
    store = tmp_path / "noisy.h5"
    result = cli("dump", out / "encoder.pt2", "--layer", "output", "--data", "digits", "--limit", "300",
                 "--task", "private=label", "-o", store)  # fmt: skip
    assert result.exit_code == 0, result.stderr
    result = cli("metrics", store, "--only", "fisher-leakage", "--set", "fisher-leakage.max_rows=16",
                 "--json", "-")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)["results"]["fisher-leakage"]
    assert data["details"]["sigma"] == 0.5 and data["details"]["sigma_source"] == "encoder"
    with open_store(store) as s:
        rows = s.rows("test")[:16]
        x = torch.from_numpy(s.inputs(rows))
        assert rebuild_encoder(s).module.training is False
    exact = np.mean([
        float(torch.autograd.functional.jacobian(lambda v: clean(v[None])[0], row).pow(2).sum()) for row in x
    ]) / (x[0].numel() * 0.25)  # fmt: skip
    assert abs(data["dfil"] - exact) <= 4 * data["details"]["probe_standard_error"] + 1e-12
    assert data["mse_bound"] == pytest.approx(1 / data["dfil"])

