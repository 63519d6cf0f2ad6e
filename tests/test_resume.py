"""Interrupted work: ``sweep``, ``bench``, ``report``, ``train`` and ``prune`` killed with SIGKILL at
random points, then resumed: no measurement or epoch lost or duplicated, no half file on disk, and
for ``train`` and ``prune`` the very weights (and ``prune``'s summary) of an uninterrupted run.

Each command is killed five times under ``SPARSECNN_FUZZ=1`` (set by ``make fuzz``), at uniform times
over the whole run. ``make test`` kills each twice (``report`` once: a run is 12-20 s), each time at a
random moment after a random progress event (a measurement appended, a checkpoint written) early in
the remaining work, so that every kill lands in the middle of the work rather than in the imports or
after the end, and still leaves something to resume. ``train`` and ``prune`` run on a tiny folder of
digit images (500 8x8 PNGs, a fraction of a second per epoch, no scikit-learn import), so a run is
mostly startup and the work being killed; ``make test``'s report run reuses the reference run's
trained LeNet-5 cache (``make fuzz`` kills the training too).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from sparsecnn.bench.harness import MEASUREMENT

pytestmark = pytest.mark.slow  # subprocesses that import torch and numba: a few seconds each

FULL = bool(os.environ.get("SPARSECNN_FUZZ"))
KILLS = 5 if FULL else 2
REPORT_KILLS = 5 if FULL else 1  # make test: a report run is 12-20 s of imports, measuring and plotting
CLI = [sys.executable, "-m", "sparsecnn"]
PNG_END = b"IEND\xaeB`\x82"


def _run(args: list[str], cwd: Path, timeout: float = 300) -> None:
    subprocess.run([*CLI, *args], cwd=cwd, check=True, capture_output=True, timeout=timeout)


Progress = Callable[[], object]


def _log_progress(path: Path) -> Progress:
    """Changes with every line appended to an append-only log."""
    return lambda: path.stat().st_size if path.is_file() else None


def _dir_progress(folder: Path) -> Progress:
    """Changes with every file written (atomically replaced) in ``folder``."""
    def snapshot() -> object:
        if not folder.is_dir():
            return None
        seen = []
        for f in folder.iterdir():
            try:
                st = f.stat()
            except FileNotFoundError:  # replaced or removed (a finished stage's file) since listed
                continue
            if not f.name.endswith(".tmp"):
                seen.append((f.name, st.st_ino, st.st_mtime_ns))
        return tuple(sorted(seen))
    return snapshot


@dataclass
class Watched:
    seconds: float  # wall time of the run
    first: float  # seconds until the first progress event (the whole run if none)
    events: int  # progress events seen
    killed: bool


def _watch(args: list[str], cwd: Path, progress: Progress, *, kill_at: float | None = None,
           kill_after: tuple[int, float] | None = None, timeout: float = 300) -> Watched:
    """Run a command, polling ``progress`` every 10 ms; SIGKILL it ``kill_at`` seconds after the start,
    or ``kill_after = (n, extra)``: ``extra`` seconds after its n-th progress event. Without either it
    must succeed. A run that ends before its kill is a legal outcome."""
    t0 = time.perf_counter()
    p = subprocess.Popen([*CLI, *args], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last, events, first, kill_time = progress(), 0, None, kill_at
    while p.poll() is None:
        now = time.perf_counter() - t0
        if kill_time is not None and now >= kill_time:
            p.kill()
            p.wait()
            return Watched(now, first if first is not None else now, events, True)
        state = progress()
        if state != last:
            last, events = state, events + 1
            if first is None:
                first = now
            if kill_after is not None and events == kill_after[0]:
                kill_time = now + kill_after[1]
        if now > timeout:
            p.kill()
            raise AssertionError(f"{args[0]} ran over {timeout} s")
        time.sleep(0.01)
    seconds = time.perf_counter() - t0
    err = p.stderr.read().decode(errors="replace") if p.stderr else ""
    if kill_at is None and kill_after is None:
        assert p.returncode == 0, f"{args[0]} failed: {err[-2000:]}"
    return Watched(seconds, first if first is not None else seconds, events, False)


def _kills(ref: Watched, kills: int, seed: int) -> list[dict]:
    """How to kill each of ``kills`` runs, given an uninterrupted run ``ref``.

    make fuzz: at a uniform time over the whole run. make test: a random moment (up to one mean gap
    between events) after a random progress event within the first share of the work, so that every
    kill lands in the middle of the work (not in the imports, nor after the end) and every killed
    run still gets somewhere.
    """
    rng = random.Random(seed)
    if FULL:
        return [{"kill_at": rng.uniform(0.3, ref.seconds)} for _ in range(kills)]
    gap = (ref.seconds - ref.first) / max(ref.events, 1)
    share = max(1, ref.events // (kills + 1))
    return [{"kill_after": (rng.randint(1, share), rng.uniform(0, gap))} for _ in range(kills)]


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
                     seed: int, seed_run: Callable[[Path, Path], None] | None = None) -> tuple[Path, Path]:
    """An uninterrupted run in ``ref/``, then ``kills`` killed runs and a completing resume in ``run/``
    (``seed_run(ref, run)`` prepares ``run/`` first)."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    ref.mkdir()
    run.mkdir()
    reference = _watch(first, ref, _log_progress(ref / results))
    if seed_run is not None:
        seed_run(ref, run)
    for i, how in enumerate(_kills(reference, kills, seed)):
        _watch(first if i == 0 else resume, run, _log_progress(run / results), **how)
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
    _, run = _kill_and_resume(tmp_path, args, [*args, "--resume"], "s.jsonl", KILLS, seed=1)
    out = json.loads((run / "s.json").read_text())
    assert out  # the JSON written at the end covers the resumed run


