"""``hf:PATH``: a local Hugging Face model folder, offline always.

A folder as ``save_pretrained`` (or a hub download) leaves it: ``config.json`` beside
``model.safetensors`` or sharded safetensors with their ``model.safetensors.index.json``.
Two layouts are read:

* a ``transformers`` model: ``config.json`` has ``model_type`` (and usually
  ``architectures``). The class named first in ``architectures`` is taken from the installed
  ``transformers`` (``ViTForImageClassification``, …); without ``architectures`` the
  image-classification class of the ``model_type``, or its bare ``AutoModel`` class. Weights
  load through ``from_pretrained``, because transformers renames the keys of checkpoints
  saved by older versions; a key that is missing, unexpected or of another shape is an
  error that lists them, never a silently re-initialised weight.
* a timm model in its hub layout: ``config.json`` has ``architecture`` and
  ``pretrained_cfg``. It is built with ``timm.create_model(architecture, pretrained=False)``
  and its options from the config, and the weights are assigned key by key
  (:func:`~leakaudit.models.weights.assign_state_dict`).

Nothing is downloaded: everything is read with ``local_files_only=True`` under
``HF_HUB_OFFLINE=1``, and a spec that names a hub id rather than a folder is an error that
says so. Code shipped with a folder (``auto_map``, ``trust_remote_code``) is never run.
``pytorch_model.bin`` is a pickle, so a folder that holds only that loads only with
``--trust-checkpoint`` (then through leakaudit's own checkpoint loader).

The module keeps the library's own layer names (``vit.layers.5`` for a ViT in transformers
5; ``vit.encoder.layer.5`` in transformers 4), so ``leakaudit layers hf:PATH`` lists the
blocks as the library names them, and the state dict has the library's keys. To make it a
module like the others, its class is swapped for a subclass whose ``forward(x)`` takes
images in [0, 1], normalises them with the folder's mean and std (``preprocessor_config.json``
``image_mean``/``image_std`` for transformers, ``pretrained_cfg`` ``mean``/``std`` for timm;
none when the folder gives none) and returns one tensor (the logits; for a model without a
head its pooled output, else its last hidden state). The normalisation is inside the model
so that every command that runs it (dump, train, harden, attacks that rebuild the encoder)
feeds it what it was trained on; ``--normalize`` is not needed and would normalise twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from leakaudit._io import sha256_file
from leakaudit._optional import require
from leakaudit.errors import (
    CheckpointError,
    ConfigError,
    LeakAuditError,
    UnknownNameError,
    UntrustedCheckpointError,
    UsageError,
)
from leakaudit.models.builders import LoadedModel
from leakaudit.models.weights import assign_state_dict, load_state_dict, raise_misfit

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_WEIGHTS = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PREPROCESSOR = "preprocessor_config.json"

#: The options an ``hf:`` model takes: both must agree with the folder's config (its weights fix them).
_OPTIONS = ("num_classes", "in_chans")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _import_transformers() -> Any:
    return require("transformers", "hf", purpose="an hf: folder of a transformers model")


# --------------------------------------------------------------------------- the folder


def build_hf(spec: str, where: str, kwargs: dict[str, Any], trust_checkpoint: bool) -> LoadedModel:
    """The model in the local folder ``where`` (the part of ``spec`` after ``hf:``).

    Raises:
        UsageError: the folder is missing, is a hub id, has no config.json or no weights.
        UnknownNameError: the config names an architecture the installed library lacks.
        UntrustedCheckpointError: the folder holds only pickled weights and ``trust_checkpoint`` is off.
        ConfigError: an option disagrees with the folder's config.
        CheckpointError: the config is unreadable, or the weights do not fit it (key by key).
        MissingExtraError: a transformers folder and no transformers installed.
    """
    folder = _folder(spec, where)
    config = _read_json(folder / "config.json")
    unknown = [k for k in kwargs if k not in _OPTIONS]
    if unknown:
        raise ConfigError(
            f"model {spec!r} does not accept option {unknown[0]!r}: an hf: folder's config fixes its architecture; "
            f"it accepts only {', '.join(_OPTIONS)} (equal to the config's)."
        )
    if isinstance(config.get("architecture"), str) and "model_type" not in config:
        module, input_size, in_chans, mean, std = _build_timm_folder(spec, folder, config, kwargs, trust_checkpoint)
        mixin: type[nn.Module] = _TimmImageModel
    else:
        module, input_size, in_chans, mean, std = _build_transformers(spec, folder, config, kwargs, trust_checkpoint)
        mixin = _TransformersImageModel
    _wrap(module, mixin, mean, std)
    module.eval()
    return LoadedModel(
        module,
        spec,
        "hf",
        checkpoint_sha256=_folder_digest(folder),
        input_size=input_size,
        in_chans=in_chans,
        options=dict(kwargs),
    )


def _folder(spec: str, where: str) -> Path:
    if not where.strip():
        raise UsageError(f"{spec!r} names no folder; write hf:PATH with the folder holding config.json.")
    folder = Path(where).expanduser()
    if folder.is_dir():
        return folder
    if folder.exists():
        raise UsageError(
            f"{where!r} is a file; hf:PATH takes the folder that holds config.json and model.safetensors."
        )
    if _HUB_ID.match(where) and not where.startswith("."):
        raise UsageError(
            f"{where!r} is not a local folder; it looks like a Hugging Face hub id, and leakaudit never downloads. "
            f"Download it first (hf download {where} --local-dir DIR) and give hf:DIR."
        )
    raise UsageError(f"model folder {where!r} does not exist.")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UsageError(
            f"{str(path.parent)!r} has no config.json; an hf: folder holds config.json and model.safetensors "
            "(as save_pretrained writes them)."
        )
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"cannot read {str(path)!r} as JSON ({type(exc).__name__}).") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{str(path)!r} holds a JSON {type(value).__name__}, not an object.")
    return value


def _weight_files(folder: Path, trust_checkpoint: bool) -> tuple[str, list[Path]]:
    """``("safetensors" | "pickle", files)``: the folder's weights, safetensors first."""
    for kind, single, index in (("safetensors", SAFE_WEIGHTS, SAFE_INDEX), ("pickle", PICKLE_WEIGHTS, PICKLE_INDEX)):
        files = [folder / single] if (folder / single).is_file() else _shards(folder / index)
        if not files:
            continue
        if kind == "pickle" and not trust_checkpoint:
            raise UntrustedCheckpointError(
                f"{str(folder)!r} holds its weights only as {PICKLE_WEIGHTS}, a pickle; unpickling runs code from the file. "
                f"Convert them to {SAFE_WEIGHTS}, or pass --trust-checkpoint if you trust where the folder came from."
            )
        return kind, files
    raise UsageError(f"{str(folder)!r} has no {SAFE_WEIGHTS} (or {SAFE_INDEX} with its shards).")


