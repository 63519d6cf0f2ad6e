"""Winograd F(2x2, 3x3) (``kernels/winograd.py``, the implicit GEMM's form for 3x3 stride-1 layers) against
the dense torch convolution."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsecnn.kernels import implicit_gemm as ig_mod
from sparsecnn.kernels._simd import CHAN_BLOCK, VW
from sparsecnn.kernels.blocked import BLOCK, from_blocked_array, to_blocked_array
from sparsecnn.kernels.implicit_gemm import (
    bind_implicit_gemm_conv2d,
    implicit_gemm_conv2d,
    prepare_implicit_gemm,
)
from sparsecnn.kernels.winograd import (
    WinoWorkspace,
    padded_bias,
    winograd_conv2d,
    winograd_weights,
    winograd_workspace,
)
from tests.reference import assert_close


def _prep(w: np.ndarray, groups: int, padding: tuple[int, int]):
    """The implicit GEMM's tiles of a dense weight (every filter and column kept)."""
    cout, cin_g, kh, kw = w.shape
    mg, k = cout // groups, cin_g * kh * kw
    data = np.ascontiguousarray(w.reshape(groups, mg, k))
    rows = (np.arange(groups)[:, None] * mg + np.arange(mg)[None]).astype(np.int64)
    cols = np.tile(np.arange(k), (groups, 1))
    return prepare_implicit_gemm(data, rows, cols, w.shape, groups, (1, 1), padding, (1, 1))


def _reference(x, w, bias, padding, groups, relu, res):
    ref = F.conv2d(torch.from_numpy(x), torch.from_numpy(w), None if bias is None else torch.from_numpy(bias),
                   padding=padding, groups=groups).numpy()
    if res is not None:
        ref = ref + res
    return np.maximum(ref, 0) if relu else ref


