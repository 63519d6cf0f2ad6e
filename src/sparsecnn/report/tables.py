"""Tables and derived numbers from a results file: speedups, break-even points, the seed's claims.

Everything here reads measurement records (the ``results.jsonl`` schema of
:mod:`sparsecnn.bench.harness`, documented in ``docs/report.md``) and computes; nothing runs a model.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparsecnn.errors import SparseCNNError

__all__ = [
    "SEED",
    "BreakEven",
    "Results",
    "Table",
    "act_fc_table",
    "break_even",
    "experiment_tables",
    "load_results",
    "spconv_table",
    "speedup",
    "structure_table",
    "sweep_curves",
]

# The seed study's numbers (Caffe with MKL / cuSPARSE on AlexNet), restated as measured here.
SEED: dict[str, Any] = {
    "conv_csrmm_speedup": 1.0,  # "no speedup on AlexNet conv layers from CSRMM"
    "fc_speedup": 3.0,  # "about 3x on FC layers"
    "csr_saving_ssl": {"conv1": 1.11, "conv2": 2.48, "conv3": 2.72, "conv4": 2.53, "conv5": 2.55},
    "cpu_break_even": 0.97,  # "CSRMM beats GEMM only above ~97% random sparsity on CPU (never on GPU)"
    "spxsp_speedup": 4.0,
    "spxsp_memory": 4.2,
    "relu_sparsity": {"conv2": 0.2357, "conv3": 0.565, "conv4": 0.647, "conv5": 0.685},
}

PEERS = ("torch-dense", "torch-csr", "scipy-csr", "onnxruntime")
BASELINE = "torch-dense"


@dataclass(frozen=True)
class Table:
    """A titled table of already formatted cells."""

    title: str
    columns: list[str]
    rows: list[list[str]]
    note: str = ""


@dataclass
class Results:
    """The records of one results file, grouped."""

    env: dict[str, dict[str, Any]]  # env_id -> environment
    measurements: list[dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)

    def of(self, experiment: str, status: str | None = "ok") -> list[dict[str, Any]]:
        return [
            r
            for r in self.measurements
            if r["experiment"] == experiment and (status is None or r["status"] == status)
        ]

    def errors(self) -> list[dict[str, Any]]:
        return [r for r in self.measurements if r["status"] == "error"]

    @property
    def environment(self) -> dict[str, Any]:
        """The environment of the latest measurement (or the latest header)."""
        if self.measurements:
            return self.env.get(self.measurements[-1]["env_id"], {})
        return next(reversed(self.env.values()), {}) if self.env else {}


def load_results(path: str | Path) -> Results:
    """Read and validate ``results.jsonl`` (and ``config.json`` beside it, when present)."""
    from sparsecnn.bench.harness import read_records, validate_record

    p = Path(path)
    records = read_records(p)
    env: dict[str, dict[str, Any]] = {}
    meas = []
    for i, r in enumerate(records):
        try:
            validate_record(r)
        except SparseCNNError as exc:
            raise SparseCNNError(f"{p}: record {i + 1}: {exc}") from None
        if r["type"] == "env":
            env[r["env_id"]] = r["env"]
        else:
            meas.append(r)
    cfg_path = p.parent / "config.json"
    config = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.exists() else {}
    return Results(env, meas, config)


# --------------------------------------------------------------------------------------------------
# break-even


@dataclass(frozen=True)
class BreakEven:
    """Where a strategy starts beating dense along a sparsity sweep.

    ``status``: ``"crosses"`` (faster from ``sparsity`` on, interpolated), ``"always"`` (faster at every
    measured sparsity; ``sparsity`` is the lowest measured), ``"never"`` (slower at the highest measured
    one; ``sparsity`` is None) or ``"unknown"`` (no measurements).
    """

    status: str
    sparsity: float | None

    def describe(self) -> str:
        if self.status == "crosses":
            return f"{self.sparsity:.1%}"
        if self.status == "always":
            return f"always (≤ {self.sparsity:.1%})"
        if self.status == "never":
            return "never"
        return "n/a"


def break_even(sparsities: Sequence[float], speedups: Sequence[float | None]) -> BreakEven:
    """The sparsity above which ``speedup >= 1`` holds for good, interpolated.

    The crossing is taken after the *last* measured point that is slower than dense, so a noisy dip
    at high sparsity moves the break-even up rather than hiding it. Between the two points around
    the crossing the interpolation is linear in log(speedup) (a speedup that grows like
    ``1 / (1 - s)`` is nearly straight in that scale).

    Parameters
    ----------
    sparsities : sequence of float
        Need not be sorted; entries whose speedup is None/NaN/<= 0 are ignored.
    speedups : sequence of float or None
        Dense time over the strategy's time at each sparsity.
    """
    pts = sorted(
        (float(s), float(r))
        for s, r in zip(sparsities, speedups, strict=True)
        if r is not None and math.isfinite(r) and r > 0
    )
    if not pts:
        return BreakEven("unknown", None)
    slow = [i for i, (_, r) in enumerate(pts) if r < 1.0]
    if not slow:
        return BreakEven("always", pts[0][0])
    j = slow[-1]
    if j == len(pts) - 1:
        return BreakEven("never", None)
    (s0, r0), (s1, r1) = pts[j], pts[j + 1]
    t = -math.log(r0) / (math.log(r1) - math.log(r0))
    return BreakEven("crosses", s0 + t * (s1 - s0))


# --------------------------------------------------------------------------------------------------
# formatting helpers


def _ms(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "—"
    if seconds >= 1:
        return f"{seconds * 1e3:,.0f}"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f}"
    return f"{seconds * 1e3:.3f}"


def _x(ratio: float | None) -> str:
    return "—" if ratio is None or not math.isfinite(ratio) else f"{ratio:.2f}×"


def _pct(f: float | None) -> str:
    return "—" if f is None else f"{f:.1%}"


def _kib(n: float | None) -> str:
    return "—" if n is None else f"{n / 1024:,.0f}"


def _mib(n: float | None) -> str:
    return "—" if n is None else f"{n / 2**20:,.1f}"


def median(rec: Mapping[str, Any] | None) -> float | None:
    if rec is None or rec["status"] != "ok" or not rec.get("timing"):
        return None
    return float(rec["timing"]["median_s"])


def speedup(rec: Mapping[str, Any] | None, base: float | None) -> float | None:
    """``rec``'s speedup over torch dense: where the two were timed in alternating samples, the ratio
    of those medians (``paired_speedup``: a spell of the machine slows both alike), else ``base`` (torch
    dense's own measurement, taken minutes apart) over ``rec``'s median."""
    if rec is None or rec["status"] != "ok":
        return None
    paired = rec["metrics"].get("paired_speedup")
    if paired:
        return float(paired)
    t = median(rec)
    return base / t if base and t else None


def _time_cell(rec: Mapping[str, Any] | None, base: float | None = None, *, ratio: bool = False) -> str:
    """``time ms (speedup over torch dense)`` (the speedup with ``ratio``), or the error, for one
    measurement."""
    if rec is None:
        return "—"
    if rec["status"] == "error":
        return "error"
    t = median(rec)
    if t is None:
        return "—"
    iqr = rec["timing"]["iqr_s"]
    cell = f"{_ms(t)} ±{_ms(iqr / 2)}"
    x = speedup(rec, base) if ratio else None
    return cell + (f" ({_x(x)})" if x else "")


def _index(records: Iterable[Mapping[str, Any]], *keys: str) -> dict[tuple[Any, ...], dict[str, Any]]:
    return {tuple(r["params"].get(k) for k in keys): dict(r) for r in records}


def _ordered(values: Iterable[Any]) -> list[Any]:
    return list(dict.fromkeys(values))


def model_keys(records: Iterable[Mapping[str, Any]]) -> list[tuple[str, str]]:
    return _ordered(
        (r["params"]["model"], r["params"]["profile"]) for r in records if "profile" in r["params"]
    )


def impls_of(records: Iterable[Mapping[str, Any]], exclude: Sequence[str] = ()) -> list[str]:
    found = _ordered(r["params"]["impl"] for r in records if "impl" in r["params"])
    strategies = [i for i in found if i not in PEERS and i not in ("bytes", "auto", "activation")]
    peers = [p for p in PEERS if p in found]
    rest = ["auto"] if "auto" in found else []
    return [i for i in [BASELINE, *strategies, *peers[1:], *rest] if i in found and i not in exclude]


# --------------------------------------------------------------------------------------------------
# per-experiment tables


def weight_tables(res: Results) -> list[Table]:
    tables = []
    for r in res.of("weight_sparsity"):
        p = r["params"]
        rows = [
            [
                x["layer"],
                x["kind"],
                "×".join(map(str, x["shape"])),
                f"{x['numel']:,}",
                _pct(x.get("target")),
                _pct(x["sparsity"]),
                _pct(x.get("filter_sparsity")),
            ]
            for x in r["metrics"]["layers"]
        ]
        tr = r["metrics"].get("training") or {}
        acc = (
            f" (digits test accuracy: dense {tr['dense_accuracy']:.1%}, pruned and retrained "
            f"{tr['pruned_accuracy']:.1%})"
            if tr
            else ""
        )
        tables.append(
            Table(
                f"{p['model']} / {p['profile']}{acc}",
                ["layer", "kind", "weight shape", "weights", "profile", "measured zeros", "all-zero filters"],
                rows,
            )
        )
    return tables


def layer_time_table(recs: list[dict[str, Any]], model: str, profile: str, title: str,
                     batch: int | None = None) -> Table:
    """Per layer: median ms ± IQR/2 and speedup over torch dense for each implementation (the records
    of ``batch`` only, when given)."""
    mine = [
        r
        for r in recs
        if r["params"]["model"] == model
        and r["params"].get("profile") == profile
        and r["params"]["impl"] != "bytes"
        and (batch is None or r["params"].get("batch") == batch)
    ]
    idx = _index(mine, "layer", "impl")
    impls = impls_of(mine)
    layers = _ordered(r["params"]["layer"] for r in mine)
    rows = []
    for layer in layers:
        base = median(idx.get((layer, BASELINE)))
        row = [layer] + [_time_cell(idx.get((layer, i)), base, ratio=i != BASELINE) for i in impls]
        auto = idx.get((layer, "auto"))
        if auto is not None and auto["status"] == "ok":
            row[-1] = f"{auto['metrics'].get('choice')}: {row[-1]}"
        rows.append(row)
    return Table(
        title,
        ["layer"] + [f"{i} ms" for i in impls],
        rows,
        "median ± half the interquartile range over repeats; (×) = speedup over torch-dense, timed in "
        "alternating samples with it on the same input; 'auto' is the planner's choice for the layer, "
        "timed as chosen.",
    )


def conversion_table(recs: list[dict[str, Any]], model: str, profile: str, batch: int | None = None) -> Table:
    mine = [
        r
        for r in recs
        if r["params"]["model"] == model
        and r["params"].get("profile") == profile
        and r["status"] == "ok"
        and r["metrics"].get("kind") == "strategy"
        and (batch is None or r["params"].get("batch") == batch)
    ]
    idx = _index(mine, "layer", "impl")
    impls = _ordered(r["params"]["impl"] for r in mine)
    layers = _ordered(r["params"]["layer"] for r in mine)
    rows = [
        [layer]
        + [_ms(idx[(layer, i)]["metrics"].get("conversion_s")) if (layer, i) in idx else "—" for i in impls]
        for layer in layers
    ]
    return Table(
        f"{model} / {profile}: conversion time (not in the times above)",
        ["layer"] + [f"{i} ms" for i in impls],
        rows,
        "one-off cost of building each strategy's format from the dense weights.",
    )


def bytes_table(recs: list[dict[str, Any]], model: str, profile: str) -> Table:
    mine = [
        r
        for r in recs
        if r["params"]["model"] == model
        and r["params"].get("profile") == profile
        and r["params"]["impl"] == "bytes"
        and r["status"] == "ok"
    ]
    seed = SEED["csr_saving_ssl"] if profile == "ssl" else {}
    rows = []
    for r in mine:
        b = r["metrics"]["bytes"]
        layer = r["params"]["layer"]
        rows.append(
            [
                layer,
                _pct(r["metrics"]["sparsity"]),
                _kib(b["dense"]),
                _kib(b["csr"]),
                _kib(b["bsr"]),
                _kib(b["relative"]),
                _x(b["dense"] / max(b["csr"], 1)),
                _x(b["dense"] / max(b["relative"], 1)),
                _x(seed.get(layer)),
            ]
        )
    return Table(
        f"{model} / {profile}: weight storage",
        [
            "layer",
            "sparsity",
            "dense KiB",
            "CSR KiB",
            "BSR 4×4 KiB",
            "relative-index KiB",
            "saving dense/CSR",
            "saving dense/relative",
            "seed's CSR saving",
        ],
        rows,
        "CSR and BSR store indices at the narrowest integer width that fits (int16 here); relative "
        "indices are Deep Compression's 4- or 8-bit gaps with filler zeros.",
    )


def sweep_curves(recs: list[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """impl -> [(sparsity, speedup over torch-dense)], sorted by sparsity; failed points left out."""
    idx = _index(sweep_records(recs), "sparsity", "impl")
    out: dict[str, list[tuple[float, float]]] = {}
    for (s, impl), r in sorted(idx.items(), key=lambda kv: kv[0][0]):
        x = speedup(r, median(idx.get((s, BASELINE))))
        if impl == BASELINE or x is None:
            continue
        out.setdefault(impl, []).append((s, x))
    return out


def sweep_records(recs: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The random-zeros sweep points of experiment 4 (not its structured-vs-unstructured records)."""
    return [dict(r) for r in recs if "sparsity" in r["params"]]


def sweep_tables(recs: list[dict[str, Any]]) -> list[Table]:
    recs = sweep_records(recs)
    if not recs:
        return []
    idx = _index(recs, "sparsity", "impl")
    impls = impls_of(recs)
    sps = sorted(_ordered(r["params"]["sparsity"] for r in recs))
    rows = []
    for s in sps:
        base = median(idx.get((s, BASELINE)))
        rows.append(
            [f"{s:.3f}"] + [_time_cell(idx.get((s, i)), base, ratio=i != BASELINE) for i in impls]
        )
    p = recs[0]["params"]
    where = p.get("layer") or "×".join(map(str, p.get("shape", [])))
    curves = sweep_curves(recs)
    be_rows = []
    for impl, pts in curves.items():
        be = break_even([s for s, _ in pts], [r for _, r in pts])
        best = max(pts, key=lambda q: q[1])
        be_rows.append([impl, be.describe(), f"{best[1]:.2f}× at {best[0]:.3f}"])
    return [
        Table(
            f"{where}: median ms (speedup over torch-dense) by sparsity",
            ["sparsity"] + [f"{i} ms" for i in impls],
            rows,
        ),
        Table(
            f"{where}: break-even sparsity (faster than torch-dense from here on)",
            ["implementation", "break-even", "best speedup"],
            be_rows,
            "interpolated linearly in log(speedup) between the last slower point and the next one.",
        ),
    ]


def scaling_table(recs: list[dict[str, Any]]) -> Table:
    idx = _index(recs, "m", "k", "impl")
    sizes = _ordered((r["params"]["m"], r["params"]["k"]) for r in recs)
    impls = _ordered(r["params"]["impl"] for r in recs)
    rows = []
    for m, k in sizes:
        dense_t = median(idx.get((m, k, "dense")))
        for impl in impls:
            r = idx.get((m, k, impl))
            if r is None:
                continue
            if r["status"] != "ok":
                rows.append([f"{m}×{k}", impl, "error", "", "", "", "", r["error"][:80]])
                continue
            mt = r["metrics"]
            t = median(r)
            rows.append(
                [
                    f"{m}×{k}",
                    impl,
                    _ms(t),
                    _mib(mt["peak_rss_bytes"]),
                    _mib(mt["matrix_rss_bytes"]),
                    _mib(mt["operand_bytes"]),
                    _x(dense_t / t) if dense_t and t else "—",
                    "",
                ]
            )
    n = recs[0]["params"]["n"] if recs else 0
    s = recs[0]["params"]["sparsity"] if recs else 0
    return Table(
        f"weight matrices at sparsity {s:.0%}, times a dense {n}-column operand",
        [
            "matrix",
            "impl",
            "time ms",
            "peak RSS MiB",
            "RSS above baseline MiB",
            "weight bytes MiB",
            "dense/this time",
            "note",
        ],
        rows,
        "peak RSS of a child process per measurement (os.wait4); the baseline is the child's "
        "high-water mark after imports and JIT warm-up, before the matrix was made.",
    )


def conv_spxsp_records(recs: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Experiment 6's conv records (its FC records carry ``op: linear``)."""
    return [dict(r) for r in recs if r["params"].get("op", "conv") == "conv"]


def spxsp_tables(recs: list[dict[str, Any]]) -> list[Table]:
    fc = [r for r in recs if r["params"].get("op") == "linear"]
    recs = conv_spxsp_records(recs)
    tables = []
    for model, profile in model_keys(recs):
        mine = [r for r in recs if r["params"]["model"] == model and r["params"]["profile"] == profile]
        idx = _index(mine, "layer", "impl")
        layers = _ordered(r["params"]["layer"] for r in mine)
        impls = [
            i
            for i in ("torch-dense", "dense", "csrmm", "spgemm", "spconv-act", "torch-spgemm")
            if any(r["params"]["impl"] == i for r in mine)
        ]
        rows = []
        for layer in layers:
            act = idx.get((layer, "activation"))
            am = act["metrics"] if act and act["status"] == "ok" else {}
            base = median(idx.get((layer, BASELINE)))
            row = [
                layer,
                _pct(am.get("input_sparsity")),
                _pct(SEED["relu_sparsity"].get(layer)),
                _pct(am.get("lowered_sparsity")),
            ]
            row += [_time_cell(idx.get((layer, i)), base, ratio=i != BASELINE) for i in impls]
            row += [
                _mib(idx[(layer, i)]["metrics"].get("operand_bytes"))
                if (layer, i) in idx and idx[(layer, i)]["status"] == "ok"
                else "—"
                for i in impls
            ]
            rows.append(row)
        source = next(
            (
                r["metrics"].get("input")
                for r in mine
                if r["params"]["impl"] == "activation" and r["status"] == "ok"
            ),
            "?",
        )
        tables.append(
            Table(
                f"{model} / {profile}: sparse weights × sparse (post-ReLU) lowered input, batch 1",
                ["layer", "input zeros", "seed's ReLU zeros", "lowered zeros"]
                + [f"{i} ms" for i in impls]
                + [f"{i} operands MiB" for i in impls],
                rows,
                f"inputs: {source} images. Operand memory = weight + lowered input as each implementation "
                "stores "
                "them (dense, or CSR; spconv-act: its tiled weight rows and the position and pixel lists "
                "it allocates, 8 bytes per slot); the dense output is the same for all and not counted.",
            )
        )
        tables.append(spconv_table(mine, model, profile))
    if fc:
        tables.append(act_fc_table(fc))
    return tables


# Weight-only strategies that sparse x sparse (spconv-act) is compared with; the structured-vs-
# unstructured comparison takes the best of the same ones plus torch's dense conv of the layer.
WEIGHT_ONLY = ("dense", "csrmm", "direct", "lowered", "bsr")
STRUCTURE_STRATEGIES = ("torch", *WEIGHT_ONLY)
# A ratio within 5% of 1 is called a tie in the "where it wins" texts (timing noise at batch 1).
_TIE = 1.05


def _ok_metrics(rec: Mapping[str, Any] | None) -> dict[str, Any]:
    return dict(rec["metrics"]) if rec is not None and rec["status"] == "ok" else {}


def _best(idx: Mapping[tuple[Any, ...], dict[str, Any]], key: tuple[Any, ...],
          impls: Sequence[str]) -> tuple[str | None, float | None, float | None]:
    """The fastest of ``impls`` at ``key + (impl,)``: its name, median time and speedup over torch
    dense (:func:`speedup`; the fastest is the one with the largest speedup, which each measured beside
    torch dense, so a spell of the machine between two of them does not pick the winner)."""
    base = median(idx.get((*key, BASELINE)))
    found = {i: (median(idx.get((*key, i))), speedup(idx.get((*key, i)), base)) for i in impls}
    found = {i: (t, x) for i, (t, x) in found.items() if t and x}
    if not found:
        return None, None, None
    best = max(found, key=lambda i: found[i][1])
    return best, *found[best]


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


@dataclass(frozen=True)
class StructureRow:
    """Experiment 4, one conv layer: structured (ssl, shrunk) vs unstructured at the same zeros."""

    layer: str
    zeros_structured: float
    zeros_unstructured: float
    structure: dict[str, Any]  # the ssl layer's "structure" metrics (kept rows, cols, FLOPs)
    unstructured: dict[str, Any]
    base_structured_s: float | None  # torch dense on the ssl layer as pruned (unshrunk)
    base_unstructured_s: float | None
    best_structured: str | None
    best_structured_s: float | None
    best_unstructured: str | None
    best_unstructured_s: float | None
    speedup_structured: float | None  # the best's speedup over torch dense (:func:`speedup`)
    speedup_unstructured: float | None

    @property
    def structured_over_unstructured(self) -> float | None:
        """The structured best's speedup over the unstructured best's, each over torch dense on its own
        layer as pruned (the same dense conv): > 1 where structure is faster."""
        return _ratio(self.speedup_structured, self.speedup_unstructured)

    def verdict(self) -> str:
        """Where structure wins and where it cannot, and why, from the measured numbers."""
        sp, su, r = self.speedup_structured, self.speedup_unstructured, self.structured_over_unstructured
        st, un = self.structure, self.unstructured
        if sp is None or su is None or r is None or not st or not un:
            return "not measured"
        ideal = st["ideal"]
        cut = 1 - 1 / ideal
        of_ideal = sp / ideal
        u_left = un["compact_flops"] / un["dense_flops"]
        u_of = su / un["nonzero_ideal"]
        scattered = (f"the same {self.zeros_unstructured:.0%} zeros scattered leave a compact GEMM of "
                     f"{u_left:.0%} of dense, so {self.best_unstructured} gets {su:.2f}× "
                     f"({u_of:.0%} of 1/(1-s) = {un['nonzero_ideal']:.2f}×)")
        if sp >= _TIE and r >= _TIE:
            return (f"structure wins ({r:.2f}× unstructured): removed rows/columns take {cut:.0%} of the "
                    f"FLOPs ({ideal:.2f}× ideal) and {self.best_structured} runs the compact GEMM at "
                    f"{of_ideal:.0%} of that ideal; {scattered}")
        if sp < _TIE and ideal < 1.25:
            return (f"cannot win: removed rows/columns take only {cut:.0%} of the FLOPs (ideal "
                    f"{ideal:.2f}×), measured {sp:.2f}×; {scattered}")
        if sp < _TIE:
            return (f"does not win here: {ideal:.2f}× fewer FLOPs, but the compact GEMM ran at "
                    f"{of_ideal:.0%} of that ideal ({sp:.2f}×); {scattered}")
        return (f"faster than dense ({sp:.2f}×, {of_ideal:.0%} of the {ideal:.2f}× ideal) but no faster "
                f"than unstructured ({r:.2f}×): {scattered}")


def structure_rows(recs: Iterable[Mapping[str, Any]]) -> list[StructureRow]:
    """Experiment 4's structured-vs-unstructured records (those with a ``profile``), per layer."""
    mine = [r for r in recs if "profile" in r["params"] and "sparsity" not in r["params"]]
    idx = _index(mine, "profile", "layer", "impl")
    rows = []
    for layer in _ordered(r["params"]["layer"] for r in mine):
        st = _ok_metrics(idx.get(("ssl", layer, "structure")))
        un = _ok_metrics(idx.get(("ssl-unstructured", layer, "structure")))
        bs, ts, xs = _best(idx, ("ssl", layer), STRUCTURE_STRATEGIES)
        bu, tu, xu = _best(idx, ("ssl-unstructured", layer), STRUCTURE_STRATEGIES)
        rows.append(StructureRow(
            layer, st.get("zeros", math.nan), un.get("zeros", math.nan), st, un,
            median(idx.get(("ssl", layer, BASELINE))), median(idx.get(("ssl-unstructured", layer, BASELINE))),
            bs, ts, bu, tu, xs, xu,
        ))
    return rows


def _kept(m: Mapping[str, Any], key: str) -> str:
    v = m.get(key)
    return f"{v[0]:,}/{v[1]:,}" if v else "—"


def structure_table(recs: list[dict[str, Any]]) -> Table | None:
    rows = structure_rows(recs)
    if not rows:
        return None
    cells = []
    for r in rows:
        st, un = r.structure, r.unstructured
        cells.append([
            r.layer,
            f"{_pct(st.get('zeros'))} / {_pct(un.get('zeros'))}",
            _kept(st, "filters"),
            _kept(st, "in_channels"),
            _kept(st, "cols"),
            _pct(st["compact_flops"] / st["dense_flops"]) if st else "—",
            _pct(un["compact_flops"] / un["dense_flops"]) if un else "—",
            _ms(r.base_structured_s),
            f"{r.best_structured}: {_ms(r.best_structured_s)}" if r.best_structured else "—",
            _x(r.speedup_structured),
            _x(st.get("ideal")),
            _ms(r.base_unstructured_s),
            f"{r.best_unstructured}: {_ms(r.best_unstructured_s)}" if r.best_unstructured else "—",
            _x(r.speedup_unstructured),
            _x(un.get("nonzero_ideal")),
            _x(r.structured_over_unstructured),
            r.verdict(),
        ])
    return Table(
        "alexnet: structured (ssl, shrunk) vs unstructured (ssl-unstructured) at the same zero count, "
        "batch 1",
        ["layer", "zeros ssl / unstructured", "ssl filters kept", "ssl input channels kept",
         "ssl lowered columns kept", "ssl compact GEMM / dense FLOPs",
         "unstructured compact GEMM / dense FLOPs", "ssl torch-dense ms", "ssl shrunk best ms",
         "ssl speedup", "ssl ideal (dense / compact FLOPs)", "unstructured torch-dense ms",
         "unstructured best ms", "unstructured speedup", "unstructured ideal 1/(1-s)",
         "structured / unstructured", "where structure wins, and why"],
        cells,
        "ssl: sparsecnn.shrink.shrink removes the all-zero filters and the input channels nobody reads; "
        "each compact layer runs on its own input. Best of torch (the layer's own dense conv) and the "
        f"weight-only strategies {', '.join(WEIGHT_ONLY)}; speedups over torch-dense on the layer as "
        "pruned, each timed in alternating samples with it. structured / unstructured = ssl best speedup "
        "/ unstructured best speedup.",
    )


@dataclass(frozen=True)
class SpconvRow:
    """Experiment 6, one conv layer: spconv-act against torch dense and the best weight-only strategy."""

    layer: str
    input_zeros: float | None
    weight_zeros: float | None
    torch_s: float | None
    best: str | None
    best_s: float | None
    spconv_s: float | None
    spconv_bytes: int | None
    best_bytes: int | None
    spconv_x: float | None  # speedups over torch dense (:func:`speedup`)
    best_x: float | None

    @property
    def vs_torch(self) -> float | None:
        return self.spconv_x

    @property
    def vs_best(self) -> float | None:
        """The best weight-only strategy's time over spconv-act's (the ratio of their speedups)."""
        return _ratio(self.spconv_x, self.best_x)

    @property
    def work(self) -> float | None:
        """Fraction of the dense multiply-adds left: nonzero weights x nonzero inputs."""
        if self.input_zeros is None or self.weight_zeros is None:
            return None
        return (1 - self.weight_zeros) * (1 - self.input_zeros)

    def verdict(self) -> str:
        """spconv-act's work is the nonzero inputs times every weight of a kept channel (a row of output
        channels is one vector FMA); a weight-only kernel's is the nonzero weights times every input.
        So the verdict compares the two densities, and the time against them."""
        vt, vb, z, wz = self.vs_torch, self.vs_best, self.input_zeros, self.weight_zeros
        if vt is None or vb is None or z is None or wz is None:
            return "not measured"
        dens_in, dens_w = 1 - z, 1 - wz
        by_work = dens_w / max(dens_in, 1e-12)  # what spconv-act's work allows over a weight-only kernel
        if vt >= _TIE and vb >= _TIE:
            return (f"wins: it multiplies the {dens_in:.0%} nonzero inputs by whole weight rows where "
                    f"{self.best} multiplies the {dens_w:.0%} nonzero weights by every input ({by_work:.2f}× "
                    f"less work allows {by_work:.2f}×); {vt:.2f}× torch, {vb:.2f}× {self.best}")
        if vt >= _TIE:
            why = ("the input has fewer zeros than the weights, so it does more multiply-adds"
                   if by_work < 1 else f"its work allows {by_work:.2f}× and the list building ate the rest")
            return f"beats torch dense ({vt:.2f}×) but not {self.best} ({vb:.2f}×): {why}"
        return (f"cannot beat torch dense ({vt:.2f}×): it does {dens_in:.0%} of the dense multiply-adds "
                f"(ideal {1 / max(dens_in, 1e-12):.2f}×) and reaches {vt * dens_in:.0%} of that; vs "
                f"{self.best} {vb:.2f}×")


def spconv_rows(recs: Iterable[Mapping[str, Any]]) -> list[SpconvRow]:
    mine = conv_spxsp_records(recs)
    idx = _index(mine, "layer", "impl")
    rows = []
    for layer in _ordered(r["params"]["layer"] for r in mine):
        if (layer, "spconv-act") not in idx:
            continue
        act = _ok_metrics(idx.get((layer, "activation")))
        best, best_s, best_x = _best(idx, (layer,), WEIGHT_ONLY)
        base = median(idx.get((layer, BASELINE)))
        rows.append(SpconvRow(
            layer, act.get("input_sparsity"), act.get("weight_sparsity"), base,
            best, best_s, median(idx[(layer, "spconv-act")]),
            _ok_metrics(idx[(layer, "spconv-act")]).get("operand_bytes"),
            _ok_metrics(idx.get((layer, best))).get("operand_bytes") if best else None,
            speedup(idx[(layer, "spconv-act")], base), best_x,
        ))
    return rows


def spconv_table(recs: list[dict[str, Any]], model: str, profile: str) -> Table:
    cells = [
        [
            r.layer, _pct(r.input_zeros), _pct(r.weight_zeros), _pct(r.work), _ms(r.torch_s),
            f"{r.best}: {_ms(r.best_s)}" if r.best else "—", _ms(r.spconv_s), _x(r.vs_torch),
            _x(r.vs_best), _mib(r.spconv_bytes), _mib(r.best_bytes), r.verdict(),
        ]
        for r in spconv_rows(recs)
    ]
    return Table(
        f"{model} / {profile}: spconv-act (skips zero inputs) vs torch dense and the best "
        "weight-only strategy, batch 1",
        ["layer", "input zeros", "weight zeros", "multiply-adds left", "torch-dense ms",
         "best weight-only ms", "spconv-act ms", "spconv-act vs torch", "spconv-act vs best weight-only",
         "spconv-act operands MiB", "best weight-only operands MiB", "where it wins, and why"],
        cells,
        f"best weight-only: the fastest of {', '.join(WEIGHT_ONLY)} on the same input; multiply-adds left "
        "= (1 - weight zeros)(1 - input zeros) (zeros at independent positions), the bound neither kernel "
        "reaches: spconv-act skips the input zeros only, the weight-only kernels the weight zeros only; "
        "vs = the other's time / spconv-act's (ratios of speedups over torch dense, each timed in "
        "alternating samples with it).",
    )


@dataclass(frozen=True)
class ActFcRow:
    """Experiment 6, one FC layer at batch 1: spmv-act (nonzero inputs only) vs the weight-only spmv."""

    layer: str
    input_zeros: float | None
    weight_zeros: float | None
    torch_s: float | None
    spmv_s: float | None
    act_s: float | None
    spmv_x: float | None  # speedups over torch dense (:func:`speedup`)
    act_x: float | None

    @property
    def act_over_spmv(self) -> float | None:
        """spmv time / spmv-act time (the ratio of their speedups over torch dense)."""
        return _ratio(self.act_x, self.spmv_x)

    @property
    def ideal(self) -> float | None:
        """1 / (1 - input zeros): the weight columns spmv-act may skip."""
        return None if self.input_zeros is None else 1 / max(1 - self.input_zeros, 1e-12)

    def verdict(self) -> str:
        r, ideal, z = self.act_over_spmv, self.ideal, self.input_zeros
        if r is None or ideal is None or z is None:
            return "not measured"
        if r >= _TIE:
            return (f"wins: reads the weight columns of only the {1 - z:.0%} nonzero inputs; {r:.2f}× spmv, "
                    f"{r / ideal:.0%} of the 1/(1-x) = {ideal:.2f}× ideal")
        return (f"cannot win: at {z:.0%} zero inputs it may skip {z:.0%} of the weight bytes (ideal "
                f"{ideal:.2f}×) and measured {r:.2f}× ({r / ideal:.0%} of it): finding the nonzero inputs "
                "and walking their columns cost what the skipped bytes save")


def act_fc_rows(recs: Iterable[Mapping[str, Any]]) -> list[ActFcRow]:
    mine = [r for r in recs if r["params"].get("op") == "linear"]
    idx = _index(mine, "layer", "impl")
    rows = []
    for layer in _ordered(r["params"]["layer"] for r in mine):
        act = _ok_metrics(idx.get((layer, "activation")))
        base = median(idx.get((layer, BASELINE)))
        spmv, spmv_act = idx.get((layer, "spmv")), idx.get((layer, "spmv-act"))
        rows.append(ActFcRow(layer, act.get("input_sparsity"), act.get("weight_sparsity"), base,
                             median(spmv), median(spmv_act), speedup(spmv, base), speedup(spmv_act, base)))
    return rows


def act_fc_table(recs: list[dict[str, Any]]) -> Table:
    cells = [
        [
            r.layer, _pct(r.weight_zeros), _pct(r.input_zeros), _ms(r.torch_s),
            f"{_ms(r.spmv_s)} ({_x(r.spmv_x)})",
            f"{_ms(r.act_s)} ({_x(r.act_x)})",
            _x(r.act_over_spmv), _x(r.ideal), r.verdict(),
        ]
        for r in act_fc_rows(recs)
    ]
    p = recs[0]["params"]
    return Table(
        f"{p['model']} / {p['profile']} FC layers, batch 1: activation-sparse spmv-act vs weight-only spmv "
        "on the measured ReLU input",
        ["layer", "weight zeros", "input zeros (measured)", "torch-dense ms", "spmv ms (× torch)",
         "spmv-act ms (× torch)", "spmv / spmv-act", "ideal 1/(1-x)", "where it wins, and why"],
        cells,
        "spmv reads every stored weight (CSR rows); spmv-act walks only the nonzero inputs and their weight "
        "columns. The inputs are the layers' real inputs (through the model), not synthetic zeros. (×): "
        "over torch-dense, timed in alternating samples with it; spmv / spmv-act is the ratio of those.",
    )


def e2e_table(recs: list[dict[str, Any]]) -> Table:
    idx = _index(recs, "model", "profile", "batch", "impl")
    rows = []
    for (model, profile, batch, impl), r in idx.items():
        base = median(idx.get((model, profile, batch, BASELINE)))
        t = median(r)
        if r["status"] != "ok":
            rows.append([f"{model} / {profile}", str(batch), impl, "error", "", "", "", r["error"][:80]])
            continue
        chosen = r["metrics"].get("strategies") or {}
        counts = ", ".join(f"{k}×{v}" for k, v in sorted(_counts(chosen.values()).items()))
        rows.append(
            [
                f"{model} / {profile}",
                str(batch),
                impl,
                _ms(t),
                f"{batch / t:,.1f}" if t else "—",
                _x(speedup(r, base)),
                r["metrics"].get("cores", "—"),
                counts,
            ]
        )
    return Table(
        "whole model, dense vs sparsified",
        ["model", "batch", "impl", "ms per batch", "images/s", "speedup", "cores", "strategies chosen"],
        rows,
        "'sparsecnn' is sparsify(model, 'auto'): the planner's per-layer choice; 'sparsecnn-compiled' is "
        "sparsecnn.compile(model, x, 'auto'): the whole-model executor (BatchNorm folded, ReLU and residual "
        "adds fused, numba pools, planned buffers); 'onnxruntime' runs the dense model exported to ONNX "
        "(intra-op spinning off). Planning time is not included. 'speedup': over torch-dense timed in "
        "alternating samples with the implementation in its own measurement (the ratio of the two medians: "
        "a spell of the machine slows both alike); the torch-dense row is a measurement of its own. "
        "'cores': where the two worker threads' "
        "cores sat around the timing (sparsecnn.bench.placement): 'far' (no shared cache, as a VM's host "
        "may place them for minutes at a time) slows every multi-threaded engine, the compiled one most; "
        "compare speedups taken in the same placement.",
    )


def _size(n: float | None) -> str:
    """Bytes at a readable unit (the compression tables span 2 KiB to 230 MiB)."""
    if n is None:
        return "—"
    if n >= 2**20:
        return f"{n / 2**20:,.2f} MiB"
    return f"{n / 1024:,.2f} KiB"


# Han et al. (ICLR 2016) name their tables by network.
_PAPER_TABLE = {"alexnet": "Table 4", "lenet5": "Table 3"}


def compression_tables(recs: list[dict[str, Any]]) -> list[Table]:
    """Deep Compression storage per layer and stage beside the paper, and qspmv vs float CSR spmv."""
    tables = []
    for r in recs:
        if r["params"].get("impl") != "storage" or r["status"] != "ok":
            continue
        m = r["metrics"]
        rows = [
            [
                x["layer"],
                _pct(x["kept"]),
                _size(x["dense_bytes"]),
                _size(x["csr_bytes"]),
                _size(x["relative_bytes"]),
                _size(x["quantized_bytes"]),
                _size(x["huffman_bytes"]),
                f"{x['weight_bits_huffman']:.2f} / {x['index_bits_huffman']:.2f}",
                _pct(x["rate_pqh"]),
                _pct(x["paper_rate_pqh"]),
                _x(x["ratio"]),
                _x(x["paper_ratio"]),
            ]
            for x in m["rows"]
        ]
        p = r["params"]
        acc = m.get("accuracy")
        note = (
            f"Quantized with 8-bit conv / 5-bit FC k-means codebooks (linear init), {m['index_bits']}-bit "
            "relative-index gaps; bytes are exact (Huffman bits counted, code-length tables and codebooks "
            "included). Paper: Han, Mao & Dally, Deep Compression, ICLR 2016, "
            f"{_PAPER_TABLE.get(m['paper'] or '', 'no table')}."
        )
        if acc:
            note += (
                f" Digits test accuracy: dense {_pct(acc['dense'])}, pruned {_pct(acc['pruned'])}, "
                f"quantized (no centroid fine-tuning) {_pct(acc['quantized'])}."
            )
        elif p["model"] == "alexnet":
            note += (
                " The zoo's weights are seeded random, not ImageNet-trained: their codes are used almost "
                "uniformly, so Huffman coding saves less on them than on the paper's trained weights."
            )
        tables.append(
            Table(
                f"{p['model']} / {p['profile']}: Deep Compression storage, total {_x(m['ratio'])}",
                [
                    "layer",
                    "kept",
                    "dense",
                    "P: CSR",
                    "P: relative index",
                    "P+Q",
                    "P+Q+H",
                    "Huffman bits weight / index",
                    "P+Q+H / dense",
                    "paper P+Q+H / dense",
                    "ratio",
                    "paper ratio",
                ],
                rows,
                note,
            )
        )
    timed = _index((r for r in recs if r["params"].get("impl") in ("qspmv", "spmv")), "layer", "impl")
    layers = _ordered(r["params"]["layer"] for r in recs if "layer" in r["params"])
    rows = []
    for layer in layers:
        q, f = timed.get((layer, "qspmv")), timed.get((layer, "spmv"))
        tq, tf = median(q), median(f)
        # each timed beside torch dense on the layer: the ratio of those speedups where both have one
        xq, xf = speedup(q, None), speedup(f, None)
        rows.append(
            [
                layer,
                _time_cell(f, None),
                _time_cell(q, None),
                _x(xq / xf if xq and xf else (tf / tq if tq and tf else None)),
                _size(f["metrics"].get("weight_nbytes") if f and f["status"] == "ok" else None),
                _size(q["metrics"].get("weight_nbytes") if q and q["status"] == "ok" else None),
            ]
        )
    if rows:
        tables.append(
            Table(
                "alexnet / deep-compression, quantized FC layers, batch 1: codebook-index SpMV vs float CSR",
                ["layer", "spmv (float CSR) ms", "qspmv (uint8 codes) ms", "speedup", "spmv bytes",
                 "qspmv bytes"],
                rows,
                "Both run the same quantized weights (5-bit codebook); spmv holds float32 values + int16 "
                "columns, qspmv uint8 codes + int16 columns + the codebook and, built on the first batch-1 "
                "call, the sliced-ELL form that batch 1 runs (uint16 entries, ~2.1 per nonzero). Speedup: "
                "the ratio of the two speedups over torch dense, each timed in alternating samples with "
                "it. Issue 13's target: 1.2× at 91%.",
            )
        )
    return tables


def _counts(values: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


def experiment_tables(res: Results, experiment: str) -> list[Table]:
    """The tables of one experiment section."""
    recs = res.of(experiment, status=None)
    if experiment == "weight_sparsity":
        return weight_tables(res)
    if experiment in ("conv_layers", "fc_layers"):
        out = []
        for model, profile in model_keys(recs):
            mine = [r for r in recs if (r["params"]["model"], r["params"].get("profile")) == (model, profile)]
            batches = sorted({r["params"]["batch"] for r in mine if "batch" in r["params"]}) or [1]
            out.append(bytes_table(recs, model, profile))
            out += [
                layer_time_table(recs, model, profile, f"{model} / {profile}: time per layer, batch {b}", b)
                for b in batches
            ]
            out.append(conversion_table(recs, model, profile, batches[0]))
        return out
    if experiment == "sparsity_sweep":
        structure = structure_table(recs)
        return sweep_tables(recs) + ([structure] if structure else [])
    if experiment == "memory_scaling":
        return [scaling_table(recs)] if recs else []
    if experiment == "sparse_x_sparse":
        return spxsp_tables(recs)
    if experiment == "end_to_end":
        return [e2e_table(recs)] if recs else []
    if experiment == "compression":
        return compression_tables(recs)
    raise SparseCNNError(f"unknown experiment {experiment!r}")


def geomean(values: Iterable[float]) -> float | None:
    vals = [v for v in values if v and math.isfinite(v) and v > 0]
    return math.exp(statistics.fmean(math.log(v) for v in vals)) if vals else None
