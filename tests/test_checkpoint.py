"""Sparse checkpoints: round trip of every strategy, size, architectures, atomic write, bad files."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import sparsecnn
from sparsecnn.errors import SparseCNNError
from sparsecnn.io.caffe import load_caffe
from sparsecnn.io.checkpoint import CHECKPOINT_VERSION
from sparsecnn.models import apply_profile, build, resolve
from tests.caffe_writer import write
from tests.test_caffe import alexnet_like_layers


def _sparsify(model, strategy):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sparsecnn.sparsify(model, strategy)


@pytest.fixture(scope="module")
def pruned_lenet():
    model = build("lenet5")
    apply_profile(model, "uniform:0.9")
    return model.eval()


@pytest.mark.parametrize(
    "strategy", ["torch", "dense", "csrmm", "direct", "lowered", "bsr", "spgemm", "spconv-act", "spmv",
                 "spmv-act", "qspmv"]
)
@pytest.mark.parametrize("ext", ["npz", "safetensors"])
def test_round_trip_every_strategy(tmp_path, pruned_lenet, strategy, ext):
    sparse = _sparsify(pruned_lenet, strategy)
    path = sparsecnn.save(sparse, tmp_path / f"m.{ext}")
    loaded = sparsecnn.load(path)
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(loaded(x), sparse(x))
    assert loaded.sparsecnn_plan == sparse.sparsecnn_plan and loaded.input_shape == (1, 28, 28)
    for name, m in sparse.named_modules():
        if hasattr(m, "strategy"):
            twin = loaded.get_submodule(name)
            assert type(twin) is type(m) and twin.strategy == m.strategy
            assert twin.weight_nbytes == m.weight_nbytes


def test_round_trip_linears_in_the_batch_lanes_form(tmp_path, pruned_lenet):
    """Linears run as ``direct`` (the batch in the vector lanes, a DirectConvPrep of 1x1 filters) are
    saved as that format and load as the same strategy, with the same outputs."""
    plan = {n: "direct" for n, m in pruned_lenet.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    sparse = _sparsify(pruned_lenet, plan)
    linears = [m for m in sparse.modules() if isinstance(m, sparsecnn.SparseLinear)]
    assert linears and all(m.strategy == "direct" for m in linears)
    path = sparsecnn.save(sparse, tmp_path / "m.npz")
    loaded = sparsecnn.load(path)
    x = torch.randn(5, 1, 28, 28)
    assert torch.equal(loaded(x), sparse(x))
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), pruned_lenet(x), rtol=1e-4, atol=1e-5)
    for name, m in sparse.named_modules():
        if isinstance(m, sparsecnn.SparseLinear):
            assert loaded.get_submodule(name).strategy == "direct"


def test_file_size_is_the_formats_not_dense(tmp_path, pruned_lenet):
    sparse = _sparsify(pruned_lenet, "csrmm")
    path = sparsecnn.save(sparse, tmp_path / "m.npz")
    formats = sum(m.weight_nbytes for m in sparse.modules() if hasattr(m, "weight_nbytes"))
    biases = sum(m.bias.numel() * 4 for m in pruned_lenet.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    dense = sum(p.numel() * 4 for p in pruned_lenet.parameters())
    size = os.path.getsize(path)
    assert formats + biases <= size <= formats + biases + 16 * 1024  # header and zip entries only
    assert size < 0.2 * dense


def test_imported_caffe_graph_round_trips(tmp_path, rng):
    proto, weights = write(tmp_path, alexnet_like_layers(rng), (1, 3, 35, 35))
    model = load_caffe(proto, weights)
    apply_profile(model, "uniform:0.7")
    sparse = _sparsify(model, "csrmm")
    loaded = sparsecnn.load(sparsecnn.save(sparse, tmp_path / "alex.safetensors"))
    x = torch.randn(2, 3, 35, 35)
    assert torch.equal(loaded(x), sparse(x))
    assert resolve(str(tmp_path / "alex.safetensors")).input_shape == (3, 35, 35)


class Custom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.head = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).flatten(1))


def test_custom_module_needs_a_skeleton(tmp_path):
    torch.manual_seed(0)
    model = Custom().eval()
    apply_profile(model, "uniform:0.5")
    sparse = _sparsify(model, "csrmm")
    path = sparsecnn.save(sparse, tmp_path / "c.npz")
    with pytest.raises(SparseCNNError, match="pass model="):
        sparsecnn.load(path)
    loaded = sparsecnn.load(path, model=Custom())
    x = torch.randn(2, 2, 6, 6)
    assert torch.equal(loaded(x), sparse(x))
    with pytest.raises(SparseCNNError, match=r"does not fit|no layer"):
        sparsecnn.load(path, model=build("lenet5"))


def _rewrite_header(path, change):
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    header = json.loads(arrays["__header__"].tobytes())
    change(header)
    arrays["__header__"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def test_newer_version_and_foreign_files(tmp_path, pruned_lenet):
    path = str(tmp_path / "m.npz")
    sparsecnn.save(_sparsify(pruned_lenet, "spmv"), path)
    _rewrite_header(path, lambda h: h.update(version=CHECKPOINT_VERSION + 1))
    with pytest.raises(SparseCNNError, match=f"format version {CHECKPOINT_VERSION + 1}, newer"):
        sparsecnn.load(path)
    np.savez(tmp_path / "plain.npz", a=np.zeros(3))
    with pytest.raises(SparseCNNError, match="no sparsecnn header"):
        sparsecnn.load(tmp_path / "plain.npz")
    with pytest.raises(SparseCNNError, match=r"must end in \.npz or \.safetensors"):
        sparsecnn.save(pruned_lenet, tmp_path / "m.bin")
    with pytest.raises(SparseCNNError, match="does not exist"):
        sparsecnn.load(tmp_path / "none.npz")


def test_corrupt_arrays_are_caught_by_the_format_checks(tmp_path, pruned_lenet):
    path = str(tmp_path / "m.npz")
    sparsecnn.save(_sparsify(pruned_lenet, "csrmm"), path)
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["sparse/fc1/indices"] = arrays["sparse/fc1/indices"][::-1].copy()  # unsorted columns
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    with pytest.raises(SparseCNNError, match="checksum does not match"):
        sparsecnn.load(path)
    # a version-1 file (no checksum) with the same damage: the format checks catch it
    del arrays["__sha256__"]
    header = json.loads(arrays["__header__"].tobytes())
    header["version"] = 1
    arrays["__header__"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    with pytest.raises(SparseCNNError, match="fc1"):
        sparsecnn.load(path)


def test_write_is_atomic(tmp_path, pruned_lenet, monkeypatch):
    path = tmp_path / "m.npz"
    good = _sparsify(pruned_lenet, "csrmm")
    sparsecnn.save(good, path)
    before = path.read_bytes()

    def disk_full(f, *args, **kwargs):  # the write fails half way
        f.write(b"PK\x03\x04 half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", disk_full)
    with pytest.raises(OSError):
        sparsecnn.save(_sparsify(pruned_lenet, "bsr"), path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.npz"]


@pytest.fixture(scope="module")
def valid_checkpoint(tmp_path_factory, pruned_lenet):
    path = tmp_path_factory.mktemp("ck") / "v.npz"
    sparsecnn.save(_sparsify(pruned_lenet, "csrmm"), path)
    return path.read_bytes()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    cut=st.integers(0, 10**7),
    flips=st.lists(st.tuples(st.integers(0, 10**7), st.integers(0, 255)), max_size=4),
    raw=st.binary(max_size=200),
    use_raw=st.booleans(),
    ext=st.sampled_from(["npz", "safetensors"]),
)
def test_fuzzed_checkpoint_bytes(valid_checkpoint, tmp_path_factory, cut, flips, raw, use_raw, ext):
    data = bytearray(raw if use_raw else valid_checkpoint)
    for pos, value in flips:
        if data:
            data[pos % len(data)] = value
    data = data[: cut % (len(data) + 1)]
    path = tmp_path_factory.mktemp("fz") / f"f.{ext}"
    path.write_bytes(bytes(data))
    try:
        sparsecnn.load(path)
    except SparseCNNError:
        pass
