"""Per-layer strategy choice: measure-and-pick with a persistent decision cache, or a cost model.

``sparsify(model, "auto")`` captures every Conv2d/Linear layer's real input (forward pre-hooks on the
dense model, run once on ``example_input``) and then, per layer:

1. looks the layer up in the decision cache, a JSON file keyed by the layer's geometry, input shape
   (batch included), weight sparsity and input density (rounded), device, thread count and CPU model;
2. on a miss, builds every candidate strategy (``torch`` always among them, so "auto" is never slower
   than torch's own op as measured), runs it once (JIT warm-up), verifies it against the dense layer's
   output, times the median of a few repeats and keeps the fastest; the decision is written back.

With ``measure=False`` nothing is timed: :class:`CostModel` estimates each strategy's time from FLOPs
and bytes moved, with throughput constants for a 2-core AVX-512 CPU (documented on each field).
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
import types
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sparsecnn.errors import SparseCNNError

__all__ = ["CostModel", "LayerChoice", "Plan", "auto_plan", "cache_key", "choose", "default_plan_path",
           "estimate_seconds"]

_CACHE_VERSION = 1
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
        return {"version": _CACHE_VERSION, "layers": {
            n: {"strategy": c.strategy, "source": c.source, "times_s": dict(c.times_s)}
            for n, c in self.layers.items()}}

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the plan as JSON (``{"version": 1, "layers": {name: {strategy, source, times_s}}}``)."""
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")

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
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
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


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text())
        if raw.get("version") != _CACHE_VERSION or not isinstance(raw.get("entries"), dict):
            raise ValueError("unknown version")
        return raw["entries"]
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, AttributeError) as exc:
        warnings.warn(f"plan cache {path} is unreadable ({exc}); starting a new one", stacklevel=3)
        return {}


def _write_cache(path: Path, new: Mapping[str, Any]) -> None:
    entries = _read_cache(path)  # merge with what other processes wrote meanwhile
    entries.update(new)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"version": _CACHE_VERSION, "entries": entries}, indent=1, sort_keys=True))
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------
# measuring


def _close(y: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-4) -> bool:
    """Elementwise relative ``rtol`` with an absolute floor of ``rtol * max|ref|`` (values near zero
    carry the rounding error of the whole reduction)."""
    if y.shape != ref.shape:
        return False
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    return bool(torch.allclose(y, ref, rtol=rtol, atol=rtol * scale + 1e-30))


def _candidates(layer: nn.Module, batch: int) -> tuple[str, ...]:
    from sparsecnn.layers import strategies

    if isinstance(layer, nn.Linear):
        return ("torch", "dense", "spmv" if batch == 1 else "spmm")
    return strategies("conv")


def choose(
    layer: nn.Module,
    x: torch.Tensor,
    *,
    name: str = "",
    candidates: tuple[str, ...] | None = None,
    repeats: int = 5,
    budget_s: float = 1.0,
    device: str | torch.device = "cpu",
    blocksize: tuple[int, int] = (4, 4),
) -> tuple[LayerChoice, nn.Module]:
    """Time every candidate strategy on ``layer`` with input ``x`` and keep the fastest.

    Each candidate is converted, run once (JIT warm-up), checked against the dense layer's output
    (a wrong one is excluded with a warning) and timed: the median of ``repeats`` runs, fewer when one
    run exceeds ``budget_s / repeats``. ``torch`` is always a candidate.

    Returns
    -------
    (LayerChoice, module)
        The choice (source ``"measured"``, median seconds per candidate) and the converted layer.
    """
    from sparsecnn.layers import _convert

    cands = tuple(dict.fromkeys(("torch", *(candidates or _candidates(layer, x.shape[0])))))
    with torch.no_grad():
        ref = layer(x)
    times: dict[str, float] = {}
    best: tuple[float, nn.Module] | None = None
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
        runs = []
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            with torch.no_grad():
                module(x)
            runs.append(time.perf_counter() - t0)
            if sum(runs) > budget_s:
                break
        times[cand] = statistics.median(runs)
        if best is None or times[cand] < best[0]:
            best = (times[cand], module)
    if best is None:  # unreachable: torch always verifies against itself
        raise SparseCNNError(f"layer {name!r}: no strategy ran")
    return LayerChoice(best[1].strategy, "measured", times), best[1]


