"""The attacker-independent bounds against closed forms: the k-NN Bayes risk and dFIL."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import norm

from leakaudit.html_report import render
from leakaudit.metrics.bounds import (
    BayesRiskConfig,
    FisherLeakageConfig,
    bayes_risk_metric,
    cover_hart_lower_bound,
    declared_noise,
    fisher_leakage_metric,
    jacobian_trace_hutchinson,
    neighbours_for,
)
from leakaudit.metrics.display import convergence_note
from leakaudit.store import open_store
from tests.attacks import balanced_split, synthetic_store
from tests.conftest import error_line

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _gaussian_store(path: Path, n: int, delta: float, *, width: int = 2, seed: int = 0) -> Path:
    """Two equally likely unit-variance Gaussian classes whose means are ``delta`` apart along one axis."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    z = rng.standard_normal((n, width)).astype(np.float32)
    z[:, 0] += delta * y
    return synthetic_store(path, z=z, labels={"private": y}, split=balanced_split(y), class_names={"private": ["a", "b"]})


# --------------------------------------------------------------------------- Bayes risk


@pytest.mark.parametrize("risk", [0.0, 0.05, 0.2, 0.5])
def test_cover_hart_bound_inverts_the_binary_nearest_neighbour_risk(risk):
    # Two classes with a constant posterior: the asymptotic 1-NN risk is 2R*(1 − R*), and the
    # bound is then tight.
    assert cover_hart_lower_bound(2 * risk * (1 - risk), 2) == pytest.approx(risk, abs=1e-12)


def test_cover_hart_bound_for_many_classes():
    assert cover_hart_lower_bound(0.0, 10) == 0.0
    assert cover_hart_lower_bound(0.9, 10) == pytest.approx(0.9)  # R₁ at chance: no leakage
    assert cover_hart_lower_bound(0.95, 10) == pytest.approx(0.9)  # beyond chance is capped there
    values = [cover_hart_lower_bound(r, 10) for r in np.linspace(0, 0.9, 10)]
    assert values == sorted(values) and all(v <= r for v, r in zip(values, np.linspace(0, 0.9, 10)))
    with pytest.raises(ValueError, match="at least 2 classes"):
        cover_hart_lower_bound(0.1, 1)


def test_k_grows_with_n_and_is_odd():
    assert [neighbours_for(n, "log") for n in (10, 100, 4000, 50_000)] == [3, 5, 9, 11]
    assert neighbours_for(4000, "sqrt") == 63 and neighbours_for(4000, "log10") == 5


def test_knn_estimate_on_two_gaussians_covers_the_bayes_error(tmp_path):
    # Bayes error of two unit-variance classes at distance Δ: Φ(−Δ/2).
    delta = 2.0
    truth = norm.cdf(-delta / 2)
    path = _gaussian_store(tmp_path / "gauss.h5", 5000, delta)
    with open_store(path) as store:
        result = bayes_risk_metric(store, BayesRiskConfig())
    details = result.details
    lo, hi = details["bayes_risk_knn_ci95"]
    assert lo <= truth <= hi, (result.values, truth)
    assert details["fit_rows"] == 4000 and details["test_rows"] == 1000 and details["k"] == 9
    # The bound is below the truth (Cover–Hart), and the accuracy bound above the Bayes accuracy.
    assert details["bayes_risk_lower_ci95"][0] <= result.values["bayes_risk_lower"] <= truth
    assert result.values["private_accuracy_bound"] == pytest.approx(1 - result.values["bayes_risk_lower"])
    assert result.values["private_accuracy_bound"] >= 1 - truth
    curve = details["convergence"]
    assert [p["n"] for p in curve] == [250, 500, 1000, 2000, 4000]
    assert curve[-1]["knn_error"] == result.values["bayes_risk_knn"]
    assert details["pca"] is None and details["features"] == 2


