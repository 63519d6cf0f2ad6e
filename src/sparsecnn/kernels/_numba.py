"""The package's one numba decorator convention (DESIGN rule 4).

``jit``: serial kernels, cached on disk, GIL released.
``pjit``: the same plus ``parallel=True``, for kernels whose outer ``prange`` loop runs over output
channels or batch; used only where a benchmark showed the gain.
Both cache under a key over every kernel source (:func:`kernel_source_key`), not numba's per-file stamp.
``fastmath`` is not used: the tests compare against torch at relative 1e-4 and reassociation across a
long reduction is not worth the risk.
"""

from __future__ import annotations

import functools
import hashlib
import os
import threading
from pathlib import Path
from typing import Any

import numba
import numpy as np
from numba.core import caching

_KERNELS_DIR = Path(__file__).resolve().parent


@functools.cache
def kernel_source_key(directory: str | None = None) -> str:
    """A version key over the sources of every kernel module: 16 hex digits of the SHA-256 of each
    ``*.py`` file's name and bytes in ``directory`` (default: this package's ``kernels/``), sorted.

    Why: numba's on-disk cache is stamped with the hash of the one source file that defines a kernel,
    but kernels inline functions and intrinsics from other modules (``_simd.py``'s tiles into
    ``conv.py``); an edit to the helper alone would leave the stale machine code in use. Keyed by all
    sources, an edit to any kernel module recompiles everything that may inline it. Computed once per
    process (the sources of a running process are the ones it imported).
    """
    root = Path(directory) if directory is not None else _KERNELS_DIR
    h = hashlib.sha256()
    for f in sorted(root.glob("*.py")):
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


class _KeyedLocator(caching._CacheLocator):
    """numba's usual cache location for a function (``$NUMBA_CACHE_DIR``, the module's
    ``__pycache__``, or the user-wide cache, whichever numba would choose), one subfolder
    ``k<key>`` deeper, with the :func:`kernel_source_key` added to the source stamp."""

    def __init__(self, inner: caching._CacheLocator, key: str) -> None:
        self._inner = inner
        self._key = key
        self._path = os.path.join(inner.get_cache_path(), f"k{key}")

    def get_cache_path(self) -> str:
        return self._path

    def get_source_stamp(self) -> Any:
        return (self._inner.get_source_stamp(), self._key)

    def get_disambiguator(self) -> str:
        return self._inner.get_disambiguator()

    @classmethod
    def from_function(cls, py_func, py_file):
        for inner_cls in caching.CacheImpl._locator_classes:
            inner = inner_cls.from_function(py_func, py_file)
            if inner is None:
                continue
            self = cls(inner, kernel_source_key())
            try:
                self.ensure_cache_path()
            except OSError:
                continue
            _prune_stale(inner.get_cache_path(), self._path)
            return self
        return None


_PRUNE_AFTER_S = 7 * 86400  # a key folder untouched this long belongs to sources nobody runs any more
_pruned: set[str] = set()


def _prune_stale(parent: str, keep: str) -> None:
    """Remove the ``k<key>`` folders under ``parent`` untouched for a week (once per process):
    each kernel edit leaves one behind. Best effort; a folder in use is never that old."""
    if parent in _pruned:
        return
    _pruned.add(parent)
    import shutil
    import time

    try:
        old = [e.path for e in os.scandir(parent) if e.is_dir() and e.name.startswith("k") and e.path != keep
               and len(e.name) == 17 and time.time() - e.stat().st_mtime > _PRUNE_AFTER_S]
    except OSError:
        return
    for path in old:
        shutil.rmtree(path, ignore_errors=True)


class _KeyedCacheImpl(caching.CompileResultCacheImpl):
    _locator_classes = [_KeyedLocator]  # noqa: RUF012 - numba's class attribute


class _KeyedFunctionCache(caching.FunctionCache):
    _impl_class = _KeyedCacheImpl


def _keyed(dispatcher):
    dispatcher._cache = _KeyedFunctionCache(dispatcher.py_func)
    return dispatcher


def _decorator(**defaults: Any):
    def deco(*args: Any, **kwargs: Any):
        options = {**defaults, **kwargs}
        cache = options.pop("cache", True)
        if args and callable(args[0]):  # bare @jit (or jit(func, ...))
            disp = numba.njit(args[0], **options)
            return _keyed(disp) if cache else disp

        def wrap(func):
            disp = numba.njit(*args, **options)(func)
            return _keyed(disp) if cache else disp

        return wrap

    return deco


# Same call forms as ``numba.njit`` (``@jit``, ``@jit(inline="always")``, ``@jit("f8(f8)")``), cached on
# disk under a key over all kernel sources (see :func:`kernel_source_key`).
jit = _decorator(nogil=True)
pjit = _decorator(nogil=True, parallel=True)


