"""The whole-model executor: ``sparsecnn.compile(model, example_input)``.

A pruned model (a torch module, traced with ``torch.fx``, or an imported ONNX/Caffe graph) is lowered
once into a flat program:

- every eval-mode BatchNorm2d (or an ONNX BatchNormalization) after a Conv2d is folded into the conv
  (zeros stay zeros);
- every Conv2d / Linear gets a strategy (``"auto"``: timed per layer as :func:`sparsecnn.sparsify`
  does, with the same plan cache) and is converted once;
- a ReLU after a conv, a linear or a residual add runs in that op's epilogue; a residual add whose
  conv runs the direct kernel or the implicit GEMM is that conv's epilogue too
  (``conv:direct+add+relu``); chains of dense conv layers may keep their activations channel-blocked
  (NCHW16c, ``layout=``, :mod:`sparsecnn.engine._layout`); max pooling, global
  average pooling, LRN, flatten/view, dropout and residual adds run as numba kernels over buffers
  planned by liveness and preallocated once per input shape; anything else runs in torch on views of
  the buffers;
- a forward pass is one loop over closures with their arguments bound (no module dispatch, no
  hooks, no torch <-> numpy glue between the numba kernels).

:class:`CompiledModel` is a torch module (``forward`` takes and returns tensors) and
:meth:`CompiledModel.numpy` the plain numpy callable. Both are safe to call from several threads at
once: each thread binds its own buffers. Inference only, float32, CPU.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numba
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sparsecnn.engine import _layout
from sparsecnn.engine._graph import Node, Ref, capture, record, record_shapes
from sparsecnn.engine._layout import has_candidates
from sparsecnn.engine._lower import Program, build_program, fold_batchnorm
from sparsecnn.errors import SparseCNNError
from sparsecnn.kernels._numba import num_threads
from sparsecnn.models._memory import check_fits

__all__ = ["CompiledModel", "compile"]


class _Eager(nn.Module):
    """The captured nodes run in torch, with the conv/linear layers as registered children: what the
    planner times layers in (its hooks see each layer's real input)."""

    def __init__(self, nodes: list[Node]) -> None:
        super().__init__()
        self.nodes = nodes
        self.layers = nn.ModuleList([n.fn for n in nodes if n.op == "module" and isinstance(n.fn, nn.Module)])

    def forward(self, x: torch.Tensor) -> Any:
        return record(self.nodes, x)[self.nodes[-1].name]


def _layer_nodes(nodes: list[Node]) -> dict[str, Node]:
    return {n.target or n.name: n for n in nodes
            if n.op == "module" and type(n.fn) in (nn.Conv2d, nn.Linear)}


def _rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    diff = (y - ref).abs()
    if bool(torch.isnan(ref).any()) or bool(torch.isnan(y).any()):
        same = bool(torch.equal(torch.isnan(y), torch.isnan(ref)))
        diff = torch.where(torch.isnan(ref), torch.zeros_like(diff), diff)
        if not same:
            return float("inf")
    return float(diff.max()) / max(scale, 1e-30) if diff.numel() else 0.0


class CompiledModel(nn.Module):
    """A model lowered by :func:`compile` (inference only, float32, CPU).

    Attributes
    ----------
    plan : sparsecnn.plan.Plan
        The strategy of every conv/linear layer (with the planner's timings when measured).
    max_rel_error : float
        ``max |y - y_ref| / max |y_ref|`` against the original model on the example input.
    """

    def __init__(self, nodes: list[Node], plan: Any, example: torch.Tensor) -> None:
        super().__init__()
        self._nodes = nodes
        self.plan = plan
        self.layers = nn.ModuleList([n.fn for n in nodes if n.op == "module" and isinstance(n.fn, nn.Module)])
        self._programs: dict[tuple[int, ...], Program] = {}
        self._lock = threading.Lock()
        self._local = threading.local()
        self._input_shape = tuple(example.shape[1:])
        # Input shape whose forward runs numba on one thread (chosen by compile when measured faster).
        self._serial_shape: tuple[int, ...] | None = None
        # Chains of dense conv layers in the channel-blocked layout (chosen by compile when measured
        # faster; engine._layout), and those layers' prepared weights for every input shape.
        self._blocked = False
        # The weight density from which a conv runs dense in the blocked layout (None: engine._layout's
        # MIN_DENSITY; 0.0 where compile measured every such conv faster dense there).
        self._min_density: float | None = None
        self._chan_cache: dict[Any, Any] = {}
        self.max_rel_error = 0.0
        self.eval()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_programs"], state["_lock"], state["_local"], state["_chan_cache"] = {}, None, None, {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock, self._local = threading.Lock(), threading.local()

    def __deepcopy__(self, memo: dict[int, Any]) -> CompiledModel:
        new = CompiledModel.__new__(CompiledModel)
        new.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return new

    @property
    def layout(self) -> str:
        """``"blocked"`` where chains of dense conv layers keep channel-blocked activations (see
        :func:`compile`'s ``layout``), else ``"plain"``."""
        return "blocked" if self._blocked else "plain"

    # ---- programs
    def program(self, shape: tuple[int, ...]) -> Program:
        """The lowered program for inputs of ``shape`` (built on first use, shared by threads)."""
        prog = self._programs.get(shape)
        if prog is None:
            with self._lock:
                prog = self._programs.get(shape)
                if prog is None:
                    try:
                        values = record_shapes(self._nodes, shape)
                    except (RuntimeError, ValueError, IndexError) as exc:
                        raise SparseCNNError(
                            f"compiled model: input of shape {tuple(shape)} does not fit the model (compiled "
                            f"for (B, {', '.join(map(str, self._input_shape))})): {str(exc).splitlines()[0]}"
                        ) from None
                    prog = build_program(self._nodes, values, self._blocked, self._chan_cache,
                                         getattr(self, "_min_density", None))
                    self._programs[shape] = prog
        return prog

    def _bound(self, shape: tuple[int, ...]) -> tuple[list[Any], list[Callable[[], None]], int, Callable]:
        cache = self._local.__dict__.setdefault("bound", {})
        b = cache.get(shape)
        if b is None:
            prog = self.program(shape)
            check_fits(4 * sum(prog.buffers), f"the compiled model at input shape {tuple(shape)} (its "
                       f"activation buffers)", "call it with a smaller batch")
            env, steps = prog.bind()
            b = cache[shape] = (env, steps, prog.input_slot, prog.output)
        return b

    def steps(self, shape: tuple[int, ...] | None = None) -> list[str]:
        """What each step of the program runs, e.g. ``['conv:direct+relu', 'maxpool', ...]``."""
        return list(self.program(shape or (1, *self._input_shape)).kinds)

    # ---- calls
    def numpy(self, x: np.ndarray) -> np.ndarray:
        """Run on a numpy batch ``(B, C, H, W)`` (float32; other floats are converted): a new array."""
        if not isinstance(x, np.ndarray) or x.dtype.kind != "f":
            raise SparseCNNError(f"compiled model: input must be a float numpy array, got "
                                 f"{type(x).__name__} {getattr(x, 'dtype', '')}")
        if x.ndim == len(self._input_shape):
            x = x[None]
        return self._run(np.ascontiguousarray(x, dtype=np.float32))

    def _run(self, x: np.ndarray) -> np.ndarray:
        """The forward pass on a C-contiguous float32 batch (the hot path: nothing is checked here)."""
        if x.shape[0] == 0:  # an empty batch gives an empty output, as torch (the kernels need one image)
            one = (1, *x.shape[1:])
            self.program(one)  # the shape checked (a clear error if it does not fit), nothing run
            out = record_shapes(self._nodes, one)[self._nodes[-1].name]
            return np.empty((0, *out.shape[1:]), dtype=np.float32)
        b = self._local.__dict__.get("bound", {}).get(x.shape)
        env, steps, slot, output = b if b is not None else self._bound(x.shape)
        serial = x.shape == self._serial_shape
        if serial:  # a model this small runs faster without waking numba's other threads
            threads = num_threads()
            numba.set_num_threads(1)
        try:
            env[slot] = x
            for f in steps:
                f()
            y = output(env)
            return y.copy() if y.dtype == np.float32 else y.astype(np.float32)
        finally:
            env[slot] = None
            if serial:
                numba.set_num_threads(threads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise SparseCNNError(f"compiled model: input must be a torch.Tensor, got {type(x).__name__}")
        # the checks read the cheapest attributes first (x.device builds an object: 0.4-0.9 us)
        if x.dtype is not torch.float32 or not x.is_cpu or not x.is_contiguous() or x.requires_grad:
            if not x.is_cpu or not x.is_floating_point():
                raise SparseCNNError(f"compiled model: input must be a CPU float tensor, got {x.dtype} on "
                                     f"{x.device}; use .cpu().float()")
            x = x.detach().to(torch.float32).contiguous()
        if x.dim() == len(self._input_shape):
            x = x[None]
        return torch.from_numpy(self._run(x.numpy()))


# Forward-error allowance of the check's second opinion, per output element, as a fraction of the
# magnitude of the terms the last conv/linear sums into it (|W| |a| + |b| on its real input a):
# ~84 float32 epsilons, above what a float32 sum of thousands of terms in any order loses, below what
# one wrong or missing term of thousands changes.
_TERM_RTOL = 1e-5


def _last_layer_terms(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``model(x)`` and, per element of the last conv/linear's output, ``|W| |a| + |b|`` on that
    layer's real input ``a``: the magnitude of the terms it sums (None if no conv or linear ran)."""
    seen: list[torch.Tensor] = []

    def hook(m: nn.Module, inp: tuple, out: torch.Tensor) -> None:
        a = inp[0].abs()
        b = None if m.bias is None else m.bias.abs()
        if isinstance(m, nn.Linear):
            seen.append(F.linear(a, m.weight.abs(), b))
        else:
            seen.append(F.conv2d(a, m.weight.abs(), b, m.stride, m.padding, m.dilation, m.groups))

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.padding_mode == "zeros")]
    try:
        y = model(x)
    finally:
        for h in handles:
            h.remove()
    return y, (seen[-1] if seen else None)


def _rounding_only(nodes: list[Node], folded_dense: dict[str, nn.Module], x: torch.Tensor,
                   y: torch.Tensor) -> bool:
    """Whether ``y`` (the compiled output) differs from the model with its BatchNorm folded, evaluated
    in float64, by no more than float32 rounding explains: per element, 1e-4 of the output's largest
    magnitude plus ``_TERM_RTOL`` of the terms the last conv/linear sums into that element (when the
    output is that layer's, as in a classifier).

    Folding BatchNorm into a conv rounds its weights differently, and the kernels sum in another order
    than torch; a model whose output cancels (a long sum of terms much larger than the result) then
    differs from the unfolded model by more than 1e-4 of the output without any error: measured, a
    conv + BatchNorm + 1224-input linear with one output, 1.04e-4 with every layer in torch, and
    2.5e-4 in the sparse kernels on a generated model where torch's float32 was 1.7e-5 off (the
    kernels sum a row in one chain of eight lanes, oneDNN in blocks). The check asks this second
    opinion before calling the compiled model wrong."""
    try:
        dense = [copy.copy(n) for n in nodes]
        for n in dense:
            if n.op == "module" and (n.target or n.name) in folded_dense:
                n.fn = folded_dense[n.target or n.name]
        f64 = copy.deepcopy(_Eager(dense).eval()).double()
        with torch.inference_mode():
            ref, terms = _last_layer_terms(f64, x.double())
            if not isinstance(ref, torch.Tensor) or y.shape != ref.shape:
                return False
            allowed = torch.full_like(ref, 1e-4 * float(ref.abs().max()))
            if terms is not None and terms.shape == ref.shape:
                allowed += _TERM_RTOL * terms
            return bool(((y.double() - ref).abs() <= allowed).all())
    except Exception:  # a layer that does not run in float64: no second opinion, the check stands
        return False


def _time_steps(fns: list[Callable[[], None]], rounds: int = 5, min_time_s: float = 0.002) -> list[float]:
    """Median seconds per call of each function, interleaved rounds (a burst of load hits all alike)."""
    reps = []
    for f in fns:
        f()  # JIT warm-up, workspaces
        t0 = time.perf_counter()
        f()
        reps.append(max(1, int(min_time_s / max(time.perf_counter() - t0, 1e-7))))
    samples: list[list[float]] = [[] for _ in fns]
    for r in range(rounds):
        for k in range(len(fns)):
            i = (k + r) % len(fns)
            t0 = time.perf_counter()
            for _ in range(reps[i]):
                fns[i]()
            samples[i].append((time.perf_counter() - t0) / reps[i])
    return [float(np.median(s)) for s in samples]


# What :func:`_time_in_pass` runs around each timed call: numba parallel passes over a scratch buffer
# (4 MiB: more than the L2 of both cores) for at least _PASS_GAP_S before it, a small one after it.
_PASS_BEFORE_BYTES = 4 << 20
_PASS_GAP_S = 2e-3
_PASS_AFTER_BYTES = 64 << 10


def _time_in_pass(fns: list[Callable[[], None]], rounds: int = 7) -> list[float]:
    """Median seconds of one call of each function *between numba steps*, as a layer runs in the
    executor's forward pass: each timed call comes right after numba parallel work (passes over a
    scratch buffer larger than the L2 of both cores) and includes one small numba parallel step after
    it. Interleaved rounds, one call per sample.

    Timed back to back, a torch step hides what it costs inside a pass of numba steps: a torch call
    that follows other work ran 1.2-5x its looped time (MobileNet-v2's depthwise 576 x 14x14 stride-2
    layer: 74 us looped, 85-204 us after 1-64 numba steps, 161 us after a 3 ms Python spin, 330-370 us
    in the pass, on one torch thread too; the direct kernel's time did not move), and the numba step
    after it 4-5 us more. The gap here brings part of that out (120-220 us for that layer); a torch
    choice is checked in the whole pass after (:func:`_torch_in_pass`).
    """
    from sparsecnn.kernels.elementwise import relu_

    before = np.ones(_PASS_BEFORE_BYTES // 4, np.float32)  # relu_ leaves ones as they are
    after = np.ones(_PASS_AFTER_BYTES // 4, np.float32)
    for f in fns:
        f()  # JIT warm-up, workspaces
    relu_(before)
    relu_(after)
    samples: list[list[float]] = [[] for _ in fns]
    for r in range(rounds):
        for k in range(len(fns)):
            i = (k + r) % len(fns)
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < _PASS_GAP_S:
                relu_(before)
            t0 = time.perf_counter()
            fns[i]()
            relu_(after)
            samples[i].append(time.perf_counter() - t0)
    return [float(np.median(s)) for s in samples]


def _tune_candidates(node: Node, layer: nn.Module, values: dict[str, Any]) -> list[str]:
    """The strategies :func:`_tune` times for ``layer`` (the planner's choice first)."""
    xin = values[node.args[0].name]
    conv = isinstance(node.fn, nn.Conv2d)
    batch = int(xin.shape[0]) if xin.dim() > 1 else 1
    names = [layer.strategy, "torch", "direct" if conv else ("spmv" if batch == 1 else "spmm")]
    if not conv and batch == 1:
        names.append("spmv-act")  # walks the nonzero inputs (dense columns of a dense weight)
    elif not conv:
        names.append("direct")  # the batch in the vector lanes (kernels.direct_linear)
    return list(dict.fromkeys(names))


def _tune_cached(node: Node, layer: nn.Module, values: dict[str, Any], cache: dict[str, Any],
                 new: dict[str, Any]) -> tuple[nn.Module, nn.Module | None, str | None]:
    """:func:`_tune`, its decision looked up in / added to the plan cache's entries (``cache`` read
    from the file, ``new`` to write), keyed as the planner's (:func:`sparsecnn.plan.cache_key`) with
    the executor's candidates and an ``executor-pass|`` prefix: compiling the same model again with the
    same cache builds the same plan, without re-timing (before, each build re-timed every layer and,
    in a noisy spell, plans differed between builds). Returns the layer, the alternative to check in
    the whole pass (:func:`_torch_in_pass`; None once checked) and the cache key."""
    from sparsecnn.layers import SparseConv2d, SparseLinear
    from sparsecnn.plan import cache_key

    names = _tune_candidates(node, layer, values)
    if len(names) == 1:
        return layer, None, None
    key = "executor-pass|" + cache_key(node.fn, values[node.args[0].name], tuple(names))
    hit = new.get(key) or cache.get(key)
    if isinstance(hit, dict) and hit.get("strategy") in names:
        cls = SparseConv2d if isinstance(node.fn, nn.Conv2d) else SparseLinear
        best = layer if hit["strategy"] == layer.strategy else cls.from_dense(node.fn, hit["strategy"],
                                                                               name=layer.name)
        alt = hit.get("alt") if not hit.get("in_pass") else None
        return best, (cls.from_dense(node.fn, alt, name=layer.name) if alt in names else None), key
    best, alt = _tune(node, layer, values)
    new[key] = {"strategy": best.strategy, "alt": None if alt is None else alt.strategy, "times_s": {}}
    return best, alt, key


def _tune(node: Node, layer: nn.Module, values: dict[str, Any]) -> tuple[nn.Module, nn.Module | None]:
    """The fastest of the planner's choice, torch and the direct/SpMV kernel *as the executor runs them*,
    and, where that is torch, the fastest other candidate (None otherwise).

    The planner times layers as modules (torch tensors in and out, ~30 us of glue each); inside the
    executor the numba kernels run on bound buffers, which moves the break-even on small layers (a
    LeNet-5 layer: 10 us direct against 16 us for the planner's csrmm). Each candidate runs as a
    one-step program on the layer's real input, a large linear layer with its caches flushed first
    (:func:`sparsecnn.plan.times_cold`), any other between numba steps (:func:`_time_in_pass`); ties
    keep the planner's choice. A torch step still costs more in the whole pass than there, so
    :func:`compile` checks a torch choice against the alternative in the whole pass (:func:`_torch_in_pass`).
    """
    from sparsecnn.layers import SparseConv2d, SparseLinear

    dense = node.fn
    xin = values[node.args[0].name]
    conv = isinstance(dense, nn.Conv2d)
    names = _tune_candidates(node, layer, values)
    if len(names) == 1:
        return layer, None
    cls = SparseConv2d if conv else SparseLinear
    cands = [layer] + [cls.from_dense(dense, s, name=layer.name) for s in names[1:]]
    fns = []
    for cand in cands:
        one = [Node("x", "input", None), Node(node.name, "module", cand, (Ref("x"),), {}, node.target),
               Node("out", "output", None, (Ref(node.name),))]
        prog = build_program(one, {"x": xin, node.name: values[node.name], "out": values[node.name]})
        env, steps = prog.bind()
        env[prog.input_slot] = np.ascontiguousarray(xin.numpy())

        def run(steps=steps) -> None:
            for f in steps:
                f()
        fns.append(run)
    from sparsecnn.plan import times_cold

    if times_cold(dense, cands):
        from sparsecnn.bench.harness import time_cold

        times = time_cold(fns, repeats=7)
    else:
        times = _time_in_pass(fns)
    best = min(range(len(cands)), key=lambda i: (times[i] * (1.0 if i == 0 else 1.02), i))
    rest = [i for i in range(len(cands)) if cands[i].strategy != "torch"]
    if cands[best].strategy != "torch" or not rest:
        return cands[best], None
    return cands[best], cands[min(rest, key=lambda i: (times[i], i))]


# A numba layer replaces a torch one in the pass only where the pass with it is _IN_PASS_MARGIN faster.
# A first comparison (7 rounds) within _IN_PASS_BAND is timed again for up to _IN_PASS_BUDGET_S:
# dense AlexNet's conv2 at batch 32 went to `direct` on 7 rounds, and the pass then ran 2.5-4.6%
# slower than with torch's conv2 (three interleaved A/Bs, docs/engine.md twenty-third session).
_IN_PASS_MARGIN = 0.01
_IN_PASS_BAND = 0.05
_IN_PASS_BUDGET_S = 8.0


def _alt_pass_wins(with_torch: Callable[[], None], with_alt: Callable[[], None]) -> bool:
    """Whether the forward pass ``with_alt`` beats ``with_torch`` by ``_IN_PASS_MARGIN``: 7 interleaved
    rounds, and where those put the two within ``_IN_PASS_BAND`` of each other, up to 14 more (as many
    as ``_IN_PASS_BUDGET_S`` allows), the ratio then weighted by rounds."""
    t0 = time.perf_counter()
    t_torch, t_alt = _time_steps([with_torch, with_alt], rounds=7)
    ratio = t_alt / t_torch
    if abs(ratio - 1.0) < _IN_PASS_BAND:
        per_round = (time.perf_counter() - t0) / 9  # 7 rounds and the warm-up calls
        more = int(min(14, max(3, _IN_PASS_BUDGET_S / max(per_round, 1e-9))))
        t_torch, t_alt = _time_steps([with_torch, with_alt], rounds=more)
        ratio = (7 * ratio + more * t_alt / t_torch) / (7 + more)
    return ratio < 1.0 - _IN_PASS_MARGIN


def _torch_in_pass(nodes: list[Node], plan: Any, x: torch.Tensor,
                   pending: list[tuple[str, Node, nn.Module, str | None]], new: dict[str, Any]) -> Any:
    """Each layer that :func:`_tune` gave to torch, checked in the whole forward pass against its
    fastest numba alternative (``pending``: the layer's name in the plan, its node, the alternative,
    the plan cache key); the faster pass keeps its layer (``nodes`` changed in place). Returns the
    plan; the decisions go to ``new`` (marked ``in_pass``: a rebuild does not check again).

    Alone, even between numba steps, a torch step runs faster than it does in the pass: MobileNet-v2's
    depthwise 576 x 14x14 stride-2 layer took 74 us looped, 120-220 us timed by :func:`_time_in_pass`
    and 330-370 us in the pass (the direct kernel 104-120 us in all three), and whole-model A/Bs of
    ResNets at 0-90% moved 3-9% when layers left torch (docs/engine.md, nineteenth session).
    """
    from sparsecnn.plan import LayerChoice, Plan

    xn = x.numpy()
    for name, node, alt, key in pending:
        i = nodes.index(node)
        swapped = list(nodes)
        swapped[i] = copy.copy(node)
        swapped[i].fn = alt
        choice = LayerChoice(alt.strategy, "executor", plan.layers[name].times_s)
        other_plan = Plan({**plan.layers, name: choice})
        here, there = CompiledModel(nodes, plan, x), CompiledModel(swapped, other_plan, x)
        if _alt_pass_wins(lambda m=here: m.numpy(xn), lambda m=there: m.numpy(xn)):
            node.fn, plan = alt, other_plan
        if key is not None:
            new[key] = {"strategy": node.fn.strategy, "in_pass": True, "times_s": {}}
    return plan


def _blocked_copy(compiled: CompiledModel, min_density: float | None) -> CompiledModel:
    """``compiled`` with channel-blocked activations, its convs from ``min_density`` running dense
    (sharing its prepared weights)."""
    blocked = copy.copy(compiled)
    blocked.__setstate__({**compiled.__getstate__(), "_chan_cache": compiled._chan_cache})
    blocked._blocked, blocked._min_density = True, min_density
    return blocked


def _faster_layout(compiled: CompiledModel, x: torch.Tensor, force: bool = False) -> CompiledModel:
    """``compiled`` with or without channel-blocked activations (:mod:`sparsecnn.engine._layout`),
    whichever ran the example input fastest (a blocked one only when more than 3% faster than the
    plain one); with ``force`` the blocked one wherever it blocks anything. Besides the blocked
    layout with :data:`sparsecnn.engine._layout.MIN_DENSITY`, where sparser convs that could run
    dense hold at least :data:`~sparsecnn.engine._layout.DENSE_TRY` of their weights nonzero on
    average, it times the blocked layout with them dense too: a 70%-pruned MobileNet-v2's 1x1 layers
    run faster dense in its fused blocks than sparse (1.2x at batch 32)."""
    xn, shape = x.numpy(), tuple(x.shape)
    cache = compiled._chan_cache
    candidates = []
    if has_candidates(compiled._nodes, cache):
        candidates.append(_blocked_copy(compiled, None))
    if not force and _layout.below_threshold(compiled._nodes, cache) >= _layout.DENSE_TRY:
        candidates.append(_blocked_copy(compiled, 0.0))
    candidates = [c for c in candidates if any(k.startswith("conv:blocked") for k in c.steps(shape))]
    if not candidates:
        cache.clear()
        return compiled  # nothing to block at this shape: the same program
    if force:
        return candidates[0]
    times = _time_steps([lambda: compiled.numpy(xn)] + [lambda c=c: c.numpy(xn) for c in candidates])
    best = min(range(len(candidates)), key=lambda i: times[i + 1])
    if times[best + 1] < 0.97 * times[0]:
        _layout.unbuild_below(cache, candidates[best]._min_density)
        return candidates[best]
    cache.clear()
    return compiled


def compile(
    model: nn.Module | str,
    example_input: torch.Tensor | None = None,
    strategy: str | Mapping[str, str] = "auto",
    *,
    measure: bool = True,
    plan_path: Any = None,
    check: bool = True,
    shrink: bool = False,
    tune: bool | None = None,
    layout: str = "auto",
) -> CompiledModel:
    """Lower a (pruned) model into one execution plan for the CPU.

    Parameters
    ----------
    model : torch.nn.Module or str
        A torch module (fx-traceable; the zoo's, an imported Caffe/ONNX graph, a sparsified model) or
        anything :func:`sparsecnn.models.resolve` takes (a zoo name, ``model.onnx``, ``deploy.prototxt``).
        Not modified.
    example_input : torch.Tensor, shape (B, C, H, W), optional
        The input the layers are planned on (default: a seeded random batch of 1 of the model's input
        shape). Other input shapes work too; each gets its own buffers on first use.
    strategy : str or mapping
        ``"auto"`` (time the strategies per layer, as :func:`sparsecnn.sparsify`), one strategy name
        for every layer, or a mapping / :class:`~sparsecnn.plan.Plan` layer name -> strategy.
    measure : bool
        ``"auto"`` only: False picks from the cost model instead of timing.
    plan_path : path, optional
        The planner's decision cache (see :func:`sparsecnn.sparsify`); with ``measure`` it also keeps
        the executor's tuning decisions (``tune``), so building the same model again re-times nothing
        and gives the same plan.
    check : bool
        Compare the compiled model with the original on ``example_input`` and raise if they differ by
        more than 1e-4 of the output's largest magnitude.
    tune : bool, optional
        ``"auto"`` only: re-time each layer's planned strategy against torch and direct/SpMV as the
        executor runs them (a few short runs per layer; with ``measure``, once per layer and input,
        then from the plan cache). Default: ``measure``. ``measure=False, tune=True`` plans from the
        cost model and still never keeps a layer slower than torch.
    shrink : bool
        First remove the all-zero filters and unread input channels that structured pruning (SSL)
        left (:func:`sparsecnn.shrink.shrink`), so the compact layers run fewer FLOPs.
    layout : {"auto", "blocked", "plain"}
        ``"blocked"``: chains of dense (at least 35% nonzero) conv layers keep their activations
        channel-blocked (NCHWc, c the vector width) and run the channel-vector implicit GEMM
        (:mod:`sparsecnn.engine._layout`); ``"plain"``: every activation NCHW, every layer its
        planned strategy; ``"auto"``: whichever runs the example input faster (timed when the plan
        is; plain otherwise), also trying the blocked layout with sparser conv layers (at least 25%
        nonzero on average) run dense too.

    Returns
    -------
    CompiledModel
    """
    from sparsecnn.layers import _CONV_STRATEGIES, _LINEAR_STRATEGIES, SparseConv2d, SparseLinear, _for_layer
    from sparsecnn.plan import LayerChoice, Plan, _example_input, auto_plan

    if isinstance(model, str):
        from sparsecnn.models import resolve

        model = resolve(model)
    if not isinstance(model, nn.Module):
        raise SparseCNNError(f"compile needs a torch.nn.Module or a model path, got {type(model).__name__}")
    model = copy.deepcopy(model).eval()
    if layout not in ("auto", "blocked", "plain"):
        raise SparseCNNError(f"layout must be 'auto', 'blocked' or 'plain', got {layout!r}")
    x = _example_input(model) if example_input is None else example_input
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise SparseCNNError("example_input must be a float torch.Tensor batch, "
                             "e.g. torch.randn(1, 3, 224, 224)")
    if x.shape[0] == 0:
        raise SparseCNNError(f"example_input {tuple(x.shape)} holds no image: the layers are planned and "
                             f"checked on it; pass a batch of at least one, e.g. torch.randn(1, "
                             f"{', '.join(map(str, x.shape[1:]))})")
    x = x.detach().float().cpu().contiguous()
    if shrink:
        from sparsecnn.shrink import shrink as _shrink

        model = _shrink(model, x).model
    nodes = fold_batchnorm(capture(model))
    layers = _layer_nodes(nodes)
    targets = {name: n.fn for name, n in layers.items()}
    built: dict[str, nn.Module] = {}
    if isinstance(strategy, str) and strategy == "auto":
        plan, built = auto_plan(_Eager(nodes), targets, measure=measure, example_input=x, plan_path=plan_path)
    elif isinstance(strategy, str):
        if strategy not in _CONV_STRATEGIES and strategy not in _LINEAR_STRATEGIES:
            raise SparseCNNError(f"unknown strategy {strategy!r}; choose 'auto' or one of "
                                 f"{', '.join(dict.fromkeys(_CONV_STRATEGIES + _LINEAR_STRATEGIES))}")
        plan = Plan({n: LayerChoice(_for_layer(strategy, m), "given") for n, m in targets.items()})
    elif isinstance(strategy, Mapping):
        unknown = sorted(set(strategy) - set(targets))
        if unknown:
            raise SparseCNNError(f"the plan names layers the model lacks: {', '.join(unknown)} (its layers: "
                                 f"{', '.join(targets)})")
        plan = Plan({n: LayerChoice(str(strategy.get(n, "torch")), "given") for n in targets})
    else:
        raise SparseCNNError(f"strategy must be 'auto', a strategy name or a mapping, "
                             f"got {type(strategy).__name__}")
    tuned = isinstance(strategy, str) and strategy == "auto" and (measure if tune is None else tune)
    values = record(nodes, x) if tuned else {}
    # the executor's decisions share the planner's cache file (where the planner measures)
    tune_path = None
    tune_cache: dict[str, Any] = {}
    tune_new: dict[str, Any] = {}
    if tuned and measure:
        from sparsecnn.plan import _read_cache, default_plan_path

        tune_path = Path(plan_path) if plan_path is not None else default_plan_path()
        tune_cache = _read_cache(tune_path)
    folded_dense = {name: node.fn for name, node in layers.items()}  # for the check's second opinion
    pending: list[tuple[str, Node, nn.Module, str | None]] = []  # torch choices to check in the whole pass
    for name, node in layers.items():
        layer = built.get(name)
        if layer is None or layer.strategy != plan[name]:
            cls = SparseConv2d if isinstance(node.fn, nn.Conv2d) else SparseLinear
            layer = cls.from_dense(node.fn, plan[name], name=name)
        if tuned:
            if tune_path is not None:
                layer, alt, key = _tune_cached(node, layer, values, tune_cache, tune_new)
            else:
                (layer, alt), key = _tune(node, layer, values), None
            if alt is not None:
                pending.append((name, node, alt, key))
            if layer.strategy != plan[name]:
                times = plan.layers[name].times_s
                plan = Plan({**plan.layers, name: LayerChoice(layer.strategy, "executor", times)})
        node.fn = layer
    if pending:
        plan = _torch_in_pass(nodes, plan, x, pending, tune_new)
    if tune_new and tune_path is not None:
        from sparsecnn.plan import _write_cache

        _write_cache(tune_path, tune_new)
    compiled = CompiledModel(nodes, plan, x)
    if tuned and num_threads() > 1:
        # Tiny models (LeNet-5) lose more to parallel launches than they gain: time both ways.
        xn = x.numpy()
        serial_model = copy.copy(compiled)
        serial_model._serial_shape = tuple(x.shape)
        t_par, t_ser = _time_steps([lambda: compiled.numpy(xn), lambda: serial_model.numpy(xn)])
        if t_ser < 0.97 * t_par:
            compiled._serial_shape = tuple(x.shape)
    if layout == "blocked" or (layout == "auto" and tuned
                               and has_candidates(nodes, compiled._chan_cache,
                                                  min(_layout.MIN_DENSITY, _layout.DENSE_TRY))):
        # Dense conv chains in the channel-blocked layout (engine._layout): time the program both ways.
        compiled = _faster_layout(compiled, x, force=layout == "blocked")
    if check:
        with torch.inference_mode():
            ref = model(x)
        y = compiled(x)
        same = isinstance(ref, torch.Tensor) and ref.shape == y.shape
        err = _rel_error(y, ref) if same else float("inf")
        if err > 1e-4 and not (err <= 1e-2 and _rounding_only(nodes, folded_dense, x, y)):
            raise SparseCNNError(f"compiled model differs from the original by {err:.3g} of the output's "
                                 f"scale "
                                 f"on the example input; please report this (strategies: {dict(plan)})")
        compiled.max_rel_error = err
    return compiled
