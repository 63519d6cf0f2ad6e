"""Strided layers as Winograd over their space-to-depth input (``kernels/space_to_depth.py``, the ``lowered``
strategy's form for AlexNet-like conv1 layers) against the dense torch convolution."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sparsecnn.kernels import implicit_gemm as ig_mod
from sparsecnn.kernels._numba import num_threads
from sparsecnn.kernels._simd import VW
from sparsecnn.kernels.conv import split_by_image
from sparsecnn.kernels.implicit_gemm import (
    bind_implicit_gemm_conv2d,
    implicit_gemm_conv2d,
    prepare_implicit_gemm,
)
from sparsecnn.kernels.space_to_depth import (
    rearrange_image,
    s2d_channels,
    s2d_geometry,
    s2d_stride,
    s2d_weight,
    space_to_depth_blocked,
)
from sparsecnn.kernels.winograd import WinoWorkspace
from tests.reference import assert_close


def _prep(w: np.ndarray, stride, padding):
    """The implicit GEMM's tiles of a dense ungrouped weight (every filter and column kept)."""
    cout, cin, kh, kw = w.shape
    k = cin * kh * kw
    return prepare_implicit_gemm(np.ascontiguousarray(w.reshape(1, cout, k)), np.arange(cout)[None],
                                 np.arange(k)[None], w.shape, 1, stride, padding, (1, 1))


