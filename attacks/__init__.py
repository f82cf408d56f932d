"""Built-in attack plugins, importable as ``leakaudit.attacks``.

Importing this package registers them in :data:`leakaudit.registry.ATTACKS`:

* ``classifier`` — :func:`run_classifier`, retrain a classifier on Z for a private task.
* ``decoder`` — :func:`run_decoder`, reconstruct X from Z and score the reconstructions.
* ``inversion`` — :func:`run_inversion`, white-box: optimise X̂ until the encoder maps it to Z.
* ``substitute`` — :func:`run_substitute`, black-box: a substitute encoder of the same
  architecture aligned to Z on unpaired rows, then decoded.
"""

from __future__ import annotations

from leakaudit.attacks.classifier import ClassifierConfig, ClassifierResult, HeadResult, run_classifier
from leakaudit.attacks.decoders import DecoderConfig, DecoderResult, ImageScores, run_decoder
from leakaudit.attacks.inversion import InversionConfig, InversionResult, run_inversion
from leakaudit.attacks.substitute import SubstituteConfig, SubstituteResult, run_substitute

__all__ = [
    "ClassifierConfig",
    "ClassifierResult",
    "DecoderConfig",
    "DecoderResult",
    "HeadResult",
    "ImageScores",
    "InversionConfig",
    "InversionResult",
    "SubstituteConfig",
    "SubstituteResult",
    "run_classifier",
    "run_decoder",
    "run_inversion",
    "run_substitute",
]
