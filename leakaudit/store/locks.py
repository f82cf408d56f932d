"""One dump at a time per store.

A writer holds an exclusive ``flock`` on ``STORE.h5.partial.lock`` from before it touches
the ``.partial`` file until the rename (resumed dumps too); a second dump to the same path
is refused with :class:`DumpInProgressError`. The kernel drops the lock when its process
dies, even by SIGKILL, so a lock is never stale and a killed dump can always be resumed.
"""

from __future__ import annotations

import os
from pathlib import Path

from leakaudit.errors import FileSystemError, StoreError
from leakaudit.store.schema import lock_path

try:
    import fcntl
except ImportError:  # not POSIX: no lock; the checks before the rename still hold
    fcntl = None  # type: ignore[assignment]


class DumpInProgressError(StoreError):
    """Another dump is writing (or has just completed) the same store."""


class DumpLock:
    """An exclusive ``flock`` on ``STORE.h5.partial.lock``, held while a dump writes ``STORE.h5``.

    ``flock`` rather than an ``O_EXCL`` marker file: the kernel releases it when the holder
    dies, however it dies, so there is never a stale lock to clear by hand before a resume.
    The file is removed on release; whoever opened it just before then finds, after locking,
    that the path names another file (or none) and starts over.

    Args:
        store: the store path the dump writes.
        wait: block until the lock is free instead of refusing at once.

    Raises:
        DumpInProgressError: another process holds the lock (and ``wait`` is off).
    """

    def __init__(self, store: Path, *, wait: bool = False) -> None:
        self.store = Path(store)
        self.path = lock_path(self.store)
        self.fd: int | None = None
        if fcntl is None:
            return
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as exc:
                # The lock file is ours; the user named the store, so the message names that.
                raise FileSystemError(self.store, exc, action="write") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                raise DumpInProgressError(
                    f"another dump is writing {str(self.store)!r} right now (it holds {str(self.path)!r}). "
                    "Wait for it to finish, or write to another path; the lock ends with that process, "
                    "so there is nothing to remove by hand."
                ) from None
            except OSError:
                os.close(fd)  # a file system without locks: the checks before the rename remain
                return
            try:
                current = os.stat(self.path)
            except FileNotFoundError:
                os.close(fd)
                continue
            locked = os.fstat(fd)
            if (current.st_dev, current.st_ino) != (locked.st_dev, locked.st_ino):
                os.close(fd)
                continue
            self.fd = fd
            return

    def release(self) -> None:
        """Remove the lock file and release the lock (idempotent)."""
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)
            self.fd = None


def check_no_dump_running(store: Path) -> None:
    """Raise :class:`DumpInProgressError` if a dump is writing ``store`` now."""
    DumpLock(Path(store)).release()


def wait_for_dump(store: Path) -> None:
    """Return once no dump is writing ``store``."""
    DumpLock(Path(store), wait=True).release()

