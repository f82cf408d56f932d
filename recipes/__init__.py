"""Built-in hardening recipes, importable as ``leakaudit.recipes``.

Importing this package registers them in :data:`leakaudit.registry.RECIPES`:

* ``center-loss`` — Scrunch: centre loss on the split activations, joint with cross-entropy.
* ``nopeek`` — NoPeek: distance correlation between the input (or an attribute) and Z.
* ``shredder`` — Shredder: learned additive noise at the split of a frozen model.
* ``gaussian-noise`` — Gaussian noise of a stated scale at the split, fine-tuned through.

:func:`leakaudit.harden.harden` (a workflow of the core, not of this package) runs a recipe,
or a sweep of one of its settings, from any pre-trained checkpoint and exports the hardened
model, the client encoder and the server classifier. Recipes never import the workflows.

A recipe is a factory registered with ``@RECIPES.register(name, config=FrozenConfig)`` and
called as ``factory(config, context)`` with a :class:`RecipeContext`
(the pre-trained model, split layer, data, baseline accuracy); it returns an
:class:`Objective`, whose ``loss(batch, logits, z)`` the shared
training loop minimises. Third-party packages register theirs the same way through the
``leakaudit.plugins`` entry-point group.
"""

from __future__ import annotations

from leakaudit.recipes.base import Batch, EpochStats, Objective, RecipeContext
from leakaudit.recipes.center_loss import CenterLoss, CenterLossConfig
from leakaudit.recipes.gaussian_noise import GaussianNoise, GaussianNoiseConfig
from leakaudit.recipes.nopeek import NoPeek, NoPeekConfig
from leakaudit.recipes.shredder import LaplaceNoise, Shredder, ShredderConfig

__all__ = [
    "Batch",
    "CenterLoss",
    "CenterLossConfig",
    "EpochStats",
    "GaussianNoise",
    "GaussianNoiseConfig",
    "LaplaceNoise",
    "NoPeek",
    "NoPeekConfig",
    "Objective",
    "RecipeContext",
    "Shredder",
    "ShredderConfig",
]
