"""The one reference every kernel and layer is checked against, and the one shared assert.

Reference: torch's dense ``F.conv2d`` / ``F.linear`` in float32 (oneDNN), computed from the dense layer.
Tolerance: a relative error of 1e-4 in fp32, relative to the output's largest magnitude
(``max |actual - expected| <= 1e-4 * max |expected|``): the kernels sum the same products in a
different order, and the rounding error of a long reduction is a fraction of the magnitudes summed,
not of a result that happens to cancel to near zero. An all-zero expected output must be matched
exactly.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

RTOL = 1e-4


def reference(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The dense layer's output on ``x`` (F.conv2d / F.linear, float32, no autograd)."""
    with torch.no_grad():
        if isinstance(layer, nn.Linear):
            return F.linear(x, layer.weight, layer.bias)
        return layer(x)  # Conv2d: F.conv2d, or its padding_mode path


def assert_close(actual: Any, expected: Any, rtol: float = RTOL, what: str = "output") -> None:
    """``max |actual - expected| <= rtol * max |expected|``, same shape, float32, finite."""
    a = actual.detach().cpu().numpy() if isinstance(actual, torch.Tensor) else np.asarray(actual)
    e = expected.detach().cpu().numpy() if isinstance(expected, torch.Tensor) else np.asarray(expected)
    assert a.shape == e.shape, f"{what}: shape {a.shape}, expected {e.shape}"
    assert a.dtype == np.float32, f"{what}: dtype {a.dtype}, expected float32"
    assert np.isfinite(a).all(), f"{what}: holds NaN/Inf"
    if e.size == 0:
        return
    scale = float(np.abs(e).max())
    err = float(np.abs(a.astype(np.float64) - e).max())
    assert err <= rtol * scale, (
        f"{what}: max abs error {err:.3g} exceeds {rtol:g} x max|expected| = {rtol * scale:.3g}")


def check_format(fmt: Any) -> None:
    """The format's own invariants, when the strategy keeps a format object that has any."""
    if hasattr(fmt, "check_format"):
        fmt.check_format()


def assert_layer_matches(sparse: nn.Module, dense: nn.Module, x: torch.Tensor, rtol: float = RTOL) -> None:
    """The shared assert: format invariants, then ``sparse(x)`` against the dense reference."""
    check_format(sparse.format)
    expected = reference(dense, x)
    with torch.no_grad():
        actual = sparse(x)
    label = f"{getattr(sparse, 'strategy', '?')} {getattr(sparse, 'name', '')}".strip()
    assert_close(actual, expected, rtol, what=label)
