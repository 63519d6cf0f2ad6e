"""Model zoo and published sparsity profiles.

``build`` / ``resolve`` give a model with readable layer names and an ``input_shape`` attribute;
``apply_profile`` prunes it to a published per-layer sparsity (Deep Compression, SSL) or a uniform one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from sparsecnn.errors import SparseCNNError
from sparsecnn.models.profiles import (
    PROFILES,
    STRUCTURED_PROFILES,
    apply_profile,
    apply_structured,
    get_profile,
    prunable_layers,
)
from sparsecnn.models.zoo import build, input_shape, load_weights, names
from sparsecnn.models.zoo import resolve as _zoo_resolve


def resolve(spec: str, weights: str | os.PathLike[str] | None = None, **kw: Any) -> nn.Module:
    """A zoo name (:func:`sparsecnn.models.zoo.resolve`), or a model file: ``.prototxt`` (+ weights
    ``.caffemodel``), ``.onnx``, ``.pt``/``.pth`` (a pickled module, or a state dict with ``model=NAME``),
    ``.npz``/``.safetensors`` sparse checkpoint (:func:`sparsecnn.io.load_model_file`)."""
    from sparsecnn.io import is_model_file, load_model_file

    if is_model_file(spec):
        return load_model_file(spec, weights, **kw)
    if spec not in names() and Path(spec).exists():  # a path, but not to a model file this package reads
        kind = "a directory" if Path(spec).is_dir() else "not a model file"
        raise SparseCNNError(f"{spec} is {kind}: pass a .onnx, .prototxt (+ .caffemodel), .pt/.pth, .npz or "
                             f".safetensors model file, or one of the zoo models {', '.join(names())}")
    kw.pop("model", None)
    return _zoo_resolve(spec, weights, **kw)


__all__ = [
    "PROFILES",
    "STRUCTURED_PROFILES",
    "apply_profile",
    "apply_structured",
    "build",
    "get_profile",
    "input_shape",
    "load_weights",
    "names",
    "prunable_layers",
    "resolve",
]
