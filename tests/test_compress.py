"""Deep Compression stages 2-3 (issue 13): weight sharing, Huffman coding, storage, qspmv, the file."""

from __future__ import annotations

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


def test_kmeans_is_a_lloyd_fixpoint_with_every_code_used(rng: np.random.Generator) -> None:
    v = rng.uniform(-1, 1, 20000)
    v = v[np.abs(v) > 0.8]  # pruned: two tails, the linear init's middle centroids start empty
    c, labels = kmeans_1d(v, 31)
    assert np.all(np.diff(c) > 0)
    assert np.bincount(labels, minlength=31).min() > 0
    nearest = np.abs(v[:, None] - c[None, :].astype(np.float64)).argmin(axis=1)
    assert np.array_equal(labels, nearest)
    for j in range(31):  # each centroid is the mean of its members (float32 rounding)
        assert abs(c[j] - v[labels == j].mean()) <= 1e-6


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
        assert len(np.unique(b.codes[b.codes > 0])) == min((1 << b.bits) - 1, int((~zero[name]).sum()))
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
    assert main(["compress", "lenet5", "--bits", "fc2=x", "--out", out]) == 2
    assert main(["compress", "lenet5", "--out", str(tmp_path / "a.npz")]) == 2
    assert main(["compress", "lenet5", "--finetune-epochs", "2", "--out", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("sparsecnn compress: error:") for line in err)
