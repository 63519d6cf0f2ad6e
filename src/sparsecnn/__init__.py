"""sparsecnn: does the sparsity in your CNN make it smaller and faster on your hardware?

The public API is curated here. Importing the package is cheap: nothing heavy is imported and no
numba kernel is compiled until it is first used.
"""

from __future__ import annotations

from sparsecnn.errors import SparseCNNError

__version__ = "0.1.0"

__all__ = ["SparseCNNError", "__version__"]
