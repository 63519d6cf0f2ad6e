"""sparsecnn: does the sparsity in your CNN make it smaller and faster on your hardware?

The public API is curated here. Importing the package is cheap: nothing heavy is imported and no
numba kernel is compiled until it is first used.
"""

from __future__ import annotations

from sparsecnn.errors import SparseCNNError

__version__ = "0.1.0"

__all__ = [
    "CompiledModel",
    "SparseCNNError",
    "SparseConv2d",
    "SparseLinear",
    "__version__",
    "analyze_model",
    "compile",
    "load",
    "prune_model",
    "run_report",
    "save",
    "sparsify",
    "strategies",
]

# Public names served lazily from their modules (PEP 562), so that `import sparsecnn` stays cheap.
_LAZY: dict[str, str] = {
    "save": "sparsecnn.io",
    "load": "sparsecnn.io",
    "SparseConv2d": "sparsecnn.layers",
    "SparseLinear": "sparsecnn.layers",
    "sparsify": "sparsecnn.layers",
    "compile": "sparsecnn.engine",
    "CompiledModel": "sparsecnn.engine",
    "strategies": "sparsecnn.layers",
    "analyze_model": "sparsecnn.analysis",
    "prune_model": "sparsecnn.prune",
    "run_report": "sparsecnn.bench.experiments",
}


# Submodules reachable as attributes (``import sparsecnn; sparsecnn.models.build(...)``, as in torch),
# imported on first access so that the import stays cheap.
_SUBMODULES: frozenset[str] = frozenset({
    "analysis", "bench", "data", "engine", "errors", "formats", "io", "kernels", "layers", "models", "ops",
    "plan", "prune", "report", "shrink", "train"})


def __getattr__(name: str):
    import importlib

    if name in _SUBMODULES:
        return importlib.import_module(f"sparsecnn.{name}")  # the import binds it in globals()
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sparsecnn' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | _SUBMODULES)