def test_bench_killed_and_resumed(tmp_path: Path) -> None:
    args = ["bench", "lenet5", "--repeats", "2", "--threads", "1", "--results", "b.jsonl", "--json", "b.json"]
    _kill_and_resume(tmp_path, args, [*args, "--resume"], "b.jsonl", KILLS, seed=2)


def _reuse_trained_lenet(ref: Path, run: Path) -> None:
    # make test: the reference run trained and cached LeNet-5; without this every killed run would
    # train it again (9 s). make fuzz leaves the cache to the killed runs, so kills hit it too.
    if not FULL:
        (run / "rep").mkdir()
        for f in (ref / "rep").glob("lenet5-digits-pruned.*"):
            shutil.copy2(f, run / "rep" / f.name)


def test_report_killed_and_resumed(tmp_path: Path) -> None:
    args = ["report", "--quick", "--only", "weight_sparsity", "--threads", "1", "--out", "rep"]
    _, run = _kill_and_resume(tmp_path, args, [*args, "--resume"], "rep/results.jsonl", REPORT_KILLS, seed=3,
                              seed_run=_reuse_trained_lenet)
    assert (run / "rep" / "report.html").exists()


@pytest.fixture(scope="module")
def digit_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``train/<digit>/*.png`` (40 a class) and ``test/<digit>/*.png`` (10 a class) from scikit-learn's
    digits: the CLI reads them without importing scikit-learn, and an epoch takes a fraction of a second."""
    from PIL import Image

    from sparsecnn import data

    root = tmp_path_factory.mktemp("digits")
    d = data.digits()
    for split, ds, per_class in (("train", d.train, 40), ("test", d.test, 10)):
        count = Counter()
        for x, y in ds:
            c = int(y)
            if count[c] == per_class:
                continue
            (root / split / str(c)).mkdir(parents=True, exist_ok=True)
            pixels = (x[0].numpy() * 255).round().astype("uint8")
            Image.fromarray(pixels, mode="L").save(root / split / str(c) / f"{count[c]}.png")
            count[c] += 1
    return root


def _state_dicts_equal(a: Path, b: Path) -> None:
    sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert sa.keys() == sb.keys()
    for k in sa:  # every epoch is reseeded, so a resumed run is the uninterrupted one, bit for bit
        assert torch.equal(sa[k], sb[k]), f"{k} differs from the uninterrupted run"


def _kill_resume_loop(args: list[str], ref: Path, run: Path, checkpoint: str, seed: int) -> None:
    """Reference run in ``ref``; ``KILLS`` killed runs then a completing one in ``run``, each with
    ``--resume`` once ``checkpoint`` exists (as a user would)."""
    out = Path(checkpoint).parent
    reference = _watch(args, ref, _dir_progress(ref / out))
    for how in _kills(reference, KILLS, seed):
        resume = ["--resume"] if (run / checkpoint).exists() else []
        _watch(args + resume, run, _dir_progress(run / out), **how)
        _assert_no_half_files(run)
    _run(args + (["--resume"] if (run / checkpoint).exists() else []), run)
    _assert_no_half_files(run)
    assert not [f.name for f in run.rglob("*.tmp")], "a temp file survived the completing run"


def test_train_killed_and_resumed_matches_an_uninterrupted_run(tmp_path: Path, digit_images: Path) -> None:
    epochs = 4
    args = ["train", "lenet5", "--data", str(digit_images), "--channels", "1", "--epochs", str(epochs),
            "--quiet", "--device", "cpu", "--out", "t"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    ref.mkdir()
    run.mkdir()
    _kill_resume_loop(args, ref, run, "t/checkpoint.pt", seed=4)
    history = json.loads((run / "t" / "summary.json").read_text())["result"]["history"]
    assert [h["epoch"] for h in history] == list(range(1, epochs + 1))  # none lost, none twice
    _state_dicts_equal(ref / "t" / "model.pt", run / "t" / "model.pt")


def _without_seconds(summary: dict) -> dict:
    for rec in summary["history"]:
        rec.pop("seconds")  # wall time
    return summary


def test_prune_killed_and_resumed_matches_an_uninterrupted_run(tmp_path: Path, digit_images: Path) -> None:
    from sparsecnn import models

    dense = models.build("lenet5", seed=0, num_classes=10, in_channels=1, input_size=8)
    torch.save(dense.state_dict(), tmp_path / "dense.pt")
    # Four stages (start, probe, cycle1, cycle2), two epochs in each cycle.
    args = ["prune", str(tmp_path / "dense.pt"), "--model", "lenet5", "--data", str(digit_images),
            "--channels", "1", "--method", "magnitude", "--target", "0.6", "--schedule", "iterative",
            "--cycles", "2", "--retrain-epochs", "4", "--quiet", "--device", "cpu", "--out", "p"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    ref.mkdir()
    run.mkdir()
    _kill_resume_loop(args, ref, run, "p/checkpoint.pt", seed=5)
    want = _without_seconds(json.loads((ref / "p" / "summary.json").read_text()))
    got = _without_seconds(json.loads((run / "p" / "summary.json").read_text()))
    assert [h["epoch"] for h in got["history"]] == [1, 2, 1, 2]  # each cycle's epochs once, in order
    assert got == want  # accuracies, per-layer sparsity, mask digests, history
    _state_dicts_equal(ref / "p" / "model.pt", run / "p" / "model.pt")
    assert sorted(f.name for f in (run / "p").iterdir()) == ["checkpoint.pt", "model.pt", "summary.json"]
