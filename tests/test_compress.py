"""Deep Compression stages 2-3 (issue 13): weight sharing, Huffman coding, storage, qspmv, the file."""

from __future__ import annotations

import copy
import heapq
import os

import numpy as np
import pytest
import torch
from torch import nn

import sparsecnn
from sparsecnn.compress import (
    QuantizeConfig,
    huffman_code,
    huffman_decode,
    huffman_encode,
    kmeans_1d,
    layer_storage,
    quantize_model,
    storage_report,
)
from sparsecnn.compress.huffman import MAX_CODE_LENGTH, HuffmanCode
from sparsecnn.compress.storage import decode_gaps, encode_gaps
from sparsecnn.errors import SparseCNNError
from sparsecnn.formats import RelativeIndexMatrix
from sparsecnn.kernels.qspmv import prepare_quant_linear, quant_linear
from tests.conftest import random_sparse
from tests.reference import assert_close

# --------------------------------------------------------------------------------------------------
# k-means


def test_kmeans_split_empty_is_a_lloyd_fixpoint_with_every_code_used(rng: np.random.Generator) -> None:
    v = rng.uniform(-1, 1, 20000)
    v = v[np.abs(v) > 0.8]  # pruned: two tails, the linear init's middle centroids start empty
    c, labels = kmeans_1d(v, 31, split_empty=True)
    assert np.all(np.diff(c) > 0)
    assert np.bincount(labels, minlength=31).min() > 0
    nearest = np.abs(v[:, None] - c[None, :].astype(np.float64)).argmin(axis=1)
    assert np.array_equal(labels, nearest)
    for j in range(31):  # each centroid is the mean of its members (float32 rounding)
        assert abs(c[j] - v[labels == j].mean()) <= 1e-6


def test_kmeans_keeps_empty_clusters_by_default_as_the_paper(rng: np.random.Generator) -> None:
    v = rng.standard_normal(50000)
    v = v[np.abs(v) > np.quantile(np.abs(v), 0.91)]  # Deep Compression's fc6: 9% kept, two tails
    c, labels = kmeans_1d(v, 31)
    counts = np.bincount(labels, minlength=31)
    empty = np.flatnonzero(counts == 0)
    # the linear grid over [min, max] leaves the centroids inside the pruned gap (|w| < threshold)
    # empty (and now and then one between the sparse extreme values)
    assert 4 <= empty.size <= 14
    assert np.count_nonzero(np.abs(c[empty]) < np.abs(v).min()) >= empty.size - 2
    assert np.all(np.diff(c) > 0)
    nearest = np.abs(v[:, None] - c[None, :].astype(np.float64)).argmin(axis=1)
    assert np.array_equal(labels, nearest)
    live = np.flatnonzero(counts)
    for j in live:  # each live centroid is the mean of its members
        assert abs(c[j] - v[labels == j].mean()) <= 1e-6
    # fewer codes in use and a bell-shaped use of them: lower entropy than the split codebook's
    c2, labels2 = kmeans_1d(v, 31, split_empty=True)

    def entropy(lab: np.ndarray) -> float:
        p = np.bincount(lab) / lab.size
        p = p[p > 0]
        return float(-(p * np.log2(p)).sum())

    assert entropy(labels) < entropy(labels2) - 0.1
    err = float(((c[labels] - v) ** 2).mean())
    err2 = float(((c2[labels2] - v) ** 2).mean())
    assert err2 < err


def test_quantize_config_empty_mode() -> None:
    with pytest.raises(SparseCNNError, match="empty must be 'keep'"):
        QuantizeConfig(empty="drop")
    model = sparsecnn.models.build("lenet5", input_size=8, in_channels=1, num_classes=10)
    sparsecnn.models.apply_profile(model, "uniform:0.9")
    keep = quantize_model(copy.deepcopy(model), QuantizeConfig(fc_bits=5))
    split = quantize_model(copy.deepcopy(model), QuantizeConfig(fc_bits=5, empty="split"))
    for name in keep:
        nk = np.unique(keep[name].codes[keep[name].codes > 0]).size
        ns = np.unique(split[name].codes[split[name].codes > 0]).size
        assert nk <= ns
        assert ns == min(keep[name].codebook.size - 1, keep[name].nnz)
        assert np.array_equal(keep[name].codes > 0, split[name].codes > 0)  # the zeros are the same


def test_kmeans_finds_separated_clusters_and_few_values() -> None:
    v = np.concatenate([np.full(50, -2.0), np.full(30, 0.5), np.full(20, 3.0)])
    c, labels = kmeans_1d(v, 3)
    assert c.tolist() == [-2.0, 0.5, 3.0]
    assert np.bincount(labels).tolist() == [50, 30, 20]
    c, labels = kmeans_1d(np.array([1.0, 1.0, 2.0]), 7)  # fewer distinct values than clusters
    assert set(c[labels].tolist()) == {1.0, 2.0}


def test_quantize_model_bits_and_zeros(rng: np.random.Generator) -> None:
    model = sparsecnn.models.build("lenet5", input_size=8, in_channels=1, num_classes=10)
    sparsecnn.models.apply_profile(model, "uniform:0.7")
    zero = {n: (m.weight == 0).clone() for n, m in sparsecnn.models.prunable_layers(model).items()}
    books = quantize_model(model, QuantizeConfig(bits={"fc2": 2}))
    for name, m in sparsecnn.models.prunable_layers(model).items():
        b = books[name]
        assert b.bits == (2 if name == "fc2" else 5 if isinstance(m, nn.Linear) else 8)
        assert b.codebook.shape == (1 << b.bits,) and b.codebook[0] == 0
        assert torch.equal(m.weight == 0, zero[name] | torch.from_numpy(b.codebook[b.codes] == 0))
        assert np.array_equal(m.weight.detach().numpy(), b.weight())
        # the paper's k-means: codes of centroids left in the pruned gap are unused
        assert 1 <= len(np.unique(b.codes[b.codes > 0])) <= min((1 << b.bits) - 1, int((~zero[name]).sum()))
    with pytest.raises(SparseCNNError, match=r"1\.\.8"):
        QuantizeConfig(fc_bits=9)
    with pytest.raises(SparseCNNError, match="unknown layer"):
        quantize_model(model, QuantizeConfig(bits={"fc9": 4}))


