"""Small file helpers: atomic writes and hashing."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import tempfile
from pathlib import Path


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file renamed on success."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file renamed on success.

    A failure (disk full, interrupt) leaves nothing new at ``path`` and no temporary file
    beside it; an existing file there is untouched. Missing folders are created. A path
    that exists as something other than a regular file (``/dev/stdout``, a FIFO, a device
    such as ``/dev/full``) is written in place, since renaming over it would replace the
    device itself; a symbolic link is followed, so the file it names is replaced.

    Raises:
        OSError: the operating system refused; its ``filename`` is ``path`` (never the
            temporary file's name, which the user has not heard of), for the command line
            to report.
    """
    path = Path(path)
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        mode = None
    except OSError as exc:  # e.g. a part of the path is a file
        raise _naming(exc, path) from exc
    if mode is not None and not stat.S_ISREG(mode):
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        _write_in_place(path, data)
        return
    _make_parents(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _naming(exc, path) from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs get the usual mode
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise _naming(exc, path) from exc
        raise


def check_folders_possible(path: Path) -> None:
    """Refuse, before any work, an output whose folders cannot exist: a file is in the way.

    Creates nothing, so it suits file and folder outputs alike.

    Raises:
        NotADirectoryError: a part of ``path`` is an existing file; it names ``path``, as the
            user wrote it.
    """
    for parent in reversed(Path(path).parents):
        if parent.exists() and not parent.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path))


def _make_parents(path: Path) -> None:
    """Create ``path``'s missing folders; a file in the way is ENOTDIR naming that file."""
    try:
        check_folders_possible(path)
        path.parent.mkdir(parents=True, exist_ok=True)
    except NotADirectoryError:
        raise
    except OSError as exc:
        raise _naming(exc, path.parent) from exc


def _write_in_place(path: Path, data: bytes) -> None:
    try:
        with open(path, "wb") as handle:
            handle.write(data)
    except OSError as exc:
        raise _naming(exc, path) from exc


def _naming(exc: OSError, path: Path) -> OSError:
    """The same kind of error, naming ``path`` instead of a temporary file (or nothing)."""
    if not isinstance(exc.errno, int):
        return exc
    return type(exc)(exc.errno, os.strerror(exc.errno), str(path))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
