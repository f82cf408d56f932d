"""Cached dumps: an audit's stores, keyed by everything that decides their content.

A dump is cached under a key made of the checkpoint's SHA-256, the model code's, the layer,
the data (and its files' fingerprint), the preprocessing, the dump settings and the tool
version, so a cached dump is reused only when all of it matches, and only after every dataset
matched the checksum recorded when it was dumped. An entry that fails that check (or was
written before checksums) is dumped again with a warning rather than refused: it is derived
data the audit can rebuild from its own inputs, and the cache outlives any one run (CI
restores it between runs), so a damaged entry must neither decide a verdict nor block one.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from leakaudit import __version__
from leakaudit.errors import StoreError
from leakaudit.models.spec import ModelSpec

Warn = Callable[[str], None]


def cache_dir(configured: str | None = None) -> Path:
    """Where cached dumps live: ``configured``, else ``$LEAKAUDIT_CACHE``, else ``~/.cache/leakaudit``."""
    if configured:
        return Path(configured)
    if os.environ.get("LEAKAUDIT_CACHE"):
        return Path(os.environ["LEAKAUDIT_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "leakaudit"


def _file_digest(path: Path) -> str:
    from leakaudit._io import sha256_file

    return sha256_file(path)


def data_fingerprint(spec: str) -> str:
    """What identifies the *content* of a data source, not just its name."""
    kind, _, rest = spec.partition(":")
    if spec == "digits":
        import sklearn

        return f"digits/sklearn-{sklearn.__version__}"
    if kind == "idx":
        root = Path(rest.rsplit(":", 1)[0] if rest.endswith((":train", ":test")) else rest)
        files = sorted(p for p in root.iterdir() if "idx" in p.name) if root.is_dir() else []
        return ",".join(f"{p.name}:{_file_digest(p)}" for p in files)
    if kind in ("npz", "hdf5", "h5"):
        path = Path(rest)
        return _file_digest(path) if path.is_file() else "missing"
    if kind == "folder":
        root = Path(rest)
        entries = sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file())
        return hashlib.sha256(json.dumps(entries).encode()).hexdigest()
    return spec


def model_fingerprint(spec: str, weights: str | None) -> dict[str, Any]:
    """The checkpoint's SHA-256, and the model code's for file and module specs."""
    import importlib.util

    found: dict[str, Any] = {"weights": _file_digest(Path(weights)) if weights else None}
    where, sep, _ = spec.partition(":")
    if sep and where.endswith(".py") and Path(where).is_file():
        found["code"] = _file_digest(Path(where))
    elif Path(spec).is_file():
        found["archive"] = _file_digest(Path(spec))
    elif sep and where not in ("timm", "torchvision"):
        try:
            origin = importlib.util.find_spec(where)
        except (ImportError, ValueError):
            origin = None
        if origin is not None and origin.origin and Path(origin.origin).is_file():
            found["code"] = _file_digest(Path(origin.origin))
    else:
        import timm
        import torchvision

        found["library"] = f"timm-{timm.__version__}/torchvision-{torchvision.__version__}"
    return found


def cached_dump(
    settings_kwargs: Mapping[str, Any], cache: Path, on_progress=None, on_warning: Warn | None = None
) -> tuple[Path, bool]:
    """Dump with ``settings_kwargs`` into the cache, or reuse an identical, verified earlier dump.

    An entry that fails its checksums (or has none) is dumped again, saying so through
    ``on_warning``. Another process dumping the same entry is waited for, and its result reused.

    Returns:
        The store path and whether it was reused.
    """
    from leakaudit.dump import dump
    from leakaudit.store import DumpInProgressError, wait_for_dump

    tasks = settings_kwargs.get("tasks", ())
    task_files = {src: _file_digest(Path(src[4:])) for _, src in tasks if src.startswith("map:") and Path(src[4:]).is_file()}
    material: dict[str, Any] = {
        "tool": __version__,
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(settings_kwargs.items())},
        "model": model_fingerprint(settings_kwargs["model"], settings_kwargs.get("weights")),
        "data": data_fingerprint(settings_kwargs["data"]),
        "task_files": task_files,
    }
    key = hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()
    path = cache / f"{key[:32]}.h5"
    for _ in range(3):  # a concurrent audit may take the entry between our wait and our dump
        if path.exists():
            wait_for_dump(path)  # one that is being rewritten: wait for the result
            if _reusable(path, material["model"]["weights"], on_warning):
                return path, True
        cache.mkdir(parents=True, exist_ok=True)
        (cache / f"{key[:32]}.json").write_text(json.dumps(material, indent=2, sort_keys=True, default=str) + "\n")
        try:
            dump(_dump_settings(settings_kwargs, path), on_progress)
        except DumpInProgressError:
            wait_for_dump(path)
            continue
        return path, False
    raise DumpInProgressError(f"other processes keep rewriting the cached dump {str(path)!r}; run the audit again.")


def _dump_settings(settings_kwargs: Mapping[str, Any], output: Path) -> Any:
    """The dump's settings from the flat mapping the cache key is made of."""
    from leakaudit.dump import DumpSettings

    kwargs = dict(settings_kwargs)
    model = ModelSpec(
        kwargs.pop("model"), weights=kwargs.pop("weights"), num_classes=kwargs.pop("num_classes"),
        in_chans=kwargs.pop("in_chans"), args=kwargs.pop("model_args"), trust_checkpoint=kwargs.pop("trust_checkpoint"),
    )  # fmt: skip
    return DumpSettings(model=model, output=output, force=True, **kwargs)


def _reusable(path: Path, weights_sha256: str | None, on_warning: Warn | None) -> bool:
    """Whether the cache entry at ``path`` passes every checksum and holds these weights' dump."""
    from leakaudit.store import NOT_VERIFIED, StoreCorruptError, open_store

    try:
        with open_store(path) as store:  # checks every dataset against its checksum
            status = store.integrity["status"]
            sha = store.attrs.get("checkpoint_sha256") or None
    except StoreCorruptError as exc:
        reason = f"{exc.part} failed its checksum"
    except StoreError as exc:
        reason = str(exc).rstrip(".")
    else:
        if status != NOT_VERIFIED:
            return sha == weights_sha256 or weights_sha256 is None
        reason = f"it is {NOT_VERIFIED}"
    if on_warning is not None:
        on_warning(f"the cached dump {str(path)!r} is not reused ({reason}); dumping it again.")
    return False
