"""Per-layer strategy choice: measure-and-pick with a persistent decision cache, or a cost model.

``sparsify(model, "auto")`` captures every Conv2d/Linear layer's real input (forward pre-hooks on the
dense model, run once on ``example_input``) and then, per layer:

1. looks the layer up in the decision cache, a JSON file keyed by the layer's geometry, input shape
   (batch included), weight sparsity and input density (rounded), device, thread count and CPU model;
2. on a miss, builds every candidate strategy (``torch`` always among them), runs it once (JIT
   warm-up), verifies it against the dense layer's output, and times the survivors in interleaved
   rounds (median per candidate, each sample at least a minimum time). The fastest non-torch
   strategy is chosen only if it beats torch by :data:`DEFAULT_MARGIN`, else torch: on a shared
   machine single timings vary by several percent, and torch is the safe default. The decision is
   written back.

With ``measure=False`` nothing is timed: :class:`CostModel` estimates each strategy's time from FLOPs
and bytes moved, with constants fitted on the project's machine by :func:`calibrate` (which refits
them to another machine), and the same margin rule decides.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import statistics
import threading
import time
import types
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sparsecnn.errors import SparseCNNError

__all__ = ["COLD_LINEAR_BYTES", "DEFAULT_MARGIN", "CostModel", "LayerChoice", "Plan", "auto_plan",
           "cache_key", "calibrate", "choose", "default_plan_path", "estimate_seconds", "pick", "times_cold"]

_PLAN_VERSION = 1  # of Plan.save's JSON
# Decision cache; 2: torch is kept unless a sparse strategy beats it by the margin (interleaved medians);
# 3: the direct kernel got 1.3-1.5x faster (L1 channel blocks), so older decisions are stale;
# 4: 24-vector tiles on AVX-512VL CPUs, new strategies (spmv-act, spconv-act, qspmv) among the candidates;
# 5: spmv-act's dense columns in register tiles, and tried for every dense-weight linear at batch 1;
# 6: the direct kernel's weights block-major (ResNet's 7x7 layers 3x faster in a forward pass);
# 7: lowered is an implicit GEMM on the CPU (no im2col, 1.3-2.7x faster);
# 8: spmv (and qspmv) one vector FMA per eight nonzeros, 1.1-1.4x faster: spmv vs spmv-act re-decided;
# 9: spmv/spmm weights in column slabs above 4096 inputs (x stays in L1): fc6-sized layers 2x faster;
# 10: the direct kernel's filter-group tiles at moderate sparsity (AlexNet conv2-5 at 62-65%: faster);
# 11: filter groups also where a pass has few columns but saves many loads (AlexNet conv1 at batch 32
# 1.5x faster than the per-filter tiles, now faster than torch), spmv's column words;
# 12: unpadded stride-1 inputs read in place (ResNet-50's 1x1 layers at 14x14 and 7x7 2x faster, where
# csrmm had won);
# 13: spconv-act redesigned (position lists, L1-resident weight chunks): 2-3x faster, now ahead of the
# weight-only kernels where the input has more zeros than the weights; large linear layers timed cold;
# 14: filter groups also on planes one per-filter tile covers (AlexNet conv3-5 at batch 1: 1.15-1.2x);
# 15: direct / lowered convs split a batch's images among the threads, each copying its own images
# (whole models 1.02-1.06x at batch 8-32);
# 16: qspmv (sliced ELL at batch <= 8) among the candidates of linear layers with shared weights;
# 17: 16-wide register tiles where the CPU runs AVX-512 FMAs at full rate (Intel server cores);
# 18: spmv-act's masked column layout there (1.2-1.3x faster at 91%, 2.6-4x at 75%);
# 19: the implicit GEMM (``lowered``) in channel blocks on stride-2 and large planes (1.12-1.13x);
# 20: its channel-vector form for 3x3 stride-1 layers, in-place inputs and straight 1x1 tiles;
# 21: its Winograd F(m x m, 3x3) form (m = 2 or 4) for dense 3x3 stride-1 layers (1.4-2.4x the
# channel form);
# 22: spmv-act's packed column layout (one stream per column, threads split the nonzero inputs): cold
# 1.3-1.6x faster on Zen 4, so spmv vs spmv-act is re-decided;
# 23: a close call against torch is timed again as a pair (CONFIRM_BAND);
# 24: a torch layer's in-pass check asks a 1% margin and re-times close passes (engine._alt_pass_wins);
#     linears at batch >= 2 also try `direct` (the batch in the vector lanes);
# 25: `lowered` runs strided layers that rearrange into 3x3 stride-1 ones (AlexNet's conv1) as Winograd
#     over their space-to-depth input at batch 1 (kernels.space_to_depth);
# 26: and dense-enough 5x5 stride-1 layers as Winograd F(4x4, 5x5) (AlexNet's conv2 under Deep
#     Compression: 1.6x `direct`); Winograd's plain stores transposed in registers, and the strided
#     layers' form at every batch (AlexNet's conv1 at batch 32 1.33x `direct`).
_CACHE_VERSION = 26
# A sparse strategy must beat torch by this fraction to be chosen (measured or estimated): issue 7's
# rule is "never more than 5% slower than torch", and single timings here vary by several percent.
DEFAULT_MARGIN = 0.04
# A measured winner less than this fraction faster than torch is timed again against torch alone, in
# alternating samples (:func:`_confirm`), before it is kept. Among eight candidates in rotation a layer
# can be measured after one that evicted its caches or in a spell of the machine: AlexNet DC's conv1
# (16% zeros) was measured 5% faster as ``direct`` than torch and then ran 0.81x torch, paired.
CONFIRM_BAND = 0.15
_SOURCES = ("measured", "cache", "cost-model", "given", "fallback", "not-run")


@dataclass(frozen=True)
class LayerChoice:
    """The strategy chosen for one layer and why."""

    strategy: str
    # How it was chosen: measured | cache | cost-model | given (by the caller) | fallback | not-run
    # (the example input never reached the layer, so it stays torch).
    source: str = "given"
    # Median seconds per candidate when measured (or estimated by the cost model); empty otherwise.
    times_s: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class Plan(Mapping[str, str]):
    """Layer name -> strategy (a read-only mapping), with the :class:`LayerChoice` behind each entry.

    ``Plan({"conv1": "csrmm"})`` or ``Plan({"conv1": LayerChoice("csrmm", "measured", {...})})``.
    """

    layers: Mapping[str, LayerChoice]

    def __post_init__(self) -> None:
        layers = {}
        for name, choice in dict(self.layers).items():
            if isinstance(choice, str):
                choice = LayerChoice(choice, "given")
            if not isinstance(choice, LayerChoice):
                raise SparseCNNError(f"plan entry {name!r} must be a strategy name, got {choice!r}")
            layers[str(name)] = choice
        object.__setattr__(self, "layers", types.MappingProxyType(layers))

    def __reduce__(self) -> tuple[Any, ...]:
        # The read-only view cannot be pickled or deep-copied; the plain dict behind it can.
        return type(self), (dict(self.layers),)

    def __getitem__(self, name: str) -> str:
        return self.layers[name].strategy

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self.items()) == dict(other.items())

    __hash__ = None  # type: ignore[assignment]

    def to_json(self) -> dict[str, Any]:
        return {"version": _PLAN_VERSION, "layers": {
            n: {"strategy": c.strategy, "source": c.source, "times_s": dict(c.times_s)}
            for n, c in self.layers.items()}}

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the plan as JSON (``{"version": 1, "layers": {name: {strategy, source, times_s}}}``)."""
        _atomic_write_text(Path(path), json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Plan:
        """Read a plan written by :meth:`save`."""
        try:
            raw = json.loads(Path(path).read_text())
            layers = {n: LayerChoice(str(e["strategy"]), str(e.get("source", "given")),
                                     {k: float(v) for k, v in e.get("times_s", {}).items()})
                      for n, e in raw["layers"].items()}
        except FileNotFoundError:
            raise SparseCNNError(f"plan file {path} does not exist") from None
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            raise SparseCNNError(
                f"plan file {path} is not a sparsecnn plan ({exc}); write it with Plan.save") from None
        return cls(layers)


# --------------------------------------------------------------------------------------------------
# environment and cache


def default_plan_path() -> Path:
    """``$SPARSECNN_CACHE_DIR/plans.json``, else ``~/.cache/sparsecnn/plans.json``."""
    root = os.environ.get("SPARSECNN_CACHE_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "sparsecnn"
    return base / "plans.json"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _threads() -> int:
    return torch.get_num_threads()


def _weight_sparsity(layer: nn.Module) -> float:
    w = layer.weight.detach()
    return 1.0 - float(torch.count_nonzero(w)) / max(w.numel(), 1)


def _density(x: torch.Tensor) -> float:
    return float(torch.count_nonzero(x)) / max(x.numel(), 1)


def _signature(layer: nn.Module) -> str:
    if isinstance(layer, nn.Linear):
        return f"linear{layer.out_features}x{layer.in_features}/b{int(layer.bias is not None)}"
    kh, kw = layer.kernel_size
    return (f"conv{layer.out_channels}x{layer.in_channels // layer.groups}x{kh}x{kw}/s{layer.stride}"
            f"/p{layer.padding}/d{layer.dilation}/g{layer.groups}/b{int(layer.bias is not None)}"
            f"/{layer.padding_mode}").replace(" ", "")


def cache_key(layer: nn.Module, x: torch.Tensor, candidates: tuple[str, ...], device: str = "cpu") -> str:
    """The decision-cache key of a layer on an input: geometry, input shape (batch included), weight
    sparsity (to 0.01), input density (to 0.1), candidates, device, threads and CPU model."""
    return "|".join([
        _signature(layer), "in" + "x".join(map(str, x.shape)), f"sp{_weight_sparsity(layer):.2f}",
        f"dens{round(_density(x), 1):.1f}", ",".join(candidates), str(torch.device(device)),
        f"t{_threads()}", _cpu_model()])


def _valid_entry(e: Any) -> bool:
    """A decision-cache entry as auto_plan writes it: ``{"strategy": str, "times_s": {str: float}}``."""
    if not isinstance(e, dict) or not isinstance(e.get("strategy"), str):
        return False
    times = e.get("times_s", {})
    return isinstance(times, dict) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in times.values())


def _read_cache(path: Path) -> dict[str, Any]:
    """The decision cache's entries; a file that is not one (torn, hand-edited, another version) is
    dropped whole with a warning: it is a cache, so the cost is re-measuring, never a wrong plan."""
    try:
        raw = json.loads(path.read_text())
        if isinstance(raw, dict) and isinstance(raw.get("version"), int) and raw["version"] < _CACHE_VERSION:
            return {}  # written by an older sparsecnn: its decisions are stale, replaced silently
        if raw.get("version") != _CACHE_VERSION or not isinstance(raw.get("entries"), dict):
            raise ValueError("unknown version")
        entries = {k: e for k, e in raw["entries"].items() if _valid_entry(e)}
        if len(entries) < len(raw["entries"]):
            raise ValueError(f"{len(raw['entries']) - len(entries)} malformed entries")
        return entries
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, AttributeError, RecursionError) as exc:
        warnings.warn(f"plan cache {path} is unreadable ({exc}); starting a new one", stacklevel=3)
        return {}


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on the sidecar ``<path>.lock`` (where the OS has one): two processes
    planning at once read-merge-write the cache one after the other, so neither loses the other's
    entries. Advisory, released by the OS if the holder dies."""
    try:
        import fcntl
    except ImportError:  # not POSIX: the atomic replace alone (an entry may be lost, never the file)
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, fsync it and rename it over ``path``: a
    reader (or a crash) sees the old file or the new one, never half of one."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_cache(path: Path, new: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        entries = _read_cache(path)  # merge with what other processes wrote meanwhile
        entries.update(new)
        _atomic_write_text(path, json.dumps({"version": _CACHE_VERSION, "entries": entries}, indent=1,
                                            sort_keys=True))


# --------------------------------------------------------------------------------------------------
# measuring


def _close(y: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-4) -> bool:
    """Elementwise relative ``rtol`` with an absolute floor of ``rtol * max|ref|`` (values near zero
    carry the rounding error of the whole reduction)."""
    if y.shape != ref.shape:
        return False
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    return bool(torch.allclose(y, ref, rtol=rtol, atol=rtol * scale + 1e-30))


# spmv-act (walk the nonzero inputs) is tried for a linear whose measured input is at least this
# fraction zeros, at a batch of at most ACT_SPARSE_MAX_BATCH: below, reading every column wins.
# At batch 1 a (nearly) dense weight is always tried: stored as dense columns, the walk streams the
# weight rows at ~30 GB/s where torch's GEMV (MKL, 2 threads) reaches ~20 GB/s on this machine kind,
# so it wins on fc6/fc7 even with no zero inputs (4096x5904: 3.2 ms against 4.7 ms).
ACT_SPARSE_MIN_ZEROS = 0.3
ACT_SPARSE_MAX_BATCH = 8


# A linear layer whose nonzero weights take at most this many distinct values (a weight-shared layer:
# Deep Compression's quantization, sparsecnn.compress.quantize_model) also tries qspmv at batch <= 8:
# uint8 codes, and with <= 32 values on AVX-512 its sliced-ELL form (fc6/fc7 at 91%, 5-bit, batch 1:
# 1.3-1.5x float CSR spmv warm, 1.2x cold; batch 2 / 4: 4x / 2.7x the float spmm).
SHARED_WEIGHTS_MAX_VALUES = 256


def _shared_weights(w: torch.Tensor) -> bool:
    """Whether the nonzeros of ``w`` take at most ``SHARED_WEIGHTS_MAX_VALUES`` distinct values (a
    sample of them first, so a float layer costs one small ``unique``)."""
    nz = w[w != 0]
    if nz.numel() == 0:
        return False
    limit = SHARED_WEIGHTS_MAX_VALUES
    return torch.unique(nz[:4096]).numel() <= limit and torch.unique(nz).numel() <= limit


def _candidates(layer: nn.Module, batch: int, input_density: float = 1.0) -> tuple[str, ...]:
    from sparsecnn.kernels.spmv_act import DENSE_COLUMNS_ABOVE
    from sparsecnn.layers import strategies

    if isinstance(layer, nn.Linear):
        w = layer.weight.detach()
        shared = ("qspmv",) if batch <= ACT_SPARSE_MAX_BATCH and _shared_weights(w) else ()
        # from batch 2 the direct conv's tiles with the batch in the vector lanes (kernels.direct_linear)
        batched = ("spmm", "direct") if batch >= 2 else ("spmv",)
        base = ("torch", "dense", *batched, *shared)
        dense_columns = w.numel() > 0 and int(torch.count_nonzero(w)) > DENSE_COLUMNS_ABOVE * w.numel()
        if batch <= ACT_SPARSE_MAX_BATCH and (1.0 - input_density >= ACT_SPARSE_MIN_ZEROS
                                              or (batch == 1 and dense_columns)):
            return (*base, "spmv-act")
        return base
    return strategies("conv")


def _measure(modules: Mapping[str, nn.Module], x: torch.Tensor, *, rounds: int, min_time_s: float,
             max_time_s: float, drop_factor: float) -> dict[str, float]:
    """Median seconds per call of every module on ``x``, measured in interleaved rounds.

    Every round times each candidate once (in a rotated order), and one sample runs the candidate
    for at least ``min_time_s / rounds`` (several calls for a fast layer), so a burst of load from
    other processes hits all candidates alike and the median discards it. After the first round a
    candidate more than ``drop_factor`` times slower than torch is dropped (it cannot win); past
    ``max_time_s`` the rounds stop early (never before the third).
    """
    names = list(modules)
    per_call: dict[str, float] = {}
    for n in names:  # a second, timed warm-up run sizes the samples
        t0 = time.perf_counter()
        with torch.no_grad():
            modules[n](x)
        per_call[n] = max(time.perf_counter() - t0, 1e-7)
    calls = {n: max(1, math.ceil(min_time_s / rounds / per_call[n])) for n in names}
    samples: dict[str, list[float]] = {n: [] for n in names}
    start = time.perf_counter()
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            fn, k = modules[n], calls[n]
            with torch.no_grad():
                t0 = time.perf_counter()
                for _ in range(k):
                    fn(x)
                samples[n].append((time.perf_counter() - t0) / k)
        if r == 0 and "torch" in samples:
            limit = drop_factor * samples["torch"][0]
            names = [n for n in names if n == "torch" or samples[n][0] <= limit]
        if r >= 2 and time.perf_counter() - start > max_time_s:
            break
    return {n: statistics.median(v) for n, v in samples.items()}


def pick(times: Mapping[str, float], margin: float) -> str:
    """The strategy to run given measured (or estimated) seconds: the fastest non-torch strategy if
    it beats ``torch`` by at least ``margin`` (a fraction), else ``torch``.

    The margin absorbs timing noise and the planner's own error: a sparse kernel that is measured
    only a little faster may well be slower on the next run, and torch is the safe default.
    """
    others = {s: t for s, t in times.items() if s != "torch"}
    if "torch" not in times:
        return min(others, key=others.__getitem__)
    if not others:
        return "torch"
    best = min(others, key=others.__getitem__)
    return best if others[best] <= (1.0 - margin) * times["torch"] else "torch"


# A linear layer whose weights exceed this in every candidate's form is timed with cold caches (by
# ``choose`` and the executor's tuning): in a forward pass the other layers evict it (AlexNet's fc6 as
# CSR is 20 MB). Timed warm, spmv-act won fc6 and fc7 at 32-50% zero inputs, and the compiled model
# ran 0.6 ms slower than with spmv (0.91 / 0.39 ms against 0.53 / 0.28 ms in the forward pass; Zen 4,
# 2 threads).
COLD_LINEAR_BYTES = 4 << 20


def times_cold(layer: nn.Module, candidates: Iterable[nn.Module]) -> bool:
    """Whether ``layer``'s candidates are to be timed with cold caches: a linear layer larger than
    ``COLD_LINEAR_BYTES`` in every candidate's form (``weight_nbytes``)."""
    return isinstance(layer, nn.Linear) and min(
        (getattr(c, "weight_nbytes", 0) for c in candidates), default=0) > COLD_LINEAR_BYTES