def test_no_information_gives_chance_and_wide_z_is_reduced(tmp_path):
    rng = np.random.default_rng(1)
    n = 600
    y = np.repeat(np.arange(3), n // 3)
    path = synthetic_store(tmp_path / "wide.h5", z=rng.standard_normal((n, 300)).astype(np.float32),
                           labels={"private": y}, split=balanced_split(y))  # fmt: skip
    with open_store(path) as store:
        result = bayes_risk_metric(store, BayesRiskConfig(dims=16))
        again = bayes_risk_metric(store, BayesRiskConfig(dims=16))
    assert result.to_dict() == again.to_dict()  # same settings, same numbers
    pca = result.details["pca"]
    assert pca["components"] == 16 and 0 < pca["explained_variance"] < 1 and result.details["features"] == 300
    # Z independent of the label: the estimate is chance (2/3) within its interval, and capped there.
    lo, hi = result.details["bayes_risk_knn_ci95"]
    assert lo <= 2 / 3 <= hi + 1e-12
    assert result.values["bayes_risk_knn"] <= result.details["chance_error"]
    assert result.values["bayes_risk_lower"] <= result.details["chance_error"]


def test_too_few_rows_for_knn_is_a_one_line_error(cli, tmp_path):
    y = np.tile([0, 1], 8)
    path = synthetic_store(tmp_path / "few.h5", z=np.random.default_rng(0).standard_normal((16, 4)).astype(np.float32),
                           labels={"private": y}, split=balanced_split(y))  # fmt: skip
    result = cli("metrics", path, "--only", "bayes-risk")
    assert result.exit_code == 2
    assert error_line(result) == (
        f"Error: bayes-risk needs at least 20 attacker rows and 10 test rows, but {str(path)!r} has 12 and 4. "
        "Dump more rows (--limit) or change --split."
    )


# --------------------------------------------------------------------------- dFIL


@pytest.mark.parametrize("mode", ["jvp", "vjp"])
def test_hutchinson_trace_of_a_linear_map_is_within_two_percent_at_64_probes(mode):
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, generator=generator, dtype=torch.float64)
    exact = float((w * w).sum())  # tr(WᵀW)
    x = torch.rand(200, 64, generator=generator, dtype=torch.float64)
    trace = jacobian_trace_hutchinson(lambda v: v @ w.T, x, 64, generator, mode)
    estimate = trace.per_row.mean()
    assert estimate == pytest.approx(exact, rel=0.02)
    standard_error = math.sqrt(trace.probe_variance.sum() / 64) / len(x)
    assert abs(estimate - exact) <= 4 * standard_error


FACTORY = '''
import torch
from torch import nn

from leakaudit.recipes.gaussian_noise import GaussianNoise
from leakaudit.recipes.shredder import LaplaceNoise


class Linear(nn.Module):
    """Flatten → linear encoder → {noise: Gaussian noise | laplace: Shredder's noise | norm: BatchNorm then Dropout} → a head."""

    input_size = (1, 8, 8)

    def __init__(self, num_classes: int = 10, kind: str = "noise") -> None:
        super().__init__()
        self.flat = nn.Flatten()
        self.enc = nn.Linear(64, 12)
        if kind == "noise":
            self.noise = GaussianNoise(0.25)
        elif kind == "laplace":
            self.noise = LaplaceNoise((12,), 0.25)
        else:
            self.norm = nn.BatchNorm1d(12)
            self.drop = nn.Dropout(0.5)
        self.kind = kind
        self.head = nn.Linear(12, num_classes)

    def forward(self, x):
        z = self.enc(self.flat(x))
        z = self.noise(z) if self.kind in ("noise", "laplace") else self.drop(self.norm(z))
        return self.head(z)


def build(num_classes: int = 10, kind: str = "noise") -> Linear:
    return Linear(num_classes, kind)
'''


def _linear_store(tmp_path: Path, kind: str, layer: str) -> tuple[Path, dict[str, torch.Tensor]]:
    from safetensors.torch import save_file

    from leakaudit.dump import DumpSettings, dump
    from leakaudit.models import ModelSpec

    factory = tmp_path / "linear_model.py"
    factory.write_text(FACTORY)
    namespace: dict = {}
    exec(compile(FACTORY, str(factory), "exec"), namespace)
    torch.manual_seed(3)
    model = namespace["build"](kind=kind)
    if kind == "norm":  # running statistics far from (0, 1), so that eval-mode BatchNorm changes J
        model.norm.running_var.uniform_(0.2, 4.0)
        model.norm.running_mean.uniform_(-1, 1)
        model.norm.weight.data.uniform_(0.5, 2.0)
    if kind == "laplace":  # a learned scale per element, as Shredder leaves it
        model.noise.log_scale.data.uniform_(-2.5, -0.5)
        model.noise.loc.data.uniform_(-0.2, 0.2)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    weights = tmp_path / f"{kind}.safetensors"
    save_file(state, str(weights))
    path = tmp_path / f"{kind}.h5"
    torch.manual_seed(0)
    dump(DumpSettings(model=ModelSpec(f"{factory}:build", weights=str(weights), args={"kind": kind}), layer=layer,
                      data="digits", output=path, limit=400, tasks=(("private", "label"),)))  # fmt: skip
    return path, state


