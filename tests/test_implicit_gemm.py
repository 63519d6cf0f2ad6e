"""The implicit-GEMM kernel of the ``lowered`` strategy against the dense torch convolution."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsecnn.kernels import conv as conv_mod
from sparsecnn.kernels import implicit_gemm as ig_mod
from sparsecnn.kernels._simd import GEMM_MR, GEMM_NV, VW
from sparsecnn.kernels.implicit_gemm import (
    _blocked_kernel,
    _blocked_kernel_serial,
    _implicit_kernel_serial,
    bind_implicit_gemm_conv2d,
    implicit_gemm_conv2d,
    prepare_implicit_gemm,
)
from sparsecnn.layers import SparseConv2d
from tests.reference import assert_close


@pytest.fixture(autouse=True)
def _implicit_forms_only(monkeypatch):
    """These tests pin the implicit GEMM's own forms (spatial, blocked, channel-vector); its Winograd
    form has tests/test_winograd.py."""
    monkeypatch.setattr(ig_mod, "WINOGRAD", False)


def _structured(rng, cout, cin_g, kh, kw, groups, keep_rows, keep_cols):
    """Filters and lowered columns removed per group (SSL's structure), the rest random nonzero."""
    w = rng.standard_normal((cout, cin_g, kh, kw)).astype(np.float32)
    mg, k = cout // groups, cin_g * kh * kw
    low = w.reshape(groups, mg, k)
    for g in range(groups):
        low[g, rng.random(mg) >= keep_rows] = 0
        low[g, :, rng.random(k) >= keep_cols] = 0
    return low.reshape(w.shape)


def _run(w, x, bias, stride, padding, dilation, groups, relu):
    # the layer only gives the LoweredWeight (the bias, possibly NaN, goes to the kernel)
    conv = torch.nn.Conv2d(x.shape[1], w.shape[0], w.shape[2:], stride, padding, dilation, groups, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(w))
    layer = SparseConv2d.from_dense(conv, "lowered")
    fmt = layer.engine.format
    prep = prepare_implicit_gemm(fmt.data, fmt.row_map, fmt.col_index, w.shape, groups, stride, padding,
                                 dilation)
    ref = F.conv2d(torch.from_numpy(x), torch.from_numpy(w), None if bias is None else torch.from_numpy(bias),
                   stride, padding, dilation, groups)
    if relu:
        ref = torch.relu(ref)
    out = np.full(ref.shape, np.nan, dtype=np.float32)
    implicit_gemm_conv2d(prep, x, bias, out, relu=relu)
    return out, ref.numpy(), prep, layer


CASES = [
    # cout, cin, (h, w), (kh, kw), stride, padding, dilation, groups, batch
    (16, 8, (13, 13), (3, 3), (1, 1), (1, 1), (1, 1), 1, 1),  # AlexNet conv3-like
    (10, 6, (27, 27), (5, 5), (1, 1), (2, 2), (1, 1), 2, 2),  # conv2-like, grouped, batch 2
    (7, 3, (35, 35), (11, 11), (4, 4), (0, 0), (1, 1), 1, 1),  # conv1-like: stride 4, rows not / 4
    (12, 8, (15, 14), (3, 3), (2, 2), (1, 1), (1, 1), 1, 3),  # stride 2, odd sizes
    (9, 5, (12, 12), (3, 3), (1, 1), (2, 2), (2, 2), 1, 1),  # dilation 2
    (8, 8, (7, 7), (1, 1), (1, 1), (0, 0), (1, 1), 1, 1),  # pointwise with columns removed
    (6, 4, (1, 1), (3, 3), (1, 1), (1, 1), (1, 1), 2, 1),  # 1x1 input
]


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_implicit_gemm_matches_torch(case, relu, rng) -> None:
    """Against torch; batch 2 splits the images among 2 threads (each copying its own), the others
    the items (one shared copy first)."""
    cout, cin, hw, k, stride, padding, dilation, groups, b = case
    w = _structured(rng, cout, cin // groups, *k, groups, 0.7, 0.5)
    x = rng.standard_normal((b, cin, *hw)).astype(np.float32)
    bias = rng.standard_normal(cout).astype(np.float32)
    out, ref, prep, _ = _run(w, x, bias, stride, padding, dilation, groups, relu)
    assert_close(out, ref, what="implicit_gemm_conv2d")
    assert prep.data.shape[-1] == GEMM_MR
    ws = prep.workspace(x.shape)
    assert ws.xt.shape[0] == (ws.bounds.size - 1 if ws.by_image else b)
    # threads split the images, or one thread runs the layer (serial twin) and copies inside the kernel
    serial = ws.kernel is _implicit_kernel_serial or ws.kernel is _blocked_kernel_serial
    assert ws.by_image == (conv_mod.split_by_image(b, ws.bounds.size - 1) or serial)


@pytest.mark.parametrize("l2", [1 << 30, 1])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("case", CASES[:5])
def test_implicit_gemm_channel_blocks(case, relu, l2, rng, monkeypatch) -> None:
    """The blocked kernel (one channel per block here; with ``l2`` 1, row groups of one row): partial
    sums across blocks, blocks without columns (SSL-removed channels), every item's crop."""
    monkeypatch.setattr(ig_mod, "_L1_BYTES", 1)
    monkeypatch.setattr(ig_mod, "_L2_BYTES", l2)
    monkeypatch.setattr(ig_mod, "_BLOCK_MIN_TILES", 0)
    cout, cin, hw, k, stride, padding, dilation, groups, b = case
    w = _structured(rng, cout, cin // groups, *k, groups, 0.7, 0.5)
    w[:, 1] = 0  # a channel no kept column reads: an empty block
    x = rng.standard_normal((b, cin, *hw)).astype(np.float32)
    bias = rng.standard_normal(cout).astype(np.float32)
    out, ref, prep, _ = _run(w, x, bias, stride, padding, dilation, groups, relu)
    assert_close(out, ref, what="blocked implicit_gemm_conv2d")
    ws = prep.workspace(x.shape)
    assert ws.kernel in (_blocked_kernel, _blocked_kernel_serial) and ws.kblk.shape[1] - 1 == cin // groups
    fewest = -(-GEMM_NV * VW // ws.wph) * ws.wph  # a register tile's rows: the smallest row group
    assert ws.group % ws.wph == 0 and (l2 > 1 or ws.group == fewest or ws.group >= ws.span)
    bound = np.full(ref.shape, np.nan, np.float32)
    bind_implicit_gemm_conv2d(prep, x.shape, bias, bound, relu)(x)
    assert_close(bound, ref, what="bound blocked implicit_gemm_conv2d")


def test_implicit_gemm_removed_filters_are_the_bias_and_nan_is_kept(rng) -> None:
    # a whole group without kept filters, another without kept columns, NaN in a bias: the output
    # channels nothing writes are their (ReLU'd) bias, NaN stays NaN as torch.relu keeps it
    w = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    w[:4] = 0  # group 0: no filter left
    w[4:, 1] = 0
    x = rng.standard_normal((2, 6, 9, 9)).astype(np.float32)
    bias = rng.standard_normal(8).astype(np.float32)
    bias[[0, 5]] = np.nan
    bias[1] = -1.0
    for relu in (False, True):
        out, ref, prep, _ = _run(w, x, bias, (1, 1), (1, 1), (1, 1), 2, relu)
        np.testing.assert_array_equal(np.isnan(out), np.isnan(ref))
        assert_close(np.nan_to_num(out), np.nan_to_num(ref), what="implicit_gemm_conv2d")
        assert set(prep.fill.tolist()) == {0, 1, 2, 3}
    # all-zero filters: no tile at all, every channel is its bias
    out, ref, prep, _ = _run(np.zeros((4, 2, 3, 3), np.float32), x[:, :2], bias[:4], (1, 1), (1, 1), (1, 1),
                             1, False)
    assert prep.data.shape[1] == 0 and prep.fill.size == 4
    np.testing.assert_array_equal(np.isnan(out), np.isnan(ref))
    assert_close(np.nan_to_num(out), np.nan_to_num(ref), what="implicit_gemm_conv2d")


@pytest.mark.parametrize("form", ["spatial", "channel blocks", "channel form"])
@pytest.mark.parametrize("relu", [False, True])
def test_removed_filters_pass_the_residual_through(form, relu, rng, monkeypatch) -> None:
    """A filter pruned whole writes its bias plus the fused residual (then the ReLU), in every form of
    the kernel. Before, such channels got the bias alone: a compiled model whose residual add was fused
    into a ``lowered`` conv with an all-zero filter (found by the generated-model fuzz) was wrong."""
    if form == "channel blocks":
        monkeypatch.setattr(ig_mod, "_L1_BYTES", 1)  # one channel per block: the blocked loop
        monkeypatch.setattr(ig_mod, "_BLOCK_MIN_TILES", 0)
    monkeypatch.setattr(ig_mod, "CHANNEL_FORM", form == "channel form")
    cout = 2 * 4 * VW if form == "channel form" else 8
    k = 3 if form == "channel form" else 1
    w = rng.standard_normal((cout, 4, k, k)).astype(np.float32)
    w[[1, 5]] = 0  # two filters removed whole
    x = rng.standard_normal((2, 4, 5, 5)).astype(np.float32)
    bias = rng.standard_normal(cout).astype(np.float32)
    res = rng.standard_normal((2, cout, 5, 5)).astype(np.float32)
    conv = torch.nn.Conv2d(4, cout, k, padding=k // 2, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(w))
    fmt = SparseConv2d.from_dense(conv, "lowered").engine.format
    prep = prepare_implicit_gemm(fmt.data, fmt.row_map, fmt.col_index, w.shape, 1, (1, 1), (k // 2,) * 2,
                                 (1, 1))
    assert {1, 5} <= set(prep.fill.tolist())
    ws = prep.workspace(x.shape)
    if form == "channel form":
        assert ws.init is not None
    else:
        blocked = ws.kernel in (_blocked_kernel, _blocked_kernel_serial)
        assert ws.init is None and blocked == (form == "channel blocks")
    ref = F.conv2d(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(bias), padding=k // 2).numpy()
    ref = np.maximum(ref + res, 0) if relu else ref + res
    out = np.full(ref.shape, np.nan, dtype=np.float32)
    implicit_gemm_conv2d(prep, x, bias, out, relu=relu, residual=res)
    assert_close(out, ref, what=f"implicit_gemm_conv2d ({form})")
    out[...] = np.nan
    bind_implicit_gemm_conv2d(prep, x.shape, bias, out, relu)(x, res)
    assert_close(out, ref, what=f"bound ({form})")


def test_implicit_gemm_bound_reuses_its_buffers_and_rejects_a_wrong_out(rng) -> None:
    w = _structured(rng, 12, 8, 3, 3, 1, 0.8, 0.6)
    x = rng.standard_normal((1, 8, 10, 10)).astype(np.float32)
    _, ref, prep, _ = _run(w, x, None, (1, 1), (1, 1), (1, 1), 1, False)
    out = np.empty(ref.shape, np.float32)
    run = bind_implicit_gemm_conv2d(prep, x.shape, None, out)
    for _ in range(3):
        out[...] = np.nan
        run(x)
        assert_close(out, ref, what="bound implicit_gemm_conv2d")
    with pytest.raises(ValueError, match="C-contiguous of shape"):
        bind_implicit_gemm_conv2d(prep, x.shape, None, np.empty((1, 12, 9, 10), np.float32))


def test_lowered_layer_uses_the_implicit_kernel_except_for_a_full_pointwise_gemm(rng) -> None:
    w = _structured(rng, 8, 6, 3, 3, 1, 0.8, 0.5)
    x = rng.standard_normal((1, 6, 9, 9)).astype(np.float32)
    _, ref, _, layer = _run(w, x, None, (1, 1), (1, 1), (1, 1), 1, False)
    assert layer.engine.implicit is not None
    assert_close(layer(torch.from_numpy(x)).detach().numpy(), ref, what="lowered layer")
    conv = torch.nn.Conv2d(6, 8, 1)
    full = SparseConv2d.from_dense(conv, "lowered")
    assert full.engine.implicit is None and full.engine.gemm_only
    with torch.no_grad():
        assert_close(full(torch.from_numpy(x)).numpy(), conv(torch.from_numpy(x)).numpy(), what="pointwise")


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cin_g=st.integers(1, 6), cout_g=st.integers(1, 9), groups=st.integers(1, 3), kh=st.integers(1, 5),
       kw=st.integers(1, 5), stride=st.integers(1, 3), pad=st.integers(0, 2), dil=st.integers(1, 2),
       h=st.integers(1, 17), w_=st.integers(1, 17), batch=st.sampled_from([1, 2, 3, 4, 9]),
       keep_rows=st.sampled_from([0.0, 0.5, 1.0]), keep_cols=st.sampled_from([0.0, 0.4, 1.0]),
       relu=st.booleans(), seed=st.integers(0, 2**16), chan=st.sampled_from([None, True]))
def test_implicit_gemm_generated_geometry(cin_g, cout_g, groups, kh, kw, stride, pad, dil, h, w_, batch,
                                           keep_rows, keep_cols, relu, seed, chan) -> None:
    if h + 2 * pad < dil * (kh - 1) + 1 or w_ + 2 * pad < dil * (kw - 1) + 1:
        return  # no output
    rng = np.random.default_rng(seed)
    w = _structured(rng, cout_g * groups, cin_g, kh, kw, groups, keep_rows, keep_cols)
    x = rng.standard_normal((batch, cin_g * groups, h, w_)).astype(np.float32)
    bias = rng.standard_normal(cout_g * groups).astype(np.float32)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ig_mod, "CHANNEL_FORM", chan)  # None: the rule; True: the channel-vector form
        out, ref, _, _ = _run(w, x, bias, (stride, stride), (pad, pad), (dil, dil), groups, relu)
    assert_close(out, ref, what=f"implicit_gemm_conv2d (channel form {chan})")


BLOCKED_CASES = [
    # cout, cin, (h, w), (kh, kw), stride, padding, dilation, batch
    (32, 16, (9, 11), (3, 3), (1, 1), (1, 1), (1, 1), 1),
    (80, 32, (8, 8), (1, 1), (1, 1), (0, 0), (1, 1), 2),  # straight into the blocked output, 64 + 16
    (16, 48, (13, 12), (3, 3), (2, 2), (1, 1), (1, 1), 3),  # stride 2, threads split the images
    (48, 16, (7, 7), (5, 5), (1, 1), (4, 4), (2, 2), 1),  # dilation
    (64, 16, (5, 6), (1, 1), (2, 2), (0, 0), (1, 1), 1),  # pointwise stride 2
]


def _blocked(a: np.ndarray) -> np.ndarray:
    from sparsecnn.kernels.blocked import to_blocked_array

    return to_blocked_array(a).reshape(a.shape)


@pytest.mark.parametrize("epilogue", ["residual+relu", "residual", "relu", "none"])
@pytest.mark.parametrize("valid", [True, False])
@pytest.mark.parametrize("small", [False, True])
@pytest.mark.parametrize("case", BLOCKED_CASES)
def test_channel_form_reads_and_writes_both_layouts(case, small, valid, epilogue, rng, monkeypatch) -> None:
    """The channel-vector form against torch, plain or channel-blocked in and out, with or without a
    residual and ReLU (a NaN in the residual kept through the ReLU: the straight 1x1 tiles apply
    both on their registers); ``small``: one channel per block and position groups of 7, so partial
    sums, groups across rows and partial register tiles all occur. ``valid``: the tiles cover the
    output positions alone (each reading its input at its own offset), else whole wide rows,
    cropped."""
    from sparsecnn.kernels.blocked import BLOCK, from_blocked_array

    monkeypatch.setattr(ig_mod, "VALID_POSITIONS", valid)
    if small:
        monkeypatch.setattr(ig_mod, "_CHAN_WBYTES", 1)
        monkeypatch.setattr(ig_mod, "_CHAN_POSITIONS", 7)
    cout, cin, hw, k, stride, padding, dilation, b = case
    w = rng.standard_normal((cout, cin, *k)).astype(np.float32)
    x = rng.standard_normal((b, cin, *hw)).astype(np.float32)
    bias = rng.standard_normal(cout).astype(np.float32)
    _, ref, prep, _ = _run(w, x, bias, stride, padding, dilation, 1, False)
    relu = "relu" in epilogue
    res = rng.standard_normal(ref.shape).astype(np.float32) if "residual" in epilogue else None
    if res is not None:
        res.reshape(-1)[[0, res.size // 2, -1]] = np.nan
    want = ref if res is None else ref + res
    want = np.where(np.isnan(want), want, np.maximum(want, 0)) if relu else want
    assert prep.blockable(False) and prep.blockable(True)
    for in_b in (False, True):
        for out_b in (False, True):
            out = np.full(ref.shape, np.nan, np.float32)
            run = bind_implicit_gemm_conv2d(prep, x.shape, bias, out, relu, 0, in_b, out_b)
            if in_b or out_b:  # the channel form (plain in and out: the rule picks the form)
                ws = prep.workspace(x.shape, in_b, out_b)
                plane = ref.shape[2] * ref.shape[3]
                assert (ws.qpos.size == plane) if valid else (ws.qpos.size == ws.span >= plane)
            xin = _blocked(x) if in_b else x
            if res is None:
                run(xin)
            else:
                run(xin, _blocked(res) if out_b else res)
            got = from_blocked_array(out.reshape(b, cout // BLOCK, *ref.shape[2:], BLOCK)) if out_b else out
            assert np.array_equal(np.isnan(got), np.isnan(want))
            ok = ~np.isnan(want)
            assert_close(got[ok], want[ok], what=f"{epilogue} in_blocked={in_b} out_blocked={out_b}")


def test_channel_form_unbound_and_its_limits(rng, monkeypatch) -> None:
    """Forced on for every layer (SSL's kept subsets, grouped, ReLU and NaN bias) it matches torch;
    layers with kept subsets or groups can read but not write the blocked layout (clear error)."""
    monkeypatch.setattr(ig_mod, "CHANNEL_FORM", True)
    for case in CASES:
        cout, cin, hw, k, stride, padding, dilation, groups, b = case
        w = _structured(rng, cout, cin // groups, *k, groups, 0.7, 0.5)
        x = rng.standard_normal((b, cin, *hw)).astype(np.float32)
        bias = rng.standard_normal(cout).astype(np.float32)
        out, ref, prep, _ = _run(w, x, bias, stride, padding, dilation, groups, True)
        assert_close(out, ref, what="channel form")
        assert prep.workspace(x.shape).init is not None
    w = _structured(rng, 32, 16, 3, 3, 1, 0.5, 0.5)
    x = rng.standard_normal((1, 16, 6, 6)).astype(np.float32)
    _, ref, prep, _ = _run(w, x, None, (1, 1), (1, 1), (1, 1), 1, False)
    assert prep.blockable(False) and not prep.blockable(True)
    with pytest.raises(ValueError, match="channel-blocked"):
        bind_implicit_gemm_conv2d(prep, x.shape, None, np.empty(ref.shape, np.float32), out_blocked=True)


def test_unpadded_wide_kernels_crop_their_wide_rows(rng) -> None:
    """An unpadded stride-1 layer wider than 1x1 reads its input in place with rows of W floats, wider
    than the output's; its span (2 * 12 + 8 = 32) is whole vectors, but its tiles must still be
    cropped, not stored straight into the output (they overran it: the generated-geometry test's
    heap corruption)."""
    w = rng.standard_normal((4, 2, 4, 3)).astype(np.float32)
    x = rng.standard_normal((1, 2, 9, 12)).astype(np.float32)
    bias = rng.standard_normal(4).astype(np.float32)
    out, ref, prep, _ = _run(w, x, bias, (1, 1), (0, 0), (2, 2), 1, False)
    ws = prep.workspace(x.shape)
    assert ws.in_place and ws.span % VW == 0 and ws.wph != ws.wout
    assert not ws.straight
    assert_close(out, ref, what="unpadded 4x3 layer, dilation 2")


@pytest.mark.parametrize("hw", [(8, 8), (6, 6)])
@pytest.mark.parametrize("l1", [1, 1 << 20])
def test_pointwise_tiles_go_straight_into_the_output(hw, l1, rng, monkeypatch) -> None:
    """A 1x1 stride-1 layer keeping every filter whose planes are whole vectors (8x8, not 6x6) writes
    its tiles straight into the output, in channel blocks (``l1`` 1) adding there, the residual and
    ReLU on the last block; read in place from a buffer with slack."""
    monkeypatch.setattr(ig_mod, "_L1_BYTES", l1)
    monkeypatch.setattr(ig_mod, "CHANNEL_FORM", False)
    w = rng.standard_normal((12, 20, 1, 1)).astype(np.float32)
    x = rng.standard_normal((2, 20, *hw)).astype(np.float32)
    bias = rng.standard_normal(12).astype(np.float32)
    _, ref, prep, _ = _run(w, x, bias, (1, 1), (0, 0), (1, 1), 1, False)
    ws = prep.workspace(x.shape)
    assert ws.straight == (hw[0] * hw[1] % VW == 0)
    res = rng.standard_normal(ref.shape).astype(np.float32)
    padded = np.concatenate([x.reshape(-1), np.zeros(conv_mod.SLACK, np.float32)])
    xin = padded[: x.size].reshape(x.shape)
    for relu in (False, True):
        out = np.full(ref.shape, np.nan, np.float32)
        run = bind_implicit_gemm_conv2d(prep, x.shape, bias, out, relu, slack=conv_mod.SLACK)
        run(xin, res)
        want = ref + res
        assert_close(out, np.maximum(want, 0) if relu else want, what="straight pointwise")
        out[...] = np.nan
        implicit_gemm_conv2d(prep, x, bias, out, relu, residual=res)
        assert_close(out, np.maximum(want, 0) if relu else want, what="straight pointwise, unbound")
    with pytest.raises(ValueError, match="residual"):
        implicit_gemm_conv2d(prep, x, bias, out, residual=out)


@pytest.mark.parametrize("positions_first", [False, True])
def test_straight_channel_tiles_in_either_item_order(positions_first, rng, monkeypatch) -> None:
    """The channel form's straight 1x1 tiles (blocked in and out, batch 1: the threads split the
    items) give the same outputs with the items ordered position group first or filter block first;
    several filter blocks (64 + 64 + 16 filters with 16-wide vectors, 5 x 32 with 8-wide) and several
    position groups."""
    from sparsecnn.kernels.blocked import BLOCK, from_blocked_array, to_blocked_array

    monkeypatch.setattr(ig_mod, "STRAIGHT_POSITIONS_FIRST", positions_first)
    monkeypatch.setattr(ig_mod, "_CHAN_POSITIONS", 48)
    w = rng.standard_normal((144, 32, 1, 1)).astype(np.float32)
    x = rng.standard_normal((1, 32, 16, 16)).astype(np.float32)
    bias = rng.standard_normal(144).astype(np.float32)
    prep = prepare_implicit_gemm(w.reshape(1, 144, 32), np.arange(144)[None], np.arange(32)[None], w.shape, 1,
                                 (1, 1), (0, 0), (1, 1))
    ref = F.conv2d(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(bias)).numpy()
    res = rng.standard_normal(ref.shape).astype(np.float32)
    out = np.full(ref.shape, np.nan, np.float32)
    run = bind_implicit_gemm_conv2d(prep, x.shape, bias, out, True, 0, True, True)
    ws = prep.workspace(x.shape, True, True)
    assert ws.straight and ws.posfirst == positions_first and ws.bounds.size == 3
    run(to_blocked_array(x), to_blocked_array(res))
    got = from_blocked_array(out.reshape(1, 144 // BLOCK, 16, 16, BLOCK))
    assert_close(got, np.maximum(ref + res, 0), what=f"straight, positions first {positions_first}")


def test_blocked_layout_conversions_and_phase_copy(rng) -> None:
    """to_blocked / from_blocked invert each other; the blocked phase copy is the plain one with each
    float widened to BLOCK channels (stride 2 and padding: the phase planes and zero borders)."""
    from sparsecnn.kernels.blocked import (
        BLOCK,
        blockable,
        blocked_phase_copy,
        from_blocked_array,
        to_blocked_array,
    )

    x = rng.standard_normal((2, 2 * BLOCK, 7, 9)).astype(np.float32)
    xb = to_blocked_array(x)
    assert xb.shape == (2, 2, 7, 9, BLOCK)
    np.testing.assert_array_equal(xb[1, 1, 3, 4], x[1, BLOCK:, 3, 4])
    np.testing.assert_array_equal(from_blocked_array(xb), x)
    assert blockable(x.shape) and not blockable((2, BLOCK + 1, 7, 9)) and not blockable((2, BLOCK))
    lay = conv_mod.phase_layout(x.shape, (3, 3), (2, 2), (1, 1), (1, 1))
    plain = np.zeros(lay.xt_shape(2, x.shape[1], 1), np.float32)
    conv_mod.phase_copy(x.reshape(2, -1), plain, lay.copies, lay.geometry(x.shape))
    blocked = np.zeros((2, plain.shape[1] * BLOCK), np.float32)
    blocked_phase_copy(xb.reshape(2, -1), blocked, lay.copies, lay.geometry(x.shape))
    chan = lay.nph * lay.plane
    want = plain[:, : x.shape[1] * chan].reshape(2, 2, BLOCK, chan).transpose(0, 1, 3, 2)
    np.testing.assert_array_equal(blocked[:, : x.shape[1] * chan].reshape(2, 2, chan, BLOCK), want)


@pytest.mark.parametrize("pool", [(3, 2, 1, 1, False), (2, 2, 0, 1, False), (3, 2, 0, 2, True),
                                  (5, 1, 2, 1, False)])
def test_blocked_pools_match_torch(pool, rng) -> None:
    """Max pooling (padding, dilation, ceil mode, NaN) and the global average pool in the blocked layout."""
    from sparsecnn.kernels.blocked import (
        BLOCK,
        from_blocked_array,
        global_avg_pool_blocked,
        max_pool_blocked,
        to_blocked_array,
    )

    k, s, p, d, ceil = pool
    x = rng.standard_normal((2, 2 * BLOCK, 11, 10)).astype(np.float32)
    x[0, 3, 4, 4] = np.nan
    ref = F.max_pool2d(torch.from_numpy(x), k, s, p, d, ceil_mode=ceil).numpy()
    out = np.empty((2, 2, *ref.shape[2:], BLOCK), np.float32)
    max_pool_blocked(to_blocked_array(x), out, k, k, s, s, p, p, d, d)
    got = from_blocked_array(out)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    np.testing.assert_array_equal(np.nan_to_num(got), np.nan_to_num(ref))
    mean = np.empty((2, 2 * BLOCK), np.float32)
    global_avg_pool_blocked(to_blocked_array(x[1:].repeat(2, 0)).reshape(2, 2, -1, BLOCK), mean)
    assert_close(mean, x[1:].repeat(2, 0).mean(axis=(2, 3)), what="blocked global average pool")