def _shards(index: Path) -> list[Path]:
    if not index.is_file():
        return []
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{str(index)!r} has no weight_map.")
    names = sorted({str(v) for v in weight_map.values()})
    files = [index.parent / name for name in names]
    missing = [name for name, f in zip(names, files) if Path(name).name != name or not f.is_file()]
    if missing:
        raise CheckpointError(f"{str(index)!r} names shard {missing[0]!r}, which is not in the folder.")
    return files


def _folder_digest(folder: Path) -> str:
    """SHA-256 over the SHA-256 of each file that defines the model (configs and weights), by name."""
    lines = []
    for path in sorted(folder.iterdir()):
        if path.is_file() and (path.suffix in (".json", ".safetensors", ".bin")):
            lines.append(f"{path.name} {sha256_file(path)}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def _check_option(spec: str, kwargs: Mapping[str, Any], key: str, value: int | None) -> None:
    given = kwargs.get(key)
    if given is not None and value is not None and int(given) != int(value):
        raise ConfigError(
            f"model {spec!r} was saved with {key}={value}; {key}={given} would not fit its weights. "
            f"Leave {key} out, or give weights for that architecture with --weights on a folder saved for it."
        )


def _pair(size: Any) -> tuple[int, int] | None:
    if isinstance(size, int):
        return (size, size)
    if isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(s, int) for s in size):
        return (int(size[0]), int(size[1]))
    return None


def _channels(values: Any, in_chans: int) -> tuple[float, ...] | None:
    if isinstance(values, (int, float)):
        values = [values]
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, (int, float)) for v in values):
        return None
    if len(values) == 1:
        values = list(values) * in_chans
    return tuple(float(v) for v in values) if len(values) == in_chans else None


# --------------------------------------------------------------------------- transformers


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """The hub libraries' offline switches on for the block (``local_files_only`` is passed too)."""
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _quiet(transformers: Any) -> Iterator[None]:
    """Without transformers' load report and progress bar: leakaudit reports a mismatch itself."""
    logging = transformers.utils.logging
    verbosity, bar = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bar:
            logging.enable_progress_bar()


