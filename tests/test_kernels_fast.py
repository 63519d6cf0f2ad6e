"""The fast kernels (direct sparse convolution, sparse linear) against torch's dense F.conv2d / F.linear."""

from __future__ import annotations

import contextlib

import numba
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsecnn.kernels import conv
from sparsecnn.kernels._simd import GROUP_NV, NV_MAX, VW, fetch_add, span_tile
from sparsecnn.kernels.conv import direct_conv2d, prepare_direct
from sparsecnn.kernels.spmv import prepare_linear, sparse_linear
from tests.conftest import random_sparse
from tests.reference import assert_close

# Filter-group tiles are chosen only where a tile holds 6 vectors per filter (32 vector registers:
# AVX-512VL); with AVX2's 16 registers (2 vectors per filter) the estimate never picks them.
GROUPS_CAN_PAY = GROUP_NV >= 6


@contextlib.contextmanager
def direct_mode(mode: str):
    """Force the direct kernel's form: ``"grouped"`` (filter-group tiles for every layer, however
    small), ``"flat"`` (per-filter tiles only) or ``"auto"`` (the library's choice)."""
    saved = conv._GROUPED_BELOW, conv._GROUPED_MIN_COLUMNS
    if mode == "grouped":
        conv._GROUPED_BELOW, conv._GROUPED_MIN_COLUMNS = 1e9, 0
    elif mode == "flat":
        conv._GROUPED_BELOW = 0.0
    try:
        yield
    finally:
        conv._GROUPED_BELOW, conv._GROUPED_MIN_COLUMNS = saved


