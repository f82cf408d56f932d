"""Optional dependencies: import one, or say which extra of leakaudit installs it.

The core installs without ``transformers`` or ``onnxruntime``; the formats that need them
import them through :func:`require` at the point of use, so a user who reaches one without
the package gets one line naming the package and the ``pip install 'leakaudit[EXTRA]'``
that brings it, never an ``ImportError`` traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from leakaudit.errors import UsageError


class MissingExtraError(UsageError):
    """An optional package that a requested feature needs is not installed (exit code 2).

    A usage error, like ``--device cuda`` on a machine without CUDA: the command cannot run
    on this installation as asked, and the message says what to install.

    Attributes:
        package: the distribution to install (``onnxruntime``).
        extra: the leakaudit extra that installs it (``onnx``).
    """

    def __init__(self, message: str, *, package: str, extra: str) -> None:
        super().__init__(message)
        self.package = package
        self.extra = extra


def require(module: str, extra: str, *, package: str | None = None, purpose: str | None = None) -> ModuleType:
    """Import ``module``, or raise :class:`MissingExtraError` naming the extra that installs it.

    Args:
        module: the module to import (``"onnxruntime"``, ``"transformers"``, ``"onnx.checker"``).
        extra: the extra of leakaudit that installs it (``"onnx"``, ``"hf"``).
        package: the distribution name to install, where it differs from the module's
            top-level name (default: that name).
        purpose: what needs it, to begin the message (``"dump of an ONNX encoder"``);
            default: ``"this"``.

    Returns:
        The imported module.

    Raises:
        MissingExtraError: the module is not installed (or is blocked by
            ``sys.modules[name] = None``), or it is but does not import (a dependency of its
            own missing, versions that do not fit): the message says which.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.partition(".")[0]
        name = package or top
        what = purpose or "this"
        fix = f"pip install 'leakaudit[{extra}]'"
        missing = exc.name if isinstance(exc, ModuleNotFoundError) else None
        if missing is not None and missing.partition(".")[0] == top:
            message = f"{what} needs the optional package {name}: {fix}."
        else:
            # The package is there but it, or one of its own dependencies, does not import
            # (a dependency missing, or versions that do not fit): installing the extra
            # brings the set whose versions fit together.
            message = f"{what} needs the optional package {name}, which failed to import ({exc}): {fix}."
        raise MissingExtraError(message, package=name, extra=extra) from None
