"""The white-box inversion attack: recover X from Z by optimisation through the encoder itself.

The attacker knows the encoder's weights and sees Z of the rows it attacks, and holds no data
at all (rMLE; He, Zhang & Lee, "Model inversion attacks against collaborative inference",
ACSAC 2019). For each Z row it solves

    x̂ = argmin_x  ‖E(x) − z‖² / ‖z‖²  +  λ_TV · TV(x)  +  λ_2 · mean(x²),   x ∈ [0, 1]^{C×H×W}

with Adam, batched over rows (every row's loss is its own, and Adam's update is elementwise,
so rows do not influence each other). The feature term is relative to ‖z‖² so that one λ_TV
fits every layer and model, whatever the scale of its activations. TV is the anisotropic L1
total variation (the mean absolute difference of neighbouring pixels), the image prior that
favours piecewise-smooth images with sharp edges. Each restart starts from a different image
(mid-grey first, then uniform noise); per image the restart whose final ‖E(x̂) − z‖ is lowest
is kept. A restart ends early when the batch's mean feature loss has not improved by a relative
``min_delta`` for ``patience`` steps.

x̂ is kept in the data range by projection: it is clamped to [0, 1] after every Adam step, so
E is only ever evaluated on valid images. Projection rather than a sigmoid parameterisation
because the stored images sit on the range's ends (a digit's background is exactly 0): a
sigmoid reaches them only asymptotically and its gradient vanishes there, so saturated pixels
stop moving; a clamped pixel that the gradient pushes back inside moves freely at once.

The encoder is the store's own (:func:`leakaudit.provenance.rebuild_encoder`): the recorded
model and weights (their SHA-256 checked), cut where the dump cut it and fed what the dump fed
it, i.e. the stored X after the dump's optional normalisation. The optimisation therefore runs
in the space X is stored and scored in. Before attacking, the tool checks that the rebuilt
encoder maps the stored X to the stored Z and warns where it does not. Gradients are taken
with respect to x̂ only (``torch.autograd.grad``), so the model's parameters gain no gradients,
and the forward runs in eval mode: BatchNorm statistics and dropout stay as they are.

Scores are the decoder attack's (:func:`leakaudit.attacks.image_scores.score_images`): per-image
SSIM and PSNR against the true test images. The "predict the mean image" floor beside them is
a reference the tool computes from attacker-train rows; this attacker has no such data.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from leakaudit.attacks._data import attack_rows, read_activations, read_inputs
from leakaudit.attacks._training import Progress
from leakaudit.attacks.decoders import SSIM_MIN_SIDE
from leakaudit.attacks.image_scores import ImageScores, score_images
from leakaudit.attacks.reconstructions import save_grid, save_reconstructions
from leakaudit.config import positive
from leakaudit.errors import DataError, UntrustedCheckpointError, UsageError
from leakaudit.glossary import with_intervals
from leakaudit.registry import ATTACKS, Artifact, Needs
from leakaudit.runtime import resolve_device
from leakaudit.store import ActivationStore
from leakaudit.threat import Threat

#: Relative difference between E(stored X) and stored Z above which the tool warns that the
#: rebuilt encoder is not the function that produced Z (float32 forward passes on another
#: device or thread count differ by far less).
REPRODUCTION_TOLERANCE = 1e-3
#: Rows on which E(stored X) is compared with stored Z.
REPRODUCTION_ROWS = 32


def prior(config: InversionConfig | dict[str, Any]) -> str:
    """What the inversion reconstructs with besides Z: a report compares its MSE with unbiased-attacker bounds."""
    get = config.get if isinstance(config, dict) else lambda name: getattr(config, name)
    terms = ["projection onto [0, 1]"]
    if get("tv_weight"):
        terms.append("a total-variation prior")
    if get("l2_weight"):
        terms.append("an L2 prior")
    return ", ".join(terms)


@dataclass(frozen=True)
class InversionConfig:
    """Settings of the white-box inversion attack.

    Attributes:
        steps: the most Adam steps per restart; early stopping usually ends sooner.
        lr: Adam's learning rate (in units of the [0, 1] data range).
        tv_weight: λ_TV, the weight of the total-variation prior.
        l2_weight: λ_2, the weight of the mean squared pixel value.
        restarts: optimisations per image from different starts; the best fit is kept.
        patience: steps without a relative improvement of ``min_delta`` in the batch's mean
            feature loss before a restart stops.
        min_delta: the relative improvement that counts as one.
        batch_size: test rows optimised together.
        rows: the most test rows inverted (a seeded sample of them; 0: all).
        seed: seeds the starting images and the row sample.
        device: ``auto``, ``cpu`` or ``cuda[:N]``.
        trust_checkpoint: allow unpickling the model archive to rebuild the encoder (runs
            code from the file; only for archives from a trusted source).
    """

    steps: int = 1000
    lr: float = 0.05
    tv_weight: float = 0.01
    l2_weight: float = 0.0
    restarts: int = 3
    patience: int = 50
    min_delta: float = 1e-4
    batch_size: int = 128
    rows: int = 512
    seed: int = 0
    device: str = "auto"
    trust_checkpoint: bool = False

    def __post_init__(self) -> None:
        for name in ("steps", "restarts", "patience", "batch_size"):
            positive(name, getattr(self, name))
        positive("lr", self.lr)
        for name in ("tv_weight", "l2_weight", "min_delta"):
            positive(name, getattr(self, name), allow_zero=True)
        positive("rows", self.rows, allow_zero=True)


@dataclass
class InversionResult:
    """What the inversion attack found; :meth:`to_dict` is its JSON form (without image arrays).

    Attributes:
        scores: test scores of the reconstructions (SSIM, PSNR, MSE).
        reference_mean_image: scores of predicting the attacker-train mean image on the same rows,
            computed by the tool as a reference; not available to this attacker.
        rows: test rows in the store and test rows inverted.
        input_shape: shape of one X row.
        layer_shape: shape of one Z row.
        encoder: how the encoder was rebuilt (model kind, truncation) and how closely it reproduced
            the stored Z (``reproduction_error``: max |E(X) − Z| / max |Z| on a few test rows).
        feature_loss: mean over images of the kept reconstruction's ‖E(x̂) − z‖² / ‖z‖².
        restart_chosen: per restart, how many images kept its reconstruction.
        steps_run: mean Adam steps per restart and batch (early stopping ends most sooner).
        seconds: wall time of the optimisation.
        seconds_per_image: ``seconds`` / images inverted (all restarts included).
        config: the settings used.
        warnings: what the user should know.
        test_rows: store rows of the inverted images, in the order of ``reconstructions``.
        reconstructions: float32 [N, C, H, W] in [0, 1].
        ssim_per_image: SSIM of each image, for ``inversion`` and the ``mean-image`` reference.
        mean_image_array: the attacker-train mean image [C, H, W] (the reference only).
    """

    scores: ImageScores
    reference_mean_image: ImageScores
    rows: dict[str, int]
    input_shape: list[int]
    layer_shape: list[int]
    encoder: dict[str, Any]
    feature_loss: float
    restart_chosen: list[int]
    steps_run: float
    seconds: float
    seconds_per_image: float
    config: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    test_rows: np.ndarray | None = field(default=None, repr=False)
    reconstructions: np.ndarray | None = field(default=None, repr=False)
    ssim_per_image: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    mean_image_array: np.ndarray | None = field(default=None, repr=False)

    attack = "inversion"
    #: What the reconstructions file records as the method that made them (the decoder's writer reads it).
    best = "inversion"
    _ARRAYS = ("test_rows", "reconstructions", "ssim_per_image", "mean_image_array")

    @property
    def threat(self) -> dict[str, Any]:
        """The declared threat model: white-box, no data of its own."""
        source = (
            f"no rows: it sees only Z of the {self.rows['inverted']:,} test rows it inverts; "
            "the mean-image reference is the tool's, from attacker-train"
        )
        return Threat("weights", "none", 0, source).to_dict()

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"attack": self.attack, "threat": self.threat}
        for f in dataclasses.fields(self):
            if f.name not in self._ARRAYS:
                value = getattr(self, f.name)
                data[f.name] = dataclasses.asdict(value) if isinstance(value, ImageScores) else value
        data["reference_mean_image"]["note"] = "computed by the tool from attacker-train rows; this attacker holds no data"
        data.update(self.report_metrics())
        data["prior"] = prior(self.config)
        return data

    def report_metrics(self) -> dict[str, Any]:
        """The report.json numbers (DESIGN.md names) of the reconstructions, each with its ``_ci95``."""
        return self.scores.numbers("ssim_mean", "ssim_p95", "psnr", "mse")

    def render(self) -> list[Any]:
        """Rich renderables for the terminal."""
        from rich import box
        from rich.table import Table
        from rich.text import Text

        table = Table(
            box=box.SIMPLE_HEAD,
            pad_edge=False,
            title=f"white-box inversion, Z {'×'.join(map(str, self.layer_shape))} → X {'×'.join(map(str, self.input_shape))}, "
            f"{self.rows['inverted']:,} of {self.rows['test']:,} test rows",
        )
        for column in ("", "SSIM", "p5", "p50", "p95", "PSNR", "MSE"):
            table.add_column(column, justify="left" if not column else "right", min_width=5)
        for name, s in (("inversion", self.scores), ("mean image †", self.reference_mean_image)):
            table.add_row(name, *(f"{v:.3f}" for v in (s.ssim_mean, s.ssim_p5, s.ssim_p50, s.ssim_p95)), f"{s.psnr:.2f}", f"{s.mse:.4f}")
        table.caption = (
            "† reference computed by the tool from attacker-train rows; this attacker holds no data · PSNR in dB"
        )
        return [
            table,
            Text(
                f"ssim_mean {self.scores.ssim_mean:.3f} · ssim_p95 {self.scores.ssim_p95:.3f} · psnr {self.scores.psnr:.2f} · "
                f"feature loss {self.feature_loss:.3g} · {self.seconds_per_image:.3f} s/image · encoder {self.encoder['method']}"
            ),
        ]


# --------------------------------------------------------------------------- the optimisation


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic L1 total variation of each image of ``x`` [N, C, H, W]: mean |vertical| + mean |horizontal| difference."""
    vertical = (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().flatten(1).mean(dim=1)
    horizontal = (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().flatten(1).mean(dim=1)
    return vertical + horizontal


def feature_loss(out: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """‖out − z‖² / ‖z‖² per row (the relative squared error; a zero z counts as norm 1)."""
    norm = z.flatten(1).pow(2).sum(dim=1)
    norm = torch.where(norm > 0, norm, torch.ones_like(norm))
    return (out.float() - z).flatten(1).pow(2).sum(dim=1) / norm


def invert(
    encoder: Any,
    z: torch.Tensor,
    image_shape: tuple[int, ...],
    config: InversionConfig,
    *,
    generator: torch.Generator,
    on_step: Any = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """Reconstructions of one batch of Z rows: the best of ``config.restarts`` optimisations per row.

    Args:
        encoder: maps a batch of images in [0, 1] to Z (differentiable in its input).
        z: the target activations [B, …] on the encoder's device.
        image_shape: (C, H, W) of one image.
        config: the attack's settings.
        generator: a CPU generator for the starting images.
        on_step: optional ``on_step()`` after every Adam step.

    Returns:
        The reconstructions [B, C, H, W] (CPU), each row's feature loss, the index of the
        restart each row kept, and the steps each restart ran.
    """
    device = z.device
    batch = len(z)
    best_x = torch.empty(batch, *image_shape)
    best_loss = torch.full((batch,), math.inf, dtype=torch.float64)
    chosen = torch.zeros(batch, dtype=torch.long)
    steps_run: list[int] = []
    for restart in range(config.restarts):
        if restart == 0:
            start = torch.full((batch, *image_shape), 0.5)
        else:
            start = torch.rand((batch, *image_shape), generator=generator)
        x = start.to(device).requires_grad_(True)
        optimizer = torch.optim.Adam([x], lr=config.lr)
        best_mean, stale, ran = math.inf, 0, 0
        for ran in range(1, config.steps + 1):  # noqa: B007 - ``ran`` is read after the loop
            fit = feature_loss(encoder(x), z)
            loss = fit + config.tv_weight * total_variation(x)
            if config.l2_weight:
                loss = loss + config.l2_weight * x.pow(2).flatten(1).mean(dim=1)
            # Gradients with respect to x̂ alone: the model's parameters gain none.
            (x.grad,) = torch.autograd.grad(loss.sum(), [x])
            optimizer.step()
            with torch.no_grad():
                x.clamp_(0.0, 1.0)
            if on_step is not None:
                on_step()
            mean = float(fit.detach().mean())
            if mean < best_mean * (1.0 - config.min_delta):
                best_mean, stale = mean, 0
            else:
                stale += 1
                if stale >= config.patience:
                    break
        steps_run.append(ran)
        with torch.no_grad():
            final = feature_loss(encoder(x), z).double().cpu()
        better = final < best_loss
        best_x[better] = x.detach().cpu()[better]
        best_loss[better] = final[better]
        chosen[better] = restart
    return best_x, best_loss, chosen, steps_run


# --------------------------------------------------------------------------- the attack


def _too_small(store: ActivationStore) -> str | None:
    shape = store.input_shape or ()
    if len(shape) == 3 and min(shape[1:]) < SSIM_MIN_SIDE:
        return (
            f"the stored images are {shape[1]}×{shape[2]}; SSIM's Gaussian window needs at least "
            f"{SSIM_MIN_SIDE}×{SSIM_MIN_SIDE}"
        )
    return None


def _check(store: ActivationStore, config: InversionConfig) -> str | None:
    """Why the attack cannot run on ``store`` (images too small, encoder not rebuildable), or ``None``."""
    too_small = _too_small(store)
    if too_small:
        return too_small
    try:
        _rebuild(store, config)
    except UsageError as exc:
        return str(exc).rstrip(".")
    return None


def _rebuild(store: ActivationStore, config: InversionConfig):
    from leakaudit.provenance import rebuild_encoder

    try:
        encoder = rebuild_encoder(store, trust_checkpoint=config.trust_checkpoint)
    except UntrustedCheckpointError as exc:
        raise UntrustedCheckpointError(
            f"the inversion cannot rebuild the encoder: {str(exc).rstrip('.')}. With `leakaudit attack`, "
            "trust it by --set trust_checkpoint=true"
        ) from None
    except UsageError as exc:
        raise UsageError(f"the inversion cannot rebuild the encoder: {str(exc).rstrip('.')}") from None
    if getattr(encoder.module, "gives_gradients", True) is False:  # an ONNX graph runs outside autograd
        raise UsageError(
            f"the inversion needs gradients through the encoder, and {encoder.loaded.spec!r} is an ONNX encoder run by "
            "onnxruntime, which gives none. Run it on a store dumped from the PyTorch encoder (encoder.pt2, or the "
            "model at its split layer)"
        )
    return encoder


def _sample_rows(test: np.ndarray, cap: int, seed: int) -> np.ndarray:
    if cap == 0 or cap >= len(test):
        return test
    chosen = np.random.default_rng(seed).choice(len(test), size=cap, replace=False)
    return test[np.sort(chosen)]


def _reproduction_error(encoder: Any, x: torch.Tensor, z: torch.Tensor) -> float:
    """The largest |E(x) − z| relative to the largest |z| (absolute when z is 0)."""
    with torch.no_grad():
        out = encoder(x).float()
    if out.shape != z.shape:
        raise UsageError(
            f"the rebuilt encoder outputs rows of shape {tuple(out.shape[1:])}, the store holds Z of shape "
            f"{tuple(z.shape[1:])}; it is not the model that produced Z"
        )
    scale = float(z.abs().max())
    diff = float((out - z).abs().max())
    return diff / scale if scale > 0 else diff


@ATTACKS.register(
    "inversion",
    config=InversionConfig,
    needs=Needs(inputs=True, task=None, model=True),
    threat=Threat("weights", "none"),
    metrics=with_intervals(
        {
            "ssim_mean": "mean SSIM of the white-box inversions",
            "ssim_p95": "95th-percentile SSIM of the white-box inversions",
            "psnr": "PSNR (dB) of the white-box inversions",
            "mse": "per-element MSE of the white-box inversions",
        },
        "ssim_mean", "ssim_p95", "psnr", "mse",
    ),
    # In an audit by default, on a seeded sample of test rows: its cost grows with each row.
    audit_default=lambda tasks: {"rows": 128},
    artifacts={
        "grid": Artifact(
            "PNG of test originals above their white-box inversions", "inversion.png",
            lambda result, store, path: save_grid(result, store, path),
        ),
        "reconstructions": Artifact(
            "HDF5 of the test rows' white-box inversions", "inversion.h5",
            lambda result, store, path: save_reconstructions(result, path, store_path=store.path), in_audit=False,
        ),
    },  # fmt: skip
    comparable=("steps", "lr", "tv_weight", "l2_weight", "restarts", "rows", "seed"),
    check=_check,
)
def run_inversion(store: ActivationStore, config: InversionConfig, progress: Progress | None = None) -> InversionResult:
    """Invert Z of test rows through the store's own encoder (white-box, no data), score on X.

    Args:
        store: an open activation store with ``/inputs`` and the model's provenance.
        config: the attack's settings.
        progress: optional ``progress(description, done, total)`` for progress bars.

    Raises:
        UntrustedCheckpointError: the model archive needs unpickling and ``trust_checkpoint`` is off.
        UsageError: the encoder cannot be rebuilt from the store's provenance.
        DataError: the images are too small for SSIM's window.
        NonFiniteError: Z or X holds NaN or infinite values.
    """
    device = resolve_device(config.device)
    if not store.has_inputs:
        store.inputs(np.arange(0))  # raises the store's StoreError, which says which dump option adds them
    too_small = _too_small(store)
    if too_small:
        raise DataError(f"{too_small}. Dump with a larger --input-size.")
    input_shape = tuple(int(s) for s in store.input_shape or ())
    rows = attack_rows(store)
    targets = _sample_rows(rows.test, config.rows, config.seed)
    z_test = torch.from_numpy(read_activations(store, targets, "test"))
    x_test = torch.from_numpy(read_inputs(store, targets, "test"))
    encoder = _rebuild(store, config)
    module = encoder.module
    warnings: list[str] = []
    layout = [(t, t.device) for t in (*module.parameters(), *module.buffers())]
    module.to(device)
    try:
        check = min(REPRODUCTION_ROWS, len(targets))
        error = _reproduction_error(encoder, x_test[:check].to(device), z_test[:check].to(device))
        if error > REPRODUCTION_TOLERANCE:
            warnings.append(
                f"the rebuilt encoder does not reproduce the stored Z (max |E(X) − Z| is {error:.3g} of max |Z| on "
                f"{check} test rows): the inversion attacks another function than the one that produced Z"
            )
        generator = torch.Generator().manual_seed(config.seed)
        batches = range(0, len(targets), config.batch_size)
        total = len(batches) * config.restarts * config.steps
        done = 0

        def on_step() -> None:
            nonlocal done
            done += 1
            if progress is not None and done % 10 == 0:
                progress("inversion", done, total)

        parts, losses, chosen, steps_run = [], [], [], []
        started = time.perf_counter()
        for first in batches:
            z = z_test[first : first + config.batch_size].to(device)
            recon, loss, kept, steps = invert(encoder, z, input_shape, config, generator=generator, on_step=on_step)
            parts.append(recon)
            losses.append(loss)
            chosen.append(kept)
            steps_run.extend(steps)
            done = (first // config.batch_size + 1) * config.restarts * config.steps  # early stops skip ahead
        seconds = time.perf_counter() - started
        if progress is not None:
            progress("inversion", total, total)
    finally:
        for tensor, where in layout:  # the rebuilt model back where it was (a factory may keep it)
            if tensor.device != where:
                tensor.data = tensor.data.to(where)
    recon = torch.cat(parts)
    scores, ssim = score_images(recon, x_test)
    mean_image = torch.from_numpy(read_inputs(store, rows.train, "attacker-train")).mean(dim=0)
    reference, reference_ssim = score_images(mean_image.expand_as(x_test), x_test)
    kept = torch.cat(chosen)
    return InversionResult(
        scores=scores,
        reference_mean_image=reference,
        rows={"test": len(rows.test), "inverted": len(targets)},
        input_shape=list(input_shape),
        layer_shape=[int(s) for s in store.layer_shape],
        encoder={"model_kind": encoder.loaded.kind, "method": encoder.method, "reproduction_error": error},
        feature_loss=float(torch.cat(losses).mean()),
        restart_chosen=[int((kept == r).sum()) for r in range(config.restarts)],
        steps_run=float(np.mean(steps_run)),
        seconds=round(seconds, 3),
        seconds_per_image=seconds / max(1, len(targets)),
        config=dataclasses.asdict(config),
        warnings=warnings,
        test_rows=targets,
        reconstructions=recon.numpy(),
        ssim_per_image={"inversion": ssim.astype(np.float32), "mean-image": reference_ssim.astype(np.float32)},
        mean_image_array=mean_image.numpy(),
    )
