"""Pruning: magnitude (Deep Compression), SSL, block and N:M, with retraining.

Every pruner follows prepare -> step -> squash (:class:`Pruner`); masks are buffers beside the
weights (:mod:`sparsecnn.prune.masks`); importance scores (:mod:`~sparsecnn.prune.importance`) and
sparsity schedules (:mod:`~sparsecnn.prune.schedules`) are separate objects any pruner takes.
:func:`prune_model` runs the whole stage (prune, retrain, report) that ``sparsecnn prune`` exposes.
"""

from __future__ import annotations

from sparsecnn.prune.base import Pruner
from sparsecnn.prune.importance import MagnitudeImportance, RandomImportance, TaylorImportance
from sparsecnn.prune.magnitude import MagnitudePruner
from sparsecnn.prune.masks import LayerSparsity, add_mask, get_mask, remove_mask, sparsity_report
from sparsecnn.prune.patterns import BlockPruner, NMPruner
from sparsecnn.prune.pipeline import METHODS, PruneConfig, PruneResult, prune_model
from sparsecnn.prune.schedules import AGP, Constant, Iterative
from sparsecnn.prune.ssl import GroupLasso, SSLPruner

__all__ = [
    "AGP",
    "METHODS",
    "BlockPruner",
    "Constant",
    "GroupLasso",
    "Iterative",
    "LayerSparsity",
    "MagnitudeImportance",
    "MagnitudePruner",
    "NMPruner",
    "PruneConfig",
    "PruneResult",
    "Pruner",
    "RandomImportance",
    "SSLPruner",
    "TaylorImportance",
    "add_mask",
    "get_mask",
    "prune_model",
    "remove_mask",
    "sparsity_report",
]
