"""Property-based tests (hypothesis): every conv and linear strategy against the dense torch layer on
generated geometry, NaN/Inf inputs, and every format's round trip. ``make fuzz`` runs many more examples."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import sparsecnn
from sparsecnn.formats import BSRMatrix, CSRMatrix, RelativeIndexMatrix
from tests.reference import assert_layer_matches, check_format

pytestmark = pytest.mark.fuzz

CONV = sparsecnn.strategies("conv")
LINEAR = sparsecnn.strategies("linear")
SETTINGS = settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
                    deadline=None)


def _weights(shape: tuple[int, ...], density: str, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32)
    if density == "zero":
        w[:] = 0.0
    elif density == "sparse":
        w[rng.random(shape) < 0.8] = 0.0
    return torch.from_numpy(w)


def _sparse_of(model: nn.Module, strategy: str) -> nn.Module | None:
    """The model's one layer sparsified with ``strategy``; None where the strategy cannot run that
    geometry (sparsify warns and keeps torch)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sparse = sparsecnn.sparsify(model, strategy)
    layer = sparse[0]
    fell_back = any("falling back" in str(w.message) for w in caught)
    if getattr(layer, "strategy", strategy) != strategy or fell_back:
        return None
    return layer


@st.composite
def conv_geometry(draw):
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    cin = groups * draw(st.integers(1, 3))
    cout = groups * draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    h, w = draw(st.integers(1, 11)), draw(st.integers(1, 11))
    assume(h + 2 * padding[0] >= dilation[0] * (kh - 1) + 1)
    assume(w + 2 * padding[1] >= dilation[1] * (kw - 1) + 1)
    batch = draw(st.sampled_from([1, 2, 3, 9]))  # 2 and 9: the threads split the images (2 threads)
    bias = draw(st.booleans())
    density = draw(st.sampled_from(["zero", "sparse", "sparse", "full"]))
    input_zeros = draw(st.sampled_from([0.0, 0.0, 0.5, 0.9, 1.0]))  # ReLU zeros (spconv-act skips them)
    return dict(cin=cin, cout=cout, k=(kh, kw), stride=stride, padding=padding, dilation=dilation,
                groups=groups, h=h, w=w, batch=batch, bias=bias, density=density,
                input_zeros=input_zeros, seed=draw(st.integers(0, 99)))


def _conv(g: dict) -> tuple[nn.Module, torch.Tensor]:
    conv = nn.Conv2d(g["cin"], g["cout"], g["k"], stride=g["stride"], padding=g["padding"],
                     dilation=g["dilation"], groups=g["groups"], bias=g["bias"])
    with torch.no_grad():
        conv.weight.copy_(_weights(tuple(conv.weight.shape), g["density"], g["seed"]))
        if g["bias"]:
            conv.bias.copy_(torch.linspace(-1, 1, g["cout"]))
    rng = np.random.default_rng(g["seed"] + 1)
    x = rng.standard_normal((g["batch"], g["cin"], g["h"], g["w"])).astype(np.float32)
    x[rng.random(x.shape) < g.get("input_zeros", 0.0)] = 0.0
    return nn.Sequential(conv).eval(), torch.from_numpy(x)


@pytest.mark.parametrize("strategy", CONV)
@SETTINGS
@given(g=conv_geometry())
def test_conv_strategy_matches_torch(strategy: str, g: dict) -> None:
    model, x = _conv(g)
    layer = _sparse_of(model, strategy)
    if layer is None:
        return
    assert_layer_matches(layer, model[0], x)


@pytest.mark.parametrize("strategy", LINEAR)
@SETTINGS
@given(m=st.integers(1, 40), k=st.integers(1, 70), batch=st.integers(1, 9), bias=st.booleans(),
       density=st.sampled_from(["zero", "sparse", "full"]), seed=st.integers(0, 99),
       input_zeros=st.floats(0.0, 1.0))
