"""The package's one numba decorator convention (DESIGN rule 4).

``jit``: serial kernels, cached on disk, GIL released.
``pjit``: the same plus ``parallel=True``, for kernels whose outer ``prange`` loop runs over output
channels or batch; used only where a benchmark showed the gain.
``fastmath`` is not used: the tests compare against torch at relative 1e-4 and reassociation across a
long reduction is not worth the risk.
"""

from __future__ import annotations

import functools
import threading

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


class PerThread:
    """A cache dict of each calling thread's own: the kernels' per-input-shape workspaces.

    Why: a workspace holds buffers the kernels write (the phase-decomposed input, wide output rows,
    a transposed input), so two Python threads running the same layer at once must not share one
    (they did, and got each other's rows: silently wrong outputs). Each thread gets its own dict,
    dropped with the thread; a pickle or deep copy carries none of them (they are rebuilt on use).
    """

    __slots__ = ("_local",)

    def __init__(self) -> None:
        self._local = threading.local()

    def _dict(self) -> dict:
        d = getattr(self._local, "d", None)
        if d is None:
            d = self._local.d = {}
        return d

    def get(self, key, default=None):
        return self._dict().get(key, default)

    def __setitem__(self, key, value) -> None:
        self._dict()[key] = value

    def __len__(self) -> int:
        return len(self._dict())

    def values(self):
        return self._dict().values()

    def __reduce__(self):
        return PerThread, ()

    def __deepcopy__(self, memo) -> PerThread:
        return PerThread()