def test_which_layers_rearrange() -> None:
    assert s2d_stride((11, 11), (4, 4), (1, 1), 1) == (4, 4)  # AlexNet's conv1
    assert s2d_stride((5, 5), (2, 2), (1, 1), 1) == (2, 2)
    assert s2d_stride((9, 7), (3, 3), (1, 1), 1) == (3, 3)
    assert s2d_stride((11, 5), (4, 2), (1, 1), 1) == (4, 2)
    assert s2d_stride((3, 3), (1, 1), (1, 1), 1) is None  # already 3x3 stride 1
    assert s2d_stride((7, 7), (2, 2), (1, 1), 1) is None  # 4 taps a side (ResNet's stem)
    assert s2d_stride((3, 3), (2, 2), (1, 1), 1) is None  # 2 taps a side
    assert s2d_stride((11, 11), (4, 4), (2, 2), 1) is None  # dilated
    assert s2d_stride((11, 11), (4, 4), (1, 1), 2) is None  # grouped
    assert s2d_channels(3, (4, 4)) == 48 and s2d_channels(3, (2, 2)) == -(-12 // VW) * VW


@pytest.mark.parametrize("kernel,stride,padding,shape", [
    ((11, 11), (4, 4), (0, 0), (2, 3, 35, 39)),
    ((5, 5), (2, 2), (2, 2), (1, 5, 13, 12)),  # 20 channels: padding lanes
    ((9, 7), (3, 3), (1, 4), (3, 2, 20, 17)),  # one-sided reach past the image
])
@pytest.mark.parametrize("per_image", [False, True])
def test_rearranged_input_is_the_phase_planes(kernel, stride, padding, shape, per_image, rng) -> None:
    """Every lane of the blocked output is ``x[c, sh j + b - ph, sw k + d - pw]`` of its channel, 0 outside
    the image and in the padding channels."""
    x = rng.standard_normal(shape).astype(np.float32)
    geo = s2d_geometry(shape, kernel, stride, padding)
    c2, hs, ws = int(geo[9]), int(geo[7]), int(geo[8])
    xb = np.full((shape[0], c2 * hs * ws), np.nan, np.float32)
    if per_image:  # as the Winograd kernel's threads rearrange their images
        for b in range(shape[0]):
            rearrange_image(x[b].reshape(-1), xb[b], geo)
    else:
        space_to_depth_blocked(x.reshape(shape[0], -1), xb, geo)
    got = xb.reshape(shape[0], c2 // VW, hs, ws, VW).transpose(0, 1, 4, 2, 3).reshape(shape[0], c2, hs, ws)
    (sh, sw), (ph, pw) = stride, padding
    _, c, h, w = shape
    want = np.zeros_like(got)
    for q in range(c * sh * sw):
        ci, bi, di = q // (sh * sw), (q // sw) % sh, q % sw
        for j in range(hs):
            for k in range(ws):
                iy, ix = sh * j + bi - ph, sw * k + di - pw
                if 0 <= iy < h and 0 <= ix < w:
                    want[:, q, j, k] = x[:, ci, iy, ix]
    np.testing.assert_array_equal(got, want)


def test_rearranged_layer_is_the_layer(rng) -> None:
    """A stride-1 3x3 convolution of the rearranged weight over the rearranged input equals the layer."""
    w = rng.standard_normal((8, 3, 11, 11)).astype(np.float32)
    x = rng.standard_normal((1, 3, 43, 47)).astype(np.float32)
    geo = s2d_geometry(x.shape, (11, 11), (4, 4), (1, 2))
    c2, hs, ws = int(geo[9]), int(geo[7]), int(geo[8])
    xb = np.empty((1, c2 * hs * ws), np.float32)
    space_to_depth_blocked(x.reshape(1, -1), xb, geo)
    planes = xb.reshape(1, c2 // VW, hs, ws, VW).transpose(0, 1, 4, 2, 3).reshape(1, c2, hs, ws)
    got = F.conv2d(torch.from_numpy(planes), torch.from_numpy(s2d_weight(w, (4, 4)))).numpy()
    ref = F.conv2d(torch.from_numpy(x), torch.from_numpy(w), stride=4, padding=(1, 2)).numpy()
    assert_close(got, ref, rtol=1e-5)


CASES = [
    # cout, cin, kernel, stride, padding, (h, w), batch
    (96, 3, (11, 11), (4, 4), (0, 0), (99, 99), 1),  # AlexNet's conv1 on a smaller image
    (40, 5, (5, 5), (2, 2), (2, 2), (33, 36), 1),  # 20 channels rearranged: padding lanes
    (16, 4, (9, 9), (3, 3), (1, 1), (40, 38), 1),
    (24, 3, (11, 5), (4, 2), (2, 1), (50, 53), 1),
    (32, 3, (11, 11), (4, 4), (0, 0), (67, 67), 3),  # 3 images on 2 threads: shared, one chunk
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("epilogue", ["none", "relu", "residual+relu"])
def test_strided_layer_through_winograd_matches_torch(case, epilogue, rng, monkeypatch) -> None:
    cout, cin, kernel, stride, padding, (h, w_), batch = case
    monkeypatch.setattr(ig_mod, "WINOGRAD", None)  # the rule
    w = rng.standard_normal((cout, cin, *kernel)).astype(np.float32)
    w[rng.random(w.shape) < 0.16] = 0
    bias = rng.standard_normal(cout).astype(np.float32)
    x = rng.standard_normal((batch, cin, h, w_)).astype(np.float32)
    ref = F.conv2d(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(bias), stride=stride,
                   padding=padding).numpy()
    res = rng.standard_normal(ref.shape).astype(np.float32) if "residual" in epilogue else None
    if res is not None:
        ref = ref + res
    relu = epilogue != "none"
    if relu:
        ref = np.maximum(ref, 0)
    prep = _prep(w, stride, padding)
    out = np.full(ref.shape, np.nan, np.float32)
    run = bind_implicit_gemm_conv2d(prep, x.shape, bias, out, relu)
    ws = prep.workspace(x.shape)
    assert (isinstance(ws, WinoWorkspace) and ws.s2d.size) or split_by_image(batch, num_threads())
    run(x, res)
    assert_close(out, ref, rtol=4e-5, what=f"s2d winograd {case} {epilogue}")
    out2 = np.full(ref.shape, np.nan, np.float32)  # the unbound call
    implicit_gemm_conv2d(prep, x, bias, out2, relu, residual=res)
    assert_close(out2, ref, rtol=4e-5)


def test_batches_the_threads_split_keep_the_implicit_gemm(rng, monkeypatch) -> None:
    """With ``S2D_BY_IMAGE`` off, where the threads split the images a strided layer is not rearranged
    (the A/B switch; on by default, where it is); its output is the same."""
    w = rng.standard_normal((32, 3, 11, 11)).astype(np.float32)
    prep = _prep(w, (4, 4), (0, 0))
    assert ig_mod._use_winograd(prep, (4, 3, 99, 99), 2) == 4  # the default
    monkeypatch.setattr(ig_mod, "S2D_BY_IMAGE", False)
    assert ig_mod._use_winograd(prep, (1, 3, 99, 99), 2) == 4
    assert ig_mod._use_winograd(prep, (4, 3, 99, 99), 2) == 0
    x = rng.standard_normal((4, 3, 99, 99)).astype(np.float32)
    out = np.empty((4, 32, 23, 23), np.float32)
    implicit_gemm_conv2d(prep, x, None, out, relu=False)
    assert_close(out, F.conv2d(torch.from_numpy(x), torch.from_numpy(w), stride=4).numpy(), rtol=1e-5)


def test_one_thread_layer_without_bias(rng, monkeypatch) -> None:
    """A layer below the parallel threshold rearranges each image inside the one-thread kernel."""
    monkeypatch.setattr(ig_mod, "WINOGRAD", True)
    w = rng.standard_normal((8, 2, 5, 5)).astype(np.float32)
    x = rng.standard_normal((1, 2, 21, 21)).astype(np.float32)
    prep = _prep(w, (2, 2), (1, 1))
    out = np.full((1, 8, 10, 10), np.nan, np.float32)
    implicit_gemm_conv2d(prep, x, None, out, relu=True)
    ws = prep.workspace(x.shape)
    assert isinstance(ws, WinoWorkspace) and ws.serial and ws.s2d.size  # rearranged inside the kernel
    ref = np.maximum(F.conv2d(torch.from_numpy(x), torch.from_numpy(w), stride=2, padding=1).numpy(), 0)
    assert_close(out, ref, rtol=1e-5)


class _Stem(torch.nn.Module):
    """An AlexNet-like stem: 11x11 stride 4, ReLU, pool, then a 3x3 layer and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 32, 11, stride=4)
        self.conv2 = torch.nn.Conv2d(32, 16, 3, padding=1)
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.max_pool2d(torch.relu(self.conv1(x)), 3, 2)
        return self.fc(torch.relu(self.conv2(y)).mean(dim=(2, 3)))


def test_compiled_stem_from_four_threads(monkeypatch) -> None:
    """A compiled model whose strided stem runs through the rearrangement, called from 4 threads at batch
    1 (each thread its own rearranged buffer) and at batch 4 (not rearranged): every output the dense
    model's."""
    import sparsecnn
    from sparsecnn.kernels import winograd as wino_mod
    from tests.threads import call_from_threads

    calls: list[int] = []
    real = wino_mod.space_to_depth_blocked

    def counted(x, xb, geo):
        calls.append(x.shape[0])
        return real(x, xb, geo)

    monkeypatch.setattr(wino_mod, "space_to_depth_blocked", counted)
    torch.manual_seed(0)
    model = _Stem().eval()
    compiled = sparsecnn.compile(model, torch.randn(1, 3, 131, 131), {"conv1": "lowered"}, tune=False)
    g = torch.Generator().manual_seed(5)
    inputs = [torch.randn((1, 3, 131, 131) if i % 3 else (4, 3, 131, 131), generator=g) for i in range(48)]
    with torch.inference_mode():
        refs = [model(x) for x in inputs]
    calls.clear()
    outs = call_from_threads(compiled, inputs, 4)
    assert calls and set(calls) == {1}, "batch 1 ran rearranged (an image a call), batch 4 did not"
    for got, ref in zip(outs, refs, strict=True):
        assert_close(got, ref, rtol=1e-4)


def test_switched_on_where_the_threads_split_the_images(rng, monkeypatch) -> None:
    """``S2D_BY_IMAGE`` on (the default): each thread rearranges its own images inside the kernel."""
    monkeypatch.setattr(ig_mod, "S2D_BY_IMAGE", True)
    w = rng.standard_normal((32, 3, 11, 11)).astype(np.float32)
    w[rng.random(w.shape) < 0.16] = 0
    bias = rng.standard_normal(32).astype(np.float32)
    x = rng.standard_normal((4, 3, 99, 99)).astype(np.float32)
    prep = _prep(w, (4, 4), (0, 0))
    out = np.full((4, 32, 23, 23), np.nan, np.float32)
    implicit_gemm_conv2d(prep, x, bias, out, relu=True)
    ws = prep.workspace(x.shape)
    assert isinstance(ws, WinoWorkspace) and ws.s2d.size and (ws.by_image or num_threads() == 1)
    ref = F.conv2d(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(bias), stride=4).numpy()
    assert_close(out, np.maximum(ref, 0), rtol=4e-5)


def test_cost_model_counts_the_winograd_form_where_it_runs(monkeypatch) -> None:
    """The planner's estimate of ``lowered`` on an AlexNet-like conv1 counts Winograd's multiply-adds at
    batch 1 (a third of the implicit GEMM's) and the implicit GEMM's where the threads split the
    images, unless ``S2D_BY_IMAGE`` is on."""
    from sparsecnn.plan import estimate_seconds

    conv = torch.nn.Conv2d(3, 96, 11, stride=4)
    monkeypatch.setattr(ig_mod, "S2D_BY_IMAGE", False)
    one = estimate_seconds(conv, (1, 3, 227, 227), "lowered")
    four = estimate_seconds(conv, (4, 3, 227, 227), "lowered")
    if split_by_image(4, num_threads()):
        assert four / 4 > 2 * one
    monkeypatch.setattr(ig_mod, "S2D_BY_IMAGE", True)
    assert estimate_seconds(conv, (4, 3, 227, 227), "lowered") / 4 < 1.2 * one