def _build_transformers(
    spec: str, folder: Path, raw: dict[str, Any], kwargs: Mapping[str, Any], trust_checkpoint: bool
) -> tuple[nn.Module, tuple[int, int] | None, int, tuple[float, ...] | None, tuple[float, ...] | None]:
    if raw.get("auto_map"):
        raise UsageError(
            f"{str(folder)!r} needs its own Python code (config.json has auto_map), and leakaudit never runs code "
            "from a model folder. Use a model class the installed transformers provides."
        )
    transformers = _import_transformers()
    kind, files = _weight_files(folder, trust_checkpoint)
    with _offline(), _quiet(transformers):
        try:
            config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
        except (ValueError, KeyError, OSError) as exc:
            model_type = raw.get("model_type")
            if isinstance(model_type, str) and model_type not in transformers.CONFIG_MAPPING:
                raise UnknownNameError(
                    f"transformers {transformers.__version__} model type",
                    model_type,
                    transformers.CONFIG_MAPPING.keys(),
                    hint="The folder was saved by a transformers that knows it; upgrade transformers.",
                ) from None
            raise CheckpointError(f"transformers cannot read {str(folder / 'config.json')!r}: {_first_line(exc)}.") from None
        model_class = _model_class(transformers, config)
        _check_option(spec, kwargs, "num_classes", getattr(config, "num_labels", None) if _has_head(model_class) else None)
        in_chans = int(getattr(config, "num_channels", 3) or 3)
        _check_option(spec, kwargs, "in_chans", in_chans)
        state = None
        if kind == "pickle":
            state = {}
            for file in files:
                state.update(load_state_dict(file, trust_checkpoint=True))
        try:
            module, info = model_class.from_pretrained(
                str(folder) if state is None else None,
                config=config,
                state_dict=state,
                local_files_only=True,
                trust_remote_code=False,
                use_safetensors=state is None,
                ignore_mismatched_sizes=True,  # reported below, key by key, as an error
                output_loading_info=True,
            )
        except LeakAuditError:
            raise
        except Exception as exc:
            raise CheckpointError(f"loading {str(folder)!r} with transformers failed: {type(exc).__name__}: {_first_line(exc)}.") from None
    _check_loading(folder, info)
    preprocessor = _read_json(folder / PREPROCESSOR) if (folder / PREPROCESSOR).is_file() else {}
    size = _pair(getattr(config, "image_size", None)) or _preprocessor_size(preprocessor)
    mean = std = None
    if preprocessor.get("do_normalize", True):
        mean = _channels(preprocessor.get("image_mean"), in_chans)
        std = _channels(preprocessor.get("image_std"), in_chans)
    return module, size, in_chans, mean, std


def _model_class(transformers: Any, config: Any) -> Any:
    architectures = getattr(config, "architectures", None) or []
    if architectures:
        name = str(architectures[0])
        model_class = getattr(transformers, name, None)
        if model_class is None or not isinstance(model_class, type):
            known = [n for n in dir(transformers) if n.endswith(("ForImageClassification", "Model")) and n[0].isupper()]
            raise UnknownNameError(
                f"transformers {transformers.__version__} architecture",
                name,
                known,
                hint="config.json names a model class this transformers does not have; upgrade transformers.",
            )
        return model_class
    for auto in (transformers.AutoModelForImageClassification, transformers.AutoModel):
        mapping = auto._model_mapping
        if type(config) in mapping:
            return mapping[type(config)]
    raise UsageError(f"transformers has no model class for config {type(config).__name__}.")


def _has_head(model_class: type) -> bool:
    return "For" in model_class.__name__


def _preprocessor_size(preprocessor: Mapping[str, Any]) -> tuple[int, int] | None:
    for key in ("crop_size", "size"):
        size = preprocessor.get(key)
        if isinstance(size, dict):
            if isinstance(size.get("height"), int) and isinstance(size.get("width"), int):
                return (size["height"], size["width"])
            if isinstance(size.get("shortest_edge"), int):
                return (size["shortest_edge"], size["shortest_edge"])
        elif _pair(size) is not None:
            return _pair(size)
    return None


