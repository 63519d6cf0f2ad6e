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


def num_threads() -> int:
    """``numba.get_num_threads()`` without its per-call thread-pool launch check (5 us of a 100 us
    layer): the kernels' workspaces are keyed by it on every call."""
    from numba.np.ufunc import parallel

    get = getattr(parallel, "_get_num_threads", None)  # bound once the pool is launched
    n = get() if get is not None else 0
    return n if n > 0 else numba.get_num_threads()
