"""Tests for sparsecnn.formats: round trips, exact bytes, dtype choice, invariants, lowering.

Every format is checked against a slow, obviously correct reference encoder written here with plain
Python loops, and through one shared assert (:func:`assert_encodes`) that also runs the format's
invariant check.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import pytest
import scipy.sparse
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsecnn.errors import SparseCNNError
from sparsecnn.formats import (
    FORMATS,
    BSRMatrix,
    CSRMatrix,
    RelativeIndexMatrix,
    conv_weight_nbytes,
    index_dtype,
    lower_conv_weight,
    matrix_nbytes,
    pack_gaps,
    pointer_dtype,
    unlower_conv_weight,
    unpack_gaps,
)
from tests.conftest import random_sparse

AnyMatrix = CSRMatrix | BSRMatrix | RelativeIndexMatrix


# ---------------------------------------------------------------------------------------------
# Slow references: one Python loop per format, written straight from the definitions.


def ref_csr(a: np.ndarray) -> tuple[list[int], list[int], list[float]]:
    indptr, indices, data = [0], [], []
    for row in a:
        for j, v in enumerate(row):
            if v != 0:
                indices.append(j)
                data.append(v)
        indptr.append(len(indices))
    return indptr, indices, data


def ref_bsr(a: np.ndarray, r: int, c: int) -> tuple[list[int], list[int], list[np.ndarray]]:
    m, n = a.shape
    mb, nb = -(-m // r), -(-n // c)
    indptr, indices, blocks = [0], [], []
    for bi in range(mb):
        for bj in range(nb):
            block = np.zeros((r, c), a.dtype)
            part = a[bi * r:(bi + 1) * r, bj * c:(bj + 1) * c]
            block[:part.shape[0], :part.shape[1]] = part
            if np.any(block != 0):
                indices.append(bj)
                blocks.append(block)
        indptr.append(len(indices))
    return indptr, indices, blocks


def ref_relative(a: np.ndarray, bits: int) -> tuple[list[int], list[int], list[float]]:
    span = 2**bits - 1
    indptr, gaps, data = [0], [], []
    for row in a:
        prev = -1
        for j, v in enumerate(row):
            if v != 0:
                gap = j - prev - 1
                while gap > span:  # a filler zero sits span + 1 columns further on
                    gaps.append(span)
                    data.append(0)
                    gap -= span + 1
                gaps.append(gap)
                data.append(v)
                prev = j
        indptr.append(len(gaps))
    return indptr, gaps, data


# The registry every generic test runs over (DESIGN rule 6): name -> (encoder, reference check).
ENCODERS: dict[str, Callable[[np.ndarray], AnyMatrix]] = {
    "csr": CSRMatrix.from_dense,
    "bsr4x4": lambda a: BSRMatrix.from_dense(a, (4, 4)),
    "bsr2x3": lambda a: BSRMatrix.from_dense(a, (2, 3)),
    "bsr1x1": lambda a: BSRMatrix.from_dense(a, (1, 1)),
    "relative4": lambda a: RelativeIndexMatrix.from_dense(a, index_bits=4),
    "relative8": lambda a: RelativeIndexMatrix.from_dense(a, index_bits=8),
}


def assert_matches_reference(m: AnyMatrix, a: np.ndarray) -> None:
    if isinstance(m, CSRMatrix):
        indptr, indices, data = ref_csr(a)
        assert m.indptr.tolist() == indptr
        assert m.indices.tolist() == indices
        np.testing.assert_array_equal(m.data, np.array(data, a.dtype))
    elif isinstance(m, BSRMatrix):
        indptr, indices, blocks = ref_bsr(a, *m.blocksize)
        assert m.indptr.tolist() == indptr
        assert m.indices.tolist() == indices
        np.testing.assert_array_equal(m.data, np.array(blocks, a.dtype).reshape(-1, *m.blocksize))
    else:
        indptr, gaps, data = ref_relative(a, m.index_bits)
        assert m.indptr.tolist() == indptr
        assert m.gap_values.tolist() == gaps
        np.testing.assert_array_equal(m.data, np.array(data, a.dtype))


def assert_encodes(m: AnyMatrix, a: np.ndarray) -> None:
    """The one shared assert: invariants hold, exact round trip, byte and count bookkeeping."""
    m.check_format()
    dense = m.to_dense()
    assert dense.shape == a.shape
    assert dense.dtype == a.dtype
    np.testing.assert_array_equal(dense, a)
    nnz = int(np.count_nonzero(a))
    assert m.nnz == nnz
    assert m.shape == a.shape
    assert m.dense_nbytes == a.nbytes
    assert m.sparsity == (0.0 if a.size == 0 else pytest.approx(1 - nnz / a.size))
    assert m.data.dtype == a.dtype
    if isinstance(m, RelativeIndexMatrix):
        assert m.nbytes == m.data.nbytes + m.gaps.nbytes + m.indptr.nbytes
        assert m.gaps.nbytes == -(-m.n_entries * m.index_bits // 8)
        assert m.n_entries == m.nnz + m.n_fillers
        assert m.indptr.dtype == pointer_dtype(m.n_entries)
    else:
        assert m.nbytes == m.data.nbytes + m.indices.nbytes + m.indptr.nbytes
        if isinstance(m, CSRMatrix):
            assert m.indices.dtype == index_dtype(a.shape[1])
            assert m.indptr.dtype == pointer_dtype(m.nnz)
        else:
            assert m.indices.dtype == index_dtype(-(-a.shape[1] // m.blocksize[1]))
            assert m.indptr.dtype == pointer_dtype(m.nblocks)
    assert_matches_reference(m, a)


# ---------------------------------------------------------------------------------------------
# Round trips


@st.composite
def sparse_matrices(draw: st.DrawFn, max_rows: int = 9, max_cols: int = 70) -> np.ndarray:
    m = draw(st.integers(0, max_rows))
    n = draw(st.integers(0, max_cols))
    sparsity = draw(st.one_of(st.sampled_from([0.0, 0.5, 0.9, 0.97, 1.0]), st.floats(0.0, 1.0)))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    a = random_sparse(rng, (m, n), sparsity)
    if m and draw(st.booleans()):  # force some empty rows
        a[rng.random(m) < 0.4] = 0
    dtype = draw(st.sampled_from(["float32", "float32", "float64", "float16", "int32"]))
    return (a * 100).astype(dtype) if dtype == "int32" else a.astype(dtype)


@pytest.mark.parametrize("name", list(ENCODERS))
@settings(max_examples=60, deadline=None)
@given(a=sparse_matrices())
def test_round_trip_random(name: str, a: np.ndarray) -> None:
    assert_encodes(ENCODERS[name](a), a)


@pytest.mark.parametrize("bits", [4, 8])
@settings(max_examples=40, deadline=None)
@given(a=sparse_matrices(max_rows=3, max_cols=800))
def test_relative_wide_rows(bits: int, a: np.ndarray) -> None:
    """Rows wide enough that 8-bit gaps also need fillers."""
    assert_encodes(RelativeIndexMatrix.from_dense(a, index_bits=bits), a)


@pytest.mark.parametrize("name", list(ENCODERS))
@pytest.mark.parametrize("shape", [(0, 0), (0, 5), (5, 0), (1, 1), (1, 7), (7, 1), (5, 6)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
def test_round_trip_edge_shapes(name: str, shape: tuple[int, int], sparsity: float) -> None:
    a = random_sparse(np.random.default_rng(1), shape, sparsity)
    assert_encodes(ENCODERS[name](a), a)


@pytest.mark.parametrize("name", list(ENCODERS))
def test_empty_rows_and_non_contiguous_input(name: str, rng: np.random.Generator) -> None:
    a = random_sparse(rng, (9, 40), 0.6)
    a[[0, 3, 4, 8]] = 0
    assert_encodes(ENCODERS[name](a), a)
    t = np.asfortranarray(a.T[:, ::2])  # neither C-contiguous nor unit stride in the source
    assert_encodes(ENCODERS[name](t), np.ascontiguousarray(t))


@pytest.mark.parametrize("name", list(ENCODERS))
def test_accepts_torch_tensor(name: str, rng: np.random.Generator) -> None:
    a = random_sparse(rng, (6, 20), 0.7)
    t = torch.from_numpy(a.copy()).requires_grad_(True)
    assert_encodes(ENCODERS[name](t), a)


def test_all_zero_and_1x1(rng: np.random.Generator) -> None:
    z = np.zeros((3, 50), np.float32)
    csr = CSRMatrix.from_dense(z)
    assert (csr.nnz, csr.sparsity, csr.nbytes) == (0, 1.0, 4 * 2)  # only indptr: 4 int16
    assert BSRMatrix.from_dense(z).nblocks == 0
    rel = RelativeIndexMatrix.from_dense(z)
    assert (rel.n_entries, rel.n_fillers, rel.nbytes) == (0, 0, 4 * 2)
    one = np.array([[2.5]], np.float32)
    assert CSRMatrix.from_dense(one).nbytes == 4 + 2 + 2 * 2
    assert BSRMatrix.from_dense(one).nbytes == 16 * 4 + 2 + 2 * 2  # one padded 4x4 block
    assert RelativeIndexMatrix.from_dense(one, 4).nbytes == 4 + 1 + 2 * 2
    assert CSRMatrix.from_dense(np.zeros((0, 0), np.float32)).sparsity == 0.0


def test_csr_matches_scipy(rng: np.random.Generator) -> None:
    a = random_sparse(rng, (30, 50), 0.8)
    ours, ref = CSRMatrix.from_dense(a), scipy.sparse.csr_matrix(a)
    np.testing.assert_array_equal(ours.indptr, ref.indptr)
    np.testing.assert_array_equal(ours.indices, ref.indices)
    np.testing.assert_array_equal(ours.data, ref.data)


# ---------------------------------------------------------------------------------------------
# Exact bytes, computed by hand


def test_csr_bytes_by_hand() -> None:
    a = np.array([[1, 0, 2, 0], [0, 0, 0, 3], [4, 5, 0, 0]], np.float32)  # 3x4, 5 nonzeros
    m = CSRMatrix.from_dense(a)
    assert m.nbytes == 5 * 4 + 5 * 2 + 4 * 2  # float32 values, int16 columns, 4 int16 pointers
    assert m.dense_nbytes == 12 * 4
    assert m.indptr.tolist() == [0, 2, 3, 5]
    assert m.indices.tolist() == [0, 2, 3, 0, 1]
    assert m.sparsity == pytest.approx(7 / 12)
    assert CSRMatrix.from_dense(a.astype(np.float64)).nbytes == 5 * 8 + 5 * 2 + 4 * 2


def test_bsr_bytes_by_hand() -> None:
    a = np.zeros((4, 6), np.float32)
    a[0, 0], a[3, 5], a[2, 4] = 1, 2, 3  # blocks (0, 0) and (1, 2) of a 2x3 grid of 2x2 blocks
    m = BSRMatrix.from_dense(a, (2, 2))
    assert m.nbytes == 2 * (2 * 2) * 4 + 2 * 2 + 3 * 2
    assert m.indptr.tolist() == [0, 1, 2]
    assert m.indices.tolist() == [0, 2]
    assert (m.nblocks, m.nnz) == (2, 3)
    # 5x5 with 4x4 blocks: 2x2 block grid, padded; nonzero at (4, 4) lives in the corner block.
    b = np.zeros((5, 5), np.float32)
    b[0, 1], b[4, 4] = 1, 1
    mb = BSRMatrix.from_dense(b)
    assert mb.nbytes == 2 * 16 * 4 + 2 * 2 + 3 * 2
    assert mb.data.shape == (2, 4, 4)
    assert mb.dense_nbytes == 25 * 4


@pytest.mark.parametrize(
    ("n", "cols", "bits", "gaps", "nbytes"),
    [
        (16, [15], 4, [15], 4 + 1 + 2 * 2),  # gap 15 = span: no filler
        (17, [16], 4, [15, 0], 2 * 4 + 1 + 2 * 2),  # gap 16: one filler at column 15
        (32, [31], 4, [15, 15], 2 * 4 + 1 + 2 * 2),  # filler at 15, value at 31 with gap 15
        (33, [32], 4, [15, 15, 0], 3 * 4 + 2 + 2 * 2),  # fillers at 15 and 31
        (40, [0, 39], 4, [0, 15, 15, 6], 4 * 4 + 2 + 2 * 2),  # columns 0, 16, 32, 39
        (40, [0, 39], 8, [0, 38], 2 * 4 + 2 + 2 * 2),
        (1000, [0], 4, [0], 4 + 1 + 2 * 2),  # trailing zeros need no filler
        (256, [255], 8, [255], 4 + 1 + 2 * 2),  # gap 255 = span
        (257, [256], 8, [255, 0], 2 * 4 + 2 + 2 * 2),
        (600, [599], 8, [255, 255, 87], 3 * 4 + 3 + 2 * 2),  # fillers at 255 and 511
        (600, [599], 4, [15] * 37 + [7], 38 * 4 + 19 + 2 * 2),  # 599 = 37 * 16 + 7
    ],
)
def test_relative_fillers_by_hand(n: int, cols: list[int], bits: int, gaps: list[int], nbytes: int) -> None:
    a = np.zeros((1, n), np.float32)
    a[0, cols] = np.arange(1, len(cols) + 1)
    m = RelativeIndexMatrix.from_dense(a, index_bits=bits)
    assert m.gap_values.tolist() == gaps
    assert m.n_entries == len(gaps)
    assert m.n_fillers == len(gaps) - len(cols)
    assert m.nnz == len(cols)
    assert m.nbytes == nbytes
    assert_encodes(m, a)


def test_relative_fillers_restart_per_row() -> None:
    a = np.zeros((3, 20), np.float32)
    a[0, 19] = 1  # gap 19 > 15: one filler
    a[2, 3] = 2  # the gap counts from the start of its own row, not from row 0's last entry
    m = RelativeIndexMatrix.from_dense(a, 4)
    assert m.gap_values.tolist() == [15, 3, 3]
    assert m.indptr.tolist() == [0, 2, 2, 3]
    assert m.nbytes == 3 * 4 + 2 + 4 * 2


def test_gap_packing_nibble_order() -> None:
    packed = pack_gaps(np.array([1, 2, 3], np.uint8), 4)
    assert packed.tolist() == [0x21, 0x03]  # entry 2k in the low nibble, trailing nibble 0
    assert unpack_gaps(packed, 3, 4).tolist() == [1, 2, 3]
    assert pack_gaps(np.array([1, 200], np.uint8), 8).tolist() == [1, 200]


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [("dense", 32), ("csr", 16 + 4), ("bsr", 70 + 4), ("relative4", 13 + 4), ("relative8", 14 + 4),
     ("relative", 17)],
)
def test_conv_weight_nbytes_by_hand(fmt: str, expected: int) -> None:
    # Depthwise 2-channel 2x2 conv: group 0 is the 1x4 row [1, 0, 0, 2], group 1 is all zero.
    # csr: group 0 = 2*4 values + 2*2 columns + 2*2 pointers, group 1 = 2*2 pointers.
    # bsr 4x4: group 0 = one padded block 64 + 2 + 2*2, group 1 = 2*2 pointers.
    # relative4: gaps [0, 2] -> 2*4 + 1 + 2*2; relative8: 2*4 + 2 + 2*2; group 1: 2*2 each.
    w = np.zeros((2, 1, 2, 2), np.float32)
    w[0, 0, 0, 0], w[0, 0, 1, 1] = 1, 2
    assert conv_weight_nbytes(w, 2, fmt) == expected
    assert conv_weight_nbytes(torch.from_numpy(w), 2, fmt) == expected


def test_relative_picks_the_smaller_variant() -> None:
    w = np.zeros((1, 600), np.float32)  # a Linear weight: one matrix
    w[0, 599] = 1
    assert conv_weight_nbytes(w, 1, "relative4") == 175
    assert conv_weight_nbytes(w, 1, "relative8") == 19
    assert conv_weight_nbytes(w, 1, "relative") == 19
    assert matrix_nbytes(w, "relative") == 19
    assert matrix_nbytes(w, "bsr", blocksize=(1, 8)) == 8 * 4 + 2 + 2 * 2
    assert set(FORMATS) == {"dense", "csr", "bsr", "relative", "relative4", "relative8"}


def test_conv_weight_nbytes_sums_groups(rng: np.random.Generator) -> None:
    w = random_sparse(rng, (8, 3, 3, 3), 0.6)
    low = lower_conv_weight(w, 2)
    encoders = [("csr", CSRMatrix.from_dense), ("relative8", lambda x: RelativeIndexMatrix.from_dense(x, 8))]
    for fmt, enc in encoders:
        assert conv_weight_nbytes(w, 2, fmt) == sum(enc(g).nbytes for g in low)
    with pytest.raises(SparseCNNError, match="unknown storage format"):
        conv_weight_nbytes(w, 2, "coo")
    with pytest.raises(SparseCNNError, match="groups=1"):
        conv_weight_nbytes(w[:, :, 0, 0], 2, "csr")


# ---------------------------------------------------------------------------------------------
# dtype choice


@pytest.mark.parametrize(
    ("n", "dtype"),
    [(0, np.int16), (1, np.int16), (32767, np.int16), (32768, np.int16), (32769, np.int32),
     (2**31, np.int32), (2**31 + 1, np.int64)],
)
def test_index_dtype_boundaries(n: int, dtype: type) -> None:
    assert index_dtype(n) == np.dtype(dtype)


@pytest.mark.parametrize(
    ("nnz", "dtype"),
    [(0, np.int16), (32767, np.int16), (32768, np.int32), (2**31 - 1, np.int32), (2**31, np.int64)],
)
def test_pointer_dtype_boundaries(nnz: int, dtype: type) -> None:
    assert pointer_dtype(nnz) == np.dtype(dtype)


@pytest.mark.parametrize("bad", [-1, 2.0, True, "3"])
def test_dtype_helpers_reject_bad_counts(bad: object) -> None:
    with pytest.raises(SparseCNNError):
        index_dtype(bad)  # type: ignore[arg-type]
    with pytest.raises(SparseCNNError):
        pointer_dtype(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(("n", "dtype"), [(32768, np.int16), (32769, np.int32)])
def test_csr_index_dtype_on_real_matrix(n: int, dtype: type) -> None:
    a = np.zeros((1, n), np.float32)
    a[0, -1] = 1
    m = CSRMatrix.from_dense(a)
    assert m.indices.dtype == dtype
    assert m.nbytes == 4 + np.dtype(dtype).itemsize + 2 * 2
    assert_encodes(m, a)


@pytest.mark.parametrize(("nnz", "dtype"), [(32767, np.int16), (32768, np.int32)])
def test_pointer_dtype_on_real_matrix(nnz: int, dtype: type) -> None:
    a = np.ones((1, nnz), np.float32)
    for m in (CSRMatrix.from_dense(a), RelativeIndexMatrix.from_dense(a), BSRMatrix.from_dense(a, (1, 1))):
        assert m.indptr.dtype == dtype
    assert CSRMatrix.from_dense(a).nbytes == nnz * 4 + nnz * 2 + 2 * np.dtype(dtype).itemsize


@pytest.mark.parametrize(("nb", "dtype"), [(32768, np.int16), (32769, np.int32)])
def test_bsr_index_dtype_counts_block_columns(nb: int, dtype: type) -> None:
    a = np.zeros((2, 2 * nb), np.float32)
    a[1, -1] = 1
    m = BSRMatrix.from_dense(a, (2, 2))
    assert m.indices.dtype == dtype
    assert m.indices.tolist() == [nb - 1]


# ---------------------------------------------------------------------------------------------
# Input validation


@pytest.mark.parametrize("name", list(ENCODERS))
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_rejects_nan_and_inf(name: str, bad: float) -> None:
    a = np.ones((3, 4), np.float32)
    a[1, 2] = bad
    with pytest.raises(SparseCNNError, match=r"NaN/Inf.*\(1, 2\).*nan_to_num"):
        ENCODERS[name](a)


@pytest.mark.parametrize("name", list(ENCODERS))
@pytest.mark.parametrize("shape", [(), (4,), (2, 3, 4)])
def test_rejects_non_2d(name: str, shape: tuple[int, ...]) -> None:
    with pytest.raises(SparseCNNError, match="2-D"):
        ENCODERS[name](np.ones(shape, np.float32))


@pytest.mark.parametrize("name", list(ENCODERS))
@pytest.mark.parametrize("dtype", [np.bool_, np.complex64, object])
def test_rejects_non_real(name: str, dtype: type) -> None:
    with pytest.raises(SparseCNNError, match="real numbers"):
        ENCODERS[name](np.ones((2, 2), dtype))


@pytest.mark.parametrize("blocksize", [(0, 4), (4,), (2.0, 2), None, (True, 2)])
def test_bsr_rejects_bad_blocksize(blocksize: object) -> None:
    with pytest.raises(SparseCNNError, match="blocksize"):
        BSRMatrix.from_dense(np.ones((4, 4), np.float32), blocksize)  # type: ignore[arg-type]


@pytest.mark.parametrize("bits", [3, 5, 16, True])
def test_relative_rejects_bad_index_bits(bits: object) -> None:
    with pytest.raises(SparseCNNError, match="index_bits"):
        RelativeIndexMatrix.from_dense(np.ones((2, 2), np.float32), index_bits=bits)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# check_format catches corrupted arrays


@pytest.fixture
def csr() -> CSRMatrix:
    a = np.array([[1, 0, 2, 3], [0, 0, 0, 0], [4, 5, 0, 6]], np.float32)
    return CSRMatrix.from_dense(a)  # indptr [0, 3, 3, 6], indices [0, 2, 3, 0, 1, 3]


def _i16(values: list[int]) -> np.ndarray:
    return np.array(values, np.int16)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"indices": _i16([0, 3, 2, 0, 1, 3])}, "sorted and unique within each row.*row 0"),
        ({"indices": _i16([0, 2, 3, 0, 1, 1])}, "sorted and unique within each row.*row 2"),
        ({"indices": _i16([0, 2, 4, 0, 1, 3])}, r"lie in \[0, 4\)"),
        ({"indices": _i16([0, 2, 3, -1, 1, 3])}, r"lie in \[0, 4\)"),
        ({"indices": _i16([0, 2, 3, 0, 1])}, "same length"),
        ({"indices": np.array([0, 2, 3, 0, 1, 3], np.float32)}, "integers"),
        ({"indptr": _i16([0, 3, 2, 6])}, "non-decreasing"),
        ({"indptr": _i16([0, 3, 6])}, "one entry per row"),
        ({"indptr": _i16([1, 3, 3, 6])}, "start at 0"),
        ({"indptr": _i16([0, 3, 3, 5])}, "indptr.-1. must equal"),
        ({"data": np.array([1, 2, np.nan, 4, 5, 6], np.float32)}, "NaN"),
        ({"data": np.ones((6, 1), np.float32)}, "1-D"),
        ({"shape": (3,)}, "pair of integers"),
        ({"shape": (3, -4)}, "non-negative"),
    ],
)
def test_csr_check_format_catches(csr: CSRMatrix, changes: dict, message: str) -> None:
    with pytest.raises(SparseCNNError, match=message):
        dataclasses.replace(csr, **changes)


def test_check_format_catches_in_place_corruption(csr: CSRMatrix) -> None:
    csr.check_format()
    csr.indices[[0, 1]] = csr.indices[[1, 0]]
    with pytest.raises(SparseCNNError, match="invalid CSRMatrix: column indices must be sorted"):
        csr.check_format()


@pytest.fixture
def bsr() -> BSRMatrix:
    a = np.zeros((5, 7), np.float32)  # 3x4 grid of 2x2 blocks; last block row and column padded
    a[0, 0], a[0, 5], a[4, 6], a[4, 0] = 1, 2, 3, 4
    return BSRMatrix.from_dense(a, (2, 2))  # indptr [0, 2, 2, 4], indices [0, 2, 0, 3]


def test_bsr_check_format_catches(bsr: BSRMatrix) -> None:
    assert bsr.indptr.tolist() == [0, 2, 2, 4]
    assert bsr.indices.tolist() == [0, 2, 0, 3]
    cases = [
        ({"indices": _i16([2, 0, 0, 3])}, "sorted and unique"),
        ({"indices": _i16([0, 2, 0, 4])}, r"lie in \[0, 4\)"),
        ({"indptr": _i16([0, 2, 4])}, "one entry per row"),
        ({"indptr": _i16([0, 3, 2, 4])}, "non-decreasing"),
        ({"data": bsr.data[:, :, :1]}, r"shape \(nblocks, 2, 2\)"),
        ({"data": bsr.data[:3]}, "one entry per block"),
        ({"blocksize": (2, 0)}, "blocksize"),
    ]
    for changes, message in cases:
        with pytest.raises(SparseCNNError, match=message):
            dataclasses.replace(bsr, **changes)
    bad_rows = bsr.data.copy()
    bad_rows[2, 1, 0] = 9  # row 5 of the padded matrix, outside the 5 logical rows
    with pytest.raises(SparseCNNError, match="padding rows"):
        dataclasses.replace(bsr, data=bad_rows)
    bad_cols = bsr.data.copy()
    bad_cols[3, 0, 1] = 9  # column 7, outside the 7 logical columns
    with pytest.raises(SparseCNNError, match="padding columns"):
        dataclasses.replace(bsr, data=bad_cols)


@pytest.fixture
def rel() -> RelativeIndexMatrix:
    a = np.zeros((2, 20), np.float32)
    a[0, 0], a[0, 19], a[1, 2] = 1, 2, 3
    return RelativeIndexMatrix.from_dense(a, 4)  # gaps [0, 15, 2, 2], data [1, 0, 2, 3]


def test_relative_check_format_catches(rel: RelativeIndexMatrix) -> None:
    assert rel.gap_values.tolist() == [0, 15, 2, 2]
    assert rel.data.tolist() == [1, 0, 2, 3]
    cases = [
        ({"gaps": pack_gaps(np.array([0, 15], np.uint8), 4)}, "gaps must hold 4-bit gaps"),
        ({"gaps": rel.gaps.astype(np.int16)}, "uint8"),
        ({"gaps": pack_gaps(np.array([0, 15, 3, 2], np.uint8), 4)}, "inside its 20 columns"),
        ({"gaps": pack_gaps(np.array([0, 14, 2, 2], np.uint8), 4)}, "filler with gap 15"),
        ({"data": np.array([1, 0, 2, 0], np.float32)}, "filler with gap 15|must not end with a filler"),
        ({"data": np.array([1, 0, 2, np.inf], np.float32)}, "NaN/Inf"),
        ({"indptr": _i16([0, 3, 3])}, "indptr.-1. must equal"),
        ({"indptr": _i16([0, 4])}, "one entry per row"),
        ({"index_bits": 8}, "gaps must hold 8-bit gaps"),
        ({"index_bits": 5}, "index_bits"),
    ]
    for changes, message in cases:
        with pytest.raises(SparseCNNError, match=message):
            dataclasses.replace(rel, **changes)
    # A trailing filler (value 0, gap 15) at the end of row 0.
    a = np.zeros((1, 40), np.float32)
    a[0, 0] = 1
    with pytest.raises(SparseCNNError, match="must not end with a filler"):
        RelativeIndexMatrix(indptr=_i16([0, 2]), gaps=pack_gaps(np.array([0, 15], np.uint8), 4),
                            data=np.array([1, 0], np.float32), shape=(1, 40), index_bits=4)
    odd = RelativeIndexMatrix.from_dense(a, 4)  # one entry: the high nibble is unused
    with pytest.raises(SparseCNNError, match="unused high nibble"):
        dataclasses.replace(odd, gaps=np.array([0xF0], np.uint8))


# ---------------------------------------------------------------------------------------------
# Lowering


def ref_lower(w: np.ndarray, groups: int) -> np.ndarray:
    c_out, cin_g, kh, kw = w.shape
    out = np.zeros((groups, c_out // groups, cin_g * kh * kw), w.dtype)
    for g in range(groups):
        for o in range(c_out // groups):
            for c in range(cin_g):
                for i in range(kh):
                    for j in range(kw):
                        out[g, o, (c * kh + i) * kw + j] = w[g * (c_out // groups) + o, c, i, j]
    return out


@pytest.mark.parametrize(
    ("c_out", "cin_g", "groups", "kh", "kw"),
    [
        (6, 4, 1, 3, 3),  # plain
        (6, 2, 2, 3, 2),  # two groups (AlexNet conv2/4/5 style), non-square kernel
        (8, 1, 8, 3, 3),  # depthwise
        (4, 3, 2, 1, 1),  # pointwise
        (6, 1, 3, 5, 5),
        (1, 1, 1, 1, 1),
    ],
)
def test_lower_unlower_round_trip(c_out: int, cin_g: int, groups: int, kh: int, kw: int,
                                  rng: np.random.Generator) -> None:
    w = random_sparse(rng, (c_out, cin_g, kh, kw), 0.5)
    low = lower_conv_weight(w, groups)
    assert low.shape == (groups, c_out // groups, cin_g * kh * kw)
    np.testing.assert_array_equal(low, ref_lower(w, groups))
    back = unlower_conv_weight(low, (kh, kw))
    np.testing.assert_array_equal(back, w)
    if kh == kw:
        np.testing.assert_array_equal(unlower_conv_weight(low, kh), w)
    low[...] = 7  # a new array, not a view of the weight
    assert not (w == 7).any()
    # The lowered group matrix is what a conv with these groups multiplies with im2col columns.
    x = torch.from_numpy(rng.standard_normal((1, cin_g * groups, kh + 2, kw + 1)).astype(np.float32))
    y = torch.nn.functional.conv2d(x, torch.from_numpy(w), groups=groups)
    cols = torch.nn.functional.unfold(x, (kh, kw)).numpy()[0]  # (Cin kh kw, L), rows (c, i, j)
    k = cin_g * kh * kw
    low = lower_conv_weight(w, groups)
    y_gemm = np.concatenate([low[g] @ cols[g * k:(g + 1) * k] for g in range(groups)])
    np.testing.assert_allclose(y_gemm, y.numpy()[0].reshape(c_out, -1), rtol=1e-4, atol=1e-5)


def test_lower_accepts_torch_conv_weight() -> None:
    conv = torch.nn.Conv2d(4, 6, (3, 2), groups=2)
    low = lower_conv_weight(conv.weight, 2)
    assert isinstance(low, np.ndarray)
    np.testing.assert_array_equal(low, ref_lower(conv.weight.detach().numpy(), 2))
    back = unlower_conv_weight(torch.from_numpy(low), (3, 2))
    np.testing.assert_array_equal(back, conv.weight.detach().numpy())


def test_lowering_rejects_bad_input() -> None:
    with pytest.raises(SparseCNNError, match="not divisible by groups"):
        lower_conv_weight(np.ones((6, 2, 3, 3), np.float32), 4)
    with pytest.raises(SparseCNNError, match="4-D"):
        lower_conv_weight(np.ones((6, 2), np.float32), 1)
    with pytest.raises(SparseCNNError, match="groups"):
        lower_conv_weight(np.ones((6, 2, 3, 3), np.float32), 0)
    with pytest.raises(SparseCNNError, match="multiple of kh"):
        unlower_conv_weight(np.ones((1, 6, 10), np.float32), (3, 3))
    with pytest.raises(SparseCNNError, match="3-D"):
        unlower_conv_weight(np.ones((6, 9), np.float32), 3)
    with pytest.raises(SparseCNNError, match="kernel_size"):
        unlower_conv_weight(np.ones((1, 6, 9), np.float32), (3, 0))


@settings(max_examples=30, deadline=None)
@given(c_out_g=st.integers(1, 4), cin_g=st.integers(1, 3), groups=st.integers(1, 4),
       kh=st.integers(1, 3), kw=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_lower_round_trip_random(c_out_g: int, cin_g: int, groups: int, kh: int, kw: int, seed: int) -> None:
    w = random_sparse(np.random.default_rng(seed), (c_out_g * groups, cin_g, kh, kw), 0.5)
    np.testing.assert_array_equal(unlower_conv_weight(lower_conv_weight(w, groups), (kh, kw)), w)
