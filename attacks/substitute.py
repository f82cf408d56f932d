"""The black-box substitute-encoder attack: invert an encoder whose weights the attacker never saw.

Threat model. The attacker knows the encoder's *architecture* (rebuilt from the store's
provenance, then every parameter re-initialised) and the public task, not its weights. It
holds unpaired data of the same distribution: the X of the attacker-train rows, without their
Z, and the Z of the attacker-validation rows, observed without their X (both with their
public-task labels, which a server that trains the public task knows). No row's X is ever
used together with that row's Z. It is scored on the test rows: its reconstruction of each
test X from that row's Z.

Method (``method="align"``, feature-space alignment as in FORA, Xu et al., CVPR 2024, and
SDAR, NDSS 2025):

1. A substitute encoder E' of the same architecture is trained on the auxiliary X so that the
   distribution of E'(X) matches the distribution of the observed Z: the loss is the squared
   maximum mean discrepancy between the two, with a sum of Gaussian kernels
   ``k(a, b) = Σ_s exp(−‖a − b‖² / (2 (s·m)²))`` (``m`` the median distance between observed
   Z rows, ``s`` the configured bandwidths), computed in the observed Z's standardised scale.
   The unbiased estimate is used:
   ``MMD² = mean_{i≠j} k(a_i, a_j) + mean_{i≠j} k(b_i, b_j) − 2 mean_{i,j} k(a_i, b_j)``.
2. Distribution matching alone leaves E' free to permute what it encodes among rows of the
   same marginal; the public task pins the classes: a classifier is fitted on the observed
   (Z, public label) pairs, frozen, and E' is also trained so that it classifies E'(X_aux) as
   its public labels (cross-entropy, weight ``ce_weight``). A store without the public task's
   labels falls back to the MMD alone, with a warning.
3. A decoder (the decoder attack's networks) is trained on the substitute pairs
   (E'(X_aux), X_aux) and applied to the real test Z.

Model selection uses held-out auxiliary rows only (a fifth of each side): the alignment keeps
the epoch with the lowest held-out loss; the decoder's epoch (the untrained one, which predicts
the mean image, included) is chosen on a cycle gain over held-out observed Z
(:func:`_cycle_gain`), since the attacker holds no pair to validate on.

The cycle gain cannot tell whether Z carries anything about X: on noise Z, E' learns to map X
into the noise's distribution, the decoder inverts E', and re-encoding a decoded noise row gives
that row back, so the gain is positive there too. What links the two unpaired sides is the
public task, so a chance check decides whether the reconstructions are reported at all: a fifth
of the observed Z rows is set aside (no other stage sees their labels), an image classifier of
the public task is fitted on the auxiliary (X, label) rows, and it classifies the decoder's
reconstructions of the set-aside Z. If they agree with those rows' public labels no more often
than under permutations of the labels (:func:`chance_check`, p-value above ``alpha``), the
attack reports the mean image, with a warning. Without public labels there is no such check,
and a warning says so. Scores are the decoder
attack's (:func:`leakaudit.attacks.image_scores.score_images`: per-image SSIM and PSNR on test rows),
beside the mean-image floor (the attacker-train mean), so the numbers mean the same for every
attack. Alignment was chosen because it trains a decoder once and decodes every test row in one
pass; UnSplit's alternating optimisation over the test Z is not implemented, so the two are not
compared yet. Measurements are in ``benchmarks/RESULTS-attacks.md``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from leakaudit.attacks._alignment import Alignment, median_distance, reinitialised
from leakaudit.attacks._data import attack_rows, read_activations, read_inputs
from leakaudit.attacks._training import Progress, Standardizer, as_tensor, fit, predict
from leakaudit.attacks.classifier_heads import mlp_head
from leakaudit.attacks.decoder_nets import ARCHS, AlexNetDecoder, build_decoder, geometry
from leakaudit.attacks.decoders import SSIM_MIN_SIDE
from leakaudit.attacks.image_scores import ImageScores, score_images
from leakaudit.attacks.reconstructions import save_grid
from leakaudit.config import positive
from leakaudit.errors import DataError, UnknownNameError, UsageError
from leakaudit.glossary import with_intervals
from leakaudit.registry import ATTACKS, Artifact, Needs
from leakaudit.runtime import resolve_device
from leakaudit.store import ActivationStore
from leakaudit.threat import Threat
from leakaudit.training import engine
from leakaudit.training.engine import Schedule, seed_for

METHODS = ("align",)
#: Share of each auxiliary side held out for model selection.
HOLDOUT = 0.2
#: What the attack reconstructs with besides Z (a report compares its MSE with unbiased-attacker bounds).
PRIOR = "a prior learned from auxiliary inputs and a substitute encoder"
#: Label permutations of the chance check (its p-value is at least 1 / (PERMUTATIONS + 1)).
PERMUTATIONS = 999


@dataclass(frozen=True)
class SubstituteConfig:
    """Settings of the substitute-encoder attack.

    Attributes:
        method: ``align`` (feature-space alignment, then a decoder).
        task: the public task whose labels anchor the alignment; ``None`` or a task the store
            lacks: MMD alone.
        align_epochs: the most epochs of the alignment stage (the public-task classifier's and E''s).
        epochs: the most epochs of the decoder stage (early stopping usually ends sooner).
        patience: epochs without a better held-out score before a stage stops.
        batch_size: rows per step (per side in the alignment).
        lr: Adam's learning rate of the substitute encoder and of the decoder.
        ce_weight: weight of the public-task cross-entropy against the MMD.
        bandwidths: Gaussian kernel widths, in units of the median distance between observed Z rows.
        arch: the decoder (``upsample``, ``alexnet``, ``resnet``).
        width: channels of the decoder's last stage.
        seed: seeds every initialisation and minibatch order (results are deterministic per seed).
        alpha: the chance check's significance level: the reconstructions are reported only if
            their public-task agreement on the check rows has a permutation p-value at most ``alpha``;
            otherwise the attack reports the mean image.
        device: ``auto``, ``cpu`` or ``cuda[:N]``.
        trust_checkpoint: allow unpickling the recorded checkpoint to rebuild the architecture
            (runs code from the file).
    """

    method: str = "align"
    task: str | None = "public"
    align_epochs: int = 60
    epochs: int = 100
    patience: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    ce_weight: float = 1.0
    bandwidths: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)
    arch: str = "upsample"
    width: int = 32
    seed: int = 0
    alpha: float = 0.01
    device: str = "auto"
    trust_checkpoint: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UnknownNameError("substitute method", self.method, METHODS)
        if self.arch not in ARCHS:
            raise UnknownNameError("decoder", self.arch, ARCHS)
        for name in ("align_epochs", "epochs", "patience", "batch_size", "width"):
            positive(name, getattr(self, name))
        positive("lr", self.lr)
        positive("ce_weight", self.ce_weight, allow_zero=True)
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha: expected a significance level between 0 and 1, got {self.alpha!r}.")
        if not self.bandwidths:
            raise UsageError("bandwidths: expected at least one kernel width, got none.")
        for value in self.bandwidths:
            positive("bandwidths", value)


@dataclass
class SubstituteResult:
    """What the substitute attack found; :meth:`to_dict` is its JSON form (without image arrays).

    Attributes:
        scores: test scores of the reconstructions from the real test Z.
        mean_image: test scores of predicting the attacker-train mean image.
        alignment: how well E' matched the observed Z (held-out MMD², public-task agreement).
        threat: what the attacker knew and held, and where in the split its rows came from.
        rows: rows per role.
        input_shape: shape of one X row.
        layer_shape: shape of one Z row.
        config: the settings used.
        seconds: wall time of the attack.
        warnings: what the user should know.
    """

    scores: ImageScores
    mean_image: ImageScores
    alignment: dict[str, Any]
    threat: dict[str, Any]
    rows: dict[str, int]
    input_shape: list[int]
    layer_shape: list[int]
    config: dict[str, Any]
    seconds: float
    warnings: list[str] = field(default_factory=list)
    test_rows: np.ndarray | None = field(default=None, repr=False)
    reconstructions: np.ndarray | None = field(default=None, repr=False)
    ssim_per_image: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    mean_image_array: np.ndarray | None = field(default=None, repr=False)

    attack = "substitute"
    _ARRAYS = ("test_rows", "reconstructions", "ssim_per_image", "mean_image_array")

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"attack": self.attack}
        for f in dataclasses.fields(self):
            if f.name not in self._ARRAYS:
                value = getattr(self, f.name)
                data[f.name] = dataclasses.asdict(value) if isinstance(value, ImageScores) else value
        data.update(self.report_metrics())
        data["prior"] = PRIOR
        return data

    def report_metrics(self) -> dict[str, Any]:
        """The report.json numbers: the same names, and meanings, as the decoder attack's, with their ``_ci95``."""
        return {
            **self.scores.numbers("ssim_mean", "ssim_p95", "psnr", "mse"),
            **self.mean_image.numbers("ssim_p95", as_name="{}_mean_image"),
        }

    def render(self) -> list[Any]:
        from rich.table import Table
        from rich.text import Text

        table = Table(title=f"substitute attack ({self.threat['knows']} known, {self.threat['holds']} rows), Z "
                      f"{'×'.join(map(str, self.layer_shape))} → X {'×'.join(map(str, self.input_shape))}")  # fmt: skip
        for column in ("", "SSIM", "p5", "p50", "p95", "PSNR"):
            table.add_column(column, justify="left" if not column else "right", min_width=5)
        for name, s in (("substitute", self.scores), ("mean-image", self.mean_image)):
            table.add_row(name, *(f"{v:.3f}" for v in (s.ssim_mean, s.ssim_p5, s.ssim_p50, s.ssim_p95)), f"{s.psnr:.2f}")
        return [table, Text(f"source: {self.threat['source']}")]


# --------------------------------------------------------------------------- rows and labels


def _holdout(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions ``0 … count-1`` split into fit and held-out parts, seeded (at least 2 rows in each)."""
    order = np.random.default_rng(seed).permutation(count)
    hold = min(max(2, round(HOLDOUT * count)), count - 2)
    return np.sort(order[hold:]), np.sort(order[:hold])


def _public_labels(store: ActivationStore, task: str | None) -> tuple[np.ndarray | None, int, str | None]:
    """The public task's labels, its class count, and a warning when they cannot be used."""
    if task is None:
        return None, 0, None
    if task not in store.tasks:
        return None, 0, (f"the store has no task {task!r}; the substitute encoder was aligned on the distribution of Z "
                         "alone (set task= to the public task's name to anchor it on the public labels).")  # fmt: skip
    labels = np.asarray(store.labels(task), dtype=np.int64)
    return labels, int(labels.max()) + 1, None


# --------------------------------------------------------------------------- the attack


@ATTACKS.register(
    "substitute",
    config=SubstituteConfig,
    needs=Needs(inputs=True, task=None, model=True),
    threat=Threat("architecture", "unpaired"),
    metrics=with_intervals(
        {
            "ssim_mean": "mean SSIM of the substitute attack's reconstructions",
            "ssim_p95": "95th-percentile SSIM of the substitute attack's reconstructions",
            "psnr": "PSNR (dB) of the substitute attack's reconstructions",
            "mse": "per-element MSE of the substitute attack's reconstructions",
            "ssim_p95_mean_image": "95th-percentile SSIM of predicting the mean image (the no-information floor)",
        },
        "ssim_mean", "ssim_p95", "psnr", "mse", "ssim_p95_mean_image",
    ),
    artifacts={
        "grid": Artifact(
            "PNG of test originals above their reconstructions", "substitute-reconstructions.png",
            lambda result, store, path: save_grid(result, store, path),
        ),
    },
    audit_default=lambda tasks: {"task": "public" if "public" in tasks else None},
)
def run_substitute(store: ActivationStore, config: SubstituteConfig, progress: Progress | None = None) -> SubstituteResult:
    """Black-box inversion: align a re-initialised encoder of the same architecture on unpaired rows, decode real Z.

    Args:
        store: an open activation store with ``/inputs`` and the model's provenance.
        config: the attack's settings.
        progress: optional ``progress(description, done, total)`` for progress bars.

    Raises:
        UsageError: the model cannot be rebuilt from the store (the message says why), or
            its rebuilt encoder does not produce the stored Z's shape.
        DataError: the images are too small for SSIM, or a role has no rows.
    """
    from leakaudit.provenance import rebuild_split

    started = time.perf_counter()
    device = resolve_device(config.device)
    if not store.has_inputs:
        store.inputs(np.arange(0))  # raises the store's StoreError, which says which dump option adds them
    input_shape = tuple(int(s) for s in store.input_shape or ())
    if min(input_shape[1:]) < SSIM_MIN_SIDE:
        raise DataError(
            f"the stored images are {input_shape[1]}×{input_shape[2]}; SSIM's Gaussian window needs at least "
            f"{SSIM_MIN_SIDE}×{SSIM_MIN_SIDE}. Dump with a larger --input-size."
        )
    layer_shape = tuple(int(s) for s in store.layer_shape)
    rows = attack_rows(store)
    split = rebuild_split(store, trust_checkpoint=config.trust_checkpoint)
    encoder, warnings = reinitialised(split.encoder, seed_for(config.seed, "substitute-encoder"))
    del split  # the real weights go no further than this line

    # The attacker's two unpaired sides: X of attacker-train rows, Z of attacker-validation rows.
    x_aux = as_tensor(read_inputs(store, rows.train, "attacker-train"))
    z_obs = as_tensor(read_activations(store, rows.val, "attacker-validation"))
    x_fit, x_hold = _holdout(len(x_aux), seed_for(config.seed, "holdout-x"))
    labels, classes, warning = _public_labels(store, config.task)
    warnings += [warning] if warning else []
    z_check = np.arange(0)
    z_rest = np.arange(len(z_obs))
    if labels is not None and len(z_obs) >= 10:  # the chance check's rows: no other stage sees their labels
        z_rest, z_check = _holdout(len(z_obs), seed_for(config.seed, "check-z"))
    z_fit, z_hold = (z_rest[i] for i in _holdout(len(z_rest), seed_for(config.seed, "holdout-z")))
    with torch.no_grad():
        out = encoder.eval()(x_aux[:2])
    if not isinstance(out, torch.Tensor) or tuple(out.shape[1:]) != layer_shape:
        shape = tuple(out.shape[1:]) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UsageError(f"the rebuilt encoder outputs {shape}, the store's Z is {layer_shape}")

    spatial = len(layer_shape) == 3 and layer_shape[1] * layer_shape[2] > 1
    standardizer = Standardizer.fit(z_obs[z_fit], per_channel=spatial)
    head = None
    y_x = None
    if labels is not None:
        y_z = torch.from_numpy(labels[rows.val])
        head = _public_head(z_obs, y_z, z_fit, z_hold, standardizer, classes, config, device)
        y_train = torch.from_numpy(labels[rows.train])
        y_x = (y_train[x_fit], y_train[x_hold])

    widths = torch.tensor(config.bandwidths, dtype=torch.float32) * median_distance(standardizer(z_obs[z_fit]))
    task = Alignment(encoder.to(device), (x_aux[x_fit], x_aux[x_hold]), (z_obs[z_fit], z_obs[z_hold]), y_x, head,
                      _on(standardizer, device), widths,
                      config.ce_weight, seed_for(config.seed, "alignment-z"), device)  # fmt: skip
    generator = torch.Generator().manual_seed(seed_for(config.seed, "alignment"))
    torch.manual_seed(seed_for(config.seed, "alignment"))
    outcome = engine.fit(
        encoder, task, Schedule(epochs=config.align_epochs, batch_size=config.batch_size, lr=config.lr,
                                patience=config.patience, plateau=True),
        generator=generator, device=device, ctx=None, params=list(encoder.parameters()), data_parallel=False,
        initial_candidate=True,
        on_epoch=(lambda v: progress("substitute encoder", v.epoch, config.align_epochs)) if progress else None,
    )  # fmt: skip
    if progress:
        progress("substitute encoder", config.align_epochs, config.align_epochs)
    encoder.eval()
    best = outcome.best
    agreement = None
    features = predict(encoder, x_aux, device)
    if head is not None and y_x is not None:
        predicted = predict(head, standardizer(features[x_hold]), device).argmax(1)
        agreement = float((predicted == y_x[1]).double().mean())

    # The decoder learns X from the substitute's features of the auxiliary X, and meets real Z only at test.
    mean_image = x_aux.mean(dim=0)
    torch.manual_seed(seed_for(config.seed, f"decoder-{config.arch}"))
    decoder = build_decoder(config.arch, layer_shape, input_shape, config.width, mean_image)
    flat = isinstance(decoder, AlexNetDecoder) or not geometry(layer_shape, input_shape).spatial
    # Each side is standardised with its own statistics (channel-wise for spatial Z): what is left
    # of the first two moments' mismatch between E'(X) and the real Z is not handed to the decoder.
    own_scale = Standardizer.fit(features[x_fit], per_channel=not flat)
    scale = Standardizer.fit(z_obs[z_fit], per_channel=not flat)
    gain = _cycle_gain(encoder, _on(own_scale, device))
    fitted = fit(
        decoder, (own_scale(features[x_fit]), x_aux[x_fit]), (scale(z_obs[z_hold]), scale(z_obs[z_hold])),
        loss_fn=F.mse_loss, score_fn=gain, val_loss_fn=lambda out, z: -gain(out, z).mean(),
        epochs=config.epochs, batch_size=config.batch_size, lr=config.lr, patience=config.patience,
        seed=seed_for(config.seed, f"decoder-{config.arch}"), device=device, keep_initial=True,
        on_progress=(lambda done, total: progress("substitute decoder", done, total)) if progress else None,
    )  # fmt: skip
    check: dict[str, Any] = {"agreement": None, "chance": None, "p_value": None, "mean_image": False}
    if len(z_check) and fitted.best_epoch > 0:
        assert labels is not None  # the check rows are set aside only when there are public labels
        y_check = torch.from_numpy(labels[rows.val][z_check])
        judge = _image_classifier(x_aux, y_train, x_fit, x_hold, classes, config, device)
        guess = predict(judge, predict(decoder, scale(z_obs[z_check]), device).clamp_(0.0, 1.0), device).argmax(1)
        check.update(chance_check(guess, y_check, seed_for(config.seed, "chance-check")))
        check["mean_image"] = check["p_value"] > config.alpha
        if check["mean_image"]:
            warnings.append(
                f"the reconstructions of {len(z_check)} observed Z rows agree with their public labels no more "
                f"than chance ({check['agreement']:.3f} against {check['chance']:.3f} under permutation, "
                f"p = {check['p_value']:.3f} > alpha {config.alpha}): the attack reports the mean image."
            )  # fmt: skip
    elif not len(z_check):
        why = "without public labels" if labels is None else f"with {len(z_obs)} observed Z rows"
        warnings.append(f"{why} the reconstructions cannot be checked against chance; on Z that carries nothing the "
                        "attacker can use they may score below the mean image.")  # fmt: skip
    del x_aux, z_obs, features
    x_test = as_tensor(read_inputs(store, rows.test, "test"))
    z_test = as_tensor(read_activations(store, rows.test, "test"))
    if check["mean_image"]:
        recon = mean_image.expand_as(x_test).clone()
    else:
        recon = predict(decoder, scale(z_test), device).clamp_(0.0, 1.0)
    scores, ssim = score_images(recon, x_test)
    floor, floor_ssim = score_images(mean_image.expand_as(x_test), x_test)
    sizes = rows.sizes()
    public = f" and public labels ({config.task!r})" if labels is not None else ""
    threat = Threat(
        "architecture", "unpaired", len(rows.train) + len(rows.val),
        f"attacker-train: X{public} of {len(rows.train):,} rows, never their Z; attacker-validation: "
        f"Z{public} of {len(rows.val):,} rows, never their X; test: Z of {len(rows.test):,} rows reconstructed "
        "(their X only to score)",
    ).to_dict()  # fmt: skip
    alignment = {
        "mmd2_heldout": best.mmd2 if best is not None else None,
        "ce_heldout": best.ce if best is not None else None,
        "public_agreement_heldout": agreement,
        "epochs": outcome.epochs,
        "best_epoch": outcome.best_epoch,
        "decoder_cycle_gain_heldout": fitted.val_score,
        "decoder_epochs": fitted.epochs,
        "decoder_best_epoch": fitted.best_epoch,
        "chance_check": check,
    }
    return SubstituteResult(
        scores=scores, mean_image=floor, alignment=alignment, threat=threat, rows=sizes,
        input_shape=list(input_shape), layer_shape=list(layer_shape), config=dataclasses.asdict(config),
        seconds=round(time.perf_counter() - started, 3), warnings=warnings, test_rows=rows.test,
        reconstructions=recon.numpy(),
        ssim_per_image={"substitute": ssim.astype(np.float32), "mean-image": floor_ssim.astype(np.float32)},
        mean_image_array=mean_image.numpy(),
    )  # fmt: skip


def _on(standardizer: Standardizer, device: torch.device) -> Standardizer:
    return Standardizer(standardizer.mean.to(device), standardizer.std.to(device))


def _cycle_gain(encoder: nn.Module, own_scale: Standardizer) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``gain(x̂, z)``: per row, how much closer E'(x̂) is to its own z than to another row's z.

    The attacker holds no pair to score a decoder on real Z, but if E' encodes as the real
    encoder does, re-encoding the reconstruction of z gives back z rather than any other
    row's. The gain is the squared distance (standardised, per feature) of E'(x̂_i) to
    z_{i−1} minus its distance to z_i, within a batch taken in a circle; a decoder that
    ignores z (the mean image, the untrained decoder) has a mean gain of exactly 0. The
    decoder's epochs, the untrained one included, are selected on the gain over held-out
    observed Z, so a decoder is kept only where its reconstructions follow the real Z.
    """

    @torch.no_grad()
    def gain(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        encoder.eval()
        e = own_scale(encoder(x).float())
        own = (e - z).pow(2).flatten(1).mean(1)
        other = (e - z.roll(1, 0)).pow(2).flatten(1).mean(1)
        return other - own

    return gain


def chance_check(guess: torch.Tensor, labels: torch.Tensor, seed: int) -> dict[str, float]:
    """How often ``guess`` equals ``labels``, against the same agreement under label permutations.

    Under the null that the guesses are independent of the labels, every permutation of the
    labels is as likely as the observed order, so the share of ``PERMUTATIONS`` random
    permutations (plus the observed one) that agree at least as often is a valid p-value.

    Returns:
        ``agreement`` (observed), ``chance`` (its mean under permutation) and ``p_value``.
    """
    generator = torch.Generator().manual_seed(seed)
    observed = float((guess == labels).double().mean())
    orders = torch.stack([torch.randperm(len(labels), generator=generator) for _ in range(PERMUTATIONS)])
    null = (guess.unsqueeze(0) == labels[orders]).double().mean(1)
    exceed = int((null >= observed - 1e-12).sum())
    return {"agreement": observed, "chance": float(null.mean()), "p_value": (1 + exceed) / (1 + PERMUTATIONS)}


def _image_classifier(x: torch.Tensor, y: torch.Tensor, fit_rows: np.ndarray, hold_rows: np.ndarray, classes: int,
                      config: SubstituteConfig, device: torch.device) -> nn.Module:  # fmt: skip
    """A public-task classifier of images, fitted on the auxiliary (X, label) rows, for the chance check."""
    torch.manual_seed(seed_for(config.seed, "image-classifier"))
    judge = mlp_head(math.prod(x.shape[1:]), classes, width=256)
    fit(
        judge, (x[fit_rows], y[fit_rows]), (x[hold_rows], y[hold_rows]), loss_fn=F.cross_entropy,
        score_fn=lambda out, t: (out.argmax(1) == t).float(), epochs=config.align_epochs, batch_size=config.batch_size,
        lr=config.lr, patience=config.patience, seed=seed_for(config.seed, "image-classifier"), device=device,
    )  # fmt: skip
    return judge.eval()


def _public_head(z: torch.Tensor, y: torch.Tensor, fit_rows: np.ndarray, hold_rows: np.ndarray,
                 standardizer: Standardizer, classes: int, config: SubstituteConfig, device: torch.device) -> nn.Module:  # fmt: skip
    """A public-task classifier on the observed (Z, label) pairs, frozen for the alignment."""
    torch.manual_seed(seed_for(config.seed, "public-head"))
    head = mlp_head(math.prod(z.shape[1:]), classes, width=256)
    fit(
        head, (standardizer(z[fit_rows]), y[fit_rows]), (standardizer(z[hold_rows]), y[hold_rows]),
        loss_fn=F.cross_entropy, score_fn=lambda out, t: (out.argmax(1) == t).float(), epochs=config.align_epochs,
        batch_size=config.batch_size, lr=config.lr, patience=config.patience, seed=seed_for(config.seed, "public-head"),
        device=device,
    )  # fmt: skip
    for parameter in head.parameters():
        parameter.requires_grad_(False)
    return head.eval()
