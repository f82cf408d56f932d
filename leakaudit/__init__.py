"""leakaudit: audit how much a split neural network leaks through its activations, and harden it.

The public surface is small; see the command line (`leakaudit --help`) for the workflow.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
