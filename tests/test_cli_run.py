"""``sparsecnn run`` and ``sparsecnn bench --whole``: the compiled executor from the command line."""

from __future__ import annotations

import json

import pytest

from sparsecnn.cli import main


def test_run_zoo_model(tmp_path, capsys) -> None:
    out = tmp_path / "run.json"
    rc = main(["run", "lenet5", "--profile", "uniform:0.9", "--strategy", "direct", "--repeats", "1",
               "--threads", "1", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "sparsecnn compiled" in text and "top classes" in text
    rec = json.loads(out.read_text())
    assert rec["max_rel_error"] <= 1e-4 and set(rec["plan"].values()) == {"direct", "spmm"}
    assert "torch dense" in rec["times_ms"]


def test_run_onnx_file_and_bench_whole(tmp_path, capsys) -> None:
    pytest.importorskip("onnx")
    from sparsecnn import models
    from sparsecnn.io import export_onnx

    model = models.build("resnet18", input_size=32, num_classes=10).eval()
    models.apply_profile(model, "uniform:0.9")
    path = tmp_path / "r18.onnx"
    export_onnx(model, path, input_shape=(3, 32, 32))
    assert main(["run", str(path), "--strategy", "direct", "--repeats", "0"]) == 0
    assert "max error" in capsys.readouterr().out
    assert main(["bench", str(path), "--whole", "--repeats", "1", "--threads", "1"]) == 0
    assert "sparsecnn compiled" in capsys.readouterr().out


def test_unsupported_onnx_op_is_one_line(tmp_path, capsys) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 4, 4])
    graph = helper.make_graph([helper.make_node("Sin", ["x"], ["y"], name="the_sine")], "g", [x], [y])
    path = tmp_path / "sin.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    assert main(["run", str(path), "--repeats", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Sin" in err[0] and "the_sine" in err[0]


def test_run_bad_arguments(capsys) -> None:
    assert main(["run", "lenet5", "--batch", "0"]) == 2
    assert main(["run", "nosuchmodel"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 2