def serial_twin(dispatcher):
    """The serial version of a ``pjit`` kernel (its ``prange`` run as ``range``), cached apart.

    Why: a parallel launch costs ~2.5 us and a numba dispatch ~0.1 us per argument on this project's
    machines (measured: a 17-argument call 2.3 us, the same with one prange 4.7 us), more than a
    LeNet-5 layer computes; the executor's bound steps call the twin below a work threshold. The copy
    gets its own ``__qualname__`` (``<name>_serial``) so numba's on-disk cache keeps the two apart.
    """
    import types

    func = dispatcher.py_func
    twin = types.FunctionType(func.__code__, func.__globals__, func.__name__ + "_serial", func.__defaults__,
                              func.__closure__)
    twin.__qualname__ = func.__qualname__ + "_serial"
    twin.__doc__ = func.__doc__
    opts = {k: v for k, v in dispatcher.targetoptions.items() if k not in ("parallel", "nopython")}
    return jit(twin, **opts)


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


# How far above the cost split's largest part a part may go when its bounds move to whole units.
UNIT_SLACK = 0.1


def balanced_bounds(cost: np.ndarray, nparts: int, unit: int = 1) -> np.ndarray:
    """Split ``range(len(cost))`` into ``nparts`` contiguous ranges of about equal total cost.

    With ``unit`` > 1 (the items of one convolution group, when ``len(cost)`` is a whole number of
    them), each inner bound within a quarter unit of a unit's edge moves onto it, where no part then
    costs more than ``UNIT_SLACK`` above the cost split's largest part: a thread then reads the input
    channels of its own groups only. Why: AlexNet's conv5 (2 groups of 32 filter groups) split by
    cost alone gave one thread 33 filter groups, so it read both groups' inputs; on the group edge
    the layer ran 1.07-1.16x faster (2 threads, batch 1, interleaved), though the cost split was off
    by a few percent.
    """
    cum = np.concatenate(([0], np.cumsum(cost)))
    targets = cum[-1] * np.arange(nparts + 1) / nparts
    bounds = np.searchsorted(cum, targets, side="left").astype(np.int64)
    bounds[0], bounds[-1] = 0, cost.size
    bounds = np.maximum.accumulate(bounds)
    n = cost.size
    if unit <= 1 or unit >= n or n % unit or nparts < 2:
        return bounds
    edge = np.round(bounds / unit).astype(np.int64) * unit
    near = np.abs(edge - bounds) * 4 <= unit
    near[0] = near[-1] = False
    if not near.any():
        return bounds
    snapped = np.maximum.accumulate(np.where(near, edge, bounds))
    if np.diff(cum[snapped]).max() <= (1 + UNIT_SLACK) * np.diff(cum[bounds]).max():
        return snapped
    return bounds


# Bytes a vector kernel's buffers start on: one cache line (a 64-byte zmm load from an address that
# is not a multiple of it always reads two lines). numpy aligns its allocations to 16 bytes only.
ALIGN_BYTES = 64
LINE_FLOATS = ALIGN_BYTES // 4  # float32 elements of one cache line


def aligned_zeros(shape: int | tuple[int, ...], dtype: Any = np.float32) -> np.ndarray:
    """``np.zeros(shape, dtype)`` whose first element lies on an ``ALIGN_BYTES`` boundary.

    Why: the direct and implicit-GEMM convolutions load their input spans as whole vectors; a 16-wide
    float32 load that does not start on a cache line reads two. Measured (Emerald Rapids, a 1x1 conv
    read in place, 256 -> 256 channels at 16x16, 63% sparse): 0.150 ms from an aligned input against
    0.288 ms from one shifted by a float (1 thread; 2 threads 0.082 against 0.156).
    """
    return _aligned(shape, dtype, np.zeros)


def aligned_empty(shape: int | tuple[int, ...], dtype: Any = np.float32) -> np.ndarray:
    """:func:`aligned_zeros` without the zeroing (``np.empty``)."""
    return _aligned(shape, dtype, np.empty)


def _aligned(shape: int | tuple[int, ...], dtype: Any, alloc: Any) -> np.ndarray:
    dt = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    raw = alloc(nbytes + ALIGN_BYTES, dtype=np.uint8)
    start = (-raw.ctypes.data) % ALIGN_BYTES
    return raw[start:start + nbytes].view(dt).reshape(shape)


def thread_rows(nparts: int, n: int, dtype: Any = np.float32) -> np.ndarray:
    """Zeroed per-thread scratch: ``(nparts, n')`` with ``n' >= n`` elements a row, every row starting
    on its own cache line (``n'`` rounded up to whole ``ALIGN_BYTES``), so no two threads write the
    same line.

    Why: rows of a plain ``(nparts, n)`` array share a cache line at each boundary, and with a short
    ``n`` every line of them: the LRN + max-pool step's ``(nparts, W)`` row buffers (55 and 27 floats
    on AlexNet) made its pooling pass no faster on two threads than on one (0.062 against 0.071 ms on
    norm1's output at batch 1), the line moving between the cores at every row.
    """
    per_line = ALIGN_BYTES // np.dtype(dtype).itemsize
    return aligned_zeros((nparts, max(1, -(-n // per_line)) * per_line), dtype)


def as_aligned(a: np.ndarray) -> np.ndarray:
    """``a`` itself when it is C-contiguous and starts on an ``ALIGN_BYTES`` boundary, else such a copy
    (arrays read from files, or made by numpy, which aligns to 16 bytes)."""
    if a.flags.c_contiguous and a.ctypes.data % ALIGN_BYTES == 0:
        return a
    out = aligned_empty(a.shape, a.dtype)
    out[...] = a
    return out
