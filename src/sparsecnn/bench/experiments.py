"""The seven experiments of the seed study, and Deep Compression's storage, measured on this machine.

1. ``weight_sparsity``: weight sparsity per layer of each model / profile.
2. ``conv_layers``: per conv layer, the bytes of each format and the time of every strategy, the
   planner's choice and the peers, on the layer's real input; conversion time recorded apart.
3. ``fc_layers``: per FC layer at batch 1, GEMV vs SpMV (and the peers), then at the batches of
   ``fc_batches`` above 1, where the product is a GEMM (the ``spmm`` and ``direct`` forms).
4. ``sparsity_sweep``: the largest AlexNet conv layer with uniform random zeros from 0.5 to 0.995,
   every strategy and peer; the report interpolates each one's break-even sparsity.
5. ``memory_scaling``: weight matrices from 256x1200 to 25600x24000 at a fixed sparsity, dense vs
   sparse, peak RSS of a child process and time.
6. ``sparse_x_sparse``: activation sparsity after each ReLU on real inputs, then sparse x sparse vs
   dense GEMM vs CSRMM, time and operand memory per layer.
7. ``end_to_end``: latency (batch 1) and throughput (batch 32) of each model, dense vs sparsified.
8. ``compression``: Deep Compression's storage per layer and stage (dense, pruned CSR / relative
   index, + quantized, + Huffman) of AlexNet (deep-compression profile) and the trained LeNet-5,
   beside Han et al.'s tables; the quantized SpMV vs the float CSR spmv on AlexNet's fc6/fc7.

:func:`report_tasks` lists every measurement as a :class:`~sparsecnn.bench.harness.Task` up front
(so the progress bar knows the total and ``--resume`` can skip by key); the heavy setup (models,
inputs, sparsified copies) is built lazily and once, by :class:`_Context`.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sparsecnn.bench.harness import (
    Harness,
    Outcome,
    ResultsLog,
    Task,
    check_close,
    time_call,
    time_paired,
)
from sparsecnn.bench.placement import probe_cores, span_label
from sparsecnn.errors import SparseCNNError
from sparsecnn.models._memory import check_fits, forward_guard

__all__ = [
    "EXPERIMENTS",
    "ReportConfig",
    "bench_model",
    "layer_tasks",
    "report_tasks",
    "run_report",
    "sweep_tasks",
]

# Experiment names, in report order: (name, title).
EXPERIMENTS: tuple[tuple[str, str], ...] = (
    ("weight_sparsity", "Weight sparsity per layer"),
    ("conv_layers", "Conv layers: memory and time per strategy"),
    ("fc_layers", "FC layers: GEMV vs SpMV"),
    ("sparsity_sweep", "Sparsity sweep and break-even"),
    ("memory_scaling", "Memory scaling"),
    ("sparse_x_sparse", "Sparse x sparse"),
    ("end_to_end", "End to end"),
    ("compression", "Deep Compression: storage per stage"),
)

# Peers that are timed per layer (onnxruntime is added when installed and on the CPU).
LAYER_PEERS = ("torch-dense", "torch-csr", "scipy-csr", "onnxruntime")
# LeNet-5 on digits is pruned to this fraction of its weights (Han et al. report 92% for LeNet-5).
LENET_TARGET = 0.92
# Experiment 6: torch dense conv, the engine's GEMM, CSRMM and sparse x sparse, torch CSR x CSR (MKL).
SPXSP_IMPLS = ("torch-dense", "dense", "csrmm", "spgemm", "spconv-act", "torch-spgemm")
# Experiment 6: the weight-only strategies spconv-act is compared with (dense and csrmm are above).
SPXSP_WEIGHT_ONLY = ("dense", "csrmm", "direct", "lowered", "bsr")
# Experiment 6: activation-sparse FC: torch dense, weight-only CSR SpMV, SpMV over the nonzero inputs.
ACT_FC_IMPLS = ("torch-dense", "spmv", "spmv-act")
# Experiment 4: structured (ssl, shrunk) vs unstructured (ssl-unstructured) at the same zero count;
# "torch" is torch's dense conv of the layer as it is (the compact one, once shrunk).
STRUCTURE_PROFILES = ("ssl", "ssl-unstructured")
STRUCTURE_STRATEGIES = ("torch", "dense", "csrmm", "direct", "lowered", "bsr")


@dataclass(frozen=True)
class ReportConfig:
    """What ``sparsecnn report`` measures. Build one with :meth:`preset`."""

    size: str = "full"  # "full", "quick", or "tiny" (tests: a 67x67 AlexNet input, few points)
    device: str = "cpu"  # "cpu" or "cuda"
    threads: int | None = None  # None: every usable core
    seed: int = 0  # weights, random zeros and random inputs
    input: str = "digits"  # "digits" (scikit-learn's, resized) or "random"
    repeats: int = 7  # timed samples per measurement (median and IQR over them)
    max_task_s: float = 8.0  # stop sampling a measurement after this long (at least 3 samples)
    alexnet_input: int = 227  # AlexNet input size; tiny uses 67 to keep the layers' structure
    # ssl is structured (columns, filters); ssl-unstructured has the same zero count per layer
    profiles: tuple[str, ...] = ("deep-compression", "ssl", "ssl-unstructured")
    conv_layers: tuple[str, ...] | None = None  # conv layers of experiments 2 and 6 (None: all)
    sweep_sparsities: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995)
    scaling_sizes: tuple[tuple[int, int], ...] = ((256, 1200), (2560, 4800), (25600, 24000))
    scaling_skipped: tuple[tuple[int, int], ...] = ()  # sizes left out by this preset (the report says so)
    scaling_n: int = 64  # columns of the dense operand in the scaling products
    scaling_sparsity: float = 0.9
    scaling_impls: tuple[str, ...] = ("dense", "csr", "torch-csr")
    e2e_batches: tuple[int, ...] = (1, 32)
    fc_batches: tuple[int, ...] = (1, 32)  # experiment 3's batches (1: GEMV; above: GEMM)
    plan_measure: bool = True  # sparsify(..., "auto") times candidates (True) or uses the cost model
    plan_measure_max_batch: int = 32  # above this batch "auto" uses the cost model (timing is slow)
    onnx: bool = True  # time ONNX Runtime when installed
    lenet: bool = True  # include LeNet-5 trained and pruned on digits (when sparsecnn.prune exists)

    @classmethod
    def preset(cls, size: str = "full", **overrides: Any) -> ReportConfig:
        if size == "full":
            cfg = cls()
        elif size == "quick":
            cfg = cls(
                size="quick",
                repeats=5,
                max_task_s=2.0,
                sweep_sparsities=(0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.995),
                scaling_sizes=((256, 1200), (2560, 4800)),
                scaling_skipped=((25600, 24000),),
                scaling_impls=("dense", "csr"),
                plan_measure_max_batch=1,
            )
        elif size == "tiny":
            cfg = cls(
                size="tiny",
                repeats=3,
                max_task_s=0.3,
                profiles=("deep-compression",),
                conv_layers=("conv1", "conv3"),
                alexnet_input=67,
                sweep_sparsities=(0.5, 0.9, 0.99),
                scaling_sizes=((256, 1200),),
                scaling_skipped=((2560, 4800), (25600, 24000)),
                scaling_impls=("dense", "csr"),
                e2e_batches=(1, 2),
                fc_batches=(1, 4),
                plan_measure=False,
                onnx=False,
            )
        else:
            raise SparseCNNError(f"unknown report size {size!r}; use full, quick or tiny")
        return replace(cfg, **overrides)


# --------------------------------------------------------------------------------------------------
# lazily built shared state


def _digits_or_random(
    shape: tuple[int, int, int], batch: int, cfg: ReportConfig, standardise: bool = True
) -> tuple[torch.Tensor, str]:
    from sparsecnn.analysis._inputs import load_input

    if cfg.input == "digits":
        try:
            x = load_input("digits", shape, batch=batch)
            if not standardise:
                return x.contiguous(), "digits"
            # Normalise to zero mean, unit variance per image, as a trained network's inputs are.
            x = (x - x.mean(dim=(1, 2, 3), keepdim=True)) / x.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
            return x.contiguous(), "digits"
        except SparseCNNError:
            pass  # scikit-learn missing: fall back to random, and say so in the records
    return load_input("random", shape, batch=batch, seed=cfg.seed), "random"


class _Context:
    """Models, inputs and sparsified copies, built on first use and shared by the tasks."""

    def __init__(self, cfg: ReportConfig, out_dir: Path | None) -> None:
        self.cfg = cfg
        self.out_dir = out_dir
        self._cache: dict[Any, Any] = {}

    def _memo(self, key: Any, make: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    # models ---------------------------------------------------------------------------------------
    def model(self, name: str, profile: str) -> nn.Module:
        """The dense model with the profile applied (eval mode, on the CPU)."""
        return self._memo(("model", name, profile), lambda: self._make_model(name, profile))

    def _make_model(self, name: str, profile: str) -> nn.Module:
        from sparsecnn.models import apply_profile, build

        if name == "lenet5" and profile == "digits-pruned":
            model, meta = _trained_lenet(self.cfg, self.out_dir)
            self._cache[("train-meta", name, profile)] = meta
            return model
        kwargs = {"input_size": self.cfg.alexnet_input} if name == "alexnet" else {}
        model = build(name, seed=self.cfg.seed, **kwargs)
        apply_profile(model, profile)
        return model.eval()

    def input(self, name: str, profile: str, batch: int) -> tuple[torch.Tensor, str]:
        from sparsecnn.models import input_shape

        model = self.model(name, profile)
        # A trained model sees inputs as it was trained (digits in [0, 1]); a seeded-random one gets
        # them standardised, as a network's first layer usually does.
        trained = profile == "digits-pruned"
        return self._memo(
            ("input", name, batch),
            lambda: _digits_or_random(input_shape(model), batch, self.cfg, not trained),
        )

    def layer_io(self, name: str, profile: str, batch: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Each conv/linear layer's (input, dense output) on the model's real input batch."""
        return self._memo(
            ("io", name, profile, batch),
            lambda: _capture_io(self.model(name, profile), self.input(name, profile, batch)[0]),
        )

    def plan_measured(self, batch: int) -> bool:
        """Whether ``sparsify(..., "auto")`` times the candidates at this batch (else: cost model)."""
        return self.cfg.plan_measure and batch <= self.cfg.plan_measure_max_batch

    def sparse_model(self, name: str, profile: str, batch: int) -> tuple[nn.Module, float]:
        """``sparsify(model, "auto")`` planned on this batch, and the seconds it took."""

        def make() -> tuple[nn.Module, float]:
            from sparsecnn.layers import sparsify
            from sparsecnn.models import STRUCTURED_PROFILES

            plan_path = self.out_dir / "plans.json" if self.out_dir else None
            t0 = time.perf_counter()
            sm = sparsify(
                self.model(name, profile),
                "auto",
                measure=self.plan_measured(batch),
                example_input=self.input(name, profile, batch)[0],
                plan_path=plan_path,
                device=self.cfg.device,
                shrink=profile in STRUCTURED_PROFILES,  # remove SSL's zero filters physically
            )
            return sm, time.perf_counter() - t0

        return self._memo(("sparse", name, profile, batch), make)


