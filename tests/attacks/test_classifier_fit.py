"""The classifier's strength: the linear probe converges, the strongest head matches scikit-learn, every pair is used.

References are scikit-learn's own estimators on the same standardised rows, each setting
chosen on the same attacker-validation rows from the same grid:
``LogisticRegression`` (L-BFGS, run to a tight tolerance), ``SVC`` (RBF) and
``HistGradientBoostingClassifier``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.svm import SVC
from threadpoolctl import threadpool_limits

from leakaudit.attacks import ClassifierConfig, run_classifier
from leakaudit.attacks._training import Standardizer
from leakaudit.attacks.classifier_fit import LINEAR_C_GRID, SVM_C_GRID, SVM_GAMMA_SCALES, linear_probe
from leakaudit.store import open_store
from tests.attacks import balanced_split, synthetic_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FASHION = Path("/usr/share/datasets/fashion-mnist")


def _roles(store_path: Path, task: str = "private") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Flattened Z and labels per role, standardised with attacker-train statistics (as the tool does)."""
    with open_store(store_path) as store:
        labels = store.labels(task)
        raw = {role: (store.activations(store.rows(role)), labels[store.rows(role)]) for role in ("attacker-train", "attacker-validation", "test")}
    train = torch.from_numpy(raw["attacker-train"][0]).flatten(1)
    scale = Standardizer.fit(train)
    return {role: (scale(torch.from_numpy(z).flatten(1)).double().numpy(), y) for role, (z, y) in raw.items()}


def _chosen_on_validation(rows, make, grid) -> tuple[float, float, object]:
    """(validation accuracy, test accuracy, setting) of the grid's best estimator on validation (ties: the first)."""
    (x, y), (val_x, val_y), (test_x, test_y) = rows["attacker-train"], rows["attacker-validation"], rows["test"]
    best = None
    for setting in grid:
        model = make(setting).fit(x, y)
        val = model.score(val_x, val_y)
        if best is None or val > best[0]:
            best = (val, model.score(test_x, test_y), setting)
    assert best is not None
    return best


def _sklearn_logistic(rows) -> tuple[float, float, object]:
    return _chosen_on_validation(rows, lambda c: LogisticRegression(C=c, max_iter=10_000, tol=1e-8), sorted(LINEAR_C_GRID))


def _digits_pixel_store(tmp_path: Path) -> Path:
    x, y = load_digits(return_X_y=True)
    return synthetic_store(tmp_path / "pixels.h5", z=(x / 16.0).astype(np.float32), labels={"private": y}, split=balanced_split(y))


@pytest.mark.parametrize("source", ["pixels", "store"])
def test_linear_head_is_within_a_point_of_sklearn_logistic_regression(source, tmp_path, trained_digits_store):
    path = _digits_pixel_store(tmp_path) if source == "pixels" else trained_digits_store
    with open_store(path) as store:
        result = run_classifier(store, ClassifierConfig(head="linear", raw_reference=False, refit="none"))
    (head,) = result.heads
    with threadpool_limits(1):
        sk_val, sk_test, sk_c = _sklearn_logistic(_roles(path))
    assert abs(head.val_accuracy - sk_val) <= 0.01, (head.val_accuracy, sk_val)
    assert abs(head.accuracy - sk_test) <= 0.01, (head.accuracy, sk_test, head.chosen, sk_c)
    assert head.chosen["c"] in LINEAR_C_GRID and head.epochs >= 1  # L-BFGS iterations of the chosen fit
    assert result.protocol == "selection" and head.refit_accuracy is None


def test_linear_probe_is_deterministic_and_converges_to_sklearns_coefficients():
    x, y = load_digits(return_X_y=True)
    x = torch.from_numpy(x[:600]).float()
    y = torch.from_numpy(y[:600])
    x = Standardizer.fit(x)(x)
    first = linear_probe((x[:400], y[:400]), (x[400:], y[400:]), 10, device=torch.device("cpu"), grid=(0.1,))
    again = linear_probe((x[:400], y[:400]), (x[400:], y[400:]), 10, device=torch.device("cpu"), grid=(0.1,))
    assert torch.equal(first.weight, again.weight) and torch.equal(first.bias, again.bias)
    reference = LogisticRegression(C=0.1, max_iter=10_000, tol=1e-10).fit(x[:400].double().numpy(), y[:400].numpy())
    np.testing.assert_allclose(first.weight.numpy().T, reference.coef_, atol=1e-4)
    np.testing.assert_allclose(first.bias.numpy() - first.bias.numpy().mean(), reference.intercept_ - reference.intercept_.mean(), atol=1e-4)