def test_linear_strategy_matches_torch(strategy, m, k, batch, bias, density, seed, input_zeros) -> None:
    fc = nn.Linear(k, m, bias=bias)
    with torch.no_grad():
        fc.weight.copy_(_weights((m, k), density, seed))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, k)).astype(np.float32)
    x[rng.random(x.shape) < input_zeros] = 0.0  # spmv-act walks the nonzero inputs
    model = nn.Sequential(fc).eval()
    layer = _sparse_of(model, strategy)
    if layer is None:
        return
    assert_layer_matches(layer, fc, torch.from_numpy(x))


def _nan_case(strategy: str, kind: str, seed: int, value: float) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    if kind == "linear":
        dense = nn.Linear(12, 5)
        x = rng.standard_normal((2, 12)).astype(np.float32)
    else:
        dense = nn.Conv2d(2, 3, 3, padding=1)
        x = rng.standard_normal((2, 2, 6, 6)).astype(np.float32)
    with torch.no_grad():
        dense.weight.copy_(_weights(tuple(dense.weight.shape), "full", seed))  # every weight nonzero
    flat = x.reshape(-1)
    flat[rng.choice(flat.size, size=3, replace=False)] = value
    model = nn.Sequential(dense).eval()
    layer = _sparse_of(model, strategy)
    xt = torch.from_numpy(x)
    with torch.no_grad():
        ref = dense(xt)
        out = layer(xt) if layer is not None else ref
    return out, ref


@pytest.mark.parametrize(("kind", "strategy"), [("conv", s) for s in CONV] + [("linear", s) for s in LINEAR])
@SETTINGS
@given(seed=st.integers(0, 999), value=st.sampled_from([float("nan"), float("inf"), float("-inf")]))
def test_nan_inf_inputs_propagate_like_torch(kind: str, strategy: str, seed: int, value: float) -> None:
    """With all weights nonzero, a NaN/Inf input reaches the same outputs as in torch: the same NaN
    positions, the same infinities, the same finite values elsewhere. (Where a weight is a structural
    zero a sparse kernel never reads the input it would multiply, so ``0 * NaN`` is not formed: a
    sparse format stores no zeros, as in scipy.sparse.)"""
    out, ref = _nan_case(strategy, kind, seed, value)
    o, r = out.numpy(), ref.numpy()
    assert np.array_equal(np.isnan(o), np.isnan(r)), f"NaN at {np.argwhere(np.isnan(o) != np.isnan(r))[:3]}"
    assert np.array_equal(np.isposinf(o), np.isposinf(r)) and np.array_equal(np.isneginf(o), np.isneginf(r))
    fin = np.isfinite(r)
    scale = max(1.0, float(np.abs(r[fin]).max(initial=0)))
    np.testing.assert_allclose(o[fin], r[fin], rtol=1e-4, atol=1e-4 * scale)


# --------------------------------------------------------------------------------------------------
# formats


@st.composite
def matrices(draw):
    m, n = draw(st.integers(1, 17)), draw(st.integers(1, 40))
    rng = np.random.default_rng(draw(st.integers(0, 999)))
    a = rng.standard_normal((m, n)).astype(np.float32)
    density = draw(st.sampled_from([0.0, 0.05, 0.3, 1.0]))
    a[rng.random((m, n)) >= density] = 0.0
    if draw(st.booleans()) and m > 1:
        a[draw(st.integers(0, m - 1))] = 0.0  # an empty row
    return a


@SETTINGS
@given(a=matrices(), r=st.integers(1, 5), c=st.integers(1, 5), bits=st.sampled_from([4, 8]))
def test_format_round_trips(a: np.ndarray, r: int, c: int, bits: int) -> None:
    for fmt in (CSRMatrix.from_dense(a), BSRMatrix.from_dense(a, blocksize=(r, c)),
                RelativeIndexMatrix.from_dense(a, index_bits=bits)):
        check_format(fmt)
        back = fmt.to_dense()
        assert back.shape == a.shape and back.dtype == np.float32
        np.testing.assert_array_equal(back, a, err_msg=type(fmt).__name__)
        assert fmt.nbytes > 0 or a.size == 0
