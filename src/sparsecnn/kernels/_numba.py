"""The package's one numba decorator convention (DESIGN rule 4).

``jit``: serial kernels, cached on disk, GIL released.
``pjit``: the same plus ``parallel=True``, for kernels whose outer ``prange`` loop runs over output
channels or batch; used only where a benchmark showed the gain.
``fastmath`` is not used: the tests compare against torch at relative 1e-4 and reassociation across a
long reduction is not worth the risk.
"""

from __future__ import annotations

import functools

import numba

jit = functools.partial(numba.njit, cache=True, nogil=True)
pjit = functools.partial(numba.njit, cache=True, nogil=True, parallel=True)
