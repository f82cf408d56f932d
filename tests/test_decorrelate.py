"""The universal decorrelation: its objective, gradient and update against direct computations."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from leakaudit.cli import app
from leakaudit.decorrelate import DecorrelateConfig, Objective, _normalise, decorrelate, laplacian, mm_step, one_hot
from leakaudit.errors import DataError, NonFiniteError, UsageError
from leakaudit.metrics.dcor import distance_correlation, distance_correlation_torch


def _problem(n: int = 24, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    x = rng.normal(size=(n, 5)) + labels[:, None]  # X depends on Y, as images depend on their class
    return x, one_hot(labels), rng.normal(size=(n, 4))


@pytest.mark.parametrize("beta", [0.0, 0.7, 1.0])
def test_objective_is_the_metrics_dcor(beta):
    x, y, z = _problem()
    objective = Objective(x, y, beta)
    dx, dy = distance_correlation(x, z), distance_correlation(y, z)
    assert objective.value(z) == pytest.approx(dy**2 - beta * dx**2, abs=1e-12)
    assert objective.terms(z) == pytest.approx((dx**2, dy**2), abs=1e-12)


def test_laplacian_traces_are_half_the_weighted_distances():
    _, _, z = _problem()
    rng = np.random.default_rng(1)
    m = rng.normal(size=(24, 24))
    m = m + m.T
    b = np.linalg.norm(z[:, None] - z[None], axis=-1)
    lap = laplacian(m, b)
    assert np.trace(z.T @ lap @ z) == pytest.approx(0.5 * float((m * b).sum()), rel=1e-12)
    assert np.allclose(lap.sum(axis=1), 0.0)


def test_gradient_equals_autograd_of_the_dcor_objective():
    x, y, z = _problem()
    beta = 0.7
    zt = torch.tensor(z, requires_grad=True)
    f = distance_correlation_torch(torch.tensor(y), zt) ** 2 - beta * distance_correlation_torch(torch.tensor(x), zt) ** 2
    f.backward()
    assert np.allclose(Objective(x, y, beta).gradient(z), zt.grad.numpy(), atol=1e-9)


def test_each_update_increases_the_objective_without_backtracking():
    x, y, _ = _problem(40)
    result = decorrelate(x, y, DecorrelateConfig(iterations=8, gamma=1.0))
    values = [h.objective for h in result.history]
    assert all(b > a for a, b in zip(values, values[1:])), values
    assert all(h.backtracks == 0 for h in result.history)  # the bound held at this γ: no safeguard needed
    assert result.history[-1].dcor_x < result.history[0].dcor_x - 0.05
    assert result.history[0].dcor_x == pytest.approx(1.0)  # Z_0 = X


def test_history_reports_the_metrics_dcor_of_the_returned_z():
    x, y, _ = _problem(30)
    result = decorrelate(x, y, DecorrelateConfig(iterations=3))
    last = result.history[-1]
    assert last.dcor_x == distance_correlation(x, result.z)
    assert last.dcor_y == distance_correlation(y, result.z)


def test_step_at_the_smallest_positive_definite_damping_is_an_ascent_step():
    """What holds: P† ∇f is an ascent direction (P positive definite), and on random problems the
    full step at the smallest admissible γ² (just above α λ_max(S)) increased f every time, so the
    doubling safeguard did not have to act. This is measured, not proven: the weights of S change
    sign, so no fixed γ is a majoriser everywhere."""
    for seed in range(12):
        for start in ("x", "random"):
            x, y, z_random = _problem(12, seed)
            objective = Objective(x, y, 1.0)
            z = _normalise(x if start == "x" else z_random)
            f0, s, l_z, rho, _ = objective.pieces(z)
            n = len(z)
            j = np.eye(n) - 1.0 / n
            lam = float(np.linalg.eigvalsh(j @ s @ j).max())
            p = 1.01 * lam * j - s + np.full((n, n), 1.0 / n)
            assert np.linalg.eigvalsh(p).min() > 0
            direction = np.linalg.solve(p, (s - rho * l_z) @ z)
            assert float((objective.gradient(z) * direction).sum()) > 0
            assert objective.value(_normalise(z + direction)) > f0
            z1, f1, gamma2, doublings = mm_step(objective, z, 1.0, 1.01 * lam)
            assert doublings == 0 and f1 > f0


def test_fixed_point_is_a_stationary_point():
    x, y, _ = _problem(30)
    result = decorrelate(x, y, DecorrelateConfig(iterations=60, gamma=0.3))
    objective = Objective(x, y, 1.0)
    grad_start = np.linalg.norm(objective.gradient(_normalise(x)))
    grad_end = np.linalg.norm(objective.gradient(result.z))
    assert grad_end < 0.05 * grad_start


def test_gradient_method_runs_beside_and_lowers_dcor_x():
    x, y, _ = _problem(30)
    result = decorrelate(x, y, DecorrelateConfig(iterations=10, method="gradient"))
    assert result.history[-1].dcor_x < result.history[0].dcor_x
    assert all(h.gamma2 is None for h in result.history)


def test_subsample_above_max_rows_is_recorded_and_seeded():
    x, y, _ = _problem(50)
    a = decorrelate(x, y, DecorrelateConfig(iterations=1, max_rows=20, seed=3))
    b = decorrelate(x, y, DecorrelateConfig(iterations=1, max_rows=20, seed=3))
    assert a.subsampled and len(a.rows) == 20 and a.to_dict()["subsampled"] is True
    assert np.array_equal(a.rows, b.rows) and np.array_equal(a.z, b.z)


def test_bad_inputs():
    x, y, _ = _problem(10)
    with pytest.raises(UsageError, match="at least 4 rows"):
        decorrelate(x[:3], y[:3], DecorrelateConfig())
    with pytest.raises(DataError, match="same number of rows"):
        decorrelate(x, y[:9], DecorrelateConfig())
    bad = x.copy()
    bad[2, 1] = np.nan
    with pytest.raises(NonFiniteError, match="NaN"):
        decorrelate(bad, y, DecorrelateConfig())
    with pytest.raises(DataError, match="Y is constant"):
        decorrelate(x, np.ones((10, 1)), DecorrelateConfig())


def test_cli_digits_writes_history_and_z(tmp_path):
    out = tmp_path / "dec"
    result = CliRunner().invoke(app, ["decorrelate", "--data", "digits", "--limit", "60", "-n", "3", "-o", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "decorrelate.json").read_text())
    assert [h["iteration"] for h in record["history"]] == [0, 1, 2, 3]
    z = np.load(out / "z.npy")
    assert z.shape == (60, 64)
    again = CliRunner().invoke(app, ["decorrelate", "--data", "digits", "--limit", "60", "-o", str(out)])
    assert again.exit_code == 2
    assert again.output.strip().splitlines()[-1] == f"Error: {str(out)!r} exists. Pass --force to replace it."


def test_cli_table_npz(tmp_path):
    from sklearn.datasets import load_wine

    x, y = load_wine(return_X_y=True)
    path = tmp_path / "wine.npz"
    np.savez(path, x=x, y=y)
    out = tmp_path / "dec"
    result = CliRunner().invoke(app, ["decorrelate", "--data", f"npz:{path}", "-n", "2", "-o", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "decorrelate.json").read_text())
    assert record["input"]["kind"] == "table" and record["rows"] == 178
    short = tmp_path / "short.npz"
    np.savez(short, x=x, y=y[:10])
    bad = CliRunner().invoke(app, ["decorrelate", "--data", f"npz:{short}", "-o", str(tmp_path / "d2")])
    assert bad.exit_code == 2
    assert "has 178 rows but 'y' has 10" in bad.output
