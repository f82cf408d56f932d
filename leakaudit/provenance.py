"""The model a store was dumped from, rebuilt from the store's provenance (for the plugins that need it).

The continuation head retrains what follows the split; the white-box inversion runs the
encoder itself; the substitute attack takes the encoder's architecture only. All of them must
rebuild exactly the model that produced Z, so the rebuild refuses a checkpoint (weights file
or archive) whose SHA-256 differs from the one the dump recorded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from leakaudit.errors import LeakAuditError, UntrustedCheckpointError, UsageError
from leakaudit.store import ActivationStore


def load_recorded(store: ActivationStore, *, trust_checkpoint: bool = False):
    """The store's model as the dump built it: its recorded spec, options and weights.

    A model without weights is built under the dump's seed (the dump seeds torch before
    building it), so a randomly initialised model gets the same weights again; torch's
    random state is left as it was.

    Raises:
        UntrustedCheckpointError: the archive needs unpickling and ``trust_checkpoint`` is off.
        UsageError: the model cannot be rebuilt, or its checkpoint changed; the message says why.
    """
    import torch

    from leakaudit._io import sha256_file
    from leakaudit.models import load_model

    attrs = store.attrs
    spec, layer = attrs.get("model_spec"), attrs.get("layer")
    if not spec or not layer:
        raise UsageError("the store records no model spec or layer to rebuild the model from")
    recorded = attrs.get("checkpoint_sha256") or ""
    weights = attrs.get("weights") or None
    if weights:
        if not Path(weights).is_file():
            raise UsageError(f"the checkpoint {weights!r} recorded in the store is not there any more")
        if recorded and sha256_file(weights) != recorded:
            raise UsageError(f"the checkpoint {weights!r} changed since the dump (its SHA-256 differs from the store's)")
    options = attrs.get("model_options") or {}
    if not isinstance(options, dict):
        raise UsageError("the store's model_options are not a mapping")
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(attrs.get("seed") or 0))
            loaded = load_model(str(spec), weights=weights, model_args=options, trust_checkpoint=trust_checkpoint)
    except UntrustedCheckpointError as exc:
        raise UntrustedCheckpointError(str(exc).rstrip(".")) from None
    except LeakAuditError as exc:
        raise UsageError(str(exc).rstrip(".")) from None
    except Exception as exc:  # noqa: BLE001 - user factories may fail in any way; the attack is then skipped
        raise UsageError(f"rebuilding the model failed ({type(exc).__name__})") from None
    if not weights and recorded and loaded.checkpoint_sha256 and loaded.checkpoint_sha256 != recorded:
        raise UsageError(f"the archive {str(spec)!r} changed since the dump (its SHA-256 differs from the store's)")
    return loaded


def rebuild_split(store: ActivationStore, *, trust_checkpoint: bool = False):
    """The store's model, loaded with its recorded weights and split at its recorded layer.

    Returns a :class:`leakaudit.split.Split` (``encoder``, ``head``), both in eval mode.

    Raises:
        UsageError: the model cannot be rebuilt or split there, or its checkpoint changed;
            the message says why (an attack that needs the model is then skipped).
    """
    from leakaudit.split import split_model

    loaded = load_recorded(store, trust_checkpoint=trust_checkpoint)
    layer = str(store.attrs.get("layer"))
    try:
        split = split_model(loaded.module, layer)
    except LeakAuditError as exc:
        raise UsageError(str(exc).rstrip(".")) from None
    except Exception as exc:  # noqa: BLE001 - a model that cannot be cut there is a reason to skip, not a crash
        raise UsageError(f"splitting the model at {layer!r} failed ({type(exc).__name__})") from None
    split.encoder.eval()
    split.head.eval()
    return split


class RecordedEncoder:
    """The store's encoder as a function of *stored* inputs: ``encoder(x) ≈ Z`` for the store's X.

    The dump feeds the model ``Preprocess.model_input(x)`` of the stored x (the optional
    ``--normalize``), padded to an exported program's static batch size; this does the same, so
    that whatever inverts or imitates it works in the space X is stored and scored in. The
    forward is the dump's own truncation (:func:`leakaudit.layers.truncate`: FX, a stopping hook
    for models that do not trace, the whole program for exported encoders), which runs the
    model in eval mode on every call and lets gradients flow back to the input.

    Attributes:
        loaded: the rebuilt :class:`~leakaudit.models.builders.LoadedModel`.
        method: how the model is cut (``fx``, ``hook``, ``sequential``, ``full``).
    """

    def __init__(self, loaded: Any, truncation: Any, prep: Any) -> None:
        self.loaded, self.method = loaded, truncation.method
        self._encoder, self._prep = truncation.encoder, prep

    @property
    def module(self):
        return self.loaded.module

    def __call__(self, x):
        import torch

        from leakaudit.dump.plan import _pad

        fixed = self.loaded.fixed_batch
        model_x = self._prep.model_input(x)
        if fixed is None:
            return self._encoder(model_x)
        parts = [
            self._encoder(_pad(model_x[i : i + fixed], fixed))[: len(model_x[i : i + fixed])]
            for i in range(0, len(model_x), fixed)
        ]
        return torch.cat(parts)


def rebuild_encoder(store: ActivationStore, *, trust_checkpoint: bool = False) -> RecordedEncoder:
    """The store's encoder, input → Z, as the dump ran it (see :class:`RecordedEncoder`).

    Unlike :func:`rebuild_split` it needs no head, so it also serves models that do not trace
    with torch.fx, TorchScript archives and exported client encoders.

    Raises:
        UntrustedCheckpointError: the archive needs unpickling and ``trust_checkpoint`` is off.
        UsageError: the model cannot be rebuilt or run up to its layer; the message says why.
    """
    import numpy as np
    import torch

    from leakaudit.data import Preprocess, parse_normalize
    from leakaudit.dump.plan import _pad
    from leakaudit.layers import truncate

    attrs = store.attrs
    shape = attrs.get("input_shape") or store.input_shape
    if not shape or len(shape) != 3:
        raise UsageError("the store records no input shape to run the encoder on")
    in_chans, height, width = (int(s) for s in shape)
    try:
        mean, std = parse_normalize(attrs.get("normalize") or None, in_chans)
    except LeakAuditError as exc:
        raise UsageError(f"the store's normalisation is unreadable ({str(exc).rstrip('.')})") from None
    prep = Preprocess((height, width), in_chans, mean, std)
    loaded = load_recorded(store, trust_checkpoint=trust_checkpoint)
    # A stored row, not a blank image: models may skip layers on blank input.
    first = torch.from_numpy(store.inputs(np.arange(1))) if store.has_inputs and len(store) else None
    example = first if first is not None else torch.full((1, in_chans, height, width), 0.5)
    example = _pad(prep.model_input(example), loaded.fixed_batch)
    try:
        truncation = truncate(loaded.module, str(attrs.get("layer")), example)
    except LeakAuditError as exc:
        raise UsageError(str(exc).rstrip(".")) from None
    except Exception as exc:  # noqa: BLE001 - a model that cannot run up to its layer is a reason to skip
        raise UsageError(f"running the model up to {attrs.get('layer')!r} failed ({type(exc).__name__})") from None
    return RecordedEncoder(loaded, truncation, prep)
