"""Analysis numbers against hand-computed values, and ``sparsecnn analyze`` end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from sparsecnn import SparseCNNError, models
from sparsecnn.analysis import analyze_model, gemm_dims, load_input, weight_sparsity
from sparsecnn.formats import CSRMatrix, lower_conv_weight


def tiny_model() -> nn.Module:
    """conv (4 -> 4, 3x3, groups 2) on 5x5, ReLU, flatten, linear 36 -> 3, with a known zero pattern."""
    model = nn.Sequential()
    model.add_module("conv", nn.Conv2d(4, 4, 3, groups=2))
    model.add_module("relu", nn.ReLU())
    model.add_module("flatten", nn.Flatten())
    model.add_module("fc", nn.Linear(36, 3))
    with torch.no_grad():
        w = torch.ones(4, 2, 3, 3)
        w[3] = 0  # filter 3 (group 1) all zero
        w[2, 0] = 0  # so input channel 0 of group 1 is zero in both filters of the group
        w[0:2, 1] = 0  # input channel 1 of group 0 zero in both filters
        w[0:2, 0, 0, 0] = 0  # one more lowered column of group 0
        model.conv.weight.copy_(w)
        model.conv.bias.fill_(-1.0)
        fw = torch.ones(3, 36)
        fw[1] = 0  # one zero output row
        fw[:, :4] = 0  # four zero input columns
        model.fc.weight.copy_(fw)
    model.input_shape = (4, 5, 5)
    return model


def test_weight_sparsity_by_hand() -> None:
    ws = weight_sparsity(tiny_model().conv.weight, groups=2)
    assert ws.element == pytest.approx(47 / 72)  # 18 + 9 + 18 + 2 zeros
    assert ws.filter == pytest.approx(1 / 4)  # filter 3
    assert ws.channel == pytest.approx(2 / 4)  # (group 0, ch 1) and (group 1, ch 0)
    assert ws.kernel_shape == pytest.approx(19 / 36)  # group 0: 9 + 1 columns; group 1: 9
    # groups=1 sees one 4 x 18 matrix: no input channel is zero across all four filters.
    assert weight_sparsity(tiny_model().conv.weight, groups=1).channel == 0.0
    lin = weight_sparsity(tiny_model().fc.weight)
    assert (lin.element, lin.filter, lin.channel, lin.kernel_shape) == pytest.approx(
        (1 - 2 * 32 / 108, 1 / 3, 4 / 36, 4 / 36))
    with pytest.raises(SparseCNNError, match="groups"):
        weight_sparsity(tiny_model().conv.weight, groups=3)


def test_gemm_dims() -> None:
    conv = nn.Conv2d(6, 8, (3, 5), stride=2, groups=2)
    d = gemm_dims(conv, (1, 8, 7, 4))
    assert (d.groups, d.m, d.k, d.n) == (2, 4, 3 * 3 * 5, 28)
    d = gemm_dims(nn.Linear(10, 7), (5, 7))
    assert (d.groups, d.m, d.k, d.n) == (1, 7, 10, 5)


def test_analyze_tiny_by_hand(tmp_path) -> None:
    x = np.ones((2, 4, 5, 5), dtype=np.float32)
    x[:, 0] = 0.0  # a quarter of the conv's input is zero
    x[1, 1, 0, :] = 0.0  # and 5 more of the 200 elements
    np.save(tmp_path / "x.npy", x)
    model = tiny_model()
    r = analyze_model(model, input=str(tmp_path / "x.npy"), batch=8)
    assert (r.model, r.profile, r.batch, r.input_shape) == ("Sequential", None, 2, (4, 5, 5))
    conv, fc = r.layers
    assert (conv.name, conv.kind, conv.weight_shape, conv.groups) == ("conv", "conv", (4, 2, 3, 3), 2)
    assert (conv.m, conv.k, conv.n) == (2, 18, 9)
    assert (conv.params, conv.nnz) == (72, 25)
    assert conv.sparsity == pytest.approx(47 / 72)
    assert (conv.filter_sparsity, conv.channel_sparsity, conv.kernel_shape_sparsity) == pytest.approx(
        (1 / 4, 2 / 4, 19 / 36))
    assert conv.dense_flops == 2 * 2 * 2 * 18 * 9  # 2 g M K N
    assert conv.nonzero_flops == 2 * 25 * 9
    assert conv.dense_bytes == 72 * 4
    # CSR per group: 4-byte values, int16 column indices and int16 row pointers (3 per group).
    assert conv.csr_bytes == 25 * 4 + 25 * 2 + 2 * 3 * 2
    lowered = lower_conv_weight(model.conv.weight, 2)
    assert conv.csr_bytes == sum(CSRMatrix.from_dense(m).nbytes for m in lowered)
    assert conv.csr_saving == pytest.approx(288 / conv.csr_bytes)
    assert conv.activation_sparsity == pytest.approx((50 + 5) / 200)

    assert (fc.kind, fc.m, fc.k, fc.n, fc.groups) == ("linear", 3, 36, 2, 1)
    assert (fc.params, fc.nnz) == (108, 64)
    assert fc.dense_flops == 2 * 3 * 36 and fc.nonzero_flops == 2 * 64  # per image: N = 1
    with torch.no_grad():
        fc_in = torch.relu(model.conv(torch.from_numpy(x)))
    assert fc.activation_sparsity == pytest.approx(float((fc_in == 0).float().mean()))
    assert 0 < fc.activation_sparsity < 1

    t = r.total
    assert (t.layers, t.params, t.nnz) == (2, 180, 89)
    assert t.sparsity == pytest.approx(91 / 180) and t.density == pytest.approx(89 / 180)
    assert t.dense_bytes == 720 and t.csr_bytes == conv.csr_bytes + fc.csr_bytes
    assert t.dense_flops == conv.dense_flops + fc.dense_flops
    assert t.activation_sparsity == pytest.approx(
        (55 + fc.activation_sparsity * 72) / (200 + 72))


def test_analyze_profile_uses_a_copy() -> None:
    model = models.build("lenet5", input_size=8)
    before = model.fc1.weight.detach().clone()
    r = analyze_model(model, profile="uniform:0.75", input="digits", batch=4)
    assert torch.equal(model.fc1.weight, before)
    assert r.profile == "uniform:0.75" and r.model == "lenet5" and r.input == "digits"
    for layer in r.layers:
        assert layer.sparsity == pytest.approx(0.75, abs=1e-3)
    assert [(x.m, x.k, x.n) for x in r.layers] == [(20, 25, 64), (50, 500, 16), (500, 200, 4), (10, 500, 4)]
    assert r.layers[0].activation_sparsity > 0.3  # digits have black borders
    assert json.loads(r.to_json())["total"]["params"] == 20 * 25 + 50 * 500 + 500 * 200 + 10 * 500


def test_analyze_resnet_small() -> None:
    r = analyze_model(models.build("resnet18", input_size=32), batch=1)
    assert len(r.layers) == 21 and r.layers[0].name == "conv1" and r.layers[-1].name == "fc"
    assert r.layers[0].n == 16 * 16
    assert any(x.name == "layer2.0.downsample.0" for x in r.layers)
    # layer1.0.conv2 reads a ReLU output directly (about half zeros); layer1.0.conv1 reads a 3x3 max
    # pool of ReLU outputs, which is rarely zero.
    by_name = {x.name: x for x in r.layers}
    assert 0.3 < by_name["layer1.0.conv2"].activation_sparsity < 0.7
    assert by_name["layer1.0.conv1"].activation_sparsity < by_name["layer1.0.conv2"].activation_sparsity


def test_load_input(tmp_path) -> None:
    x = load_input("random", (3, 4, 5), batch=2, seed=1)
    assert x.shape == (2, 3, 4, 5) and torch.equal(x, load_input("random", (3, 4, 5), batch=2, seed=1))
    d = load_input("digits", (3, 16, 16), batch=5)
    assert d.shape == (5, 3, 16, 16) and d.min() >= 0 and d.max() <= 1
    assert torch.equal(d[:, 0], d[:, 2])
    img = np.zeros((6, 6, 3), dtype=np.uint8)
    img[:3] = 255
    Image.fromarray(img).save(tmp_path / "a.png")
    Image.fromarray(img[::-1].copy()).save(tmp_path / "b.png")
    (tmp_path / "notes.txt").write_text("ignored")
    folder = load_input(str(tmp_path), (3, 6, 6), batch=8)
    assert folder.shape == (2, 3, 6, 6)
    assert folder[0, :, 0].eq(1).all() and folder[0, :, 5].eq(0).all()
    one = load_input(str(tmp_path / "b.png"), (1, 6, 6))
    assert one.shape == (1, 1, 6, 6) and one[0, 0, 5].eq(1).all()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nowhere/at/all", "not 'random', 'digits' or an existing"),
        ("bad.npy", r"shape \(2, 3\); the model needs \(N, 1, 8, 8\)"),
        ("corrupt.png", "cannot read image"),
        ("empty", "holds no images"),
    ],
)
def test_load_input_errors(tmp_path, spec: str, message: str) -> None:
    np.save(tmp_path / "bad.npy", np.zeros((2, 3)))
    (tmp_path / "corrupt.png").write_bytes(b"not an image")
    (tmp_path / "empty").mkdir()
    path = spec if spec.startswith("nowhere") else str(tmp_path / spec)
    with pytest.raises(SparseCNNError, match=message):
        load_input(path, (1, 8, 8))


# ------------------------------------------------------------------------------------------------
# CLI: the success path and one error in real subprocesses (started together, so their start-up
# overlaps); every other bad input through the same entry point, sparsecnn.cli.main, in-process.

JSON_KEYS = {"model", "profile", "input", "batch", "input_shape", "layers", "total"}
LAYER_KEYS = {
    "name", "kind", "weight_shape", "groups", "m", "k", "n", "params", "nnz", "sparsity", "filter_sparsity",
    "channel_sparsity", "kernel_shape_sparsity", "dense_bytes", "csr_bytes", "bsr_bytes", "relative_bytes",
    "csr_saving", "dense_flops", "nonzero_flops", "activation_sparsity",
}
TOTAL_KEYS = {
    "layers", "params", "nnz", "sparsity", "density", "dense_bytes", "csr_bytes", "bsr_bytes",
    "relative_bytes", "csr_saving", "dense_flops", "nonzero_flops", "activation_sparsity",
}

BAD = {  # case: (CLI args after "analyze", fragment of the one stderr line)
    "unknown model": (["lenet6"], "unknown model 'lenet6'; choose one of alexnet, lenet5"),
    "missing weights": (["lenet5", "--weights", "{tmp}/none.pt"], "does not exist"),
    "corrupt weights": (["lenet5", "--weights", "{tmp}/corrupt.pt"], "not a readable torch state dict"),
    "wrong weights": (["lenet5", "--weights", "{tmp}/wrong.pt"],
                      "'fc2.weight' has shape (5, 500) in the file but (10, 500) in the model"),
    "bad profile": (["lenet5", "--profile", "ssl"], "names layer 'conv3', which the model lacks"),
    "bad uniform": (["lenet5", "--profile", "uniform:2"], "malformed profile 'uniform:2'"),
    "bad input": (["lenet5", "--input", "{tmp}/nothing"], "is not 'random', 'digits' or an existing"),
    "bad npy": (["lenet5", "--input", "{tmp}/bad.npy"], "the model needs (N, 1, 28, 28)"),
    "bad batch": (["lenet5", "--batch", "0"], "batch must be a positive integer"),
    "bad json path": (["lenet5", "--json", "{tmp}/no/such/dir/out.json"], "cannot write"),
    "weights dir": (["lenet5", "--weights", "{tmp}"], "is a directory; pass the state dict file in it"),
    "model twice": (["lenet5", "--model", "alexnet"], "is already the zoo model 'lenet5': drop --model"),
    "two weights": (["{tmp}/good.pt", "--model", "lenet5", "--weights", "{tmp}/good.pt"],
                    "is already a weights file"),
    "index bits alone": (["lenet5", "--index-bits", "5"], "add --compression"),
    "index bits range": (["lenet5", "--compression", "--index-bits", "0"], "--index-bits must be 1..8"),
}


@pytest.fixture(scope="module")
def cli_tmp(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "corrupt.pt").write_bytes(b"\x00garbage")
    torch.save(models.build("lenet5", num_classes=5).state_dict(), tmp / "wrong.pt")
    torch.save(models.build("lenet5", seed=7).state_dict(), tmp / "good.pt")
    np.save(tmp / "bad.npy", np.zeros((2, 1, 8, 8), dtype=np.float32))
    return tmp


def _args(case: str, tmp) -> list[str]:
    return [a.format(tmp=tmp) for a in BAD[case][0]]


@pytest.fixture(scope="module")
def cli_runs(cli_tmp) -> dict[str, subprocess.CompletedProcess]:
    jobs = {
        "ok": ["lenet5", "--weights", str(cli_tmp / "good.pt"), "--profile", "uniform:0.5",
               "--input", "digits", "--batch", "4", "--json", str(cli_tmp / "out.json")],
        "wrong weights": _args("wrong weights", cli_tmp),
    }
    procs = {
        name: subprocess.Popen([sys.executable, "-m", "sparsecnn", "analyze", *args],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, args in jobs.items()
    }
    runs = {}
    for name, p in procs.items():
        out, err = p.communicate(timeout=300)
        runs[name] = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    return runs


def test_cli_table_and_json(cli_runs, cli_tmp) -> None:
    run = cli_runs["ok"]
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""
    lines = run.stdout.splitlines()
    assert "lenet5 1x28x28, profile uniform:0.5, input digits (batch 4)" in run.stdout
    for layer in ("conv1", "conv2", "fc1", "fc2", "total"):
        assert any(line.startswith(f"│ {layer} ") for line in lines), layer
    conv2 = next(line for line in lines if line.startswith("│ conv2 "))
    cells = [c.strip() for c in conv2.strip("│").split("│")]
    assert cells[:6] == ["conv2", "conv", "50x20x5x5", "50", "500", "64"] and cells[8] == "50.0"
    data = json.loads((cli_tmp / "out.json").read_text())
    assert set(data) == JSON_KEYS
    header = (data["model"], data["profile"], data["input"], data["batch"])
    assert header == ("lenet5", "uniform:0.5", "digits", 4)
    assert [layer["name"] for layer in data["layers"]] == ["conv1", "conv2", "fc1", "fc2"]
    for layer in data["layers"]:
        assert set(layer) == LAYER_KEYS
        assert layer["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert set(data["total"]) == TOTAL_KEYS
    assert data["total"]["params"] == sum(layer["params"] for layer in data["layers"])


def test_cli_error_in_subprocess(cli_runs) -> None:
    run = cli_runs["wrong weights"]
    assert run.returncode == 2 and run.stdout == ""
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
    assert lines[0].startswith("sparsecnn analyze: error: ") and BAD["wrong weights"][1] in lines[0]


@pytest.mark.parametrize("case", list(BAD))
def test_cli_bad_input(cli_tmp, capsys, case: str) -> None:
    from sparsecnn.cli import main

    assert main(["analyze", *_args(case, cli_tmp)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("sparsecnn analyze: error: ")
    assert BAD[case][1] in lines[0]
