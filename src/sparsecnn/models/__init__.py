"""Model zoo and published sparsity profiles.

``build`` / ``resolve`` give a model with readable layer names and an ``input_shape`` attribute;
``apply_profile`` prunes it to a published per-layer sparsity (Deep Compression, SSL) or a uniform one.
"""

from __future__ import annotations

from sparsecnn.models.profiles import PROFILES, apply_profile, get_profile, prunable_layers
from sparsecnn.models.zoo import build, input_shape, load_weights, names, resolve

__all__ = [
    "PROFILES",
    "apply_profile",
    "build",
    "get_profile",
    "input_shape",
    "load_weights",
    "names",
    "prunable_layers",
    "resolve",
]
