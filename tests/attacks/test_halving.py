"""Successive halving: runs advanced in pieces train as they would alone; the rungs; the decoders' choice."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from leakaudit.attacks import DecoderConfig, run_decoder
from leakaudit.attacks._training import Fitting, fit
from leakaudit.attacks.halving import successive_halving
from leakaudit.errors import UnknownNameError
from leakaudit.store import open_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _neg_mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return -(out - y).pow(2).flatten(1).mean(dim=1)


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 2, generator=g)
    x_train, x_val = torch.randn(96, 6, generator=g), torch.randn(40, 6, generator=g)
    return (x_train, torch.tanh(x_train @ w)), (x_val, torch.tanh(x_val @ w))


def _net(seed: int) -> nn.Module:
    """Batch norm and dropout: a run's steps depend on its batch statistics and on torch's generator."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 2))


SETTINGS = dict(loss_fn=nn.functional.mse_loss, score_fn=_neg_mse, epochs=9, batch_size=16, lr=1e-2, patience=50,
                device=torch.device("cpu"))  # fmt: skip


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_runs_advanced_in_turns_train_as_they_would_alone():
    train, val = _data()
    alone = []
    for seed in (1, 2):
        model = _net(seed)
        result = fit(model, train, val, seed=seed, **SETTINGS)
        alone.append((_state(model), result.history))
    models = [_net(1), _net(2)]
    fittings = [Fitting(m, train, val, seed=seed, **SETTINGS) for m, seed in zip(models, (1, 2))]
    torch.manual_seed(12345)  # what else runs between the turns must not reach the runs' dropout masks
    for until in (2, 3, 7, 9):
        for fitting in reversed(fittings):
            fitting.advance(until)
            torch.rand(17)
    for model, fitting, (state, history) in zip(models, fittings, alone):
        result = fitting.finish()
        assert result.history == history
        for key, value in _state(model).items():
            assert torch.equal(value, state[key]), key


class _Candidate:
    """What successive halving sees of a run: epochs, the best validation score so far, whether it stopped."""

    def __init__(self, scores: list[float], stops_at: int | None = None) -> None:
        self.scores, self.stops_at, self.epoch, self.calls = scores, stops_at, 0, []

    def advance(self, until: int) -> bool:
        self.calls.append(until)
        self.epoch = min(until, self.stops_at or until, len(self.scores))
        return self.epoch < len(self.scores)

    @property
    def val_score(self) -> float:
        return max(self.scores[: self.epoch], default=-math.inf)

    @property
    def val_loss(self) -> float:
        return 0.0


def test_each_rung_keeps_the_best_third_and_trains_it_three_times_as_long():
    # Nine candidates; candidate i scores i/10 at every epoch, except 2, which is best from epoch 4 on.
    candidates = [_Candidate([i / 10] * 30) for i in range(9)]
    candidates[2] = _Candidate([0.2] * 3 + [0.95] * 27)
    dropped = successive_halving(candidates, epochs=30, first_rung=1)  # type: ignore[arg-type]
    # Rung 1: everyone 1 epoch, keep 6, 7, 8. Rung 3: keep 8. Then 8 trains to 30.
    assert dropped == [1, 1, 1, 1, 1, 1, 3, 3, None]
    assert candidates[8].calls == [1, 3, 30] and candidates[0].calls == [1]
    late = [_Candidate([0.1] * 30), _Candidate([0.2] * 3 + [0.95] * 27), _Candidate([0.3] * 30)]
    assert successive_halving(late, epochs=30, first_rung=4) == [4, None, 4]  # type: ignore[arg-type]


def test_a_candidate_that_stopped_early_keeps_its_score_and_may_win():
    candidates = [_Candidate([0.5, 0.9], stops_at=2), _Candidate([0.4] * 20), _Candidate([0.3] * 20)]
    assert successive_halving(candidates, epochs=20, first_rung=5) == [None, 5, 5]  # type: ignore[arg-type]
    assert candidates[0].epoch == 2


def test_a_first_rung_past_the_budget_trains_every_candidate_to_the_end():
    candidates = [_Candidate([0.1] * 6), _Candidate([0.2] * 6)]
    assert successive_halving(candidates, epochs=6, first_rung=6) == [None, None]  # type: ignore[arg-type]
    assert [c.calls for c in candidates] == [[6], [6]]
    with pytest.raises(ValueError, match="first_rung"):
        successive_halving(candidates, epochs=6, first_rung=0)  # type: ignore[arg-type]


def test_decoder_budget_and_rung_are_checked():
    with pytest.raises(UnknownNameError, match="budget 'fast'"):
        DecoderConfig(budget="fast")
    with pytest.raises(ValueError, match="first_rung"):
        DecoderConfig(first_rung=0)


def test_halving_keeps_one_decoder_whose_numbers_are_those_of_it_trained_alone(small_digits_store):
    settings = dict(width=4, epochs=6, patience=6, first_rung=2)
    with open_store(small_digits_store) as store:
        halving = run_decoder(store, DecoderConfig(arch="best", **settings))
        kept = [run for run in halving.runs if run.halted_after is None]
        assert len(kept) == 1 and halving.best == kept[0].arch
        alone = run_decoder(store, DecoderConfig(arch=kept[0].arch, **settings))
    for run in halving.runs:
        if run is not kept[0]:
            assert run.halted_after == 2 and run.epochs == 2 and "successive halving after 2 epochs" in run.reason
            assert run.val_ssim <= kept[0].val_ssim
    assert kept[0].epochs == alone.runs[0].epochs == 6
    assert kept[0].test == alone.runs[0].test
    np.testing.assert_array_equal(halving.reconstructions, alone.reconstructions)


def test_full_budget_trains_every_decoder_to_its_own_stop(small_digits_store):
    with open_store(small_digits_store) as store:
        full = run_decoder(store, DecoderConfig(arch="best", width=4, epochs=3, patience=3, first_rung=1, budget="full"))
    assert [run.epochs for run in full.runs] == [3, 3, 3] and all(run.halted_after is None for run in full.runs)
