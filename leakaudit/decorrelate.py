"""Universal decorrelation: lower dCor(X, Z) while keeping dCor(Y, Z), on the client alone.

NoPeek's device-level burn-in (Vepakomma et al., §III-A) iterates ``Z_t = H Z_{t−1}`` with

    H = (γ² D_X − α S_{X,Y})† (γ² D_X − L_M),   S_{X,Y} = k_Y L_Y − β k_X L_X,

to increase ``f(Z) = Tr ZᵀL_Y Z / sqrt(Tr YᵀL_Y Y · Tr ZᵀL_Z Z) − Tr ZᵀL_X Z / sqrt(Tr XᵀL_X X · Tr ZᵀL_Z Z)``.
The paper defines k_X, k_Y and S but not L_X, L_Y, L_Z, L_M or D_X; it defers them to
Vepakomma, Tonde & Elgammal (EJS 2018), whose text was not available here. What follows
is derived from the definitions of distance correlation alone, and says where it is a choice.

**The Laplacians** (exact). Write ``a_ij = |x_i − x_j|``, ``b_ij = |z_i − z_j|`` and Â, B̂ for
the double-centred distance matrices. Double centring is an orthogonal projection, so the
V-statistics are ``n² dCov²(X, Z) = ⟨Â, b⟩`` and ``n² dVar²(Z) = ⟨B̂, b⟩ = |B̂|²``. For the graph
Laplacian ``L(w) = diag(w 1) − w`` of weights w, ``Tr ZᵀL(w)Z = ½ Σ w_ij |z_i − z_j|²``; with the
weights ``M ⊘ b`` (``M_ij / b_ij``, 0 where ``b_ij = 0``) that is ``½ ⟨M, b⟩``. So

    L_X = L(Â ⊘ b),  L_Y = L(Ŷ ⊘ b),  L_Z = L(B̂ ⊘ b)        (weights taken at the current Z)

give ``Tr ZᵀL_X Z = ½ n² dCov²(X, Z)``, ``Tr ZᵀL_Z Z = ½ n² dVar²(Z)``, and at Z = X,
``k_X = 1 / sqrt(Tr XᵀL_X X) = √2 / |Â|``. With these, f(Z) is *exactly*
``dCor²(Y, Z) − β dCor²(X, Z)`` (β = 1 in the paper's f; β enters through S), squared
V-statistic distance correlations with exponent 1 — the numbers :mod:`leakaudit.metrics.dcor`
reports (the tests check both).

**The gradient** (exact, away from coinciding rows). ``∂⟨M, b⟩/∂Z = 2 L(M ⊘ b) Z`` for fixed M,
and ``∂|B̂|²/∂Z = 2 ⟨B̂, ∂b⟩``, hence

    ∇f(Z) = (√2 / |B̂|) · (S − ρ L_Z) Z,   ρ = Tr ZᵀSZ / Tr ZᵀL_Z Z.

**L_M and D_X** (a choice). Taking ``L_M = α ρ L_Z`` makes the fixed points of ``Z = HZ``
exactly the stationary points of f (``HZ = Z ⇔ αSZ = L_M Z ⇔ ∇f = 0``). For D_X this module
takes the centring matrix ``J = I − 11ᵀ/n`` (every matrix above annihilates the constant
vector, and f is translation invariant). Then

    Z_t = J Z_{t−1} + α (γ² J − α S)† (S − ρ L_Z) Z_{t−1},

a step along ``P† ∇f`` with ``P = γ² J − α S`` positive definite on centred matrices whenever
``γ² > α λ_max(S)``: an ascent direction, a gradient step preconditioned by the curvature
of the numerator. That is *not* a majorisation–minimisation step in the strict sense — the
numerator's weights Ŷ, Â change sign, so ⟨W, b⟩ is neither convex nor concave and no fixed
γ majorises f everywhere by this argument. What the iteration enforces is monotone ascent:
γ² starts at the user's γ², is doubled until P is positive definite, and doubled again
whenever a step would lower f; the history records every γ² used and every doubling
(tests/test_decorrelate.py shows that the second doubling was never needed on the problems
it draws — measured, not proven).
``method="gradient"`` runs plain gradient steps on the same f beside it, for comparison.

f, dCor and the step are invariant to a rescaling of Z, so Z is kept centred with unit
root-mean-square entries. Memory and time are those of dense n × n matrices (a solve per
step, O(n³)); above ``max_rows`` rows a seeded subsample is used, and the result says so.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from scipy.spatial.distance import cdist

from leakaudit.errors import ConfigError, DataError, NonFiniteError, UsageError
from leakaudit.metrics.dcor import distance_correlation

Method = Literal["mm", "gradient"]
#: Fewest rows the iteration accepts (double centring and dCor need a few).
MIN_ROWS = 4
#: Most doublings of γ² in one step before the iteration stops at a (numerical) stationary point.
MAX_BACKTRACKS = 40


@dataclass(frozen=True)
class DecorrelateConfig:
    """Settings of the iteration.

    Attributes:
        iterations: number of updates Z_{t−1} → Z_t.
        alpha: α, the weight of S in H.
        beta: β, the weight of dCor²(X, Z) in S (and in the objective the history reports).
        gamma: γ; γ² D_X is the damping of each step (raised where it must be, see the module docstring).
        method: ``"mm"`` (the paper's update Z_t = H Z_{t−1}) or ``"gradient"`` (plain gradient ascent on f).
        lr: step of ``method="gradient"``, relative to |Z| (unit root-mean-square).
        max_rows: rows above which a seeded subsample is used (n × n matrices).
        seed: seed of the subsample.
    """

    iterations: int = 30
    alpha: float = 1.0
    beta: float = 1.0
    gamma: float = 0.1
    method: Method = "mm"
    lr: float = 0.1
    max_rows: int = 2000
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.iterations, int) or self.iterations < 0:
            raise ConfigError(f"iterations must be a non-negative integer, got {self.iterations!r}.")
        for name in ("alpha", "gamma", "lr"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a positive number, got {value!r}.")
        if not (isinstance(self.beta, int | float) and math.isfinite(self.beta) and self.beta >= 0):
            raise ConfigError(f"beta must be a non-negative number, got {self.beta!r}.")
        if self.method not in ("mm", "gradient"):
            raise ConfigError(f"method must be 'mm' or 'gradient', got {self.method!r}.")
        if not isinstance(self.max_rows, int) or self.max_rows < MIN_ROWS:
            raise ConfigError(f"max_rows must be an integer of at least {MIN_ROWS}, got {self.max_rows!r}.")


@dataclass(frozen=True)
class DecorrelateStep:
    """One iterate: the metrics' dCor(X, Z_t) and dCor(Y, Z_t), f(Z_t), and the step's damping."""

    iteration: int
    dcor_x: float
    dcor_y: float
    objective: float
    gamma2: float | None = None
    #: doublings of γ² in this step (to make P positive definite, or to keep f from falling).
    backtracks: int = 0


@dataclass
class DecorrelateResult:
    """What :func:`decorrelate` reached.

    Attributes:
        z: the last iterate, ``[rows, k]`` float64, centred, unit root-mean-square.
        rows: positions (in the input) of the rows used; all of them unless subsampled.
        history: iterate 0 (the start) and every update.
        config: the settings.
        source_rows: rows given.
        subsampled: whether only ``rows`` were used (more than ``config.max_rows`` given).
        stopped: why it ended early (a stationary point), or None.
        seconds: wall time.
    """

    z: np.ndarray
    rows: np.ndarray
    history: list[DecorrelateStep]
    config: DecorrelateConfig
    source_rows: int
    subsampled: bool
    stopped: str | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "rows": int(len(self.rows)),
            "source_rows": self.source_rows,
            "subsampled": self.subsampled,
            "stopped": self.stopped,
            "seconds": round(self.seconds, 3),
            "history": [asdict(h) for h in self.history],
            **self.extra,
        }


def double_centred_distances(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean distances of the rows and their double-centred matrix (float64)."""
    d = cdist(rows, rows)
    centred = d - d.mean(axis=0, keepdims=True) - d.mean(axis=1, keepdims=True) + d.mean()
    return d, centred


def laplacian(weights: np.ndarray, distances: np.ndarray) -> np.ndarray:
    """``L(M ⊘ b) = diag(w 1) − w`` with ``w_ij = M_ij / b_ij`` (0 where b_ij = 0, and on the diagonal)."""
    w = np.divide(weights, distances, out=np.zeros_like(weights), where=distances > 0)
    np.fill_diagonal(w, 0.0)
    lap = -w
    lap[np.diag_indices_from(lap)] = w.sum(axis=1)
    return lap


class Objective:
    """f(Z) = dCor²(Y, Z) − β dCor²(X, Z) and the pieces of its update, for fixed X, Y.

    Only Â/|Â| and Ŷ/|Ŷ| of X and Y are kept: what the client needs to hold is two n × n matrices.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, beta: float) -> None:
        _, a_hat = double_centred_distances(x)
        _, y_hat = double_centred_distances(y)
        norm_a, norm_y = float(np.linalg.norm(a_hat)), float(np.linalg.norm(y_hat))
        if norm_a == 0.0:
            raise DataError("every row of X is the same; there is nothing to decorrelate from.")
        if norm_y == 0.0:
            raise DataError("every row has the same label (Y is constant); dCor(Y, Z) is 0 whatever Z is.")
        self.a = a_hat / norm_a
        self.y = y_hat / norm_y
        self.beta = beta
        self.weights = self.y - beta * self.a  # W: f(Z) = ⟨W, b⟩ / |B̂|

    def value(self, z: np.ndarray) -> float:
        b, b_hat = double_centred_distances(z)
        norm_b = float(np.linalg.norm(b_hat))
        return float((self.weights * b).sum() / norm_b) if norm_b > 0 else 0.0

    def terms(self, z: np.ndarray) -> tuple[float, float]:
        """(dCor²(X, Z), dCor²(Y, Z)) from the matrices the update uses."""
        b, b_hat = double_centred_distances(z)
        norm_b = float(np.linalg.norm(b_hat))
        if norm_b == 0:
            return 0.0, 0.0
        return float((self.a * b).sum() / norm_b), float((self.y * b).sum() / norm_b)

    def pieces(self, z: np.ndarray) -> tuple[float, np.ndarray, np.ndarray, float, float]:
        """(f, S, L_Z, ρ, |B̂|) at z, in the paper's scaling (S = k_Y L_Y − β k_X L_X)."""
        b, b_hat = double_centred_distances(z)
        norm_b = float(np.linalg.norm(b_hat))
        if norm_b == 0:
            raise DataError("Z collapsed to a single point; its distance correlation is undefined.")
        s = math.sqrt(2.0) * laplacian(self.weights, b)
        l_z = laplacian(b_hat, b)
        rho = float(np.sum(z * (s @ z)) / np.sum(z * (l_z @ z)))
        f = float((self.weights * b).sum() / norm_b)
        return f, s, l_z, rho, norm_b

    def gradient(self, z: np.ndarray) -> np.ndarray:
        """∇f(Z) = (√2 / |B̂|) (S − ρ L_Z) Z."""
        _, s, l_z, rho, norm_b = self.pieces(z)
        return math.sqrt(2.0) / norm_b * ((s - rho * l_z) @ z)


def mm_step(objective: Objective, z: np.ndarray, alpha: float, gamma2: float) -> tuple[np.ndarray, float, float, int]:
    """One update Z_t = H Z_{t−1} that does not lower f; returns (Z_t, f(Z_t), γ² used, doublings).

    Raises:
        NonFiniteError: no γ² up to 2^40 times the start gives a step that keeps f (a stationary point).
    """
    n = z.shape[0]
    f0, s, l_z, rho, _ = objective.pieces(z)
    j = np.eye(n) - 1.0 / n
    ones = np.full((n, n), 1.0 / n)  # makes P invertible without touching centred matrices: P⁺ on them
    rhs_change = alpha * ((s - rho * l_z) @ z)
    doublings = 0
    for _ in range(MAX_BACKTRACKS):
        p = torch.from_numpy(gamma2 * j - alpha * s + ones)
        factor, info = torch.linalg.cholesky_ex(p)
        if int(info) != 0:  # not positive definite: γ² is below α λ_max(S)
            gamma2 *= 2.0
            doublings += 1
            continue
        step = torch.cholesky_solve(torch.from_numpy(rhs_change), factor).numpy()
        candidate = _normalise(z + step)
        f1 = objective.value(candidate)
        if f1 >= f0:
            return candidate, f1, gamma2, doublings
        gamma2 *= 2.0
        doublings += 1
    raise NonFiniteError(f"no damping γ² gives a step that keeps f(Z) (at {f0:.6g}); Z is at a stationary point.")


def decorrelate(
    x: np.ndarray,
    y: np.ndarray,
    config: DecorrelateConfig,
    z0: np.ndarray | None = None,
) -> DecorrelateResult:
    """Run the iteration (see the module docstring) from ``z0`` (default: X itself).

    Args:
        x: the client's rows, ``[n, ...]`` (flattened), what Z should not reveal.
        y: what Z should keep: one-hot labels or target values, ``[n]`` or ``[n, q]``.
        config: the settings.
        z0: the start, ``[n, ...]`` (e.g. an encoder's activations of X); default X.

    Returns:
        The last iterate and the history, whose dCor values are :func:`leakaudit.metrics.dcor.distance_correlation`'s.

    Raises:
        UsageError: fewer than 4 rows.
        DataError: rows that disagree in number, X or Y constant, Z collapsing to a point.
        NonFiniteError: NaN or infinite values.
    """
    started = time.perf_counter()
    x2, y2 = _rows(x, "X"), _rows(y, "Y")
    z2 = x2 if z0 is None else _rows(z0, "Z0")
    n = x2.shape[0]
    if y2.shape[0] != n or z2.shape[0] != n:
        raise DataError(f"X, Y and Z0 must have the same number of rows; got {n}, {y2.shape[0]} and {z2.shape[0]}.")
    if n < MIN_ROWS:
        raise UsageError(f"the decorrelation needs at least {MIN_ROWS} rows; got {n}.")
    rows = np.arange(n)
    subsampled = n > config.max_rows
    if subsampled:
        rows = np.sort(np.random.default_rng(config.seed).choice(n, config.max_rows, replace=False))
        x2, y2, z2 = x2[rows], y2[rows], z2[rows]
    objective = Objective(x2, y2, config.beta)
    z = _normalise(z2)
    if not np.any(z):
        raise DataError("every row of Z0 is the same; the iteration cannot start from a single point.")

    def record(iteration: int, gamma2: float | None = None, backtracks: int = 0) -> None:
        dx, dy = distance_correlation(x2, z), distance_correlation(y2, z)
        value = dy**2 - config.beta * dx**2
        history.append(DecorrelateStep(iteration, dx, dy, value, gamma2, backtracks))

    history: list[DecorrelateStep] = []
    record(0)
    gamma2 = config.gamma**2
    stopped = None
    for t in range(1, config.iterations + 1):
        if config.method == "mm":
            try:
                z, _, gamma2, doublings = mm_step(objective, z, config.alpha, gamma2)
            except NonFiniteError as exc:
                stopped = f"iteration {t}: {exc}"
                break
            record(t, gamma2, doublings)
        else:
            grad = objective.gradient(z)
            norm = float(np.linalg.norm(grad))
            if norm == 0.0:
                stopped = f"iteration {t}: the gradient is 0 (a stationary point)."
                break
            # Z has unit root-mean-square entries, |Z| = sqrt(n k): lr is the step relative to it.
            z = _normalise(z + config.lr * math.sqrt(z.size) * grad / norm)
            record(t)
    return DecorrelateResult(
        z=z,
        rows=rows,
        history=history,
        config=config,
        source_rows=n,
        subsampled=subsampled,
        stopped=stopped,
        seconds=time.perf_counter() - started,
    )


def _normalise(z: np.ndarray) -> np.ndarray:
    """Centred, unit root-mean-square: f and dCor do not change, the step sizes stay comparable."""
    z = z - z.mean(axis=0, keepdims=True)
    rms = math.sqrt(float(np.mean(z * z)))
    return z / rms if rms > 0 else z


def _rows(array: Any, name: str) -> np.ndarray:
    values = np.asarray(array, dtype=np.float64)
    if values.ndim == 0:
        raise DataError(f"{name} must have one row per sample; got a scalar.")
    values = values.reshape(values.shape[0], -1)
    if not np.isfinite(values).all():
        raise NonFiniteError(f"{name} holds NaN or infinite values ({int((~np.isfinite(values)).sum())} entries).")
    return values


def one_hot(labels: np.ndarray) -> np.ndarray:
    """Integer class labels → one-hot rows (float64), classes in sorted order."""
    classes, index = np.unique(np.asarray(labels), return_inverse=True)
    out = np.zeros((len(index), len(classes)))
    out[np.arange(len(index)), index] = 1.0
    return out


@dataclass
class ClientRows:
    """What a client holds: its rows X, what Z should keep (Y), and how they were read."""

    x: np.ndarray
    y: np.ndarray
    description: dict[str, Any]


def load_rows(spec: str, task: str = "label", limit: int | None = None) -> ClientRows:
    """Read X and Y for :func:`decorrelate` from a ``--data`` spec.

    Image sources (``digits``, ``idx:DIR``, ``npz:FILE`` with images, …) are read as
    ``dump`` reads them, rows flattened, with the task's labels one-hot as Y. An ``npz:FILE``
    whose ``x`` is 2-D is a table (one row per sample, e.g. scikit-learn's wine or
    diabetes saved with ``np.savez``): its columns are standardised (Euclidean distances
    would otherwise be those of the largest column) and its ``y`` is one-hot when it holds
    integers and a standardised column of values otherwise (regression targets).

    Raises:
        DataError: an unreadable file, no labels, rows that disagree in number.
        UnknownNameError: an unknown spec or task source.
    """
    if limit is not None and limit < MIN_ROWS:
        raise ConfigError(f"--limit must be at least {MIN_ROWS}, got {limit}.")
    kind, _, rest = spec.partition(":")
    if kind == "npz":
        table = _npz_table(rest, limit)
        if table is not None:
            return table
    from leakaudit.data import open_source, resolve_task

    source = open_source(spec)
    n = len(source) if limit is None else min(limit, len(source))
    labels = resolve_task("y", task, source)
    x = np.asarray(source.read(0, n), dtype=np.float64).reshape(n, -1)
    return ClientRows(x, one_hot(labels.labels[:n]), {"data": spec, "task": task, "kind": "images", "rows": n})


def _npz_table(path: str, limit: int | None) -> ClientRows | None:
    from pathlib import Path

    file = Path(path)
    if not file.is_file():
        raise DataError(f"npz file {path!r} does not exist.")
    try:
        archive = np.load(file, allow_pickle=False)
        keys = list(archive.files)
        x = np.asarray(archive["x"]) if "x" in keys else None
        if x is None or x.ndim != 2:
            return None  # images: read as every other command reads them
        if "y" not in keys:
            raise DataError(f"{path!r}: a table needs a 'y' array (labels or values) beside 'x'.")
        y = np.asarray(archive["y"])
    except ValueError as exc:
        raise DataError(f"cannot read {path!r} as npz without pickle: {exc}.") from None
    except OSError as exc:
        raise DataError(f"cannot read {path!r} as npz: {exc}.") from None
    if y.shape[0] != x.shape[0]:
        raise DataError(f"{path!r}: 'x' has {x.shape[0]} rows but 'y' has {y.shape[0]}.")
    n = x.shape[0] if limit is None else min(limit, x.shape[0])
    x = _rows(x[:n], "x")
    spread = x.std(axis=0)
    x = (x - x.mean(axis=0)) / np.where(spread > 0, spread, 1.0)
    if np.issubdtype(y.dtype, np.integer):
        target, kind = one_hot(y[:n]), "classes"
    else:
        values = _rows(y[:n], "y")
        spread_y = values.std(axis=0)
        target, kind = (values - values.mean(axis=0)) / np.where(spread_y > 0, spread_y, 1.0), "values"
    return ClientRows(x, target, {"data": f"npz:{path}", "kind": "table", "y": kind, "standardised": True, "rows": n})


def write_result(result: DecorrelateResult, output: Any, force: bool, extra: dict[str, Any] | None = None) -> None:
    """Write ``decorrelate.json`` (settings, history), ``z.npy`` and ``rows.npy`` into the folder ``output``."""
    from pathlib import Path

    from leakaudit.export import staged_dir, write_json

    with staged_dir(Path(output), force) as stage:
        np.save(stage / "z.npy", result.z.astype(np.float32))
        np.save(stage / "rows.npy", result.rows.astype(np.int64))
        write_json(stage / "decorrelate.json", {"schema": "leakaudit.decorrelate", "schema_version": 1,
                                                **(extra or {}), **result.to_dict()})
