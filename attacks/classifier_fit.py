"""Fits of the classifier attack that are not minibatch training, and the refit on every pair.

**The linear probe** (``linear`` on Z, ``raw-linear`` on X) is multinomial logistic regression
with an L2 penalty on standardised inputs, minimised to convergence by full-batch L-BFGS with a
strong-Wolfe line search (:class:`torch.optim.LBFGS`):

    L(W, b) = (1/n) Σᵢ CE(W xᵢ + b, yᵢ) + ‖W‖² / (2 C n)

— scikit-learn's ``LogisticRegression`` objective, C Σᵢ CE + ½‖W‖², divided by C n (the same
minimiser; the bias is not penalised in either). The problem is convex, so it has one answer:
minibatch epochs stopped by patience end somewhere short of it, an attacker weaker than the
data allows. C is chosen on attacker-validation from :data:`LINEAR_C_GRID`, walked from the
strongest penalty to the weakest, each fit starting from the previous optimum. The fit is in
float64 (the optimum then agrees with scikit-learn's to its tolerance) and starts from zero:
the same rows give the same numbers, with no seed involved. Under ``torchrun`` each rank holds
every ``world``-th training row and the closure all-reduces the loss and its gradient, so
every rank sees the same numbers and L-BFGS takes the same steps on every rank.

**The SVM head** (``svm``) is scikit-learn's RBF :class:`~sklearn.svm.SVC` on standardised Z,
C and γ chosen on attacker-validation from :data:`SVM_C_GRID` × :data:`SVM_GAMMA_SCALES`
(γ in units of 1 / features, scikit-learn's ``gamma="scale"`` on standardised Z). Its fit
grows faster than linearly in the rows, so above ``max_rows`` training rows it is fitted on a
seeded subsample of that size (recorded in the result). It runs on the CPU whatever the
device; under ``torchrun`` rank 0 fits it and broadcasts what it found.

**The refit** uses every pair the attacker holds: once a head and its settings (epochs, C, γ)
are chosen on attacker-validation, the head is trained again from the same initialisation on
attacker-train + attacker-validation with those settings and scored on test. Validation
rows are then training rows, so nothing can stop early: a network runs its chosen number of
epochs and keeps the last, its learning rate halved when the *training* loss stalls (the one
signal left).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from leakaudit import distributed
from leakaudit.attacks._sources import Source
from leakaudit.attacks._training import OnProgress, TensorFn, _TensorTask, _Validation, seeded_start
from leakaudit.distributed import Context
from leakaudit.training import engine
from leakaudit.training.engine import EpochTraining, Schedule

#: Inverse L2 strengths tried for the linear probe (scikit-learn's ``C``), strongest penalty first.
LINEAR_C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
#: L-BFGS iterations allowed per fit; a converged fit stops on the gradient or change tolerance well before.
LBFGS_MAX_ITER = 500
#: C values tried for the SVM.
SVM_C_GRID = (1.0, 10.0, 100.0)
#: γ values tried for the SVM, times 1 / features.
SVM_GAMMA_SCALES = (0.3, 1.0, 3.0)


# --------------------------------------------------------------------------- linear probe


@dataclass
class LinearFit:
    """A fitted logistic regression: ``logits(x) = x W + b`` in float64.

    Attributes:
        c: its inverse L2 strength.
        iterations: L-BFGS iterations of this fit.
        val_accuracy: accuracy on the rows it was selected on (``None`` for a refit).
    """

    weight: torch.Tensor
    bias: torch.Tensor
    c: float
    iterations: int
    val_accuracy: float | None = None

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> np.ndarray:
        """Class predictions for ``x`` [N, features]."""
        weight, bias = self.weight, self.bias
        return (x.to(weight.device, torch.float64) @ weight + bias).argmax(dim=1).cpu().numpy()

    @property
    def params(self) -> int:
        return self.weight.numel() + self.bias.numel()


def logistic_regression(
    x: torch.Tensor,
    y: torch.Tensor,
    classes: int,
    c: float,
    *,
    device: torch.device,
    start: LinearFit | None = None,
    max_iter: int = LBFGS_MAX_ITER,
) -> LinearFit:
    """Minimise the penalised multinomial log-loss on ``(x, y)`` by full-batch L-BFGS (see the module docstring).

    Args:
        x: standardised inputs [N, features].
        y: class indices [N].
        classes: number of classes (logits).
        c: inverse L2 strength.
        device: where to compute (bare ``cuda`` is ``cuda:LOCAL_RANK`` under torchrun).
        start: a fit to start from (the previous C of a path); zero when ``None``.
        max_iter: the most L-BFGS iterations.
    """
    ctx = distributed.current(device)
    device = distributed.rank_device(device, ctx)
    n = len(x)
    if ctx is not None:  # this rank's share of the sums; the closure adds the others'
        x, y = x[ctx.rank :: ctx.world_size], y[ctx.rank :: ctx.world_size]
    x = x.to(device, torch.float64)
    y = y.to(device)
    if start is None:
        weight = torch.zeros(x.shape[1], classes, dtype=torch.float64, device=device)
        bias = torch.zeros(classes, dtype=torch.float64, device=device)
    else:
        weight, bias = start.weight.clone().to(device), start.bias.clone().to(device)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
        tolerance_grad=1e-7, tolerance_change=1e-12, line_search_fn="strong_wolfe",
    )  # fmt: skip
    penalty = 1.0 / (2.0 * c * n)
    share = 1.0 if ctx is None else 1.0 / ctx.world_size

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y, reduction="sum") / n + share * penalty * weight.pow(2).sum()
        loss.backward()
        if ctx is not None:
            total = loss.detach().clone()
            assert weight.grad is not None and bias.grad is not None  # set by backward
            for tensor in (total, weight.grad, bias.grad):
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            return total
        return loss

    optimizer.step(closure)
    iterations = int(optimizer.state_dict()["state"][0]["n_iter"])
    return LinearFit(weight.detach(), bias.detach(), c, iterations)


def linear_probe(
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    classes: int,
    *,
    device: torch.device,
    grid: tuple[float, ...] = LINEAR_C_GRID,
    on_progress: OnProgress | None = None,
) -> LinearFit:
    """The logistic regression of ``grid``'s C with the best validation accuracy (ties: the stronger penalty)."""
    best: LinearFit | None = None
    previous: LinearFit | None = None
    val_y = val[1].numpy()
    for done, c in enumerate(sorted(grid), start=1):
        previous = logistic_regression(*train, classes, c, device=device, start=previous)
        previous.val_accuracy = float(np.mean(previous.predict(val[0]) == val_y))
        if best is None or previous.val_accuracy > best.val_accuracy:  # type: ignore[operator]
            best = previous
        if on_progress is not None:
            on_progress(done, len(grid))
    assert best is not None  # the grid is not empty
    return best


