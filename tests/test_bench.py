"""The measurement harness: timing, verification, the results.jsonl schema, resume, break-even."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from sparsecnn.bench.harness import (
    SCHEMA_VERSION,
    Harness,
    Outcome,
    ResultsLog,
    Task,
    VerificationError,
    check_close,
    measurement_key,
    read_records,
    time_call,
    time_cold,
    time_paired,
    validate_record,
)
from sparsecnn.errors import SparseCNNError
from sparsecnn.report.tables import break_even


def _tasks(calls: list[str], fail_at: str | None = None) -> list[Task]:
    def make(i: int) -> Task:
        def run() -> Outcome:
            calls.append(f"t{i}")
            if f"t{i}" == fail_at:
                raise KeyboardInterrupt  # an injected kill between two measurements
            x = torch.randn(8, 8)
            return Outcome({"value": i}, time_call(lambda: x @ x, repeats=3, max_total_s=0.05))

        return Task("unit", {"i": i, "s": 0.5 + i / 10}, run, f"task {i}")

    return [make(i) for i in range(5)]


def test_time_cold_calls_each_in_turn_after_an_untimed_call() -> None:
    calls: list[int] = []
    fns = [lambda: calls.append(0), lambda: (calls.append(1), sum(range(20000)))]
    t = time_cold(fns, repeats=3, evict_bytes=1 << 20)
    assert calls == [0, 1] + [0, 1] * 3
    assert len(t) == 2 and all(v > 0 for v in t) and t[1] > t[0]
    with pytest.raises(SparseCNNError, match="repeats"):
        time_cold(fns, repeats=0)


def test_time_call_reports_median_and_quartiles() -> None:
    t = time_call(lambda: sum(range(1000)), repeats=9)
    assert t.repeats == 9 and t.warmup == 1 and t.inner >= 1
    assert 0 < t.min_s <= t.q1_s <= t.median_s <= t.q3_s <= t.max_s
    assert t.iqr_s == pytest.approx(t.q3_s - t.q1_s)


def test_time_call_stops_at_the_time_budget() -> None:
    import time

    t = time_call(lambda: time.sleep(0.01), repeats=100, max_total_s=0.05)
    assert 3 <= t.repeats < 100


def test_time_paired_alternates_the_two_calls() -> None:
    """After each one's warm-up and calibration call, the samples alternate: fn, other, fn, other...,
    so a slow spell of the machine lands on both; each gets its own Timing."""
    import time

    calls: list[str] = []

    def fn() -> None:
        calls.append("a")
        time.sleep(0.003)

    def other() -> None:
        calls.append("b")
        time.sleep(0.006)

    a, b = time_paired(fn, other, repeats=5, warmup=1)
    assert calls[:4] == ["a", "a", "b", "b"]  # warm-up and calibration, one after the other
    assert calls[4:] == ["a", "b"] * 5 and a.repeats == b.repeats == 5 and a.inner == b.inner == 1
    assert a.median_s < b.median_s
    stopped = time_paired(fn, other, repeats=100, max_total_s=0.05)
    assert 3 <= stopped[0].repeats == stopped[1].repeats < 100
    with pytest.raises(SparseCNNError, match="repeats"):
        time_paired(fn, other, repeats=0)


def test_check_close_accepts_reassociation_and_rejects_wrong_output() -> None:
    ref = np.random.default_rng(0).standard_normal((16, 16)).astype(np.float32)
    assert check_close(ref * (1 + 1e-6), ref) < 1e-4
    with pytest.raises(VerificationError, match="exceeds"):
        check_close(ref + 0.01 * np.abs(ref).max(), ref)
    with pytest.raises(VerificationError, match="shape"):
        check_close(ref[:8], ref)
    with pytest.raises(VerificationError, match="NaN"):
        check_close(np.full_like(ref, np.nan), ref)


def test_a_mismatch_is_recorded_as_an_error_and_not_timed(tmp_path) -> None:
    from sparsecnn.bench.experiments import ReportConfig, _timed

    cfg = ReportConfig.preset("tiny")
    timed: list[int] = []

    def wrong() -> torch.Tensor:
        timed.append(1)
        return torch.ones(4)

    task = Task("unit", {"case": "wrong"}, lambda: _timed(wrong, torch.zeros(4) + 2.0, cfg))
    harness = Harness(ResultsLog(tmp_path / "r.jsonl"), threads=1, progress=False)
    rec = harness.run([task])[0]
    assert rec["status"] == "error" and "VerificationError" in rec["error"]
    assert rec["timing"] is None and timed == [1]  # called once to verify, never timed


def test_results_jsonl_schema(tmp_path) -> None:
    path = tmp_path / "results.jsonl"
    harness = Harness(ResultsLog(path), threads=2, progress=False)
    harness.run(_tasks([]))
    records = read_records(path)
    for r in records:
        validate_record(r)
        assert r["schema"] == SCHEMA_VERSION
    env = [r for r in records if r["type"] == "env"]
    meas = [r for r in records if r["type"] == "measurement"]
    assert len(env) == 1 and len(meas) == 5
    e = env[0]["env"]
    for field in ("cpu_model", "cpu_flags", "cores", "torch_threads", "numba_threads", "versions", "blas"):
        assert e[field] not in (None, "", [])
    assert {"torch", "numba", "numpy"} <= set(e["versions"])
    assert e["torch_threads"] == 2
    for r in meas:
        assert r["env_id"] == env[0]["env_id"] and r["threads"] == 2 and r["status"] == "ok"
        assert r["key"] == measurement_key("unit", r["params"])
        assert r["timing"]["repeats"] >= 1 and r["timing"]["median_s"] > 0
    # every line is one complete JSON object
    lines = path.read_text().splitlines()
    assert len(lines) == 6 and all(json.loads(line) for line in lines)


def test_validate_record_names_the_broken_field() -> None:
    good = {
        "schema": SCHEMA_VERSION,
        "type": "measurement",
        "key": measurement_key("e", {"a": 1}),
        "experiment": "e",
        "params": {"a": 1},
        "env_id": "x",
        "time": "t",
        "status": "ok",
        "error": None,
        "metrics": {},
        "timing": None,
        "threads": 1,
        "device": "cpu",
    }
    validate_record(good)
    for field, value, msg in (
        ("status", "meh", "status"),
        ("key", "e|{}", "key"),
        ("threads", "2", "threads"),
        ("error", "boom", "error message"),
    ):
        with pytest.raises(SparseCNNError, match=msg):
            validate_record({**good, field: value})
    with pytest.raises(SparseCNNError, match="lacks field 'metrics'"):
        validate_record({k: v for k, v in good.items() if k != "metrics"})


def test_interrupted_run_resumes_with_every_measurement_exactly_once(tmp_path) -> None:
    path = tmp_path / "results.jsonl"
    calls: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        Harness(ResultsLog(path), threads=1, progress=False).run(_tasks(calls, fail_at="t3"))
    assert calls == ["t0", "t1", "t2", "t3"]
    before = [r for r in read_records(path) if r["type"] == "measurement"]
    assert [r["params"]["i"] for r in before] == [0, 1, 2]

    calls.clear()
    Harness(ResultsLog(path, resume=True), threads=1, progress=False).run(_tasks(calls))
    assert calls == ["t3", "t4"]  # nothing measured twice
    after = [r for r in read_records(path) if r["type"] == "measurement"]
    keys = [r["key"] for r in after]
    assert len(keys) == len(set(keys)) == 5
    assert after[:3] == before  # the first run's records are kept as they were
    assert sum(r["type"] == "env" for r in read_records(path)) == 1  # same environment, one header


def test_resume_drops_a_record_cut_off_mid_write(tmp_path) -> None:
    path = tmp_path / "results.jsonl"
    Harness(ResultsLog(path), threads=1, progress=False).run(_tasks([])[:2])
    with open(path, "a") as fh:
        fh.write('{"schema": 1, "type": "measurem')  # killed while writing
    calls: list[str] = []
    Harness(ResultsLog(path, resume=True), threads=1, progress=False).run(_tasks(calls))
    assert calls == ["t2", "t3", "t4"]
    assert all(r["type"] in ("env", "measurement") for r in read_records(path))
    assert len(path.read_text().splitlines()) == 6


def test_without_resume_the_file_starts_over(tmp_path) -> None:
    path = tmp_path / "results.jsonl"
    Harness(ResultsLog(path), threads=1, progress=False).run(_tasks([]))
    calls: list[str] = []
    Harness(ResultsLog(path), threads=1, progress=False).run(_tasks(calls))
    assert len(calls) == 5 and len(read_records(path)) == 6


def test_duplicate_task_keys_are_refused(tmp_path) -> None:
    t = _tasks([])[0]
    with pytest.raises(SparseCNNError, match="share the key"):
        Harness(ResultsLog(tmp_path / "r.jsonl"), threads=1, progress=False).run([t, t])


@pytest.mark.parametrize(
    ("curve", "status", "expect"),
    [
        (lambda s: 0.1 / (1 - s), "crosses", 0.9),  # the FLOP limit at 10% efficiency: break-even 90%
        (lambda s: 0.2 / (1 - s), "crosses", 0.8),  # reaches 1.0 exactly at a measured point
        (lambda s: 2.0 + s, "always", 0.5),
        (lambda s: 0.3 + 0.2 * s, "never", None),
    ],
)
def test_break_even_on_synthetic_curves(curve, status, expect) -> None:
    s = [0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99]
    be = break_even(s, [curve(x) for x in s])
    assert be.status == status
    if expect is None:
        assert be.sparsity is None
    else:
        assert be.sparsity == pytest.approx(expect, abs=1e-9)


def test_break_even_interpolates_in_log_speedup_and_ignores_noise_below() -> None:
    s = [0.5, 0.7, 0.8, 0.9]
    r = [1.2, 0.9, 0.5, 2.0]  # faster at 50% by noise, then slower: the break-even is above 80%
    be = break_even(s, r)
    t = -math.log(0.5) / (math.log(2.0) - math.log(0.5))
    assert be.status == "crosses" and be.sparsity == pytest.approx(0.8 + t * 0.1)
    assert break_even(list(reversed(s)), list(reversed(r))) == be  # order does not matter
    assert break_even([], []).status == "unknown"
    assert break_even([0.5, 0.9], [None, float("nan")]).status == "unknown"
    assert "never" in break_even([0.5], [0.5]).describe()


def _layer_record(impl: str, median_s: float, paired: float | None = None) -> dict:
    metrics = {"paired_speedup": paired} if paired else {}
    return {"params": {"model": "m", "profile": "p", "layer": "conv1", "impl": impl}, "status": "ok",
            "metrics": metrics, "timing": {"median_s": median_s, "iqr_s": 0.0}}


def test_tables_take_the_speedup_timed_beside_torch_dense() -> None:
    """A spell between torch dense's own measurement (10 ms) and a strategy's (5 ms) would say 2x;
    the ratio timed in alternation (3x, 4x) is what the tables show and what picks the best."""
    from sparsecnn.report.tables import _best, _index, layer_time_table, speedup

    recs = [_layer_record("torch-dense", 10e-3), _layer_record("direct", 5e-3, 3.0),
            _layer_record("csrmm", 4e-3, 2.5), _layer_record("lowered", 8e-3)]
    assert speedup(recs[1], 10e-3) == 3.0
    assert speedup(recs[3], 10e-3) == pytest.approx(1.25)  # an older file: no pair, the two medians
    assert speedup(recs[3], None) is None and speedup({**recs[1], "status": "error"}, 10e-3) is None
    row = layer_time_table(recs, "m", "p", "t").rows[0]
    assert "(3.00×)" in row[2] and "(2.50×)" in row[3] and "(1.25×)" in row[4]
    # csrmm's own time is the smallest, but direct ran faster against torch dense in its own pairs
    assert _best(_index(recs, "layer", "impl"), ("conv1",), ("direct", "csrmm")) == ("direct", 5e-3, 3.0)


def test_peers_match_the_dense_layer() -> None:
    from sparsecnn.bench.peers import conv_peers, linear_peers, matrix_peers

    g = torch.Generator().manual_seed(0)
    for groups in (1, 2):
        conv = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=groups)
        with torch.no_grad():
            conv.weight[torch.rand(conv.weight.shape, generator=g) < 0.7] = 0
        x = torch.randn(2, 4, 9, 9, generator=g)
        ref = conv(x)
        peers = conv_peers(conv, x, threads=1)
        assert {"torch-dense", "torch-csr", "scipy-csr"} <= set(peers)
        for fn in peers.values():
            check_close(fn(), ref)
    lin = torch.nn.Linear(20, 7)
    x = torch.randn(3, 20, generator=g)
    for fn in linear_peers(lin, x, threads=1).values():
        check_close(fn(), lin(x))
    a = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    b = np.random.default_rng(1).standard_normal((8, 3)).astype(np.float32)
    for fn in matrix_peers(a, b, threads=1).values():
        check_close(fn(), a @ b)


def test_memory_probe_child_reports_its_peak_rss() -> None:
    from sparsecnn.bench.experiments import _run_memprobe

    spec = {"m": 2048, "k": 2400, "n": 16, "sparsity": 0.0, "impl": "dense", "threads": 1, "repeats": 2}
    out = _run_memprobe(spec)
    m = out.metrics
    size = 2048 * 2400 * 4
    assert m["operand_bytes"] == size
    assert m["peak_rss_bytes"] >= m["baseline_rss_bytes"] > 0
    # the 20 MB matrix shows above the child's RSS before it was generated
    assert m["matrix_rss_bytes"] >= size
    assert out.timing is not None and out.timing.median_s > 0
    with pytest.raises(SparseCNNError, match="unknown impl"):
        _run_memprobe({**spec, "impl": "nope"})


def test_sweep_cli_parses_sparsities_and_shapes() -> None:
    from sparsecnn.cli.sweep import parse_shape, parse_sparsities

    assert parse_sparsities("0.5:0.9:5") == [0.5, 0.6, 0.7, 0.8, 0.9]
    assert parse_sparsities("0.5,0.99") == [0.5, 0.99]
    assert parse_shape("384x2304x169") == (384, 2304, 169)
    for bad in ("0.5:1.5:3", "a,b", "0.5:0.9:0", ""):
        with pytest.raises(SparseCNNError):
            parse_sparsities(bad)
    with pytest.raises(SparseCNNError):
        parse_shape("3x4")


def test_memory_probe_is_not_inflated_by_a_large_parent() -> None:
    # ru_maxrss survives exec, so a child of a big process would report the parent's peak.
    from sparsecnn.bench.experiments import _run_memprobe

    ballast = np.ones(1_000_000_000 // 8)  # 1 GB resident in this (parent) process
    spec = {"m": 256, "k": 1200, "n": 64, "sparsity": 0.9, "impl": "dense", "device": "cpu",
            "seed": 0, "repeats": 1}
    metrics = _run_memprobe(spec).metrics
    assert metrics["peak_rss_bytes"] < 0.9 * ballast.nbytes
    assert 0 < metrics["matrix_rss_bytes"] < 100e6


def test_probe_cores_measures_two_threads_or_says_one() -> None:
    import numba

    from sparsecnn.bench.placement import probe_cores, span_label

    saved = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = probe_cores(repeats=3)
        assert one.label == "one thread" and "one thread" in one.summary()
        if numba.config.NUMBA_NUM_THREADS < 2:
            pytest.skip("numba has one thread here")
        numba.set_num_threads(2)
        p = probe_cores(repeats=5)
        assert numba.get_num_threads() == 2
        assert p.label in ("near", "far") and p.summary().startswith(p.label)
        assert span_label(p, p) == p.label and span_label(one, p) == f"one thread->{p.label}"
        times = (p.local_read_us, p.remote_read_us, p.own_rewrite_us, p.shared_rewrite_us)
        assert all(np.isfinite(t) and 0 < t < 1e6 for t in times)
    finally:
        numba.set_num_threads(saved)


def test_end_to_end_verdicts_follow_the_rows() -> None:
    """The end-to-end benchmark's target lines: each named target judged on its own row, and every row
    on the 3% floor against torch and ONNX Runtime (absent ONNX Runtime: torch alone)."""
    from benchmarks.end_to_end import verdicts

    def row(case, batch, ms, vs_torch, vs_ort):
        return {"case": case, "batch": batch, "compiled_ms": ms, "compiled_vs_torch": vs_torch,
                "compiled_vs_ort": vs_ort}

    rows = [row("alexnet-dc", 1, 6.5, 3.3, 2.6), row("alexnet-dc", 32, 130.0, 1.9, 2.3),
            row("lenet5", 1, 0.03, 9.0, 0.96), row("resnet18-50", 1, 13.0, 1.7, None)]
    got = {(r, what): ok for r, what, ok in verdicts(rows)}
    assert got[("alexnet-dc b1", "compiled <= 6.8 ms")] is True
    assert got[("alexnet-dc b32", "compiled >= 2x torch dense")] is False
    assert got[("lenet5 b1", "compiled faster than ONNX Runtime")] is False
    floor = "not below torch / ONNX Runtime by > 3%"
    assert got[("lenet5 b1", floor)] is False  # 0.96x ONNX Runtime
    assert got[("alexnet-dc b32", floor)] is True and got[("resnet18-50 b1", floor)] is True
    assert not any(r.startswith("alexnet-90") for r, _ in got)  # not run: not judged
