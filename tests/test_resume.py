"""Interrupted work: ``sweep``, ``bench``, ``report``, ``train`` and ``prune`` killed with SIGKILL at
random points, then resumed: no measurement or epoch lost or duplicated, no half file on disk.

Each command is killed five times under ``SPARSECNN_FUZZ=1`` (set by ``make fuzz``). ``make test`` runs
``sweep`` (five kills) and ``train`` (two) only: ``bench``, ``report`` and ``prune`` took 1.5-4 minutes
each on the shared 2-core machine even with two kills (each run imports torch and times or trains
LeNet-5), so they run in ``make fuzz``.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from sparsecnn.bench.harness import MEASUREMENT

pytestmark = pytest.mark.slow  # subprocesses that import torch and numba: a few seconds each

FULL = bool(os.environ.get("SPARSECNN_FUZZ"))
KILLS = 5 if FULL else 2  # sweep: always 5
CLI = [sys.executable, "-m", "sparsecnn"]
PNG_END = b"IEND\xaeB`\x82"


def _run(args: list[str], cwd: Path, timeout: float = 300) -> float:
    t0 = time.perf_counter()
    subprocess.run([*CLI, *args], cwd=cwd, check=True, capture_output=True, timeout=timeout)
    return time.perf_counter() - t0


def _kill_after(args: list[str], cwd: Path, delay: float) -> None:
    p = subprocess.Popen([*CLI, *args], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        p.wait(timeout=delay)  # finished before the kill: also a legal outcome
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def _assert_no_half_files(d: Path) -> None:
    """Every output is whole: JSON parses, PNGs end in IEND, torch files load; a torn last line of an
    append-only JSONL log is allowed (resume drops it), nothing else."""
    for f in d.rglob("*"):
        if not f.is_file():
            continue
        if f.name.startswith(".") and f.name.endswith(".tmp"):
            continue  # a temp file of the killed writer: never read, removed by the next write
        data = f.read_bytes()
        if f.suffix == ".jsonl":
            lines = data.split(b"\n")
            for line in lines[:-1]:
                json.loads(line)
        elif f.suffix == ".json":
            json.loads(data)
        elif f.suffix == ".png":
            assert data.endswith(PNG_END), f"{f} is half a PNG"
        elif f.suffix == ".pt":
            torch.load(f, map_location="cpu", weights_only=True)
        elif f.suffix == ".html":
            assert data.rstrip().endswith(b"</html>"), f"{f} is half a page"


def _keys(path: Path) -> list[str]:
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["key"] for r in recs if r.get("type") == MEASUREMENT]


def _kill_and_resume(tmp_path: Path, first: list[str], resume: list[str], results: str, kills: int,
                     seed: int) -> tuple[Path, Path]:
    """An uninterrupted run in ``ref/``, then ``kills`` killed runs and a completing resume in ``run/``."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    ref.mkdir()
    run.mkdir()
    full = _run(first, ref)
    rng = random.Random(seed)
    for i in range(kills):
        _kill_after(first if i == 0 else resume, run, rng.uniform(0.3, full))
        _assert_no_half_files(run)
    _run(resume, run)
    _assert_no_half_files(run)
    assert not [f.name for f in run.rglob("*.tmp")], "a temp file survived the completing run"
    got, want = _keys(run / results), _keys(ref / results)
    dup = [k for k, n in Counter(got).items() if n > 1]
    assert not dup, f"measured twice: {dup[:3]}"
    assert sorted(got) == sorted(want), f"lost {sorted(set(want) - set(got))[:3]}"
    return ref, run


def test_sweep_killed_and_resumed(tmp_path: Path) -> None:
    args = ["sweep", "--shape", "48x64x16", "--sparsity", "0.5,0.9,0.99", "--repeats", "2",
            "--threads", "1", "--results", "s.jsonl", "--json", "s.json", "--plot", "s.png"]
    _, run = _kill_and_resume(tmp_path, args, [*args, "--resume"], "s.jsonl", 5, seed=1)
    out = json.loads((run / "s.json").read_text())
    assert out  # the JSON written at the end covers the resumed run


_FUZZ_ONLY = pytest.mark.skipif(not FULL, reason="minutes: run by make fuzz (SPARSECNN_FUZZ=1)")


@_FUZZ_ONLY
def test_bench_killed_and_resumed(tmp_path: Path) -> None:
    args = ["bench", "lenet5", "--repeats", "2", "--threads", "1", "--results", "b.jsonl", "--json", "b.json"]
    _kill_and_resume(tmp_path, args, [*args, "--resume"], "b.jsonl", KILLS, seed=2)


@_FUZZ_ONLY
def test_report_killed_and_resumed(tmp_path: Path) -> None:
    kills = KILLS
    args = ["report", "--quick", "--only", "weight_sparsity", "--threads", "1", "--out", "rep"]
    _, run = _kill_and_resume(tmp_path, args, [*args, "--resume"], "rep/results.jsonl", kills, seed=3)
    assert (run / "rep" / "report.html").exists()


def test_train_killed_and_resumed_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    epochs = 3
    args = ["train", "lenet5", "--data", "digits", "--epochs", str(epochs), "--quiet", "--out", "t"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    ref.mkdir()
    run.mkdir()
    full = _run(args, ref)
    rng = random.Random(4)
    for _ in range(KILLS):
        resume = ["--resume"] if (run / "t" / "checkpoint.pt").exists() else []
        _kill_after(args + resume, run, rng.uniform(0.3, full))
        _assert_no_half_files(run)
    _run(args + (["--resume"] if (run / "t" / "checkpoint.pt").exists() else []), run)
    _assert_no_half_files(run)
    history = json.loads((run / "t" / "summary.json").read_text())["result"]["history"]
    assert [h["epoch"] for h in history] == list(range(1, epochs + 1))  # none lost, none twice
    a = torch.load(ref / "t" / "model.pt", weights_only=True)
    b = torch.load(run / "t" / "model.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:  # epochs are reseeded, so a resumed run is the uninterrupted one
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)


@_FUZZ_ONLY
def test_prune_killed_leaves_no_half_file(tmp_path: Path) -> None:
    """``prune`` has no resume (a rerun starts over); a kill must still leave no half output."""
    kills = KILLS
    _run(["train", "lenet5", "--data", "digits", "--epochs", "1", "--quiet", "--out", "t"], tmp_path)
    args = ["prune", "t/model.pt", "--model", "lenet5", "--data", "digits", "--method", "magnitude",
            "--target", "0.5", "--schedule", "oneshot", "--retrain-epochs", "2", "--quiet", "--out", "p"]
    full = _run(args, tmp_path)
    (tmp_path / "p" / "model.pt").unlink()
    (tmp_path / "p" / "summary.json").unlink()
    rng = random.Random(5)
    for _ in range(kills):
        _kill_after(args, tmp_path, rng.uniform(0.3, full))
        _assert_no_half_files(tmp_path)
    _run(args, tmp_path)
    _assert_no_half_files(tmp_path)
    assert json.loads((tmp_path / "p" / "summary.json").read_text())
