"""The decoder attack: learn to reconstruct X from Z and score the reconstructions (SSIM, PSNR).

Three decoder families, each sized automatically from Z's shape (spatial ``[C, H, W]`` or
flat) to X's shape:

===============  ==============================================================================
arch             what it is
===============  ==============================================================================
``upsample``     the Scrunch paper's "simple custom upsampling network": ×2 upsampling + 3×3
                 conv/batch-norm/ReLU stages, a final resize to X's size and a 3×3 output conv
``alexnet``      the feature-inversion decoder of Dosovitskiy & Brox (2016): three fully
                 connected layers, then 5×5 stride-2 up-convolutions with leaky ReLUs,
                 widths scaled down to the input size
``resnet``       NoPeek's reconstruction testbed: transposed convolutions, batch norm, ReLU
                 and additive (ResNet-style) skip connections
``best``         all three; the one with the best attacker-validation SSIM is the headline
===============  ==============================================================================

With ``best``, the default ``budget: halving`` trains each decoder ``first_rung`` (5) epochs,
keeps the one with the best attacker-validation SSIM and continues it to its early stop
(successive halving, :mod:`leakaudit.attacks.halving`); the other two are reported as they
were when dropped. ``budget: full`` trains each of the three to its own early stop.

Each decoder trains on attacker-train rows with an MSE loss (or MSE + SSIM), keeps the epoch
with the best mean SSIM on attacker-validation rows, and is scored on test rows only: SSIM
per image (mean, p5, p50, p95), PSNR and MSE, next to the "predict the mean image" baseline
(the attacker-train mean), the score of a decoder that learned nothing from Z.

SSIM is :func:`leakaudit.metrics.ssim.structural_similarity` (Gaussian window, σ = 1.5,
population covariances, data range 1: scikit-image's ``structural_similarity`` with those
settings). PSNR is the mean over test images of 10·log10(1 / MSE_image).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from leakaudit import distributed
from leakaudit.attacks._data import attack_rows, read_activations, read_inputs
from leakaudit.attacks._sources import Source, StreamSource, TensorSource, mean_target
from leakaudit.attacks._training import (
    Fitting,
    Progress,
    Standardizer,
    as_tensor,
    parameter_count,
)
from leakaudit.attacks.decoder_nets import ARCHS, AlexNetDecoder, build_decoder, geometry
from leakaudit.attacks.display import decoder_html
from leakaudit.attacks.halving import BUDGETS, successive_halving
from leakaudit.attacks.image_scores import HeldOutImages, ImageScores, Scored, _ssim_fn
from leakaudit.attacks.reconstructions import save_grid, save_reconstructions
from leakaudit.config import positive
from leakaudit.errors import DataError, UnknownNameError
from leakaudit.glossary import with_intervals
from leakaudit.registry import ATTACKS, Artifact, Needs
from leakaudit.runtime import resolve_device
from leakaudit.store import ActivationStore
from leakaudit.store.stream import Blocks, DataPath, choose_path, networks_over_budget
from leakaudit.threat import Threat, leaked_pairs
from leakaudit.training.engine import PRECISIONS, autocast_dtype, seed_for
from leakaudit.training.footprint import Footprint, network_footprint, one_at_a_time, side_by_side

ARCH_CHOICES = (*ARCHS, "best")
LOSSES = ("mse", "mse+ssim")
#: SSIM's Gaussian window is 11 pixels wide (σ = 1.5, truncated at 3.5σ).
SSIM_MIN_SIDE = 11
#: What the decoder reconstructs with besides Z (a report compares its MSE with unbiased-attacker bounds).
PRIOR = "a prior learned from leaked (X, Z) pairs"


@dataclass(frozen=True)
class DecoderConfig:
    """Settings of the decoder attack.

    Attributes:
        arch: ``upsample``, ``alexnet``, ``resnet`` or ``best`` (all three).
        loss: ``mse``, or ``mse+ssim`` = (1 − ssim_weight)·MSE + ssim_weight·(1 − SSIM).
        ssim_weight: the SSIM share of the ``mse+ssim`` loss.
        width: channels of the last (full-resolution) decoder stage; earlier stages double it
            up to 256.
        epochs: the most epochs per decoder; early stopping usually ends sooner.
        batch_size: rows per step.
        lr: Adam's learning rate.
        weight_decay: Adam's L2 penalty.
        patience: epochs without a better validation SSIM before a decoder stops.
        seed: seeds initialisation and minibatch order (results are deterministic per seed).
        device: ``auto``, ``cpu`` or ``cuda[:N]``.
        precision: ``fp32``, or ``bf16`` to train under bfloat16 autocast (scores stay float32).
        leaked: the shares of the attacker's pairs it holds, e.g. ``0.01,0.1,1`` (NoPeek's "leaked
            subset of samples"): the decoders are trained again on that share of attacker-train
            (and of attacker-validation, to select), nested subsets drawn with ``seed``; the
            headline is always the attacker holding them all (1, added when missing).
        budget: with ``arch: best``, ``halving`` trains the three decoders ``first_rung``
            epochs each, keeps the best on attacker-validation and continues it to ``epochs``
            (:mod:`leakaudit.attacks.halving`); ``full`` trains each to its own early stop.
        first_rung: epochs every decoder trains before successive halving chooses one.
    """

    arch: str = "best"
    loss: str = "mse"
    ssim_weight: float = 0.5
    width: int = 32
    epochs: int = 100
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 10
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"
    leaked: tuple[float, ...] | str = (1.0,)
    budget: str = "halving"
    first_rung: int = 5

    @property
    def shares(self) -> tuple[float, ...]:
        """``leaked`` as sorted shares in (0, 1], 1 included."""
        return _fractions(self.leaked)

    def __post_init__(self) -> None:
        object.__setattr__(self, "leaked", _fractions(self.leaked))
        if self.arch not in ARCH_CHOICES:
            raise UnknownNameError("decoder", self.arch, ARCH_CHOICES, hint=f"Decoders: {', '.join(ARCH_CHOICES)}.")
        if self.precision not in PRECISIONS:
            raise UnknownNameError("precision", self.precision, PRECISIONS)
        if self.budget not in BUDGETS:
            raise UnknownNameError("budget", self.budget, BUDGETS)
        if self.loss not in LOSSES:
            raise UnknownNameError("decoder loss", self.loss, LOSSES, hint=f"Losses: {', '.join(LOSSES)}.")
        if not 0.0 <= self.ssim_weight <= 1.0:
            raise ValueError(f"ssim_weight: expected a number in [0, 1], got {self.ssim_weight!r}.")
        for name in ("width", "epochs", "batch_size", "patience", "first_rung"):
            positive(name, getattr(self, name))
        positive("lr", self.lr)
        positive("weight_decay", self.weight_decay, allow_zero=True)


def _fractions(value: tuple[float, ...] | str) -> tuple[float, ...]:
    """``"0.01,0.1,1"`` or a sequence → sorted unique shares in (0, 1], always with 1."""
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        shares = {float(item) for item in items if str(item).strip()}
    except (TypeError, ValueError):
        raise ValueError(f"leaked: expected shares in (0, 1] such as 0.01,0.1,1, got {value!r}.") from None
    bad = [f for f in shares if not 0.0 < f <= 1.0]
    if bad:
        raise ValueError(f"leaked: every share must be in (0, 1]; got {bad[0]!r}.")
    return tuple(sorted(shares | {1.0}))


#: Fewest pairs a leaked share may leave in a role: fewer cannot fit or select a decoder.
MIN_LEAKED_ROWS = 8


@dataclass
class DecoderRun:
    """One trained decoder, scored on test rows, or why it was skipped."""

    arch: str
    status: str = "ok"
    reason: str = ""
    test: ImageScores | None = None
    val_ssim: float | None = None
    epochs: int | None = None
    best_epoch: int | None = None
    params: int | None = None
    seconds: float | None = None
    seconds_per_epoch: float | None = None
    #: With ``budget: halving``: the epochs after which successive halving stopped this decoder (``None``: it was kept).
    halted_after: int | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class DecoderResult:
    """What the decoder attack found; :meth:`to_dict` is its JSON form (without image arrays).

    Attributes:
        runs: every decoder that ran.
        best: the decoder with the best mean attacker-validation SSIM.
        scores: its test scores.
        mean_image: test scores of predicting the attacker-train mean image.
        rows: rows per role.
        input_shape: shape of one X row.
        layer_shape: shape of one Z row.
        config: the settings used.
        warnings: what the user should know.
        test_rows: store rows of the test images, in the order of ``reconstructions``.
        reconstructions: the best decoder's test reconstructions, float32 [N, C, H, W].
        ssim_per_image: per decoder (and ``mean-image``), SSIM of each test image.
        mean_image_array: the attacker-train mean image [C, H, W].
        leaked: with shares below 1 (``leaked``), the curve: one point per share, with the rows
            it held, the chosen decoder and its test scores.
        data_path: per role, ``memory`` or ``stream``, the budget, the role's bytes and why
            (:class:`leakaudit.store.stream.DataPath`).
    """

    runs: list[DecoderRun]
    best: str
    scores: ImageScores
    mean_image: ImageScores
    rows: dict[str, int]
    input_shape: list[int]
    layer_shape: list[int]
    config: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    leaked: list[dict[str, Any]] = field(default_factory=list)
    test_rows: np.ndarray | None = field(default=None, repr=False)
    reconstructions: np.ndarray | None = field(default=None, repr=False)
    ssim_per_image: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    mean_image_array: np.ndarray | None = field(default=None, repr=False)
    data_path: dict[str, Any] = field(default_factory=dict)
    #: Per test image, behind the reported numbers: ``{"best"|"mean-image": {"ssim": ..., "mse": ...}}``.
    test_scores: dict[str, dict[str, np.ndarray]] = field(default_factory=dict, repr=False)

    attack = "decoder"
    _ARRAYS = ("test_rows", "reconstructions", "ssim_per_image", "mean_image_array", "test_scores")

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"attack": self.attack}
        for f in dataclasses.fields(self):
            if f.name not in self._ARRAYS:
                value = getattr(self, f.name)
                is_record = dataclasses.is_dataclass(value) and not isinstance(value, type)
                data[f.name] = dataclasses.asdict(value) if is_record else _plain(value)
        data.update(self.report_metrics())
        data["threat"] = self.threat.to_dict()
        data["prior"] = PRIOR
        return data

    @property
    def threat(self) -> Threat:
        return leaked_pairs("(X, Z)", self.rows["attacker-train"], self.rows["attacker-validation"])

    def report_metrics(self) -> dict[str, Any]:
        """The report.json numbers (DESIGN.md names), for the strongest decoder, each with its ``_ci95``."""
        return {
            **self.scores.numbers("ssim_mean", "ssim_p95", "psnr", "mse"),
            **self.mean_image.numbers("ssim_p95", as_name="{}_mean_image"),
        }

    def row_statistics(self) -> dict[str, Any]:
        """The per-image values behind each number with an interval, to combine training seeds on the same images."""
        from leakaudit.intervals import mean_rows, percentile_rows

        out: dict[str, Any] = {}
        for key, suffix in (("best", ""), ("mean-image", "_mean_image")):
            scores = self.test_scores.get(key)
            if scores is None:
                continue
            psnr = 10.0 * np.log10(1.0 / np.maximum(scores["mse"], 1e-10))  # as ImageScores.from_per_image
            out.update({
                "ssim_mean" + suffix: mean_rows(scores["ssim"]), "ssim_p95" + suffix: percentile_rows(scores["ssim"], 95),
                "psnr" + suffix: mean_rows(psnr), "mse" + suffix: mean_rows(scores["mse"]),
            })  # fmt: skip
        return out

    def render(self) -> list[Any]:
        """Rich renderables for the terminal (see :mod:`leakaudit.attacks.display`)."""
        from leakaudit.attacks.display import decoder_renderables

        return decoder_renderables(self)


def _plain(value: Any) -> Any:
    if isinstance(value, list):
        return [dataclasses.asdict(v) if dataclasses.is_dataclass(v) and not isinstance(v, type) else v for v in value]
    return value


def _losses(config: DecoderConfig):
    ssim = _ssim_fn()

    def mse(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(out, x)

    def mse_ssim(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        w = config.ssim_weight
        return (1 - w) * F.mse_loss(out, x) + w * (1 - ssim(out, x, data_range=1.0, reduction="none").mean())

    def score(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return ssim(out.float(), x.float(), data_range=1.0, reduction="none")

    return (mse if config.loss == "mse" else mse_ssim), mse, score


# --------------------------------------------------------------------------- the attack


@ATTACKS.register(
    "decoder",
    config=DecoderConfig,
    needs=Needs(inputs=True, task=None),
    threat=Threat("nothing", "pairs"),
    metrics=with_intervals(
        {
            "ssim_mean": "mean SSIM of the strongest decoder's reconstructions",
            "ssim_p95": "95th-percentile SSIM of the strongest decoder's reconstructions",
            "psnr": "PSNR (dB) of the strongest decoder's reconstructions",
            "mse": "per-element MSE of the strongest decoder's reconstructions",
            "ssim_p95_mean_image": "95th-percentile SSIM of predicting the mean image (the no-information floor)",
        },
        "ssim_mean", "ssim_p95", "psnr", "mse", "ssim_p95_mean_image",
    ),
    artifacts={
        "grid": Artifact(
            "PNG of test originals above their reconstructions", "reconstructions.png",
            lambda result, store, path: save_grid(result, store, path),
        ),
        "reconstructions": Artifact(
            "HDF5 of the best decoder's test reconstructions", "reconstructions.h5",
            lambda result, store, path: save_reconstructions(result, path, store_path=store.path), in_audit=False,
        ),
    },
    audit_default=lambda tasks: {},
    html=lambda result: decoder_html(result),
)
def run_decoder(store: ActivationStore, config: DecoderConfig, progress: Progress | None = None) -> DecoderResult:
    """Train decoders Z → X on attacker-train rows, select on validation SSIM, score on test rows.

    Under ``torchrun`` every rank runs this on the same store and trains with
    DistributedDataParallel; every rank returns the same result.

    Args:
        store: an open activation store with ``/inputs``.
        config: the attack's settings.
        progress: optional ``progress(description, done, total)`` for progress bars.

    Raises:
        StoreError: the store has no ``/inputs`` (it was dumped with ``--no-inputs``).
        DataError: the images are too small for SSIM's 11×11 window.
        NonFiniteError: Z or X holds NaN or infinite values.
    """
    device = resolve_device(config.device)
    autocast = autocast_dtype(config.precision, device)
    # Under torchrun, a rank that cannot read the store stops every rank here, before training.
    with distributed.agreed(distributed.current(device)):
        if not store.has_inputs:
            store.inputs(np.arange(0))  # raises the store's StoreError, which says which dump option adds them
        input_shape = tuple(int(s) for s in store.input_shape or ())
        if min(input_shape[1:]) < SSIM_MIN_SIDE:
            raise DataError(
                f"the stored images are {input_shape[1]}×{input_shape[2]}; SSIM's Gaussian window needs at least "
                f"{SSIM_MIN_SIDE}×{SSIM_MIN_SIDE}. Dump with a larger --input-size."
            )
        rows = attack_rows(store)
        layer_shape = tuple(int(s) for s in store.layer_shape)
        roles = ((rows.train, "attacker-train"), (rows.val, "attacker-validation"), (rows.test, "test"))
        networks = decoder_footprint(config, layer_shape, input_shape)
        paths = {role: choose_path(store, ("activations", "inputs"), r, role, networks=networks.total) for r, role in roles}
        train, val, test = (_source(store, r, paths[role]) for r, role in roles)

    mean_image = mean_target(train)
    images = HeldOutImages(test)
    baseline = images.score_image(mean_image)
    trained = _train_decoders(train, val, images, layer_shape, input_shape, config, device, autocast, progress)
    per_image: dict[str, np.ndarray] = {"mean-image": baseline.ssim.astype(np.float32), **trained.per_image}
    curve = []
    if len(config.shares) > 1:
        # Nested shares: the attacker holding 1 % holds a subset of the one holding 10 %.
        generator = np.random.default_rng(seed_for(config.seed, "leaked"))
        train_order, val_order = generator.permutation(train.rows), generator.permutation(val.rows)
        for share in config.shares:
            if share == 1.0:
                point, held = trained, (train.rows, val.rows)
            else:
                held = (max(MIN_LEAKED_ROWS, math.ceil(share * train.rows)), max(MIN_LEAKED_ROWS, math.ceil(share * val.rows)))
                if held[0] > train.rows or held[1] > val.rows:
                    raise DataError(
                        f"leaked share {share:g} needs at least {MIN_LEAKED_ROWS} attacker-train and attacker-validation "
                        f"rows; the store has {train.rows:,} and {val.rows:,}. Use a larger share or a larger store."
                    )
                t, v = np.sort(train_order[: held[0]]), np.sort(val_order[: held[1]])
                labelled = (lambda what, done, total, share=share: progress(f"{what} ({share:g} leaked)", done, total)) if progress else None
                point = _train_decoders(
                    train.subset(t), val.subset(v), images,
                    layer_shape, input_shape, config, device, autocast, labelled,
                )  # fmt: skip
            assert point.best.test is not None
            curve.append({
                "share": share,
                "pairs": {"attacker-train": held[0], "attacker-validation": held[1]},
                "threat": leaked_pairs("(X, Z)", held[0], held[1], of=f"{share:.0%} of").to_dict(),
                "best": point.best.arch,
                **dataclasses.asdict(point.best.test),
            })  # fmt: skip
    best = trained.best
    assert best.test is not None
    warnings_ = []
    if paths["attacker-train"].over_budget:
        warnings_.append(networks_over_budget("decoders", networks.total, paths["attacker-train"].budget))
    if images.streamed:
        warnings_.append(f"the test role was streamed (it exceeds the memory budget): every test image was scored, and "
                         f"only the first {len(trained.scored.kept)} reconstructions were kept (for the grid).")
    return DecoderResult(
        runs=trained.runs,
        best=best.arch,
        scores=best.test,
        mean_image=baseline.scores,
        rows=rows.sizes(),
        input_shape=list(input_shape),
        layer_shape=list(layer_shape),
        config=dataclasses.asdict(config),
        warnings=warnings_,
        leaked=curve,
        test_rows=rows.test,
        reconstructions=trained.scored.kept.numpy(),
        ssim_per_image=per_image,
        mean_image_array=mean_image.numpy(),
        data_path={role: path.to_dict() for role, path in paths.items()},
        test_scores={
            "best": {"ssim": trained.per_image[best.arch].astype(np.float64),
                     "mse": trained.scored.mse},
            "mean-image": {"ssim": baseline.ssim, "mse": baseline.mse},
        },  # fmt: skip
    )


def decoder_footprint(config: DecoderConfig, layer_shape: tuple[int, ...], input_shape: tuple[int, ...]) -> Footprint:
    """The memory the configured decoders take while they train (successive halving trains them side by side)."""
    archs = ARCHS if config.arch == "best" else (config.arch,)
    each = [network_footprint(partial(build_decoder, arch, layer_shape, input_shape, config.width), layer_shape,
                              config.batch_size) for arch in archs]  # fmt: skip
    return side_by_side(each) if config.budget == "halving" and len(archs) > 1 else one_at_a_time(each)


def _source(store: ActivationStore, rows: np.ndarray, path: DataPath) -> Source:
    """A role's (Z, X) pairs: read into memory when they fit in the budget, streamed otherwise."""
    if path.path == "memory":
        return TensorSource(as_tensor(read_activations(store, rows, path.role)), as_tensor(read_inputs(store, rows, path.role)))
    row_bytes = path.role_bytes // max(1, len(rows))
    return StreamSource(store, rows, path.role, Blocks.for_budget(row_bytes, path.rows_budget), y_name="inputs", data_path=path)


