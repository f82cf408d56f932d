"""The black-box substitute-encoder attack: architecture only, unpaired rows, scored on test Z."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from leakaudit.attacks._alignment import gaussian_mmd2, reinitialised
from leakaudit.attacks.substitute import SubstituteConfig, run_substitute
from leakaudit.errors import UsageError
from leakaudit.models import LeNet5
from leakaudit.store import open_store
from tests.conftest import error_line

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FAST = {"align_epochs": 6, "epochs": 6, "patience": 3, "width": 8, "device": "cpu"}
#: The alignment needs more epochs than FAST's to pass the floor clearly on the trained store.
ALIGNED = {**FAST, "align_epochs": 20, "epochs": 5}


class _RecordingStore:
    """An open store that records which rows' X and Z an attack read."""

    def __init__(self, store) -> None:
        self._store = store
        self.x_rows: set[int] = set()
        self.z_rows: set[int] = set()

    def inputs(self, rows):
        self.x_rows.update(int(r) for r in np.asarray(rows))
        return self._store.inputs(rows)

    def activations(self, rows):
        self.z_rows.update(int(r) for r in np.asarray(rows))
        return self._store.activations(rows)

    def __getattr__(self, name):
        return getattr(self._store, name)


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def trained(trained_digits_store):
    from tests.attacks import single_thread

    before = _sha256(trained_digits_store)
    with single_thread(), open_store(trained_digits_store) as store:
        recording = _RecordingStore(store)
        result = run_substitute(recording, SubstituteConfig(**ALIGNED))
        roles = {role: set(store.rows(role).tolist()) for role in ("attacker-train", "attacker-validation", "test")}
    return result, recording, roles, before


# ----------------------------------------------------------------------------- the pieces


def test_mmd_matches_the_closed_form_for_two_gaussians():
    # For N(μ1, s²I) and N(μ2, s²I) in d dimensions and the kernel exp(−‖x−y‖²/(2h²)):
    # MMD² = 2 c (1 − exp(−‖μ1−μ2‖² / (2(h² + 2s²)))), c = (h² / (h² + 2s²))^(d/2).
    generator = torch.Generator().manual_seed(0)
    d, s, n = 3, 1.0, 1000
    widths = torch.tensor([1.0, 2.0], dtype=torch.float64)
    for shift in (torch.tensor([1.0, 0.5, 0.0]), torch.tensor([2.0, 0.0, 0.0])):
        expected = 0.0
        for h in widths.tolist():
            c = (h**2 / (h**2 + 2 * s**2)) ** (d / 2)
            expected += 2 * c * (1 - math.exp(-float(shift.pow(2).sum()) / (2 * (h**2 + 2 * s**2))))
        # One estimate's standard deviation is about 0.01 here; eight are averaged.
        estimates = [
            float(gaussian_mmd2(torch.randn(n, d, generator=generator, dtype=torch.float64) * s,
                                torch.randn(n, d, generator=generator, dtype=torch.float64) * s + shift, widths))
            for _ in range(8)
        ]  # fmt: skip
        assert np.mean(estimates) == pytest.approx(expected, abs=0.012)
    a, b = (torch.randn(n, d, generator=generator, dtype=torch.float64) for _ in range(2))
    assert abs(float(gaussian_mmd2(a, b, widths))) < 0.005  # unbiased: about zero for one distribution


class _BatchNormDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5))
        self.scale = nn.Parameter(torch.full((4,), 3.0))  # owned by no module with reset_parameters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) * self.scale.view(1, -1, 1, 1)


def test_the_substitute_starts_from_no_trained_value_and_leaves_the_encoder_alone():
    torch.manual_seed(1)
    encoder = _BatchNormDropout()
    with torch.no_grad():  # trained values: none equals a default initialisation
        for p in encoder.parameters():
            p.add_(torch.rand_like(p))
    encoder.train()(torch.rand(8, 1, 6, 6))  # batch-norm statistics that are not the defaults
    encoder.eval()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    substitute, warnings = reinitialised(encoder, seed=7)
    after = encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and not encoder.training
    assert all(not m.training for m in encoder.modules())
    fresh = substitute.state_dict()
    for name, value in before.items():
        if value.is_floating_point():
            assert not torch.equal(fresh[name], value), name
    assert torch.equal(fresh["body.1.running_mean"], torch.zeros(4))  # batch norm reset to its defaults
    assert torch.equal(fresh["body.1.running_var"], torch.ones(4))
    assert any("no reset_parameters" in w for w in warnings)  # `scale` was drawn generically


