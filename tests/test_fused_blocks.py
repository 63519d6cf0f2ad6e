"""Generated inverted-residual networks (MobileNet-v2's blocks, hypothesis) compiled in the channel-blocked
layout: each block's expanding 1x1 conv, depthwise conv and projecting 1x1 conv, with their ReLU6s (or
ReLUs) and residual add, run as one step where the executor fuses them (``engine._lower``'s
``FUSE_EXPAND`` / ``FUSE_PROJECT``, :mod:`sparsecnn.kernels.expand_depthwise`) and as separate steps
where it does not (too few rows per thread, a second reader of a value, a 5x5 depthwise conv whose
taps span more than the ring's rows). Every output must equal the model's, at the example's batch
and another, on 1 and 2 threads, with the fusions on and off."""

from __future__ import annotations

import numba
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

import sparsecnn
from sparsecnn.engine import _lower
from sparsecnn.kernels.blocked import BLOCK


class _Block(nn.Module):
    """1x1 expand (``t > 1``) + BN + act, k x k depthwise + BN + act, 1x1 project + BN; the input added
    where the shape is kept and ``residual``; ``tap`` (a second reader of the expanded tensor) adds a
    global average of it to the output."""

    def __init__(self, cin: int, cout: int, t: int, k: int, stride: int, act: str, residual: bool,
                 tap: bool) -> None:
        super().__init__()
        mid = cin * t
        a = {"relu6": nn.ReLU6, "relu": nn.ReLU, "none": nn.Identity}[act]
        self.expand = nn.Sequential(nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), a()) if t > 1 \
            else None
        self.dw = nn.Sequential(nn.Conv2d(mid, mid, k, stride, k // 2, groups=mid, bias=False),
                                nn.BatchNorm2d(mid), a())
        self.project = nn.Sequential(nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = residual and stride == 1 and cin == cout
        self.tap = tap and t > 1 and cout == mid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.expand(x) if self.expand is not None else x
        y = self.project(self.dw(e))
        if self.residual:
            y = y + x
        if self.tap:
            y = y + e.mean(dim=(2, 3), keepdim=True)
        return y


@st.composite
def _nets(draw):
    cin = BLOCK * draw(st.integers(1, 2))
    layers: list[nn.Module] = [nn.Conv2d(3, cin, 3, 1, 1), nn.BatchNorm2d(cin), nn.ReLU6()]
    for _ in range(draw(st.integers(1, 3))):
        t = draw(st.sampled_from([1, 2, 3, 6]))
        cout = draw(st.sampled_from([cin, BLOCK * draw(st.integers(1, 3))]))
        layers.append(_Block(cin, cout, t, draw(st.sampled_from([3, 3, 3, 1, 5])), draw(st.integers(1, 2)),
                             draw(st.sampled_from(["relu6", "relu6", "relu", "none"])), draw(st.booleans()),
                             draw(st.integers(0, 5)) == 0))
        cin = cout
    net = nn.Sequential(*layers).eval()
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            elif isinstance(m, nn.Conv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.weight[0].numel() ** 0.5)
    side = draw(st.integers(4, 36))
    x = torch.randn(draw(st.sampled_from([1, 2, 3])), 3, side, side, generator=g)
    return net, x


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


# The loaded profile decides how hard this runs: 20 networks by default, 150 under ``make fuzz``.
EXAMPLES = 20 if settings().max_examples <= 20 else 150


@pytest.mark.fuzz
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_nets(), threads=st.sampled_from([1, 2]), fuse=st.booleans())
def test_generated_inverted_residual_nets_equal_the_model(case, threads: int, fuse: bool) -> None:
    net, x = case
    before = numba.get_num_threads(), _lower.FUSE_EXPAND
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    _lower.FUSE_EXPAND = fuse
    try:
        compiled = sparsecnn.compile(net, x, "direct", layout="blocked")  # check=True: compile checks too
        kinds = compiled.steps(tuple(x.shape))
        for k in kinds:
            if "blocked-dw" in k:
                event(k.split(">")[-1])
        assert fuse or not any("+project" in k or "expand" in k for k in kinds), kinds
        other = torch.randn(4 if x.shape[0] != 4 else 1, *x.shape[1:])
        with torch.inference_mode():
            for inp in (x, x, other):
                assert _rel(compiled(inp), net(inp)) <= 1e-4, (tuple(inp.shape), kinds)
    finally:
        numba.set_num_threads(before[0])
        _lower.FUSE_EXPAND = before[1]
