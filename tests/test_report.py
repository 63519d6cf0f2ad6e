"""`sparsecnn report` end to end in a subprocess, the report's sections and plots, kill and resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sparsecnn.bench.harness import read_records, validate_record
from sparsecnn.kernels._simd import HAS_TABLE32
from sparsecnn.report.html import SECTIONS

# "tiny" is the test-only size: AlexNet at a 67x67 input (same layers and weights), one profile, three
# sweep points, the smallest scaling matrix; every experiment and the whole CLI path still run.
CMD = [sys.executable, "-m", "sparsecnn", "report", "--size", "tiny", "--threads", "2"]


def _run(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(CMD + args, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report")
    proc = _run(["--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = proc.stdout.strip().splitlines()[-1]
    assert Path(printed) == (out / "report.html").resolve()  # the path of report.html is printed
    return out


def _measurements(path: Path) -> list[dict]:
    return [r for r in read_records(path) if r["type"] == "measurement"]


def test_report_writes_results_for_all_eight_experiments(report_dir: Path) -> None:
    records = read_records(report_dir / "results.jsonl")
    for r in records:
        validate_record(r)
    meas = [r for r in records if r["type"] == "measurement"]
    keys = [r["key"] for r in meas]
    assert len(keys) == len(set(keys))
    assert {r["experiment"] for r in meas} == {name for _, name, _, _ in SECTIONS}
    env_ids = {r["env_id"] for r in records if r["type"] == "env"}
    assert {r["env_id"] for r in meas} <= env_ids
    ok = [r for r in meas if r["status"] == "ok"]
    assert len(ok) >= 0.9 * len(meas), [r["error"] for r in meas if r["status"] == "error"][:5]
    # timed records carry median and IQR; strategies were verified against dense first
    timed = [r for r in ok if r["timing"]]
    assert timed and all(r["timing"]["median_s"] > 0 and r["timing"]["iqr_s"] >= 0 for r in timed)
    assert all(r["metrics"]["max_rel_err"] <= 1e-3 for r in timed if "max_rel_err" in r["metrics"])
    # every implementation that a table compares with torch dense was timed in alternation with it
    compared = [r for r in timed if r["params"].get("impl") != "torch-dense" and r["experiment"] in
                ("conv_layers", "fc_layers", "sparsity_sweep", "sparse_x_sparse", "end_to_end",
                 "compression")]
    assert compared and all(
        r["metrics"]["paired_speedup"] == pytest.approx(r["metrics"]["baseline_s"] / r["timing"]["median_s"])
        for r in compared)


def test_report_html_has_every_section_and_embeds_its_plots(report_dir: Path) -> None:
    page = (report_dir / "report.html").read_text(encoding="utf-8")
    for anchor, _, heading, _ in SECTIONS:
        assert f'id="{anchor}"' in page
        assert heading.split(". ", 1)[1].split(":")[0] in page
    for anchor in ("conclusions", "environment"):
        assert f'id="{anchor}"' in page
    assert page.count("data:image/png;base64,") >= 8
    assert 'src="http' not in page and "<link" not in page  # self-contained
    for claim in (
        "No speedup on AlexNet conv layers",
        "About 3× on FC layers",
        "CSR memory saving",
        "97%",
        "Sparse × sparse",
        "ReLU activation sparsity",
    ):
        assert claim in page
    assert "left out the size(s) 2560×4800, 25600×24000" in page  # what this size skipped is said
    assert "AMD" in page or "Intel" in page or "CPU" in page


def test_compression_section_numbers_are_consistent(report_dir: Path) -> None:
    from sparsecnn.compress.storage import PAPER

    meas = [r for r in _measurements(report_dir / "results.jsonl") if r["status"] == "ok"]
    storage = {r["params"]["model"]: r["metrics"] for r in meas
               if r["experiment"] == "compression" and r["params"]["impl"] == "storage"}
    assert set(storage) == {"alexnet", "lenet5"}
    numel = {
        (r["params"]["model"], x["layer"]): x["numel"]
        for r in meas
        if r["experiment"] == "weight_sparsity"
        and r["params"]["profile"] in ("deep-compression", "digits-pruned")
        for x in r["metrics"]["layers"]
    }
    page = (report_dir / "report.html").read_text(encoding="utf-8")
    for model, m in storage.items():
        rows = {x["layer"]: x for x in m["rows"]}
        total = rows.pop("total")
        assert list(rows) == list(PAPER[model])[:-1]  # every conv/fc layer, in order, beside the paper
        for name, x in rows.items():
            assert x["dense_bytes"] == 4 * numel[model, name]  # the same model as experiment 1
            assert x["ratio"] == pytest.approx(x["dense_bytes"] / x["huffman_bytes"])
            assert x["paper_ratio"] == pytest.approx(1 / PAPER[model][name]["rate_h"])
            assert x["quantized_bytes"] < x["relative_bytes"] < x["dense_bytes"] or name == "conv1"
        for field in ("dense_bytes", "csr_bytes", "relative_bytes", "quantized_bytes", "huffman_bytes"):
            assert total[field] == pytest.approx(sum(x[field] for x in rows.values()))
        assert total["ratio"] == pytest.approx(total["dense_bytes"] / total["huffman_bytes"])
        assert m["ratio"] == pytest.approx(total["ratio"]) and total["ratio"] > 10
        assert total["paper_ratio"] == pytest.approx({"alexnet": 34.7, "lenet5": 39.2}[model], abs=0.1)
        assert f"{model} / " in page and f"total {total['ratio']:.2f}×" in page
    acc = storage["lenet5"]["accuracy"]
    assert 0.5 < acc["quantized"] <= 1 and abs(acc["quantized"] - acc["pruned"]) < 0.05
    # the codebook-index SpMV vs the float CSR spmv on the same quantized fc6/fc7
    timed = {(r["params"]["layer"], r["params"]["impl"]): r for r in meas
             if r["experiment"] == "compression" and r["params"]["impl"] != "storage"}
    assert set(timed) == {(layer, impl) for layer in ("fc6", "fc7") for impl in ("qspmv", "spmv")}
    for layer in ("fc6", "fc7"):
        q, f = timed[layer, "qspmv"], timed[layer, "spmv"]
        assert q["timing"]["median_s"] > 0 and q["metrics"]["max_rel_err"] <= 1e-4
        # 3 bytes a nonzero, not 6; with AVX-512 also the sliced-ELL form batch 1 ran (~4.2 bytes)
        ratio = q["metrics"]["weight_nbytes"] / f["metrics"]["weight_nbytes"]
        assert (1.0 < ratio < 1.4 if HAS_TABLE32 else ratio < 0.6), ratio
        csr = {x["layer"]: x["csr_bytes"] for x in storage["alexnet"]["rows"]}
        assert f["metrics"]["weight_nbytes"] == csr[layer]
    assert "codebook-index SpMV vs float CSR" in page


def test_fc_layers_are_timed_at_batch_one_and_above(report_dir: Path) -> None:
    """Experiment 3 times every linear strategy at each of ``fc_batches`` (tiny: 1 and 4), the weight bytes
    once, a table per batch; the seed's FC claim reads batch 1 alone."""
    from sparsecnn.bench.experiments import ReportConfig
    from sparsecnn.layers import strategies

    batches = ReportConfig.preset("tiny").fc_batches
    assert batches[0] == 1 and len(batches) > 1
    fc = [r for r in _measurements(report_dir / "results.jsonl")
          if r["experiment"] == "fc_layers" and r["params"]["model"] == "alexnet"]
    layers = {r["params"]["layer"] for r in fc}
    assert layers == {"fc6", "fc7", "fc8"}
    assert sum(r["params"]["impl"] == "bytes" for r in fc) == len(layers)  # bytes do not depend on the batch
    for b in batches:
        timed = {(r["params"]["layer"], r["params"]["impl"]) for r in fc
                 if r["params"].get("batch") == b and r["status"] == "ok"}
        for s in (*[s for s in strategies("linear") if s != "torch"], "torch-dense", "auto"):
            assert {(layer, s) for layer in layers} <= timed, (b, s)
        assert all(r["metrics"]["max_rel_err"] <= 1e-4 for r in fc
                   if r["params"].get("batch") == b and r["status"] == "ok" and "max_rel_err" in r["metrics"])
    page = (report_dir / "report.html").read_text(encoding="utf-8")
    for b in batches:
        assert f"alexnet / deep-compression: time per layer, batch {b}" in page
    # the seed's "about 3x on FC layers" lists the batch-1 spmv speedups, not a larger batch's
    from sparsecnn.report.html import conclusions
    from sparsecnn.report.tables import load_results

    claim = next(c for c in conclusions(load_results(report_dir / "results.jsonl"))
                 if c.claim.startswith("About 3× on FC layers"))
    shown = {(r["params"]["batch"], r["params"]["layer"]): f"{r['params']['layer']} "
             f"{r['metrics']['paired_speedup']:.2f}×" for r in fc
             if r["params"]["impl"] == "spmv" and r["params"]["profile"] == "deep-compression"
             and r["status"] == "ok"}
    for (b, layer), text in shown.items():
        if b == 1:
            assert text in claim.measured, (text, claim.measured)
        elif text != shown.get((1, layer)):
            assert text not in claim.measured, (text, claim.measured)


