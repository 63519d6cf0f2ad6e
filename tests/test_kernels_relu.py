"""The fused ReLU epilogue of the direct convolution and the sparse linear kernels, against torch.relu
of torch's dense result (NaN kept as torch.relu keeps it)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sparsecnn.kernels import conv
from sparsecnn.kernels.conv import direct_conv2d, prepare_direct
from sparsecnn.kernels.spmv import prepare_linear, sparse_linear
from tests.conftest import random_sparse


def _check_relu(out, plain, ref, what):
    """``out`` (fused) is exactly ``relu(plain)`` (unfused, same kernel) and close to torch's ``ref``,
    with NaN exactly where torch has NaN and the negative half zero."""
    nan = np.isnan(ref)
    np.testing.assert_array_equal(np.isnan(out), nan, err_msg=f"{what}: NaN positions")
    expect = np.where(np.isnan(plain) | (plain > 0), plain, np.float32(0.0))
    np.testing.assert_array_equal(out, expect, err_msg=f"{what}: fused != relu(unfused)")
    fin = ~nan
    scale = float(np.abs(ref[fin]).max(initial=1.0))
    assert float(np.abs(out[fin].astype(np.float64) - ref[fin]).max(initial=0.0)) <= 1e-4 * scale, what
    assert (out[fin] >= 0).all() and (out[fin] == 0).mean() > 0.2, f"{what}: negatives not cut"


CASES = [
    # b, cin, cout, (h, w), (kh, kw), stride, padding, groups: one per store path of the kernel
    (1, 8, 16, (9, 9), (1, 1), (1, 1), (0, 0), 1),  # wide rows == output rows: tiles stored into out
    (2, 16, 6, (8, 8), (1, 1), (1, 1), (0, 0), 2),  # x read in place, grouped
    (1, 8, 13, (11, 13), (3, 3), (1, 1), (1, 1), 1),  # wide buffer + crop (odd filter count: span_tile)
    (3, 6, 10, (13, 9), (3, 3), (2, 2), (1, 1), 2),  # stride 2 phase planes
    (1, 3, 8, (35, 35), (11, 11), (4, 4), (0, 0), 1),  # AlexNet conv1-like: crop tail with scalars
]


def _force_form(monkeypatch, blocks) -> None:
    """The direct kernel's form: per-filter tiles in one block (False), in many input-channel blocks
    (True: the tiles accumulate, the crop applies the epilogue) or filter-group tiles ("grouped")."""
    monkeypatch.setattr(conv, "_GROUPED_BELOW", 0.0)
    if blocks == "grouped":
        monkeypatch.setattr(conv, "_GROUPED_BELOW", 1e9)
        monkeypatch.setattr(conv, "_GROUPED_MIN_COLUMNS", 0)
    elif blocks:
        monkeypatch.setattr(conv, "_L1_BYTES", 1)
        monkeypatch.setattr(conv, "_MIN_BLOCK_NNZ", 1)


@pytest.mark.parametrize("blocks", [False, True, "grouped"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c[0]}c{c[1]}-{c[2]}k{c[4]}s{c[5]}g{c[7]}")
def test_direct_conv_fused_relu(case, blocks, rng, monkeypatch):
    _force_form(monkeypatch, blocks)
    b, cin, cout, hw, k, stride, padding, groups = case
    w = random_sparse(rng, (cout, cin // groups, *k), 0.6)
    x = rng.standard_normal((b, cin, *hw)).astype(np.float32)
    bv = rng.standard_normal(cout).astype(np.float32)
    bv[[1, cout - 1]] = np.nan  # whole output channels NaN in torch and here
    ref = torch.relu(F.conv2d(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(bv), stride,
                              padding, 1, groups)).numpy()
    prep = prepare_direct(w, groups, stride, padding, (1, 1))
    if blocks is True:
        prep.workspace(x.shape)
        assert next(iter(prep._workspaces.values())).bptr.shape[0] > 1
    elif blocks == "grouped":
        assert prep.workspace(x.shape).grouped is not None
    plain = np.full(ref.shape, np.nan, dtype=np.float32)
    direct_conv2d(prep, x, bv, plain)
    out = np.full(ref.shape, -7.0, dtype=np.float32)
    direct_conv2d(prep, x, bv, out, relu=True)
    _check_relu(out, plain, ref, "direct_conv2d relu")
    # Without bias, and into a non-contiguous out.
    ref0 = torch.relu(F.conv2d(torch.from_numpy(x), torch.from_numpy(w), None, stride, padding, 1,
                               groups)).numpy()
    big = np.full((ref.shape[0], ref.shape[1] * 2, *ref.shape[2:]), -7.0, dtype=np.float32)
    direct_conv2d(prep, x, None, big[:, ::2], relu=True)
    direct_conv2d(prep, x, None, plain)
    _check_relu(big[:, ::2], plain, ref0, "direct_conv2d relu, no bias")


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("blocks", [False, True, "grouped"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c[0]}c{c[1]}-{c[2]}k{c[4]}s{c[5]}g{c[7]}")
def test_direct_conv_fused_residual(case, blocks, threads, rng, monkeypatch):
    """``relu(conv(x) + bias + residual)`` from the kernel's epilogue (the executor's conv + residual add
    + ReLU in one step), in every store path, direct and bound, against torch."""
    import numba

    _force_form(monkeypatch, blocks)
    b, cin, cout, hw, k, stride, padding, groups = case
    w = random_sparse(rng, (cout, cin // groups, *k), 0.6)
    x = rng.standard_normal((b, cin, *hw)).astype(np.float32)
    bv = rng.standard_normal(cout).astype(np.float32)
    dense = F.conv2d(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(bv), stride, padding, 1,
                     groups)
    res = rng.standard_normal(tuple(dense.shape)).astype(np.float32)
    res[0, 0, 0, 0] = np.nan  # a NaN in the residual reaches its output
    saved = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        prep = prepare_direct(w, groups, stride, padding, (1, 1))
        for relu in (False, True):
            ref = dense + torch.from_numpy(res)
            ref = (torch.relu(ref) if relu else ref).numpy()
            out = np.full(ref.shape, -7.0, dtype=np.float32)
            direct_conv2d(prep, x, bv, out, relu=relu, residual=res)
            bound = np.full(ref.shape, -7.0, dtype=np.float32)
            conv.bind_direct_conv2d(prep, x.shape, bv, bound, relu)(x, res)
            for y, what in ((out, "direct_conv2d"), (bound, "bound")):
                np.testing.assert_array_equal(np.isnan(y), np.isnan(ref), err_msg=f"{what}: NaN positions")
                fin = ~np.isnan(ref)
                err = np.abs(y[fin].astype(np.float64) - ref[fin]).max() / np.abs(ref[fin]).max()
                assert err <= 1e-5, (what, relu, err)
                if relu:
                    assert (y[fin] >= 0).all()
        if blocks == "grouped":
            assert prep.workspace(x.shape).grouped is not None
    finally:
        numba.set_num_threads(saved)
    with pytest.raises(ValueError, match="residual must be a float32 array"):
        direct_conv2d(prep, x, bv, out, residual=res[:, :1])
    with pytest.raises(ValueError, match="share memory"):
        direct_conv2d(prep, x, bv, out, residual=out)


@pytest.mark.parametrize("batch", [1, 3, 33])
def test_sparse_linear_fused_relu(batch, rng):
    m, k = 70, 129
    w = random_sparse(rng, (m, k), 0.6)
    x = rng.standard_normal((batch, k)).astype(np.float32)
    bv = rng.standard_normal(m).astype(np.float32)
    bv[[0, 5, m - 1]] = np.nan
    ref = torch.relu(F.linear(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(bv))).numpy()
    prep = prepare_linear(w)
    plain = np.empty((batch, m), dtype=np.float32)
    sparse_linear(prep, x, bv, plain)
    out = np.full((batch, m), -7.0, dtype=np.float32)
    sparse_linear(prep, x, bv, out, relu=True)
    _check_relu(out, plain, ref, "sparse_linear relu")