@dataclass
class _Trained:
    runs: list[DecoderRun]
    best: DecoderRun
    scored: Scored
    per_image: dict[str, np.ndarray]


def _train_decoders(train: Source, val: Source, images: HeldOutImages, layer_shape, input_shape,
                    config: DecoderConfig, device, autocast, progress) -> _Trained:
    """Train the configured decoders on ``train`` pairs, select on ``val`` SSIM, score on the test ``images``.

    With ``arch: best`` and ``budget: halving`` the three decoders train side by side by
    successive halving (:mod:`leakaudit.attacks.halving`); with ``budget: full`` each trains
    to its own early stop, one after the other.
    """
    mean_image = mean_target(train)
    loss_fn, val_loss_fn, score_fn = _losses(config)
    archs = ARCHS if config.arch == "best" else (config.arch,)

    def start(arch: str) -> tuple[torch.nn.Module, Standardizer, Fitting]:
        torch.manual_seed(seed_for(config.seed, arch))  # initialisation of this decoder
        model = build_decoder(arch, layer_shape, input_shape, config.width, mean_image)
        flat = isinstance(model, AlexNetDecoder) or not geometry(layer_shape, input_shape).spatial
        if isinstance(train, TensorSource):
            standardizer = Standardizer.fit(train.x, per_channel=not flat)
        else:
            standardizer = Standardizer.fit_source(train, per_channel=not flat)
        description = f"decoder {arch}"
        fitting = Fitting(
            model,
            train.mapped(standardizer),
            val.mapped(standardizer),
            loss_fn=loss_fn,
            score_fn=score_fn,
            val_loss_fn=val_loss_fn,
            epochs=config.epochs,
            batch_size=config.batch_size,
            lr=config.lr,
            patience=config.patience,
            seed=seed_for(config.seed, arch),
            device=device,
            weight_decay=config.weight_decay,
            keep_initial=True,
            autocast=autocast,
            on_progress=(lambda done, total, what=description: progress(what, done, total)) if progress else None,
        )
        return model, standardizer, fitting

    runs: list[DecoderRun] = []
    per_image: dict[str, np.ndarray] = {}
    best_run: DecoderRun | None = None
    best_scored: Scored | None = None
    best_val = -math.inf  # best_run's val_ssim, once there is one

    def conclude(arch: str, model: torch.nn.Module, standardizer: Standardizer, fitting: Fitting, dropped: int | None) -> None:
        nonlocal best_run, best_scored, best_val
        fitted = fitting.finish()
        scored = images.score_model(model, standardizer, device)
        per_image[arch] = scored.ssim.astype(np.float32)
        run = DecoderRun(
            arch=arch,
            reason="" if dropped is None else f"dropped by successive halving after {dropped} epochs",
            test=scored.scores,
            val_ssim=fitted.val_score,
            epochs=fitted.epochs,
            best_epoch=fitted.best_epoch,
            params=parameter_count(model),
            seconds=round(fitted.seconds, 3),
            seconds_per_epoch=round(fitted.seconds_per_epoch, 4),
            halted_after=dropped,
        )
        runs.append(run)
        # Selection on attacker-validation only; keep just the leader's images in memory.
        if best_run is None or fitted.val_score > best_val:
            best_run, best_scored, best_val = run, scored, fitted.val_score

    if config.budget == "halving" and len(archs) > 1:
        started = [start(arch) for arch in archs]
        dropped = successive_halving([f for _, _, f in started], epochs=config.epochs, first_rung=config.first_rung)
        for arch, (model, standardizer, fitting), out in zip(archs, started, dropped):
            conclude(arch, model, standardizer, fitting, out)
        del started
    else:
        for arch in archs:
            model, standardizer, fitting = start(arch)
            fitting.advance(config.epochs)
            conclude(arch, model, standardizer, fitting, None)
            del model, fitting
    assert best_run is not None and best_run.test is not None and best_scored is not None
    return _Trained(runs, best_run, best_scored, per_image)