def test_plots_exist_and_are_non_empty_pngs(report_dir: Path) -> None:
    names = [
        "weight_sparsity",
        "conv_bytes",
        "conv_times",
        "fc_bytes",
        "fc_times",
        "sweep",
        "memory_scaling",
        "sparse_x_sparse",
        "end_to_end",
    ]
    for name in names:
        data = (report_dir / f"{name}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name


def test_render_only_rebuilds_the_page_from_results(report_dir: Path, tmp_path: Path) -> None:
    from sparsecnn.cli import main

    for name in ("results.jsonl", "config.json"):
        (tmp_path / name).write_bytes((report_dir / name).read_bytes())
    assert main(["report", "--out", str(tmp_path), "--render-only"]) == 0
    assert (tmp_path / "report.html").stat().st_size > 100_000
    assert (tmp_path / "sweep.png").stat().st_size > 10_000


def test_killed_report_resumes_with_every_measurement_exactly_once(tmp_path: Path) -> None:
    only = ["--only", "sparsity_sweep", "--out", str(tmp_path)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(CMD + only, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    results = tmp_path / "results.jsonl"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            if results.exists() and len(_measurements(results)) >= 6:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the report wrote no measurements within 2 minutes")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    before = _measurements(results)
    assert proc.returncode == -signal.SIGKILL and len(before) >= 6

    done = _run([*only, "--resume"])
    assert done.returncode == 0, done.stderr[-2000:]
    after = _measurements(results)
    keys = [r["key"] for r in after]
    assert len(keys) == len(set(keys))  # exactly once
    assert after[: len(before)] == before  # nothing measured before the kill was lost or redone
    assert "already in results.jsonl" in done.stdout
    skipped = int(done.stdout.split(" measured, ")[1].split(" ")[0])
    assert skipped == len(before)

    # and nothing missing: the keys are those the run plans
    from sparsecnn.bench.experiments import ReportConfig, _Context, report_tasks

    planned = report_tasks(_Context(ReportConfig.preset("tiny"), None), ["sparsity_sweep"])
    assert set(keys) == {t.key for t in planned}


def test_report_refuses_an_unknown_experiment(tmp_path: Path) -> None:
    proc = _run(["--only", "nope", "--out", str(tmp_path)], timeout=60)
    assert proc.returncode == 2 and "unknown experiment" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_structure_spconv_and_act_fc_rows_follow_from_the_numbers(report_dir: Path) -> None:
    """Section 4's structured-vs-unstructured table, section 6's spconv-act and spmv-act tables and
    their claims: the rows exist, the best and the ratios follow from the speedups over torch dense
    recorded beside each time, verdicts follow the numbers."""
    from sparsecnn.report.html import conclusions
    from sparsecnn.report.tables import (
        STRUCTURE_STRATEGIES,
        WEIGHT_ONLY,
        act_fc_rows,
        load_results,
        spconv_rows,
        structure_rows,
    )

    res = load_results(report_dir / "results.jsonl")
    swept = {(r["params"].get("profile"), r["params"]["layer"], r["params"]["impl"]): r["metrics"]
             for r in res.of("sparsity_sweep") if "profile" in r["params"]}

    def best_of(profile: str, layer: str, impls: tuple[str, ...]) -> tuple[str, float]:
        x = {i: swept[(profile, layer, i)]["paired_speedup"] for i in impls if (profile, layer, i) in swept}
        best = max(x, key=x.__getitem__)
        return best, x[best]

    srows = structure_rows(res.of("sparsity_sweep"))
    assert [r.layer for r in srows] == ["conv1", "conv3"]  # the tiny size's conv layers
    for r in srows:
        assert r.zeros_structured == pytest.approx(r.zeros_unstructured, abs=0.02)  # the same zero count
        st, un = r.structure, r.unstructured
        assert st["compact_flops"] < st["dense_flops"] and st["ideal"] > 1  # structure removes work
        assert un["compact_flops"] >= 0.95 * un["dense_flops"]  # scattered zeros leave a dense GEMM
        # the best is the largest speedup over torch dense timed beside it (not the smallest time)
        assert (r.best_structured, r.speedup_structured) == best_of("ssl", r.layer, STRUCTURE_STRATEGIES)
        assert (r.best_unstructured, r.speedup_unstructured) == best_of("ssl-unstructured", r.layer,
                                                                         STRUCTURE_STRATEGIES)
        assert r.structured_over_unstructured == pytest.approx(r.speedup_structured / r.speedup_unstructured)
        won = r.speedup_structured >= 1.05 and r.structured_over_unstructured >= 1.05
        assert r.verdict().startswith("structure wins") == won
        assert f"{st['ideal']:.2f}×" in r.verdict()
    conv3 = srows[1].structure
    assert conv3["filters"][0] < conv3["filters"][1] and conv3["cols"][0] < conv3["cols"][1]

    sx = res.of("sparse_x_sparse")
    conv_x = {(r["params"]["layer"], r["params"]["impl"]): r["metrics"] for r in sx
              if r["params"]["model"] == "alexnet" and "paired_speedup" in r["metrics"]}
    crows = [r for r in spconv_rows(q for q in sx if q["params"]["model"] == "alexnet")]
    assert [r.layer for r in crows] == ["conv3"]
    for r in crows:
        assert r.best in WEIGHT_ONLY
        assert r.best_x == max(conv_x[(r.layer, i)]["paired_speedup"] for i in WEIGHT_ONLY
                               if (r.layer, i) in conv_x)
        assert r.vs_torch == conv_x[(r.layer, "spconv-act")]["paired_speedup"]
        assert r.vs_best == pytest.approx(r.vs_torch / r.best_x)
        assert r.work == pytest.approx((1 - r.weight_zeros) * (1 - r.input_zeros))
        assert r.verdict().startswith("wins") == (r.vs_torch >= 1.05 and r.vs_best >= 1.05)
        assert r.verdict().startswith("cannot") == (r.vs_torch < 1.05)
    frows = act_fc_rows(sx)
    assert [r.layer for r in frows] == ["fc6", "fc7", "fc8"]
    for r in frows:
        assert 0 <= r.input_zeros < 1 and r.weight_zeros == pytest.approx(0.91 if r.layer != "fc8" else 0.75,
                                                                            abs=0.01)
        assert r.act_over_spmv == pytest.approx(r.act_x / r.spmv_x)
        assert r.ideal == pytest.approx(1 / (1 - r.input_zeros))
        assert r.verdict().startswith("wins") == (r.act_over_spmv >= 1.05)

    claims = {c.claim: c for c in conclusions(res)}
    ssl = next(c for k, c in claims.items() if k.startswith("SSL: structured"))
    fc = next(c for k, c in claims.items() if k.startswith("Sparse × sparse on FC"))
    assert ssl.verdict in ("held", "did not hold") and fc.verdict in ("held", "did not hold")
    assert f"{srows[1].speedup_structured:.2f}×" in ssl.measured
    from sparsecnn.report.tables import geomean

    g = geomean(r.act_over_spmv for r in frows if r.layer in ("fc6", "fc7"))
    assert (fc.verdict == "held") == (g >= 1.1) and f"{g:.2f}×" in fc.measured
    page = (report_dir / "report.html").read_text(encoding="utf-8")
    for title in ("structured (ssl, shrunk) vs unstructured", "spconv-act (skips zero inputs",
                  "activation-sparse spmv-act vs weight-only spmv"):
        assert title in page