def choose(
    layer: nn.Module,
    x: torch.Tensor,
    *,
    name: str = "",
    candidates: tuple[str, ...] | None = None,
    rounds: int = 7,
    min_time_s: float = 0.035,
    max_time_s: float = 1.5,
    margin: float = DEFAULT_MARGIN,
    device: str | torch.device = "cpu",
    blocksize: tuple[int, int] = (4, 4),
) -> tuple[LayerChoice, nn.Module]:
    """Time every candidate strategy on ``layer`` with input ``x`` and keep the best.

    Each candidate is converted, run once (JIT warm-up) and checked against the dense layer's output
    (a wrong one is excluded with a warning). The survivors are timed in ``rounds`` interleaved
    rounds, each sample lasting at least ``min_time_s / rounds`` (see :func:`_measure`); the median
    per call is kept. A linear layer larger than ``COLD_LINEAR_BYTES`` in every form is timed one
    call at a time with the caches flushed before each (as a forward pass leaves them). The winner
    is the fastest non-torch candidate if it beats ``torch`` by at least
    ``margin``, else ``torch`` (:func:`pick`), so "auto" never trades torch for a kernel that is only
    within the noise of it; a warm winner less than ``CONFIRM_BAND`` faster than torch is timed again
    against torch alone in alternating samples (:func:`_confirm`) and must still beat it by
    ``margin`` (else the next best is, in turn). ``torch`` is always a candidate.

    Returns
    -------
    (LayerChoice, module)
        The choice (source ``"measured"``, median seconds per candidate) and the converted layer.
    """
    from sparsecnn.layers import _convert

    cands = tuple(dict.fromkeys(("torch", *(candidates or _candidates(layer, x.shape[0], _density(x))))))
    with torch.no_grad():
        ref = layer(x)
    modules: dict[str, nn.Module] = {}
    for cand in cands:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a fallback is seen below, as a changed strategy
            module = _convert(layer, cand, name, device, blocksize)
        if module.strategy != cand:
            continue
        with torch.no_grad():
            y = module(x)
        if not _close(y, ref):
            warnings.warn(f"layer {name!r}: strategy {cand!r} disagrees with torch on this input; excluded",
                          stacklevel=2)
            continue
        modules[cand] = module
    if not modules:  # unreachable: torch always verifies against itself
        raise SparseCNNError(f"layer {name!r}: no strategy ran")
    cold = times_cold(layer, modules.values())
    if cold:
        from sparsecnn.bench.harness import time_cold

        def call(m: nn.Module) -> Callable[[], object]:
            return lambda: m(x)

        with torch.no_grad():
            times = dict(zip(modules, time_cold([call(m) for m in modules.values()], repeats=max(3, rounds)),
                             strict=True))
    else:
        times = _measure(modules, x, rounds=max(1, rounds), min_time_s=min_time_s, max_time_s=max_time_s,
                         drop_factor=2.5)
    best = pick(times, margin)
    confirmed: set[str] = set()
    while (not cold and best != "torch" and best not in confirmed
           and times[best] > (1.0 - CONFIRM_BAND) * times["torch"]):
        pair = _confirm(modules[best], modules["torch"], x, best, rounds, min_time_s)
        # Every time rescaled to the pair's torch (each keeps its ratio to torch), the pair's own in
        # place of the two: where the winner lost its lead, the next best gets the same test.
        scale = pair["torch"] / times["torch"]
        times = {**{n: t * scale for n, t in times.items()}, **pair}
        confirmed.add(best)
        best = pick(times, margin)
    return LayerChoice(best, "measured", times), modules[best]


