"""PNG plots of a results file (matplotlib, imported lazily, Agg backend: no display needed).

Each ``plot_*`` function takes the records of one experiment and a path, draws one figure with a
title, axis labels with units and a legend, saves it and returns the path, or returns None when the
records hold nothing to draw.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sparsecnn.report.tables import (
    SEED,
    Results,
    break_even,
    conv_spxsp_records,
    impls_of,
    median,
    model_keys,
    sweep_curves,
    sweep_records,
)

__all__ = ["EXPERIMENT_PLOTS", "make_plots"]


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {
            "figure.dpi": 100,
            "savefig.dpi": 110,
            "font.size": 9,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "legend.fontsize": 8,
        }
    )
    return plt


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    from sparsecnn._atomic import replacing

    with replacing(path) as tmp:
        fig.savefig(tmp, format="png")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _grouped_bars(
    ax: Any, groups: Sequence[str], series: dict[str, list[float | None]], log: bool = False
) -> None:
    import matplotlib

    n = max(len(series), 1)
    width = 0.8 / n
    # tab10 repeats after ten series; tab20 keeps eleven or more implementations apart
    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    for i, (label, vals) in enumerate(series.items()):
        xs = [g + (i - (n - 1) / 2) * width for g in range(len(groups))]
        ys = [v if v is not None and math.isfinite(v) else 0.0 for v in vals]
        ax.bar(xs, ys, width=width, label=label, color=cmap(i % cmap.N))
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups)
    if log:
        ax.set_yscale("log")


def plot_weight_sparsity(res: Results, path: Path) -> Path | None:
    recs = res.of("weight_sparsity")
    if not recs:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 3.6))
    layers = list(dict.fromkeys(x["layer"] for r in recs for x in r["metrics"]["layers"]))
    series = {}
    for r in recs:
        by = {x["layer"]: x["sparsity"] * 100 for x in r["metrics"]["layers"]}
        series[f"{r['params']['model']} / {r['params']['profile']}"] = [by.get(layer) for layer in layers]
    _grouped_bars(ax, layers, series)
    ax.set_ylim(0, 100)
    ax.set_xlabel("layer")
    ax.set_ylabel("weights that are zero (%)")
    ax.set_title("Weight sparsity per layer")
    ax.legend()
    return _save(fig, path)


def plot_layer_bytes(res: Results, path: Path, experiment: str = "conv_layers") -> Path | None:
    recs = [r for r in res.of(experiment) if r["params"]["impl"] == "bytes"]
    keys = model_keys(recs)
    if not keys:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(keys), figsize=(4.6 * len(keys), 3.6), squeeze=False)
    for ax, (model, profile) in zip(axes[0], keys, strict=True):
        mine = [r for r in recs if r["params"]["model"] == model and r["params"]["profile"] == profile]
        layers = [r["params"]["layer"] for r in mine]
        series = {
            label: [r["metrics"]["bytes"][fmt] / 2**20 for r in mine]
            for label, fmt in (
                ("dense", "dense"),
                ("CSR", "csr"),
                ("BSR 4×4", "bsr"),
                ("relative index", "relative"),
            )
        }
        _grouped_bars(ax, layers, series)
        ax.set_title(f"{model} / {profile}")
        ax.set_xlabel("layer")
        ax.set_ylabel("weight storage (MiB)")
        ax.legend()
    fig.suptitle("Per-layer weight bytes: dense vs CSR vs BSR vs relative index")
    return _save(fig, path)


def plot_layer_times(res: Results, path: Path, experiment: str = "conv_layers") -> Path | None:
    # batch 1 (the tables also show the larger batches of the FC layers)
    recs = [r for r in res.of(experiment)
            if r["params"]["impl"] != "bytes" and r["params"].get("batch", 1) == 1]
    keys = model_keys(recs)
    if not keys:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4.8), squeeze=False)
    for ax, (model, profile) in zip(axes[0], keys, strict=True):
        mine = [r for r in recs if r["params"]["model"] == model and r["params"]["profile"] == profile]
        layers = list(dict.fromkeys(r["params"]["layer"] for r in mine))
        idx = {(r["params"]["layer"], r["params"]["impl"]): r for r in mine}
        series = {}
        for impl in impls_of(mine):
            vals = [median(idx.get((layer, impl))) for layer in layers]
            series["planner (auto)" if impl == "auto" else impl] = [v * 1e3 if v else None for v in vals]
        _grouped_bars(ax, layers, series, log=True)
        ax.set_title(f"{model} / {profile}, batch 1")
        ax.set_xlabel("layer")
        ax.set_ylabel("time per call (ms, log scale)")
        # below the axes: with ten implementations a legend inside would cover the bars
        ax.legend(ncol=4, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16))
    kind = "FC" if experiment == "fc_layers" else "Conv"
    fig.suptitle(f"{kind} layers: time per layer by strategy (median)")
    return _save(fig, path)


def plot_sweep(
    res: Results, path: Path, experiment: str = "sparsity_sweep", records: list[dict[str, Any]] | None = None
) -> Path | None:
    recs = sweep_records(records if records is not None else res.of(experiment))
    curves = sweep_curves(recs)
    if not curves:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.4))
    for impl, pts in curves.items():
        xs = [s * 100 for s, _ in pts]
        ys = [r for _, r in pts]
        (line,) = ax.plot(xs, ys, marker="o", ms=3, label=impl)
        be = break_even([s for s, _ in pts], ys)
        if be.status == "crosses":
            ax.axvline(be.sparsity * 100, color=line.get_color(), ls=":", lw=1)
            ax.plot([be.sparsity * 100], [1.0], marker="D", color=line.get_color(), ms=6)
            line.set_label(f"{impl} (break-even {be.sparsity:.1%})")
        else:
            line.set_label(f"{impl} ({be.describe()} faster)")
    ax.axhline(1.0, color="black", lw=1)
    ax.axvline(SEED["cpu_break_even"] * 100, color="grey", ls="--", lw=1, label="seed's CPU break-even (97%)")
    ax.set_yscale("log")
    ax.set_xlabel("weight sparsity (% zeros, uniform random)")
    ax.set_ylabel("speedup over torch dense (×, log scale)")
    p = recs[0]["params"]
    where = f"{p.get('model', '')} {p.get('layer', '')}".strip() or "×".join(map(str, p.get("shape", [])))
    ax.set_title(
        f"Speedup vs sparsity, {where}, batch {p.get('batch', '-')}, {p.get('device', 'cpu')}; ◆ = break-even"
    )
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def plot_scaling(res: Results, path: Path) -> Path | None:
    recs = res.of("memory_scaling")
    if not recs:
        return None
    plt = _plt()
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(12, 3.8))
    impls = list(dict.fromkeys(r["params"]["impl"] for r in recs))
    idx = {(r["params"]["m"], r["params"]["k"], r["params"]["impl"]): r for r in recs}
    sizes = sorted({(r["params"]["m"], r["params"]["k"]) for r in recs}, key=lambda mk: mk[0] * mk[1])
    xs_all = [m * k for m, k in sizes]
    for impl in impls:
        pts = [(m * k, idx[(m, k, impl)]) for m, k in sizes if (m, k, impl) in idx]
        xs = [x for x, _ in pts]
        a1.plot(xs, [median(r) * 1e3 for _, r in pts], marker="o", label=impl)
        a2.plot(
            xs, [r["metrics"]["peak_rss_bytes"] / 2**20 for _, r in pts], marker="o", label=f"{impl} peak"
        )
        a2.plot(
            xs,
            [max(r["metrics"]["matrix_rss_bytes"], 1) / 2**20 for _, r in pts],
            marker="x",
            ls="--",
            label=f"{impl} above baseline",
        )
        if impl != "dense":
            ratio = [
                (m * k, median(idx.get((m, k, "dense"))), median(idx.get((m, k, impl)))) for m, k in sizes
            ]
            ratio = [(x, d / t) for x, d, t in ratio if d and t]
            a3.plot([x for x, _ in ratio], [y for _, y in ratio], marker="o", label=f"dense / {impl}")
    for ax in (a1, a2, a3):
        ax.set_xscale("log")
        ax.set_xlabel("weight matrix elements (M×K, log scale)")
        ax.set_xticks(xs_all)
        ax.set_xticklabels([f"{m}×{k}" for m, k in sizes], fontsize=7)
        ax.legend()
    a1.set_yscale("log")
    a1.set_ylabel("time per product (ms, log scale)")
    a1.set_title("Runtime")
    a2.set_yscale("log")
    a2.set_ylabel("resident memory (MiB, log scale)")
    a2.set_title("Peak RSS of the child process")
    a3.axhline(1.0, color="black", lw=1)
    a3.set_ylabel("dense time / sparse time (×)")
    a3.set_title("Dense/sparse time ratio vs size")
    s = recs[0]["params"]["sparsity"]
    fig.suptitle(f"Memory scaling at {s:.0%} sparsity")
    return _save(fig, path)


def plot_spxsp(res: Results, path: Path) -> Path | None:
    recs = conv_spxsp_records(res.of("sparse_x_sparse"))
    keys = model_keys(recs)
    if not keys:
        return None
    plt = _plt()
    model, profile = keys[0]
    mine = [r for r in recs if r["params"]["model"] == model and r["params"]["profile"] == profile]
    idx = {(r["params"]["layer"], r["params"]["impl"]): r for r in mine}
    layers = list(dict.fromkeys(r["params"]["layer"] for r in mine))
    impls = [
        i
        for i in ("torch-dense", "dense", "csrmm", "spgemm", "torch-spgemm")
        if any(r["params"]["impl"] == i for r in mine)
    ]
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(13, 4.6))
    times = {i: [(median(idx.get((layer, i))) or math.nan) * 1e3 for layer in layers] for i in impls}
    _grouped_bars(a1, layers, times, log=True)
    a1.set_ylabel("time per call (ms, log scale)")
    a1.set_title("Time")
    a1.legend(ncol=3, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16))
    mem = {
        i: [
            idx[(layer, i)]["metrics"]["operand_bytes"] / 2**20 if (layer, i) in idx else None
            for layer in layers
        ]
        for i in impls
        if i != "torch-dense"
    }
    _grouped_bars(a2, layers, mem)
    a2.set_ylabel("weight + lowered input (MiB)")
    a2.set_title("Operand memory")
    act = [
        idx[(layer, "activation")]["metrics"]["input_sparsity"] * 100
        if (layer, "activation") in idx
        else None
        for layer in layers
    ]
    seed = [SEED["relu_sparsity"].get(layer, math.nan) * 100 for layer in layers]
    _grouped_bars(a3, layers, {"measured here": act, "seed (trained AlexNet)": seed})
    a3.set_ylim(0, 100)
    a3.set_ylabel("zeros in the layer's input (%)")
    a3.set_title("ReLU activation sparsity")
    for ax in (a1, a2, a3):
        ax.set_xlabel("layer")
    a2.legend(ncol=2, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16))
    a3.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16))
    fig.suptitle(f"Sparse × sparse, {model} / {profile}, batch 1")
    return _save(fig, path)


def plot_e2e(res: Results, path: Path) -> Path | None:
    recs = res.of("end_to_end")
    if not recs:
        return None
    plt = _plt()
    batches = sorted({r["params"]["batch"] for r in recs})
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 3.6), squeeze=False)
    idx = {
        (r["params"]["model"], r["params"]["profile"], r["params"]["batch"], r["params"]["impl"]): r
        for r in recs
    }
    models = list(dict.fromkeys((r["params"]["model"], r["params"]["profile"]) for r in recs))
    impls = list(dict.fromkeys(r["params"]["impl"] for r in recs))
    for ax, b in zip(axes[0], batches, strict=True):
        series = {}
        for impl in impls:
            vals = [median(idx.get((m, p, b, impl))) for m, p in models]
            series[impl] = [(v * 1e3 if b == 1 else b / v) if v else None for v in vals]
        _grouped_bars(ax, [f"{m}\n{p}" for m, p in models], series, log=b == 1)
        ax.set_xlabel("model / profile")
        ax.set_ylabel("latency (ms, log scale)" if b == 1 else "throughput (images/s)")
        ax.set_title(
            f"batch {b}: " + ("latency, lower is better" if b == 1 else "throughput, higher is better")
        )
        ax.legend()
    fig.suptitle("End to end: dense torch vs sparsified")
    return _save(fig, path)


# experiment -> [(file name, plot function)]
EXPERIMENT_PLOTS: dict[str, list[tuple[str, Any]]] = {
    "weight_sparsity": [("weight_sparsity.png", plot_weight_sparsity)],
    "conv_layers": [("conv_bytes.png", plot_layer_bytes), ("conv_times.png", plot_layer_times)],
    "fc_layers": [
        ("fc_bytes.png", lambda r, p: plot_layer_bytes(r, p, "fc_layers")),
        ("fc_times.png", lambda r, p: plot_layer_times(r, p, "fc_layers")),
    ],
    "sparsity_sweep": [("sweep.png", plot_sweep)],
    "memory_scaling": [("memory_scaling.png", plot_scaling)],
    "sparse_x_sparse": [("sparse_x_sparse.png", plot_spxsp)],
    "end_to_end": [("end_to_end.png", plot_e2e)],
}


def make_plots(res: Results, out_dir: str | Path) -> dict[str, list[Path]]:
    """Draw every plot the results allow; return experiment -> the PNG files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, list[Path]] = {}
    for experiment, plots in EXPERIMENT_PLOTS.items():
        for name, fn in plots:
            p = fn(res, out / name)
            if p is not None:
                written.setdefault(experiment, []).append(p)
    return written
