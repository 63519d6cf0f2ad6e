"""Where the worker threads' cores sit relative to each other: a probe to print beside timings.

On a machine whose cores do not all share a last-level cache (AMD's core complexes, multi-socket
servers, and virtual machines whose vCPUs the host places near or far apart and moves), two threads
that hand data to each other pay for every cache line that crosses. This project's VM switches
between two such placements within minutes, and whole-model times follow (ResNet-50 at 90%, batch
1: 12.8-13.1 ms near, 20.1-21.6 ms far; docs/engine.md, "Session of 2026-12-05 (fourth)"). A timing
without the placement it was taken in cannot be compared with another.

:func:`probe_cores` measures, with two numba threads on an 800 KB buffer: one thread reading what it
wrote itself, reading what the other thread wrote, and rewriting lines that both threads have just
read. Near, a remote read costs about 1.2x a local one (11.7 against 10 us) and the rewrite about 8x
a rewrite of the writer's own lines; far, about 3x and 25-30x.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numba
import numpy as np

from sparsecnn.kernels._numba import num_threads

__all__ = ["CorePlacement", "probe_cores", "span_label"]

_FAR_READ_RATIO = 2.0  # remote / local read time above which the two cores are "far"


@dataclass(frozen=True)
class CorePlacement:
    """What :func:`probe_cores` measured (microseconds for 800 KB, medians).

    Attributes
    ----------
    label : str
        ``"near"``, ``"far"``, or ``"one thread"`` (fewer than two numba threads: nothing measured).
    local_read_us, remote_read_us : float
        One thread summing a buffer it wrote itself / that the other thread wrote.
    own_rewrite_us, shared_rewrite_us : float
        One thread rewriting a buffer only it holds / that both threads have just read.
    """

    label: str
    local_read_us: float = float("nan")
    remote_read_us: float = float("nan")
    own_rewrite_us: float = float("nan")
    shared_rewrite_us: float = float("nan")

    def summary(self) -> str:
        """One line, e.g. ``near (remote read 1.2x local, rewriting shared lines 8.4x own)``."""
        if self.label == "one thread":
            return "one thread (no cross-core traffic)"
        return (f"{self.label} (remote read {self.remote_read_us / self.local_read_us:.1f}x local, rewriting "
                f"shared lines {self.shared_rewrite_us / self.own_rewrite_us:.1f}x own)")


@numba.njit(parallel=True, cache=True)
def _write(a, who, value):
    for _t in numba.prange(2):
        if numba.get_thread_id() == who:
            for i in range(a.size):
                a[i] = value


@numba.njit(parallel=True, fastmath=True, cache=True)
def _read(a, who, out):
    for t in numba.prange(2):
        if who < 0 or numba.get_thread_id() == who:
            s = np.float32(0.0)
            for i in range(a.size):
                s += a[i]
            out[t] = s


def probe_cores(repeats: int = 40) -> CorePlacement:
    """Measure how far apart numba's first two worker threads run (see the module docstring).

    Uses numba's current thread count; with fewer than two threads it measures nothing. Takes about
    ``repeats`` x 0.3 ms near (up to 1 ms far), after the kernels' compilation (cached).
    """
    if num_threads() < 2:
        return CorePlacement("one thread")
    saved = numba.get_num_threads()
    numba.set_num_threads(2)
    try:
        a = np.zeros(200_000, np.float32)  # 800 KB: inside one core's L2 on the machines measured
        out = np.zeros(2, np.float32)
        _write(a, 0, 1.0)
        _read(a, 0, out)
        samples: dict[str, list[float]] = {k: [] for k in ("local", "remote", "own", "shared")}

        def timed(key: str, fn, *args) -> None:
            t0 = time.perf_counter()
            fn(*args)
            samples[key].append(time.perf_counter() - t0)

        for r in range(repeats):
            _write(a, 0, float(r))
            timed("local", _read, a, 0, out)
            _write(a, 1, float(r))
            timed("remote", _read, a, 0, out)
            _read(a, -1, out)  # both threads read it: the lines are in both cores
            timed("shared", _write, a, 0, float(r))
            timed("own", _write, a, 0, float(r))
    finally:
        numba.set_num_threads(saved)
    us = {k: float(np.median(v)) * 1e6 for k, v in samples.items()}
    label = "far" if us["remote"] > _FAR_READ_RATIO * us["local"] else "near"
    return CorePlacement(label, us["local"], us["remote"], us["own"], us["shared"])


def span_label(before: CorePlacement, after: CorePlacement) -> str:
    """The placement around a timing: ``"near"``, ``"far"``, or ``"near->far"`` when it changed."""
    return before.label if before.label == after.label else f"{before.label}->{after.label}"