CASES = [
    # batch, cin, cout, (h, w), padding, groups, in_blocked, out_blocked
    (1, 32, 64, (14, 14), (1, 1), 1, True, True),  # ResNet's chains: blocked in and out
    (1, 32, 64, (14, 14), (1, 1), 1, False, False),  # plain in and out (AlexNet's layout)
    (1, 32, 80, (15, 9), (1, 1), 1, True, False),  # odd sizes: last tile row and column half outside
    (1, 48, 32, (10, 12), (1, 1), 1, False, True),
    (3, 48, 40, (9, 7), (1, 0), 1, False, False),  # threads split the images, uneven; one-sided padding
    (4, 64, 96, (13, 13), (1, 1), 2, False, False),  # grouped (AlexNet conv4/5), 48 filters a group
    (2, 20, 24, (6, 11), (2, 1), 1, False, False),  # channels and filters not whole vectors, padding 2
    (1, 256, 64, (14, 14), (1, 1), 1, True, True),  # two channel blocks of the GEMM
    (1, 64, 64, (40, 40), (1, 1), 1, True, True),  # several chunks of tiles
    (1, 3, 20, (10, 10), (1, 1), 1, False, False),  # three input channels (forced: the rule says no)
    (2, 16, 16, (5, 6), (0, 0), 1, False, False),  # unpadded
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("epilogue", ["none", "relu", "residual+relu"])
def test_winograd_matches_torch(case, epilogue, rng, monkeypatch) -> None:
    batch, cin, cout, (h, w_), padding, groups, in_b, out_b = case
    monkeypatch.setattr(ig_mod, "WINOGRAD", True)
    w = rng.standard_normal((cout, cin // groups, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(cout).astype(np.float32)
    x = rng.standard_normal((batch, cin, h, w_)).astype(np.float32)
    relu = epilogue != "none"
    ref_shape = (batch, cout, h + 2 * padding[0] - 2, w_ + 2 * padding[1] - 2)
    res = rng.standard_normal(ref_shape).astype(np.float32) if "residual" in epilogue else None
    ref = _reference(x, w, bias, padding, groups, relu, res)
    prep = _prep(w, groups, padding)
    out = np.full(ref.shape, np.nan, np.float32)
    run = bind_implicit_gemm_conv2d(prep, x.shape, bias, out, relu, 0, in_b, out_b)
    assert isinstance(prep.workspace(x.shape, *((in_b, out_b) if in_b or out_b else ())), WinoWorkspace)
    xin = to_blocked_array(x) if in_b else x
    rin = None if res is None else (to_blocked_array(res) if out_b else res)
    run(xin, rin)
    got = from_blocked_array(out.reshape(batch, cout // BLOCK, *ref.shape[2:], BLOCK)) if out_b else out
    assert_close(got, ref, rtol=1e-5, what=f"winograd {case} {epilogue}")
    if not in_b and not out_b:  # the unbound call takes the same path
        out2 = np.full(ref.shape, np.nan, np.float32)
        implicit_gemm_conv2d(prep, x, bias, out2, relu, residual=res)
        np.testing.assert_array_equal(out2, out)


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("case", CASES)
def test_both_tile_sizes_match_torch(case, m, residual, rng) -> None:
    """F(2x2, 3x3) and F(4x4, 3x3) straight through the kernel's API, whichever the rule would pick:
    4x4 output tiles half or three quarters outside small or odd planes; without a residual a plain
    output takes whole 4x4 tiles through the in-register transpose."""
    batch, cin, cout, (h, w_), padding, groups, in_b, out_b = case
    w = rng.standard_normal((cout, cin // groups, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(cout).astype(np.float32)
    x = rng.standard_normal((batch, cin, h, w_)).astype(np.float32)
    out_shape = (batch, cout, h + 2 * padding[0] - 2, w_ + 2 * padding[1] - 2)
    res = rng.standard_normal(out_shape).astype(np.float32) if residual else np.zeros(out_shape, np.float32)
    ref = _reference(x, w, bias, padding, groups, True, res)
    ws = winograd_workspace(x.shape, w.shape, groups, padding, 2, batch >= 2, in_b, out_b, m=m)
    assert ws.m == m
    out = np.full(ref.shape, np.nan, np.float32)
    outv = np.empty((batch, cout // BLOCK, *ref.shape[2:], BLOCK), np.float32) if out_b else out
    rin = to_blocked_array(res) if out_b else res
    xin = to_blocked_array(x) if in_b else x
    winograd_conv2d(winograd_weights(w, groups, m), ws, xin.reshape(batch, -1),
                    padded_bias(bias, cout, groups), outv.reshape(batch, -1), True,
                    rin.reshape(batch, -1) if residual else None)
    got = from_blocked_array(outv) if out_b else out
    assert_close(got, ref, rtol=1e-5 if m == 2 else 4e-5, what=f"F({m}x{m}, 3x3) {case}")


@pytest.mark.parametrize("in_b", [False, True])
def test_one_thread_and_no_bias(in_b, rng) -> None:
    """A layer too small for a parallel launch runs on one thread; without a bias, zeros."""
    w = rng.standard_normal((16, 16, 3, 3)).astype(np.float32)
    x = rng.standard_normal((3, 16, 5, 6)).astype(np.float32)
    ref = _reference(x, w, None, (1, 1), 1, True, None)
    ws = winograd_workspace(x.shape, w.shape, 1, (1, 1), 2, False, in_b, False, serial=True)
    assert ws.serial and ws.by_image and ws.bounds.size == 2
    out = np.full(ref.shape, np.nan, np.float32)
    xin = to_blocked_array(x) if in_b else x
    winograd_conv2d(winograd_weights(w, 1), ws, xin.reshape(3, -1), ws.zero_bias, out.reshape(3, -1), True)
    assert_close(out, ref, rtol=1e-5)


def test_weights_and_bias_layout(rng) -> None:
    """U = G g G^T per filter and channel, in (group, filter block, point, channel, filter) order, zero
    past the filters and channels; the bias padded per group."""
    w = rng.standard_normal((6, 5, 3, 3)).astype(np.float32)  # 2 groups of 3 filters, 5 channels each
    u = winograd_weights(w, 2)
    assert u.shape == (2, 1, 16, VW, CHAN_BLOCK) and u.ctypes.data % 64 == 0
    g = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])
    want = g @ w[4, 2].astype(np.float64) @ g.T  # filter 4 = group 1, filter 1 of it; channel 2
    np.testing.assert_allclose(u[1, 0, :, 2, 1], want.reshape(16), rtol=1e-6)
    assert not u[:, :, :, 5:].any() and not u[:, :, :, :, 3:].any()
    b = padded_bias(np.arange(6, dtype=np.float32), 6, 2)
    cb = CHAN_BLOCK
    assert b.shape == (2 * cb,) and (b[:3] == [0, 1, 2]).all() and (b[cb:cb + 3] == [3, 4, 5]).all()
    assert not b[3:cb].any() and not padded_bias(None, 6, 2).any()
    u4 = winograd_weights(w, 2, 4)  # F(4x4, 3x3): 36 points
    g4 = np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6], [1 / 24, 1 / 12, 1 / 6],
                   [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]])
    assert u4.shape == (2, 1, 36, VW, CHAN_BLOCK)
    want4 = g4 @ w[4, 2].astype(np.float64) @ g4.T
    np.testing.assert_allclose(u4[1, 0, :, 2, 1], want4.reshape(36), rtol=1e-6)



@pytest.mark.parametrize(("hw", "cin", "m"),
                         [(56, 64, 4), (56, 64, 2), (28, 128, 4), (112, 64, 4), (14, 256, 2)])
def test_chunks_of_equal_size(hw, cin, m) -> None:
    """The tiles of a plane are spread evenly over the chunks (each at most the budget's size), so the
    threads, which split the chunks evenly, get as many tiles each: 196 4x4 tiles of a 56x56 plane as
    4 x 49, not 64 + 64 + 64 + 4."""
    from sparsecnn.kernels import winograd as wmod

    ws = winograd_workspace((1, cin, hw, hw), (cin, cin, 3, 3), 1, (1, 1), 2, False, True, True, m=m)
    t, tg, nchunk = (int(ws.geo[i]) for i in (wmod._T, wmod._TG, wmod._NCHUNK))
    assert t == (-(-hw // m)) ** 2 and tg <= wmod.WINO_TILES and nchunk == -(-t // tg)
    assert t - (nchunk - 1) * tg > tg - nchunk  # the last chunk is short by less than one tile a chunk
    if (hw, m) == (56, 4):
        assert (tg, nchunk) == (49, 4)

def test_nan_input_spreads_to_its_outputs(rng) -> None:
    """A NaN input makes NaN every output the dense convolution would (the whole 2x2 output block of
    each tile reading it, at most: never outside the tiles that read it)."""
    w = rng.standard_normal((16, 16, 3, 3)).astype(np.float32)
    x = rng.standard_normal((1, 16, 12, 12)).astype(np.float32)
    x[0, 3, 6, 5] = np.nan
    prep = _prep(w, 1, (1, 1))
    out = np.zeros((1, 16, 12, 12), np.float32)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ig_mod, "WINOGRAD", True)
        implicit_gemm_conv2d(prep, x, None, out, relu=True)
    ref = _reference(x, w, None, (1, 1), 1, True, None)
    assert np.isnan(out[np.isnan(ref)]).all()
    # tiles reading input row 6 / column 5 (padded 7 / 6): output rows 4-7, columns 4-7
    outside = np.ones((12, 12), bool)
    outside[4:8, 4:8] = False
    assert np.isfinite(out[0][:, outside]).all()


def test_the_rule(rng, monkeypatch) -> None:
    """Winograd where a dense-enough 3x3 stride-1 layer has planes of at least _WINO_MIN_TILES tiles;
    not on 7x7 planes, strided, dilated or 1x1 layers, or SSL-compact layers that kept little."""
    monkeypatch.setattr(ig_mod, "WINOGRAD", None)
    dense = _prep(rng.standard_normal((64, 32, 3, 3)).astype(np.float32), 1, (1, 1))
    assert ig_mod._use_winograd(dense, (1, 32, 14, 14)) == 2  # 49 2x2 tiles, 16 4x4 ones
    assert ig_mod._use_winograd(dense, (1, 32, 28, 28)) == 4  # 49 4x4 tiles
    assert ig_mod._use_winograd(dense, (1, 32, 7, 7)) == 0  # 16 tiles
    assert not ig_mod._use_winograd(_prep(rng.standard_normal((64, 4, 3, 3)).astype(np.float32), 1, (1, 1)),
                                    (1, 4, 14, 14))  # fewer channels than a vector
    w = rng.standard_normal((64, 32, 3, 3)).astype(np.float32)
    k = 32 * 9
    kept = np.arange(0, k, 3)  # a third of the columns: the implicit GEMM does less than Winograd would
    compact = prepare_implicit_gemm(np.ascontiguousarray(w.reshape(1, 64, k)[:, :, kept]),
                                    np.arange(64)[None], kept[None], w.shape, 1, (1, 1), (1, 1), (1, 1))
    assert not ig_mod._use_winograd(compact, (1, 32, 14, 14))
    strided = prepare_implicit_gemm(w.reshape(1, 64, k), np.arange(64)[None], np.arange(k)[None], w.shape, 1,
                                    (2, 2), (1, 1), (1, 1))
    assert not ig_mod._use_winograd(strided, (1, 32, 28, 28))
    monkeypatch.setattr(ig_mod, "WINOGRAD", False)
    assert not ig_mod._use_winograd(dense, (1, 32, 14, 14))
    monkeypatch.setattr(ig_mod, "WINOGRAD", True)
    assert ig_mod._use_winograd(compact, (1, 32, 7, 7)) and not ig_mod._use_winograd(strided, (1, 32, 28, 28))


def test_compact_weights_run_as_their_dense_weight(rng, monkeypatch) -> None:
    """An SSL-compact layer (filters and columns dropped) forced through Winograd computes its dense
    weight with zeros where they were dropped: a dropped filter's output is its bias."""
    monkeypatch.setattr(ig_mod, "WINOGRAD", True)
    w = rng.standard_normal((24, 16, 3, 3)).astype(np.float32)
    w[5] = 0
    w[:, 3] = 0
    k = 16 * 9
    low = w.reshape(1, 24, k)
    rows = np.flatnonzero(np.abs(low[0]).sum(axis=1) > 0)
    cols = np.flatnonzero(np.abs(low[0]).sum(axis=0) > 0)
    prep = prepare_implicit_gemm(np.ascontiguousarray(low[:, rows][:, :, cols]), rows[None], cols[None],
                                 w.shape, 1, (1, 1), (1, 1), (1, 1))
    np.testing.assert_array_equal(prep.to_dense(), w)
    x = rng.standard_normal((1, 16, 9, 9)).astype(np.float32)
    bias = rng.standard_normal(24).astype(np.float32)
    out = np.full((1, 24, 9, 9), np.nan, np.float32)
    implicit_gemm_conv2d(prep, x, bias, out, relu=False)
    assert_close(out, _reference(x, w, bias, (1, 1), 1, False, None), rtol=1e-5)
    assert (out[0, 5] == bias[5]).all()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cin_g=st.integers(1, 40), cout_g=st.integers(1, 80), groups=st.integers(1, 2), h=st.integers(1, 19),
       w_=st.integers(1, 19), ph=st.integers(0, 2), pw=st.integers(0, 2), batch=st.sampled_from([1, 2, 3, 5]),
       relu=st.booleans(), seed=st.integers(0, 2**16))
def test_winograd_generated_geometry(cin_g, cout_g, groups, h, w_, ph, pw, batch, relu, seed) -> None:
    _check_generated(3, 0.3, 1e-5, cin_g, cout_g, groups, (h, w_), (ph, pw), batch, relu, seed)


def _check_generated(ksz, zeros, rtol, cin_g, cout_g, groups, hw, padding, batch, relu, seed) -> None:
    """A ``ksz x ksz`` layer with a ``zeros`` share of zero weights forced through Winograd (F(m x m,
    ksz x ksz)) equals torch."""
    (h, w_), (ph, pw) = hw, padding
    if h + 2 * ph < ksz or w_ + 2 * pw < ksz:
        return  # no output
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((cout_g * groups, cin_g, ksz, ksz)).astype(np.float32)
    w[rng.random(w.shape) < zeros] = 0
    x = rng.standard_normal((batch, cin_g * groups, h, w_)).astype(np.float32)
    bias = rng.standard_normal(cout_g * groups).astype(np.float32)
    ref = _reference(x, w, bias, (ph, pw), groups, relu, None)
    prep = _prep(w, groups, (ph, pw))
    out = np.full(ref.shape, np.nan, np.float32)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ig_mod, "WINOGRAD", True)
        implicit_gemm_conv2d(prep, x, bias, out, relu=relu)
        ws = prep.workspace(x.shape)
        assert isinstance(ws, WinoWorkspace) and ws.r == ksz
    assert_close(out, ref, rtol=rtol, what=f"winograd {ksz}x{ksz} generated")


class _WinoNet(torch.nn.Module):
    """A 5x5 layer (F(4x4, 5x5)) and 3x3 stride-1 layers on planes of F(4x4) (24x24) and F(2x2) (12x12)
    size, a residual add, a pool."""

    def __init__(self) -> None:
        super().__init__()
        self.c0 = torch.nn.Conv2d(16, 16, 5, padding=2)
        self.c1 = torch.nn.Conv2d(16, 32, 3, padding=1)
        self.c2 = torch.nn.Conv2d(32, 32, 3, padding=1)
        self.c3 = torch.nn.Conv2d(32, 32, 3, padding=1)
        self.fc = torch.nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.c1(torch.relu(self.c0(x))))
        y = torch.relu(self.c2(y) + y)
        y = torch.relu(self.c3(F.max_pool2d(y, 2)))
        return self.fc(y.mean(dim=(2, 3)))


@pytest.mark.parametrize("layout", ["plain", "blocked"])
def test_winograd_model_from_four_threads(layout, monkeypatch) -> None:
    """A compiled model whose 5x5 and 3x3 layers run Winograd (every form) called from 4 threads on
    mixed input shapes: every thread its own transform buffers, every output the dense model's."""
    import sparsecnn
    from sparsecnn.kernels import winograd as wino_mod
    from tests.threads import call_from_threads

    calls: list[int] = []
    real = ig_mod.winograd_conv2d

    def counted(u, ws, *args, **kw):
        calls.append((ws.m, ws.r))
        return real(u, ws, *args, **kw)

    monkeypatch.setattr(ig_mod, "winograd_conv2d", counted)
    assert wino_mod.winograd_conv2d is real
    torch.manual_seed(0)
    model = _WinoNet().eval()
    compiled = sparsecnn.compile(model, torch.randn(1, 16, 24, 24), "lowered", layout=layout)
    g = torch.Generator().manual_seed(3)
    shapes = [(1, 16, 24, 24), (2, 16, 24, 24), (1, 16, 28, 26)]
    inputs = [torch.randn(shapes[(i // 4) % 3], generator=g) for i in range(120)]
    with torch.inference_mode():
        refs = [model(x) for x in inputs]
    calls.clear()
    out = call_from_threads(compiled, inputs, 4)
    assert {(2, 3), (4, 3), (4, 5)} <= set(calls), "every form ran"
    bad = [i for i, (y, r) in enumerate(zip(out, refs, strict=True))
           if y is None or float((y - r).abs().max()) > 1e-4 * float(r.abs().max())]
    assert not bad, f"{len(bad)} of {len(refs)} outputs wrong"


# 5x5 stride-1 layers: F(4x4, 5x5), 8 x 8 tiles of 64 points (AlexNet's conv2 under Deep Compression)
CASES5 = [
    # batch, cin, cout, (h, w), padding, groups, in_blocked, out_blocked
    (1, 96, 256, (27, 27), (2, 2), 2, False, False),  # AlexNet's conv2: grouped, plain in and out
    (2, 32, 48, (17, 13), (2, 2), 1, False, False),  # threads split the images; last tiles partly outside
    (1, 32, 40, (12, 12), (2, 1), 1, True, True),  # blocked in and out, one-sided padding
    (3, 20, 24, (9, 11), (0, 0), 1, False, True),  # unpadded; channels and filters not whole vectors
    (1, 16, 16, (5, 5), (0, 0), 1, True, False),  # one output
]


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("case", CASES5)
def test_5x5_matches_torch(case, residual, rng) -> None:
    """F(4x4, 5x5) straight through the kernel's API, with the bias, the ReLU and a residual or none
    (a plain output's whole tiles then through the in-register transpose)."""
    batch, cin, cout, (h, w_), padding, groups, in_b, out_b = case
    w = rng.standard_normal((cout, cin // groups, 5, 5)).astype(np.float32)
    w[rng.random(w.shape) < 0.6] = 0  # Deep Compression's zeros: Winograd runs the dense weight
    bias = rng.standard_normal(cout).astype(np.float32)
    x = rng.standard_normal((batch, cin, h, w_)).astype(np.float32)
    out_shape = (batch, cout, h + 2 * padding[0] - 4, w_ + 2 * padding[1] - 4)
    res = rng.standard_normal(out_shape).astype(np.float32) if residual else None
    ref = _reference(x, w, bias, padding, groups, True, res)
    ws = winograd_workspace(x.shape, w.shape, groups, padding, 2, batch >= 2, in_b, out_b, m=4)
    assert (ws.m, ws.r) == (4, 5)
    out = np.full(ref.shape, np.nan, np.float32)
    outv = np.empty((batch, -(-cout // BLOCK), *ref.shape[2:], BLOCK), np.float32) if out_b else out
    rin = None if res is None else (to_blocked_array(res) if out_b else res).reshape(batch, -1)
    xin = to_blocked_array(x) if in_b else x
    winograd_conv2d(winograd_weights(w, groups, 4), ws, xin.reshape(batch, -1),
                    padded_bias(bias, cout, groups), outv.reshape(batch, -1), True, rin)
    got = from_blocked_array(outv)[:, :cout] if out_b else out
    assert_close(got, ref, rtol=4e-5, what=f"F(4x4, 5x5) {case}")


def test_5x5_rule_and_layer(rng, monkeypatch) -> None:
    """A dense-enough 5x5 stride-1 layer runs F(4x4, 5x5) where its plane has 32 4x4 tiles (AlexNet's
    27x27: 49), not on 13x13 (16) or with too few channels; through the layer's bound call it equals
    torch, a ReLU-sparse input and 60% zero weights included."""
    monkeypatch.setattr(ig_mod, "WINOGRAD", None)
    w = rng.standard_normal((64, 16, 5, 5)).astype(np.float32)
    w[rng.random(w.shape) < 0.6] = 0
    prep = _prep(w, 2, (2, 2))
    assert ig_mod._use_winograd(prep, (1, 32, 27, 27)) == 4
    assert ig_mod._use_winograd(prep, (1, 32, 13, 13)) == 0
    assert not ig_mod._use_winograd(_prep(w[:, :4], 1, (2, 2)), (1, 4, 27, 27))
    x = np.maximum(rng.standard_normal((2, 32, 27, 27)), 0).astype(np.float32)
    bias = rng.standard_normal(64).astype(np.float32)
    out = np.full((2, 64, 27, 27), np.nan, np.float32)
    run = bind_implicit_gemm_conv2d(prep, x.shape, bias, out, True, 0)
    assert isinstance(prep.workspace(x.shape), WinoWorkspace)
    run(x, None)
    assert_close(out, _reference(x, w, bias, (2, 2), 2, True, None), rtol=4e-5)
    with pytest.raises(ValueError, match="no Winograd F"):
        winograd_workspace((1, 8, 20, 20), (8, 8, 7, 7), 1, (3, 3), 2, False, m=4)


def test_toom_cook_tables() -> None:
    """The generator reproduces Lavin and Gray's F(4x4, 3x3) from its points, and each generated form
    is an exact correlation: ``A^T [(G g) * (B^T d)] = sum_k d[i + k] g[k]`` in rational arithmetic."""
    from fractions import Fraction

    from sparsecnn.kernels import winograd as wmod
    from sparsecnn.kernels._simd import WINO_AT, WINO_BT, WINO_POINTS, toom_cook

    at, g, bt = toom_cook(tuple(map(Fraction, (0, 1, -1, 2, -2))), 4, 3)
    assert tuple(tuple(float(c) for c in row) for row in bt) == WINO_BT[4, 3]
    assert tuple(tuple(float(c) for c in row) for row in at) == WINO_AT[4, 3]
    np.testing.assert_allclose(np.array(g, float), wmod._G[4, 3], rtol=1e-15)
    rs = np.random.default_rng(0)
    for (m, r), pts in WINO_POINTS.items():
        at, g, bt = toom_cook(pts, m, r)
        n = m + r - 1
        for _ in range(3):
            d = [Fraction(int(v)) for v in rs.integers(-9, 10, n)]
            f = [Fraction(int(v)) for v in rs.integers(-9, 10, r)]
            u = [sum(gj[k] * f[k] for k in range(r)) for gj in g]
            v = [sum(bj[k] * d[k] for k in range(n)) for bj in bt]
            y = [sum(ai[j] * u[j] * v[j] for j in range(n)) for ai in at]
            assert y == [sum(d[i + k] * f[k] for k in range(r)) for i in range(m)], (m, r)
        assert wmod.winograd_weights(np.ones((1, 1, r, r), np.float32), 1, m).shape[2] == n * n
    with pytest.raises(ValueError, match="distinct finite points"):
        toom_cook(tuple(map(Fraction, (0, 1, 1, 2, -2, 3, 4))), 4, 5)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cin_g=st.integers(1, 24), cout_g=st.integers(1, 40), groups=st.integers(1, 2), h=st.integers(1, 21),
       w_=st.integers(1, 21), ph=st.integers(0, 2), pw=st.integers(0, 2), batch=st.sampled_from([1, 3]),
       relu=st.booleans(), seed=st.integers(0, 2**16))
def test_winograd_5x5_generated_geometry(cin_g, cout_g, groups, h, w_, ph, pw, batch, relu, seed) -> None:
    _check_generated(5, 0.5, 4e-5, cin_g, cout_g, groups, (h, w_), (ph, pw), batch, relu, seed)


@pytest.mark.parametrize("r", [3, 5])
def test_nan_through_the_transposed_store(r, rng) -> None:
    """A NaN input through F(4x4, r x r) into a plain output (whole tiles go through the in-register
    transpose): NaN at every output the dense convolution makes NaN (the ReLU keeps it), finite outside
    the 4x4 tiles that read it, and 13 filters (a vector and 5 lanes) stored nowhere else."""
    pad = r // 2
    w = rng.standard_normal((13, 16, r, r)).astype(np.float32)
    x = rng.standard_normal((1, 16, 24, 24)).astype(np.float32)
    x[0, 3, 10, 13] = np.nan
    ws = winograd_workspace(x.shape, w.shape, 1, (pad, pad), 2, False, m=4)
    out = np.full((1, 13 * 24 * 24 + 64), 7.0, np.float32)  # past the planes: must stay 7
    winograd_conv2d(winograd_weights(w, 1, 4), ws, x.reshape(1, -1), ws.zero_bias, out, True)
    assert (out[0, 13 * 24 * 24:] == 7.0).all()
    got = out[0, :13 * 24 * 24].reshape(1, 13, 24, 24)
    ref = _reference(x, w, None, (pad, pad), 1, True, None)
    assert np.isnan(got[np.isnan(ref)]).all()
    rows = slice((10 - pad) // 4 * 4, (10 + pad) // 4 * 4 + 4)
    cols = slice((13 - pad) // 4 * 4, (13 + pad) // 4 * 4 + 4)
    inside = np.zeros((24, 24), bool)
    inside[rows, cols] = True
    assert np.isfinite(got[0][:, ~inside]).all()
    assert_close(got[0][:, ~inside], ref[0][:, ~inside], rtol=4e-5, what="outside the NaN tiles")


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize(("r", "hw"), [(3, (22, 23)), (5, (21, 25)), (3, (3, 2))])
def test_partial_tiles_through_the_transposed_store(r, hw, residual, rng) -> None:
    """F(4x4, r x r) into a plain output whose last row and column of tiles are partly outside the
    plane (1, 2 or 3 rows / columns inside), with a residual or none: the transposed rows stored as
    runs of 4, 2 and 1 floats. Equal to torch; 13 filters (a vector and 5 lanes), and nothing written
    past the planes (a sentinel there stays)."""
    pad = r // 2
    h, w_ = hw
    w = rng.standard_normal((13, 16, r, r)).astype(np.float32)
    bias = rng.standard_normal(13).astype(np.float32)
    x = rng.standard_normal((2, 16, h, w_)).astype(np.float32)
    n = 13 * h * w_
    res = rng.standard_normal((2, 13, h, w_)).astype(np.float32) if residual else None
    ref = _reference(x, w, bias, (pad, pad), 1, True, res)
    ws = winograd_workspace(x.shape, w.shape, 1, (pad, pad), 2, False, m=4)
    out = np.full((2, n + 64), 7.0, np.float32)
    resv = None if res is None else np.concatenate([res.reshape(2, n), np.zeros((2, 64), np.float32)], 1)
    winograd_conv2d(winograd_weights(w, 1, 4), ws, x.reshape(2, -1), padded_bias(bias, 13, 1), out, True,
                    resv)
    assert (out[:, n:] == 7.0).all()
    assert_close(out[:, :n].reshape(ref.shape), ref, rtol=4e-5, what=f"F(4x4, {r}x{r}) {hw} res {residual}")


def test_5x5_compact_layers_keep_winograd_longer(rng, monkeypatch) -> None:
    """An SSL-compact 5x5 layer that kept under half its columns x filters (AlexNet's conv2 under the ssl
    profile: 0.46) still runs F(4x4, 5x5), which does 0.16 of the dense work; a 3x3 one that kept as
    little runs its compact GEMM, and a 5x5 one that kept a fifth too."""
    monkeypatch.setattr(ig_mod, "WINOGRAD", None)
    for ksz, kept_cols, want in [(5, 0.46, 4), (3, 0.46, 0), (5, 0.2, 0)]:
        w = rng.standard_normal((64, 16, ksz, ksz)).astype(np.float32)
        k = 16 * ksz * ksz
        kept = np.sort(rng.choice(k, int(kept_cols * k), replace=False))
        data = np.ascontiguousarray(w.reshape(1, 64, k)[:, :, kept])
        prep = prepare_implicit_gemm(data, np.arange(64)[None], kept[None], w.shape, 1, (1, 1),
                                     (ksz // 2, ksz // 2), (1, 1))
        assert ig_mod._use_winograd(prep, (1, 16, 28, 28)) == want, (ksz, kept_cols)