def test_dfil_of_a_linear_encoder_with_gaussian_noise_is_its_closed_form(tmp_path):
    path, state = _linear_store(tmp_path, "noise", "noise")
    w = state["enc.weight"].double()
    sigma, d = 0.25, 64
    expected = float((w * w).sum()) / (d * sigma**2)  # tr(WᵀW) / (d σ²)
    with open_store(path) as store:
        result = fisher_leakage_metric(store, FisherLeakageConfig(probes=64))
    details = result.details
    assert details["sigma"] == sigma and details["sigma_source"] == "encoder"
    assert details["declared_at"] == ["noise.noise_sigma"] and details["input_elements"] == d
    assert details["rows"] == 80 and details["probes"] == 64 and details["jacobian_products"] == "jvp"
    assert result.values["dfil"] == pytest.approx(expected, rel=0.02)
    assert result.values["mse_bound"] == pytest.approx(1 / result.values["dfil"])
    assert abs(result.values["dfil"] - expected) <= 4 * details["probe_standard_error"]
    json.dumps(result.to_dict())


def test_dfil_of_a_linear_encoder_with_laplace_noise_is_its_closed_form(tmp_path):
    path, state = _linear_store(tmp_path, "laplace", "noise")
    w = state["enc.weight"].double()
    b = state["noise.log_scale"].double().exp()
    d = 64
    expected = float((w * w / (b * b)[:, None]).sum()) / d  # tr(Wᵀ diag(1/b²) W) / d
    with open_store(path) as store:
        result = fisher_leakage_metric(store, FisherLeakageConfig(probes=64))
    details = result.details
    assert details["noise"] == "laplace" and details["sigma"] is None and details["declared_at"] == ["noise"]
    assert details["laplace_scale"]["min"] == pytest.approx(float(b.min()))
    assert result.values["dfil"] == pytest.approx(expected, rel=0.02)
    assert abs(result.values["dfil"] - expected) <= 4 * details["probe_standard_error"]
    # The same encoder read as Gaussian noise of one given σ is another, also closed-form, number.
    with open_store(path) as store:
        given = fisher_leakage_metric(store, FisherLeakageConfig(probes=64, sigma=0.3))
    assert given.details["noise"] == "gaussian" and "Laplace" in given.details["warning"]
    assert given.values["dfil"] == pytest.approx(float((w * w).sum()) / (d * 0.09), rel=0.02)


def test_declared_laplace_scales_are_found_and_are_not_in_the_saved_weights():
    from torch import nn

    from leakaudit.metrics.bounds import declared_laplace
    from leakaudit.recipes.shredder import LaplaceNoise

    noise = LaplaceNoise((3,), 0.5)
    scale, where = declared_laplace(nn.Sequential(nn.Linear(2, 3), noise))
    assert where == ["1"] and torch.allclose(scale, torch.full((3,), 0.5, dtype=torch.float64))
    assert set(noise.state_dict()) == {"loc", "log_scale"}  # old noise.safetensors still load
    assert declared_laplace(nn.Sequential(LaplaceNoise((3,), 0.5), LaplaceNoise((3,), 0.5))) == (None, ["0", "1"])
    assert declared_laplace(nn.Linear(2, 2)) == (None, [])


def test_dfil_takes_the_eval_mode_jacobian_of_batchnorm_and_dropout(tmp_path):
    path, state = _linear_store(tmp_path, "norm", "drop")
    scale = state["norm.weight"].double() / torch.sqrt(state["norm.running_var"].double() + 1e-5)
    j = scale[:, None] * state["enc.weight"].double()  # BatchNorm in eval mode is affine; Dropout is the identity
    sigma = 0.5
    expected = float((j * j).sum()) / (64 * sigma**2)
    with open_store(path) as store:
        undefined = fisher_leakage_metric(store, FisherLeakageConfig())
        result = fisher_leakage_metric(store, FisherLeakageConfig(sigma=sigma))
        again = fisher_leakage_metric(store, FisherLeakageConfig(sigma=sigma))
    assert undefined.values == {"dfil": None, "mse_bound": None}
    assert "declares no noise scale" in undefined.details["reason"] and "Laplace" in undefined.details["reason"]
    assert result.details["sigma_source"] == "config"
    assert result.values["dfil"] == pytest.approx(expected, rel=0.02)
    assert result.to_dict() == again.to_dict()


