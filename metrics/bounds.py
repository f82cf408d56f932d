"""Attacker-independent bounds on leakage: the Bayes risk of a private task, and dFIL.

Every attack reports one trained attacker's score, and a weak training run under-reports.
The two metrics here bound what *any* attacker can do, under stated assumptions.

``bayes-risk`` — the smallest error with which the private task can be predicted from Z
(the Bayes risk R*), estimated as in F-BLEAU (Cherubin, Chatzikokolakis, Palamidessi, S&P
2019): the error of a k-NN classifier on held-out rows, with k growing with the number of
training rows n, is a universally consistent estimate of R*; and the 1-NN error R₁ gives
Cover and Hart's lower bound for M classes,

    R* ≥ (M−1)/M · (1 − sqrt(1 − M/(M−1) · R₁)),

so ``private_accuracy_bound`` = 1 − that bound is the accuracy no attacker can beat. Both
are *asymptotic* statements: at finite n the k-NN error typically lies above R* (it
converges from above, which ``details.convergence`` shows over growing subsamples) and the
bound is an estimate of the asymptotic one, not a finite-sample guarantee. Both are capped at
the error of guessing the commonest class, which bounds R* from above. The interval is
the exact (Clopper–Pearson) binomial interval over the held-out rows; it does not cover the
finite-n bias.

``fisher-leakage`` — for an encoder f followed by Gaussian noise N(0, σ²I) at the split,
the Fisher information of Z about the input x is Jᵀ J / σ² (J the Jacobian of f at x), and
Maeng et al. (NeurIPS 2023) define the diagonal Fisher-information leakage

    dFIL(x) = tr(Jᵀ J) / (d · σ²),   d the number of input elements.

By the Cramér–Rao bound, any *unbiased* reconstruction x̂ of x from Z has a mean squared
error per element of at least 1 / dFIL (``mse_bound``). tr(Jᵀ J) = E_v ‖J v‖² for Rademacher
v (Hutchinson), and J v is one forward-mode product (:func:`torch.func.jvp`), so a
ResNet-18 encoder costs a few forward passes per probe. The bound says nothing about a
biased attacker (a decoder with a prior over images can beat it), and nothing at all
where the encoder is deterministic: there dFIL is undefined (infinite).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from leakaudit.errors import DataError, LeakAuditError, StoreError
from leakaudit.glossary import with_intervals
from leakaudit.metrics.display import bayes_risk_html
from leakaudit.metrics.plugins import MetricResult, Progress
from leakaudit.registry import METRICS, Needs
from leakaudit.roles import ROLES
from leakaudit.store import ActivationStore

#: Fewest rows the k-NN estimate is computed on: the rows it is fitted on, and the held-out ones.
MIN_FIT_ROWS = 20
MIN_TEST_ROWS = 10
#: The buffer name under which a noise module declares its scale σ (see the gaussian-noise recipe).
SIGMA_BUFFER = "noise_sigma"
CLIP_BUFFER = "noise_clip"
#: The buffer under which a noise module declares per-element Laplace noise of scale exp(its
#: ``log_scale``) (see the shredder recipe).
LAPLACE_BUFFER = "noise_laplace"

# --------------------------------------------------------------------------- Bayes risk: the maths


def cover_hart_lower_bound(nn_error: float, classes: int) -> float:
    """Cover and Hart's lower bound on the Bayes risk from the (asymptotic) 1-NN error, for ``classes`` classes.

    R* ≥ (M−1)/M · (1 − sqrt(1 − M/(M−1) · R₁)); an R₁ at or beyond chance, (M−1)/M, gives (M−1)/M.
    """
    if classes < 2:
        raise ValueError(f"the Cover–Hart bound needs at least 2 classes, got {classes}.")
    if not 0.0 <= nn_error <= 1.0:
        raise ValueError(f"an error rate lies in [0, 1], got {nn_error!r}.")
    m = float(classes)
    return (m - 1.0) / m * (1.0 - math.sqrt(max(0.0, 1.0 - m / (m - 1.0) * nn_error)))


def neighbours_for(n: int, rule: Literal["log", "log10", "sqrt"]) -> int:
    """The number of neighbours for ``n`` training rows: F-BLEAU's ln n (or log10 n), or √n.

    Made odd, so that two classes cannot tie.
    """
    value = {"log": math.log, "log10": math.log10, "sqrt": math.sqrt}[rule](max(n, 1))
    k = max(1, int(round(value)))
    return k if k % 2 else k + 1


def error_interval(errors: int, n: int) -> tuple[float, float]:
    """The exact (Clopper–Pearson) 95 % interval of an error rate of ``errors`` in ``n`` rows."""
    from scipy.stats import binomtest

    interval = binomtest(int(errors), int(n)).proportion_ci(confidence_level=0.95, method="exact")
    return float(interval.low), float(interval.high)


@dataclass
class BayesRiskEstimate:
    """The k-NN estimate of the Bayes risk and its Cover–Hart lower bound, with what they rest on.

    ``estimate`` and ``lower_bound`` are capped at ``chance_error`` (1 − the largest class
    frequency), which always bounds the Bayes risk from above: guessing the commonest class
    achieves it. ``knn_error`` and ``nn_error`` are the classifiers' errors as measured.
    """

    estimate: float
    knn_error: float
    estimate_ci95: tuple[float, float]
    nn_error: float
    nn_error_ci95: tuple[float, float]
    lower_bound: float
    lower_bound_ci95: tuple[float, float]
    k: int
    fit_rows: int
    test_rows: int
    classes: int
    chance_error: float
    convergence: list[dict[str, float]] = field(default_factory=list)


def bayes_risk_knn(
    z_fit: np.ndarray,
    y_fit: np.ndarray,
    z_test: np.ndarray,
    y_test: np.ndarray,
    classes: int,
    *,
    rule: Literal["log", "log10", "sqrt"] = "log",
    k: int | None = None,
    steps: int = 5,
    seed: int = 0,
) -> BayesRiskEstimate:
    """Bayes-risk estimates of predicting ``y`` from ``z``: k-NN fitted on the fit rows, scored on the test rows.

    ``z`` is used as given (standardise it first: k-NN is only as good as its distances).
    ``convergence`` repeats the estimate on nested, seeded subsamples of the fit rows
    (halving ``steps − 1`` times, down to :data:`MIN_FIT_ROWS`), each with its own k.
    """
    from sklearn.neighbors import KNeighborsClassifier

    n = len(z_fit)
    order = np.random.default_rng(seed).permutation(n)
    sizes = sorted({max(MIN_FIT_ROWS, n >> j) for j in range(max(steps, 1))} | {n})
    curve: list[dict[str, float]] = []
    for size in sizes:
        rows = order[:size] if size < n else np.arange(n)
        k_here = min(k if k is not None else neighbours_for(size, rule), size)
        knn = KNeighborsClassifier(n_neighbors=k_here).fit(z_fit[rows], y_fit[rows])
        knn_wrong = int((knn.predict(z_test) != y_test).sum())
        nn = KNeighborsClassifier(n_neighbors=1).fit(z_fit[rows], y_fit[rows])
        nn_wrong = int((nn.predict(z_test) != y_test).sum())
        curve.append({"n": int(size), "k": int(k_here), "knn_errors": knn_wrong, "nn_errors": nn_wrong})
    last = curve[-1]
    m = len(y_test)
    for point in curve:
        point["knn_error"] = point["knn_errors"] / m
        point["nn_error"] = point["nn_errors"] / m
        point["lower_bound"] = cover_hart_lower_bound(point["nn_error"], classes)
    counts = np.bincount(np.concatenate([y_fit, y_test]), minlength=classes)
    chance = float(1.0 - counts.max() / counts.sum())
    for point in curve:
        point["lower_bound"] = min(point["lower_bound"], chance)
    nn_ci = error_interval(int(last["nn_errors"]), m)
    knn_ci = error_interval(int(last["knn_errors"]), m)
    return BayesRiskEstimate(
        estimate=min(last["knn_error"], chance),
        knn_error=last["knn_error"],
        estimate_ci95=(min(knn_ci[0], chance), min(knn_ci[1], chance)),
        nn_error=last["nn_error"],
        nn_error_ci95=nn_ci,
        lower_bound=last["lower_bound"],
        # The bound increases with R₁, so R₁'s interval maps onto the bound's.
        lower_bound_ci95=(min(cover_hart_lower_bound(nn_ci[0], classes), chance),
                          min(cover_hart_lower_bound(nn_ci[1], classes), chance)),  # fmt: skip
        k=int(last["k"]),
        fit_rows=n,
        test_rows=m,
        classes=classes,
        chance_error=chance,
        convergence=curve,
    )


# --------------------------------------------------------------------------- Bayes risk: the plugin


@dataclass(frozen=True)
class BayesRiskConfig:
    """Settings of the k-NN Bayes-risk estimate.

    Attributes:
        task: the private task whose labels are predicted from Z.
        rule: how k grows with the n fit rows: ``log`` (k = ln n, F-BLEAU's default),
            ``log10`` or ``sqrt``; k is made odd.
        k: a fixed k instead of the rule (``None``: the rule).
        pca_above: Z with more features than this is reduced by PCA (after standardising).
        dims: the number of PCA components kept where Z is reduced.
        max_rows: at most this many fit rows (a seeded subsample), to bound the cost.
        pca_rows: at most this many fit rows to fit the scaler and PCA on, where Z is reduced.
        steps: points of the convergence curve (halvings of n).
        seed: seeds the subsamples.
    """

    task: str = "private"
    rule: Literal["log", "log10", "sqrt"] = "log"
    k: int | None = None
    pca_above: int = 256
    dims: int = 64
    max_rows: int = 50_000
    pca_rows: int = 10_000
    steps: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("pca_above", "dims", "max_rows", "pca_rows", "steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}.")
        if self.k is not None and self.k <= 0:
            raise ValueError(f"k must be a positive integer, got {self.k}.")


def _features(store: ActivationStore, fit: np.ndarray, test: np.ndarray, config: BayesRiskConfig):
    """Standardised Z of the fit and test rows, PCA-reduced where wide; and how it was reduced."""
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    width = int(np.prod(store.layer_shape))
    if width <= config.pca_above:
        z_fit = store.activations(fit).reshape(len(fit), -1).astype(np.float64)
        z_test = store.activations(test).reshape(len(test), -1).astype(np.float64)
        scaler = StandardScaler().fit(z_fit)
        return scaler.transform(z_fit), scaler.transform(z_test), {"features": width, "pca": None}
    # Wide Z: fit on a seeded subset, then project block by block, so memory stays at a block.
    rng = np.random.default_rng(config.seed)
    basis = np.sort(rng.choice(fit, size=min(len(fit), config.pca_rows), replace=False))
    sample = store.activations(basis).reshape(len(basis), -1).astype(np.float64)
    scaler = StandardScaler().fit(sample)
    dims = min(config.dims, len(basis), width)
    pca = PCA(n_components=dims, svd_solver="randomized", random_state=config.seed).fit(scaler.transform(sample))
    del sample

    def project(rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), dims))
        for start in range(0, len(rows), 2048):
            block = store.activations(rows[start : start + 2048]).reshape(-1, width).astype(np.float64)
            out[start : start + len(block)] = pca.transform(scaler.transform(block))
        return out

    how = {"features": width, "pca": {"components": dims, "fit_rows": int(len(basis)),
                                      "explained_variance": float(pca.explained_variance_ratio_.sum())}}  # fmt: skip
    return project(fit), project(test), how


@METRICS.register(
    "bayes-risk",
    config=BayesRiskConfig,
    metrics=with_intervals(
        {
            "bayes_risk_knn": "k-NN estimate of the Bayes error of predicting the private task from Z (F-BLEAU)",
            "bayes_risk_lower": "Cover–Hart lower bound on that Bayes error, from the 1-NN error (asymptotic)",
            "private_accuracy_bound": "1 − bayes_risk_lower: the private-task accuracy no attacker can beat, by that bound",
        },
        "bayes_risk_knn", "bayes_risk_lower", "private_accuracy_bound",
        how="exact binomial interval of the test rows' k-NN and 1-NN errors",
    ),
    comparable=("task", "rule", "k", "pca_above", "dims", "seed"),
    html=bayes_risk_html,
)
def bayes_risk_metric(store: ActivationStore, config: BayesRiskConfig, progress: Progress | None = None) -> MetricResult:
    """Attacker-independent private-task leakage: the k-NN Bayes-risk estimate and its Cover–Hart bound.

    Fitted on the attacker-train and attacker-validation rows (no model selection happens,
    so both serve as training rows), scored on the test rows.
    """
    labels = store.labels(config.task)
    classes = len(store.class_names(config.task))
    fit = np.sort(np.concatenate([store.rows(ROLES[0]), store.rows(ROLES[1])]))
    test = store.rows(ROLES[2])
    if len(fit) < MIN_FIT_ROWS or len(test) < MIN_TEST_ROWS:
        raise DataError(
            f"bayes-risk needs at least {MIN_FIT_ROWS} attacker rows and {MIN_TEST_ROWS} test rows, but "
            f"{str(store.path)!r} has {len(fit)} and {len(test)}. Dump more rows (--limit) or change --split."
        )
    if classes < 2:
        raise DataError(f"task {config.task!r} has {classes} class; a Bayes risk needs at least 2.")
    if len(fit) > config.max_rows:
        fit = np.sort(np.random.default_rng(config.seed).choice(fit, size=config.max_rows, replace=False))
    from leakaudit.metrics.plugins import within_budget

    if int(np.prod(store.layer_shape)) <= config.pca_above:  # read whole; wider Z is projected block by block
        fit, record = within_budget(store, fit, ("activations",), config.seed, 2, "bayes-risk's attacker rows")
        test, test_record = within_budget(store, test, ("activations",), config.seed, 2, "bayes-risk's test rows")
    else:
        record = test_record = {"data_path": "stream", "reason": "Z is PCA-reduced block by block from the store"}
    if progress is not None:
        progress(0, 2)
    z_fit, z_test, how = _features(store, fit, test, config)
    if progress is not None:
        progress(1, 2)
    estimate = bayes_risk_knn(z_fit, labels[fit], z_test, labels[test], classes,
                              rule=config.rule, k=config.k, steps=config.steps, seed=config.seed)  # fmt: skip
    if progress is not None:
        progress(2, 2)
    lower_ci = estimate.lower_bound_ci95
    details = {
        **asdict(estimate),
        "bayes_risk_knn_ci95": list(estimate.estimate_ci95),  # capped at chance, as the value is
        "bayes_risk_lower_ci95": list(lower_ci),
        "private_accuracy_bound_ci95": [1.0 - lower_ci[1], 1.0 - lower_ci[0]],
        "fit_roles": [ROLES[0], ROLES[1]],
        "test_role": ROLES[2],
        "standardised": True,
        **how,
        "task": config.task,
        "rule": config.rule if config.k is None else None,
        "data_path": {"fit": record, "test": test_record},
    }
    values = {
        "bayes_risk_knn": estimate.estimate,
        "bayes_risk_lower": estimate.lower_bound,
        "private_accuracy_bound": 1.0 - estimate.lower_bound,
    }
    return MetricResult("bayes-risk", values, details, asdict(config))


# --------------------------------------------------------------------------- dFIL: the maths


@dataclass
class FisherTrace:
    """Hutchinson estimates of tr(Jᵀ J) per row, and how noisy they are."""

    per_row: np.ndarray  # the mean of ‖J v‖² over probes, per row
    probe_variance: np.ndarray  # the variance of ‖J v‖² over probes, per row
    probes: int


def jacobian_trace_hutchinson(
    function: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    probes: int,
    generator: torch.Generator,
    mode: Literal["jvp", "vjp"] = "jvp",
) -> FisherTrace:
    """tr(Jᵢᵀ Jᵢ) for each row i of ``x``, Jᵢ the Jacobian of ``function``'s row i at row i.

    ``jvp``: E_v ‖J v‖² = tr(Jᵀ J) for v with independent ±1 entries, each probe one
    forward-mode product J v (:func:`torch.func.jvp`) for the whole batch. ``vjp``, for
    models whose operations lack forward-mode derivatives: E_u ‖Jᵀ u‖² = tr(J Jᵀ), the same
    trace, with ±1 probes u of Z's shape and one backward pass each. ``function`` must treat
    rows independently (a model in eval mode does): then the batch's Jacobian is
    block-diagonal and row i of J v is Jᵢ vᵢ.
    """
    from torch.func import jvp

    if probes < 2:
        raise ValueError(f"at least 2 probes are needed for a standard error, got {probes}.")

    def rademacher(shape: torch.Size) -> torch.Tensor:
        draw = torch.randint(0, 2, shape, generator=generator, device=generator.device)
        return draw.to(x.device, x.dtype) * 2 - 1

    total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    squares = torch.zeros_like(total)
    for _ in range(probes):
        if mode == "jvp":
            product = jvp(function, (x,), (rademacher(x.shape),))[1]
        else:
            with torch.enable_grad():
                leaf = x.detach().requires_grad_(True)
                out = function(leaf)
                (product,) = torch.autograd.grad(out, leaf, grad_outputs=rademacher(out.shape))
        norm2 = product.detach().reshape(product.shape[0], -1).double().pow(2).sum(1)
        total += norm2
        squares += norm2 * norm2
    mean = total / probes
    variance = (squares / probes - mean * mean) * probes / (probes - 1)
    return FisherTrace(mean.cpu().numpy(), variance.clamp_min(0).cpu().numpy(), probes)


def dfil_from_trace(trace: np.ndarray, input_elements: int, sigma: float) -> np.ndarray:
    """Per row, dFIL = tr(Jᵀ J) / (d · σ²)."""
    return np.asarray(trace, dtype=np.float64) / (input_elements * sigma * sigma)


def declared_noise(module: torch.nn.Module) -> tuple[float | None, float | None, list[str]]:
    """The Gaussian noise scale σ (and clipping norm C) a module declares, and where.

    A noise module declares them as buffers named ``noise_sigma`` and ``noise_clip`` (0: no
    clipping), which survive ``torch.export`` and FX splitting; plain float attributes of the
    same names count too. Several distinct scales give ``None``: which one reaches Z is unclear.
    """
    sigmas: dict[str, float] = {}
    clips: dict[str, float] = {}
    for name, buffer in module.named_buffers():
        leaf = name.rpartition(".")[2]
        if leaf == SIGMA_BUFFER and buffer.numel() == 1:
            sigmas[name] = float(buffer)
        elif leaf == CLIP_BUFFER and buffer.numel() == 1:
            clips[name] = float(buffer)
    for prefix, sub in module.named_modules():
        for attr, table in ((SIGMA_BUFFER, sigmas), (CLIP_BUFFER, clips)):
            value = sub.__dict__.get(attr)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                table[f"{prefix}.{attr}" if prefix else attr] = float(value)
    where = sorted(sigmas)
    if len(set(sigmas.values())) != 1:
        return None, None, where
    clip = next(iter(set(clips.values()))) if len(set(clips.values())) == 1 else None
    return next(iter(sigmas.values())), (clip or None), where


def declared_laplace(module: torch.nn.Module) -> tuple[torch.Tensor | None, list[str]]:
    """The per-element scale b of the Laplace noise a module declares (``None`` if none or several), and where.

    Laplace noise of scale b has Fisher information 1/b² about its location, as Gaussian noise
    of scale σ has 1/σ²: with b per element of Z, dFIL = tr(Jᵀ diag(1/b²) J)/d.
    """
    where = sorted(name.rpartition(".")[0] for name, _ in module.named_buffers() if name.rpartition(".")[2] == LAPLACE_BUFFER)
    if len(where) != 1:
        return None, where
    params = dict(module.named_parameters()) | dict(module.named_buffers())
    log_scale = params.get(f"{where[0]}.log_scale" if where[0] else "log_scale")
    if log_scale is None:
        return None, where
    return log_scale.detach().double().exp(), where


# --------------------------------------------------------------------------- dFIL: the plugin


@dataclass(frozen=True)
class FisherLeakageConfig:
    """Settings of the Fisher-information leakage (dFIL).

    Attributes:
        sigma: the scale of the Gaussian noise added to Z when the encoder does not declare
            it (a deployment that adds N(0, σ²I) to the dumped Z); ``None``: the encoder's own.
        probes: Hutchinson probes per row.
        max_rows: at most this many test rows (the first ones), to bound the cost.
        batch_size: rows per forward-mode product.
        seed: seeds the probes (and the encoder's own noise while it runs).
        device: where the encoder runs (``auto``, ``cpu``, ``cuda``).
        trust_checkpoint: allow unpickling the recorded checkpoint when rebuilding the encoder.
    """

    sigma: float | None = None
    probes: int = 64
    max_rows: int = 512
    batch_size: int = 64
    seed: int = 0
    device: str = "cpu"
    trust_checkpoint: bool = False

    def __post_init__(self) -> None:
        if self.sigma is not None and not (self.sigma > 0 and math.isfinite(self.sigma)):
            raise ValueError(f"sigma must be a positive number, got {self.sigma:g}.")
        if self.probes < 2:
            raise ValueError(f"probes must be at least 2 (for a standard error), got {self.probes}.")
        for name in ("max_rows", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}.")


def _undefined(config: FisherLeakageConfig, reason: str, **details: Any) -> MetricResult:
    return MetricResult("fisher-leakage", {"dfil": None, "mse_bound": None}, {"reason": reason, **details}, asdict(config))


def _reproduces(encoder, model_input, store: ActivationStore, rows: np.ndarray, device: torch.device,
                sigma: float | None, laplace: torch.Tensor | None = None) -> str | None:  # fmt: skip
    """Why the rebuilt encoder is not the one that produced the stored Z (``None``: it is).

    A deterministic encoder must give the stored Z back; a noisy one must differ from it by
    noise of its declared scale (two independent draws: σ·√2 per element; for Laplace noise
    of scale b, 2b, its variance being 2b²).
    """
    x = torch.from_numpy(store.inputs(rows)).to(device)
    stored = torch.from_numpy(store.activations(rows)).double()
    with torch.no_grad():
        z = encoder(model_input(x)).double().cpu()
    if z.shape != stored.shape:
        return f"the rebuilt encoder gives Z of shape {tuple(z.shape[1:])}, the store holds {tuple(stored.shape[1:])}"
    if laplace is None and sigma is None:
        # float16 stores round Z to about 1e-3 relative.
        tolerance = 2e-3 * float(stored.abs().max()) + 1e-4
        if float((z - stored).abs().max()) > tolerance:
            return "the rebuilt encoder does not reproduce the stored activations (the model or its weights differ from the dump's)"
        return None
    # Two independent draws differ by √2 of one draw's standard deviation: σ·√2, or 2b for Laplace.
    scale, spread, declared = ((laplace.cpu(), 2.0, "per-element Laplace scale") if laplace is not None
                               else (sigma, math.sqrt(2.0), f"scale σ = {sigma:g}"))  # fmt: skip
    ratio = float(((z - stored) / scale).std()) / spread
    if not 0.8 <= ratio <= 1.25:
        return (f"the rebuilt encoder's Z differs from the stored Z by {ratio:.2f} times the noise its declared "
                f"{declared} implies; it is not the encoder that produced the store")  # fmt: skip
    return None


@METRICS.register(
    "fisher-leakage",
    config=FisherLeakageConfig,
    needs=Needs(inputs=True, task=None, model=True),
    metrics={
        "dfil": "Fisher-information leakage tr(JᵀJ)/(d·σ²) of the encoder with Gaussian noise at the split "
                "(Maeng et al.); tr(Jᵀ diag(1/b²) J)/d for Laplace noise of scales b (Shredder)",
        "mse_bound": "1 / dfil: the per-element MSE no unbiased reconstruction of X from Z can beat",
    },
    comparable=("probes", "seed"),
)
def fisher_leakage_metric(store: ActivationStore, config: FisherLeakageConfig, progress: Progress | None = None) -> MetricResult:
    """Fisher-information leakage (dFIL) of a randomised encoder, and the MSE bound it implies.

    The encoder is rebuilt from the store's provenance and checked against the stored Z; the
    Jacobian is taken with respect to the stored inputs (in [0, 1]), through the dump's own
    normalisation, so ``mse_bound`` is in the units a decoder's MSE is scored in. Gaussian
    noise of scale σ (declared, or ``sigma``) and per-element Laplace noise of scales b
    (declared with a ``noise_laplace`` buffer beside its ``log_scale``: Shredder's) both count:
    each has Fisher information 1/scale² about its location. Where neither is known, dFIL is
    undefined: the values are ``None`` and ``details.reason`` says why.
    """
    from leakaudit.provenance import rebuild_encoder
    from leakaudit.runtime import resolve_device

    if not store.has_inputs:
        raise StoreError(f"fisher-leakage needs the raw inputs, but {str(store.path)!r} was dumped with --no-inputs.")
    try:
        encoder = rebuild_encoder(store, trust_checkpoint=config.trust_checkpoint)
    except LeakAuditError as exc:
        return _undefined(config, f"the encoder cannot be rebuilt: {str(exc).rstrip('.')}")
    declared, clip, where = declared_noise(encoder.module)
    if declared is None and where:
        return _undefined(config, f"the encoder declares several noise scales ({', '.join(where)})", declared_at=where)
    sigma = config.sigma if config.sigma is not None else declared
    own_laplace, laplace_at = declared_laplace(encoder.module)
    laplace = own_laplace if sigma is None else None  # a given σ is what is measured
    if sigma is None and laplace is None:
        if laplace_at:
            return _undefined(config, f"the encoder declares Laplace noise at {', '.join(laplace_at) or 'its top'} "
                                      "but no single log_scale beside it", declared_at=laplace_at)  # fmt: skip
        return _undefined(
            config,
            "dFIL is defined for an encoder followed by Gaussian or Laplace noise; this encoder declares no noise "
            "scale (no 'noise_sigma' or 'noise_laplace' buffer) and no sigma was given",
        )
    device = resolve_device(config.device)
    encoder.module.to(device)
    # The recorded encoder takes stored inputs: it applies the dump's own normalisation (and padding).
    model_input = lambda x: x  # noqa: E731
    rows = store.rows(ROLES[2])[: config.max_rows]
    if len(rows) == 0:
        raise DataError(f"fisher-leakage needs test rows, but {str(store.path)!r} has none.")
    d = int(np.prod(store.input_shape or ()))
    generator = torch.Generator(device=device).manual_seed(config.seed)
    traces, variances = [], []
    # The encoder's own noise is drawn from torch's global generator: fork it, so the metric
    # neither depends on nor disturbs whatever ran before.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.seed)
        mismatch = _reproduces(encoder, model_input, store, rows[:64], device, declared, own_laplace)
        if mismatch is not None:
            return _undefined(config, mismatch, sigma=sigma)
        if laplace is not None:
            # Whitened by the per-element scale: tr(Jᵀ diag(1/b²) J) = E‖diag(1/b) J v‖², then "σ" = 1.
            inverse = (1.0 / laplace).to(device=device, dtype=torch.float32)
            function = lambda x: encoder(model_input(x)) * inverse  # noqa: E731
        else:
            function = lambda x: encoder(model_input(x))  # noqa: E731 - the map whose Jacobian is taken
        mode: Literal["jvp", "vjp"] = "jvp"
        for start in range(0, len(rows), config.batch_size):
            batch = torch.from_numpy(store.inputs(rows[start : start + config.batch_size])).to(device)
            try:
                trace = jacobian_trace_hutchinson(function, batch, config.probes, generator, mode)
            except (RuntimeError, NotImplementedError):
                if mode == "vjp" or start > 0:
                    raise
                mode = "vjp"  # an operation without a forward-mode derivative: probe Jᵀ u instead
                trace = jacobian_trace_hutchinson(function, batch, config.probes, generator, mode)
            traces.append(trace.per_row)
            variances.append(trace.probe_variance)
            if progress is not None:
                progress(min(start + config.batch_size, len(rows)), len(rows))
    unit = sigma if sigma is not None else 1.0  # Laplace: the scales are inside ``function``
    per_row = dfil_from_trace(np.concatenate(traces), d, unit)
    probe_var = np.concatenate(variances) / (d * unit * unit) ** 2
    dfil = float(per_row.mean())
    n = len(per_row)
    noise: dict[str, Any] = {"noise": "gaussian", "sigma": sigma}
    if laplace is not None:
        scales = laplace.flatten().cpu().numpy()
        noise = {"noise": "laplace", "sigma": None, "laplace_scale": {
            "mean": float(scales.mean()), "min": float(scales.min()), "max": float(scales.max()),
            # the one scale that gives the same dFIL were it the same for every element
            "harmonic_rms": float(1.0 / math.sqrt(float(np.mean(1.0 / scales**2))))}}  # fmt: skip
    details = {
        **noise,
        "sigma_source": "config" if config.sigma is not None else "encoder",
        "declared_sigma": declared,
        "declared_at": where if laplace is None else laplace_at,
        "clip": clip,
        "input_elements": d,
        "rows": n,
        "role": ROLES[2],
        "probes": config.probes,
        "jacobian_products": mode,
        # Over rows: covers both the rows' spread and the probes' noise.
        "standard_error": float(per_row.std(ddof=1) / math.sqrt(n)) if n > 1 else None,
        # The probes' share alone: how far a row's Hutchinson estimate is from its exact trace.
        "probe_standard_error": float(math.sqrt(probe_var.sum() / config.probes) / n),
        "dfil_per_row_quantiles": {f"p{q}": float(np.quantile(per_row, q / 100)) for q in (5, 50, 95)},
        "mse_bound_worst_row": float(1.0 / per_row.max()) if per_row.max() > 0 else None,
    }
    if config.sigma is not None and declared is not None and not math.isclose(config.sigma, declared, rel_tol=1e-6):
        details["warning"] = f"sigma = {config.sigma:g} was given, but the encoder declares {declared:g}; the given one is used"
    elif config.sigma is not None and own_laplace is not None:
        details["warning"] = (f"sigma = {config.sigma:g} was given, and the encoder declares Laplace noise; dFIL is that "
                              "of Gaussian noise of the given scale alone")  # fmt: skip
    values = {"dfil": dfil, "mse_bound": (1.0 / dfil) if dfil > 0 else None}
    return MetricResult("fisher-leakage", values, details, asdict(config))


__all__ = [
    "BayesRiskEstimate",
    "FisherTrace",
    "bayes_risk_knn",
    "cover_hart_lower_bound",
    "declared_laplace",
    "declared_noise",
    "dfil_from_trace",
    "error_interval",
    "jacobian_trace_hutchinson",
    "neighbours_for",
]
