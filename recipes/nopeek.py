"""NoPeek: decorrelate the split activations from the raw input (or a protected attribute).

Each batch is trained with α₁·dCor(X, Z) + α₂·CE (NoPeek's eq. 1), dCor being the
differentiable batch distance correlation of :mod:`leakaudit.metrics.dcor` (V-statistic,
exponent 1, as in NoPeek's code), whose square roots have a zero subgradient at 0 — with
plain ``sqrt`` a strong weight turns the loss into NaN as soon as distances collapse.

``against="input"`` decorrelates Z from the raw input rows (in [0, 1], as ``dump`` stores
them); ``against=TASK`` from the one-hot labels of a protected attribute instead — the
paper's attribute privacy (§IV-D), where the attacker should not learn that attribute.
The mean batch dCor is logged per epoch (the paper's Fig. 11).

``burn_in=STEPS`` adds the paper's device-level burn-in (§III-A) before training: on the
client's own rows (a seeded subsample of attacker-train rows, ``burn_in_rows``), the
universal decorrelation (:mod:`leakaudit.decorrelate`) moves the encoder's activations E(X)
to targets Z_T with lower dCor(X, Z) and dCor(Y, Z) kept, Y being the public labels, which
stay on the client; then the encoder alone (the model cut at the split, so nothing after
the split changes, batch-norm statistics included) is regressed onto Z_T for STEPS Adam
steps. Z_T is put back at the mean and scale of E(X) first — dCor ignores both, and the
regression then asks only for the decorrelation. Nothing is sent to a server meanwhile.

Under ``torchrun`` each rank holds a share of every batch, and dCor is not a sum over rows:
the mean of per-rank dCors would be a different (smaller-batch, more biased) penalty. So X
and Z are gathered across ranks (:func:`leakaudit.distributed.gather_strided`) and every
rank computes dCor of the *whole group batch*, as a single process would; this rank's rows
of Z keep their gradient and the others' are constants, and the term's gradient is scaled
by the world size so that DistributedDataParallel's average over ranks is the
single-process gradient. Cost: one all-gather of X and Z per step, and the b × b distance
matrices (b = the group's batch) on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from leakaudit import distributed
from leakaudit.errors import ConfigError, UnknownNameError
from leakaudit.metrics.dcor import distance_correlation_torch
from leakaudit.recipes.base import Batch, Objective, RecipeContext
from leakaudit.registry import RECIPES


@dataclass(frozen=True)
class NoPeekConfig:
    """Settings of NoPeek.

    Attributes:
        alpha: α₁, the weight of dCor(X, Z) (``--alpha``, non-negative).
        ce_weight: α₂, the weight of the public task's cross-entropy.
        against: ``input`` (the raw rows) or the name of a task given with ``--task``
            (its one-hot labels: attribute privacy).
    """

    alpha: float = 1.0
    ce_weight: float = 1.0
    against: str = "input"
    burn_in: int = 0
    burn_in_iterations: int = 20
    burn_in_rows: int = 500
    burn_in_lr: float = 1e-3

    def __post_init__(self) -> None:
        if not self.alpha >= 0.0:
            raise ValueError(f"--alpha must be non-negative, got {self.alpha:g}.")
        if not self.ce_weight > 0.0:
            raise ValueError(f"ce_weight must be positive, got {self.ce_weight:g}.")
        if not (isinstance(self.burn_in, int) and self.burn_in >= 0):
            raise ValueError(f"--burn-in must be a non-negative number of steps, got {self.burn_in!r}.")
        if not (isinstance(self.burn_in_iterations, int) and self.burn_in_iterations >= 1):
            raise ValueError(f"burn_in_iterations must be a positive integer, got {self.burn_in_iterations!r}.")
        if not (isinstance(self.burn_in_rows, int) and self.burn_in_rows >= 4):
            raise ValueError(f"burn_in_rows must be an integer of at least 4, got {self.burn_in_rows!r}.")
        if not self.burn_in_lr > 0.0:
            raise ValueError(f"burn_in_lr must be positive, got {self.burn_in_lr:g}.")


class NoPeek(Objective):
    """α₁·dCor(X, Z) + α₂·CE on each batch."""

    name = "nopeek"
    default_lr = 1e-4

    def __init__(self, config: NoPeekConfig, context: RecipeContext) -> None:
        self.config = config
        self.layer = context.layer
        self.classes: int | None = None
        if config.against != "input":
            tasks = context.data.tasks
            if config.against not in tasks:
                raise UnknownNameError(
                    "task for --against",
                    config.against,
                    ["input", *tasks],
                    hint="Give it with --task NAME=SOURCE, or use --against input.",
                )
            if config.against == context.data.public.name:
                raise ConfigError("--against names the public task; NoPeek would decorrelate Z from what it must predict.")
            self.classes = len(tasks[config.against].class_names)

    def reference(self, batch: Batch) -> torch.Tensor:
        """What Z is decorrelated from: the raw inputs, or a protected attribute's one-hot labels."""
        if self.classes is None:
            return batch.inputs
        return F.one_hot(batch.labels[self.config.against], self.classes).to(batch.inputs.dtype)

    def loss(self, batch: Batch, logits: torch.Tensor, z: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        assert z is not None
        ce = F.cross_entropy(logits, batch.target)
        reference = self.reference(batch)
        group = batch.group
        if group is None:
            dcor = distance_correlation_torch(reference, z)
        else:  # the whole group's batch on every rank (see the module docstring)
            whole_x = distributed.gather_strided(reference, batch.group_rows, group)
            whole_z = distributed.gather_strided(z, batch.group_rows, group, differentiable=True)
            dcor = distance_correlation_torch(whole_x, whole_z)
            if dcor.requires_grad:
                dcor = distributed.scale_gradient(dcor, group.world_size)
        return self.config.alpha * dcor + self.config.ce_weight * ce, {"cross_entropy": ce, "dcor": dcor}

    def describe(self) -> dict[str, Any]:
        out = {"alpha": self.config.alpha, "ce_weight": self.config.ce_weight, "against": self.config.against}
        if self.config.burn_in:
            out.update(burn_in=self.config.burn_in, burn_in_iterations=self.config.burn_in_iterations,
                       burn_in_rows=self.config.burn_in_rows, burn_in_lr=self.config.burn_in_lr)
        return out

    def before_training(self, model: torch.nn.Module, data: Any, device: torch.device, batch_size: int,
                        seed: int) -> dict[str, Any] | None:
        """The device-level burn-in (see the module docstring); its record, or None without one."""
        if not self.config.burn_in:
            return None
        from leakaudit.decorrelate import DecorrelateConfig, decorrelate, one_hot
        from leakaudit.metrics.dcor import distance_correlation
        from leakaudit.split import split_model
        from leakaudit.training.prepared import ROLE_TRAIN, make_batch

        rows = data.rows(ROLE_TRAIN)
        if len(rows) > self.config.burn_in_rows:
            rows = np.sort(np.random.default_rng(seed).choice(rows, self.config.burn_in_rows, replace=False))
        index = torch.from_numpy(np.asarray(rows))
        modes = {m: m.training for m in model.modules()}
        encoder = split_model(model, self.layer).encoder  # shares the model's parameters and modules

        def encode(positions: torch.Tensor, grad: bool) -> tuple[torch.Tensor, Batch]:
            batch = make_batch(data, index[positions], device, None)
            with torch.set_grad_enabled(grad):
                return encoder(batch.model_input).flatten(1), batch

        def activations() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            encoder.eval()
            xs, ys, zs = [], [], []
            for start in range(0, len(index), batch_size):
                z, batch = encode(torch.arange(start, min(start + batch_size, len(index))), False)
                xs.append(self.reference(batch).flatten(1).double().cpu())
                ys.append(batch.target.cpu())
                zs.append(z.double().cpu())
            return torch.cat(xs).numpy(), torch.cat(ys).numpy(), torch.cat(zs).numpy()

        try:
            x, y, z0 = activations()
            labels = one_hot(y)
            result = decorrelate(x, labels, DecorrelateConfig(iterations=self.config.burn_in_iterations,
                                                               max_rows=len(rows), seed=seed), z0=z0)
            mean = z0.mean(axis=0, keepdims=True)
            scale = float(np.sqrt(np.mean((z0 - mean) ** 2)))
            target = torch.from_numpy(result.z * scale + mean).float().to(device)
            params = [p for p in encoder.parameters() if p.requires_grad]
            optimizer = torch.optim.Adam(params, lr=self.config.burn_in_lr)
            generator = torch.Generator().manual_seed(seed)
            losses: list[float] = []
            encoder.train()
            for _ in range(self.config.burn_in):
                pick = torch.randperm(len(index), generator=generator)[: max(batch_size, 2)]
                z, _ = encode(pick, True)
                loss = F.mse_loss(z, target[pick.to(device)])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
            _, _, z1 = activations()
        finally:
            for module, mode in modes.items():
                module.train(mode)
        every = max(1, len(losses) // 20)
        return {
            "rows": int(len(rows)),
            "steps": self.config.burn_in,
            "lr": self.config.burn_in_lr,
            "decorrelation": result.to_dict(),
            "regression_loss": {"first": losses[0], "last": losses[-1], "every": every, "values": losses[::every]},
            "encoder_before": {"dcor_x": distance_correlation(x, z0), "dcor_y": distance_correlation(labels, z0)},
            "encoder_after": {"dcor_x": distance_correlation(x, z1), "dcor_y": distance_correlation(labels, z1)},
        }


@RECIPES.register("nopeek", config=NoPeekConfig)
def nopeek(config: NoPeekConfig, context: RecipeContext) -> NoPeek:
    """NoPeek: α·dCor(X, Z) + CE, against the input or a protected attribute."""
    return NoPeek(config, context)
