"""Output folders that appear only when complete: the one staging mechanism.

A command that writes a folder (``audit``, ``demo``, ``harden``, ``train``'s exports) writes it
under a hidden name beside the destination and swaps it in at the end, so a crash never
leaves a folder that looks like a finished result. Paths recorded while staging (in reports,
in stores' attributes) name the staging folder; :meth:`Stage.rebase` and
:meth:`Stage.rebase_store` point them at the destination, in this one place.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from leakaudit.errors import FileSystemError


class Stage:
    """A staging folder for ``output``; see :func:`staged`."""

    def __init__(self, output: Path, path: Path | None = None) -> None:
        self.output = Path(output)
        self.path = Path(path) if path is not None else self.output.with_name(f".{self.output.name}.tmp-{os.getpid()}")

    def rebase(self, value: Any) -> Any:
        """``value`` with every path inside the staging folder pointed at the destination (dicts and lists walked)."""
        if isinstance(value, dict):
            return {key: self.rebase(item) for key, item in value.items()}
        if isinstance(value, list):
            return [self.rebase(item) for item in value]
        if isinstance(value, str) and (value == str(self.path) or value.startswith(str(self.path) + os.sep)):
            return str(self.output) + value[len(str(self.path)) :]
        return value

    def rebase_records(self) -> list[Path]:
        """Point the paths in every JSON record written inside the staging folder at the destination.

        Reports, ``harden.json`` and ``model.json`` name the files beside them by absolute path;
        each record that names the staging folder is rewritten (atomically, in the layout the
        tool writes records in). Returns the records rewritten.
        """
        import json

        from leakaudit._io import atomic_write_text

        rewritten = []
        for record in sorted(self.path.rglob("*.json")):
            text = record.read_text(encoding="utf-8")
            if str(self.path) not in text:
                continue
            data = self.rebase(json.loads(text))
            atomic_write_text(record, json.dumps(data, indent=2) + "\n")
            rewritten.append(record)
        return rewritten

    def rebase_store(self, store: str | Path) -> None:
        """Point a staged store's recorded model paths at the destination, and re-seal its attributes.

        Stores dumped while staging must name files that exist while they are measured (the
        continuation attack rebuilds the model from the recorded path), so they record the
        staging folder until the swap.
        """
        import h5py

        from leakaudit.store import seal_attributes

        with h5py.File(store, "r+") as handle:
            for key in ("weights", "model_spec"):
                value = handle.attrs.get(key)
                if isinstance(value, bytes):
                    value = value.decode()
                if isinstance(value, str) and value:
                    rebased = self.rebase(value)
                    if rebased != value:
                        handle.attrs[key] = rebased
            seal_attributes(handle)  # the attributes' checksum must cover the new paths


@contextlib.contextmanager
def staged(output: str | Path) -> Iterator[Stage]:
    """Yield a :class:`Stage` whose folder replaces ``output`` only when the block succeeds.

    The caller refuses an existing ``output`` (without ``--force``) before entering, in its own
    words. On an exception the staging folder is removed and ``output`` is left as it was;
    on success an existing ``output`` is swapped out and removed only after the new one is in place.
    """
    stage = Stage(Path(output))
    stage.output.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(stage.path, ignore_errors=True)
    try:
        stage.path.mkdir()
    except OSError as exc:
        # The staging name is ours; the user gave ``output``, so the message names that.
        raise FileSystemError(stage.output, exc, action="create") from exc
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage.path, ignore_errors=True)
        raise
    old = None
    if stage.output.exists():
        old = stage.output.with_name(f".{stage.output.name}.old-{os.getpid()}")
        os.replace(stage.output, old)
    os.replace(stage.path, stage.output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
