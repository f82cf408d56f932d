"""The white-box inversion attack: the encoder it inverts is the dump's, and its scores are honest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from leakaudit.attacks import InversionConfig, run_inversion
from leakaudit.attacks.inversion import feature_loss, invert, total_variation
from leakaudit.dump import DumpSettings, dump
from leakaudit.errors import ConfigError, UntrustedCheckpointError
from leakaudit.models import ModelSpec
from leakaudit.pipeline import applies, step
from leakaudit.provenance import rebuild_encoder
from leakaudit.registry import ATTACKS
from leakaudit.store import open_store
from tests.attacks import TASKS
from tests.conftest import error_line

pytestmark = pytest.mark.usefixtures("one_torch_thread")
#: Short runs: one restart and few steps, on a few test rows.
FAST = {"rows": 24, "restarts": 1, "steps": 150, "device": "cpu"}


class BatchNormDropoutNet(nn.Module):
    """A small model with BatchNorm and Dropout before the split: eval mode matters for both."""

    input_size = (1, 16, 16)

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.5)
        self.act = nn.ReLU()
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.drop(self.bn(self.conv(x)))).mean((2, 3)))


class IdentityFirst(nn.Module):
    """A model whose first module is the identity: a split there hands the attacker X itself."""

    input_size = (1, 16, 16)

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Identity()
        self.conv = nn.Conv2d(1, 4, 3)
        self.head = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(self.inp(x)).mean((2, 3)))


def _kept() -> BatchNormDropoutNet:
    torch.manual_seed(5)
    model = BatchNormDropoutNet()
    with torch.no_grad():  # statistics that eval mode uses and training mode would overwrite
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model.train()


#: The instance ``kept_net`` returns every time: a factory may keep its model, which must come back unchanged.
KEPT = _kept()


def kept_net() -> BatchNormDropoutNet:
    return KEPT


def identity_first() -> IdentityFirst:
    return IdentityFirst()


def _dump(path: Path, model: str | ModelSpec, layer: str, **options) -> Path:
    dump(DumpSettings(model=model, layer=layer, data="digits", output=path, tasks=TASKS, force=True, **options))
    return path


def _snapshot(module: nn.Module):
    state = {k: v.detach().clone() for k, v in module.state_dict(keep_vars=True).items()}
    return state, [(n, m.training) for n, m in module.named_modules()], [(n, p.requires_grad) for n, p in module.named_parameters()]


def _assert_unchanged(module: nn.Module, snapshot) -> None:
    state, modes, flags = snapshot
    now = module.state_dict()
    assert state.keys() == now.keys()
    for key, value in state.items():
        assert torch.equal(now[key], value), key
    assert [(n, m.training) for n, m in module.named_modules()] == modes
    assert [(n, p.requires_grad) for n, p in module.named_parameters()] == flags
    assert all(p.grad is None for p in module.parameters())


@pytest.fixture(scope="module")
def conv1_store(trained_digits_store, tmp_path_factory) -> Path:
    """The trained LeNet-5 of ``trained_digits_store``, dumped at ``conv1`` (6×28×28)."""
    with open_store(trained_digits_store) as store:
        weights = store.attrs["weights"]
    path = tmp_path_factory.mktemp("inversion") / "trained-conv1.h5"
    return _dump(path, ModelSpec("lenet5", weights=weights), "conv1")


# --------------------------------------------------------------------------- the maths


def test_total_variation_and_feature_loss_closed_forms():
    x = torch.tensor([[[[0.0, 1.0, 1.0], [0.0, 0.0, 0.5]]]])  # 2×3
    # vertical |differences| 0, 1, 0.5 (mean 0.5); horizontal 1, 0, 0, 0.5 (mean 0.375)
    assert float(total_variation(x)[0]) == pytest.approx(0.875)
    assert float(total_variation(torch.full((2, 3, 5, 5), 0.3)).abs().max()) == 0.0
    z = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    out = torch.tensor([[0.0, 4.0], [1.0, 2.0]])
    np.testing.assert_allclose(feature_loss(out, z).numpy(), [9.0 / 25.0, 5.0])  # a zero z counts as norm 1


def test_invert_through_a_linear_map_recovers_its_preimage_and_keeps_the_best_restart():
    # An orthogonal linear encoder has one preimage; with TV off it is found to optimiser precision.
    torch.manual_seed(0)
    weight, _ = torch.linalg.qr(torch.randn(144, 144))
    x = torch.rand(4, 1, 12, 12)

    def encoder(v: torch.Tensor) -> torch.Tensor:
        return v.flatten(1) @ weight.T

    def run(**settings):
        config = InversionConfig(lr=0.02, tv_weight=0.0, patience=1000, device="cpu", **settings)
        return invert(encoder, encoder(x), (1, 12, 12), config, generator=torch.Generator().manual_seed(0))

    recon, loss, chosen, steps = run(steps=300, restarts=1)
    assert float((recon - x).abs().max()) < 1e-4 and steps == [300]
    np.testing.assert_allclose(loss.numpy(), feature_loss(encoder(recon), encoder(x)).double().numpy(), rtol=1e-4, atol=1e-12)
    # Unconverged, restarts differ; each image keeps the one that fits its Z best, so a second
    # restart (the first is the same mid-grey start) never makes an image's fit worse.
    _, one, _, _ = run(steps=15, restarts=1)
    recon, two, chosen, steps = run(steps=15, restarts=3)
    assert bool((two <= one).all()) and len(steps) == 3 and set(chosen.tolist()) <= {0, 1, 2}
    assert float(recon.min()) >= 0.0 and float(recon.max()) <= 1.0


# --------------------------------------------------------------------------- the encoder is the dump's


def _models(tmp: Path) -> dict[str, tuple]:
    """(model, layer, dump options) for every kind of model the dump accepts."""
    from leakaudit.export import export_split
    from leakaudit.models import LeNet5
    from tests.models_for_tests import NestedNet

    torch.manual_seed(1)
    script = tmp / "lenet.ts"
    torch.jit.save(torch.jit.script(LeNet5().eval()), str(script))
    static = tmp / "static.pt2"
    torch.export.save(torch.export.export(NestedNet().eval(), (torch.rand(16, 1, 12, 12),)), str(static))
    folder = tmp / "exported"
    folder.mkdir()
    export_split(LeNet5().eval(), "conv3", lambda encoder: encoder, torch.rand(4, 1, 32, 32), folder)
    factory = tmp / "factory.py"
    factory.write_text(
        "from tests.attacks.test_inversion import BatchNormDropoutNet\n\ndef build():\n    return BatchNormDropoutNet()\n"
    )
    return {
        "builtin-random": ("lenet5", "conv2", {}),
        "builtin-normalized": ("lenet5", "pool1", {"normalize": "0.2,0.3"}),
        "timm": ("timm:resnet18", "layer1", {"input_size": (32, 32)}),
        "torchvision": ("torchvision:resnet18", "layer1.0.conv1", {"input_size": (32, 32)}),
        "file-factory-bn-dropout": (f"{factory}:build", "act", {}),
        "no-fx-trace": ("tests.models_for_tests:branchy", "act", {}),
        "torchscript": (str(script), "conv2", {"input_size": (32, 32)}),
        "export-static-batch": (str(static), "blocks.b", {"limit": 56}),
        "harden-encoder": (str(folder / "encoder.pt2"), "output", {}),
    }


KINDS = (
    "builtin-random", "builtin-normalized", "timm", "torchvision", "file-factory-bn-dropout", "no-fx-trace",
    "torchscript", "export-static-batch", "harden-encoder",
)  # fmt: skip


@pytest.fixture(scope="module")
def model_kinds(tmp_path_factory) -> dict[str, tuple]:
    return _models(tmp_path_factory.mktemp("kinds"))


@pytest.mark.parametrize("kind", KINDS)
def test_rebuilt_encoder_maps_stored_x_to_stored_z_with_gradients_for_x_only(kind, model_kinds, tmp_path):
    model, layer, options = model_kinds[kind]
    store_path = _dump(tmp_path / "acts.h5", model, layer, **{"limit": 48, **options})
    with open_store(store_path) as store:
        encoder = rebuild_encoder(store)
        rows = np.arange(min(20, len(store)))
        x = torch.from_numpy(store.inputs(rows)).requires_grad_(True)
        z = torch.from_numpy(store.activations(rows))
    out = encoder(x)
    torch.testing.assert_close(out, z, rtol=1e-4, atol=1e-5)
    (grad,) = torch.autograd.grad(out.square().sum(), [x])
    assert float(grad.abs().sum()) > 0
    assert all(p.grad is None for p in encoder.module.parameters())


def test_a_normalized_dump_is_inverted_in_the_stored_space(model_kinds, tmp_path):
    # Without the dump's normalisation the encoder would be another function: the check must see it.
    model, layer, options = model_kinds["builtin-normalized"]
    with open_store(_dump(tmp_path / "acts.h5", model, layer, limit=48, **options)) as store:
        encoder = rebuild_encoder(store)
        x = torch.from_numpy(store.inputs(np.arange(8)))
        z = torch.from_numpy(store.activations(np.arange(8)))
    assert not torch.allclose(encoder._encoder(x), z, atol=1e-3)
    torch.testing.assert_close(encoder(x), z, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- honesty controls


def test_identity_encoder_is_inverted_to_ssim_099(tmp_path):
    store_path = _dump(tmp_path / "identity.h5", "tests.attacks.test_inversion:identity_first", "inp", limit=300)
    with open_store(store_path) as store:
        np.testing.assert_array_equal(store.activations(np.arange(4)), store.inputs(np.arange(4)))
        result = run_inversion(store, InversionConfig(**{**FAST, "steps": 60}))
    assert result.scores.ssim_mean >= 0.99
    assert result.encoder["reproduction_error"] == 0.0 and not result.warnings


def test_noise_z_inverts_no_better_than_the_mean_image(noise_store):
    with open_store(noise_store) as store:
        result = run_inversion(store, InversionConfig(**FAST))
    assert result.scores.ssim_mean <= result.reference_mean_image.ssim_mean + 0.02
    assert result.scores.ssim_p95 <= result.reference_mean_image.ssim_p95 + 0.02
    # The tool notices that these Z did not come from the recorded encoder.
    assert any("does not reproduce the stored Z" in w for w in result.warnings)


def test_trained_lenet_conv1_is_inverted_to_ssim_090(conv1_store):
    with open_store(conv1_store) as store:
        result = run_inversion(store, InversionConfig(**{**FAST, "steps": 300}))
    assert result.scores.ssim_mean >= 0.9
    assert result.scores.psnr > result.reference_mean_image.psnr + 10
    assert result.encoder == {"model_kind": "builtin", "method": "fx", "reproduction_error": result.encoder["reproduction_error"]}
    assert result.encoder["reproduction_error"] < 1e-5 and not result.warnings
    assert result.rows == {"test": 360, "inverted": 24}


def test_same_settings_same_numbers(conv1_store):
    config = InversionConfig(rows=8, restarts=2, steps=30, device="cpu")
    with open_store(conv1_store) as store:
        first, second = run_inversion(store, config), run_inversion(store, config)
    np.testing.assert_array_equal(first.reconstructions, second.reconstructions)
    np.testing.assert_array_equal(first.test_rows, second.test_rows)
    assert first.report_metrics() == second.report_metrics()


# --------------------------------------------------------------------------- the model is left as it was


def test_model_with_batchnorm_and_dropout_is_unchanged_and_runs_in_eval_mode(tmp_path):
    store_path = _dump(tmp_path / "kept.h5", "tests.attacks.test_inversion:kept_net", "act")
    KEPT.train()  # as a user's code might hold it
    before = _snapshot(KEPT)
    with open_store(store_path) as store:
        result = run_inversion(store, InversionConfig(rows=8, restarts=2, steps=20, device="cpu"))
        encoder = rebuild_encoder(store)
        assert encoder.module is KEPT
        KEPT.train()
        x, z = torch.from_numpy(store.inputs(np.arange(8))), torch.from_numpy(store.activations(np.arange(8)))
        config = InversionConfig(restarts=1, steps=5, device="cpu")
        invert(encoder, z, (1, 16, 16), config, generator=torch.Generator().manual_seed(0))
        # Eval mode at every call: dropout off, the stored statistics used (so E(X) is Z again).
        torch.testing.assert_close(encoder(x), z, rtol=1e-4, atol=1e-5)
    _assert_unchanged(KEPT, before)
    assert result.encoder["reproduction_error"] < 1e-5


# --------------------------------------------------------------------------- result and command line


def test_result_json_threat_and_report_metrics(conv1_store):
    with open_store(conv1_store) as store:
        result = run_inversion(store, InversionConfig(rows=8, restarts=1, steps=10, device="cpu"))
    data = json.loads(json.dumps(result.to_dict()))
    assert data["attack"] == "inversion"
    assert data["threat"]["knows"] == "weights" and data["threat"]["holds"] == "none" and data["threat"]["rows"] == 0
    assert "8 test rows" in data["threat"]["source"]
    assert set(result.report_metrics()) == {"ssim_mean", "ssim_p95", "psnr", "mse", "ssim_mean_ci95", "ssim_p95_ci95", "psnr_ci95", "mse_ci95"}
    assert data["ssim_mean"] == result.scores.ssim_mean and data["scores"]["ssim_mean"] == result.scores.ssim_mean
    assert "attacker-train" in data["reference_mean_image"]["note"]
    assert data["prior"] == "projection onto [0, 1], a total-variation prior"  # biased: may beat the unbiased MSE bound
    assert "reconstructions" not in data and "test_rows" not in data
    assert data["config"]["trust_checkpoint"] is False and data["config"]["rows"] == 8
    assert set(ATTACKS.get("inversion").metrics) == {"ssim_mean", "ssim_p95", "psnr", "mse", "ssim_mean_ci95", "ssim_p95_ci95", "psnr_ci95", "mse_ci95"}


def test_config_is_checked():
    with pytest.raises(ConfigError, match="steps"):
        ATTACKS.get("inversion").configure({"steps": 0})
    with pytest.raises(ConfigError, match="unknown"):
        ATTACKS.get("inversion").configure({"epochs": 3})
    assert ATTACKS.get("inversion").configure({"rows": 0}).rows == 0  # 0: every test row


def test_cli_runs_inversion_with_grid_and_json(cli, conv1_store, tmp_path):
    grid, out, recon = tmp_path / "grid.png", tmp_path / "inv.json", tmp_path / "inv.h5"
    result = cli(
        "attack", conv1_store, "--attack", "inversion", "--set", "steps=20", "--set", "rows=8", "--set", "restarts=1",
        "--set", "device=cpu", "--artifact", f"grid={grid}", "--artifact", f"reconstructions={recon}", "--json", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    image = Image.open(grid)
    assert image.size[1] > 2 * 32 and image.mode == "L"
    data = json.loads(out.read_text())
    assert data["attack"] == "inversion" and data["threat"]["holds"] == "none"
    import h5py

    with h5py.File(recon, "r") as f:
        assert f["reconstructions"].shape == (8, 1, 32, 32) and f.attrs["decoder"] == "inversion"
        assert set(f["ssim"]) == {"inversion", "mean-image"}
    assert "white-box inversion" in result.stdout


def test_cli_untrusted_archive_is_one_error_line_and_a_skip_reason(cli, tmp_path):
    from tests.models_for_tests import NestedNet

    archive = tmp_path / "full.pt"
    torch.save(NestedNet(), archive)
    store_path = _dump(tmp_path / "pickled.h5", ModelSpec(str(archive), trust_checkpoint=True), "features", input_size=(16, 16))
    result = cli("attack", store_path, "--attack", "inversion", "--set", "steps=5", "--set", "rows=4", "--set", "device=cpu")
    assert result.exit_code == 2
    line = error_line(result)
    assert "cannot rebuild the encoder" in line and "--set trust_checkpoint=true" in line
    assert "Traceback" not in result.stderr + result.stdout
    with open_store(store_path) as store:
        reason = applies(step(ATTACKS, "inversion", {}, explicit=False), store)
        assert reason is not None and "trust_checkpoint=true" in reason
        with pytest.raises(UntrustedCheckpointError):
            run_inversion(store, InversionConfig(rows=4, steps=5, device="cpu"))
    result = cli(
        "attack", store_path, "--attack", "inversion", "--set", "steps=5", "--set", "rows=4", "--set", "restarts=1",
        "--set", "device=cpu", "--set", "trust_checkpoint=true",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