def test_finetune_sums_gradients_into_centroids_and_keeps_zeros() -> None:
    from sparsecnn.compress import finetune_centroids, share_weights, unshare_weights
    from sparsecnn.data import digits
    from sparsecnn.train import TrainConfig

    model = sparsecnn.models.build("lenet5", input_size=8, in_channels=1, num_classes=10)
    sparsecnn.models.apply_profile(model, "uniform:0.8")
    books = quantize_model(model, QuantizeConfig(conv_bits=4, fc_bits=3))
    # gradient of each centroid == the sum of its weights' gradients (checked on one batch)
    splits = digits()
    x, y = splits.train.tensors[0][:64], splits.train.tensors[1][:64]
    small = torch.utils.data.TensorDataset(splits.train.tensors[0][:256], splits.train.tensors[1][:256])
    ref = sparsecnn.models.build("lenet5", input_size=8, in_channels=1, num_classes=10)
    ref.load_state_dict(model.state_dict())
    torch.nn.functional.cross_entropy(ref(x), y).backward()
    share_weights(model, books)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    fc1 = model.get_submodule("fc1")
    g = ref.get_submodule("fc1").weight.grad.numpy()
    expect = np.bincount(books["fc1"].codes.reshape(-1), weights=g.reshape(-1), minlength=8)
    expect[0] = 0.0
    np.testing.assert_allclose(fc1.weight_codebook.grad.numpy(), expect, rtol=1e-4, atol=1e-6)
    unshare_weights(model)
    tuned, result = finetune_centroids(model, books, small, small,
                                       TrainConfig(epochs=1, lr=0.01, progress=False))
    for name, m in sparsecnn.models.prunable_layers(model).items():
        w = m.weight.detach().numpy()
        assert np.array_equal(tuned[name].codes, books[name].codes)  # codes fixed, centroids move
        assert np.array_equal(w, tuned[name].weight())
        assert not w[books[name].codes == 0].any()  # pruned zeros stay zero
    assert not np.array_equal(tuned["fc1"].codebook, books["fc1"].codebook)
    assert 0.0 <= result.test_accuracy <= 1.0


# --------------------------------------------------------------------------------------------------
# Huffman


def _huffman_cost(freq: np.ndarray) -> int:
    """Reference: the optimal prefix-code cost is the sum of all merge weights."""
    h = [int(f) for f in freq if f > 0]
    if len(h) == 1:
        return h[0]
    heapq.heapify(h)
    cost = 0
    while len(h) > 1:
        a, b = heapq.heappop(h), heapq.heappop(h)
        cost += a + b
        heapq.heappush(h, a + b)
    return cost