# --------------------------------------------------------------------------- SVM


@dataclass
class SvmFit:
    """A fitted RBF SVM's choices and what it predicted.

    Attributes:
        c: its C.
        gamma: its γ.
        rows: training rows it was fitted on (a subsample above ``max_rows``).
        params: values the fitted model holds (support vectors, dual coefficients, intercepts).
        val_accuracy: accuracy on the rows it was selected on (``None`` for a refit).
        test_pred: its predictions for the test rows (empty when none were given).
        model: the fitted ``SVC``, to predict rows read later (test rows streamed in chunks).
    """

    c: float
    gamma: float
    rows: int
    params: int
    test_pred: np.ndarray
    val_accuracy: float | None = None
    model: Any = field(default=None, repr=False)


def _subsample(n: int, max_rows: int, seed: int) -> np.ndarray:
    if n <= max_rows:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:max_rows])


def _svc(x: np.ndarray, y: np.ndarray, c: float, gamma: float) -> Any:
    from sklearn.svm import SVC

    return SVC(C=c, gamma=gamma, kernel="rbf", cache_size=500).fit(x, y)


def _on_rank_0(ctx: Context | None, work: Callable[[], Any]) -> Any:
    """``work()`` alone, or on rank 0 with the result broadcast (and a failure raised on every rank)."""
    if ctx is None:
        return work()
    value, error = None, None
    if ctx.is_main:
        try:
            value = work()
        except Exception as exc:  # re-raised on every rank by agree
            error = exc
    distributed.agree(error)
    return distributed.broadcast(value)