def test_the_substitute_does_not_depend_on_the_real_weights():
    torch.manual_seed(0)
    trained, other = LeNet5(), LeNet5()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(-3.0).add_(1.0)
    a, _ = reinitialised(trained, seed=5)
    b, _ = reinitialised(other, seed=5)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name  # the same draw whatever the real weights were
    c, _ = reinitialised(trained, seed=6)
    assert not torch.equal(a.state_dict()["conv1.0.weight"], c.state_dict()["conv1.0.weight"])


# ----------------------------------------------------------------------------- the attack


def test_reconstructs_digits_from_a_trained_lenet_without_its_weights(trained):
    result, *_ = trained
    assert result.scores.ssim_mean >= result.mean_image.ssim_mean + 0.1
    assert result.scores.ssim_p95 >= result.mean_image.ssim_p95 + 0.1
    assert result.scores.psnr > result.mean_image.psnr


def test_no_row_gives_the_attacker_both_its_x_and_its_z(trained):
    _, recording, roles, _ = trained
    x_rows = recording.x_rows - roles["test"]
    z_rows = recording.z_rows - roles["test"]
    assert x_rows == roles["attacker-train"]
    assert z_rows == roles["attacker-validation"]
    assert not x_rows & z_rows
    # Test rows: their Z is reconstructed, their X is read only to score.
    assert recording.z_rows >= roles["test"]


def test_result_json_declares_its_threat_model(trained, trained_digits_store):
    result, _, roles, before = trained
    data = json.loads(json.dumps(result.to_dict()))
    assert data["attack"] == "substitute"
    threat = data["threat"]
    assert threat["knows"] == "architecture" and threat["holds"] == "unpaired"
    assert threat["rows"] == len(roles["attacker-train"]) + len(roles["attacker-validation"])
    assert "attacker-train" in threat["source"] and "attacker-validation" in threat["source"]
    names = {"ssim_mean", "ssim_p95", "psnr", "mse", "ssim_p95_mean_image"}
    assert set(result.report_metrics()) == names | {f"{n}_ci95" for n in names}
    assert data["ssim_mean"] == result.scores.ssim_mean
    assert data["prior"].startswith("a prior learned from auxiliary inputs")
    assert "reconstructions" not in data and "test_rows" not in data
    assert _sha256(trained_digits_store) == before  # the store is untouched


def test_is_deterministic_per_seed(small_digits_store):
    settings = SubstituteConfig(**{**FAST, "align_epochs": 2, "epochs": 2})
    with open_store(small_digits_store) as store:
        first = run_substitute(store, settings)
        second = run_substitute(store, settings)
    assert first.scores == second.scores
    np.testing.assert_array_equal(first.reconstructions, second.reconstructions)


def test_noise_z_scores_the_mean_image(noise_store):
    with open_store(noise_store) as store:
        result = run_substitute(store, SubstituteConfig(**FAST))
    assert abs(result.scores.ssim_mean - result.mean_image.ssim_mean) <= 0.02
    assert abs(result.scores.ssim_p95 - result.mean_image.ssim_p95) <= 0.02
    check = result.alignment["chance_check"]
    assert check["mean_image"] and check["p_value"] > 0.01
    assert any("no more than chance" in w for w in result.warnings)


def test_trained_z_passes_the_chance_check(trained):
    check = trained[0].alignment["chance_check"]
    assert not check["mean_image"] and check["p_value"] <= 0.01
    assert check["agreement"] > check["chance"]