# --------------------------------------------------------------------------------------------------
# cost model


@dataclass(frozen=True)
class CostModel:
    """Throughput constants of the cost model (rough, for the 2-core AVX-512 CPU the project runs on).

    The estimate of a strategy is ``overhead + FLOPs / rate + bytes / bandwidth``, with dense FLOPs
    ``2 B Cout K N`` (``K = Cin/g kh kw``, ``N = Hout Wout``) and sparse FLOPs counting only stored
    weights (times input density for ``spgemm``).
    """

    # torch/oneDNN convolution and BLAS GEMM, FLOP/s on both cores.
    gemm_flops: float = 60e9
    # Row-wise CSR x dense (one axpy per nonzero over a lowered row), FLOP/s.
    csr_flops: float = 12e9
    # BSR x dense, FLOP/s over stored block entries (zeros inside blocks included).
    bsr_flops: float = 15e9
    # Direct sparse convolution (axpy over contiguous input spans), FLOP/s.
    direct_flops: float = 10e9
    # Sparse x sparse (scattered updates of the dense accumulator), FLOP/s.
    spgemm_flops: float = 2e9
    # Streaming memory bandwidth, bytes/s (im2col writes + reads, weights of a linear layer).
    bandwidth: float = 10e9
    # Fixed cost of one call: torch op, and numba dispatch + Python glue, seconds.
    torch_overhead_s: float = 10e-6
    kernel_overhead_s: float = 30e-6


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
            oh = c.torch_overhead_s
            return oh + max(4 * m * k / c.bandwidth, 2 * b * m * k / c.gemm_flops)
        idx = 2 if k <= 32768 else 4
        return c.kernel_overhead_s + max(nnz * (4 + idx) / c.bandwidth, 2 * b * nnz / c.csr_flops)
    from sparsecnn.kernels.lowering import conv_out_size

    b, _, h, wd = x_shape
    g = layer.groups
    cout = layer.out_channels
    kh, kw = layer.kernel_size
    pad = layer.padding if isinstance(layer.padding, tuple) else (0, 0)
    hout = conv_out_size(h, kh, layer.stride[0], pad[0], layer.dilation[0])
    wout = conv_out_size(wd, kw, layer.stride[1], pad[1], layer.dilation[1])
    n = hout * wout
    k = layer.in_channels // g * kh * kw
    lowered = w.reshape(g, cout // g, k)
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
        nz = lowered != 0
        mr = int(nz.any(dim=2).sum(dim=1).max())
        kr = int(nz.any(dim=1).sum(dim=1).max())
        return oh + 8 * b * g * kr * n / c.bandwidth + 2 * b * g * mr * kr * n / c.gemm_flops
    if strategy == "bsr":
        r, cb = blocksize
        mp = math.ceil((cout // g) / r) * r
        kp = math.ceil(k / cb) * cb
        padded = torch.zeros(g, mp, kp)
        padded[:, : cout // g, :k] = lowered
        blocks = (padded.reshape(g, mp // r, r, kp // cb, cb) != 0).any(dim=4).any(dim=2)
        return oh + im2col_s + 2 * b * int(blocks.sum()) * r * cb * n / c.bsr_flops
    raise SparseCNNError(f"no cost estimate for strategy {strategy!r}")


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
    dev = torch.device(device)
    x = x.to(dev)
    inputs = _capture(model, targets, x)
    path = Path(plan_path) if plan_path is not None else default_plan_path()
    cache = _read_cache(path) if measure else {}
    new_entries: dict[str, Any] = {}
    choices: dict[str, LayerChoice] = {}
    built: dict[str, nn.Module] = {}
    from sparsecnn.layers import _conv_unsupported

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
        cands = _candidates(layer, xin.shape[0] if xin.dim() > 1 else 1)
        if not measure:
            dens = _density(xin)
            est = {s: estimate_seconds(layer, tuple(xin.shape), s, input_density=dens, blocksize=blocksize)
                   for s in cands}
            choices[name] = LayerChoice(min(est, key=est.__getitem__), "cost-model", est)
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
