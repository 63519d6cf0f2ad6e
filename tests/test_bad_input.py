"""Bad input on every entry point: one clear SparseCNNError (CLI: one line on stderr, exit 2), never a
traceback from inside torch/numba or a silently wrong number; and long runs keep what they measured.

Each test is a regression test for a problem found by probing the entry points.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsecnn import data, models
from sparsecnn.analysis import analyze_model, load_input
from sparsecnn.cli import main
from sparsecnn.errors import SparseCNNError


def lenet8() -> torch.nn.Module:
    return models.build("lenet5", num_classes=10, in_channels=1, input_size=8).eval()


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    """Run the CLI in this process; return the exit code and stderr (which must be one line)."""
    capsys.readouterr()
    rc = main(list(argv))
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return rc, err


@pytest.fixture
def small_memory(monkeypatch):
    """Pretend 4 MB is available: the memory guard must refuse before allocating."""
    monkeypatch.setenv("SPARSECNN_MEMORY_LIMIT", "4e6")


# --------------------------------------------------------------------------------------------------
# a model or batch too big for memory: refused with an estimate, before allocating


def test_zoo_build_too_big_for_memory_is_refused_before_allocating() -> None:
    # 819G weights: torch's allocator used to fail with a DefaultCPUAllocator RuntimeError.
    big = r"vgg16 .*input_size=20000.* needs about .*TiB.*smaller input_size"
    with pytest.raises(SparseCNNError, match=big):
        models.build("vgg16", input_size=20000)
    with pytest.raises(SparseCNNError, match="num_classes"):
        models.build("resnet18", num_classes=10**9)


def test_analysis_batch_too_big_for_memory(small_memory) -> None:
    # The input itself: refused before torch.randn allocates it.
    big = r"input batch of 1000 images of 1x28x28 needs about .* smaller batch"
    with pytest.raises(SparseCNNError, match=big):
        load_input("random", (1, 28, 28), batch=1000)
    # A batch that fits, whose first conv output would not: the guard names the layer.
    with pytest.raises(SparseCNNError, match=r"layer 'conv1' on an input of shape \(64, 1, 28, 28\) needs"):
        analyze_model(models.build("lenet5"), batch=64)


def test_analyze_cli_batch_too_big_exits_2(capsys, small_memory) -> None:
    rc, err = run_cli(capsys, "analyze", "lenet5", "--batch", "64")
    assert rc == 2 and "conv1" in err and "smaller batch" in err


def test_bench_batch_too_big_is_one_error_before_the_results_file(tmp_path, small_memory) -> None:
    from sparsecnn.bench.experiments import bench_model

    results = tmp_path / "bench.jsonl"
    # Used to become one error record per layer and strategy; now one error, and no file clobbered.
    with pytest.raises(SparseCNNError, match="conv1"):
        bench_model(models.build("lenet5"), "lenet5", batch=64, progress=False, results=results)
    assert not results.exists()


def test_sweep_shape_too_big_for_memory(capsys, tmp_path) -> None:
    out = str(tmp_path / "s.jsonl")
    rc, err = run_cli(capsys, "sweep", "--shape", "100000x100000x100000", "--results", out)
    assert rc == 2 and "100000x100000x100000 product needs about" in err


# --------------------------------------------------------------------------------------------------
# NaN / Inf weights: refused where they enter, naming the tensor


def test_analyze_model_nan_weight_names_the_layer() -> None:
    model = lenet8()
    model.fc1.bias.data[3] = float("inf")
    # Used to say "dense.from_dense input contains NaN" without naming the layer.
    with pytest.raises(SparseCNNError, match=r"layer 'fc1': bias holds 1 NaN/Inf"):
        analyze_model(model)


def test_load_weights_with_nan_is_refused(tmp_path) -> None:
    state = lenet8().state_dict()
    state["conv2.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(SparseCNNError, match=r"'conv2.weight' holds 1 NaN/Inf"):
        models.load_weights(lenet8(), tmp_path / "nan.pt")


def test_caffe_blob_with_nan_is_refused(tmp_path, rng) -> None:
    from sparsecnn.io import load_caffe
    from tests.caffe_writer import write
    from tests.test_caffe import lenet_layers

    layers = lenet_layers(rng)
    layer = next(L for L in layers if L.blobs)
    layer.blobs[0] = layer.blobs[0].copy()
    layer.blobs[0].flat[5] = np.nan
    proto, weights = write(tmp_path, layers, (1, 1, 28, 28))
    with pytest.raises(SparseCNNError, match=rf"layer '{layer.name}'.*NaN/Inf"):
        load_caffe(proto, weights)


def test_onnx_nan_initializer_and_export_of_nan_model(tmp_path) -> None:
    import onnx

    from sparsecnn.io import export_onnx, load_onnx

    export_onnx(lenet8(), tmp_path / "lenet.onnx")
    proto = onnx.load(tmp_path / "lenet.onnx")
    init = next(t for t in proto.graph.initializer if t.name.endswith("fc2.weight"))
    arr = onnx.numpy_helper.to_array(init).copy()
    arr[0, 0] = np.nan
    init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    onnx.save(proto, tmp_path / "nan.onnx")
    with pytest.raises(SparseCNNError, match=r"initializer 'fc2.weight' holds 1 NaN/Inf"):
        load_onnx(tmp_path / "nan.onnx")

    model = lenet8()
    model.conv1.weight.data[0] = float("nan")
    with pytest.raises(SparseCNNError, match=r"'conv1.weight' holds 25 NaN/Inf"):
        export_onnx(model, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()
    with pytest.raises(SparseCNNError, match=r"needs a torch\.nn\.Module"):
        export_onnx("lenet5", tmp_path / "out.onnx", input_shape=(1, 8, 8))  # was an AttributeError


# --------------------------------------------------------------------------------------------------
# training and pruning options that used to crash in torch or train silently on NaN


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("momentum", -1.0, "momentum"),  # was torch's ValueError traceback
        ("momentum", float("nan"), "momentum"),  # was a run that silently trained to NaN
        ("weight_decay", -1.0, "weight decay"),
        ("weight_decay", float("nan"), "weight decay"),
    ],
)
def test_train_config_rejects_bad_optimizer_settings(field, value, match) -> None:
    from sparsecnn.train import TrainConfig

    with pytest.raises(SparseCNNError, match=match):
        TrainConfig(**{field: value})


def test_prune_config_rejects_nan_strength_and_negative_ssl_epochs() -> None:
    from sparsecnn.prune import PruneConfig

    with pytest.raises(SparseCNNError, match="ssl_strength"):
        PruneConfig(method="ssl", target=0.5, ssl_strength=float("nan"))
    with pytest.raises(SparseCNNError, match="ssl_epochs"):
        PruneConfig(method="ssl", target=0.5, ssl_epochs=-1)


def test_diverging_training_stops_with_a_message() -> None:
    from torch.utils.data import Subset

    from sparsecnn.train import TrainConfig, fit

    d = data.digits()
    small = Subset(d.train, range(320))
    model = lenet8()
    # lr 1e8 turns the loss into NaN; the run used to finish "successfully" with NaN weights.
    with pytest.raises(SparseCNNError, match=r"diverged in epoch 1.*smaller learning rate"):
        config = TrainConfig(epochs=1, lr=1e8, batch_size=32, progress=False)
        fit(model, small, Subset(d.test, range(32)), config)


# --------------------------------------------------------------------------------------------------
# trained weights load back by name; CLI options that used to be missing or ignored


def test_trained_weights_load_with_their_recorded_build(tmp_path, capsys) -> None:
    # `sparsecnn train`/`prune` write summary.json with the build arguments (8x8 LeNet-5 on digits);
    # `analyze lenet5 --weights runs/x/model.pt` used to fail on the 28x28 default, and the error
    # for `analyze runs/x/model.pt` suggested a --model option that analyze did not have.
    run = tmp_path / "run"
    run.mkdir()
    torch.save(lenet8().state_dict(), run / "model.pt")
    (run / "summary.json").write_text(
        json.dumps({"model": "lenet5", "build": {"num_classes": 10, "in_channels": 1, "input_size": 8}})
    )
    assert models.resolve("lenet5", weights=run / "model.pt").input_shape == (1, 8, 8)
    capsys.readouterr()
    argv = ["analyze", str(run / "model.pt"), "--model", "lenet5", "--json", str(tmp_path / "a.json")]
    assert main(argv) == 0
    assert json.loads((tmp_path / "a.json").read_text())["input_shape"] == [1, 8, 8]
    # Explicit build arguments still win over the summary.
    with pytest.raises(SparseCNNError, match="does not fit the model"):
        models.resolve("lenet5", weights=run / "model.pt", input_size=28)


@pytest.mark.parametrize(
    "argv",
    [
        ["sweep", "--threads", "0"],  # --threads 0 used to mean "all cores", silently
        ["bench", "lenet5", "--threads", "0"],
        ["report", "--threads", "0", "--only", "weight_sparsity"],
        ["sweep", "--batch", "0"],  # used to fail inside every task, as error records
        ["sweep", "--repeats", "0"],
        ["bench", "lenet5", "--repeats", "0"],
    ],
)
def test_cli_counts_must_be_positive(capsys, tmp_path, argv) -> None:
    rc, err = run_cli(capsys, *argv, *(["--out", str(tmp_path)] if argv[0] == "report" else []))
    assert rc == 2 and "must be >= 1" in err
    assert not list(tmp_path.iterdir())  # nothing written, nothing replaced


def test_set_threads_zero_is_an_error() -> None:
    from sparsecnn.bench.harness import set_threads

    with pytest.raises(SparseCNNError, match="threads must be >= 1"):
        set_threads(0)


def test_npy_input_with_truncated_data(tmp_path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((4, 1, 8, 8), np.float32))
    raw = (tmp_path / "x.npy").read_bytes()
    (tmp_path / "t.npy").write_bytes(raw[: len(raw) - 100])
    with pytest.raises(SparseCNNError, match=r"cannot read .*t\.npy as a \.npy array"):
        load_input(str(tmp_path / "t.npy"), (1, 8, 8), batch=2)


# --------------------------------------------------------------------------------------------------
# sweep / bench write as they go, survive an interrupt and resume


def test_sweep_typo_does_not_replace_earlier_results(capsys, tmp_path) -> None:
    results = tmp_path / "sweep.jsonl"
    results.write_text('{"earlier": "results"}\n')
    rc, err = run_cli(capsys, "sweep", "--layer", "nope.conv3", "--results", str(results))
    assert rc == 2 and "unknown model 'nope'" in err
    assert results.read_text() == '{"earlier": "results"}\n'


def test_sweep_interrupted_keeps_its_measurements_and_resumes(tmp_path) -> None:
    results = tmp_path / "sweep.jsonl"
    argv = [
        sys.executable,
        "-m",
        "sparsecnn",
        "sweep",
        "--shape",
        "32x64x16",
        "--repeats",
        "1",
        "--threads",
        "1",
        "--sparsity",
        "0.05:0.95:600",  # 3,000 measurements, ~10 s: 300 of them once finished before the signal
        "--results",
        str(results),
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if results.exists() and results.read_text().count('"measurement"') >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the sweep ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130, err
    assert "--resume" in err and str(results) in err and len(err.strip().splitlines()) == 1
    kept = [json.loads(line) for line in results.read_text().splitlines()]
    measured = [r for r in kept if r["type"] == "measurement"]
    assert 3 <= len(measured) < 600 * 5  # stopped part-way

    # Resume with a smaller list (same keys for the first points): nothing measured twice.
    from sparsecnn.bench.experiments import run_sweep

    first = sorted({r["params"]["sparsity"] for r in measured})[:1]
    records = run_sweep(
        shape=(32, 64, 16),
        sparsities=first,
        repeats=1,
        threads=1,
        progress=False,
        results=results,
        resume=True,
    )
    again = [json.loads(line) for line in results.read_text().splitlines()]
    keys = [r["key"] for r in again if r["type"] == "measurement"]
    assert len(keys) == len(set(keys))
    done = {r["key"]: r["time"] for r in measured}
    assert all(r["time"] == done[r["key"]] for r in records if r["key"] in done)
    assert {r["key"] for r in measured} <= set(keys)  # kept, not replaced


def test_analysis_of_the_cli_model_file_names_the_missing_option(capsys, tmp_path) -> None:
    torch.save(lenet8().state_dict(), tmp_path / "model.pt")
    rc, err = run_cli(capsys, "analyze", str(tmp_path / "model.pt"))
    assert rc == 2 and "--model NAME" in err
    rc, err = run_cli(capsys, "analyze", str(tmp_path / "model.pt"), "--model", "lenet5")
    assert rc == 2 and "record in summary.json" in err  # none here: the 28x28 default does not fit


def test_recorded_build_is_ignored_for_another_model(tmp_path) -> None:
    Path(tmp_path / "summary.json").write_text(json.dumps({"model": "alexnet", "build": {"input_size": 8}}))
    torch.save(models.build("lenet5").state_dict(), tmp_path / "model.pt")
    assert models.resolve("lenet5", weights=tmp_path / "model.pt").input_shape == (1, 28, 28)


def test_analyze_a_sparse_model_or_checkpoint(tmp_path) -> None:
    # `sparsecnn analyze ckpt.npz` (a MODEL the README lists) used to say "Sequential has no Conv2d
    # or Linear layers to analyse": sparse layers are now analysed as their dense equivalent.
    import sparsecnn

    model = lenet8()
    models.apply_profile(model, "uniform:0.8")
    sparsecnn.save(sparsecnn.sparsify(model, "csrmm"), tmp_path / "ckpt.npz")
    got = analyze_model(models.resolve(str(tmp_path / "ckpt.npz")))
    want = analyze_model(model)
    assert [r.nnz for r in got.layers] == [r.nnz for r in want.layers]
    assert got.total.csr_bytes == want.total.csr_bytes


def test_fit_and_prune_model_refuse_a_model_that_does_not_fit_the_data() -> None:
    from torch.utils.data import Subset

    from sparsecnn.prune import PruneConfig, prune_model
    from sparsecnn.train import TrainConfig, fit

    d = data.digits()
    train, test = Subset(d.train, range(64)), Subset(d.test, range(32))
    config = TrainConfig(epochs=1, progress=False)
    # These were torch tracebacks (conv kernel larger than the input, IndexError in cross_entropy).
    with pytest.raises(SparseCNNError, match=r"cannot run on the training set's images of shape \(1, 8, 8\)"):
        fit(models.build("lenet5"), train, test, config)
    with pytest.raises(SparseCNNError, match="label 9 is outside the model's 5 classes"):
        fit(models.build("lenet5", num_classes=5, in_channels=1, input_size=8), train, test, config)
    nan = lenet8()
    nan.fc1.weight.data[0, 0] = float("nan")
    prune = PruneConfig(method="magnitude", target=0.5, schedule="oneshot", retrain=replace_epochs(config, 0))
    with pytest.raises(SparseCNNError, match=r"'fc1.weight' holds 1 NaN/Inf"):  # pruned NaN weights silently
        prune_model(nan, train, test, prune)
    with pytest.raises(SparseCNNError, match="block size"):  # accepted, then a ZeroDivisionError later
        PruneConfig(method="block", target=0.5, blocksize=(0, 4))


def replace_epochs(config, epochs: int):
    from dataclasses import replace

    return replace(config, epochs=epochs)


def test_render_only_without_measurements_is_refused(capsys, tmp_path) -> None:
    # A run killed before its first measurement left only (part of) a header: --render-only used to
    # write an empty page ("None cores, device None; 0 measurements") and exit 0.
    (tmp_path / "results.jsonl").write_text('{"schema": 1, "type": "env", "env_id": "ab')
    rc, err = run_cli(capsys, "report", "--render-only", "--out", str(tmp_path))
    assert rc == 2 and "holds no measurements" in err and "--resume" in err
    assert not (tmp_path / "report.html").exists()


def test_sparse_layer_constructors_name_bad_arguments() -> None:
    import torch.nn as nn

    from sparsecnn.layers import SparseConv2d, SparseLinear

    conv = nn.Conv2d(3, 4, 3)
    cases = [
        (lambda: SparseConv2d.from_dense(nn.Linear(3, 4), "csrmm"), "SparseLinear.from_dense"),
        (lambda: SparseConv2d.from_dense(nn.Conv1d(3, 4, 3), "csrmm"), "needs a torch.nn.Conv2d"),
        (lambda: SparseConv2d.from_dense("conv", "csrmm"), "needs a torch.nn.Conv2d"),
        (lambda: SparseConv2d.from_dense(conv, "bsr", blocksize=(0, 4)), "blocksize"),
        (lambda: SparseConv2d.from_dense(conv, "csrmm", device="tpu"), "unknown device"),
        (lambda: SparseLinear.from_dense(nn.Conv2d(3, 8, 3), "spmv"), "SparseConv2d.from_dense"),
    ]
    for call, message in cases:
        with pytest.raises(SparseCNNError, match=message):
            call()


@pytest.mark.parametrize("shape", [(1, 3, 8, 8), (1, 8, 8)])
def test_compile_and_auto_plan_name_an_example_input_the_model_cannot_take(shape) -> None:
    import sparsecnn

    model = models.build("lenet5", in_channels=1, input_size=8).eval()
    x = torch.randn(*shape)
    for call in (lambda: sparsecnn.compile(model, x, measure=False),
                 lambda: sparsecnn.sparsify(model, "auto", example_input=x, measure=False)):
        with pytest.raises(SparseCNNError, match=r"does not run on the example input of shape"):
            call()


def test_a_directory_is_not_a_model(capsys, tmp_path) -> None:
    import sparsecnn

    with pytest.raises(SparseCNNError, match=r"is a directory: pass a \.onnx"):
        sparsecnn.compile(str(tmp_path), torch.randn(1, 1, 8, 8))
    assert main(["run", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_a_zoo_name_wins_over_a_directory_of_that_name(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lenet5").mkdir()  # e.g. a run's output directory named after its model
    assert isinstance(models.resolve("lenet5"), torch.nn.Module)


# --------------------------------------------------------------------------------------------------
# output paths, resume files and options that used to end in a raw traceback (or after measuring)

SWEEP = ("sweep", "--shape", "16x32x8", "--sparsity", "0.5,0.9", "--repeats", "1", "--threads", "1")


@pytest.mark.parametrize("where", ["folder", "under_a_file"])
@pytest.mark.parametrize("verb", ["sweep", "bench"])
def test_results_path_that_cannot_be_a_file(capsys, tmp_path, verb, where) -> None:
    # A folder was an IsADirectoryError, a path under a file a FileExistsError (ResultsLog.__init__).
    (tmp_path / "file.pt").write_text("x")
    results = tmp_path if where == "folder" else tmp_path / "file.pt" / "x.jsonl"
    argv = SWEEP if verb == "sweep" else ("bench", "lenet5", "--repeats", "1", "--threads", "1")
    rc, err = run_cli(capsys, *argv, "--results", str(results))
    assert rc == 2 and ("is a folder" if where == "folder" else "is a file, not a folder") in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.pt"]


def test_results_log_refuses_bad_paths(tmp_path) -> None:
    from sparsecnn.bench.harness import ResultsLog

    (tmp_path / "file.pt").write_text("x")
    with pytest.raises(SparseCNNError, match="is a folder"):
        ResultsLog(tmp_path)
    with pytest.raises(SparseCNNError, match=r"file\.pt is a file, not a folder"):
        ResultsLog(tmp_path / "file.pt" / "sub" / "r.jsonl")


@pytest.mark.parametrize(
    ("verb", "sub"),
    [("report", ""), ("report", "sub"), ("train", "sub"), ("prune", "sub")],
)
def test_output_folder_that_is_or_lies_under_a_file(capsys, tmp_path, verb, sub) -> None:
    # `--out FILE/sub` was a NotADirectoryError from out.mkdir (train, prune) or the report's mkdir.
    (tmp_path / "file.pt").write_text("x")
    out = str(tmp_path / "file.pt" / sub) if sub else str(tmp_path / "file.pt")
    argv = {
        "report": ("report", "--size", "tiny", "--only", "weight_sparsity"),
        "train": ("train", "lenet5", "--epochs", "1", "--quiet"),
        "prune": ("prune", str(tmp_path / "file.pt"), "--model", "lenet5", "--method", "magnitude"),
    }[verb]
    rc, err = run_cli(capsys, *argv, "--out", out)
    assert rc == 2 and "file.pt" in err and ("not a folder" in err or "is a file" in err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.pt"]


@pytest.mark.parametrize(
    ("argv", "target", "message"),
    [
        (("sweep", "--plot"), "nd/x.png", "does not exist"),  # FileNotFoundError after measuring
        (("sweep", "--plot"), "", "is a folder"),  # IsADirectoryError after measuring
        (("sweep", "--json"), "", "is a folder"),
        (("sweep", "--json"), "nd/x.json", "does not exist"),
        (("bench", "lenet5", "--json"), "nd/x.json", "does not exist"),
        (("run", "lenet5", "--json"), "", "is a folder"),
        (("export", "lenet5", "--onnx"), "", "is a folder"),  # was "Is a directory: '.export-xx.onnx'"
    ],
)
def test_output_files_are_checked_before_any_work(capsys, tmp_path, argv, target, message) -> None:
    path = tmp_path / target if target else tmp_path
    rest = ("--results", str(tmp_path / "s.jsonl")) if argv[0] in ("sweep", "bench") else ()
    head = SWEEP[1:] if argv[0] == "sweep" else ()
    rc, err = run_cli(capsys, argv[0], *head, *argv[1:], str(path), *rest)
    assert rc == 2 and message in err and str(path) in err
    assert not list(tmp_path.iterdir())  # refused before measuring: no results file


@pytest.mark.parametrize("line", ["[1, 2, 3]", '{"type": "measurement"}', '"text"'])
def test_resume_from_a_results_file_with_non_records(capsys, tmp_path, line) -> None:
    # Valid JSON that is not a record: AttributeError ('list' has no .get) or KeyError 'key'.
    results = tmp_path / "sweep.jsonl"
    results.write_text(line + "\n")
    rc, err = run_cli(capsys, *SWEEP, "--resume", "--results", str(results))
    assert rc == 2 and f"{results}:1" in err and "--resume" in err and "delete" in err
    assert results.read_text() == line + "\n"  # kept for the user to look at


def test_read_records_refuses_a_line_that_is_not_an_object(tmp_path) -> None:
    from sparsecnn.bench.harness import read_records

    (tmp_path / "r.jsonl").write_text("[1, 2, 3]\n")
    with pytest.raises(SparseCNNError, match=r"r\.jsonl:1 is not a JSON record \(a list\)"):
        read_records(tmp_path / "r.jsonl")


@pytest.mark.parametrize("saved", ["plain_dict", "state_dict"])
def test_train_resume_from_a_file_that_is_not_a_training_checkpoint(capsys, tmp_path, saved) -> None:
    # fit used to fail with KeyError 'model' (or 'optimizer' for a dict holding a 'model').
    out = tmp_path / "run"
    out.mkdir()
    obj = {"a": 1} if saved == "plain_dict" else lenet8().state_dict()
    torch.save(obj, out / "checkpoint.pt")
    rc, err = run_cli(capsys, "train", "lenet5", "--epochs", "1", "--quiet", "--out", str(out), "--resume")
    assert rc == 2 and "not a sparsecnn training checkpoint" in err and "without --resume" in err
    assert not (out / "model.pt").exists()


@pytest.mark.parametrize("only", ["", ",", " , "])
def test_report_only_with_no_names(capsys, tmp_path, only) -> None:
    # '' ran the full report; ',' wrote an empty report with exit code 0.
    rc, err = run_cli(capsys, "report", "--size", "tiny", "--only", only, "--out", str(tmp_path))
    assert rc == 2 and "weight_sparsity" in err and "compression" in err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("opset", ["99", "0", "-1", "below", "above"])
def test_export_opset_out_of_range(capfd, tmp_path, opset) -> None:
    from sparsecnn.io.onnx import onnx_opsets

    # Used to print 26 lines of Torch IR on stderr (from C++, hence capfd) before the error.
    lo, hi = onnx_opsets()
    opset = {"below": str(lo - 1), "above": str(hi + 1)}.get(opset, opset)
    rc, err = run_cli(capfd, "export", "lenet5", "--onnx", str(tmp_path / "m.onnx"), "--opset", opset)
    assert rc == 2 and f"--opset {opset}" in err and f"{lo}..{hi}" in err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [("--sparsity", "-0.1:0.5:3", "in [0, 1]"), ("--shape", "-1x3x3", "must be >= 1")],
)
def test_sweep_negative_values_reach_the_range_check(capsys, tmp_path, flag, value, message) -> None:
    # argparse took the leading '-' for an option: "expected one argument".
    argv = [a for a in SWEEP if a not in ("--shape", "16x32x8")]
    rc, err = run_cli(capsys, *argv, flag, value, "--results", str(tmp_path / "s.jsonl"))
    assert rc == 2 and message in err and value in err


def test_prune_resume_message_names_the_cli_option(capsys, tmp_path) -> None:
    torch.save(lenet8().state_dict(), tmp_path / "w.pt")
    out = tmp_path / "out"
    out.mkdir()
    torch.save({"a": 1}, out / "checkpoint.pt")
    argv = ["prune", str(tmp_path / "w.pt"), "--model", "lenet5", "--method", "magnitude", "--target", "0.5",
            "--schedule", "oneshot", "--retrain-epochs", "0", "--quiet", "--out", str(out), "--resume"]
    rc, err = run_cli(capsys, *argv)
    assert rc == 2 and "not a sparsecnn pruning checkpoint" in err and "without --resume" in err
    assert "resume=False" not in err


def test_prune_names_a_missing_weights_file_before_asking_for_model(capsys, tmp_path) -> None:
    """It said "pass --model (no readable summary.json ...)" for a file that does not exist."""
    for weights, what in ((tmp_path / "none.pt", "does not exist"), (tmp_path, "is a directory")):
        rc, err = run_cli(capsys, "prune", str(weights), "--data", "digits", "--method", "magnitude",
                          "--target", "0.5", "--out", str(tmp_path / "p"))
        assert rc == 2 and f"{weights} {what}" in err


def test_export_onnx_checks_its_path_and_opset_itself(tmp_path) -> None:
    """The library refuses what the CLI refuses (a folder as the file, an opset torch cannot write)."""
    from sparsecnn.io import export_onnx
    from sparsecnn.io.onnx import onnx_opsets

    model = models.build("lenet5")
    with pytest.raises(SparseCNNError, match="it is a directory"):
        export_onnx(model, tmp_path)
    with pytest.raises(SparseCNNError, match=f"exports ONNX opsets {onnx_opsets()[0]}"):
        export_onnx(model, tmp_path / "m.onnx", opset=onnx_opsets()[1] + 1)
    assert not list(tmp_path.iterdir())