@torch.no_grad()
def _layer_input(model: nn.Module, lname: str, x: torch.Tensor) -> torch.Tensor:
    """The input layer ``lname`` of ``model`` (any module, a sparse layer too) sees on ``x``."""
    seen: list[torch.Tensor] = []
    handle = model.get_submodule(lname).register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].clone()) if not seen else None)
    try:
        model(x)
    finally:
        handle.remove()
    return seen[0]


@torch.no_grad()
def _dense_reference(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The dense output of a sparse layer on ``x``, from the dense weights it computes with."""
    import torch.nn.functional as F

    w, b = layer.dense_parameters()
    wt, bt = torch.from_numpy(w), None if b is None else torch.from_numpy(b)
    if w.ndim == 2:
        return F.linear(x, wt, bt)
    return F.conv2d(x, wt, bt, layer.stride, layer.padding, layer.dilation, layer.groups)


@torch.no_grad()
def _capture_io(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(name: str, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        # Clone: a later in-place ReLU would otherwise rewrite the captured output.
        seen.setdefault(name, (args[0].clone(), out.clone()))

    handles = [
        m.register_forward_hook(lambda _m, args, out, n=n: hook(n, args, out))
        for n, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    try:
        with forward_guard(model, "use a smaller batch"):
            model(x)
    except (RuntimeError, MemoryError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SparseCNNError(
            f"the model failed on an input of shape {tuple(x.shape)} ({first}); check the model's input "
            f"shape, or use a smaller batch if it ran out of memory"
        ) from None
    finally:
        for h in handles:
            h.remove()
    return seen


def _trained_lenet(cfg: ReportConfig, out_dir: Path | None) -> tuple[nn.Module, dict[str, Any]]:
    """LeNet-5 trained on scikit-learn's digits, then magnitude-pruned and retrained, through the
    public API of :mod:`sparsecnn.train` and :mod:`sparsecnn.prune`; cached in ``out_dir`` so that a
    resumed report does not train again."""
    from sparsecnn import data, models, train
    from sparsecnn.prune import PruneConfig, prune_model

    splits = data.load("digits")
    info = splits.info
    model = models.build(
        "lenet5",
        num_classes=info.num_classes,
        in_channels=info.in_channels,
        input_size=info.input_size,
        seed=cfg.seed,
    )
    cache = out_dir / "lenet5-digits-pruned.pt" if out_dir else None
    meta_path = cache.with_suffix(".json") if cache else None
    if cache is not None and cache.exists() and meta_path is not None and meta_path.exists():
        model.load_state_dict(torch.load(cache, map_location="cpu", weights_only=True))
        return model.eval(), json.loads(meta_path.read_text(encoding="utf-8"))
    epochs = {"full": 20, "quick": 10, "tiny": 3}[cfg.size]
    tc = train.TrainConfig(epochs=epochs, progress=False, device="cpu", seed=cfg.seed)
    pc = PruneConfig(target=LENET_TARGET, retrain=replace(tc, epochs=max(1, epochs // 2), lr=0.01))
    threads = torch.get_num_threads()
    # One thread: LeNet-5's tiny GEMMs gain nothing from two, and on a busy 2-core machine OpenMP's
    # barriers made training ~25x slower with two (measured: 7 s vs 0.3 s per epoch).
    torch.set_num_threads(1)
    try:
        with torch.enable_grad():  # the report runs under no_grad
            dense = train.fit(model, splits.train, splits.test, tc)
            model, result = prune_model(model, splits.train, splits.test, pc)
    finally:
        torch.set_num_threads(threads)
    meta = {
        "dense_accuracy": dense.test_accuracy,
        "pruned_accuracy": result.accuracy_after_retraining,
        "target": LENET_TARGET,
        "method": "magnitude, iterative, retrained",
        "epochs": epochs,
    }
    if cache is not None and meta_path is not None:
        from sparsecnn._atomic import torch_save, write_text

        torch_save(model.state_dict(), cache)  # the meta last: the cache is used only when both exist
        write_text(meta_path, json.dumps(meta))
    return model.eval(), meta


def lenet_available(cfg: ReportConfig) -> bool:
    """LeNet-5 on digits needs the pruning stage and scikit-learn (for the data)."""
    if not cfg.lenet:
        return False
    try:
        import sklearn  # noqa: F401

        from sparsecnn.prune import PruneConfig, prune_model  # noqa: F401
    except ImportError:
        return False
    return True


def _models(cfg: ReportConfig) -> list[tuple[str, str]]:
    out = [("alexnet", p) for p in cfg.profiles]
    if lenet_available(cfg):
        out.append(("lenet5", "digits-pruned"))
    return out


# --------------------------------------------------------------------------------------------------
# measurement helpers


def _timed(
    fn: Callable[[], Any],
    ref: Any,
    cfg: ReportConfig,
    rtol: float = 1e-4,
    metrics: dict[str, Any] | None = None,
    baseline: Callable[[], Any] | None = None,
) -> Outcome:
    """Warm up and verify against ``ref`` (raising before any timing on a mismatch), then time. With
    ``baseline`` (the torch-dense call of the same input) the two are timed in alternating samples
    (:func:`~sparsecnn.bench.harness.time_paired`) and the metrics get ``baseline_s`` and
    ``paired_speedup`` (baseline median / this median)."""
    err = check_close(fn(), ref, rtol=rtol)  # the first call also compiles (JIT warm-up)
    sync = torch.cuda.synchronize if cfg.device.startswith("cuda") else None
    metrics = {**(metrics or {}), "max_rel_err": err}
    if baseline is None:
        timing = time_call(fn, repeats=cfg.repeats, warmup=1, max_total_s=cfg.max_task_s, sync=sync)
        return Outcome(metrics, timing)
    timing, base = time_paired(fn, baseline, repeats=cfg.repeats, warmup=1, max_total_s=2 * cfg.max_task_s,
                               sync=sync)
    metrics.update(baseline_s=base.median_s, paired_speedup=base.median_s / timing.median_s)
    return Outcome(metrics, timing)


def _dense_call(module: nn.Module, x: torch.Tensor, device: str) -> Callable[[], torch.Tensor]:
    """torch's own dense op of ``module`` on ``x`` (what the ``torch-dense`` peer times): the baseline
    that every other implementation of a layer is timed in alternation with (:func:`_timed`)."""
    m = module.eval().to(device)
    xd = x.to(device)
    return lambda: m(xd)


def _layer_kind(module: nn.Module) -> str:
    return "linear" if isinstance(module, nn.Linear) else "conv"


def _layers(model: nn.Module, kind: str) -> dict[str, nn.Module]:
    cls = nn.Linear if kind == "linear" else nn.Conv2d
    return {n: m for n, m in model.named_modules() if isinstance(m, cls)}


def _engine_layer(module: nn.Module, strategy: str, name: str, device: str) -> nn.Module:
    from sparsecnn.layers import SparseConv2d, SparseLinear

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a fallback to torch is not this strategy's time
        try:
            if isinstance(module, nn.Linear):
                return SparseLinear.from_dense(module, strategy, name=name, device=device)
            return SparseConv2d.from_dense(module, strategy, name=name, device=device)
        except UserWarning as w:
            raise SparseCNNError(f"{name}: {strategy} cannot run this layer ({w})") from None


def _strategy_task(
    experiment: str,
    params: dict[str, Any],
    module: Callable[[], nn.Module],
    name: str,
    strategy: str,
    io: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    cfg: ReportConfig,
    label: str,
    baseline: Callable[[], Callable[[], Any]] | None = None,
) -> Task:
    """Time ``strategy`` on the layer ``module()`` in alternation with torch dense: on the same layer
    and input, or what ``baseline()`` returns (the unshrunk layer of a shrunk one)."""

    def run() -> Outcome:
        x, ref = io()
        layer = _engine_layer(module(), strategy, name, cfg.device)
        xd = x.to(cfg.device)
        out = _timed(
            lambda: layer(xd),
            ref,
            cfg,
            metrics={"kind": "strategy", "conversion_s": layer.conversion_seconds, "ran": layer.strategy},
            baseline=baseline() if baseline is not None else _dense_call(module(), x, cfg.device),
        )
        # after the calls: a format that builds a run-time layout on first use (qspmv's sliced ELL)
        # counts it
        out.metrics["weight_nbytes"] = int(layer.weight_nbytes)
        return out

    return Task(experiment, {**params, "impl": strategy}, run, label)


def _peer_task(
    experiment: str,
    params: dict[str, Any],
    module: Callable[[], nn.Module],
    peer: str,
    io: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    cfg: ReportConfig,
    label: str,
) -> Task:
    def run() -> Outcome:
        from sparsecnn.bench.peers import conv_peers, linear_peers

        x, ref = io()
        m = module()
        make = linear_peers if isinstance(m, nn.Linear) else conv_peers
        t0 = time.perf_counter()
        peers = make(m, x, device=cfg.device, threads=torch.get_num_threads(), onnx=cfg.onnx, only=peer)
        conversion = time.perf_counter() - t0
        if peer not in peers:
            raise SparseCNNError(f"peer {peer} is not available here (device {cfg.device})")
        base = None if peer == "torch-dense" else _dense_call(m, x, cfg.device)
        return _timed(peers[peer], ref, cfg, metrics={"kind": "peer", "conversion_s": conversion},
                      baseline=base)

    return Task(experiment, {**params, "impl": peer}, run, label)


def _peer_names(cfg: ReportConfig) -> list[str]:
    from sparsecnn.bench.peers import have_onnxruntime

    names = ["torch-dense", "torch-csr"]
    if cfg.device == "cpu":
        names.append("scipy-csr")
        if cfg.onnx and have_onnxruntime():
            names.append("onnxruntime")
    return names


def _strategies(kind: str) -> list[str]:
    from sparsecnn.layers import strategies

    return [s for s in strategies(kind) if s != "torch"]  # torch is the torch-dense peer


def _bytes_task(experiment: str, params: dict[str, Any], module: Callable[[], nn.Module], label: str) -> Task:
    def run() -> Outcome:
        from sparsecnn.analysis.sparsity import weight_sparsity
        from sparsecnn.formats import conv_weight_nbytes

        m = module()
        groups = getattr(m, "groups", 1)
        w = m.weight.detach()
        sizes = {fmt: conv_weight_nbytes(w, groups, fmt) for fmt in ("dense", "csr", "bsr", "relative")}
        ws = weight_sparsity(w, groups)
        return Outcome(
            {
                "kind": "bytes",
                "bytes": sizes,
                "sparsity": ws.element,
                "shape": list(w.shape),
                "groups": groups,
                "csr_saving": sizes["dense"] / max(sizes["csr"], 1),
            }
        )

    return Task(experiment, {**params, "impl": "bytes"}, run, label)


def layer_tasks(
    ctx: _Context,
    experiment: str,
    name: str,
    profile: str,
    kind: str,
    batch: int,
    layers: Sequence[str] | None = None,
    planner: bool = True,
    weight_bytes: bool = True,
) -> list[Task]:
    """Bytes (with ``weight_bytes``: they do not depend on the batch), every strategy, the planner's
    choice and every peer, for each layer of ``kind``."""
    cfg = ctx.cfg
    model = ctx.model(name, profile)
    out: list[Task] = []
    for lname in layers or list(_layers(model, kind)):
        module = functools.partial(model.get_submodule, lname)
        io = functools.partial(lambda ln: ctx.layer_io(name, profile, batch)[ln], lname)
        base = {"model": name, "profile": profile, "layer": lname}
        timed = {**base, "batch": batch, "device": cfg.device}
        tag = f"{name}/{profile} {lname}"
        if weight_bytes:
            out.append(_bytes_task(experiment, base, module, f"{tag} bytes"))
        out += [
            _strategy_task(experiment, timed, module, lname, s, io, cfg, f"{tag} {s}")
            for s in _strategies(kind)
        ]
        out += [_peer_task(experiment, timed, module, p, io, cfg, f"{tag} {p}") for p in _peer_names(cfg)]
        if planner:
            out.append(_planner_task(ctx, experiment, timed, name, profile, lname, batch, f"{tag} auto"))
    return out


def _planner_task(
    ctx: _Context,
    experiment: str,
    params: dict[str, Any],
    name: str,
    profile: str,
    lname: str,
    batch: int,
    label: str,
) -> Task:
    def run() -> Outcome:
        sm, plan_s = ctx.sparse_model(name, profile, batch)
        layer = sm.get_submodule(lname)
        x, ref = ctx.layer_io(name, profile, batch)[lname]
        if getattr(sm, "sparsecnn_shrink", None) is not None:
            # a shrunk layer has fewer channels than the original: its own input, and its dense weights
            # as the reference
            x = _layer_input(sm, lname, ctx.input(name, profile, batch)[0])
            ref = _dense_reference(layer, x)
        xd = x.to(ctx.cfg.device)
        choice = getattr(layer, "strategy", "torch")
        plan = getattr(sm, "sparsecnn_plan", None)
        source = getattr(plan.layers.get(lname), "source", None) if plan is not None else None
        # the baseline: torch dense on the layer as pruned (unshrunk) and its own input
        base = _dense_call(ctx.model(name, profile).get_submodule(lname),
                           ctx.layer_io(name, profile, batch)[lname][0], ctx.cfg.device)
        return _timed(
            lambda: layer(xd),
            ref,
            ctx.cfg,
            metrics={
                "kind": "planner",
                "choice": choice,
                "source": source,
                "plan_s": plan_s,
                "measured": ctx.plan_measured(batch),
            },
            baseline=base,
        )

    return Task(experiment, {**params, "impl": "auto"}, run, label)


# --------------------------------------------------------------------------------------------------
# the experiments


def _weight_sparsity_tasks(ctx: _Context) -> list[Task]:
    out = []
    for name, profile in _models(ctx.cfg):

        def run(name: str = name, profile: str = profile) -> Outcome:
            from sparsecnn.analysis.sparsity import weight_sparsity
            from sparsecnn.models import get_profile, prunable_layers

            model = ctx.model(name, profile)
            target = get_profile(profile, model) if profile != "digits-pruned" else {}
            layers = []
            for lname, m in prunable_layers(model).items():
                ws = weight_sparsity(m.weight, getattr(m, "groups", 1))
                layers.append(
                    {
                        "layer": lname,
                        "kind": _layer_kind(m),
                        "shape": list(m.weight.shape),
                        "numel": m.weight.numel(),
                        "nnz": int(torch.count_nonzero(m.weight)),
                        "sparsity": ws.element,
                        "filter_sparsity": ws.filter,
                        "kernel_shape_sparsity": ws.kernel_shape,
                        "target": target.get(lname),
                    }
                )
            training = ctx._cache.get(("train-meta", name, profile))
            return Outcome({"layers": layers, "training": training})

        out.append(
            Task("weight_sparsity", {"model": name, "profile": profile}, run, f"{name}/{profile} weights")
        )
    return out


def _conv_tasks(ctx: _Context) -> list[Task]:
    return [
        t
        for name, profile in _models(ctx.cfg)
        for t in layer_tasks(ctx, "conv_layers", name, profile, "conv", 1, _subset(ctx, name, profile))
    ]


def _subset(ctx: _Context, name: str, profile: str) -> list[str] | None:
    """The configured conv layers that this model has (None: all of them)."""
    if ctx.cfg.conv_layers is None:
        return None
    have = _layers(ctx.model(name, profile), "conv")
    return [n for n in ctx.cfg.conv_layers if n in have] or None


def _fc_tasks(ctx: _Context) -> list[Task]:
    # Only profiles that prune the FC layers (SSL as quoted by the seed prunes conv layers only).
    out = []
    for name, profile in _models(ctx.cfg):
        model = ctx.model(name, profile)
        fcs = _layers(model, "linear")
        if all(float((m.weight == 0).float().mean()) < 0.01 for m in fcs.values()):
            continue
        for i, batch in enumerate(ctx.cfg.fc_batches):
            out += layer_tasks(ctx, "fc_layers", name, profile, "linear", batch, weight_bytes=i == 0)
    return out


def _largest_conv(model: nn.Module) -> str:
    convs = _layers(model, "conv")
    return max(convs, key=lambda n: convs[n].weight.numel())


def sweep_tasks(
    ctx: _Context, experiment: str, name: str, layer: str | None, sparsities: Sequence[float], batch: int = 1
) -> list[Task]:
    """Every strategy and peer on one layer with a fraction ``s`` of random zeros, for each ``s``."""
    cfg = ctx.cfg
    model = ctx.model(name, "uniform:0")
    lname = layer or _largest_conv(model)
    convs = {**_layers(model, "conv"), **_layers(model, "linear")}
    if lname not in convs:
        raise SparseCNNError(f"{name} has no conv/linear layer {lname!r}; its layers: {', '.join(convs)}")
    kind = _layer_kind(convs[lname])
    out: list[Task] = []
    for s in sparsities:
        if not 0.0 <= s <= 1.0:
            raise SparseCNNError(f"sparsity {s} is outside [0, 1]")

        def module(s: float = s) -> nn.Module:
            return ctx._memo(("swept", name, lname, s), lambda: _random_zeros(convs[lname], s, cfg.seed))

        def io(s: float = s) -> tuple[torch.Tensor, torch.Tensor]:
            x = ctx.layer_io(name, "uniform:0", batch)[lname][0]
            with torch.no_grad():
                return x, module(s)(x)

        params = {"model": name, "layer": lname, "sparsity": float(s), "batch": batch, "device": cfg.device}
        tag = f"{lname} s={s:g}"
        out += [
            _strategy_task(experiment, params, module, lname, st, io, cfg, f"{tag} {st}")
            for st in _strategies(kind)
        ]
        out += [
            _peer_task(experiment, params, module, p, io, cfg, f"{tag} {p}")
            for p in _peer_names(cfg)
            if p != "onnxruntime"
        ]  # a dense peer does not see sparsity
    return out


def _random_zeros(module: nn.Module, sparsity: float, seed: int) -> nn.Module:
    """A copy of ``module`` with exactly ``round(s * numel)`` weights zeroed at random positions."""
    import copy

    m = copy.deepcopy(module).eval()
    with torch.no_grad():
        flat = m.weight.view(-1)
        k = round(sparsity * flat.numel())
        g = torch.Generator().manual_seed(seed + 1)
        flat[torch.randperm(flat.numel(), generator=g)[:k]] = 0.0
    return m


def _sweep_report_tasks(ctx: _Context) -> list[Task]:
    return [*sweep_tasks(ctx, "sparsity_sweep", "alexnet", None, ctx.cfg.sweep_sparsities),
            *_structure_tasks(ctx)]


def _shrunk(ctx: _Context, name: str, profile: str) -> nn.Module:
    """``sparsecnn.shrink.shrink`` of the model on its own input: removed filters and channels gone."""

    def make() -> nn.Module:
        from sparsecnn.shrink import shrink

        return shrink(ctx.model(name, profile), ctx.input(name, profile, 1)[0]).model

    return ctx._memo(("shrunk", name, profile), make)


def _structure_tasks(ctx: _Context) -> list[Task]:
    """Per AlexNet conv layer: the structured ``ssl`` profile shrunk (compact layers on their own
    inputs) and ``ssl-unstructured`` (the same zero fraction per layer, scattered), each with torch
    dense on the layer as pruned (the baseline), every weight-only strategy, and its compact GEMM."""
    cfg = ctx.cfg
    name = "alexnet"
    out: list[Task] = []
    for profile in STRUCTURE_PROFILES:
        structured = profile == "ssl"
        for lname in _subset(ctx, name, profile) or list(_layers(ctx.model(name, profile), "conv")):
            full = functools.partial(lambda ln, p: ctx.model(name, p).get_submodule(ln), lname, profile)
            full_io = functools.partial(lambda ln, p: ctx.layer_io(name, p, 1)[ln], lname, profile)
            if structured:
                module = functools.partial(lambda ln: _shrunk(ctx, name, "ssl").get_submodule(ln), lname)

                def io(lname: str = lname) -> tuple[torch.Tensor, torch.Tensor]:
                    def make() -> tuple[torch.Tensor, torch.Tensor]:
                        small = _shrunk(ctx, name, "ssl")
                        x = _layer_input(small, lname, ctx.input(name, "ssl", 1)[0])
                        return x, _dense_reference_module(small.get_submodule(lname), x)

                    return ctx._memo(("shrunk-io", lname), make)
            else:
                module, io = full, full_io
            params = {"model": name, "profile": profile, "layer": lname, "batch": 1, "device": cfg.device}
            tag = f"{name}/{profile} {lname}"
            out.append(Task("sparsity_sweep", {**params, "impl": "structure"},
                            functools.partial(_structure_run, full, full_io, module, io, structured),
                            f"{tag} structure"))
            out.append(_peer_task("sparsity_sweep", params, full, "torch-dense", full_io, cfg,
                                  f"{tag} torch-dense"))
            # each paired with torch dense on the layer as pruned, the structure table's baseline
            base = functools.partial(lambda f, fio: _dense_call(f(), fio()[0], cfg.device), full, full_io)
            out += [
                _strategy_task("sparsity_sweep", params, module, lname, st, io, cfg,
                               f"{tag}{' shrunk' if structured else ''} {st}", baseline=base)
                for st in STRUCTURE_STRATEGIES
            ]
    return out


@torch.no_grad()
def _dense_reference_module(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return conv(x)


def _structure_run(
    full: Callable[[], nn.Module],
    full_io: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    module: Callable[[], nn.Module],
    io: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    structured: bool,
) -> Outcome:
    from sparsecnn.analysis.costs import compact_gemm

    conv, small = full(), module()
    ref_full, ref_small = full_io()[1], io()[1]
    gf = compact_gemm(conv, tuple(ref_full.shape))
    g = compact_gemm(small, tuple(ref_small.shape), gf.dense_flops)
    nnz = int(torch.count_nonzero(conv.weight))
    return Outcome({
        "kind": "structure",
        "structured": structured,
        "shrunk": structured,
        "zeros": 1.0 - nnz / conv.weight.numel(),
        "nnz": nnz,
        "filters": [int(small.out_channels), int(conv.out_channels)],
        "in_channels": [int(small.in_channels), int(conv.in_channels)],
        # kept rows / columns of the (shrunk) layer's lowered weight, of the unshrunk layer's
        "rows": [g.rows, gf.total_rows],
        "cols": [g.cols, gf.total_cols],
        "dense_flops": g.dense_flops,
        "compact_flops": g.compact_flops,
        "nonzero_flops": g.nonzero_flops,
        "ideal": g.ideal,
        "nonzero_ideal": g.nonzero_ideal,
    })


def _scaling_tasks(ctx: _Context) -> list[Task]:
    cfg = ctx.cfg
    out = []
    for m, k in cfg.scaling_sizes:
        for impl in cfg.scaling_impls:
            spec = {
                "m": m,
                "k": k,
                "n": cfg.scaling_n,
                "sparsity": cfg.scaling_sparsity,
                "impl": impl,
                "device": cfg.device,
            }

            def run(spec: dict[str, Any] = spec) -> Outcome:
                return _run_memprobe(
                    {
                        **spec,
                        "seed": cfg.seed,
                        "threads": torch.get_num_threads(),
                        "repeats": cfg.repeats,
                        "max_total_s": max(cfg.max_task_s, 2.0),
                    }
                )

            out.append(Task("memory_scaling", spec, run, f"{m}x{k} {impl}"))
    return out


def _run_memprobe(spec: dict[str, Any]) -> Outcome:
    """Run one memory probe in a child process; its peak RSS comes from ``os.wait4``."""
    from sparsecnn.bench.harness import Timing

    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sparsecnn.bench._memprobe", json.dumps(spec)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    stdout, stderr = proc.stdout.read(), proc.stderr.read()  # type: ignore[union-attr]
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    proc.stdout.close()  # type: ignore[union-attr]
    proc.stderr.close()  # type: ignore[union-attr]
    lines = stdout.decode(errors="replace").strip().splitlines()
    try:
        result = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        tail = stderr.decode(errors="replace").strip().splitlines()[-3:]
        raise SparseCNNError(f"memory probe died (exit {proc.returncode}): {' | '.join(tail)}") from None
    if "error" in result:
        raise SparseCNNError(result["error"])
    # The child's own VmHWM; wait4's ru_maxrss includes the forked parent's mark (kept across exec).
    peak = int(result.get("peak_rss_self_bytes") or usage.ru_maxrss * 1024)  # ru_maxrss: KiB on Linux
    t = result.pop("timing")
    timing = Timing(**{k: v for k, v in t.items() if k != "iqr_s"})
    return Outcome(
        {**result, "peak_rss_bytes": peak, "matrix_rss_bytes": peak - result["baseline_rss_bytes"]}, timing
    )


def _spxsp_tasks(ctx: _Context) -> list[Task]:
    cfg = ctx.cfg
    out = []
    for name, profile in _models(cfg)[:1] + [m for m in _models(cfg) if m[0] == "lenet5"]:
        model = ctx.model(name, profile)
        convs = list(_layers(model, "conv"))[1:]  # conv1 sees the image, not a ReLU output
        if cfg.conv_layers is not None:
            convs = [c for c in convs if c in cfg.conv_layers] or convs[:1]
        for lname in convs:
            base = {"model": name, "profile": profile, "layer": lname, "batch": 1, "device": cfg.device}
            tag = f"{name}/{profile} {lname}"
            out.append(
                Task(
                    "sparse_x_sparse",
                    {**base, "impl": "activation"},
                    functools.partial(_activation_run, ctx, name, profile, lname),
                    f"{tag} activation",
                )
            )
            out.extend(
                Task(
                    "sparse_x_sparse",
                    {**base, "impl": impl},
                    functools.partial(_spxsp_run, ctx, name, profile, lname, impl),
                    f"{tag} {impl}",
                )
                for impl in dict.fromkeys((*SPXSP_IMPLS, *SPXSP_WEIGHT_ONLY))
            )
    out += _act_fc_tasks(ctx)
    return out


def _act_fc_tasks(ctx: _Context) -> list[Task]:
    """AlexNet's FC layers (deep-compression) at batch 1 on their real, ReLU-sparse inputs: the
    weight-only ``spmv`` against ``spmv-act`` (walks only the nonzero inputs) and torch dense."""
    cfg = ctx.cfg
    name, profile = "alexnet", "deep-compression"
    out: list[Task] = []
    for lname in _layers(ctx.model(name, profile), "linear"):
        module = functools.partial(lambda ln: ctx.model(name, profile).get_submodule(ln), lname)
        io = functools.partial(lambda ln: ctx.layer_io(name, profile, 1)[ln], lname)
        base = {"model": name, "profile": profile, "layer": lname, "op": "linear", "batch": 1,
                "device": cfg.device}
        tag = f"{name}/{profile} {lname}"

        def activation(module: Callable[[], nn.Module] = module,
                       io: Callable[[], tuple[torch.Tensor, torch.Tensor]] = io) -> Outcome:
            x = io()[0]
            w = module().weight
            return Outcome({
                "kind": "activation",
                "input_sparsity": float((x == 0).float().mean()),
                "weight_sparsity": float((w == 0).float().mean()),
                "input": ctx.input(name, profile, 1)[1],
                "input_shape": list(x.shape),
            })

        out.append(Task("sparse_x_sparse", {**base, "impl": "activation"}, activation, f"{tag} activation"))
        out.append(_peer_task("sparse_x_sparse", base, module, "torch-dense", io, cfg, f"{tag} torch-dense"))
        out += [_strategy_task("sparse_x_sparse", base, module, lname, s, io, cfg, f"{tag} {s}")
                for s in ACT_FC_IMPLS[1:]]
    return out


def _activation_run(ctx: _Context, name: str, profile: str, lname: str) -> Outcome:
    from sparsecnn.ops import im2col

    x, _ = ctx.layer_io(name, profile, 1)[lname]
    conv = ctx.model(name, profile).get_submodule(lname)
    cols = im2col(x, conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups)
    source = ctx.input(name, profile, 1)[1]
    return Outcome(
        {
            "kind": "activation",
            "input_sparsity": float((x == 0).float().mean()),
            "lowered_sparsity": float((cols == 0).mean()),
            "weight_sparsity": float((conv.weight == 0).float().mean()),
            "input": source,
            "input_shape": list(x.shape),
            "lowered_shape": list(cols.shape),
        }
    )


def _operand_bytes(conv: nn.Conv2d, x: torch.Tensor, impl: str) -> dict[str, int]:
    """Bytes of the two operands of the lowered product as ``impl`` stores them (output excluded: the
    same dense output for every implementation)."""
    from sparsecnn.formats import CSRMatrix, conv_weight_nbytes
    from sparsecnn.ops import im2col

    cols = im2col(x, conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups)
    w = conv.weight.detach()
    if impl == "spconv-act":  # what it holds: the tiled weight rows, and its position and pixel lists
        from sparsecnn.kernels.spconv_input import input_list_nbytes, prepare_spconv

        prep = prepare_spconv(w.cpu().numpy(), conv.groups)
        return {"weight": prep.nbytes,  # cols is (B, groups, K, output pixels)
                "input": input_list_nbytes(prep, x.shape[0], tuple(x.shape[2:]), (cols.shape[3], 1),
                                           (*conv.kernel_size, *conv.stride, *conv.padding, *conv.dilation))}
    if impl in ("torch-dense", "dense"):
        return {"weight": conv_weight_nbytes(w, conv.groups, "dense"), "input": int(cols.nbytes)}
    if impl in ("direct", "lowered", "bsr"):  # the weights as the strategy stores them (added below)
        return {"weight": 0, "input": int(x.nbytes if impl == "direct" else cols.nbytes)}
    weight = conv_weight_nbytes(w, conv.groups, "csr")
    if impl == "csrmm":
        return {"weight": weight, "input": int(cols.nbytes)}
    lowered = sum(
        CSRMatrix.from_dense(cols[b, g]).nbytes for b in range(cols.shape[0]) for g in range(cols.shape[1])
    )
    if impl == "torch-spgemm":  # torch's CSR: int64 indices and pointers
        nnz_w = int(torch.count_nonzero(w))
        nnz_c = int(np.count_nonzero(cols))
        rows = w.shape[0] + cols.shape[0] * cols.shape[1] * cols.shape[2]
        return {
            "weight": nnz_w * 12 + (w.shape[0] + conv.groups) * 8,
            "input": nnz_c * 12 + (rows + cols.shape[1]) * 8,
        }
    return {"weight": weight, "input": int(lowered)}


def _spxsp_run(ctx: _Context, name: str, profile: str, lname: str, impl: str) -> Outcome:
    cfg = ctx.cfg
    x, ref = ctx.layer_io(name, profile, 1)[lname]
    conv = ctx.model(name, profile).get_submodule(lname)
    mem = _operand_bytes(conv, x, impl)
    metrics = {
        "kind": "spxsp",
        "operand_bytes": mem["weight"] + mem["input"],
        "weight_bytes": mem["weight"],
        "input_bytes": mem["input"],
    }
    if impl == "torch-dense":
        return _timed(lambda: conv(x), ref, cfg, metrics=metrics)
    base = _dense_call(conv, x, cfg.device)
    if impl == "torch-spgemm":
        fn = _torch_spgemm(conv, x)
        return _timed(fn, ref, cfg, metrics=metrics, baseline=base)
    layer = _engine_layer(conv, impl, lname, cfg.device)
    metrics["conversion_s"] = layer.conversion_seconds
    if impl in ("direct", "lowered", "bsr"):
        metrics["weight_bytes"] = int(layer.weight_nbytes)
        metrics["operand_bytes"] = metrics["weight_bytes"] + metrics["input_bytes"]
    return _timed(lambda: layer(x), ref, cfg, metrics=metrics, baseline=base)


def _torch_spgemm(conv: nn.Conv2d, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """torch sparse CSR x sparse CSR (MKL) on the lowered input, batch 1; the input's conversion to
    CSR is inside the timed call, as it is for the engine's spgemm."""
    import torch.nn.functional as F

    g = conv.groups
    cout = conv.out_channels
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w_csr = [wg.reshape(cout // g, -1).to_sparse_csr() for wg in conv.weight.detach().chunk(g, 0)]
    out_shape = conv(x).shape
    bias = conv.bias.detach().view(1, -1, 1, 1) if conv.bias is not None else 0.0

    def run() -> torch.Tensor:
        cols = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)[0]
        k = cols.shape[0] // g
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            parts = [(w_csr[i] @ cols[i * k : (i + 1) * k].to_sparse_csr()).to_dense() for i in range(g)]
        return torch.cat(parts, 0).reshape(out_shape) + bias

    return run


def _e2e_tasks(ctx: _Context) -> list[Task]:
    cfg = ctx.cfg
    out = []
    impls = ["torch-dense", "sparsecnn", "sparsecnn-compiled"] if cfg.device == "cpu" else ["torch-dense",
                                                                                          "sparsecnn"]
    from sparsecnn.bench.peers import have_onnxruntime

    if cfg.device == "cpu" and cfg.onnx and have_onnxruntime():
        impls.append("onnxruntime")
    for name, profile in _models(cfg):
        for batch in cfg.e2e_batches:
            for impl in impls:
                params = {
                    "model": name,
                    "profile": profile,
                    "batch": batch,
                    "impl": impl,
                    "device": cfg.device,
                }
                out.append(
                    Task(
                        "end_to_end",
                        params,
                        functools.partial(_e2e_run, ctx, name, profile, batch, impl),
                        f"{name}/{profile} b{batch} {impl}",
                    )
                )
    return out


def _e2e_run(ctx: _Context, name: str, profile: str, batch: int, impl: str) -> Outcome:
    cfg = ctx.cfg
    model = ctx.model(name, profile).to(cfg.device)
    x, source = ctx.input(name, profile, batch)
    x = x.to(cfg.device)
    with torch.no_grad():
        ref = model(x)
    metrics: dict[str, Any] = {"input": source}
    if impl == "torch-dense":
        fn: Callable[[], Any] = lambda: model(x)  # noqa: E731
    elif impl == "onnxruntime":
        from sparsecnn.bench.peers import model_peers

        fn = model_peers(model, x, threads=torch.get_num_threads())["onnxruntime"]
    elif impl == "sparsecnn-compiled":
        from sparsecnn.engine import compile as compile_model

        plan_path = ctx.out_dir / "plans.json" if ctx.out_dir else None
        t0 = time.perf_counter()
        from sparsecnn.models import STRUCTURED_PROFILES

        # the cost model plans large batches; each layer is still re-timed against torch (tune)
        cm = ctx._memo(("compiled", name, profile, batch), lambda: compile_model(
            model, x, "auto", measure=ctx.plan_measured(batch), plan_path=plan_path, tune=True,
            shrink=profile in STRUCTURED_PROFILES))
        metrics["plan_s"] = time.perf_counter() - t0
        metrics["strategies"] = dict(cm.plan)
        fn = lambda: cm(x)  # noqa: E731
    else:
        sm, plan_s = ctx.sparse_model(name, profile, batch)
        metrics["plan_s"] = plan_s
        metrics["plan_measured"] = ctx.plan_measured(batch)
        metrics["strategies"] = {n: m.strategy for n, m in sm.named_modules() if hasattr(m, "strategy")}
        fn = lambda: sm(x)  # noqa: E731
    before = probe_cores() if cfg.device == "cpu" else None
    # every engine but torch dense itself is timed in alternation with torch dense (the speedup column)
    baseline = None if impl == "torch-dense" else (lambda: model(x))
    outcome = _timed(fn, ref, cfg, rtol=1e-3, metrics=metrics, baseline=baseline)
    if before is not None:  # the two cores' placement around the timing (near / far; see bench.placement)
        outcome.metrics["cores"] = span_label(before, probe_cores())
    med = outcome.timing.median_s if outcome.timing else float("nan")
    outcome.metrics["images_per_s"] = batch / med
    outcome.metrics["latency_s"] = med
    return outcome


# Experiment 8: Deep Compression. Gap widths of the paper (4 bits for AlexNet, 5 for LeNet-5); the
# layers whose quantized SpMV is timed against the float CSR spmv (the fc6/fc7 at 91%).
COMPRESSION_INDEX_BITS = {"alexnet": 4, "lenet5": 5}
QSPMV_LAYERS = ("fc6", "fc7")


def _compression_models(cfg: ReportConfig) -> list[tuple[str, str]]:
    out = [("alexnet", "deep-compression")]
    if lenet_available(cfg):
        out.append(("lenet5", "digits-pruned"))
    return out


def _quantized(ctx: _Context, name: str, profile: str) -> tuple[Any, nn.Module]:
    """A quantized copy (8-bit conv / 5-bit FC codebooks) of the model and its storage report."""

    def make() -> tuple[Any, nn.Module]:
        import copy

        from sparsecnn.compress import compression_report

        work = copy.deepcopy(ctx.model(name, profile))
        report, _ = compression_report(work, COMPRESSION_INDEX_BITS[name], paper=name)
        return report, work.eval()

    return ctx._memo(("quantized", name, profile), make)


def _compression_tasks(ctx: _Context) -> list[Task]:
    """Storage per stage (the analysis of ``sparsecnn analyze --compression``) per model, and the
    codebook-index SpMV against the float CSR spmv on AlexNet's quantized fc6/fc7 at batch 1."""
    cfg = ctx.cfg
    out = []
    for name, profile in _compression_models(cfg):

        def run(name: str = name, profile: str = profile) -> Outcome:
            report, qmodel = _quantized(ctx, name, profile)
            metrics: dict[str, Any] = {
                "kind": "storage",
                "paper": report.paper,
                "index_bits": COMPRESSION_INDEX_BITS[name],
                "rows": report.rows(),
                "ratio": report.ratio,
            }
            if profile == "digits-pruned":  # a trained model: the accuracy that quantization keeps
                from sparsecnn import data, train

                meta = ctx._cache.get(("train-meta", name, profile)) or {}
                metrics["accuracy"] = {
                    "dense": meta.get("dense_accuracy"),
                    "pruned": meta.get("pruned_accuracy"),
                    "quantized": train.evaluate(qmodel, data.load("digits").test),
                }
            return Outcome(metrics)

        out.append(Task("compression", {"model": name, "profile": profile, "impl": "storage"}, run,
                        f"{name}/{profile} storage"))
    name, profile = "alexnet", "deep-compression"
    for lname in QSPMV_LAYERS:

        def module(lname: str = lname) -> nn.Module:
            return _quantized(ctx, name, profile)[1].get_submodule(lname)

        def io(lname: str = lname) -> tuple[torch.Tensor, torch.Tensor]:
            def make() -> tuple[torch.Tensor, torch.Tensor]:
                x = ctx.layer_io(name, profile, 1)[lname][0]
                return x, module(lname)(x)  # the quantized layer's own output is the reference

            return ctx._memo(("quantized-io", lname), make)

        params = {"model": name, "profile": profile, "layer": lname, "batch": 1, "device": cfg.device}
        out += [
            _strategy_task("compression", params, module, lname, s, io, cfg, f"{name} {lname} quantized {s}")
            for s in ("qspmv", "spmv")
        ]
    return out


_PLANNERS: dict[str, Callable[[_Context], list[Task]]] = {
    "weight_sparsity": _weight_sparsity_tasks,
    "conv_layers": _conv_tasks,
    "fc_layers": _fc_tasks,
    "sparsity_sweep": _sweep_report_tasks,
    "memory_scaling": _scaling_tasks,
    "sparse_x_sparse": _spxsp_tasks,
    "end_to_end": _e2e_tasks,
    "compression": _compression_tasks,
}


def report_tasks(ctx: _Context, only: Sequence[str] | None = None) -> list[Task]:
    """Every measurement of the report, in report order."""
    names = [n for n, _ in EXPERIMENTS if only is None or n in only]
    return [t for n in names for t in _PLANNERS[n](ctx)]


@dataclass
class RunSummary:
    """What :func:`run_report` did."""

    report: Path
    results: Path
    measured: int = 0
    skipped: int = 0
    errors: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def run_report(
    cfg: ReportConfig,
    out_dir: str | os.PathLike[str],
    *,
    resume: bool = False,
    progress: bool = True,
    only: Sequence[str] | None = None,
) -> RunSummary:
    """Run the experiments, append every measurement to ``out_dir/results.jsonl``, write the report.

    Parameters
    ----------
    cfg : ReportConfig
    out_dir : path-like
        Gets ``results.jsonl``, ``report.html``, ``*.png`` and ``plans.json`` (the planner's cache).
    resume : bool
        Keep ``results.jsonl`` and skip the measurements already in it.
    only : sequence of str, optional
        Experiment names to run (default: all eight).
    """
    from sparsecnn.report.html import write_report

    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise SparseCNNError("--device cuda: torch sees no CUDA device here; use --device cpu")
    out = Path(out_dir)
    t0 = time.perf_counter()
    log = ResultsLog(out / "results.jsonl", resume=resume)
    before = len(log.measurements())
    harness = Harness(log, threads=cfg.threads, device=cfg.device, progress=progress)
    ctx = _Context(cfg, out)
    with torch.no_grad():
        tasks = report_tasks(ctx, only)
        records = harness.run(tasks, title="sparsecnn report")
    _write_config(out, cfg)
    report = write_report(out)
    fresh = len(log.measurements()) - before
    return RunSummary(
        report=report,
        results=log.path,
        measured=fresh,
        skipped=len(tasks) - fresh,
        errors=sum(r["status"] == "error" for r in records),
        seconds=time.perf_counter() - t0,
    )


def _write_config(out: Path, cfg: ReportConfig) -> None:
    """The configuration beside the results, for the report's notes (what --quick left out)."""
    from dataclasses import asdict

    from sparsecnn._atomic import write_text

    write_text(out / "config.json", json.dumps(asdict(cfg), indent=1))


def bench_model(
    model: nn.Module,
    name: str,
    *,
    batch: int = 1,
    device: str = "cpu",
    threads: int | None = None,
    repeats: int = 7,
    progress: bool = True,
    results: str | os.PathLike[str] | None = None,
    resume: bool = False,
) -> list[dict[str, Any]]:
    """Time every strategy and peer on every conv/linear layer of ``model`` (its weights as they are).

    Returns the measurement records (the schema of ``results.jsonl``). ``results`` keeps them in a
    JSONL file as well, each appended as it is measured, so an interrupted run keeps what it measured;
    with ``resume`` the records already in that file are reused instead of measured again.
    """
    import tempfile

    cfg = ReportConfig.preset("full", device=device, threads=threads, repeats=repeats)
    ctx = _Context(cfg, None)
    ctx._cache[("model", name, "given")] = model.eval()
    with torch.no_grad():
        # Run the model once before the results file is opened: an input too big for memory or a
        # model that fails on its input is one error, not one error record per layer and strategy.
        ctx.layer_io(name, "given", batch)
        tasks = [
            t
            for kind in ("conv", "linear")
            for t in layer_tasks(ctx, "bench", name, "given", kind, batch, planner=False)
        ]
        with tempfile.TemporaryDirectory() as tmp:
            log = ResultsLog(Path(results) if results else Path(tmp) / "results.jsonl", resume=resume)
            harness = Harness(log, threads=threads, device=device, progress=progress)
            return harness.run(tasks, title=f"bench {name}")


def run_sweep(
    *,
    layer: str | None = None,
    shape: tuple[int, int, int] | None = None,
    sparsities: Sequence[float],
    batch: int = 1,
    device: str = "cpu",
    threads: int | None = None,
    repeats: int = 5,
    progress: bool = True,
    seed: int = 0,
    results: str | os.PathLike[str] | None = None,
    resume: bool = False,
) -> list[dict[str, Any]]:
    """The sparsity sweep of ``sparsecnn sweep``: a zoo layer (``"alexnet.conv3"``) or a matrix shape.

    Returns the measurement records; break-even points come from
    :func:`sparsecnn.report.tables.break_even`. ``results`` and ``resume`` as in :func:`bench_model`.
    """
    import tempfile

    cfg = ReportConfig.preset(
        "full", device=device, threads=threads, repeats=repeats, seed=seed, max_task_s=4.0
    )
    ctx = _Context(cfg, None)
    with torch.no_grad():
        # Everything that can fail on bad input happens before the results file is opened, so a typo
        # does not replace the results of an earlier run.
        if shape is not None:
            m, k, n = shape
            # A (float32 and its float64 reference copy), B, the reference and the output.
            need = 12 * m * k + 4 * k * n + 12 * m * n
            check_fits(need, f"the {m}x{k}x{n} product", "use a smaller --shape")
            tasks = matrix_sweep_tasks(cfg, shape, sparsities)
        else:
            model_name, _, lname = (layer or "alexnet.conv3").partition(".")
            from sparsecnn.models import names

            if model_name not in names():
                raise SparseCNNError(
                    f"--layer {layer!r}: unknown model {model_name!r}; one of {', '.join(names())}"
                )
            tasks = sweep_tasks(ctx, "sweep", model_name, lname or None, sparsities, batch)
            ctx.layer_io(model_name, "uniform:0", batch)  # fails once here, not once per task
        with tempfile.TemporaryDirectory() as tmp:
            log = ResultsLog(Path(results) if results else Path(tmp) / "results.jsonl", resume=resume)
            harness = Harness(log, threads=threads, device=device, progress=progress)
            return harness.run(tasks, title="sweep")


def _dense_product(a: np.ndarray, b: np.ndarray, device: str) -> Callable[[], torch.Tensor]:
    """``A @ B`` by torch's dense matmul (the ``torch-dense`` peer of :func:`matrix_sweep_tasks`)."""
    at, bt = torch.from_numpy(a).to(device), torch.from_numpy(b).to(device)
    return lambda: at @ bt


def matrix_sweep_tasks(
    cfg: ReportConfig, shape: tuple[int, int, int], sparsities: Sequence[float]
) -> list[Task]:
    """``A (M x K) @ B (K x N)`` with random zeros in ``A``: torch dense, the engine's CSR and BSR
    kernels (``ops.csr_matmul``, ``ops.bsr_matmul``) and the peers."""
    from sparsecnn.bench.peers import matrix_peers
    from sparsecnn.formats import BSRMatrix, CSRMatrix
    from sparsecnn.ops import bsr_matmul, csr_matmul

    m, k, n = shape
    rng = np.random.default_rng(cfg.seed)
    b = rng.standard_normal((k, n), dtype=np.float32)
    tasks = []
    for s in sparsities:
        if not 0.0 <= s <= 1.0:
            raise SparseCNNError(f"sparsity {s} is outside [0, 1]")

        @functools.cache
        def a_of(s: float = s) -> np.ndarray:
            a = np.random.default_rng(cfg.seed + 1).standard_normal((m, k), dtype=np.float32)
            a.reshape(-1)[np.random.default_rng(cfg.seed + 2).permutation(m * k)[: round(s * m * k)]] = 0.0
            return a

        @functools.cache
        def ref_of(s: float = s) -> np.ndarray:
            return a_of(s).astype(np.float64) @ b

        params = {"shape": [m, k, n], "sparsity": float(s), "device": cfg.device}

        def engine(impl: str, s: float = s) -> Outcome:
            a = a_of(s)
            t0 = time.perf_counter()
            fmt = CSRMatrix.from_dense(a) if impl == "csrmm" else BSRMatrix.from_dense(a, (4, 4))
            conv_s = time.perf_counter() - t0
            out = np.empty((m, n), np.float32)
            op = csr_matmul if impl == "csrmm" else bsr_matmul
            return _timed(
                lambda: op(fmt, b, out),
                ref_of(s),
                cfg,
                metrics={"kind": "strategy", "conversion_s": conv_s, "weight_nbytes": fmt.nbytes},
                baseline=_dense_product(a, b, cfg.device),
            )

        def peer(p: str, s: float = s) -> Outcome:
            peers = matrix_peers(a_of(s), b, device=cfg.device, threads=torch.get_num_threads(), onnx=False)
            return _timed(peers[p], ref_of(s), cfg, metrics={"kind": "peer"},
                          baseline=None if p == "torch-dense" else peers["torch-dense"])

        tasks.extend(
            Task("sweep", {**params, "impl": impl}, functools.partial(engine, impl), f"s={s:g} {impl}")
            for impl in ("csrmm", "bsr")
        )
        tasks.extend(
            Task("sweep", {**params, "impl": p}, functools.partial(peer, p), f"s={s:g} {p}")
            for p in _peer_names(replace(cfg, onnx=False))
        )
    return tasks
