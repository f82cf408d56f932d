"""Runtime choices shared by every command: the device, seeding."""

from __future__ import annotations

import random

import numpy as np
import torch

from leakaudit.errors import ConfigError, UsageError


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available; ``cuda`` without CUDA is a usage error (exit code 2)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError("--device cuda was given but CUDA is not available here; use --device cpu or auto.")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise ConfigError(f"--device must be auto, cpu or cuda[:N], got {name!r}.")


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a torch generator for data order."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)
