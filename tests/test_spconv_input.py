"""spconv-act (kernels/spconv_input.py): sparse weights x sparse input, against dense torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from sparsecnn.kernels._simd import VW
from sparsecnn.kernels.spconv_input import prepare_spconv
from sparsecnn.layers import SparseConv2d
from tests.conftest import random_sparse
from tests.reference import assert_layer_matches


@pytest.mark.parametrize("w_sparsity", [0.0, 0.65, 1.0])
@pytest.mark.parametrize("x_zeros", [0.0, 0.7, 1.0])
@pytest.mark.parametrize(("groups", "stride", "padding", "dilation"),
                         [(1, 1, 1, 1), (2, 2, 0, 1), (3, 1, 2, 2)])
@pytest.mark.parametrize("batch", [1, 2])
def test_matches_dense(rng, w_sparsity, x_zeros, groups, stride, padding, dilation, batch) -> None:
    conv = nn.Conv2d(6, 7 * groups, 3, stride=stride, padding=padding, dilation=dilation,
                     groups=groups)
    with torch.no_grad():
        w = random_sparse(rng, tuple(conv.weight.shape), w_sparsity)
        w[2] = 0.0  # an all-zero filter
        w[:, 1, 0, 0] = 0.0  # an all-zero lowered column
        conv.weight.copy_(torch.from_numpy(w))
    x = torch.from_numpy(random_sparse(rng, (batch, 6, 9, 11), x_zeros))
    layer = SparseConv2d.from_dense(conv, "spconv-act")
    assert_layer_matches(layer, conv, x)
    assert_layer_matches(layer, conv, torch.relu(x))  # the workspace is reused


def test_bytes_are_what_it_holds() -> None:
    w = np.zeros((16, 4, 3, 3), np.float32)
    w[:, 0] = 1.0  # 1 of 4 input channels kept
    prep = prepare_spconv(w, 1)
    prep.check_format()
    groups, ntiles, nchunks, taps, cc, tw = prep.wt.shape
    assert (groups, ntiles * tw, nchunks * cc, taps) == (1, 16, 1, 9)
    assert prep.nbytes == 9 * 16 * 4 + 4 * 4 + 4 == SparseConv2d.from_format(
        prep, "spconv-act", in_channels=4, out_channels=16, kernel_size=3).weight_nbytes
    np.testing.assert_array_equal(prep.to_dense(), w)


@pytest.mark.parametrize(("tile_vectors", "chunk_bytes"),
                         [(1, 1), (1, 4096), (2, 40 * 1024), (8, 20 * 1024)])
@pytest.mark.parametrize(("cin", "cout", "k", "stride", "padding", "groups"),
                         [(40, 70, 3, 1, 1, 1), (24, 36, 1, 1, 0, 2), (3, 20, 5, 2, 2, 1),
                          (32, 48, 3, 2, 1, 4), (3, 16, 11, 4, 2, 1)])
def test_tiles_and_chunks(rng, monkeypatch, tile_vectors, chunk_bytes, cin, cout, k, stride, padding,
                          groups) -> None:
    """Several output-channel tiles (the last one partial) and input-channel chunks (below and at
    whole vectors, the scalar and vector list merges), against torch."""
    import sparsecnn.kernels.spconv_input as mod

    monkeypatch.setattr(mod, "_TILE_FLOATS", tile_vectors * VW)
    monkeypatch.setattr(mod, "_CHUNK_BYTES", chunk_bytes)
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, groups=groups)
    with torch.no_grad():
        w = random_sparse(rng, tuple(conv.weight.shape), 0.6)
        w[:, 1] = 0.0  # a removed input channel in every group
        conv.weight.copy_(torch.from_numpy(w))
    layer = SparseConv2d.from_dense(conv, "spconv-act")
    layer.engine.format.check_format()
    np.testing.assert_array_equal(layer.engine.format.to_dense(), w)
    for zeros in (0.0, 0.7, 1.0):
        x = torch.from_numpy(random_sparse(rng, (2, cin, 11, 9), zeros))
        assert_layer_matches(layer, conv, x)


def test_nan_and_inf_inputs_propagate(rng) -> None:
    """A NaN or inf input is nonzero: it reaches every output it touches, as in torch."""
    conv = nn.Conv2d(8, 16, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(random_sparse(rng, (16, 8, 3, 3), 0.0)))
    x = torch.from_numpy(random_sparse(rng, (1, 8, 7, 7), 0.5))
    x[0, 2, 3, 3] = float("nan")
    x[0, 5, 0, 0] = float("inf")
    layer = SparseConv2d.from_dense(conv, "spconv-act")
    with torch.no_grad():
        got, ref = layer(x), conv(x)
    np.testing.assert_array_equal(torch.isnan(got).numpy(), torch.isnan(ref).numpy())
    finite = torch.isfinite(ref)
    torch.testing.assert_close(got[finite], ref[finite], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("k", "stride", "padding"), [(3, 2, 1), (1, 1, 0), (1, 2, 1)])
def test_input_list_bytes_are_the_workspace(rng, k, stride, padding) -> None:
    """The input-side bytes the report quotes are the arrays the kernel allocates (a 1x1 stride-1
    layer reads its position lists as pixel lists)."""
    from sparsecnn.kernels.spconv_input import input_list_nbytes, spconv_input

    w = random_sparse(rng, (24, 5, k, k), 0.5)
    prep = prepare_spconv(w, 1)
    conv = nn.Conv2d(5, 24, k, stride=stride, padding=padding, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(w))
    x = random_sparse(rng, (2, 5, 3, 3), 0.6)
    ref = conv(torch.from_numpy(x)).detach().numpy()
    out = np.empty(ref.shape, np.float32)
    ws: dict = {}
    geometry = (k, k, stride, stride, padding, padding, 1, 1)
    spconv_input(prep, x, geometry, None, out, ws)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
    names = ("offs", "vals", "counts", "loffs", "lvals", "lstart", "lcounts")
    arrays = {id(ws[n].base if ws[n].base is not None else ws[n]): ws[n] for n in names}
    held = sum(a.nbytes for a in arrays.values())
    assert input_list_nbytes(prep, 2, (3, 3), ref.shape[2:], geometry) == held


def test_compiled_model_runs_spconv_act_bound_and_from_threads(rng) -> None:
    """The executor binds spconv-act steps (ReLU fused into the NCHW copy) and every Python thread
    gets its own lists: four threads calling one compiled model each get their own right output."""
    import threading

    import sparsecnn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(32, 24, 3, stride=2, padding=1), nn.ReLU(),
                          nn.Conv2d(24, 24, 1), nn.ReLU()).eval()
    with torch.no_grad():
        for mod in model:
            if isinstance(mod, nn.Conv2d):
                mod.weight.copy_(torch.from_numpy(random_sparse(rng, tuple(mod.weight.shape), 0.6)))
    x = torch.relu(torch.randn(2, 16, 15, 13))
    fast = sparsecnn.compile(model, x, "spconv-act")
    assert fast.steps(tuple(x.shape)) == ["conv:spconv-act+relu"] * 3
    xs = [torch.from_numpy(random_sparse(rng, (2, 16, 15, 13), 0.7)) for _ in range(4)]
    outs: list = [None] * 4

    def work(i: int) -> None:
        for _ in range(10):
            outs[i] = fast(xs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with torch.no_grad():
        for i in range(4):
            ref = model(xs[i])
            assert float((outs[i] - ref).abs().max()) <= 1e-4 * float(ref.abs().max())


@pytest.mark.parametrize(("k", "stride", "padding"), [(3, 1, 1), (1, 1, 0)])
def test_batch_runs_in_slices_within_the_budget(rng, monkeypatch, k, stride, padding) -> None:
    """A batch whose lists exceed the workspace budget runs a few images at a time (the last slice
    short), with the same result, and the reported bytes are one slice's."""
    import sparsecnn.kernels.spconv_input as mod

    conv = nn.Conv2d(12, 20, k, stride=stride, padding=padding)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(random_sparse(rng, tuple(conv.weight.shape), 0.5)))
    prep = prepare_spconv(conv.weight.detach().numpy(), 1)
    geometry = (k, k, stride, stride, padding, padding, 1, 1)
    per = sum(mod._per_image_nbytes(prep, (9, 7), (9, 7), geometry))
    monkeypatch.setattr(mod, "_WORKSPACE_BUDGET", 2 * per + 1)  # two images a pass: slices 2, 2, 1
    assert mod.images_per_pass(prep, 5, (9, 7), (9, 7), geometry) == 2
    layer = SparseConv2d.from_dense(conv, "spconv-act")
    x = torch.from_numpy(random_sparse(rng, (5, 12, 9, 7), 0.6))
    assert_layer_matches(layer, conv, x)
    assert mod.input_list_nbytes(prep, 5, (9, 7), (9, 7), geometry) == 2 * mod._per_image_nbytes(
        prep, (9, 7), (9, 7), geometry)[0]