def test_an_encoder_that_does_not_reproduce_the_store_gives_no_dfil(tmp_path):
    import h5py

    from leakaudit.store import record_checksums

    path, _ = _linear_store(tmp_path, "norm", "drop")
    with h5py.File(path, "r+") as f:
        f["activations"][...] = 2 * f["activations"][...]
    record_checksums(path)  # a deliberate edit: the store vouches for Z the encoder does not give
    with open_store(path) as store:
        result = fisher_leakage_metric(store, FisherLeakageConfig(sigma=0.5))
    assert result.values == {"dfil": None, "mse_bound": None}
    assert result.details["reason"] == (
        "the rebuilt encoder does not reproduce the stored activations (the model or its weights differ from the dump's)"
    )


def test_declared_noise_is_found_in_buffers_and_attributes():
    from leakaudit.recipes.gaussian_noise import GaussianNoise

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), GaussianNoise(0.3, clip=2.0))
    assert declared_noise(model) == (pytest.approx(0.3), 2.0, ["1.noise_sigma"])
    plain = torch.nn.Linear(2, 2)
    assert declared_noise(plain) == (None, None, [])
    plain.noise_sigma = 0.7  # a user's module may declare it as a plain attribute
    assert declared_noise(plain)[0] == 0.7
    two = torch.nn.Sequential(GaussianNoise(0.3), GaussianNoise(0.4))
    assert declared_noise(two) == (None, None, ["0.noise_sigma", "1.noise_sigma"])


def test_bad_sigma_is_a_one_line_error(cli, small_digits_store):
    result = cli("metrics", small_digits_store, "--only", "fisher-leakage", "--set", "fisher-leakage.sigma=0")
    assert result.exit_code == 2
    assert error_line(result) == "Error: fisher-leakage: sigma must be a positive number, got 0."


def test_the_bound_reaches_the_report_with_its_interval_and_a_gate_can_use_it(cli, tmp_path):
    # A gate on the accuracy no attacker can beat, taken at the interval's upper end: the
    # interval must be in report.json's metrics, not only in the metric's details.
    path = _gaussian_store(tmp_path / "gauss.h5", 1000, 2.0)
    report, policy = tmp_path / "report.json", tmp_path / "policy.yaml"
    assert cli("metrics", path, "--only", "bayes-risk", "--report", report).exit_code == 0
    metrics = json.loads(report.read_text())["metrics"]
    lo, hi = metrics["private_accuracy_bound_ci95"]
    assert lo <= metrics["private_accuracy_bound"] <= hi and hi > lo
    assert metrics["bayes_risk_knn_ci95"][0] <= metrics["bayes_risk_knn"] <= metrics["bayes_risk_knn_ci95"][1]
    middle = (metrics["private_accuracy_bound"] + hi) / 2
    policy.write_text(f"thresholds:\n  private_accuracy_bound: {{max: {middle}, use: upper95}}\n")
    result = cli("gate", report, "--policy", policy)
    assert result.exit_code == 1, result.output  # the point value passes, the upper end does not
    policy.write_text(f"thresholds:\n  private_accuracy_bound: {{max: {middle}}}\n")
    assert cli("gate", report, "--policy", policy).exit_code == 0
    # The HTML report shows the estimate's convergence over n, one row per subsample.
    page = render(json.loads(report.read_text()))
    section = page.split("Bayes-risk estimate and its convergence over n", 1)[1].split("</section>", 1)[0]
    curve = json.loads(report.read_text())["results"]["metric:bayes-risk"]["details"]["convergence"]
    assert section.count("<tr>") == 1 + len(curve) and all(f">{p['n']}<" in section for p in curve)


@pytest.mark.parametrize(
    "errors, falling",
    [([0.5, 0.3, 0.2, 0.15], True), ([0.5, 0.3, 0.2, 0.2], False), ([0.5, 0.3, 0.31, 0.2], False)],
)
def test_the_convergence_note_says_whether_the_estimate_still_falls(errors, falling):
    note = convergence_note([{"n": 100 * 2**i, "knn_error": e} for i, e in enumerate(errors)])
    assert ("probably not converged" in note) is falling
    assert "Too few points" in convergence_note([{"n": 1, "knn_error": 0.5}])