def svm_probe(
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    test_x: torch.Tensor | None,
    *,
    max_rows: int,
    seed: int,
    device: torch.device,
    on_progress: OnProgress | None = None,
) -> SvmFit:
    """The RBF SVM of the C × γ grid with the best validation accuracy (ties: the first, smaller C and γ).

    ``test_x`` ``None``: no test predictions (``test_pred`` empty); predict with the returned ``model``.
    """

    def work() -> SvmFit:
        keep = _subsample(len(train[0]), max_rows, seed)
        x, y = train[0].numpy()[keep].astype(np.float64), train[1].numpy()[keep]
        val_x, val_y = val[0].numpy().astype(np.float64), val[1].numpy()
        unit = 1.0 / x.shape[1]
        grid = [(c, s * unit) for c in SVM_C_GRID for s in SVM_GAMMA_SCALES]
        best: tuple[float, Any, float, float] | None = None
        for done, (c, gamma) in enumerate(grid, start=1):
            model = _svc(x, y, c, gamma)
            accuracy = float(np.mean(model.predict(val_x) == val_y))
            if best is None or accuracy > best[0]:
                best = (accuracy, model, c, gamma)
            if on_progress is not None:
                on_progress(done, len(grid))
        assert best is not None
        accuracy, model, c, gamma = best
        return SvmFit(c, gamma, len(keep), _svc_params(model), _svm_predict(model, test_x), accuracy, model)

    return _on_rank_0(distributed.current(device), work)


def svm_refit(
    train: tuple[torch.Tensor, torch.Tensor], test_x: torch.Tensor | None, chosen: SvmFit, *, max_rows: int, seed: int,
    device: torch.device,
) -> SvmFit:  # fmt: skip
    """The SVM of ``chosen``'s C and γ fitted on ``train`` (all the attacker's rows), predicting ``test_x`` (if given)."""

    def work() -> SvmFit:
        keep = _subsample(len(train[0]), max_rows, seed)
        model = _svc(train[0].numpy()[keep].astype(np.float64), train[1].numpy()[keep], chosen.c, chosen.gamma)
        return SvmFit(chosen.c, chosen.gamma, len(keep), _svc_params(model), _svm_predict(model, test_x), model=model)

    return _on_rank_0(distributed.current(device), work)


def _svm_predict(model: Any, x: torch.Tensor | None) -> np.ndarray:
    return np.empty(0, dtype=np.int64) if x is None else model.predict(x.numpy().astype(np.float64))


def _svc_params(model: Any) -> int:
    return int(model.support_vectors_.size + model.dual_coef_.size + model.intercept_.size)


# --------------------------------------------------------------------------- refit of a network


class _RefitTask(_TensorTask):
    """Training on every attacker row, with nothing held out: each epoch is kept, the schedule follows the training loss."""

    def validate(self, training: EpochTraining) -> _Validation:
        loss = training.loss if training.loss is not None else 0.0
        return _Validation(training.epoch, training.loss, float(training.epoch), loss)

    def is_better(self, candidate: _Validation, best: _Validation | None) -> bool:
        return True  # the last epoch is the one the chosen epoch count asks for

    def plateau_score(self, stats: _Validation) -> float:
        return -stats.val_loss


def refit_network(
    model: nn.Module,
    train: Source | tuple[torch.Tensor, torch.Tensor],
    *,
    loss_fn: TensorFn,
    epochs: int,
    batch_size: int,
    lr: float,
    patience: int,
    seed: int,
    device: torch.device,
    weight_decay: float = 0.0,
    autocast: torch.dtype | None = None,
    on_progress: OnProgress | None = None,
) -> float:
    """Train ``model`` for exactly ``epochs`` epochs on ``train`` and keep the last; returns the seconds it took.

    The loop, seeding and ``torchrun`` behaviour are :func:`leakaudit.attacks._training.fit`'s;
    the learning rate halves when the training loss stalls for ``max(1, patience // 3)`` epochs.
    """
    ctx, device, generator = seeded_start(model, seed, device)
    # step_rows lets a streamed source read its batches ahead; in memory it changes nothing.
    task = _RefitTask(model, train, train, loss_fn, loss_fn, loss_fn, device, ctx, step_rows=engine.step_rows_of(batch_size, ctx))
    started = time.perf_counter()
    engine.fit(
        model,
        task,
        Schedule(epochs=epochs, batch_size=batch_size, lr=lr, patience=max(patience, 1), weight_decay=weight_decay, plateau=True),
        generator=generator,
        device=device,
        ctx=ctx,
        params=list(model.parameters()),
        autocast=autocast,
        on_epoch=(lambda v: on_progress(v.epoch, epochs) if v.epoch else None) if on_progress is not None else None,
    )
    if on_progress is not None:
        on_progress(epochs, epochs)
    return time.perf_counter() - started