def _conv_case(rng, b, cin, cout, hw, k, stride, padding, dilation, groups, sparsity, bias=True):
    w = random_sparse(rng, (cout, cin // groups, *k), sparsity)
    x = rng.standard_normal((b, cin, *hw)).astype(np.float32)
    bv = rng.standard_normal(cout).astype(np.float32) if bias else None
    ref = F.conv2d(torch.from_numpy(x), torch.from_numpy(w), None if bv is None else torch.from_numpy(bv),
                   stride, padding, dilation, groups).numpy()
    prep = prepare_direct(w, groups, stride, padding, dilation)
    out = np.full(ref.shape, np.nan, dtype=np.float32)
    direct_conv2d(prep, x, bv, out)
    assert_close(out, ref, what="direct_conv2d")
    return prep, w, x, bv, ref


CONV_CASES = [
    # b, cin, cout, (h, w), (kh, kw), stride, padding, dilation, groups
    (1, 8, 16, (9, 9), (1, 1), (1, 1), (0, 0), (1, 1), 1),
    (1, 8, 12, (11, 13), (3, 3), (1, 1), (1, 1), (1, 1), 1),
    (3, 6, 10, (13, 9), (3, 3), (2, 2), (1, 1), (1, 1), 2),
    (2, 8, 8, (12, 12), (3, 3), (1, 1), (1, 1), (1, 1), 8),  # depthwise
    (1, 8, 16, (15, 15), (3, 3), (2, 2), (1, 1), (1, 1), 8),  # depthwise, stride 2
    (1, 4, 8, (14, 15), (5, 5), (1, 1), (2, 2), (1, 1), 2),
    (1, 3, 8, (35, 35), (11, 11), (4, 4), (0, 0), (1, 1), 1),  # AlexNet conv1 shape, small
    (2, 5, 7, (17, 16), (3, 3), (1, 1), (2, 2), (2, 2), 1),  # dilation 2
    (1, 4, 6, (10, 11), (3, 2), (2, 1), (0, 2), (1, 2), 1),  # asymmetric everything
    (3, 16, 8, (7, 7), (1, 1), (2, 2), (0, 0), (1, 1), 1),  # 1x1 stride 2 (ResNet downsample)
    (1, 6, 6, (5, 5), (3, 3), (4, 4), (2, 2), (1, 1), 3),  # stride 4 on a tiny plane
    (1, 4, 4, (3, 3), (3, 3), (1, 1), (0, 0), (1, 1), 1),  # 1x1 output
    (2, 8, 6, (11, 10), (3, 3), (1, 1), (0, 0), (1, 1), 1),  # no padding, span % 8 == 0: x read in place
    (2, 16, 6, (8, 8), (1, 1), (1, 1), (0, 0), (1, 1), 2),  # 1x1 read in place, grouped
    (2, 4, 6, (21, 38), (3, 3), (2, 2), (1, 1), (1, 1), 1),  # stride-2 rows of >= 8: vector even lanes
    (1, 3, 5, (17, 33), (1, 1), (2, 2), (0, 0), (1, 1), 1),  # ... whose last row ends x (scalar there)
    (2, 3, 8, (67, 70), (11, 11), (4, 4), (0, 0), (1, 1), 1),  # stride-4 rows of >= 16: every 4th lane
    (1, 4, 6, (26, 53), (5, 5), (3, 3), (2, 2), (1, 1), 2),  # stride-3 rows of >= 16, grouped
    (2, 3, 5, (40, 70), (3, 5), (2, 4), (1, 2), (1, 1), 1),  # strides 2 down, 4 across
]


@pytest.mark.parametrize("mode", ["auto", "grouped"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"b{c[0]}c{c[1]}-{c[2]}k{c[4]}s{c[5]}g{c[8]}")
def test_direct_conv_matches_torch(case, sparsity, mode, rng):
    from sparsecnn.kernels.depthwise import is_depthwise

    with direct_mode(mode):
        prep, *_ = _conv_case(rng, *case, sparsity)
    if mode == "grouped" and not is_depthwise(prep):  # depthwise layers run kernels.depthwise
        assert (next(iter(prep._workspaces.values())).grouped is not None) == (prep.nnz > 0)


@pytest.mark.parametrize("case", [
    # b, cin, cout, (h, w), (kh, kw), stride, padding, dilation, groups
    (2, 12, 6, (9, 9), (3, 3), (1, 1), (1, 1), (1, 1), 2),  # 3 filters per conv group: an empty slot
    (1, 40, 9, (23, 23), (3, 3), (1, 1), (1, 1), (1, 1), 1),  # 9 filters: a group of one
    (1, 8, 8, (27, 27), (5, 5), (1, 1), (2, 2), (1, 1), 2),  # AlexNet conv2-like, several row groups
    (3, 16, 20, (11, 10), (3, 3), (2, 2), (1, 1), (1, 1), 4),  # strided, grouped, batch 3
])
@pytest.mark.parametrize("l1", [1 << 20, 1])
def test_direct_conv_filter_groups(case, l1, rng, monkeypatch):
    """The filter-group form (group_tile): empty filters and slots, every pattern of four filters,
    channel blocks (one channel each with l1=1) and several row groups, against torch, with and
    without bias and ReLU, bound or not."""
    from sparsecnn.kernels.conv import bind_direct_conv2d

    monkeypatch.setattr(conv, "_L1_BYTES", l1)
    monkeypatch.setattr(conv, "_L2_BYTES", 4096)  # several row groups on the larger planes
    b, cin, cout, hw, k, stride, padding, dilation, groups = case
    w = random_sparse(rng, (cout, cin // groups, *k), 0.5)
    w[1] = 0.0  # an all-zero filter inside a group
    x = rng.standard_normal((b, cin, *hw)).astype(np.float32)
    bv = rng.standard_normal(cout).astype(np.float32)
    with direct_mode("grouped"):
        prep = prepare_direct(w, groups, stride, padding, dilation)
        ws = prep.workspace(x.shape)
    g = ws.grouped
    assert g is not None and g.nblk == (cin // groups if l1 == 1 else 1)
    pats = np.diff(g.cptr.reshape(-1, 16), axis=1)
    assert pats.sum() == g.offsets.size and g.weights.size == prep.nnz
    assert np.array_equal(np.sort(g.weights), np.sort(prep.data))
    assert sorted(g.filters[g.filters >= 0].tolist()) == list(range(cout))
    for bias, relu in ((bv, False), (None, True), (bv, True)):
        bt = None if bias is None else torch.from_numpy(bias)
        ref = F.conv2d(torch.from_numpy(x), torch.from_numpy(w), bt, stride, padding, dilation, groups)
        ref = (torch.relu(ref) if relu else ref).numpy()
        out = np.full(ref.shape, np.nan, dtype=np.float32)
        direct_conv2d(prep, x, bias, out, relu=relu)
        assert_close(out, ref, what="grouped direct_conv2d")
        bound = np.full(ref.shape, np.nan, dtype=np.float32)
        bind_direct_conv2d(prep, x.shape, bias, bound, relu)(x)
        np.testing.assert_array_equal(bound, out)


def test_direct_conv_picks_filter_groups_at_moderate_sparsity_only(rng):
    """The library's choice: filter-group tiles at Deep Compression's conv density, on a plane that
    needs several per-filter tiles (AlexNet conv2-like) as on one that a single tile covers (13x13,
    AlexNet conv3-5), at any batch; per-filter tiles at 90% sparsity and on a 1x1 layer (one tap per
    channel: too few columns). With 16 vector registers (AVX2: ``GROUP_NV`` = 2 vectors per filter)
    the group tiles' broadcasts and offsets are spread over too few vectors, so the estimate keeps the
    per-filter tiles everywhere."""
    def form(shape, k, sparsity, batch=1):
        w = random_sparse(rng, (shape[1], shape[0], k, k), sparsity)
        prep = prepare_direct(w, 1, (1, 1), ((k - 1) // 2, (k - 1) // 2), (1, 1))
        return prep.workspace((batch, shape[0], shape[2], shape[2])).grouped is not None

    # AlexNet conv2-like (27x27: several per-filter tiles)
    assert form((48, 64, 27), 5, 0.62) == GROUPS_CAN_PAY
    assert not form((48, 64, 27), 5, 0.9)
    # 13x13: one per-filter tile would cover a row group
    assert form((192, 64, 13), 3, 0.63) == GROUPS_CAN_PAY
    assert form((192, 64, 13), 3, 0.63, batch=8) == GROUPS_CAN_PAY
    assert not form((192, 64, 13), 3, 0.9)
    assert not form((512, 64, 28), 1, 0.63)


def test_direct_conv_without_bias_and_empty_filters(rng):
    w = random_sparse(rng, (12, 8, 3, 3), 0.7)
    w[[0, 5, 11]] = 0.0  # all-zero filters, first and last included
    x = rng.standard_normal((2, 8, 10, 10)).astype(np.float32)
    prep = prepare_direct(w, 1, (1, 1), (1, 1), (1, 1))
    out = np.full((2, 12, 10, 10), np.nan, dtype=np.float32)
    direct_conv2d(prep, x, None, out)
    assert_close(out, F.conv2d(torch.from_numpy(x), torch.from_numpy(w), padding=1).numpy())
    assert not out[:, [0, 5, 11]].any()


@pytest.mark.parametrize("case", [
    # b, cin, cout, (h, w), (kh, kw), stride, padding, dilation, groups
    (1, 256, 13, (13, 13), (3, 3), (1, 1), (1, 1), (1, 1), 1),  # AlexNet conv3-like: blocks by L1
    (2, 96, 10, (11, 9), (5, 5), (1, 1), (2, 2), (1, 1), 2),  # grouped, 5x5, batch 2
    (1, 64, 9, (15, 15), (3, 3), (2, 2), (1, 1), (1, 1), 1),  # stride 2: phase planes in the window
    (1, 512, 6, (5, 5), (1, 1), (1, 1), (0, 0), (1, 1), 1),  # 1x1: blocks, no direct store into out
])
@pytest.mark.parametrize("l1", [24 * 1024, 2048, 1])
def test_direct_conv_input_channel_blocks(case, l1, rng, monkeypatch):
    # Small L1 budgets force many channel blocks (down to one channel each), each filter pair
    # accumulating its tile across them; the default budget gives a few on the first case.
    monkeypatch.setattr(conv, "_L1_BYTES", l1)
    monkeypatch.setattr(conv, "_MIN_BLOCK_NNZ", 1)
    monkeypatch.setattr(conv, "_GROUPED_BELOW", 0.0)  # the per-filter form's blocks
    prep, *_ = _conv_case(rng, *case, 0.6)
    ws = next(iter(prep._workspaces.values()))
    nblk = ws.bptr.shape[0]
    if l1 < 24 * 1024 or case[1] == 256:
        assert nblk > 1
    # Block-major runs: every (block, filter) run holds that filter's nonzeros of that block, and
    # the runs tile the nonzeros in order.
    assert ws.bptr[0, 0] == 0 and ws.bptr[-1, -1] == prep.nnz
    assert (ws.bptr[1:, 0] == ws.bptr[:-1, -1]).all()
    counts = np.diff(ws.bptr, axis=1).sum(axis=0)
    assert (counts == np.diff(prep.indptr)).all()
    assert np.array_equal(np.sort(ws.data), np.sort(prep.data))


def test_direct_conv_few_nonzeros_per_block_stays_unblocked(rng):
    # At ~6 nonzeros per filter a second block would cost more than its L1 reuse saves.
    prep, *_ = _conv_case(rng, 1, 64, 16, (8, 8), (1, 1), (1, 1), (0, 0), (1, 1), 1, 0.9)
    assert next(iter(prep._workspaces.values())).bptr.shape[0] == 1


def test_direct_conv_int32_indices(rng):
    # Cin * kh * kw = 4100 * 9 > 32768: the tap index no longer fits int16.
    prep, *_ = _conv_case(rng, 1, 4100, 3, (4, 4), (3, 3), (1, 1), (1, 1), (1, 1), 1, 0.9)
    assert prep.indices.dtype == np.int32


def test_direct_conv_nbytes_and_dtypes(rng):
    w = random_sparse(rng, (16, 8, 3, 3), 0.75)
    prep = prepare_direct(w, 1, (1, 1), (1, 1), (1, 1))
    nnz = int(np.count_nonzero(w))
    assert prep.indices.dtype == np.int16 and prep.indptr.dtype == np.int32 and prep.data.dtype == np.float32
    assert prep.nnz == nnz
    assert prep.nbytes == 17 * 4 + nnz * 2 + nnz * 4


def test_direct_conv_reuses_workspace_and_handles_new_shapes(rng):
    w = random_sparse(rng, (8, 4, 3, 3), 0.5)
    prep = prepare_direct(w, 1, (1, 1), (1, 1), (1, 1))
    for shape in [(1, 4, 9, 9), (1, 4, 9, 9), (2, 4, 7, 12), (1, 4, 9, 9)]:
        x = rng.standard_normal(shape).astype(np.float32)
        ref = F.conv2d(torch.from_numpy(x), torch.from_numpy(w), padding=1).numpy()
        out = np.empty_like(ref)
        direct_conv2d(prep, x, None, out)
        assert_close(out, ref)
    assert len(prep._workspaces) == 2  # one per input shape (and thread count), not one per call


def test_direct_conv_thread_counts_and_strided_out(rng):
    w = random_sparse(rng, (9, 6, 3, 3), 0.6)
    x = rng.standard_normal((2, 6, 8, 8)).astype(np.float32)
    ref = F.conv2d(torch.from_numpy(x), torch.from_numpy(w), padding=1).numpy()
    prep = prepare_direct(w, 1, (1, 1), (1, 1), (1, 1))
    before = numba.get_num_threads()
    try:
        for threads in (1, before):
            numba.set_num_threads(threads)
            big = np.zeros((2, 9, 8, 16), dtype=np.float32)
            out = big[:, :, :, ::2]  # a non-contiguous output view
            direct_conv2d(prep, x, None, out)
            assert_close(out, ref)
            assert not big[:, :, :, 1::2].any()
    finally:
        numba.set_num_threads(before)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    b=st.integers(1, 3),
    cin_g=st.integers(1, 5),
    cout_g=st.integers(1, 5),
    groups=st.integers(1, 3),
    h=st.integers(1, 14),
    w=st.integers(1, 14),
    kh=st.integers(1, 5),
    kw=st.integers(1, 5),
    sh=st.integers(1, 4),
    sw=st.integers(1, 4),
    ph=st.integers(0, 3),
    pw=st.integers(0, 3),
    dh=st.integers(1, 3),
    dw=st.integers(1, 3),
    sparsity=st.sampled_from([0.0, 0.3, 0.8, 0.95, 1.0]),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
    mode=st.sampled_from(["auto", "grouped"]),
)
def test_direct_conv_random_configs(b, cin_g, cout_g, groups, h, w, kh, kw, sh, sw, ph, pw, dh, dw,
                                    sparsity, bias, seed, mode):
    if h + 2 * ph < dh * (kh - 1) + 1 or w + 2 * pw < dw * (kw - 1) + 1:
        return  # torch rejects an empty output; the layer never builds one
    rng = np.random.default_rng(seed)
    with direct_mode(mode):
        _conv_case(rng, b, cin_g * groups, cout_g * groups, (h, w), (kh, kw), (sh, sw), (ph, pw), (dh, dw),
                   groups, sparsity, bias)


def _linear_case(rng, batch, m, k, sparsity, bias=True):
    w = random_sparse(rng, (m, k), sparsity)
    x = rng.standard_normal((batch, k)).astype(np.float32)
    bv = rng.standard_normal(m).astype(np.float32) if bias else None
    ref = F.linear(torch.from_numpy(x), torch.from_numpy(w), None if bv is None else torch.from_numpy(bv))
    prep = prepare_linear(w)
    out = np.full((batch, m), np.nan, dtype=np.float32)
    sparse_linear(prep, x, bv, out)
    assert_close(out, ref.numpy(), what="sparse_linear")
    return prep


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("batch", [1, 3, 8, 16, 33])  # 8-lane rows up to 8, VW-lane above
@pytest.mark.parametrize(("m", "k"), [(1, 1), (7, 5), (130, 257), (64, 1000)])
def test_sparse_linear_matches_torch(batch, m, k, sparsity, rng):
    _linear_case(rng, batch, m, k, sparsity, bias=(m + batch) % 2 == 0)


@pytest.mark.parametrize("batch", [1, 4])
def test_sparse_linear_index_dtypes_and_nbytes(batch, rng):
    small = _linear_case(rng, batch, 9, 65536, 0.99)
    assert small.indices.dtype == np.uint16
    big = _linear_case(rng, batch, 3, 65537, 0.99)
    assert big.indices.dtype == np.uint32
    nnz = big.nnz
    assert big.nslabs == 17 and big.slab == 3856  # 65537 columns in 17 equal slabs of at most SLAB
    assert big.nbytes == 4 * (17 * 3 + 1) + nnz * 4 + nnz * 4


@pytest.mark.parametrize("batch", [1, 3, 9])
@pytest.mark.parametrize("slab", [1, 7, 64])
def test_sparse_linear_column_slabs_match_torch(batch, slab, rng):
    """Column slabs (the stacked slab-major CSR): spmv and spmm, with an empty row, an all-zero slab,
    ReLU fused and the bound callable, against torch; the dense weight round-trips."""
    from sparsecnn.kernels.spmv import bind_sparse_linear

    m, k = 37, 200
    w = random_sparse(rng, (m, k), 0.7)
    w[5] = 0.0
    w[:, 64:140] = 0.0  # whole slabs without a nonzero
    prep = prepare_linear(w, slab=slab)
    assert 0 < prep.slab <= slab and prep.nslabs == -(-k // prep.slab)
    assert prep.indptr.size == prep.nslabs * m + 1
    assert np.array_equal(prep.indices.astype(np.int64) // prep.slab,
                          np.repeat(np.arange(prep.nslabs * m) // m, np.diff(prep.indptr)))
    dense = np.zeros_like(w)
    dense[prep.row_ids(), prep.indices.astype(np.int64)] = prep.data
    assert np.array_equal(dense, w)
    x = rng.standard_normal((batch, k)).astype(np.float32)
    bv = rng.standard_normal(m).astype(np.float32)
    ref = torch.relu(F.linear(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(bv))).numpy()
    out = np.full((batch, m), np.nan, dtype=np.float32)
    sparse_linear(prep, x, bv, out, relu=True)
    assert_close(out, ref, what="slabbed sparse_linear")
    bound = np.full((batch, m), np.nan, dtype=np.float32)
    bind_sparse_linear(prep, batch, bv, bound, relu=True)(x)
    np.testing.assert_array_equal(bound, out)


def test_sparse_linear_slabs_by_default_above_slab_columns(rng):
    from sparsecnn.kernels.spmv import SLAB

    w = random_sparse(rng, (6, 2 * SLAB + 1), 0.95)
    prep = prepare_linear(w)
    assert prep.nslabs == 3 and prep.slab == -(-(2 * SLAB + 1) // 3)
    assert prepare_linear(w, slab=0).nslabs == 1 and prepare_linear(w[:, :SLAB]).slab == 0
    x = rng.standard_normal((1, w.shape[1])).astype(np.float32)
    out = np.empty((1, 6), np.float32)
    sparse_linear(prep, x, None, out)
    assert_close(out, x @ w.T)


def test_linear_prep_with_a_wrong_slab_is_one_clear_error(rng):
    from sparsecnn import SparseLinear
    from sparsecnn.errors import SparseCNNError

    w = random_sparse(rng, (8, 40), 0.5)
    good = prepare_linear(w, slab=16)
    layer = SparseLinear.from_format(good, "spmv", in_features=40, out_features=8)
    assert np.array_equal(layer.dense_parameters()[0], w)
    bad = prepare_linear(w, slab=16)
    assert good.slab == 14 and good.nslabs == 3
    bad.slab = 15  # still 3 slabs, but the stored columns no longer lie in their slabs
    with pytest.raises(SparseCNNError, match="outside their slab"):
        SparseLinear.from_format(bad, "spmv", in_features=40, out_features=8)
    bad.slab = -1
    with pytest.raises(SparseCNNError, match="slab must be"):
        SparseLinear.from_format(bad, "spmv", in_features=40, out_features=8)


def test_sparse_linear_empty_rows(rng):
    w = random_sparse(rng, (10, 20), 0.5)
    w[[0, 3, 9]] = 0.0
    x = rng.standard_normal((2, 20)).astype(np.float32)
    bv = rng.standard_normal(10).astype(np.float32)
    for batch in (1, 2):
        prep = prepare_linear(w)
        out = np.empty((batch, 10), dtype=np.float32)
        sparse_linear(prep, x[:batch], bv, out)
        assert_close(out, x[:batch] @ w.T + bv)
        assert np.array_equal(out[:, [0, 3, 9]], np.broadcast_to(bv[[0, 3, 9]], (batch, 3)))


@numba.njit(cache=False)
def _span_tile_call(x, offs, data, k0, k1, base, w, wpos, nvec, nvalid, init, accumulate, ostride):
    span_tile(x, offs, data, k0, k1, base, w, wpos, nvec, nvalid, init, accumulate, ostride, False)


@pytest.mark.parametrize("nvec", [1, 2, 5, 8, NV_MAX])
@pytest.mark.parametrize("offs_dtype", [np.int16, np.int32, np.uint16])
def test_span_tile_register_micro_kernel(nvec, offs_dtype, rng):
    # The LLVM-IR micro-kernel both kernels run on, against numpy: every vector count, signed and
    # unsigned offsets, a row stride, accumulate on/off and a partial last vector.
    x = rng.standard_normal(4000).astype(np.float32)
    nnz = 37
    offs = rng.integers(0, 300, nnz).astype(offs_dtype)
    data = rng.standard_normal(nnz).astype(np.float32)
    k0, k1, base, stride = 3, 31, 5, 7
    n = nvec * VW
    starts = [base + stride * int(o) for o in offs[k0:k1]]
    span = data[k0:k1, None] * np.stack([x[s : s + n] for s in starts])
    for accumulate, nvalid in ((False, n), (True, n), (False, n - 3), (False, n + 100)):
        w = rng.standard_normal(n + 20).astype(np.float32)
        before = w.copy()
        _span_tile_call(x, offs, data, k0, k1, base, w, 4, nvec, nvalid, np.float32(0.5), accumulate, stride)
        start = before[4:4 + n] if accumulate else np.full(n, 0.5, np.float32)
        m = min(nvalid, n)
        np.testing.assert_allclose(w[4:4 + m], (start + span.sum(axis=0))[:m], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(w[:4], before[:4])  # nothing outside [wpos, wpos + nvalid)
        np.testing.assert_array_equal(w[4 + m:], before[4 + m:])
    w = np.zeros(n, np.float32)
    _span_tile_call(x, offs, data, 5, 5, 0, w, 0, nvec, n, np.float32(2.0), False, 1)  # no nonzeros
    assert (w == 2.0).all()


@pytest.mark.parametrize(("hw", "k", "padding"), [((56, 56), (1, 1), (0, 0)), ((9, 20), (3, 3), (1, 1))])
def test_direct_conv_long_planes_many_groups(hw, k, padding, rng):
    # Planes long enough for several L2 groups and register tiles per group; the 1x1 case stores the
    # tiles straight into the output (wide rows == output rows), the 3x3 one through the wide buffer.
    _conv_case(rng, 2, 96, 10, hw, k, (1, 1), padding, (1, 1), 1, 0.7)


@pytest.mark.parametrize("serial", [True, False], ids=["serial", "parallel"])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("case", CONV_CASES[::2], ids=lambda c: f"b{c[0]}c{c[1]}-{c[2]}k{c[4]}s{c[5]}g{c[8]}")
def test_bound_direct_conv_equals_direct_conv(case, relu, serial, rng, monkeypatch):
    """The executor's bound conv (serial twins below the work threshold, parallel above) computes
    what direct_conv2d computes, call after call, with non-contiguous inputs too."""
    monkeypatch.setattr(conv, "_SERIAL_MACS", 1 << 40 if serial else 0)
    prep, _w, x, bv, ref = _conv_case(rng, *case, 0.6)
    out = np.full(ref.shape, np.nan, dtype=np.float32)
    run = conv.bind_direct_conv2d(prep, x.shape, bv, out, relu)
    want = np.maximum(ref, 0) if relu else ref
    for trial in range(3):
        xi = x if trial < 2 else np.asfortranarray(x)
        out[...] = np.nan
        run(xi)
        assert_close(out, want, what=f"bound direct_conv2d call {trial}")
    with pytest.raises(ValueError, match="C-contiguous"):
        conv.bind_direct_conv2d(prep, x.shape, bv, np.empty((1, 1, 1, 1), np.float32))


@pytest.mark.parametrize("serial", [True, False], ids=["serial", "parallel"])
@pytest.mark.parametrize("batch", [1, 5])
def test_bound_sparse_linear_equals_sparse_linear(batch, serial, rng, monkeypatch):
    from sparsecnn.kernels import spmv

    monkeypatch.setattr(spmv, "_SERIAL_MACS", 1 << 40 if serial else 0)
    w = random_sparse(rng, (37, 300), 0.8)
    x = rng.standard_normal((batch, 300)).astype(np.float32)
    b = rng.standard_normal(37).astype(np.float32)
    prep = prepare_linear(w)
    for relu in (False, True):
        want = np.empty((batch, 37), np.float32)
        sparse_linear(prep, x, b, want, relu=relu)
        out = np.full((batch, 37), np.nan, dtype=np.float32)
        run = spmv.bind_sparse_linear(prep, batch, b, out, relu)
        for _ in range(2):
            run(x)
            np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("mode", ["grouped", "flat"])
@pytest.mark.parametrize("sparsity", [0.0, 0.6, 1.0])
@pytest.mark.parametrize("batch", [1, 2, 8, 9, 33])  # the lanes: one vector, whole vectors, a ragged one
@pytest.mark.parametrize(("m", "k"), [(1, 1), (7, 5), (130, 257), (64, 1000)])
def test_direct_linear_matches_torch(batch, m, k, sparsity, mode, rng):
    """The linear layer as a 1x1 direct conv over the batch (``kernels.direct_linear``), in both of
    the direct kernel's forms, with and without bias and ReLU, against torch; the bound form gives the
    same values bit for bit, call after call, and leaves the pad lanes out of the output."""
    from sparsecnn.kernels.direct_linear import bind_direct_linear, direct_linear, prepare_direct_linear

    w = random_sparse(rng, (m, k), sparsity)
    x = rng.standard_normal((batch, k)).astype(np.float32)
    bv = rng.standard_normal(m).astype(np.float32) if (m + batch) % 2 == 0 else None
    ref = F.linear(torch.from_numpy(x), torch.from_numpy(w), None if bv is None else torch.from_numpy(bv))
    with direct_mode(mode):
        prep = prepare_direct_linear(w)
        for relu in (False, True):
            want = torch.relu(ref) if relu else ref
            out = np.full((batch, m), np.nan, dtype=np.float32)
            direct_linear(prep, x, bv, out, relu=relu)
            assert_close(out, want.numpy(), what=f"direct_linear relu={relu}")
            bound = np.full((batch, m), np.nan, dtype=np.float32)
            run = bind_direct_linear(prep, batch, bv, bound, relu)
            for _ in range(2):
                run(x)
                np.testing.assert_array_equal(bound, out)


def test_planner_offers_the_batch_lanes_linear_from_batch_2():
    from sparsecnn.plan import _candidates, estimate_seconds

    lin = torch.nn.Linear(64, 32)
    assert "direct" not in _candidates(lin, 1) and "spmv" in _candidates(lin, 1)
    assert "direct" in _candidates(lin, 2) and "direct" in _candidates(lin, 32)
    # the cost model counts whole vectors of batch items: 1 to VW items cost the same
    assert estimate_seconds(lin, (1, 64), "direct") == estimate_seconds(lin, (VW, 64), "direct")
    assert estimate_seconds(lin, (VW + 1, 64), "direct") > estimate_seconds(lin, (VW, 64), "direct")


def test_direct_linear_bad_output_is_one_clear_error(rng):
    from sparsecnn.kernels.direct_linear import bind_direct_linear, prepare_direct_linear

    prep = prepare_direct_linear(random_sparse(rng, (6, 10), 0.5))
    with pytest.raises(ValueError, match="C-contiguous of shape"):
        bind_direct_linear(prep, 3, None, np.empty((3, 5), np.float32))


@pytest.mark.parametrize("shape", [(1, 3, 9, 11), (2, 64, 40, 40), (3, 5, 8, 8), (16, 64, 8, 7)],
                         ids=["serial", "parallel", "tiny-serial", "tiny-parallel"])
def test_bound_pools_equal_torch(shape, rng):
    from sparsecnn.kernels import elementwise as E

    x = rng.standard_normal(shape).astype(np.float32)
    x.flat[7] = np.nan
    xt = torch.from_numpy(x)
    ref = F.max_pool2d(xt, 3, 2, 1).numpy()
    out = np.empty_like(ref)
    E.bind_max_pool2d(x.shape, out, (3, 3), (2, 2), (1, 1), (1, 1))(x)
    np.testing.assert_array_equal(out, ref)
    g = np.empty(shape[:2], np.float32)
    x[0, 0, 0, 0] = 1.0  # keep one plane NaN-free and one with a NaN
    E.bind_global_avg_pool(x.shape, g)(x)
    want = torch.from_numpy(x).mean((2, 3)).numpy()
    assert np.isnan(g).sum() == np.isnan(want).sum() == 1  # the NaN's plane, as torch
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("channels", [1, 4, 5, 6, 17])
@pytest.mark.parametrize(("size", "beta", "k"),
                         [(5, 0.75, 1.0), (5, 0.5, 2.0), (3, 0.75, 1.0), (6, 0.75, 1.0), (1, 0.6, 1.0)])
def test_lrn_matches_torch(channels, size, beta, k, rng):
    """The LRN kernel against torch: the in-register window of five, the edge channels' buffered
    window, other sizes and powers, a batch, pixel runs of odd length; a NaN stays in its channel's
    window only."""
    from sparsecnn.kernels.lrn import lrn_across_channels

    x = (np.abs(rng.standard_normal((3, channels, 7, 9))) * 8).astype(np.float32)
    ref = F.local_response_norm(torch.from_numpy(x), size, 1e-3, beta, k).numpy()
    out = np.full_like(x, np.nan)
    lrn_across_channels(x, size, 1e-3, beta, k, out)
    assert_close(out, ref, what="lrn")
    x[1, channels // 2, 3, 4] = np.nan
    lrn_across_channels(x, size, 1e-3, beta, k, out)
    ref = F.local_response_norm(torch.from_numpy(x), size, 1e-3, beta, k).numpy()
    np.testing.assert_array_equal(np.isnan(out), np.isnan(ref))


@pytest.mark.parametrize("hw", [(14, 14), (7, 7), (5, 3)])
def test_direct_reads_unpadded_input_in_place_only_when_the_tail_is_readable(hw, rng):
    """A stride-1 layer without padding whose planes are not a whole number of vectors reads its input
    in place when the floats after it are readable (the executor's slack, or the same memory page),
    and copies it when the input ends at a page boundary; both match torch."""
    from sparsecnn.kernels.conv import SLACK, _reads_in_place, bind_direct_conv2d

    cin, cout = 24, 16
    w = random_sparse(rng, (cout, cin, 1, 1), 0.6)
    n = cin * hw[0] * hw[1]
    page = 4096 // 4
    store = np.zeros(n + 4 * page, dtype=np.float32)
    start = page + -(store.ctypes.data // 4 + n) % page  # x ends exactly at a page boundary
    at_page_end = store[start: start + n].reshape(1, cin, *hw)
    mid_page = store[start - 64: start - 64 + n].reshape(1, cin, *hw)  # 256 bytes before the boundary
    ref_fn = lambda x: F.conv2d(torch.from_numpy(x), torch.from_numpy(w)).numpy()  # noqa: E731
    prep = prepare_direct(w, 1, (1, 1), (0, 0), (1, 1))
    ws = prep.workspace((1, cin, *hw))
    assert ws.in_place and not ws.identity  # 196, 49 and 15 positions: not whole vectors
    for x, tail_readable in ((mid_page, True), (at_page_end, False)):
        x[...] = rng.standard_normal(x.shape)
        assert _reads_in_place(ws, x, 0) is tail_readable
        assert _reads_in_place(ws, x, SLACK)
        out = np.full((1, cout, *hw), np.nan, dtype=np.float32)
        direct_conv2d(prep, x, None, out)
        assert_close(out, ref_fn(x), what="direct_conv2d")
        out[...] = np.nan
        bind_direct_conv2d(prep, x.shape, None, out, False, slack=0)(x)
        assert_close(out, ref_fn(x), what="bind_direct_conv2d")


@pytest.mark.parametrize("hw", [(14, 14), (7, 7), (5, 3)])
@pytest.mark.parametrize("batch", [1, 4])
def test_direct_conv_copies_onto_whole_vector_planes_where_channels_are_read_often(hw, batch, rng,
                                                                                    monkeypatch):
    """A 1x1 layer whose planes are not whole vectors, with many nonzeros per input channel, copies its
    input onto planes of whole vectors (every span load on a line) instead of reading it in place;
    with few it reads in place. Both match torch, bound or not, with a fused residual and ReLU."""
    from sparsecnn.kernels.conv import SLACK, bind_direct_conv2d

    cin, cout = 8, 128
    w = random_sparse(rng, (cout, cin, 1, 1), 0.2)  # ~102 nonzeros per input channel
    bv = rng.standard_normal(cout).astype(np.float32)
    x = rng.standard_normal((batch, cin, *hw)).astype(np.float32)
    res = rng.standard_normal((batch, cout, *hw)).astype(np.float32)
    conv_ref = F.conv2d(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(bv)).numpy()
    for reads, aligned in ((conv._ALIGN_MIN_READS, True), (1 << 30, False)):
        monkeypatch.setattr(conv, "_ALIGN_MIN_READS", reads)
        prep = prepare_direct(w, 1, (1, 1), (0, 0), (1, 1))
        assert prep.nnz >= 96 * cin
        ws = prep.workspace(x.shape)
        plane = int(ws.geo[4])
        assert ws.in_place is not aligned
        assert plane == (-(-hw[0] * hw[1] // VW) * VW if aligned else hw[0] * hw[1])
        out = np.full(conv_ref.shape, np.nan, dtype=np.float32)
        direct_conv2d(prep, x, bv, out)
        assert_close(out, conv_ref, what=f"direct_conv2d, aligned={aligned}")
        out[...] = np.nan
        bind_direct_conv2d(prep, x.shape, bv, out, True, slack=SLACK)(x, res)
        assert_close(out, np.maximum(conv_ref + res, 0), what=f"bound with residual, aligned={aligned}")


@pytest.mark.parametrize(("batch", "cin", "cout", "hw", "k", "stride", "pad"), [
    (1, 16, 32, (14, 14), 1, 1, 0),  # read in place from padded planes
    (2, 16, 32, (7, 7), 3, 1, 1),  # phase-copied from padded planes
    (1, 8, 16, (14, 14), 3, 2, 1),  # stride 2: even lanes from padded planes
    (4, 8, 24, (7, 7), 1, 2, 0),  # 1x1 stride 2, the threads split the images
    (1, 32, 40, (5, 3), 1, 1, 0),
])
@pytest.mark.parametrize("form", ["flat", "grouped"])
def test_direct_conv_reads_and_writes_planes_padded_to_whole_vectors(batch, cin, cout, hw, k, stride, pad,
                                                                     form, rng):
    """Inputs and outputs (and the residual) whose planes are padded to whole vectors, as the executor
    gives a chain of direct convs: every combination matches torch, whatever the padding lanes hold
    (NaN here), and they are never written; the global average pool reads such planes too."""
    from sparsecnn.kernels._numba import aligned_zeros
    from sparsecnn.kernels.conv import SLACK, bind_direct_conv2d, padded_plane
    from sparsecnn.kernels.elementwise import bind_global_avg_pool

    def padded(a):
        b, c, h, w = a.shape
        p = padded_plane(h, w)
        out = aligned_zeros(b * c * p + SLACK)[: b * c * p].reshape(b, c, p)
        out[...] = np.nan
        out[:, :, : h * w] = a.reshape(b, c, h * w)
        return out

    w = random_sparse(rng, (cout, cin, k, k), 0.5)
    bv = rng.standard_normal(cout).astype(np.float32)
    x = rng.standard_normal((batch, cin, *hw)).astype(np.float32)
    ref = F.conv2d(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(bv), stride, pad).numpy()
    res = rng.standard_normal(ref.shape).astype(np.float32)
    ho, wo = ref.shape[2:]
    with direct_mode(form):
        for pin in (False, True):
            for pout in (False, True):
                prep = prepare_direct(w, 1, (stride, stride), (pad, pad), (1, 1))
                out = padded(np.zeros_like(ref)) if pout else np.zeros_like(ref)
                run = bind_direct_conv2d(prep, x.shape, bv, out, True, slack=SLACK,
                                         in_stride=padded_plane(*hw) if pin else 0,
                                         out_stride=padded_plane(ho, wo) if pout else 0)
                run(padded(x) if pin else x, padded(res) if pout else res)
                got = out[:, :, : ho * wo].reshape(ref.shape) if pout else out
                assert_close(got, np.maximum(ref + res, 0), what=f"in padded {pin}, out padded {pout}")
                if pout:
                    assert np.isnan(out[:, :, ho * wo:]).all()  # the padding lanes: never written
                    mean = np.zeros((batch, cout), np.float32)
                    bind_global_avg_pool(ref.shape, mean, padded_plane(ho, wo))(out)
                    assert_close(mean, got.mean(axis=(2, 3)), what="global average pool")
    with pytest.raises(ValueError, match="padded plane"):
        wrong = padded_plane(ho, wo) + VW
        bind_direct_conv2d(prep, x.shape, bv, np.zeros((batch, cout, wrong), np.float32), out_stride=wrong)


@pytest.mark.parametrize("batch", [1, 5, 4, 9])
@pytest.mark.parametrize("form", ["flat", "grouped"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dynamic", [True, False])
def test_direct_conv_batch_split_and_input_copies(form, threads, batch, dynamic, rng, monkeypatch):
    """Where the threads split the filters (batch 1 or 5 on 2 threads, any batch on 1) the input is
    phase-copied once per image before the kernel; where they split the images (4: even; 9: enough
    images that the uneven last round costs little) each thread copies its own images into its own
    one-image buffer, taking them from a shared counter (``dynamic``) or a static share. Every image
    comes out right in both forms, after a call with another batch of the same shape (no stale copy
    is read)."""
    monkeypatch.setattr(conv, "DYNAMIC_IMAGES", dynamic)
    old = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        with direct_mode(form):
            prep, w, x, bv, ref = _conv_case(rng, batch, 16, 24, (15, 14), (3, 3), (2, 2), (1, 1), (1, 1), 1,
                                             0.5)
            ws = prep.workspace(x.shape)
            assert ws.by_image == (threads == 2 and batch in (4, 9))
            assert ws.counter.size == (1 if ws.by_image and dynamic else 0)
            assert ws.xt.shape[0] == (threads if ws.by_image else batch)
            assert (ws.grouped is not None) == (form == "grouped")
            x2 = rng.standard_normal(x.shape).astype(np.float32)
            ref2 = F.conv2d(torch.from_numpy(x2), torch.from_numpy(w), torch.from_numpy(bv), (2, 2),
                            (1, 1)).numpy()
            out = np.full(ref.shape, np.nan, dtype=np.float32)
            direct_conv2d(prep, x2, bv, out)
            assert_close(out, ref2, what="second batch")
            run = conv.bind_direct_conv2d(prep, x.shape, bv, out)
            run(x)
            assert_close(out, ref, what="bound, first batch again")
    finally:
        numba.set_num_threads(old)


@numba.njit(parallel=True)
def _take_items(counter, taken, spin):
    counter[0] = 0
    for part in numba.prange(taken.shape[0]):  # more parts than threads: several in each thread
        i = fetch_add(counter, 0, 1)
        while i < taken.shape[1]:
            taken[part, i] += 1  # a row per part: no two threads write one element
            s = 0.0
            for k in range(spin):  # some work between the takes, so that the threads overlap
                s += k * 1e-9
            if s < 0:
                taken[part, i] = -1
            i = fetch_add(counter, 0, 1)


def test_fetch_add_hands_each_item_to_one_thread():
    """The shared counter behind the dynamic image split: every item taken exactly once, by parts that
    run at the same time (a non-atomic read-add-write would hand some out twice)."""
    old = numba.get_num_threads()
    numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    try:
        counter = np.zeros(1, np.int64)
        for spin in (0, 200, 2000):
            taken = np.zeros((8, 3000), np.int64)
            _take_items(counter, taken, spin)
            assert (taken.sum(axis=0) == 1).all()
            assert counter[0] == taken.shape[1] + taken.shape[0]  # and each part asked once past the end
    finally:
        numba.set_num_threads(old)


def test_vector_width_follows_the_target_cpu(monkeypatch):
    """16-wide tiles only where the CPU runs 512-bit FMAs at full rate; 8-wide on Zen 4 (half rate)
    and without AVX-512; the row kernels stay at 8 lanes."""
    from sparsecnn.kernels import _simd

    avx512 = ["+avx2", "+fma", "+avx512f", "+avx512vl"]
    for name, feats, width, regs in (("emeraldrapids", avx512, 16, 32), ("sapphirerapids", avx512, 16, 32),
                                     ("znver4", avx512, 8, 32), ("znver3", ["+avx2", "+fma"], 8, 16),
                                     ("", [], 8, 16)):
        monkeypatch.setattr(_simd, "_target", lambda name=name, feats=feats: (name, feats))
        assert (_simd._vector_width(), _simd._vector_registers()) == (width, regs), name
    assert _simd.RW == 8 and _simd.NV_MAX * _simd.VW in (96, 192)


def test_cache_sizes_from_sysfs_or_default():
    """The channel blocks follow the L1d the OS reports (3/4 of it), with a default where sysfs has
    no such cache."""
    assert conv.cache_bytes_per_core(99, 12345) == 12345
    l1 = conv.cache_bytes_per_core(0, 32 * 1024)
    assert 16 * 1024 <= l1 <= 64 * 1024 * 1024 and conv._L1_BYTES == l1 * 3 // 4


@pytest.mark.parametrize(("cin", "k", "hw", "sparsity", "grouped"), [
    (32, 3, 32, 0.7, True),    # taps around the pixel, 32 x 34 wide positions: filter groups
    (32, 3, 32, 0.95, False),  # a column rarely has two filters: per-filter tiles
    (32, 1, 32, 0.7, False),   # 1x1: left to the few-columns rule
    (32, 3, 12, 0.7, False),   # a small plane (12 x 14 wide positions): too few columns a pass
])
def test_direct_conv_takes_filter_groups_on_wide_planes(cin, k, hw, sparsity, grouped, rng):
    w = random_sparse(rng, (32, cin, k, k), sparsity)
    x = rng.standard_normal((1, cin, hw, hw)).astype(np.float32)
    prep = prepare_direct(w, 1, (1, 1), (k // 2, k // 2), (1, 1))
    out = np.empty(prep.output_shape(x.shape), np.float32)
    direct_conv2d(prep, x, None, out)
    assert (prep.workspace(x.shape).grouped is not None) == (grouped and GROUPS_CAN_PAY)
    ref = F.conv2d(torch.from_numpy(x), torch.from_numpy(w), padding=k // 2).numpy()
    assert_close(out, ref)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(c=st.integers(2, 40), h=st.integers(1, 30), w=st.integers(1, 30), kh=st.integers(1, 5),
       kw=st.integers(1, 5), sh=st.integers(1, 4), sw=st.integers(1, 4), ph=st.integers(0, 2),
       pw=st.integers(0, 2), dh=st.integers(1, 2), dw=st.integers(1, 2), batch=st.sampled_from([1, 2, 3]),
       sparsity=st.sampled_from([0.0, 0.5, 1.0]), act=st.sampled_from(["none", "relu", "clamp"]),
       res=st.booleans(), bias=st.booleans(), padded=st.booleans(),
       threads=st.sampled_from([1, 2]), seed=st.integers(0, 2**16))
def test_depthwise_kernel_matches_torch(c, h, w, kh, kw, sh, sw, ph, pw, dh, dw, batch, sparsity, act, res,
                                        bias, padded, threads, seed):
    """Depthwise layers (``kernels.depthwise``, under the direct strategy) on generated geometry, bound
    and unbound, with ReLU or a clamp (bound only: the executor's fused ReLU6), a residual, planes
    padded to whole vectors, one or two threads; and the same outputs as the direct kernel's general
    path."""
    _check_depthwise(c, h, w, kh, kw, sh, sw, ph, pw, dh, dw, batch, sparsity, act, res, bias, padded,
                     threads, seed)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(c=st.integers(2, 24), h=st.integers(1, 60), w=st.integers(1, 60), s=st.sampled_from([1, 2]),
       p=st.integers(0, 2), batch=st.sampled_from([1, 2]), sparsity=st.sampled_from([0.0, 0.3, 1.0]),
       act=st.sampled_from(["none", "relu", "clamp"]), res=st.booleans(), bias=st.booleans(),
       padded=st.booleans(), threads=st.sampled_from([1, 2]), seed=st.integers(0, 2**16))
def test_depthwise_row_tiles_match_torch(c, h, w, s, p, batch, sparsity, act, res, bias, padded, threads,
                                         seed):
    """The 3x3 stride-1 / stride-2 layers that run the row tiles (``kernels.depthwise.ROW_TILES``,
    ``_simd.dw_tile_3x3_*``: rows of the tile past the plane's last, columns past the row's last in
    masked stores, planes of every width from 1 to 60; at stride 2 reading the plane itself with
    masked loads for the padding, ``S2_PLAIN``, and so at stride 1 on planes no wider than a vector,
    ``S1_PLAIN``): as :func:`test_depthwise_kernel_matches_torch`, and the same with the copies back
    (``S2_PLAIN`` / ``S1_PLAIN`` off) and with the row tiles off."""
    from sparsecnn.kernels import depthwise

    assert depthwise.ROW_TILES and depthwise.S2_PLAIN and depthwise.S1_PLAIN
    for flag in ("", "S2_PLAIN", "S1_PLAIN", "ROW_TILES"):
        with contextlib.ExitStack() as stack:
            if flag:
                stack.callback(setattr, depthwise, flag, True)
                setattr(depthwise, flag, False)
            _check_depthwise(c, h, w, 3, 3, s, s, p, p, 1, 1, batch, sparsity, act, res, bias, padded,
                             threads, seed)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(blocks=st.integers(1, 4), h=st.integers(1, 30), w=st.integers(1, 30), kh=st.integers(1, 5),
       kw=st.integers(1, 5), sh=st.integers(1, 3), sw=st.integers(1, 3), ph=st.integers(0, 2),
       pw=st.integers(0, 2), dh=st.integers(1, 2), dw=st.integers(1, 2), batch=st.sampled_from([1, 2]),
       sparsity=st.sampled_from([0.0, 0.5]), act=st.sampled_from(["none", "relu", "clamp"]),
       in_clamp=st.booleans(), res=st.booleans(), bias=st.booleans(), threads=st.sampled_from([1, 2]),
       rows=st.sampled_from([0, 1, 8]), seed=st.integers(0, 2**16))
def test_blocked_depthwise_matches_torch(blocks, h, w, kh, kw, sh, sw, ph, pw, dh, dw, batch, sparsity, act,
                                         in_clamp, res, bias, threads, rows, seed):
    """Depthwise layers on channel-blocked planes (``kernels.depthwise.bind_depthwise_blocked``: the
    interior columns in pixel tiles, 1 x 3 rows of taps at stride 1 in row tiles, the border columns one
    by one with their own taps) on generated geometry, with ReLU or a clamp, the input clamped as it is
    read, a residual, one or two threads splitting the images, the rows (``rows``: ``BY_ROWS_MIN``, 0
    for ``BY_ROWS`` off) or the (channel block, row) items: as torch."""
    _check_blocked_depthwise(blocks, h, w, kh, kw, sh, sw, ph, pw, dh, dw, batch, sparsity, act, in_clamp,
                             res, bias, threads, rows, True, seed)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(blocks=st.integers(1, 3), h=st.integers(1, 40), w=st.integers(1, 40), kh=st.integers(1, 3),
       pw=st.integers(0, 2), batch=st.sampled_from([1, 2]), act=st.sampled_from(["none", "relu", "clamp"]),
       in_clamp=st.booleans(), res=st.booleans(), threads=st.sampled_from([1, 2]), row3=st.booleans(),
       seed=st.integers(0, 2**16))
def test_blocked_depthwise_stride2_row_tiles(blocks, h, w, kh, pw, batch, act, in_clamp, res, threads, row3,
                                            seed):
    """1 x 3-wide rows of taps at stride 2 (MobileNet's stride-2 layers) on channel-blocked planes: the
    row tiles that load the column two pixels share once (``dwb_tile3s2``; ``ROW3_S2`` off: the general
    pixel tiles), any width: as torch."""
    _check_blocked_depthwise(blocks, h, w, kh, 3, 2, 2, 1, pw, 1, 1, batch, 0.0, act, in_clamp, res, True,
                             threads, 8, row3, seed)


def _check_blocked_depthwise(blocks, h, w, kh, kw, sh, sw, ph, pw, dh, dw, batch, sparsity, act, in_clamp,
                             res, bias, threads, rows, row3, seed):
    """One blocked depthwise layer (``rows``: ``BY_ROWS_MIN``, 0 for ``BY_ROWS`` off; ``row3``:
    ``ROW3_S2``) against torch's grouped conv."""
    from sparsecnn.kernels import depthwise
    from sparsecnn.kernels.blocked import BLOCK, from_blocked_array, to_blocked_array
    from sparsecnn.kernels.depthwise import bind_depthwise_blocked

    if h + 2 * ph < dh * (kh - 1) + 1 or w + 2 * pw < dw * (kw - 1) + 1:
        return
    c = blocks * BLOCK
    rng = np.random.default_rng(seed)
    wt = random_sparse(rng, (c, 1, kh, kw), sparsity)
    x = (2 * rng.standard_normal((batch, c, h, w))).astype(np.float32)
    bv = rng.standard_normal(c).astype(np.float32) if bias else None
    xin = torch.from_numpy(x).clamp(-0.5, 1.0) if in_clamp else torch.from_numpy(x)
    ref = F.conv2d(xin, torch.from_numpy(wt), None if bv is None else torch.from_numpy(bv), (sh, sw),
                   (ph, pw), (dh, dw), c)
    r = rng.standard_normal(tuple(ref.shape)).astype(np.float32)
    if res:
        ref = ref + torch.from_numpy(r)
    clamp = (-0.5, 0.75) if act == "clamp" else None
    ref = ref.clamp_min(0) if act == "relu" else ref.clamp(*clamp) if clamp else ref
    prep = prepare_direct(wt, c, (sh, sw), (ph, pw), (dh, dw))
    before = numba.get_num_threads(), depthwise.BY_ROWS, depthwise.BY_ROWS_MIN, depthwise.ROW3_S2
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    depthwise.BY_ROWS, depthwise.BY_ROWS_MIN, depthwise.ROW3_S2 = rows > 0, max(rows, 1), row3
    try:
        out = np.full(to_blocked_array(ref.numpy()).shape, np.nan, dtype=np.float32)
        run = bind_depthwise_blocked(prep, x.shape, bv, out, relu=act == "relu", clamp=clamp,
                                     in_clamp=(-0.5, 1.0) if in_clamp else None)
        run(to_blocked_array(x)) if not res else run(to_blocked_array(x), to_blocked_array(r))
        assert_close(from_blocked_array(out), ref.numpy(), what="blocked depthwise")
    finally:
        numba.set_num_threads(before[0])
        depthwise.BY_ROWS, depthwise.BY_ROWS_MIN, depthwise.ROW3_S2 = before[1:]


def _check_depthwise(c, h, w, kh, kw, sh, sw, ph, pw, dh, dw, batch, sparsity, act, res, bias, padded,
                     threads, seed):
    relu = act == "relu"
    from sparsecnn.kernels.conv import bind_direct_conv2d, padded_plane
    from sparsecnn.kernels.depthwise import is_depthwise

    if h + 2 * ph < dh * (kh - 1) + 1 or w + 2 * pw < dw * (kw - 1) + 1:
        return
    rng = np.random.default_rng(seed)
    wt = random_sparse(rng, (c, 1, kh, kw), sparsity)
    wt[rng.integers(c)] = 0.0  # an all-zero filter: its output is the bias
    x = rng.standard_normal((batch, c, h, w)).astype(np.float32)
    bv = rng.standard_normal(c).astype(np.float32) if bias else None
    ref = F.conv2d(torch.from_numpy(x), torch.from_numpy(wt), None if bv is None else torch.from_numpy(bv),
                   (sh, sw), (ph, pw), (dh, dw), c)
    r = torch.from_numpy(rng.standard_normal(tuple(ref.shape)).astype(np.float32))
    ref = ((ref + r) if res else ref).clamp_min(0) if relu else (ref + r) if res else ref
    prep = prepare_direct(wt, c, (sh, sw), (ph, pw), (dh, dw))
    assert is_depthwise(prep)
    before = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        out = np.full(ref.shape, np.nan, dtype=np.float32)
        direct_conv2d(prep, x, bv, out, relu=relu, residual=r.numpy() if res else None)
        assert_close(out, ref.numpy(), what="depthwise direct_conv2d")
        ho, wo = ref.shape[2:]
        xs, os_ = (padded_plane(h, w), padded_plane(ho, wo)) if padded else (0, 0)
        xin = x.reshape(batch, c, h * w)
        if padded:
            xin = np.zeros((batch, c, xs), np.float32)
            xin[:, :, : h * w] = x.reshape(batch, c, h * w)
        bound = np.full((batch, c, os_) if padded else ref.shape, np.nan, dtype=np.float32)
        rin = None
        if res:
            rin = np.zeros(bound.shape, np.float32)
            rin.reshape(batch, c, -1)[:, :, : ho * wo] = r.numpy().reshape(batch, c, -1)
        clamp = (-0.5, 0.75) if act == "clamp" else None
        run = bind_direct_conv2d(prep, x.shape, bv, bound, relu, in_stride=xs, out_stride=os_, clamp=clamp)
        run(xin) if rin is None else run(xin, rin)
        got = bound.reshape(batch, c, -1)[:, :, : ho * wo].reshape(ref.shape)
        assert_close(got, (ref.clamp(*clamp) if clamp else ref).numpy(), what="bound depthwise")
        # the input clamped as each channel is copied (a ReLU6 before the layer), x left as it was
        xin_before = xin.copy()
        cin = bind_direct_conv2d(prep, x.shape, bv, bound, relu, in_stride=xs, out_stride=os_,
                                 in_clamp=(0.0, 0.6))
        cin(xin) if rin is None else cin(xin, rin)
        want = F.conv2d(torch.from_numpy(x).clamp(0.0, 0.6), torch.from_numpy(wt),
                        None if bv is None else torch.from_numpy(bv), (sh, sw), (ph, pw), (dh, dw), c)
        want = ((want + r) if res else want).clamp_min(0) if relu else (want + r) if res else want
        got = bound.reshape(batch, c, -1)[:, :, : ho * wo].reshape(ref.shape)
        assert_close(got, want.numpy(), what="depthwise with its input clamped")
        np.testing.assert_array_equal(xin, xin_before)
        with contextlib.ExitStack() as stack:
            stack.callback(setattr, conv, "DEPTHWISE", True)
            conv.DEPTHWISE = False
            general = np.full(ref.shape, np.nan, dtype=np.float32)
            direct_conv2d(prep, x, bv, general, relu=relu, residual=r.numpy() if res else None)
        # two float32 sums of the same kh * kw terms in other orders: within a few roundings of the
        # output's scale (not of each element: a sum that cancels to 0.0139 from terms of 1-5 differed
        # by 1.2e-6)
        assert_close(out, general, rtol=1e-5, what="depthwise against the general path")
    finally:
        numba.set_num_threads(before)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cin=st.integers(1, 3), cexp=st.integers(1, 6), h=st.integers(1, 20), w=st.integers(1, 20),
       kh=st.integers(1, 3), kw=st.integers(1, 3), s=st.integers(1, 2), p=st.integers(0, 1),
       dil=st.integers(1, 2), batch=st.sampled_from([1, 2, 3]),
       act=st.sampled_from(["none", "relu", "clamp"]), in_clamp=st.booleans(), expand_relu=st.booleans(),
       bias=st.booleans(), dropped=st.booleans(), threads=st.sampled_from([1, 2]),
       project=st.sampled_from(["none", "plain", "residual", "relu"]), cout=st.integers(1, 3),
       expand=st.booleans(), seed=st.integers(0, 2**16))
def test_expand_depthwise_matches_torch(cin, cexp, h, w, kh, kw, s, p, dil, batch, act, in_clamp, expand_relu,
                                        bias, dropped, threads, project, cout, expand, seed):
    """A 1x1 conv and the depthwise conv after it in one pass
    (``kernels.expand_depthwise.bind_expand_depthwise_blocked``: the 1x1 layer's rows into a ring of
    three, the depthwise rows from there), and the projecting 1x1 layer after them too (with a residual
    and a ReLU or not), on channel-blocked arrays, generated geometry (taps of at most three rows,
    dilated or not, strides 1-2, rows split between threads or images), with the first 1x1 layer's
    ReLU, the clamp between them, the depthwise layer's ReLU or clamp, some input channels dropped from
    the first 1x1 layer's columns (SSL); without the first 1x1 layer (``expand`` off: the depthwise
    layer reads its input where it lies): as torch."""
    from sparsecnn.engine._layout import _dense_prep
    from sparsecnn.kernels.blocked import BLOCK, from_blocked_array, to_blocked_array
    from sparsecnn.kernels.expand_depthwise import bind_expand_depthwise_blocked, fusable_expand
    from sparsecnn.kernels.implicit_gemm import prepare_implicit_gemm

    if (kh - 1) * dil + 1 > h + 2 * p or (kw - 1) * dil + 1 > w + 2 * p:
        return
    ci, ce, co = cin * BLOCK, cexp * BLOCK, cout * BLOCK
    rng = np.random.default_rng(seed)
    we = rng.standard_normal((ce, ci, 1, 1)).astype(np.float32)
    if dropped:
        we[:, rng.random(ci) < 0.3] = 0.0
    be = rng.standard_normal(ce).astype(np.float32) if bias else None
    wd = rng.standard_normal((ce, 1, kh, kw)).astype(np.float32)
    bd = rng.standard_normal(ce).astype(np.float32) if bias else None
    wp = rng.standard_normal((co, ce, 1, 1)).astype(np.float32)
    bp = rng.standard_normal(co).astype(np.float32)
    x = rng.standard_normal((batch, ci if expand else ce, h, w)).astype(np.float32)
    if expand:
        t = F.conv2d(torch.from_numpy(x), torch.from_numpy(we), None if be is None else torch.from_numpy(be))
        t = t.clamp_min(0) if expand_relu else t
    else:
        t = torch.from_numpy(x)
    t = t.clamp(-0.5, 1.0) if in_clamp else t
    ref = F.conv2d(t, torch.from_numpy(wd), None if bd is None else torch.from_numpy(bd), s, p, dil, ce)
    clamp = (-0.25, 0.75) if act == "clamp" else None
    ref = ref.clamp_min(0) if act == "relu" else ref.clamp(*clamp) if clamp else ref
    r = None
    if project != "none":
        ref = F.conv2d(ref, torch.from_numpy(wp), torch.from_numpy(bp))
        if project != "plain":
            r = rng.standard_normal(tuple(ref.shape)).astype(np.float32)
            ref = ref + torch.from_numpy(r)
        ref = ref.clamp_min(0) if project == "relu" else ref
    if dropped:  # the columns SSL left: a compact weight over the kept input channels
        keep = np.flatnonzero(np.abs(we[:, :, 0, 0]).sum(axis=0))
        eprep = prepare_implicit_gemm(np.ascontiguousarray(we[None, :, keep, 0, 0]), np.arange(ce)[None],
                                      keep[None], we.shape, 1, (1, 1), (0, 0), (1, 1))
    else:
        eprep = _dense_prep(we, (1, 1), (0, 0), (1, 1), prepare_implicit_gemm)
    pprep = _dense_prep(wp, (1, 1), (0, 0), (1, 1), prepare_implicit_gemm)
    dprep = prepare_direct(wd, ce, (s, s), (p, p), (dil, dil))
    assert fusable_expand(eprep, dprep) == ((kh - 1) * dil < 3)  # taps over at most the ring's 3 rows
    if expand and (kh - 1) * dil >= 3:
        return
    before = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        out = np.full(to_blocked_array(ref.numpy()).shape, np.nan, dtype=np.float32)
        run = bind_expand_depthwise_blocked(eprep if expand else None, be, dprep, x.shape, bd, out,
                                            relu=act == "relu", clamp=clamp, expand_relu=expand_relu,
                                            in_clamp=(-0.5, 1.0) if in_clamp else None,
                                            project=None if project == "none" else (pprep, bp),
                                            project_relu=project == "relu")
        run(to_blocked_array(x)) if r is None else run(to_blocked_array(x), to_blocked_array(r))
        assert_close(from_blocked_array(out), ref.numpy(), what="expand + depthwise")
    finally:
        numba.set_num_threads(before)


def test_thread_split_keeps_conv_groups_whole(rng):
    """``balanced_bounds`` with a unit (a conv group's items): a bound near a group's edge moves onto
    it where the parts stay within ``UNIT_SLACK`` of the cost split's largest, and a grouped direct
    conv gives each of two threads one whole conv group (AlexNet conv5's shape, where the cost split
    gave one thread a filter of the other group)."""
    from sparsecnn.kernels._numba import UNIT_SLACK, balanced_bounds

    cost = np.array([1] * 32 + [2] * 32)  # the second group costs twice as much
    assert list(balanced_bounds(cost, 2)) == [0, 40, 64]
    # 8 items (a quarter unit) from the edge, but there one part would cost 64 against 48: left alone
    assert list(balanced_bounds(cost, 2, 32)) == [0, 40, 64] and UNIT_SLACK < 64 / 48 - 1
    cost = np.array([10] * 32 + [11] * 32)  # the cost split puts the bound two items off the edge
    assert list(balanced_bounds(cost, 2)) == [0, 34, 64]
    assert list(balanced_bounds(cost, 2, 32)) == [0, 32, 64]
    assert list(balanced_bounds(cost, 4, 32)) == [0, 17, 32, 49, 64]  # quarters: only the middle moves
    assert list(balanced_bounds(cost, 2, 1)) == list(balanced_bounds(cost, 2, 64)) == [0, 34, 64]

    w = random_sparse(rng, (64, 16, 3, 3), 0.63)
    w[:32, :, 0, 0] = 0.0  # the first group lighter: a cost split would cross into the second
    x = rng.standard_normal((1, 32, 13, 13)).astype(np.float32)
    old = numba.get_num_threads()
    try:
        numba.set_num_threads(2)
        prep = prepare_direct(w, 2, (1, 1), (1, 1), (1, 1))
        out = np.empty(prep.output_shape(x.shape), np.float32)
        direct_conv2d(prep, x, None, out)
        ws = prep.workspace(x.shape)
        bounds = ws.grouped.bounds if ws.grouped is not None else ws.bounds
        per_group = (ws.grouped.filters.shape[0] if ws.grouped is not None else 64) // 2
        assert list(bounds) == [0, per_group, 2 * per_group]
    finally:
        numba.set_num_threads(old)
    ref = F.conv2d(torch.from_numpy(x), torch.from_numpy(w), padding=1, groups=2).numpy()
    assert_close(out, ref)


@pytest.mark.parametrize("dtype", [np.float32, np.int64])
@pytest.mark.parametrize("n", [0, 1, 27, 55, 16, 4104])
def test_thread_rows_give_each_thread_its_own_cache_lines(n, dtype):
    """Per-thread scratch (``thread_rows``): zeroed, at least ``n`` elements a row, and every row
    starting on a cache line of its own, so no line holds two threads' elements."""
    from sparsecnn.kernels._numba import ALIGN_BYTES, thread_rows

    rows = thread_rows(3, n, dtype)
    assert rows.dtype == dtype and rows.flags.c_contiguous and rows.shape[0] == 3 and rows.shape[1] >= n
    assert not rows.any()
    for t in range(3):
        assert rows[t].ctypes.data % ALIGN_BYTES == 0
    assert rows.strides[0] % ALIGN_BYTES == 0
