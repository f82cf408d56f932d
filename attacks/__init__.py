"""Built-in attack plugins, importable as ``leakaudit.attacks``.

Importing this package registers them in :data:`leakaudit.registry.ATTACKS`:

* ``classifier`` — :func:`run_classifier`, retrain a classifier on Z for a private task.
* ``decoder`` — :func:`run_decoder`, reconstruct X from Z and score the reconstructions.
"""

from __future__ import annotations

from leakaudit.attacks.classifier import ClassifierConfig, ClassifierResult, HeadResult, run_classifier
from leakaudit.attacks.decoders import DecoderConfig, DecoderResult, ImageScores, run_decoder
from leakaudit.attacks.substitute import SubstituteConfig, SubstituteResult, run_substitute  # noqa: F401 - registers `substitute`

__all__ = [
    "ClassifierConfig",
    "ClassifierResult",
    "DecoderConfig",
    "DecoderResult",
    "HeadResult",
    "ImageScores",
    "run_classifier",
    "run_decoder",
]