def test_chance_check_matches_the_hypergeometric_tail():
    # Binary guesses against a permutation of binary labels: the number of agreements is
    # k11 + k00 with k11 ~ Hypergeometric(N, K labels 1, G guesses 1), k00 = N − K − G + k11,
    # so P(agreement ≥ a) is the hypergeometric tail at k11 ≥ (a·N − N + K + G) / 2.
    from scipy.stats import hypergeom

    from leakaudit.attacks.substitute import PERMUTATIONS, chance_check

    rng = np.random.default_rng(3)
    n = 60
    labels = torch.from_numpy(rng.integers(0, 2, n))
    for flip in (0.5, 0.38, 0.3):  # independent guesses, a weak and a clear signal
        guess = torch.where(torch.from_numpy(rng.random(n) < flip), 1 - labels, labels)
        result = chance_check(guess, labels, seed=0)
        big_k, big_g = int(labels.sum()), int(guess.sum())
        agree = round(result["agreement"] * n)
        exact = hypergeom.sf(math.ceil((agree - n + big_k + big_g) / 2) - 1, n, big_k, big_g)
        monte_carlo = (1 + PERMUTATIONS * exact) / (1 + PERMUTATIONS)  # the observed order counts once
        assert result["p_value"] == pytest.approx(monte_carlo, abs=3 * math.sqrt(exact * (1 - exact) / PERMUTATIONS) + 2e-3)
        assert result["chance"] == pytest.approx((big_k * big_g + (n - big_k) * (n - big_g)) / n**2, abs=0.01)


def test_without_the_public_task_it_aligns_on_z_alone(small_digits_store):
    with open_store(small_digits_store) as store:
        result = run_substitute(store, SubstituteConfig(**{**FAST, "align_epochs": 2, "epochs": 2, "task": "nope"}))
    assert any("no task 'nope'" in w for w in result.warnings)
    assert result.alignment["public_agreement_heldout"] is None
    assert "public labels" not in result.threat["source"]


# ----------------------------------------------------------------------------- the command line


def test_cli_end_to_end(cli, small_digits_store, tmp_path):
    out, grid = tmp_path / "sub.json", tmp_path / "grid.png"
    result = cli("attack", small_digits_store, "--attack", "substitute", "--set", "align_epochs=2", "--set", "epochs=2",
                 "--set", "width=8", "--set", "device=cpu", "--json", out, "--artifact", f"grid={grid}",
                 "--report", tmp_path / "report.json")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["attack"] == "substitute" and data["threat"]["knows"] == "architecture"
    assert grid.stat().st_size > 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["metrics"]["ssim_mean"] == pytest.approx(data["ssim_mean"])


def test_cli_refuses_an_untrusted_archive_in_one_line(cli, tmp_path):
    from leakaudit.dump import DumpSettings, dump
    from leakaudit.models import ModelSpec

    torch.manual_seed(0)
    archive = tmp_path / "full.pt"
    torch.save(nn.Sequential(_BatchNormDropout(), nn.Flatten(), nn.Linear(4 * 12 * 12, 10)).eval(), archive)
    store = tmp_path / "archive.h5"
    dump(DumpSettings(model=ModelSpec(str(archive), trust_checkpoint=True), layer="0", data="digits", output=store,
                      input_size=(12, 12), limit=120))  # fmt: skip
    result = cli("attack", store, "--attack", "substitute", "--set", "device=cpu", "--report", tmp_path / "r.json")
    assert result.exit_code == 2
    line = error_line(result)
    assert "arbitrary code" in line or "trust" in line, line
    with open_store(store) as handle, pytest.raises(UsageError):
        run_substitute(handle, SubstituteConfig(**FAST))


def test_cli_says_why_a_model_cannot_be_rebuilt(cli, small_digits_store, tmp_path):
    import shutil

    import h5py

    from leakaudit.store import record_checksums

    store = tmp_path / "moved.h5"
    shutil.copyfile(small_digits_store, store)
    with h5py.File(store, "r+") as f:
        f.attrs["weights"] = str(tmp_path / "gone.safetensors")
    record_checksums(store)
    result = cli("attack", store, "--attack", "substitute", "--set", "device=cpu", "--report", tmp_path / "r.json")
    assert result.exit_code == 2
    assert "is not there any more" in error_line(result)
