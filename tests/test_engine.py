"""The engine's correctness suite: every strategy in the registry against the dense torch reference.

One parametrised suite over ``sparsecnn.strategies()``: a new strategy inherits every case. The conv
cases are a covering set (each kernel size, stride, padding, dilation, groups, batch, odd size and
sparsity appears, with small channel counts) rather than the full cross product; hypothesis adds
random configurations.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import sparsecnn
from sparsecnn import SparseCNNError, SparseConv2d, SparseLinear, ops
from sparsecnn.formats import BSRMatrix, CSRMatrix
from tests.reference import assert_close, assert_layer_matches

CONV = sparsecnn.strategies("conv")
LINEAR = sparsecnn.strategies("linear")


@dataclass(frozen=True)
class ConvCase:
    cin: int
    cout: int
    k: int | tuple[int, int]
    stride: int | tuple[int, int] = 1
    padding: int | tuple[int, int] = 0
    dilation: int | tuple[int, int] = 1
    groups: int = 1
    batch: int = 1
    hw: tuple[int, int] = (9, 9)
    sparsity: float = 0.9
    bias: bool = True
    empty_filters: int = 0  # this many leading filters set entirely to zero
    relu_input: bool = False  # input with ReLU zeros (what spgemm exploits)

    def __str__(self) -> str:
        return (f"c{self.cin}-{self.cout}k{self.k}s{self.stride}p{self.padding}d{self.dilation}"
                f"g{self.groups}b{self.batch}hw{self.hw[0]}x{self.hw[1]}sp{self.sparsity}"
                f"{'' if self.bias else '-nobias'}"
                f"{f'-empty{self.empty_filters}' if self.empty_filters else ''}"
                f"{'-relu' if self.relu_input else ''}")


CONV_CASES = [
    ConvCase(3, 5, 1, hw=(7, 5), sparsity=0.5),                                   # 1x1 pointwise
    ConvCase(4, 6, 1, stride=2, hw=(9, 7), batch=3, sparsity=0.9),               # 1x1 strided
    ConvCase(4, 6, 3, padding=1, hw=(9, 9), sparsity=0.0),                        # dense weights
    ConvCase(4, 6, 3, padding=1, batch=3, hw=(11, 7), sparsity=0.9, relu_input=True),
    ConvCase(4, 8, 3, stride=2, padding=2, hw=(13, 11), sparsity=0.5, empty_filters=3),
    ConvCase(4, 6, 3, padding=2, dilation=2, hw=(10, 9), sparsity=0.9),           # dilation
    ConvCase(6, 8, 3, padding=1, groups=2, batch=3, hw=(7, 9), sparsity=0.5),     # groups 2
    ConvCase(6, 6, 3, padding=1, groups=6, hw=(9, 11), sparsity=0.5),             # depthwise
    ConvCase(5, 10, 3, stride=2, padding=1, groups=5, batch=3, hw=(8, 8), sparsity=0.0),  # depthwise x2
    ConvCase(4, 6, 5, padding=2, hw=(11, 13), sparsity=0.9, bias=False),          # 5x5
    ConvCase(4, 8, 5, stride=(1, 2), padding=(2, 0), dilation=(1, 2), groups=2, hw=(12, 15),
             sparsity=0.5, empty_filters=4),                                     # one group all empty
    ConvCase(3, 8, 11, stride=4, hw=(35, 31), sparsity=0.9),                      # AlexNet conv1 shape
    ConvCase(3, 4, 11, stride=4, padding=2, batch=3, hw=(27, 27), sparsity=0.5),
    ConvCase(4, 6, 3, stride=4, padding=1, hw=(17, 13), sparsity=0.9),            # stride 4
    ConvCase(4, 6, 3, padding=1, hw=(7, 7), sparsity=1.0),                        # all zero, bias only
    ConvCase(4, 6, 3, padding=1, hw=(7, 7), sparsity=1.0, bias=False),            # all zero output
    ConvCase(4, 6, 3, padding=0, hw=(3, 3), sparsity=0.5),                        # 1x1 output
    ConvCase(2, 4, (3, 1), stride=(2, 1), padding=(1, 0), batch=3, hw=(9, 4), sparsity=0.5),  # non-square
    ConvCase(4, 6, 3, padding=1, hw=(1, 9), sparsity=0.5, relu_input=True),       # one input row
    ConvCase(8, 12, 3, padding=1, groups=4, hw=(6, 6), sparsity=0.9, empty_filters=6),
]


def _make_conv(case: ConvCase, seed: int = 0) -> tuple[nn.Conv2d, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(case.cin, case.cout, case.k, case.stride, case.padding, case.dilation, case.groups,
                     bias=case.bias)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen))
        n = conv.weight.numel()
        flat = conv.weight.view(-1)
        flat[torch.randperm(n, generator=gen)[: round(case.sparsity * n)]] = 0.0
        conv.weight[: case.empty_filters] = 0.0
        if conv.bias is not None:
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=gen))
    x = torch.randn(case.batch, case.cin, *case.hw, generator=gen)
    if case.relu_input:
        x = torch.relu(x)
    return conv.eval(), x


@pytest.mark.parametrize("strategy", CONV)
@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_conv_strategy_matches_torch(strategy: str, case: ConvCase) -> None:
    conv, x = _make_conv(case)
    layer = SparseConv2d.from_dense(conv, strategy)
    assert layer.strategy == strategy
    assert_layer_matches(layer, conv, x)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
@pytest.mark.parametrize("strategy", CONV)
def test_conv_strategy_random_configurations(strategy: str, data: st.DataObject) -> None:
    groups = data.draw(st.sampled_from([1, 1, 2, 3]), "groups")
    cin = groups * data.draw(st.integers(1, 3), "cin_per_group")
    cout = groups * data.draw(st.integers(1, 3), "cout_per_group")
    kh, kw = data.draw(st.integers(1, 5), "kh"), data.draw(st.integers(1, 5), "kw")
    sh, sw = data.draw(st.integers(1, 4), "sh"), data.draw(st.integers(1, 4), "sw")
    dh, dw = data.draw(st.integers(1, 3), "dh"), data.draw(st.integers(1, 3), "dw")
    ph, pw = data.draw(st.integers(0, 3), "ph"), data.draw(st.integers(0, 3), "pw")
    # an input at least as large as the dilated kernel minus the padding
    h = data.draw(st.integers(max(1, dh * (kh - 1) + 1 - 2 * ph), 14), "h")
    w = data.draw(st.integers(max(1, dw * (kw - 1) + 1 - 2 * pw), 14), "w")
    case = ConvCase(cin, cout, (kh, kw), (sh, sw), (ph, pw), (dh, dw), groups,
                    batch=data.draw(st.integers(1, 3), "batch"), hw=(h, w),
                    sparsity=data.draw(st.sampled_from([0.0, 0.5, 0.9, 1.0]), "sparsity"),
                    bias=data.draw(st.booleans(), "bias"),
                    relu_input=data.draw(st.booleans(), "relu"))
    conv, x = _make_conv(case, seed=data.draw(st.integers(0, 2**16), "seed"))
    assert_layer_matches(SparseConv2d.from_dense(conv, strategy), conv, x)


@pytest.mark.parametrize("strategy", CONV)
def test_conv_workspace_reuse_across_shapes(strategy: str) -> None:
    """Cached workspaces are per input shape: alternating shapes and repeats stay correct."""
    conv, _ = _make_conv(ConvCase(4, 6, 3, padding=1, groups=2, sparsity=0.5))
    layer = SparseConv2d.from_dense(conv, strategy)
    gen = torch.Generator().manual_seed(1)
    shapes = [(1, 4, 9, 9), (3, 4, 7, 11), (1, 4, 9, 9), (2, 4, 5, 5), (1, 4, 9, 9)]
    for shape in shapes:
        x = torch.relu(torch.randn(shape, generator=gen))
        assert_layer_matches(layer, conv, x)


@pytest.mark.parametrize("strategy", CONV)
def test_conv_unbatched_and_noncontiguous_input(strategy: str) -> None:
    conv, x = _make_conv(ConvCase(4, 6, 3, padding=1, batch=2, hw=(8, 10), sparsity=0.5))
    layer = SparseConv2d.from_dense(conv, strategy)
    assert_close(layer(x[0]), conv(x[0]).detach(), what="unbatched")
    xt = x.transpose(2, 3)  # a non-contiguous view
    assert_layer_matches(layer, conv, xt)


@pytest.mark.parametrize("strategy", CONV)
def test_conv_layer_attributes(strategy: str) -> None:
    conv, _ = _make_conv(ConvCase(4, 8, 3, padding=1, groups=2, sparsity=0.9))
    layer = SparseConv2d.from_dense(conv, strategy, name="features.conv")
    assert layer.name == "features.conv"
    assert layer.conversion_seconds > 0
    assert isinstance(layer.weight_nbytes, int) and layer.weight_nbytes > 0
    if layer.format is not None:
        assert layer.weight_nbytes == layer.format.nbytes
    if strategy in ("csrmm", "spgemm"):
        assert isinstance(layer.format, CSRMatrix)
        assert layer.format.nnz == int(torch.count_nonzero(conv.weight))
        assert layer.weight_nbytes < conv.weight.numel() * 4  # 90% sparse: CSR is smaller
    if strategy == "bsr":
        assert isinstance(layer.format, BSRMatrix)
    assert strategy in repr(layer)


# --------------------------------------------------------------------------------------------------
# linear


@dataclass(frozen=True)
class LinearCase:
    k: int
    m: int
    batch: int = 1
    sparsity: float = 0.9
    bias: bool = True
    empty_rows: int = 0

    def __str__(self) -> str:
        return f"{self.k}to{self.m}b{self.batch}sp{self.sparsity}{'' if self.bias else '-nobias'}" + (
            f"-empty{self.empty_rows}" if self.empty_rows else "")


LINEAR_CASES = [
    LinearCase(50, 30, 1, 0.9),
    LinearCase(50, 30, 3, 0.9),
    LinearCase(64, 17, 1, 0.0),
    LinearCase(33, 40, 3, 0.5, bias=False, empty_rows=7),
    LinearCase(20, 8, 1, 1.0),
    LinearCase(20, 8, 5, 1.0, bias=False),
    LinearCase(1, 3, 2, 0.5),
    LinearCase(300, 70, 1, 0.9, empty_rows=20),
]


def _make_linear(case: LinearCase, seed: int = 0) -> tuple[nn.Linear, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    lin = nn.Linear(case.k, case.m, bias=case.bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen))
        n = lin.weight.numel()
        lin.weight.view(-1)[torch.randperm(n, generator=gen)[: round(case.sparsity * n)]] = 0.0
        lin.weight[: case.empty_rows] = 0.0
        if lin.bias is not None:
            lin.bias.copy_(torch.randn(lin.bias.shape, generator=gen))
    return lin.eval(), torch.randn(case.batch, case.k, generator=gen)


@pytest.mark.parametrize("strategy", LINEAR)
@pytest.mark.parametrize("case", LINEAR_CASES, ids=str)
def test_linear_strategy_matches_torch(strategy: str, case: LinearCase) -> None:
    lin, x = _make_linear(case)
    layer = SparseLinear.from_dense(lin, strategy)
    assert layer.strategy == strategy
    assert_layer_matches(layer, lin, x)


@settings(max_examples=15, deadline=None)
@given(k=st.integers(1, 80), m=st.integers(1, 80), batch=st.integers(1, 6),
       sparsity=st.sampled_from([0.0, 0.5, 0.9, 1.0]), bias=st.booleans(), seed=st.integers(0, 2**16))
@pytest.mark.parametrize("strategy", LINEAR)
def test_linear_strategy_random(strategy: str, k: int, m: int, batch: int, sparsity: float, bias: bool,
                                seed: int) -> None:
    lin, x = _make_linear(LinearCase(k, m, batch, sparsity, bias), seed)
    assert_layer_matches(SparseLinear.from_dense(lin, strategy), lin, x)


@pytest.mark.parametrize("strategy", LINEAR)
def test_linear_leading_dims_and_attributes(strategy: str) -> None:
    lin, _ = _make_linear(LinearCase(12, 9, sparsity=0.9))
    layer = SparseLinear.from_dense(lin, strategy, name="fc")
    x = torch.randn(2, 3, 12)
    assert_close(layer(x), F.linear(x, lin.weight, lin.bias).detach(), what="leading dims")
    assert_close(layer(x[0, 0]), F.linear(x[0, 0], lin.weight, lin.bias).detach(), what="1-D input")
    assert layer.conversion_seconds > 0 and layer.weight_nbytes > 0 and layer.name == "fc"
    if layer.format is not None:
        assert layer.weight_nbytes == layer.format.nbytes


# --------------------------------------------------------------------------------------------------
# from_format: layers rebuilt from a stored format, validated


def _geometry(conv: nn.Conv2d) -> dict:
    return dict(in_channels=conv.in_channels, out_channels=conv.out_channels, kernel_size=conv.kernel_size,
                stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups)


@pytest.mark.parametrize("strategy", CONV)
@pytest.mark.parametrize("case", [CONV_CASES[4], CONV_CASES[10], CONV_CASES[19]], ids=str)
def test_conv_from_format_equals_from_dense(strategy: str, case: ConvCase) -> None:
    conv, x = _make_conv(case)
    made = SparseConv2d.from_dense(conv, strategy, name="c")
    w, b = made.dense_parameters()
    fmt = w if strategy == "torch" else made.format
    again = SparseConv2d.from_format(fmt, strategy, **_geometry(conv), bias=b, name="c")
    assert again.strategy == strategy and again.weight_nbytes == made.weight_nbytes
    assert torch.equal(again(x), made(x))
    assert_layer_matches(again, conv, x)
    np.testing.assert_array_equal(w, conv.weight.detach().numpy())


@pytest.mark.parametrize("strategy", LINEAR)
def test_linear_from_format_equals_from_dense(strategy: str) -> None:
    lin, x = _make_linear(LINEAR_CASES[3])
    made = SparseLinear.from_dense(lin, strategy)
    w, b = made.dense_parameters()
    again = SparseLinear.from_format(w if strategy == "torch" else made.format, strategy,
                                     in_features=lin.in_features, out_features=lin.out_features, bias=b)
    assert torch.equal(again(x), made(x))
    assert_layer_matches(again, lin, x)


def test_from_format_rejects_what_the_kernels_cannot_run() -> None:
    conv, _ = _make_conv(ConvCase(4, 8, 3, padding=1, groups=2, sparsity=0.5))
    geo = _geometry(conv)
    csr = SparseConv2d.from_dense(conv, "csrmm").format
    bad_idx = CSRMatrix(csr.indptr, csr.indices.copy(), csr.data, csr.shape)
    bad_idx.indices[0] = 0
    bad_idx.indices[1] = 0  # a repeated column: not strictly increasing
    direct = SparseConv2d.from_dense(conv, "direct").format
    import dataclasses

    cases = [
        (csr, "bsr", geo, "expected a BSRMatrix"),
        (csr, "csrmm", {**geo, "kernel_size": 5}, "shape"),
        (bad_idx, "csrmm", geo, "sorted"),
        (direct, "direct", {**geo, "stride": 2}, "stride"),
        (dataclasses.replace(direct, indices=direct.indices + 100), "direct", geo, r"\[0, 18\)"),
        (np.zeros((2, 4, 18), np.float64), "dense", geo, "float32"),
        (np.full((2, 4, 18), np.nan, np.float32), "dense", geo, "NaN"),
        (csr, "csrmm", {**geo, "groups": 3}, "divide"),
        (csr, "csrmm", {**geo, "bias": np.zeros(5, np.float32)}, r"bias.*\(8,\)"),
        (csr, "fast", geo, "unknown conv strategy"),
    ]
    for fmt, strategy, kwargs, match in cases:
        with pytest.raises(SparseCNNError, match=match):
            SparseConv2d.from_format(fmt, strategy, name="conv9", **kwargs)
    prep = SparseLinear.from_dense(nn.Linear(6, 4), "spmv").format
    with pytest.raises(SparseCNNError, match=r"'fc'.*LinearPrep of shape \(4, 7\)"):
        SparseLinear.from_format(prep, "spmv", in_features=7, out_features=4, name="fc")
    with pytest.raises(SparseCNNError, match="indptr"):
        SparseLinear.from_format(dataclasses.replace(prep, indptr=prep.indptr[:-1]), "spmm", in_features=6,
                                 out_features=4)


@pytest.mark.parametrize("strategy", CONV)
def test_conv_layer_deepcopy_and_pickle(strategy: str) -> None:
    import io
    import pickle

    conv, x = _make_conv(ConvCase(4, 8, 3, padding=1, groups=2, batch=2, sparsity=0.9))
    layer = SparseConv2d.from_dense(conv, strategy)
    y = layer(x)  # workspaces exist now; the copies rebuild their own
    for twin in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert torch.equal(twin(x), y) and twin.weight_nbytes == layer.weight_nbytes
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False)(x), y)


# --------------------------------------------------------------------------------------------------
# fallbacks and errors


def test_strategies_registry() -> None:
    assert CONV == ("torch", "dense", "csrmm", "direct", "lowered", "bsr", "spgemm", "spconv-act")
    assert LINEAR == ("torch", "dense", "spmv", "spmm", "spmv-act", "qspmv", "direct")
    with pytest.raises(SparseCNNError, match="conv"):
        sparsecnn.strategies("pool")


@pytest.mark.parametrize("strategy", CONV[1:])
def test_reflect_padding_falls_back_with_warning(strategy: str) -> None:
    conv, x = _make_conv(ConvCase(3, 4, 3, padding=1, sparsity=0.5))
    conv.padding_mode = "reflect"
    with pytest.warns(UserWarning, match=r"'blk'.*padding_mode='reflect'.*falling back to torch"):
        layer = SparseConv2d.from_dense(conv, strategy, name="blk")
    assert layer.strategy == "torch"
    assert_layer_matches(layer, conv, x)


def test_float64_layers_fall_back_with_warning() -> None:
    conv, x = _make_conv(ConvCase(3, 4, 3, padding=1, sparsity=0.5))
    conv = conv.double()
    with pytest.warns(UserWarning, match=r"'c64'.*torch.float64"):
        layer = SparseConv2d.from_dense(conv, "csrmm", name="c64")
    assert layer.strategy == "torch"
    torch.testing.assert_close(layer(x.double()), conv(x.double()))
    lin = nn.Linear(5, 3).double()
    with pytest.warns(UserWarning, match=r"'l64'.*torch.float64"):
        assert SparseLinear.from_dense(lin, "spmv", name="l64").strategy == "torch"


def test_padding_same() -> None:
    conv = nn.Conv2d(3, 4, 3, padding="same", dilation=2).eval()
    x = torch.randn(1, 3, 8, 9)
    layer = SparseConv2d.from_dense(conv, "csrmm")
    assert layer.strategy == "csrmm"
    assert_layer_matches(layer, conv, x)
    even = nn.Conv2d(3, 4, 2, padding="same").eval()
    with pytest.warns(UserWarning, match="asymmetric"):
        layer = SparseConv2d.from_dense(even, "csrmm", name="even")
    assert layer.strategy == "torch"
    assert_layer_matches(layer, even, x)
    valid = nn.Conv2d(3, 4, 3, padding="valid").eval()
    assert_layer_matches(SparseConv2d.from_dense(valid, "direct"), valid, x)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("where", ["weight", "bias"])
def test_nan_inf_rejected_naming_layer(bad: float, where: str) -> None:
    conv = nn.Conv2d(3, 4, 3)
    lin = nn.Linear(4, 2)
    with torch.no_grad():
        getattr(conv, where)[0] = bad
        getattr(lin, where)[0] = bad
    for strategy in CONV:
        with pytest.raises(SparseCNNError, match=rf"'conv7'.*{where}.*NaN/Inf"):
            SparseConv2d.from_dense(conv, strategy, name="conv7")
    for strategy in LINEAR:
        with pytest.raises(SparseCNNError, match=rf"'fc9'.*{where}.*NaN/Inf"):
            SparseLinear.from_dense(lin, strategy, name="fc9")


def test_bad_strategy_and_inputs() -> None:
    conv, x = _make_conv(ConvCase(4, 6, 3, padding=1))
    with pytest.raises(SparseCNNError, match="unknown conv strategy 'fast'"):
        SparseConv2d.from_dense(conv, "fast")
    with pytest.raises(SparseCNNError, match="unknown linear strategy 'csrmm'"):
        SparseLinear.from_dense(nn.Linear(3, 2), "csrmm")
    layer = SparseConv2d.from_dense(conv, "csrmm", name="c")
    with pytest.raises(SparseCNNError, match=r"'c'.*float32"):
        layer(x.double())
    with pytest.raises(SparseCNNError, match=r"'c'.*\(B, 4, H, W\)"):
        layer(torch.randn(1, 5, 9, 9))
    with pytest.raises(SparseCNNError, match="too small"):
        SparseConv2d.from_dense(nn.Conv2d(4, 6, 5), "dense")(torch.randn(1, 4, 3, 3))
    lin = SparseLinear.from_dense(nn.Linear(3, 2), "spmm", name="fc")
    with pytest.raises(SparseCNNError, match=r"'fc'.*\(\.\.\., 3\)"):
        lin(torch.randn(2, 4))


def test_empty_batch() -> None:
    conv, _ = _make_conv(ConvCase(4, 6, 3, padding=1))
    for strategy in CONV:
        y = SparseConv2d.from_dense(conv, strategy)(torch.zeros(0, 4, 9, 9))
        assert y.shape == (0, 6, 9, 9)


# --------------------------------------------------------------------------------------------------
# ops: matrix-level entry points, every index dtype the formats may choose


def _csr_with(a: np.ndarray, dtype: type) -> CSRMatrix:
    m = CSRMatrix.from_dense(a)
    return CSRMatrix(m.indptr.astype(dtype), m.indices.astype(dtype), m.data, m.shape)


@pytest.mark.parametrize("dtype", [np.int16, np.int32, np.int64])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
def test_ops_sparse_times_dense_and_sparse(dtype: type, sparsity: float) -> None:
    from tests.conftest import random_sparse

    rng = np.random.default_rng(3)
    a = random_sparse(rng, (23, 41), sparsity)
    a[5] = 0.0  # an empty row
    b = random_sparse(rng, (41, 13), 0.6)
    expected = a.astype(np.float64) @ b
    a_csr = _csr_with(a, dtype)
    assert_close(ops.csr_matmul(a_csr, b), expected.astype(np.float32))
    out = np.full((23, 13), np.nan, np.float32)
    assert ops.csr_matmul(a_csr, b, out=out) is out
    assert_close(out, expected.astype(np.float32))
    bsr = BSRMatrix.from_dense(a, blocksize=(4, 3))
    bsr = BSRMatrix(bsr.indptr.astype(dtype), bsr.indices.astype(dtype), bsr.data, bsr.shape, bsr.blocksize)
    assert_close(ops.bsr_matmul(bsr, b), expected.astype(np.float32))
    assert_close(ops.csr_spgemm(a_csr, _csr_with(b, dtype)), expected.astype(np.float32))


def test_ops_validation() -> None:
    a = CSRMatrix.from_dense(np.eye(3, dtype=np.float32))
    with pytest.raises(SparseCNNError, match="inner dimensions"):
        ops.csr_matmul(a, np.ones((4, 2), np.float32))
    with pytest.raises(SparseCNNError, match="out must be"):
        ops.csr_matmul(a, np.ones((3, 2), np.float32), out=np.empty((3, 3), np.float32))
    with pytest.raises(SparseCNNError, match="CSRMatrix"):
        ops.csr_spgemm(a, np.eye(3))
    with pytest.raises(SparseCNNError, match="divide"):
        ops.im2col(np.ones((1, 3, 5, 5)), 3, groups=2)
    # an empty inner dimension gives zeros
    empty = CSRMatrix.from_dense(np.zeros((2, 0), np.float32))
    assert (ops.csr_spgemm(empty, CSRMatrix.from_dense(np.zeros((0, 3), np.float32))) == 0).all()


@pytest.mark.parametrize(("ks", "stride", "padding", "dilation", "groups"), [
    (3, 1, 1, 1, 1), ((5, 3), (2, 1), (2, 0), (1, 2), 2), (1, 2, 0, 1, 4), (11, 4, 2, 1, 1)])
def test_im2col_matches_unfold(ks, stride, padding, dilation, groups) -> None:
    x = torch.randn(2, 4, 19, 17)
    cols = ops.im2col(x, ks, stride, padding, dilation, groups)
    ref = F.unfold(x, ks, dilation=dilation, padding=padding, stride=stride)
    assert_close(cols, ref.reshape(cols.shape).numpy())


# --------------------------------------------------------------------------------------------------
# CUDA (cuBLAS, cuSPARSE): skipped without a CUDA device

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("strategy", CONV)
@pytest.mark.parametrize("case", CONV_CASES[::3], ids=str)
def test_cuda_conv(strategy: str, case: ConvCase) -> None:
    conv, x = _make_conv(case)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # direct has no CUDA kernel: torch fallback, warned
        layer = SparseConv2d.from_dense(conv, strategy, device="cuda")
    y = layer(x.cuda())
    assert y.is_cuda
    # TF32 is off for fp32 matmul by default in torch; allow cuSPARSE's own summation order.
    assert_close(y.cpu(), conv(x).detach(), rtol=1e-4)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("strategy", LINEAR)
@pytest.mark.parametrize("case", LINEAR_CASES, ids=str)
def test_cuda_linear(strategy: str, case: LinearCase) -> None:
    lin, x = _make_linear(case)
    layer = SparseLinear.from_dense(lin, strategy, device="cuda")
    assert_close(layer(x.cuda()).cpu(), F.linear(x, lin.weight, lin.bias).detach())
