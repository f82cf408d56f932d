"""The shared fit loop: selection on validation, early stopping, the untrained candidate."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from leakaudit.attacks._training import Standardizer, fit
from leakaudit.training.engine import seed_for

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _neg_mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return -(out - y).pow(2).flatten(1).mean(dim=1)


def _opposed_data():
    """Validation targets are the negation of what training teaches: every step makes validation worse."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 1, generator=g)
    x_train, x_val = torch.randn(64, 4, generator=g), torch.randn(32, 4, generator=g)
    return (x_train, x_train @ w), (x_val, -(x_val @ w))


def _zero_linear() -> nn.Linear:
    model = nn.Linear(4, 1)
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    return model


def _fit(model: nn.Module, keep_initial: bool, patience: int = 3):
    train, val = _opposed_data()
    return fit(
        model,
        train,
        val,
        loss_fn=nn.functional.mse_loss,
        score_fn=_neg_mse,
        epochs=50,
        batch_size=16,
        lr=1e-2,
        patience=patience,
        seed=0,
        device=torch.device("cpu"),
        keep_initial=keep_initial,
    )


def test_the_untrained_model_is_kept_when_training_only_hurts_validation():
    model = _zero_linear()
    result = _fit(model, keep_initial=True)
    assert result.best_epoch == 0 and result.epochs == 3  # stopped after `patience` worse epochs
    assert torch.count_nonzero(model.weight) == 0 and not model.training


def test_without_the_initial_candidate_the_first_epoch_is_kept():
    model = _zero_linear()
    result = _fit(model, keep_initial=False)
    assert result.best_epoch == 1 and result.epochs == 4
    assert torch.count_nonzero(model.weight) > 0
    assert len(result.history) == 4 and result.history[0]["val_score"] == result.val_score


def test_progress_reports_each_epoch_and_completes():
    calls = []
    train, val = _opposed_data()
    fit(
        _zero_linear(), train, val, loss_fn=nn.functional.mse_loss, score_fn=_neg_mse, epochs=10, batch_size=16,
        lr=1e-2, patience=2, seed=0, device=torch.device("cpu"), on_progress=lambda d, t: calls.append((d, t)),
    )  # fmt: skip
    assert calls[0] == (1, 10) and calls[-1] == (10, 10)


def test_standardizer_keeps_constant_features_finite():
    x = torch.stack([torch.arange(6.0), torch.full((6,), 3.0)], dim=1)
    z = Standardizer.fit(x)(x)
    assert torch.isfinite(z).all()
    torch.testing.assert_close(z[:, 1], torch.zeros(6))
    torch.testing.assert_close(z[:, 0].mean(), torch.tensor(0.0), atol=1e-6, rtol=0)
    maps = torch.randn(10, 3, 4, 4) * torch.tensor([1.0, 5.0, 0.1]).view(1, 3, 1, 1)
    per_channel = Standardizer.fit(maps, per_channel=True)
    assert per_channel.mean.shape == (3, 1, 1)
    torch.testing.assert_close(per_channel(maps).std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-5, rtol=0)


def test_seed_for_differs_by_model_and_run():
    assert seed_for(0, "mlp") != seed_for(0, "linear")
    assert seed_for(0, "mlp") != seed_for(1, "mlp")
    assert seed_for(0, "mlp") == seed_for(0, "mlp")
