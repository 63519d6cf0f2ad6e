"""Sparsity schedules: which fraction of weights (or groups) a pruner should have zeroed at step ``t``.

A schedule is a callable ``schedule(step) -> float`` with an attribute ``final`` (the sparsity it ends
at). It knows nothing about weights, so any pruner takes any schedule. A "step" is whatever the
caller makes it: :func:`sparsecnn.train.fit` steps a pruner once per epoch; an iterative
prune -> retrain loop steps it once per cycle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from sparsecnn.errors import SparseCNNError

__all__ = ["AGP", "Constant", "Iterative", "Schedule", "check_target"]


def check_target(value: object, what: str = "target sparsity") -> float:
    """``value`` as a float in [0, 1), or a SparseCNNError naming the problem."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0.0 <= value < 1.0:
        raise SparseCNNError(
            f"{what} must be a fraction in [0, 1) (e.g. 0.9 prunes 90%), got {value!r}"
        )
    return float(value)


@runtime_checkable
class Schedule(Protocol):
    final: float

    def __call__(self, step: int) -> float: ...


@dataclass(frozen=True)
class Constant:
    """One-shot pruning: the target from the first step on."""

    final: float  # the sparsity to prune to

    def __post_init__(self) -> None:
        check_target(self.final)

    def __call__(self, step: int) -> float:
        return self.final


@dataclass(frozen=True)
class Iterative:
    """Deep Compression's iterative pruning: ``cycles`` prune -> retrain cycles (Han et al. 2015).

    Each cycle removes the same fraction of the weights that are still left, so cycle ``i``
    (0-based) ends at

    .. math:: s_i = 1 - (1 - s_f)^{(i + 1) / n}
    """

    final: float  # the sparsity after the last cycle
    cycles: int = 3  # Han et al. prune and retrain a few times; 3 reaches 92% on LeNet gently

    def __post_init__(self) -> None:
        check_target(self.final)
        if isinstance(self.cycles, bool) or not isinstance(self.cycles, int) or self.cycles < 1:
            raise SparseCNNError(f"cycles must be a positive integer, got {self.cycles!r}")

    def __call__(self, step: int) -> float:
        i = min(max(step, 0), self.cycles - 1)
        return 1.0 - (1.0 - self.final) ** ((i + 1) / self.cycles)


@dataclass(frozen=True)
class AGP:
    """Automated gradual pruning (Zhu and Gupta, "To prune, or not to prune", 2017).

    From step ``begin`` to ``end``, every ``frequency`` steps, the sparsity follows

    .. math:: s_t = s_f + (s_i - s_f) \\left(1 - \\frac{t - t_0}{n \\Delta t}\\right)^3

    pruning fast while many redundant weights remain and slowly near the end. Before ``begin`` it
    is 0 (no pruning); from ``end`` on it is ``final``.
    """

    final: float  # s_f
    initial: float = 0.0  # s_i, the sparsity at step `begin`
    begin: int = 0  # t_0
    end: int = 10  # t_0 + n*dt; leave some steps after it for recovery
    frequency: int = 1  # dt, steps between mask updates

    def __post_init__(self) -> None:
        check_target(self.final)
        check_target(self.initial, "initial sparsity")
        if self.initial > self.final:
            raise SparseCNNError(f"AGP initial sparsity {self.initial} exceeds final {self.final}")
        if not (0 <= self.begin < self.end) or self.frequency < 1:
            raise SparseCNNError(
                f"AGP needs 0 <= begin < end and frequency >= 1, got begin={self.begin}, end={self.end}, "
                f"frequency={self.frequency}"
            )

    def __call__(self, step: int) -> float:
        if step < self.begin:
            return 0.0
        if step >= self.end:
            return self.final
        t = self.begin + (step - self.begin) // self.frequency * self.frequency
        progress = (t - self.begin) / (self.end - self.begin)
        return self.final + (self.initial - self.final) * (1.0 - progress) ** 3