def _check_loading(folder: Path, info: Mapping[str, Any]) -> None:
    """Every weight in the folder went to a parameter of its shape, and every parameter got one."""
    missing = sorted(info.get("missing_keys") or ())
    unexpected = sorted(info.get("unexpected_keys") or ())
    mismatched = [f"{k} {tuple(a)} vs {tuple(b)}" for k, a, b in sorted(info.get("mismatched_keys") or ())]
    raise_misfit(str(folder), missing, unexpected, mismatched, "Check that config.json is the one saved with these weights.")


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0].rstrip(".") if lines else "no message"


# --------------------------------------------------------------------------- timm


def _build_timm_folder(
    spec: str, folder: Path, raw: dict[str, Any], kwargs: Mapping[str, Any], trust_checkpoint: bool
) -> tuple[nn.Module, tuple[int, int] | None, int, tuple[float, ...] | None, tuple[float, ...] | None]:
    import timm
    from timm.models._hub import load_model_config_from_path

    kind, files = _weight_files(folder, trust_checkpoint)
    try:
        pretrained_cfg, name, model_args = load_model_config_from_path(folder)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{str(folder / 'config.json')!r} is not a timm config ({type(exc).__name__}: {exc}).") from None
    if not timm.is_model(name):
        raise UnknownNameError(
            f"timm {timm.__version__} model",
            name,
            timm.list_models(),
            hint="config.json names an architecture this timm does not have; upgrade timm.",
        )
    options = dict(model_args or {})
    num_classes = raw.get("num_classes", pretrained_cfg.get("num_classes"))
    if num_classes is not None:
        options.setdefault("num_classes", num_classes)
    input_size = pretrained_cfg.get("input_size") or (3, 224, 224)
    in_chans = int(options.get("in_chans", input_size[0]))
    _check_option(spec, kwargs, "num_classes", options.get("num_classes"))
    _check_option(spec, kwargs, "in_chans", in_chans)
    try:
        module = timm.create_model(name, pretrained=False, **options)
    except TypeError as exc:
        raise ConfigError(f"timm model {name!r} rejects the options in {str(folder / 'config.json')!r}: {exc}.") from None
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_state_dict(file, trust_checkpoint=trust_checkpoint and kind == "pickle"))
    assign_state_dict(module, state, source=str(folder))
    size = _pair(list(input_size[1:])) if len(input_size) == 3 else None
    return module, size, in_chans, _channels(pretrained_cfg.get("mean"), in_chans), _channels(pretrained_cfg.get("std"), in_chans)


# --------------------------------------------------------------------------- the wrapper


class _ImageModel(nn.Module):
    """Put in front of a loaded model's class: ``forward(x)`` on [0, 1] images returns one tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if "leakaudit_mean" in self._buffers:
            x = (x - cast(torch.Tensor, self.leakaudit_mean)) / cast(torch.Tensor, self.leakaudit_std)
        return self._library_forward(x)

    def _library_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class _TransformersImageModel(_ImageModel):
    def _library_forward(self, x: torch.Tensor) -> torch.Tensor:
        return model_output_tensor(super(_ImageModel, self).forward(pixel_values=x))


class _TimmImageModel(_ImageModel):
    def _library_forward(self, x: torch.Tensor) -> torch.Tensor:
        return super(_ImageModel, self).forward(x)


def model_output_tensor(out: Any) -> torch.Tensor:
    """The tensor a transformers model's output stands for: logits, else the pooled, else the last hidden state."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "pooler_output", "last_hidden_state"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise LeakAuditError(f"the transformers model returned a {type(out).__name__} with no logits or hidden state.")


_CLASSES: dict[tuple[type, type], type] = {}


def _wrap(module: nn.Module, mixin: type[nn.Module], mean: tuple[float, ...] | None, std: tuple[float, ...] | None) -> None:
    """Swap ``module``'s class for ``mixin`` + its class, and hold the normalisation as buffers.

    The instance stays the library's (names, state dict keys, hooks, modes); the buffers are
    not persistent, so state dicts are the library's too.
    """
    base = type(module)
    wrapped = _CLASSES.get((mixin, base))
    if wrapped is None:
        wrapped = type(base.__name__, (mixin, base), {"__module__": __name__, "__qualname__": f"{mixin.__name__}.{base.__name__}"})
        _CLASSES[(mixin, base)] = wrapped
    module.__class__ = wrapped
    if mean is not None and std is not None and all(s > 0 for s in std):
        shape = (1, len(mean), 1, 1)
        module.register_buffer("leakaudit_mean", torch.tensor(mean).view(shape), persistent=False)
        module.register_buffer("leakaudit_std", torch.tensor(std).view(shape), persistent=False)
