"""The one exception type users meet.

Every entry point turns bad input (a corrupt file, a wrong shape, NaN weights, a sparsity outside
[0, 1], an unknown layer or model) into a :class:`SparseCNNError` whose message names the problem and
the remedy. The CLI prints it as one line on stderr and exits with code 2.
"""

from __future__ import annotations

__all__ = ["SparseCNNError"]


class SparseCNNError(ValueError):
    """Bad input to sparsecnn, with a message that names the problem and the remedy."""
