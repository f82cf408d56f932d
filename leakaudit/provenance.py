"""The model a store was dumped from, rebuilt from the store's provenance (for the plugins that need it).

The continuation head retrains what follows the split; the white-box inversion runs the
encoder itself; the substitute attack takes the encoder's architecture only. All of them must
rebuild exactly the model that produced Z, so the rebuild refuses a checkpoint (weights file
or archive) whose SHA-256 differs from the one the dump recorded.
"""

from __future__ import annotations

from pathlib import Path

from leakaudit.errors import LeakAuditError, UsageError
from leakaudit.store import ActivationStore


def _rebuild_model(store: ActivationStore, trust_checkpoint: bool):
    """The store's model and split layer, loaded with its recorded weights (refused if they changed)."""
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
        loaded = load_model(str(spec), weights=weights, model_args=options, trust_checkpoint=trust_checkpoint)
    except LeakAuditError as exc:
        raise UsageError(str(exc).rstrip(".")) from None
    except Exception as exc:  # noqa: BLE001 - user factories may fail in any way; the attack is then skipped
        raise UsageError(f"rebuilding the model failed ({type(exc).__name__})") from None
    if not weights and recorded and loaded.checkpoint_sha256 and loaded.checkpoint_sha256 != recorded:
        raise UsageError(f"the archive {str(spec)!r} changed since the dump (its SHA-256 differs from the store's)")
    return loaded.module, str(layer)


def rebuild_split(store: ActivationStore, *, trust_checkpoint: bool = False):
    """The store's model, loaded with its recorded weights and split at its recorded layer.

    Returns a :class:`leakaudit.split.Split` (``encoder``, ``head``), both in eval mode.

    Raises:
        UsageError: the model cannot be rebuilt or split there, or its checkpoint changed;
            the message says why (an attack that needs the model is then skipped).
    """
    return _split(*_rebuild_model(store, trust_checkpoint))


def _split(module, layer: str):
    from leakaudit.split import split_model

    try:
        split = split_model(module, layer)
    except LeakAuditError as exc:
        raise UsageError(str(exc).rstrip(".")) from None
    except Exception as exc:  # noqa: BLE001 - a model that cannot be cut there is a reason to skip, not a crash
        raise UsageError(f"splitting the model at {layer!r} failed ({type(exc).__name__})") from None
    split.encoder.eval()
    split.head.eval()
    return split


def rebuild_encoder(store: ActivationStore, *, trust_checkpoint: bool = False):
    """The module that produced the store's Z from its model input, in eval mode.

    That is the split's encoder, or the whole model where the store was dumped at its output
    (an exported client encoder such as ``encoder.pt2``, whose noise is part of it).

    Raises:
        UsageError: as :func:`rebuild_split`.
    """
    from leakaudit.layers import OUTPUT, resolve_layer

    module, layer = _rebuild_model(store, trust_checkpoint)
    try:
        at_output = resolve_layer(module, layer) == OUTPUT
    except LeakAuditError as exc:
        raise UsageError(str(exc).rstrip(".")) from None
    return module.eval() if at_output else _split(module, layer).encoder