@pytest.mark.parametrize("dist", ["geometric", "uniform", "single", "two", "skewed"])
def test_huffman_round_trip_and_optimal(rng: np.random.Generator, dist: str) -> None:
    n_sym = 32
    if dist == "geometric":
        s = np.minimum(rng.geometric(0.3, 5000) - 1, n_sym - 1)
    elif dist == "uniform":
        s = rng.integers(0, n_sym, 5000)
    elif dist == "single":
        s = np.full(100, 7)
    elif dist == "two":
        s = rng.integers(0, 2, 999) * 5
    else:
        s = np.concatenate([np.zeros(10000, int), np.arange(n_sym)])
    s = s.astype(np.uint8)
    code = huffman_code(s, n_sym)
    freq = np.bincount(s, minlength=n_sym)
    stream, nbits = huffman_encode(s, code)
    assert nbits == _huffman_cost(freq) == code.bits(freq)
    assert stream.size == -(-nbits // 8)
    assert np.array_equal(huffman_decode(stream, nbits, s.size, code), s)
    # canonical: codes of one length are consecutive, in symbol order; prefix-free (Kraft <= 1)
    codes, ln = code.codes(), code.lengths.astype(int)
    words = {format(int(codes[i]), f"0{ln[i]}b") for i in np.flatnonzero(ln)}
    assert not any(a != b and b.startswith(a) for a in words for b in words)
    for L in set(ln[ln > 0]):
        syms = np.flatnonzero(ln == L)
        assert np.array_equal(np.diff(codes[syms].astype(np.int64)), np.ones(len(syms) - 1, np.int64))


def test_huffman_length_limit() -> None:
    fib = [1, 1]
    while len(fib) < 60:
        fib.append(fib[-1] + fib[-2])
    s = np.repeat(np.arange(60), np.minimum(fib, 10**6)).astype(np.uint8)
    code = huffman_code(s, 64)
    assert int(code.lengths.max()) <= MAX_CODE_LENGTH
    stream, nbits = huffman_encode(s, code)
    assert np.array_equal(huffman_decode(stream, nbits, s.size, code), s)


def test_huffman_corrupt_stream_is_one_error(rng: np.random.Generator) -> None:
    s = rng.integers(0, 8, 300).astype(np.uint8)
    code = huffman_code(s, 8)
    stream, nbits = huffman_encode(s, code)
    with pytest.raises(SparseCNNError, match="truncated"):
        huffman_decode(stream[: len(stream) // 2], nbits, s.size, code)
    with pytest.raises(SparseCNNError, match="corrupt"):
        huffman_decode(stream, nbits - 3, s.size, code)
    with pytest.raises(SparseCNNError, match="prefix code"):
        huffman_decode(stream, nbits, s.size, HuffmanCode(np.ones(8, np.uint8)))
    with pytest.raises(SparseCNNError, match="no code"):
        huffman_encode(np.array([9], np.uint8), huffman_code(np.array([1], np.uint8), 16))


# --------------------------------------------------------------------------------------------------
# relative indices and storage


@pytest.mark.parametrize("bits", [1, 3, 4, 5, 8])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.95, 1.0])
def test_gaps_round_trip(rng: np.random.Generator, bits: int, sparsity: float) -> None:
    codes = rng.integers(1, 32, (17, 45)).astype(np.uint8)
    codes[rng.random(codes.shape) < sparsity] = 0
    gaps, entry = encode_gaps(codes, bits)
    assert gaps.max(initial=0) < 1 << bits
    pos, c = decode_gaps(gaps, entry, codes.size)
    back = np.zeros(codes.size, np.uint8)
    back[pos] = c
    assert np.array_equal(back.reshape(codes.shape), codes)
    if bits in (4, 8):  # the same gaps and fillers as formats.relative over the flattened layer
        m = RelativeIndexMatrix.from_dense(codes.reshape(1, -1).astype(np.float32), index_bits=bits)
        assert np.array_equal(m.gap_values, gaps)
        assert np.array_equal(m.data.astype(np.uint8), entry)


def test_layer_storage_arithmetic(rng: np.random.Generator) -> None:
    codes = rng.integers(1, 32, (64, 300)).astype(np.uint8)
    codes[rng.random(codes.shape) < 0.9] = 0
    s = layer_storage("fc", codes, 5, 4)
    gaps, entry = encode_gaps(codes, 4)
    assert s.n_entries == gaps.size and s.nnz == np.count_nonzero(codes)
    assert s.dense_bytes == codes.size * 4
    assert s.csr_bytes == s.nnz * 6 + 65 * 4
    assert s.quantized_bytes == gaps.size * 9 / 8 + 32 * 4
    wbits = huffman_code(entry, 32).bits(np.bincount(entry, minlength=32))
    gbits = huffman_code(gaps, 16).bits(np.bincount(gaps, minlength=16))
    assert s.huffman_bytes == (wbits + gbits) / 8 + 32 + 16 + 32 * 4
    assert s.huffman_bytes < s.quantized_bytes < s.relative_bytes < s.dense_bytes


@pytest.mark.slow
def test_alexnet_storage_matches_the_paper_at_pq() -> None:
    """Deep-compression AlexNet (random init): P+Q storage within 10% of Table 4 per layer."""
    model = sparsecnn.models.build("alexnet")
    sparsecnn.models.apply_profile(model, "deep-compression")
    report = storage_report(quantize_model(model), 4, paper="alexnet")
    for row in report.rows():
        assert abs(row["rate_pq"] / row["paper_rate_pq"] - 1) < 0.10, row["layer"]
    assert report.rows()[-1]["rate_pqh"] < report.rows()[-1]["rate_pq"]


# --------------------------------------------------------------------------------------------------
# qspmv kernel


@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (64, 300), (33, 70000)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("batch", [1, 3])
def test_qspmv_against_dense(rng: np.random.Generator, shape: tuple[int, int], sparsity: float,
                             batch: int) -> None:
    if shape[1] == 70000 and (sparsity < 0.9 or batch > 1):
        pytest.skip("uint32 columns: one case is enough")
    w = random_sparse(rng, shape, sparsity)
    w = np.round(w * 4) / 4  # a few shared values
    w[rng.integers(0, shape[0])] = 0.0  # an empty row
    prep = prepare_quant_linear(w)
    assert prep.codes.dtype == np.uint8 and np.array_equal(prep.to_dense(), w)
    x = rng.standard_normal((batch, shape[1])).astype(np.float32)
    bias = rng.standard_normal(shape[0]).astype(np.float32)
    ref = torch.nn.functional.linear(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(bias))
    out = np.full((batch, shape[0]), np.nan, np.float32)
    quant_linear(prep, x, bias, out)
    assert_close(out, ref)
    quant_linear(prep, x, None, out)
    assert_close(out, ref - torch.from_numpy(bias))


@pytest.mark.parametrize("values", [29, 200, 3000], ids=["table32", "uint8-loads", "uint16-codes"])
def test_qspmv_rows_of_every_length_equal_float_spmv(values: int, rng: np.random.Generator,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Batch 1 through the row-wise kernel (the sliced-ELL form off), rows of 0..40 nonzeros (whole
    blocks of eight and every tail length), with a codebook the register lookup holds (<= 32
    entries), a larger uint8 one and uint16 codes: the same sums in the same order as the float CSR
    spmv, so equal to it bit for bit."""
    from sparsecnn.kernels import qspmv
    from sparsecnn.kernels.spmv import prepare_linear, sparse_linear

    monkeypatch.setattr(qspmv, "USE_ELL", False)
    m, k = 41, 300
    w = np.zeros((m, k), np.float32)
    pool = rng.permutation(np.arange(1, values + 1)).astype(np.float32) / 8
    for i in range(m):
        w[i, np.sort(rng.choice(k, size=i, replace=False))] = rng.choice(pool, size=i)
    w = w[rng.permutation(m)]
    w.flat[rng.choice(w.size, 820, replace=False)] = pool[: min(values, 820)]  # every value used
    prep = prepare_quant_linear(w)
    assert prep.codes.dtype == (np.uint8 if values <= 255 else np.uint16)
    x = rng.standard_normal((1, k)).astype(np.float32)
    out = np.full((1, m), np.nan, np.float32)
    bias = rng.standard_normal(m).astype(np.float32)
    quant_linear(prep, x, bias, out)
    assert_close(out, torch.from_numpy(x) @ torch.from_numpy(prep.to_dense()).T + torch.from_numpy(bias))
    want = np.empty_like(out)
    sparse_linear(prepare_linear(w), x, bias, want)
    np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("batch", [1, 3])
def test_qspmv_column_slabs_equal_float_spmv(batch: int, rng: np.random.Generator,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Column slabs (stacked slab-major CSR) in the codebook form: the same slabs and sums as the
    float CSR, bit for bit at batch 1 through the row-wise kernel; the dense weight round-trips; a
    compressed-file style plain CSR input is re-stored in slabs."""
    from sparsecnn.kernels import qspmv
    from sparsecnn.kernels.spmv import prepare_linear, sparse_linear

    monkeypatch.setattr(qspmv, "USE_ELL", False)
    m, k = 23, 150
    w = random_sparse(rng, (m, k), 0.8)
    w[w != 0] = np.round(w[w != 0] * 4) / 4 + 0.125  # few distinct values: a 32-entry table
    w[3] = 0.0
    prep = prepare_quant_linear(w, slab=40)
    assert prep.slab == 38 and prep.nslabs == 4 and prep.indptr.size == 4 * m + 1
    assert np.array_equal(prep.to_dense(), w)
    x = rng.standard_normal((batch, k)).astype(np.float32)
    bias = rng.standard_normal(m).astype(np.float32)
    out = np.empty((batch, m), np.float32)
    quant_linear(prep, x, bias, out)
    assert_close(out, x @ w.T + bias)
    want = np.empty_like(out)
    sparse_linear(prepare_linear(w, slab=40), x, bias, want)
    if batch == 1:
        np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("serial", [True, False], ids=["serial", "parallel"])
@pytest.mark.parametrize("batch", [1, 3])
def test_bound_qspmv_fuses_relu_and_equals_quant_linear(batch: int, serial: bool, rng: np.random.Generator,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The executor's bound qspmv (serial twins below the work threshold): the same outputs as
    quant_linear, with the ReLU fused (NaN kept), call after call; a wrong ``out`` is refused."""
    from sparsecnn.kernels import qspmv

    monkeypatch.setattr(qspmv, "_SERIAL_MACS", 1 << 40 if serial else 0)
    m, k = 37, 9000  # slabs above 4096 inputs
    w = random_sparse(rng, (m, k), 0.9)
    w[w != 0] = np.round(w[w != 0] * 4) / 4 + 0.125
    prep = prepare_quant_linear(w)
    bias = rng.standard_normal(m).astype(np.float32)
    bias[5] = np.nan
    for relu in (False, True):
        want = np.empty((batch, m), np.float32)
        out = np.full((batch, m), np.inf, np.float32)
        run = qspmv.bind_quant_linear(prep, batch, bias, out, relu)
        for _ in range(2):
            x = rng.standard_normal((batch, k)).astype(np.float32)
            quant_linear(prep, x, bias, want)
            if relu:
                want = np.where(want <= 0, np.float32(0), want)  # NaN kept, as torch.relu
            out[...] = np.inf
            run(x)
            np.testing.assert_array_equal(out, want)
            assert np.isnan(out[:, 5]).all()
    with pytest.raises(ValueError, match="C-contiguous"):
        qspmv.bind_quant_linear(prep, batch, bias, np.empty((batch, m + 1), np.float32))


def _decode_ell(ell, shape: tuple[int, int], book: np.ndarray) -> np.ndarray:
    """The dense weight an :class:`EllForm` holds, walked as the kernel walks it."""
    from sparsecnn.kernels._simd import ELL_ROWS, ELL_SLAB, ELL_VALID

    m, k = shape
    w = np.zeros((m, k), np.float32)
    nblk = ell.eptr.size - 1
    for blk in range(nblk):
        e = int(ell.eptr[blk])
        for s in range(ell.nslab):
            for _ in range(int(ell.cnt[blk * ell.nslab + s])):
                for lane in range(ELL_ROWS):
                    v = int(ell.entries[e + lane])
                    if v & ELL_VALID:
                        r, c = blk * ELL_ROWS + lane, s * ELL_SLAB + (v & 31)
                        assert r < m and c < k and w[r, c] == 0
                        w[r, c] = book[(v >> 5) & 31]
                    else:
                        assert v == 0
                e += ELL_ROWS
        assert e == ell.eptr[blk + 1]
    return w


@pytest.mark.parametrize("shape", [(1, 1), (15, 31), (16, 32), (17, 33), (70, 100)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.91])
def test_qspmv_ell_layout_holds_the_weight(rng: np.random.Generator, shape: tuple[int, int],
                                          sparsity: float) -> None:
    """The sliced-ELL form (built without AVX-512 too): every stored weight once, in its row's lane and
    its column's slab, padding entries zero, each slab's rounds the block's longest row list."""
    from sparsecnn.kernels.qspmv import _build_ell

    book = rng.standard_normal(32).astype(np.float32)
    w = np.where(rng.random(shape) < sparsity, 0, book[rng.integers(0, 32, shape)]).astype(np.float32)
    prep = prepare_quant_linear(w)
    ell = _build_ell(prep)
    np.testing.assert_array_equal(_decode_ell(ell, shape, prep.table()), w)
    # built a few row blocks at a time, and from a CSR stored in column slabs: the same layout
    for other in (_build_ell(prep, chunk_nnz=7), _build_ell(prepare_quant_linear(w, slab=40), chunk_nnz=50)):
        for f in ("entries", "cnt", "eptr"):
            np.testing.assert_array_equal(getattr(other, f), getattr(ell, f))
    m, k = shape
    counts = np.zeros((-(-m // 16) * 16, -(-k // 32) * 32), np.int64)
    counts[:m, :k] = w != 0
    rows_in_slab = counts.reshape(-1, -(-k // 32), 32).sum(axis=2)  # (rows, slabs)
    longest = rows_in_slab.reshape(-1, 16, rows_in_slab.shape[1]).max(axis=1)
    np.testing.assert_array_equal(ell.cnt.reshape(longest.shape), longest)


@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("shape", [(1, 1), (15, 31), (17, 33), (64, 300), (9, 70000)])
@pytest.mark.parametrize("sparsity", [0.0, 0.91, 1.0])
@pytest.mark.parametrize("ncodes", [1, 32])
def test_qspmv_ell_against_dense(rng: np.random.Generator, shape: tuple[int, int], sparsity: float,
                                 ncodes: int, batch: int) -> None:
    """Batches 1 to 8 in the sliced-ELL form (AVX-512, <= 32 codes; above batch 1 in passes of 4 and
    2 images): outputs equal dense to rounding, with bias, ReLU (NaN kept), all-zero rows and ragged
    blocks and slabs; serial and parallel kernels give the same bits; the row-wise kernel / float
    spmm (``ell=False``) agrees to rounding. An inf or NaN input (the masked kernels) reaches exactly
    the rows that weigh it, in its own image."""
    from sparsecnn.kernels import qspmv
    from sparsecnn.kernels._simd import HAS_TABLE32

    m, k = shape
    book = rng.standard_normal(ncodes).astype(np.float32)
    w = np.where(rng.random(shape) < sparsity, 0, book[rng.integers(0, ncodes, shape)]).astype(np.float32)
    w[rng.integers(0, m)] = 0.0
    prep = prepare_quant_linear(w)
    nnz = int(np.count_nonzero(w))
    padded = nnz > 0 and qspmv._build_ell(prep).entries.size > qspmv.ELL_MAX_PADDING * nnz
    assert (prep.ell() is not None) == (HAS_TABLE32 and bool(np.count_nonzero(w)) and not padded)
    bias = rng.standard_normal(m).astype(np.float32)
    x = rng.standard_normal((batch, k)).astype(np.float32)
    ref = x.astype(np.float64) @ w.T.astype(np.float64) + bias
    # rounding allowance: a few float32 epsilons of the magnitude of the terms summed
    tol = 1e-5 * (np.abs(x).astype(np.float64) @ np.abs(w.T).astype(np.float64) + np.abs(bias)).max()
    for relu in (False, True):
        want = np.maximum(ref, 0) if relu else ref
        outs = []
        for serial in (True, False):
            saved = qspmv._SERIAL_MACS
            qspmv._SERIAL_MACS = 1 << 40 if serial else 0
            try:
                out = np.full((batch, m), np.nan, np.float32)
                qspmv.bind_quant_linear(prep, batch, bias, out, relu)(x)
            finally:
                qspmv._SERIAL_MACS = saved
            outs.append(out)
            np.testing.assert_allclose(out, want, rtol=1e-5, atol=tol)
        np.testing.assert_array_equal(outs[0], outs[1])
        other = np.empty((batch, m), np.float32)
        qspmv.bind_quant_linear(prep, batch, bias, other, relu, ell=False)(x)
        np.testing.assert_allclose(outs[1], other, rtol=1e-5, atol=tol)
    if np.count_nonzero(w):
        col = int(np.nonzero(w)[1][0])
        weighs = w[:, col] != 0
        for bad in (np.nan, np.inf):
            xn = x.copy()
            xn[-1, col] = bad
            out = np.zeros((batch, m), np.float32)
            qspmv.bind_quant_linear(prep, batch, bias, out, False)(xn)
            assert not np.isfinite(out[-1, weighs]).any()  # it reaches the rows that weigh it
            assert np.isfinite(out[-1, ~weighs]).all()  # and no other row of its image
            assert np.isfinite(out[:-1]).all()  # nor the other images of its pass


@pytest.mark.parametrize("batch", [9, 16])
def test_qspmv_batches_run_the_float_spmm_on_dequantized_values(rng: np.random.Generator, batch: int) -> None:
    """Above ``ELL_MAX_BATCH`` (8) a quantized layer runs float spmm on ``codebook[codes]`` (pointers and
    columns shared): bit for bit the float CSR's result on the same weights, close to the codes kernel
    (``spmm=False``), into a non-contiguous ``out`` too; its bytes then count the float values, and
    a pickle carries neither run-time form."""
    import pickle

    from sparsecnn.kernels import qspmv
    from sparsecnn.kernels.spmv import prepare_linear, sparse_linear

    m, k = 45, 5000  # column slabs
    w = random_sparse(rng, (m, k), 0.9)
    w[w != 0] = np.round(w[w != 0] * 4) / 4 + 0.125
    prep = prepare_quant_linear(w)
    stored = prep.nbytes
    x = rng.standard_normal((batch, k)).astype(np.float32)
    bias = rng.standard_normal(m).astype(np.float32)
    for relu in (False, True):
        out = np.empty((batch, m), np.float32)
        qspmv.bind_quant_linear(prep, batch, bias, out, relu)(x)
        want = np.empty_like(out)
        sparse_linear(prepare_linear(w), x, bias, want, relu)
        np.testing.assert_array_equal(out, want)
        codes = np.empty_like(out)
        qspmv.bind_quant_linear(prep, batch, bias, codes, relu, spmm=False)(x)
        np.testing.assert_allclose(out, codes, rtol=1e-5, atol=1e-5)
    strided = np.empty((m, batch), np.float32).T
    quant_linear(prep, x, bias, strided)
    sparse_linear(prepare_linear(w), x, bias, want)
    np.testing.assert_array_equal(strided, want)
    assert prep.nbytes == stored + 4 * prep.nnz and prep.stored_nbytes == stored
    layer = sparsecnn.SparseLinear.from_format(prep, "qspmv", in_features=k, out_features=m)
    copy = pickle.loads(pickle.dumps(layer))
    assert copy.engine.format._float is None and copy.weight_nbytes == stored


def test_qspmv_ell_skips_layers_it_would_pad_too_much(rng: np.random.Generator) -> None:
    """One full row per block of 16 otherwise near-empty rows pads each slab to 32 rounds: above
    ``ELL_MAX_PADDING`` entries per nonzero the layer keeps the row-wise kernel (and stays exact)."""
    from sparsecnn.kernels.qspmv import ELL_MAX_PADDING, _build_ell

    w = np.zeros((64, 256), np.float32)
    w[::16] = 0.5
    prep = prepare_quant_linear(w)
    assert _build_ell(prep).entries.size > ELL_MAX_PADDING * prep.nnz
    assert prep.ell() is None
    x = rng.standard_normal((1, 256)).astype(np.float32)
    out = np.empty((1, 64), np.float32)
    quant_linear(prep, x, None, out)
    assert_close(out, x @ w.T)


def test_qspmv_ell_is_not_carried_by_pickles(rng: np.random.Generator) -> None:
    """The sliced-ELL form is a cache: a pickled SparseLinear carries the codebook CSR only and
    rebuilds the ELL form on use, with the same outputs."""
    import pickle

    w = random_sparse(rng, (40, 64), 0.9)
    w[w != 0] = np.round(w[w != 0] * 4) / 4 + 0.125
    prep = prepare_quant_linear(w)
    layer = sparsecnn.SparseLinear.from_format(prep, "qspmv", in_features=64, out_features=40)
    x = torch.from_numpy(rng.standard_normal((1, 64)).astype(np.float32))
    y = layer(x)
    copy = pickle.loads(pickle.dumps(layer))
    assert copy.engine.format._ell is None and not copy.engine.format._ell_checked
    assert_close(copy(x), y)


def test_planner_tries_qspmv_for_shared_weights(rng: np.random.Generator) -> None:
    """A quantized (weight-shared) linear layer has qspmv among its candidates up to batch 8, a float
    one and larger batches do not; the cost-model plan of a quantized model picks it (half of float CSR's
    bytes) and the sparsified model equals the quantized one."""
    from sparsecnn.plan import _candidates

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.ReLU(),
                                torch.nn.Linear(1024, 10)).eval()
    sparsecnn.models.apply_profile(model, "uniform:0.9")
    floats = torch.nn.Linear(512, 256)
    assert "qspmv" not in _candidates(floats, 1)
    quantize_model(model, QuantizeConfig(fc_bits=5))
    assert "qspmv" in _candidates(model[0], 1) and "qspmv" in _candidates(model[0], 8)
    assert "qspmv" not in _candidates(model[0], 9)
    x = torch.randn(1, 1024).abs() + 0.1  # no zero inputs: spmv-act is not a candidate
    fast = sparsecnn.sparsify(model, "auto", measure=False, example_input=x)
    assert fast[0].strategy == "qspmv"
    with torch.no_grad():
        assert_close(fast(x), model(x))


def test_compiled_compressed_model_runs_qspmv_steps(lenet_file, monkeypatch: pytest.MonkeyPatch) -> None:
    """A compressed model compiled: its FC layers are bound qspmv steps (ReLU fused; not the layer's
    torch-tensor path), and the outputs equal the loaded model's."""
    from sparsecnn.kernels import qspmv

    bound: list[bool] = []
    real = qspmv.bind_quant_linear

    def spy(*args, **kwargs):
        bound.append(bool(args[4] if len(args) > 4 else kwargs.get("relu", False)))
        return real(*args, **kwargs)

    monkeypatch.setattr(qspmv, "bind_quant_linear", spy)
    _, _, path = lenet_file
    loaded = sparsecnn.load(path)
    x = torch.randn(2, 1, 8, 8)
    fast = sparsecnn.compile(loaded, x, "auto", measure=False, tune=False)
    steps = fast.steps(tuple(x.shape))
    assert "linear:qspmv+relu" in steps and "linear:qspmv" in steps
    with torch.no_grad():
        assert_close(fast(x), loaded(x))
    assert True in bound and False in bound  # fc1 with its ReLU fused, fc2 without


def test_qspmv_is_exact_for_unquantized_weights(rng: np.random.Generator) -> None:
    w = random_sparse(rng, (40, 50), 0.2)  # ~1600 distinct values: uint16 codes
    prep = prepare_quant_linear(w)
    assert prep.codes.dtype == np.uint16 and np.array_equal(prep.to_dense(), w)
    layer = sparsecnn.SparseLinear.from_format(prep, "qspmv", in_features=50, out_features=40)
    x = torch.from_numpy(rng.standard_normal((2, 50)).astype(np.float32))
    assert_close(layer(x), x @ torch.from_numpy(w).T)


# --------------------------------------------------------------------------------------------------
# the compressed file


@pytest.fixture(scope="module")
def lenet_file(tmp_path_factory: pytest.TempPathFactory):
    torch.manual_seed(0)
    model = sparsecnn.models.build("lenet5", input_size=8, in_channels=1, num_classes=10).eval()
    sparsecnn.models.apply_profile(model, "uniform:0.85")
    books = quantize_model(model, QuantizeConfig(conv_bits=6, bits={"fc2": 3}))
    path = str(tmp_path_factory.mktemp("cmp") / "lenet.sparsecnn")
    sparsecnn.io.save_compressed(model, books, path, index_bits=5)
    return model, books, path


def test_round_trip_equals_the_quantized_model(lenet_file) -> None:
    model, books, path = lenet_file
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        ref = model(x)
        for loaded in (sparsecnn.load(path), sparsecnn.io.load_compressed(path, strategy="dense")):
            out = loaded(x)
            assert float((out - ref).norm() / ref.norm()) <= 1e-6
    loaded = sparsecnn.load(path)
    assert loaded.get_submodule("fc1").strategy == "qspmv"
    dense = sparsecnn.io.load_compressed(path, strategy="dense")
    for name, b in books.items():
        assert np.array_equal(dense.get_submodule(name).weight.detach().numpy(), b.weight())
        assert np.array_equal(loaded.sparsecnn_codebooks[name].codes, b.codes)
    with torch.no_grad():
        assert torch.equal(dense(x), ref)  # same weights, same torch ops: bit-identical


def test_file_size_is_the_arithmetic(lenet_file) -> None:
    model, books, path = lenet_file
    report = storage_report(books, 5)
    rest = sum(t.numel() * t.element_size() for k, t in model.state_dict().items()
               if k.removesuffix(".weight") not in books)
    with open(path, "rb") as f:
        data = f.read()
    header = int.from_bytes(data[13:21], "little")
    huff = sum(s.huffman_bytes for s in report.layers)
    # each of the 2 streams of a layer rounds up to whole bytes
    assert huff <= len(data) - header - rest - 13 - 8 - 32 <= huff + 2 * len(books)


def test_damaged_file_is_one_error(lenet_file, tmp_path) -> None:
    _, _, path = lenet_file
    data = open(path, "rb").read()
    for name, blob in (("trunc", data[: len(data) // 2]), ("flip", data[:100] + bytes([data[100] ^ 1]) +
                                                           data[101:]), ("empty", b""),
                       ("foreign", b"PK\x03\x04" + data[4:])):
        p = tmp_path / f"{name}.sparsecnn"
        p.write_bytes(blob)
        with pytest.raises(SparseCNNError, match="truncated, altered"):
            sparsecnn.load(str(p))
    with pytest.raises(SparseCNNError, match="does not exist"):
        sparsecnn.load(str(tmp_path / "missing.sparsecnn"))


def test_compress_cli(tmp_path, capsys) -> None:
    from sparsecnn.cli import main

    out = str(tmp_path / "a.sparsecnn")
    assert main(["compress", "lenet5", "--profile", "uniform:0.9", "--bits", "fc2=4", "--out", out]) == 0
    text = capsys.readouterr().out
    assert "paper P+Q+H" in text and "wrote" in text and os.path.getsize(out) > 0
    model = sparsecnn.load(out)
    assert model.sparsecnn_codebooks["fc2"].bits == 4
    used = {n: np.unique(b.codes[b.codes > 0]).size for n, b in model.sparsecnn_codebooks.items()}
    split = str(tmp_path / "b.sparsecnn")
    assert main(["compress", "lenet5", "--profile", "uniform:0.9", "--split-empty", "--out", split]) == 0
    capsys.readouterr()
    books = sparsecnn.load(split).sparsecnn_codebooks
    for n, b in books.items():  # every code carries weights, where the paper's k-means leaves some unused
        assert np.unique(b.codes[b.codes > 0]).size == min(b.codebook.size - 1, b.nnz) >= used[n]
    assert main(["compress", "lenet5", "--bits", "fc2=x", "--out", out]) == 2
    assert main(["compress", "lenet5", "--out", str(tmp_path / "a.npz")]) == 2
    assert main(["compress", "lenet5", "--finetune-epochs", "2", "--out", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("sparsecnn compress: error:") for line in err)


def test_compress_cli_takes_sparse_and_compressed_files_as_their_dense_equivalent(tmp_path, capsys) -> None:
    """A sparse checkpoint and a .sparsecnn file are quantized whole (their sparse / codebook layers
    as Conv2d / Linear): it once wrote a file without the FC layers (exit 0, unloadable) and said a
    sparse checkpoint had no layer to quantize."""
    from sparsecnn.cli import main

    first = str(tmp_path / "a.sparsecnn")
    assert main(["compress", "lenet5", "--profile", "uniform:0.9", "--out", first]) == 0
    sparse = str(tmp_path / "sparse.npz")
    sparsecnn.save(sparsecnn.sparsify(sparsecnn.load(first), "direct"), sparse)
    for source in (first, sparse):
        again = str(tmp_path / ("again-" + os.path.basename(source) + ".sparsecnn"))
        assert main(["compress", source, "--out", again]) == 0
        assert set(sparsecnn.load(again).sparsecnn_codebooks) == {"conv1", "conv2", "fc1", "fc2"}
    capsys.readouterr()
    assert main(["compress", "lenet5", "--out", str(tmp_path / "missing" / "b.sparsecnn")]) == 2
    assert main(["compress", "lenet5", "--out", first, "--json", str(tmp_path)]) == 2
    assert main(["compress", "lenet5", "--bits", "conv1=4,conv1=5", "--out", first]) == 2
    err = capsys.readouterr().err
    assert "does not exist; create it" in err and "is a folder; give a file path in it" in err
    assert "gives layer 'conv1' twice (4 and 5)" in err



def _gloo() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_gloo_available()


def _finetune_lenet(out: str) -> None:
    """Quantize a pruned LeNet-5, fine-tune its centroids on 1,344 digits (42 global batches of 32, so
    no rank pads its share) and save this rank's codebooks to ``out-WORLD-RANK.npz``."""
    from torch.utils.data import Subset

    from sparsecnn.compress import finetune_centroids
    from sparsecnn.data import digits
    from sparsecnn.train import TrainConfig, init_distributed, shutdown_distributed

    rank, world = init_distributed()
    splits = digits()
    model = _pruned_lenet()
    config = TrainConfig(epochs=1, lr=0.02, progress=False, device="cpu")
    tuned, result = finetune_centroids(model, quantize_model(model), Subset(splits.train, range(1344)),
                                       splits.test, config)
    arrays = {n: b.codebook for n, b in tuned.items()} | {n + ".codes": b.codes for n, b in tuned.items()}
    np.savez(f"{out}-{world}-{rank}.npz", acc=result.test_accuracy, **arrays)
    shutdown_distributed()


@pytest.mark.slow
@pytest.mark.skipif(not _gloo(), reason="torch.distributed with gloo is not available")
def test_centroid_finetuning_under_torchrun_matches_one_process(tmp_path) -> None:
    """Centroid fine-tuning under ``torchrun --nproc_per_node=2`` (gloo, CPU): DDP all-reduces each
    rank's centroid gradients, so both ranks hold the same codebooks, and with the same global batch
    and data order they equal the one-process run's up to float reduction order; ``sparsecnn compress
    --finetune-epochs`` under torchrun writes one file, from rank 0."""
    import subprocess
    import sys

    script = tmp_path / "worker.py"
    # faulthandler: a rank killed by a C++ abort prints where Python was (the clues below keep it)
    script.write_text("import faulthandler, sys\nfaulthandler.enable()\n"
                      "from tests.test_compress import _finetune_lenet\n_finetune_lenet(sys.argv[1])\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": root}

    def torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               *args]
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        # On failure, every line a dying rank printed (a C++ abort leaves no Python traceback and
        # comes long before torchrun's summary), then the summary.
        words = ("terminate", "what()", "Abort", "Error", "error", "Signal", "signal", "Fatal", "File ")
        clues = [ln for ln in proc.stderr.splitlines() if any(w in ln for w in words)]
        assert proc.returncode == 0, "\n".join(clues[-60:]) + "\n---\n" + proc.stderr[-3000:]
        return proc

    torchrun(2, str(script), str(tmp_path / "cb"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # LeNet-5 gains nothing from two; on a busy machine two are much slower
    try:
        _finetune_lenet(str(tmp_path / "cb"))  # one process, here
    finally:
        torch.set_num_threads(threads)
    one, r0, r1 = (np.load(tmp_path / f"cb-{w}-{r}.npz") for w, r in ((1, 0), (2, 0), (2, 1)))
    untuned = quantize_model(_pruned_lenet())
    moved = diff = 0.0
    for name, book in untuned.items():
        assert np.array_equal(r0[name], r1[name])  # the ranks stay in step
        for res in (one, r0):
            assert np.array_equal(res[name + ".codes"], book.codes)  # codes fixed, zeros stay zero
            assert res[name][0] == 0.0
        moved = max(moved, float(np.abs(one[name] - book.codebook).max()))
        diff = max(diff, float(np.abs(one[name] - r0[name]).max()))
    assert moved > 1e-2 and diff < 1e-3 * moved, (moved, diff)  # trained, and the same training
    assert abs(float(one["acc"]) - float(r0["acc"])) <= 1 / 450

    # the CLI: rank 0 alone writes the file and prints
    dense = tmp_path / "dense.pt"
    torch.save(_pruned_lenet().state_dict(), dense)
    out = tmp_path / "two.sparsecnn"
    proc = torchrun(2, "-m", "sparsecnn", "compress", "lenet5", "--weights", str(dense), "--data", "digits",
                    "--finetune-epochs", "1", "--quiet", "--out", str(out))
    assert proc.stdout.count("wrote ") == 1 and "fine-tuned" in proc.stdout
    tuned = sparsecnn.load(str(out)).sparsecnn_codebooks
    for name, book in untuned.items():
        assert np.array_equal(tuned[name].codes, book.codes)
        assert not np.array_equal(tuned[name].codebook, book.codebook)


def _pruned_lenet() -> nn.Module:
    model = sparsecnn.models.build("lenet5", num_classes=10, in_channels=1, input_size=8, seed=0)
    sparsecnn.models.apply_profile(model, "uniform:0.9")
    return model


def test_compression_report_is_what_analyze_prints(capsys) -> None:
    from sparsecnn.cli import main
    from sparsecnn.compress import compression_report

    model = _pruned_lenet()
    report, books = compression_report(model, 5, paper="lenet5")
    for name, book in books.items():  # the model now holds the quantized weights
        assert np.array_equal(model.get_submodule(name).weight.detach().numpy(), book.weight())
    assert report.ratio == pytest.approx(report.total("dense_bytes") / report.total("huffman_bytes"))
    assert report.rows()[-1]["paper_ratio"] == pytest.approx(1 / 0.0255)
    assert main(["analyze", "lenet5", "--compression", "--index-bits", "5"]) == 0
    assert "paper P+Q+H" in capsys.readouterr().out
