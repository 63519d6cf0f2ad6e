"""spmv-act (kernels/spmv_act.py): the linear that walks only the nonzero inputs, against dense torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sparsecnn.kernels.spmv_act import ActLinearPrep, act_sparse_linear, prepare_act_linear
from sparsecnn.layers import SparseLinear, sparsify
from sparsecnn.plan import _candidates
from tests.conftest import random_sparse
from tests.reference import assert_close, assert_layer_matches


def _input(rng: np.random.Generator, shape: tuple[int, int], zeros: float) -> np.ndarray:
    x = random_sparse(rng, shape, zeros)
    return x


@pytest.mark.parametrize("w_sparsity", [0.0, 0.5, 0.91, 1.0])  # 0 and 0.5: dense-column storage
@pytest.mark.parametrize("x_zeros", [0.0, 0.6, 0.95, 1.0])
@pytest.mark.parametrize("batch", [1, 2, 5])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_kernel_matches_dense(rng, w_sparsity: float, x_zeros: float, batch: int, bias: bool,
                              masked: bool) -> None:
    m, k = 37, 53
    w = random_sparse(rng, (m, k), w_sparsity)
    w[3] = 0.0  # an all-zero filter
    w[:, 7] = 0.0  # an all-zero column
    x = _input(rng, (batch, k), x_zeros)
    b = rng.standard_normal(m).astype(np.float32) if bias else None
    prep = prepare_act_linear(w, masked=masked)
    prep.check_format()
    assert prep.dense_columns == (np.count_nonzero(w) > 2 * w.size / 3)
    assert prep.masked == (masked and not prep.dense_columns)
    out = np.full((batch, m), np.nan, np.float32)
    act_sparse_linear(prep, x, b, out)
    ref = torch.nn.functional.linear(torch.from_numpy(x), torch.from_numpy(w),
                                     None if b is None else torch.from_numpy(b))
    assert_close(out, ref)
    act_sparse_linear(prep, x, b, out)  # the workspace is reused
    assert_close(out, ref)


@pytest.mark.parametrize("m", [8, 395, 1000])  # one vector; several register tiles plus a scalar tail
@pytest.mark.parametrize("relu", [False, True])
def test_bound_dense_columns_tiles_relu_and_nan(rng, m: int, relu: bool) -> None:
    from sparsecnn.kernels.spmv_act import bind_act_sparse_linear

    k = 300
    w = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal(m).astype(np.float32)
    prep = prepare_act_linear(w)
    assert prep.dense_columns
    out = np.full((1, m), np.nan, np.float32)
    run = bind_act_sparse_linear(prep, 1, b, out, relu)
    for zeros in (0.0, 0.5, 1.0):
        x = _input(rng, (1, k), zeros)
        if zeros == 0.5:
            x[0, 11], x[0, 200] = np.nan, np.inf  # nonzero: propagate as in torch
        run(x)
        ref = torch.nn.functional.linear(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b))
        ref = torch.relu(ref) if relu else ref
        np.testing.assert_array_equal(np.isnan(out), ref.isnan().numpy())
        fin = ~np.isnan(out)
        assert_close(torch.from_numpy(out[fin]), ref[torch.from_numpy(fin)])


def test_bytes_are_the_stored_arrays(rng) -> None:
    w = random_sparse(rng, (64, 300), 0.9)
    prep = prepare_act_linear(w, masked=False)
    nnz = int(np.count_nonzero(w))
    blocks = int(np.sum(-(-np.count_nonzero(w, axis=0) // 8)))
    # int32 block pointers per column; a block: eight uint16 rows and eight float32 values (48 bytes)
    assert prep.is_packed and prep.nnz == nnz
    assert prep.nbytes == (300 + 1) * 4 + blocks * 48
    masked = prepare_act_linear(w, masked=True)
    # one tile of 128 rows: a uint16 mask per 16-row group and column, int32 pointers, float32 values
    assert masked.nbytes == 300 * 8 * 2 + (300 + 1) * 4 + nnz * 4
    dense = prepare_act_linear(random_sparse(rng, (64, 300), 0.1))
    assert dense.nbytes == 64 * 300 * 4


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 70), k=st.integers(1, 70), batch=st.integers(1, 9),
       ws=st.sampled_from([0.0, 0.3, 0.8, 0.97]), xs=st.sampled_from([0.0, 0.5, 0.9, 1.0]),
       seed=st.integers(0, 2**16))
def test_layer_random_shapes(m: int, k: int, batch: int, ws: float, xs: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    lin = nn.Linear(k, m)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(random_sparse(rng, (m, k), ws)))
    layer = SparseLinear.from_dense(lin, "spmv-act")
    assert_layer_matches(layer, lin, torch.from_numpy(random_sparse(rng, (batch, k), xs)))


def test_planner_offers_spmv_act_for_sparse_inputs() -> None:
    lin = nn.Linear(16, 8)
    with torch.no_grad():
        lin.weight[:, 4:] = 0.0  # 75% zeros: CSC, worth it only for sparse inputs
    assert "spmv-act" in _candidates(lin, 1, input_density=0.4)
    assert "spmv-act" not in _candidates(lin, 1, input_density=0.9)
    assert "spmv-act" not in _candidates(lin, 64, input_density=0.1)
    dense = nn.Linear(16, 8)  # dense columns stream faster than GEMV at batch 1, zeros or not
    assert "spmv-act" in _candidates(dense, 1, input_density=1.0)
    assert "spmv-act" not in _candidates(dense, 2, input_density=1.0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    x = torch.randn(1, 32)
    fast = sparsify(model, "auto", measure=False, example_input=x)
    with torch.no_grad():
        assert_close(fast(x), model(x))


def test_checkpoint_round_trip(tmp_path) -> None:
    from sparsecnn.io import checkpoint

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5)).eval()
    with torch.no_grad():
        model[2].weight[model[2].weight.abs() < 0.15] = 0.0  # CSC for one layer, dense columns for the other
    fast = sparsify(model, "spmv-act")
    path = tmp_path / "m.npz"
    checkpoint.save(fast, path)
    fresh = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5))
    back = checkpoint.load(path, model=fresh)
    assert isinstance(back[0].format, type(fast[0].format))
    x = torch.relu(torch.randn(3, 20))
    with torch.no_grad():
        assert_close(back(x), model(x))


def _on_threads(fn) -> None:
    """fn() on one numba thread, then on two (where numba has them)."""
    import numba

    threads = numba.get_num_threads()
    try:
        for t in sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)}):
            numba.set_num_threads(t)
            fn()
    finally:
        numba.set_num_threads(threads)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("relu", [False, True])
def test_packed_layout_threads_skewed_columns_and_nan(rng, batch: int, relu: bool) -> None:
    """The packed layout: columns of very different lengths (one dense, most empty) split between
    threads by their blocks, on one thread and two; padding entries never reach an output, even
    when the input is NaN or inf; ReLU keeps NaN."""
    from sparsecnn.kernels.spmv_act import bind_act_sparse_linear

    m, k = 203, 90
    w = random_sparse(rng, (m, k), 0.95)
    w[:, 5] = rng.standard_normal(m)  # one long column (26 blocks, the last padded)
    w[:, 40:80] = 0.0
    b = rng.standard_normal(m).astype(np.float32)
    prep = prepare_act_linear(w, masked=False)
    prep.check_format()
    assert prep.is_packed and prep.index_dtype == np.uint16
    x = _input(rng, (batch, k), 0.5)
    x[0, 5] = 1.5
    x[-1, 6] = np.nan
    x[0, 7] = np.inf
    # torch makes whole rows NaN (0 * inf); the layer adds its stored nonzeros' products only
    with np.errstate(invalid="ignore", over="ignore"):
        stored = (w != 0)[None] & (x != 0)[:, None, :]
        terms = np.where(stored, x[:, None, :].astype(np.float64) * w[None], 0.0)
        expect = (terms.sum(axis=2) + b).astype(np.float32)
    assert np.isinf(expect).any() and np.isnan(expect).any() and np.isfinite(expect).any()

    def check() -> None:
        out = np.full((batch, m), -7.0, np.float32)
        bind_act_sparse_linear(prep, batch, b, out, relu)(x)
        want = np.where(expect > 0, expect, np.where(np.isnan(expect), np.nan, 0)) if relu else expect
        finite = np.isfinite(want)
        np.testing.assert_array_equal(np.isnan(out), np.isnan(want))
        np.testing.assert_array_equal(out[~finite & ~np.isnan(want)], want[~finite & ~np.isnan(want)])
        assert_close(out[finite], torch.from_numpy(want[finite]))
    _on_threads(check)


def test_packed_layout_wide_rows_use_uint32(rng) -> None:
    """Above 65535 rows the padding slot (row M) needs uint32 rows: 16-word blocks."""
    m, k = 70000, 3
    w = random_sparse(rng, (m, k), 0.999)
    w[69999, 1] = 2.0
    prep = prepare_act_linear(w, masked=False)
    prep.check_format()
    assert prep.index_dtype == np.uint32 and prep.packed.size == int(prep.indptr[-1]) * 16
    x = np.array([[0.5, 3.0, 0.0]], np.float32)
    out = np.empty((1, m), np.float32)
    act_sparse_linear(prep, x, None, out)
    np.testing.assert_allclose(out[0], x[0] @ w.T, rtol=1e-6, atol=1e-6)
    assert out[0, 69999] == 6.0


@pytest.mark.parametrize("nblocks", [1, 2, 3, 7])
@pytest.mark.parametrize("batch", [1, 3])
def test_csc_layout_of_older_files_runs(rng, nblocks: int, batch: int) -> None:
    """Files written before the packed layout hold a row-block-major CSC (any block count, or a
    plain CSC with ``row_blocks`` None): it loads, runs through a packed copy on 1 or 2 threads,
    and converts back to the same dense weight."""
    import dataclasses

    from sparsecnn.kernels.spmv_act import _prepare_csc

    w = random_sparse(rng, (45, 60), 0.85)
    x = _input(rng, (batch, 60), 0.5)
    ref = torch.nn.functional.linear(torch.from_numpy(x), torch.from_numpy(w))
    prep = _prepare_csc(w, nblocks)
    prep.check_format()
    assert prep.layout == "csc" and not prep.is_packed and prep.blocks.size - 1 == nblocks

    def check() -> None:
        out = np.full((batch, 45), np.nan, np.float32)
        act_sparse_linear(prep, x, None, out)
        assert_close(out, ref)
    _on_threads(check)
    assert prep.packed_twin().is_packed and prep.packed_twin() is prep.packed_twin()
    legacy = dataclasses.replace(_prepare_csc(w, 1), row_blocks=None)
    legacy.check_format()
    out = np.full((batch, 45), np.nan, np.float32)
    act_sparse_linear(legacy, x, None, out)
    assert_close(out, ref)
    for fmt in (prep, legacy):
        layer = SparseLinear.from_format(fmt, "spmv-act", in_features=60, out_features=45)
        np.testing.assert_array_equal(layer.engine.to_dense(), w)


def test_csc_layout_checkpoint_loads(rng, tmp_path) -> None:
    """A checkpoint whose spmv-act layer holds the row-block CSC (as files written before the packed
    layout do) loads, keeps that layout, and runs."""
    from sparsecnn.io import checkpoint
    from sparsecnn.kernels.spmv_act import _prepare_csc

    w = random_sparse(rng, (30, 40), 0.8)
    b = rng.standard_normal(30).astype(np.float32)
    layer = SparseLinear.from_format(_prepare_csc(w, 2), "spmv-act", in_features=40, out_features=30, bias=b)
    old = nn.Sequential(layer, nn.ReLU())
    path = tmp_path / "old.npz"
    checkpoint.save(old, path)
    back = checkpoint.load(path, model=nn.Sequential(nn.Linear(40, 30), nn.ReLU()))
    assert back[0].format.layout == "csc" and back[0].format.blocks.size == 3
    x = torch.from_numpy(_input(rng, (2, 40), 0.6))
    ref = torch.relu(torch.nn.functional.linear(x, torch.from_numpy(w), torch.from_numpy(b)))
    with torch.no_grad():
        assert_close(back(x), ref)


def test_row_outside_its_block_is_rejected(rng) -> None:
    from sparsecnn.errors import SparseCNNError
    from sparsecnn.kernels.spmv_act import _prepare_csc

    w = random_sparse(rng, (20, 10), 0.5)
    prep = _prepare_csc(w, 2)
    bad = prep.indices.copy()
    end = int(prep.indptr[1])  # column 0's part in block 0: its last row moved into block 1 (sorted)
    assert end > 0
    bad[end - 1] = int(prep.blocks[1])
    import dataclasses

    with pytest.raises(SparseCNNError, match="row block"):
        SparseLinear.from_format(dataclasses.replace(prep, indices=bad), "spmv-act", in_features=10,
                                 out_features=20)


def test_packed_layout_corruption_is_rejected(rng) -> None:
    """A packed layout read from a file is checked before any kernel runs: rows past the padding
    slots, padding on another lane's slot, a row twice in one column, padding that is not zero,
    pointers that do not match the buffer, NaN values, an unknown layout name."""
    import dataclasses

    from sparsecnn.errors import SparseCNNError

    m, k = 30, 12
    w = random_sparse(rng, (m, k), 0.7)
    w[:, 0] = 1.0  # column 0: 30 rows, four blocks, the last with two padding entries
    prep = prepare_act_linear(w, masked=False)
    SparseLinear.from_format(prep, "spmv-act", in_features=k, out_features=m)

    def corrupt(edit) -> ActLinearPrep:
        packed = prep.packed.copy()
        bad = dataclasses.replace(prep, packed=packed)
        edit(*bad.packed_views())
        return bad

    def rows_past(rows, vals) -> None:
        rows[0, 0] = m + 8  # past the eight padding slots

    def wrong_lane(rows, vals) -> None:
        rows[3, 6], rows[3, 7] = rows[3, 7], rows[3, 6]  # two padding entries swapped

    def repeated(rows, vals) -> None:
        rows[0, 1] = rows[0, 0]

    def padding_value(rows, vals) -> None:
        vals[3, 7] = 1.0  # column 0's last block: rows 24-29, then two padding entries

    def nan_value(rows, vals) -> None:
        vals[0, 0] = np.nan

    cases = [(corrupt(rows_past), "below"), (corrupt(wrong_lane), "lane"), (corrupt(repeated), "repeats"),
             (corrupt(padding_value), "padding"), (corrupt(nan_value), "NaN"),
             (dataclasses.replace(prep, indptr=prep.indptr[:-1]), "indptr"),
             (dataclasses.replace(prep, packed=prep.packed[:-12]), "blocks"),
             (dataclasses.replace(prep, packed=prep.packed.view(np.float32)), "uint32"),
             (dataclasses.replace(prep, layout="rows"), "layout")]
    for bad, match in cases:
        with pytest.raises(SparseCNNError, match=match):
            SparseLinear.from_format(bad, "spmv-act", in_features=k, out_features=m)


def test_large_linear_layers_are_timed_cold() -> None:
    """The planner and the executor time a linear layer cold when every candidate form of it is
    larger than COLD_LINEAR_BYTES (a forward pass evicts it), warm otherwise and for convolutions."""
    from types import SimpleNamespace

    from sparsecnn.plan import COLD_LINEAR_BYTES, times_cold

    big, small = SimpleNamespace(weight_nbytes=COLD_LINEAR_BYTES + 1), SimpleNamespace(weight_nbytes=1024)
    assert times_cold(nn.Linear(4, 4), [big, big])
    assert not times_cold(nn.Linear(4, 4), [big, small])
    assert not times_cold(nn.Conv2d(4, 4, 3), [big, big])
    assert not times_cold(nn.Linear(4, 4), [])


@pytest.mark.parametrize("m", [1, 127, 128, 129, 300])  # tiles of 128 rows, the last one partial or not
@pytest.mark.parametrize("relu", [False, True])
def test_masked_layout_tiles_relu_nan_and_threads(rng, m: int, relu: bool) -> None:
    """The masked layout against dense torch: partial last tiles, ReLU, 1 and 2 threads, batch 1 and
    3; a NaN or inf input spreads to every row as in the dense product (0 * inf is NaN)."""
    from sparsecnn.kernels.spmv_act import MASK_ROWS, bind_act_sparse_linear, masked_to_dense

    assert MASK_ROWS == 128
    k = 90
    w = random_sparse(rng, (m, k), 0.9)
    w[:, 5] = 0.0
    b = rng.standard_normal(m).astype(np.float32)
    prep = prepare_act_linear(w, masked=True)
    assert prep.masked and prep.ntiles == -(-m // 128)
    np.testing.assert_array_equal(masked_to_dense(prep), w)

    def check() -> None:
        for batch in (1, 3):
            out = np.full((batch, m), np.nan, np.float32)
            run = bind_act_sparse_linear(prep, batch, b, out, relu)
            for zeros in (0.0, 0.6, 1.0):
                x = _input(rng, (batch, k), zeros)
                if zeros == 0.6:
                    x[0, 11], x[-1, 40] = np.nan, np.inf
                run(x)
                ref = torch.nn.functional.linear(*(torch.from_numpy(a) for a in (x, w, b)))
                ref = (torch.relu(ref) if relu else ref).numpy()
                fin = np.isfinite(out)
                np.testing.assert_array_equal(fin, np.isfinite(ref))
                np.testing.assert_array_equal(out[~fin], ref[~fin])  # the same NaN and +-inf
                if fin.any():
                    assert_close(out[fin], ref[fin])
    _on_threads(check)


def test_masked_layout_corruption_is_rejected(rng) -> None:
    import dataclasses

    from sparsecnn.errors import SparseCNNError

    w = random_sparse(rng, (200, 30), 0.8)
    prep = prepare_act_linear(w, masked=True)
    layer = SparseLinear.from_format(prep, "spmv-act", in_features=30, out_features=200)
    np.testing.assert_array_equal(layer.engine.to_dense(), w)
    masks = prep.masks.copy()
    masks[np.flatnonzero(masks)[0]] ^= 1 << 15  # a bit more or fewer than the pointers say
    ptr = prep.tile_ptr.copy()
    ptr[-1] += 1
    pad = prep.masks.copy().reshape(2, 30, 8)
    pad[1, 0, 7] |= 1 << 15  # row 255: past the 200 rows
    bad_data = prep.data.copy()
    bad_data[0] = np.nan
    for bad, match in ((dataclasses.replace(prep, masks=masks), "mask bits"),
                       (dataclasses.replace(prep, tile_ptr=ptr), "rise from 0"),
                       (dataclasses.replace(prep, masks=prep.masks[:-1]), "masks must be"),
                       (dataclasses.replace(prep, masks=prep.masks.astype(np.int32)), "masks must be"),
                       (dataclasses.replace(prep, data=bad_data), "NaN"),
                       (dataclasses.replace(prep, masks=pad.reshape(-1)), "past the last|mask bits")):
        with pytest.raises(SparseCNNError, match=match):
            SparseLinear.from_format(bad, "spmv-act", in_features=30, out_features=200)


def test_dense_columns_stay_on_cache_lines_through_copies_and_pickles() -> None:
    import copy
    import pickle

    from sparsecnn.kernels._numba import ALIGN_BYTES
    from sparsecnn.kernels.spconv_input import prepare_spconv
    from sparsecnn.kernels.spmv_act import prepare_act_linear

    rng = np.random.default_rng(0)
    act = prepare_act_linear(rng.standard_normal((40, 24)).astype(np.float32))  # dense: dense columns
    spc = prepare_spconv(rng.standard_normal((16, 8, 3, 3)).astype(np.float32), 1)
    for prep, name in ((act, "dense_t"), (spc, "wt")):
        for again in (copy.deepcopy(prep), pickle.loads(pickle.dumps(prep))):
            a = getattr(again, name)
            assert a.ctypes.data % ALIGN_BYTES == 0
            np.testing.assert_array_equal(a, getattr(prep, name))
    # the channel form's weights (implicit GEMM) are rebuilt on cache lines after a copy
    from sparsecnn.kernels.implicit_gemm import prepare_implicit_gemm
    from sparsecnn.layers import SparseConv2d

    conv = torch.nn.Conv2d(16, 64, 3, padding=1, bias=False)
    fmt = SparseConv2d.from_dense(conv, "lowered").engine.format
    ig = prepare_implicit_gemm(fmt.data, fmt.row_map, fmt.col_index, (64, 16, 3, 3), 1, (1, 1), (1, 1),
                               (1, 1))
    wch = ig._chan_weights()[0]
    for again in (copy.deepcopy(ig), pickle.loads(pickle.dumps(ig))):
        w2 = again._chan_weights()[0]
        assert w2.ctypes.data % ALIGN_BYTES == 0
        np.testing.assert_array_equal(w2, wch)
