"""One sparsified model called from several Python threads at once gives every caller its own answer.

Serving code calls a model from a thread pool. The layers keep per-input-shape workspaces that their
kernels write (phase-decomposed inputs, wide output rows, im2col buffers); shared between threads
they gave silently wrong outputs. Each test runs 4 threads x 50 calls on mixed input shapes through
one model and compares every output with the dense model.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import sparsecnn
from tests.conftest import random_sparse
from tests.threads import call_from_threads

THREADS = 4
CALLS = 50
SHAPES = ((1, 4, 12, 12), (2, 4, 12, 12), (1, 4, 16, 16), (3, 4, 9, 11))


class _Net(nn.Module):
    """Stride 1 and 2, groups, 1x1, pool and a linear over a global average: every engine's workspaces."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(4, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=2)
        self.c3 = nn.Conv2d(16, 24, 1)
        self.fc = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c1(x))
        x = torch.relu(self.c2(x))
        x = torch.relu(self.c3(x))
        return self.fc(x.mean(dim=(2, 3)))


def _pruned_net() -> nn.Module:
    torch.manual_seed(0)
    net = _Net().eval()
    rng = np.random.default_rng(0)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.copy_(torch.from_numpy(random_sparse(rng, tuple(m.weight.shape), 0.7)))
    return net


def _inputs() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    # Thread t takes calls t, t + THREADS, ...: at each step all threads run the same shape (what
    # collided), and the shape changes from step to step (workspaces for several shapes at once).
    return [torch.randn(SHAPES[(i // THREADS) % len(SHAPES)], generator=g) for i in range(THREADS * CALLS)]


def _hammer(model, inputs: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """Run ``model`` on every input, ``THREADS`` threads taking interleaved inputs, all released at once."""
    return call_from_threads(model, inputs, THREADS)


def _check(outputs, refs) -> None:
    bad = [i for i, (y, r) in enumerate(zip(outputs, refs, strict=True))
           if y is None or y.shape != r.shape or not torch.allclose(y, r, rtol=1e-4, atol=1e-4)]
    assert not bad, f"{len(bad)} of {len(refs)} outputs differ from the dense model (first: call {bad[0]})"


@pytest.mark.parametrize("strategy", [s for s in sparsecnn.strategies("conv") if s != "torch"])
def test_sparsified_model_from_four_threads(strategy: str) -> None:
    net = _pruned_net()
    inputs = _inputs()
    with torch.inference_mode():
        refs = [net(x) for x in inputs]
    fast = sparsecnn.sparsify(net, strategy)
    _check(_hammer(fast, inputs), refs)


@pytest.mark.parametrize("strategy", ["spmm", "direct"])
def test_spmv_linear_from_four_threads(strategy: str) -> None:
    """The linear kernels' transposed-input and row buffers are per thread too (batch 1 and > 1):
    spmm's, and the batch-lanes form's (``direct``: transposed input and output, the conv workspace)."""
    rng = np.random.default_rng(2)
    lin = nn.Linear(300, 70).eval()
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(random_sparse(rng, (70, 300), 0.8)))
    layer = sparsecnn.SparseLinear.from_dense(lin, strategy)
    g = torch.Generator().manual_seed(3)
    inputs = [torch.randn((1 + (i // THREADS) % 3, 300), generator=g) for i in range(THREADS * CALLS)]
    with torch.inference_mode():
        refs = [lin(x) for x in inputs]
    _check(_hammer(layer, inputs), refs)


@pytest.mark.parametrize("layout", ["default", "csc"])
def test_spmv_act_from_four_threads(layout: str) -> None:
    """spmv-act's nonzero-input lists, thread splits and per-thread sums are per calling thread
    (batch 1 and > 1, inputs half zeros); a layer in the older csc layout makes its packed copy on
    first use, here from four threads at once."""
    from sparsecnn.kernels.spmv_act import _prepare_csc

    rng = np.random.default_rng(4)
    lin = nn.Linear(300, 70).eval()
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(random_sparse(rng, (70, 300), 0.85)))
    if layout == "csc":
        layer = sparsecnn.SparseLinear.from_format(_prepare_csc(lin.weight.detach().numpy(), 2), "spmv-act",
                                                   in_features=300, out_features=70,
                                                   bias=lin.bias.detach().numpy())
    else:
        layer = sparsecnn.SparseLinear.from_dense(lin, "spmv-act")
    g = torch.Generator().manual_seed(5)
    shapes = [(1 + (i // THREADS) % 3, 300) for i in range(THREADS * CALLS)]
    inputs = [torch.relu(torch.randn(shape, generator=g)) for shape in shapes]
    with torch.inference_mode():
        refs = [lin(x) for x in inputs]
    _check(_hammer(layer, inputs), refs)