def _confirm(candidate: nn.Module, torch_layer: nn.Module, x: torch.Tensor, name: str, rounds: int,
             min_time_s: float) -> dict[str, float]:
    """Median seconds per call of ``candidate`` (strategy ``name``) and the ``torch`` layer on ``x``,
    timed in alternating samples of at least ``min_time_s / rounds`` each
    (:func:`sparsecnn.bench.harness.time_paired`, ``2 * rounds + 1`` pairs): nothing else runs between
    the two, so a spell of the machine or a third candidate's cache traffic hits both alike."""
    from sparsecnn.bench.harness import time_paired

    with torch.no_grad():
        a, b = time_paired(lambda: candidate(x), lambda: torch_layer(x), repeats=2 * rounds + 1, warmup=1,
                           min_sample_s=min_time_s / rounds, max_total_s=8 * min_time_s)
    return {name: a.median_s, "torch": b.median_s}


# --------------------------------------------------------------------------------------------------
# cost model


@dataclass(frozen=True)
class CostModel:
    """Throughput constants of the ``measure=False`` cost model.

    The estimate of a strategy is ``overhead + work / rate`` (plus im2col traffic / ``bandwidth``
    for the lowered strategies), with dense FLOPs ``2 B Cout K N`` (``K = Cin/g kh kw``,
    ``N = Hout Wout``) and sparse FLOPs counting only stored weights (times the input density for
    ``spgemm``, stored block entries for ``bsr``). A linear layer streams its weights:
    ``4 M K`` bytes dense, ``(4 + index bytes) nnz`` sparse.

    The defaults were fitted by :func:`calibrate` on the project's machine (2-core AMD EPYC, AVX2,
    torch 2.13 / oneDNN, numba, 2 threads; refitted with the L1-blocked direct kernel): the median
    of three runs of ``python -c "import sparsecnn.plan as p; print(p.calibrate())"``. They are
    effective rates (what the kernels reach, not the hardware peak). On another machine run
    :func:`calibrate` and pass the result:
    ``sparsify(model, measure=False, cost_model=sparsecnn.plan.calibrate())``.
    """

    # torch/oneDNN convolution and BLAS GEMM (dense, lowered), FLOP/s.
    gemm_flops: float = 104e9
    # Row-wise CSR x dense im2col (csrmm), FLOP/s over stored weights.
    csr_flops: float = 36e9
    # BSR x dense im2col, FLOP/s over stored block entries (zeros inside blocks included).
    bsr_flops: float = 65e9
    # Direct sparse convolution, FLOP/s over stored weights.
    direct_flops: float = 55e9
    # Sparse x sparse (scattered updates of the dense accumulator), FLOP/s over nonzero pairs.
    spgemm_flops: float = 2.4e9
    # im2col (write + read of the lowered input), bytes/s.
    bandwidth: float = 13.9e9
    # Weight streaming of a dense linear layer (torch), bytes/s.
    linear_bandwidth: float = 17.9e9
    # Weight streaming of the CSR linear kernel (values + indices), bytes/s.
    sparse_linear_bandwidth: float = 14.1e9
    # Fixed cost of one call: torch op, and numba dispatch + Python glue, seconds.
    torch_overhead_s: float = 21e-6
    kernel_overhead_s: float = 54e-6


