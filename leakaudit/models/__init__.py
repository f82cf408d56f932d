"""Any checkpoint: model specs, built-in architectures and safe weight loading.

A model is a *spec* plus optional *weights* (DESIGN.md):

========================================  =============================================
spec                                      meaning
========================================  =============================================
``timm:resnet18``                         a timm architecture
``torchvision:resnet18``                  a torchvision architecture
``lenet5``                                a built-in architecture (:data:`BUILTIN_MODELS`)
``path/file.py:Factory``                  user code building the module
``pkg.module:Factory``                    the same, from an importable module
``model.ts`` / ``model.pt`` (TorchScript)  loaded with :func:`torch.jit.load`
``model.pt2``                             a :func:`torch.export.save` program (checked first)
``model.pt`` (a pickled ``nn.Module``)     only with ``trust_checkpoint=True``
========================================  =============================================

Weights come from ``.safetensors`` or from ``torch.save`` files read with
``weights_only=True``; the wrappers real training code produces are unwrapped. Nothing
is ever unpickled unless the caller passed ``trust_checkpoint=True``: unpickling runs
arbitrary code from the file. A damaged file is reported as damaged and never unpickled,
trusted or not: only an intact pickle that names Python objects is one to trust.

A ``.pt2`` archive can run code while torch loads it; :func:`export_archive_hazards`
checks every part that could first, so such an archive loads only with
``trust_checkpoint=True`` (:mod:`leakaudit.models.archives`).

Weights written by ``leakaudit train`` and ``leakaudit harden`` come with a model record
beside them (``W.safetensors`` → ``W.json``, schema ``leakaudit.model``) that holds the
architecture options they were trained with (``num_classes``, …): those options are the
defaults for that file, so ``--num-classes`` need not be repeated. An option given
explicitly always wins.

The package: :mod:`~leakaudit.models.loading` (the entry point, :func:`load_model`),
:mod:`~leakaudit.models.builders` (architectures from a spec),
:mod:`~leakaudit.models.archives` (complete saved models and their hazard checks),
:mod:`~leakaudit.models.weights` (weight files and state dicts) and
:mod:`~leakaudit.models.spec` (:class:`ModelSpec`, the six settings that name a model).

Only :class:`ModelSpec` is imported with the package; the rest loads torch, so each name
is imported from its module when first used, and a configuration that names a model
stays cheap to read.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from leakaudit.models.spec import ModelSpec

if TYPE_CHECKING:
    from leakaudit.models.archives import export_archive_hazards
    from leakaudit.models.builders import BUILTIN_MODELS, LeNet5, LoadedModel
    from leakaudit.models.loading import load_model, recorded_options
    from leakaudit.models.spec import architecture_options
    from leakaudit.models.weights import assign_state_dict, load_state_dict, unwrap_state_dict

_HOMES = {
    "export_archive_hazards": "archives",
    "BUILTIN_MODELS": "builders",
    "LeNet5": "builders",
    "LoadedModel": "builders",
    "architecture_options": "spec",
    "load_model": "loading",
    "recorded_options": "loading",
    "assign_state_dict": "weights",
    "load_state_dict": "weights",
    "unwrap_state_dict": "weights",
}

__all__ = ["ModelSpec", *_HOMES]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})