def test_strongest_head_is_not_below_sklearns_best(trained_digits_store):
    with open_store(trained_digits_store) as store:
        result = run_classifier(store, ClassifierConfig(head="fresh", raw_reference=False, epochs=30, patience=8))
    rows = _roles(trained_digits_store)
    with threadpool_limits(1):
        candidates = {
            "logistic": _sklearn_logistic(rows),
            "svm": _chosen_on_validation(
                rows,
                lambda s: SVC(C=s[0], gamma=s[1] / rows["test"][0].shape[1]),
                [(c, g) for c in SVM_C_GRID for g in SVM_GAMMA_SCALES],
            ),
            "boosting": _chosen_on_validation(rows, lambda _: HistGradientBoostingClassifier(random_state=0), [None]),
        }
    name, (_, sk_best, _) = max(candidates.items(), key=lambda item: item[1][0])  # chosen on validation, like the tool
    assert result.private_accuracy >= sk_best, (result.best_head, result.private_accuracy, name, sk_best, candidates)
    # The tool's SVM is scikit-learn's SVC on the same rows and grid: the same choice, the same test accuracy.
    svm = next(h for h in result.heads if h.name == "svm")
    assert svm.ok and svm.accuracy == pytest.approx(candidates["svm"][1]) and svm.val_accuracy == pytest.approx(candidates["svm"][0])


def test_refit_uses_train_and_validation_rows_with_the_chosen_epochs(small_digits_store):
    def run(refit: str):
        with open_store(small_digits_store) as store:
            return run_classifier(store, ClassifierConfig(head="fresh", raw_reference=False, epochs=4, refit=refit))

    result = run("all")
    pairs = result.rows["attacker-train"] + result.rows["attacker-validation"]
    by_name = {h.name: h for h in result.heads if h.ok}
    assert set(by_name) == {"linear", "svm", "mlp"}  # conv: 120×1×1 has no spatial extent
    for head in by_name.values():
        assert head.refit_rows == pairs, head.name
        lo, hi = head.refit_accuracy_ci95
        assert lo <= head.refit_accuracy <= hi
    assert by_name["mlp"].refit_epochs == by_name["mlp"].best_epoch
    best = by_name[result.best_head]
    assert result.protocol == ("refit" if best.refit_accuracy > best.accuracy else "selection")
    assert result.private_accuracy == max(best.accuracy, best.refit_accuracy)
    assert result.to_dict()["protocol"] == result.protocol
    # Deterministic, and "chosen" refits the chosen head only, to the same numbers.
    chosen = run("chosen")
    assert {h.name for h in chosen.heads if h.refit_accuracy is not None} == {chosen.best_head}
    again = {h.name: h for h in chosen.heads}[result.best_head]
    assert (again.refit_accuracy, again.refit_accuracy_ci95) == (best.refit_accuracy, best.refit_accuracy_ci95)
    assert run("none").protocol == "selection"


def test_noise_z_stays_at_chance_with_every_head_refitted(noise_store):
    with open_store(noise_store) as store:
        result = run_classifier(store, ClassifierConfig(head="fresh", raw_reference=False, epochs=15, patience=5, refit="all"))
    for head in result.heads:
        if head.ok:
            assert abs(head.accuracy - result.chance) <= 0.06, head.name
            assert abs(head.refit_accuracy - result.chance) <= 0.06, head.name
    assert abs(result.private_accuracy - result.chance) <= 0.06


def test_svm_fits_a_recorded_subsample_above_svm_rows(tmp_path):
    path = _digits_pixel_store(tmp_path)
    with open_store(path) as store:
        result = run_classifier(store, ClassifierConfig(head="svm", raw_reference=False, svm_rows=200))
    (head,) = result.heads
    assert head.train_rows == 200 and head.refit_rows == 200
    assert head.accuracy > 0.8  # 200 digits still teach an RBF SVM the digits


@pytest.mark.slow
@pytest.mark.skipif(not FASHION.is_dir(), reason="no Fashion-MNIST idx files")
def test_linear_probe_matches_sklearn_on_fashion_mnist():
    from leakaudit.data.sources import _read_idx

    images = _read_idx(FASHION / "train-images-idx3-ubyte.gz")[:16_000].reshape(16_000, -1).astype(np.float32) / 255
    labels = _read_idx(FASHION / "train-labels-idx1-ubyte.gz")[:16_000].astype(np.int64)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    x = Standardizer.fit(x[:8_000])(x)
    parts = {"attacker-train": slice(0, 8_000), "attacker-validation": slice(8_000, 12_000), "test": slice(12_000, 16_000)}
    rows = {role: (x[s].double().numpy(), labels[s]) for role, s in parts.items()}
    fit = linear_probe((x[parts["attacker-train"]], y[parts["attacker-train"]]), (x[8_000:12_000], y[8_000:12_000]), 10,
                       device=torch.device("cpu"))  # fmt: skip
    accuracy = float(np.mean(fit.predict(x[12_000:]) == labels[12_000:]))
    sk_val, sk_test, _ = _sklearn_logistic(rows)
    assert abs(fit.val_accuracy - sk_val) <= 0.01 and abs(accuracy - sk_test) <= 0.01, (fit.c, accuracy, sk_test)