def _conv_out_hw(layer: nn.Module, x_shape: tuple[int, ...]) -> tuple[int, int]:
    """``(Hout, Wout)`` of a conv layer on an input shape."""
    from sparsecnn.kernels.lowering import conv_out_size

    kh, kw = layer.kernel_size
    pad = layer.padding if isinstance(layer.padding, tuple) else (0, 0)
    return (conv_out_size(x_shape[2], kh, layer.stride[0], pad[0], layer.dilation[0]),
            conv_out_size(x_shape[3], kw, layer.stride[1], pad[1], layer.dilation[1]))


def _conv_dims(layer: nn.Module, x_shape: tuple[int, ...]) -> tuple[int, int, int, int, int, int]:
    """``(B, groups, Cout, K, N, nnz)`` of a conv layer on an input shape."""
    hout, wout = _conv_out_hw(layer, x_shape)
    kh, kw = layer.kernel_size
    nnz = int(torch.count_nonzero(layer.weight.detach()))
    return (x_shape[0], layer.groups, layer.out_channels, layer.in_channels // layer.groups * kh * kw,
            hout * wout, nnz)


def _bsr_entries(layer: nn.Module, blocksize: tuple[int, int]) -> int:
    """Stored block entries (R C per stored block) of a conv layer's lowered weight."""
    g, cout = layer.groups, layer.out_channels
    w = layer.weight.detach().cpu().float()
    k = w[0].numel()
    lowered = w.reshape(g, cout // g, k)
    r, cb = blocksize
    mp = math.ceil((cout // g) / r) * r
    kp = math.ceil(k / cb) * cb
    padded = torch.zeros(g, mp, kp)
    padded[:, : cout // g, :k] = lowered
    blocks = (padded.reshape(g, mp // r, r, kp // cb, cb) != 0).any(dim=4).any(dim=2)
    return int(blocks.sum()) * r * cb


def estimate_seconds(layer: nn.Module, x_shape: tuple[int, ...], strategy: str, *, input_density: float = 1.0,
                     blocksize: tuple[int, int] = (4, 4), model: CostModel | None = None) -> float:
    """Estimated seconds of one forward of ``layer`` on an input of ``x_shape`` with ``strategy``."""
    c = model or CostModel()
    w = layer.weight.detach().cpu().float()
    nnz = int(torch.count_nonzero(w))
    if isinstance(layer, nn.Linear):
        b = int(np.prod(x_shape[:-1]))
        m, k = w.shape
        if strategy in ("torch", "dense"):
            return c.torch_overhead_s + max(4 * m * k / c.linear_bandwidth, 2 * b * m * k / c.gemm_flops)
        idx = 2 if k <= 65536 else 4
        if strategy == "spmv-act":  # reads the columns of the nonzero inputs only
            dense_cols = nnz > 2 * m * k / 3
            per = 4 if dense_cols else 4 + (2 if m <= 65536 else 4)
            work = (m * k if dense_cols else nnz) * input_density
            return c.kernel_overhead_s + max(work * per / c.sparse_linear_bandwidth,
                                             2 * b * work / c.csr_flops)
        if strategy == "direct":  # every nonzero times a vector of batch items (lanes rounded up)
            from sparsecnn.kernels.direct_linear import lanes

            return c.kernel_overhead_s + max(nnz * 6 / c.sparse_linear_bandwidth,
                                             2 * lanes(b) * nnz / c.direct_flops)
        per = 1 + idx if strategy == "qspmv" else 4 + idx  # a uint8 code, or a float32 value, per nonzero
        return c.kernel_overhead_s + max(nnz * per / c.sparse_linear_bandwidth, 2 * b * nnz / c.csr_flops)
    b, g, cout, k, n, nnz = _conv_dims(layer, x_shape)
    dense_flops = 2 * b * cout * k * n
    im2col_s = 8 * b * g * k * n / c.bandwidth
    oh = c.kernel_overhead_s
    if strategy == "torch":
        return c.torch_overhead_s + dense_flops / c.gemm_flops
    if strategy == "dense":
        return oh + im2col_s + dense_flops / c.gemm_flops
    if strategy == "csrmm":
        return oh + im2col_s + 2 * b * nnz * n / c.csr_flops
    if strategy == "direct":
        return oh + 2 * b * nnz * n / c.direct_flops
    if strategy == "spgemm":
        return oh + 4 * b * g * k * n / c.bandwidth + 2 * b * nnz * n * input_density / c.spgemm_flops
    if strategy == "lowered":
        from sparsecnn.kernels._numba import num_threads
        from sparsecnn.kernels.implicit_gemm import strided_winograd_tile, winograd_tile

        nz = w.reshape(g, cout // g, k) != 0
        mr = int(nz.any(dim=2).sum(dim=1).max())
        kr = int(nz.any(dim=1).sum(dim=1).max())
        # implicit GEMM on the CPU: no im2col, one phase copy of the input (read + write)
        copy_s = 8 * int(np.prod(x_shape)) / c.bandwidth
        ho, wo = _conv_out_hw(layer, x_shape)
        kept = mr * kr / (cout // g * k)
        kh, kw = layer.kernel_size
        m = strided_winograd_tile(layer.kernel_size, layer.stride, layer.dilation, g, k // (kh * kw),
                                  (ho, wo), kept, b, num_threads())
        if m:  # over the space-to-depth input (kernels.space_to_depth): 3x3, Cin * sh * sw channels
            tiles = -(-ho // m) * -(-wo // m)
            cs = k // (kh * kw) * layer.stride[0] * layer.stride[1]
            return oh + copy_s + 2 * b * cout * cs * (m + 2) ** 2 * tiles / c.gemm_flops
        m = winograd_tile(layer.kernel_size, layer.stride, layer.dilation, k // (kh * kw), (ho, wo), kept)
        if m:
            # F(m x m, r x r): (m + r - 1)^2 multiply-adds per m x m outputs and channel pair, every
            # filter and column
            tiles = -(-ho // m) * -(-wo // m)
            return oh + copy_s + 2 * b * cout * (k // (kh * kw)) * (m + kh - 1) ** 2 * tiles / c.gemm_flops
        return oh + copy_s + 2 * b * g * mr * kr * n / c.gemm_flops
    if strategy == "bsr":
        return oh + im2col_s + 2 * b * _bsr_entries(layer, blocksize) * n / c.bsr_flops
    if strategy == "spconv-act":  # lists merged per output pixel (an im2col's bytes), then nonzero inputs
        taps = int(np.prod(layer.kernel_size))  # x kept input channels x taps x the group's outputs
        kept = int((w.reshape(g, cout // g, k // taps, taps) != 0).any(dim=3).any(dim=1).sum()) * taps
        return oh + im2col_s + 2 * b * (cout // g) * kept * n * input_density / c.direct_flops
    raise SparseCNNError(f"no cost estimate for strategy {strategy!r}")


def _calibration_layers(seed: int) -> list[tuple[nn.Module, torch.Tensor]]:
    """Layers of the shapes the planner meets (AlexNet, ResNet/VGG 3x3 and 1x1, a tiny one, an FC
    layer), 90% random weight sparsity, ReLU inputs (about half zeros)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [  # (Cin, Cout, k, padding, groups, H)
        (256, 384, 3, 1, 1, 13), (96, 256, 5, 2, 2, 27), (128, 128, 3, 1, 1, 28), (256, 64, 1, 0, 1, 28),
        (4, 4, 1, 0, 1, 4),
    ]
    out: list[tuple[nn.Module, torch.Tensor]] = []
    for cin, cout, k, pad, g, hw in shapes:
        conv = nn.Conv2d(cin, cout, k, padding=pad, groups=g).eval()
        out.append((conv, torch.relu(torch.randn(1, cin, hw, hw, generator=gen))))
    out.append((nn.Linear(4096, 4096).eval(), torch.randn(1, 4096, generator=gen)))
    with torch.no_grad():
        for layer, _ in out:
            flat = layer.weight.view(-1)
            flat[torch.randperm(flat.numel(), generator=gen)[: int(0.9 * flat.numel())]] = 0.0
    return out


def calibrate(*, seed: int = 0, rounds: int = 7, min_time_s: float = 0.1) -> CostModel:
    """Fit the :class:`CostModel` constants to this machine by timing every strategy on a few layers.

    Every strategy is timed like ``sparsify(..., "auto")`` does (interleaved rounds, medians) on the
    layers of :func:`_calibration_layers`, with the current torch and numba thread counts; each
    rate is the work of a layer divided by its measured time less the fixed overhead (and less the
    im2col time for the lowered strategies), and the constant is the median over the layers. The
    overheads come from the tiny layer. Takes a few seconds.
    """
    from sparsecnn.kernels.lowering import full_rows, im2col
    from sparsecnn.layers import _convert

    layers = _calibration_layers(seed)
    measured = []
    for layer, x in layers:
        mods = {s: _convert(layer, s, "", "cpu", (4, 4))
                for s in _candidates(layer, 1) if not isinstance(layer, nn.Linear) or s != "dense"}
        for m in mods.values():
            with torch.no_grad():
                m(x)
        measured.append(_measure(mods, x, rounds=rounds, min_time_s=min_time_s, max_time_s=10.0,
                                 drop_factor=math.inf))
    tiny = measured[4]
    oh_t = tiny["torch"]
    oh_k = statistics.median(t for s, t in tiny.items() if s not in ("torch", "dense", "lowered"))

    def rate(work: float, t: float) -> float:
        return work / max(t, 1e-9)

    fits: dict[str, list[float]] = {k: [] for k in ("gemm", "csr", "bsr", "direct", "spgemm", "bw")}
    for (layer, x), t in zip(layers[:4], measured[:4], strict=True):
        b, g, cout, k, n, nnz = _conv_dims(layer, tuple(x.shape))
        kh, kw = layer.kernel_size
        cols = np.empty((b, g, k, n), np.float32)
        xs = x.numpy()
        args = (kh, kw, 1, 1, layer.padding[0], layer.padding[1], 1, 1, full_rows(g, k), cols)
        im2col(xs, *args)
        t_low = _measure({"im2col": lambda _x, a=args, xs=xs: im2col(xs, *a)}, x, rounds=rounds,
                         min_time_s=min_time_s / 4, max_time_s=5.0, drop_factor=math.inf)["im2col"]
        if not (kh == kw == 1):
            fits["bw"].append(rate(8 * b * g * k * n, t_low))
        else:
            t_low = 0.0
        dens = float(torch.count_nonzero(x)) / x.numel()
        fits["gemm"].append(rate(2 * b * cout * k * n, t["torch"] - oh_t))
        fits["csr"].append(rate(2 * b * nnz * n, t["csrmm"] - oh_k - t_low))
        fits["direct"].append(rate(2 * b * nnz * n, t["direct"] - oh_k))
        fits["bsr"].append(rate(2 * b * _bsr_entries(layer, (4, 4)) * n, t["bsr"] - oh_k - t_low))
        fits["spgemm"].append(rate(2 * b * nnz * n * dens, t["spgemm"] - oh_k - t_low / 2))
    lin, lt = layers[5][0], measured[5]
    m, k = lin.weight.shape
    nnz = int(torch.count_nonzero(lin.weight))
    return CostModel(
        gemm_flops=statistics.median(fits["gemm"]), csr_flops=statistics.median(fits["csr"]),
        bsr_flops=statistics.median(fits["bsr"]), direct_flops=statistics.median(fits["direct"]),
        spgemm_flops=statistics.median(fits["spgemm"]), bandwidth=statistics.median(fits["bw"]),
        linear_bandwidth=rate(4 * m * k, lt["torch"] - oh_t),
        sparse_linear_bandwidth=rate(6 * nnz, lt["spmv"] - oh_k),
        torch_overhead_s=oh_t, kernel_overhead_s=oh_k,
    )


# --------------------------------------------------------------------------------------------------
# auto


def _example_input(model: nn.Module) -> torch.Tensor:
    from sparsecnn.models import input_shape

    try:
        shape = input_shape(model)
    except SparseCNNError as exc:
        raise SparseCNNError(f"sparsify(..., 'auto') needs an example input: {exc}, or pass example_input=")\
            from None
    return torch.randn((1, *shape), generator=torch.Generator().manual_seed(0))


def _capture(model: nn.Module, targets: Mapping[str, nn.Module], x: torch.Tensor) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def pre(_module: nn.Module, args: tuple[Any, ...]) -> None:
            if name not in seen and args and isinstance(args[0], torch.Tensor):
                seen[name] = args[0].detach().clone()
        return pre

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in targets.items()]
    try:
        with torch.no_grad():
            model(x)
    except SparseCNNError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:  # torch's shape and dtype errors
        raise SparseCNNError(f"the model does not run on the example input of shape {tuple(x.shape)} "
                             f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); pass "
                             f"example_input= with the shape the model takes, batch first") from exc
    finally:
        for h in handles:
            h.remove()
    return seen


def auto_plan(
    model: nn.Module,
    targets: Mapping[str, nn.Module],
    *,
    measure: bool = True,
    example_input: torch.Tensor | None = None,
    plan_path: Any = None,
    device: str | torch.device = "cpu",
    blocksize: tuple[int, int] = (4, 4),
    cost_model: CostModel | None = None,
) -> tuple[Plan, dict[str, nn.Module]]:
    """Choose a strategy for every target layer of ``model`` (the dense copy sparsify will convert).

    Returns
    -------
    (Plan, dict)
        The plan, and the layers already converted while measuring (reused by sparsify).
    """
    x = _example_input(model) if example_input is None else example_input
    if not isinstance(x, torch.Tensor):
        raise SparseCNNError(f"example_input must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() >= 1 and x.shape[0] == 0:
        raise SparseCNNError(f"example_input {tuple(x.shape)} holds no image: the strategies are timed on "
                             f"it; pass a batch of at least one")
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise SparseCNNError(f"example_input holds {int((~torch.isfinite(x)).sum())} NaN/Inf value(s): the "
                             f"strategies are timed and checked on it; pass a finite batch (real inputs, or "
                             f"torch.randn of the model's input shape)")
    from sparsecnn.layers import _conv_unsupported, check_finite_parameters

    for name, layer in targets.items():  # before timing: a NaN weight would only fail the output checks
        check_finite_parameters(layer, f"layer {name!r}")
    dev = torch.device(device)
    x = x.to(dev)
    inputs = _capture(model, targets, x)
    path = Path(plan_path) if plan_path is not None else default_plan_path()
    if path.is_dir():
        raise SparseCNNError(f"plan_path {path} is a directory; the plan cache is one JSON file: pass a file "
                             f"path such as {path / 'plans.json'}")
    cache = _read_cache(path) if measure else {}
    new_entries: dict[str, Any] = {}
    choices: dict[str, LayerChoice] = {}
    built: dict[str, nn.Module] = {}
    for name, layer in targets.items():
        xin = inputs.get(name)
        if xin is None:
            choices[name] = LayerChoice("torch", "not-run")
            continue
        reason = None if isinstance(layer, nn.Linear) else _conv_unsupported(layer)
        if reason is not None:
            warnings.warn(f"layer {name!r}: no sparse strategy can run it ({reason}); falling back to torch",
                          stacklevel=3)
            choices[name] = LayerChoice("torch", "fallback")
            continue
        cands = _candidates(layer, xin.shape[0] if xin.dim() > 1 else 1, _density(xin))
        if not measure:
            dens = _density(xin)
            est = {s: estimate_seconds(layer, tuple(xin.shape), s, input_density=dens, blocksize=blocksize,
                                       model=cost_model) for s in cands}
            choices[name] = LayerChoice(pick(est, DEFAULT_MARGIN), "cost-model", est)
            continue
        key = cache_key(layer, xin, cands, str(dev))
        # a layer identical in key to one measured earlier in this call shares its decision
        hit = new_entries.get(key) or cache.get(key)
        if isinstance(hit, dict) and hit.get("strategy") in cands:
            choices[name] = LayerChoice(hit["strategy"], "cache",
                                        {k: float(v) for k, v in hit.get("times_s", {}).items()})
            continue
        choice, module = choose(layer, xin, name=name, candidates=cands, device=dev, blocksize=blocksize)
        choices[name] = choice
        built[name] = module
        new_entries[key] = {"strategy": choice.strategy, "times_s": dict(choice.times_s)}
    if new_entries:
        _write_cache(path, new_entries)
    return Plan(choices), built
