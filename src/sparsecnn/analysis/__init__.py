"""Analysis: weight and activation sparsity, storage bytes per format and FLOPs, per layer.

:func:`analyze_model` is the entry point behind ``sparsecnn analyze``; ``sparsity`` and ``costs``
hold the per-layer pieces.
"""

from __future__ import annotations

from sparsecnn.analysis._inputs import load_input
from sparsecnn.analysis._model import AnalysisResult, LayerAnalysis, TotalAnalysis, analyze_model
from sparsecnn.analysis.costs import GemmDims, StorageBytes, gemm_dims, layer_flops, weight_nbytes
from sparsecnn.analysis.sparsity import ActivationStats, WeightSparsity, activation_stats, weight_sparsity

__all__ = [
    "ActivationStats",
    "AnalysisResult",
    "GemmDims",
    "LayerAnalysis",
    "StorageBytes",
    "TotalAnalysis",
    "WeightSparsity",
    "activation_stats",
    "analyze_model",
    "gemm_dims",
    "layer_flops",
    "load_input",
    "weight_nbytes",
    "weight_sparsity",
]
