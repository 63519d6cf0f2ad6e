"""Whole generated models through the executor (hypothesis): random CNNs of convs (any kernel, stride,
padding, dilation, groups), BatchNorm, ReLU, residual adds with and without a downsampling branch,
channel concatenation, max pooling, LRN, asymmetric padding modules (zero, constant, reflect,
replicate), depthwise convs with ReLU6, global average pooling and linear heads, pruned at random
densities (all-zero layers included), as torch modules, exported to ONNX and imported back, or
written as Caffe prototxt + caffemodel and imported, compiled with one strategy, a random strategy
per layer, or the cost-model plan (half the torch-route models with SSL-like zero filters and
channels, through ``shrink=True``), at 1 or 2 numba threads and several batch sizes. Every output
must equal the model's within rounding (BatchNorm folded, in float64, see :func:`_within_rounding`),
on a second call (buffers reused), at a second batch size and from three Python threads at once, and
``compile``'s own check must pass; ``sparsify`` with the same strategies must equal the model too.

``make test`` runs 15 models; ``make fuzz`` 300 (docs/reliability.md)."""

from __future__ import annotations

import copy
import os
import tempfile
import warnings
from pathlib import Path

import numba
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

import sparsecnn
from sparsecnn.engine import _Eager, _last_layer_terms
from sparsecnn.engine._graph import capture
from sparsecnn.engine._lower import _conv_of, fold_batchnorm
from tests.threads import call_from_threads

pytestmark = pytest.mark.fuzz

CONV = sparsecnn.strategies("conv")
LINEAR = sparsecnn.strategies("linear")
# The loaded profile decides how hard this runs: a few models by default, many under ``make fuzz``.
EXAMPLES = 15 if settings().max_examples <= 20 else 300
SETTINGS = settings(max_examples=EXAMPLES, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class _Net(nn.Module):
    """A CNN given as a list of ops over the modules in ``mods`` (a static Python list: fx traces it)."""

    def __init__(self, ops: list[tuple], mods: list[nn.Module]) -> None:
        super().__init__()
        self.ops = ops
        self.mods = nn.ModuleList(mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for op in self.ops:
            kind = op[0]
            if kind == "layer":  # conv / bn / pool / lrn / linear, one module
                x = self.mods[op[1]](x)
            elif kind == "relu":
                x = torch.relu(x)
            elif kind == "res":  # conv -> relu -> conv, plus the identity or a downsampling conv
                _, a, b, down, relu = op
                y = self.mods[b](torch.relu(self.mods[a](x)))
                x = y + (x if down < 0 else self.mods[down](x))
                if relu:
                    x = torch.relu(x)
            elif kind == "cat":
                x = torch.cat([self.mods[op[1]](x), self.mods[op[2]](x)], 1)
            elif kind == "gap":
                x = torch.flatten(self.mods[op[1]](x), 1)
            elif kind == "flatten":
                x = torch.flatten(x, 1)
        return x


def _conv_out(n: int, k: int, s: int, p: int, d: int) -> int:
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


@st.composite
def models_and_inputs(draw):
    """(model, input, second batch): a valid random CNN for an input of random shape."""
    # Mostly tiny models; some wide enough for the parallel kernels, channel blocks and filter groups.
    scale = draw(st.sampled_from([1, 8]))
    c = draw(st.integers(1, 4))
    h, w = draw(st.integers(5, 20 + 12 * (scale > 1))), draw(st.integers(5, 20 + 12 * (scale > 1)))
    c0, h0, w0 = c, h, w
    ops: list[tuple] = []
    mods: list[nn.Module] = []

    def add(m: nn.Module) -> int:
        mods.append(m)
        return len(mods) - 1

    def conv(cin: int, cout: int, hh: int, ww: int, same: bool = False):
        """A conv of random geometry valid for (hh, ww); ``same`` keeps the shape (stride 1)."""
        groups = draw(st.sampled_from([g for g in (1, 2, 3) if cin % g == 0 and cout % g == 0]))
        k = draw(st.sampled_from([1, 3])) if same else draw(st.integers(1, 5))
        kw = k if same else draw(st.integers(1, 5))
        d = 1 if same else draw(st.integers(1, 2))
        s = 1 if same else draw(st.integers(1, 3))
        p = (k - 1) // 2 if same else draw(st.integers(0, 2))
        pw = (kw - 1) // 2 if same else draw(st.integers(0, 2))
        ho, wo = _conv_out(hh, k, s, p, d), _conv_out(ww, kw, s, pw, d)
        if ho < 1 or wo < 1:
            k, kw, d, s, p, pw, ho, wo = 1, 1, 1, 1, 0, 0, hh, ww
        m = nn.Conv2d(cin, cout, (k, kw), stride=s, padding=(p, pw), dilation=d, groups=groups,
                      bias=draw(st.booleans()))
        return m, ho, wo

    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["conv", "conv", "res", "cat", "pool", "lrn", "pad", "depthwise"]))
        if kind == "conv":
            cout = scale * draw(st.integers(1, 8))
            m, h, w = conv(c, cout, h, w)
            ops.append(("layer", add(m)))
            c = cout
            if draw(st.booleans()):
                ops.append(("layer", add(nn.BatchNorm2d(c))))
            if draw(st.booleans()):
                ops.append(("relu",))
        elif kind == "res":
            mid = scale * draw(st.integers(1, 8))
            a, _, _ = conv(c, mid, h, w, same=True)
            cout = draw(st.sampled_from([c, scale * draw(st.integers(1, 8))]))
            b, _, _ = conv(mid, cout, h, w, same=True)
            down = -1 if cout == c and draw(st.booleans()) else add(nn.Conv2d(c, cout, 1, bias=False))
            ops.append(("res", add(a), add(b), down, draw(st.booleans())))
            c = cout
        elif kind == "cat":
            c1, c2 = scale * draw(st.integers(1, 5)), scale * draw(st.integers(1, 5))
            a, _, _ = conv(c, c1, h, w, same=True)
            b, _, _ = conv(c, c2, h, w, same=True)
            ops.append(("cat", add(a), add(b)))
            c = c1 + c2
        elif kind == "pool" and min(h, w) >= 2:
            k = draw(st.integers(2, 3))
            s = draw(st.integers(1, 2))
            p = draw(st.integers(0, k // 2))
            ceil = draw(st.booleans())
            ho, wo = _pool_out(h, k, s, p, ceil), _pool_out(w, k, s, p, ceil)
            if min(h, w) + 2 * p >= k and min(ho, wo) >= 1:
                ops.append(("layer", add(nn.MaxPool2d(k, s, p, ceil_mode=ceil))))
                h, w = ho, wo
        elif kind == "depthwise" and c > 1:  # MobileNet's: one filter per channel (kernels.depthwise)
            m, h2, w2 = conv(c, c, h, w)
            m = nn.Conv2d(c, c, m.kernel_size, m.stride, m.padding, m.dilation, groups=c,
                          bias=m.bias is not None)
            ops.append(("layer", add(m)))
            h, w = h2, w2
            if draw(st.booleans()):
                ops.append(("layer", add(nn.ReLU6())))
        elif kind == "pad":  # asymmetric padding as torch modules (ONNX Pad nodes on the ONNX route)
            pads = tuple(draw(st.integers(0, 2)) for _ in range(4))  # left, right, top, bottom
            mode = draw(st.sampled_from(["zero", "constant", "reflect", "replicate"]))
            if mode == "reflect" and (max(pads[:2]) >= w or max(pads[2:]) >= h):
                mode = "replicate"
            pad = {"zero": nn.ZeroPad2d, "constant": lambda p: nn.ConstantPad2d(p, -0.75),
                   "reflect": nn.ReflectionPad2d, "replicate": nn.ReplicationPad2d}[mode](pads)
            ops.append(("layer", add(pad)))
            h, w = h + pads[2] + pads[3], w + pads[0] + pads[1]
        elif kind == "lrn":
            ops.append(("layer", add(nn.LocalResponseNorm(draw(st.sampled_from([3, 5])), alpha=1e-3,
                                                          beta=0.75, k=2.0))))
    if draw(st.booleans()):
        ops.append(("gap", add(nn.AdaptiveAvgPool2d(1))))
        features = c
    else:
        ops.append(("flatten",))
        features = c * h * w
    hidden = draw(st.integers(1, 12))
    ops.append(("layer", add(nn.Linear(features, hidden))))
    if draw(st.booleans()):
        ops.append(("relu",))
        ops.append(("layer", add(nn.Linear(hidden, draw(st.integers(1, 6))))))
    model = _Net(ops, mods).eval()
    seed = draw(st.integers(0, 2**16))
    _prune(model, draw(st.sampled_from([0.0, 0.3, 0.65, 0.9, 1.0])), seed)
    batch = draw(st.sampled_from([1, 2, 3, 5]))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, c0, h0, w0, generator=gen)
    if draw(st.booleans()):
        x = torch.relu(x)  # ReLU-like zeros for the activation-sparse strategies
    other = torch.randn(draw(st.sampled_from([1, 4])), c0, h0, w0, generator=gen)
    return model, x, other


def _pool_out(n: int, k: int, s: int, p: int, ceil: bool) -> int:
    span = n + 2 * p - k
    out = (-(-span // s) if ceil else span // s) + 1
    if ceil and (out - 1) * s >= n + p:  # torch: the last window must start inside the input or left pad
        out -= 1
    return out


def _prune(model: nn.Module, sparsity: float, seed: int) -> None:
    """Weights from ``seed`` (not torch's global generator: a failing example must replay), a
    fraction of every conv / linear weight zeroed (some layers entirely), and BatchNorm statistics
    away from the identity so folding is exercised."""
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                w = rng.standard_normal(tuple(m.weight.shape)) / np.sqrt(max(fan_in, 1))
                layer_sparsity = 1.0 if rng.random() < 0.1 else sparsity
                w[rng.random(w.shape) < layer_sparsity] = 0.0
                m.weight.copy_(torch.from_numpy(w))
                if m.bias is not None:
                    m.bias.copy_(torch.from_numpy(rng.standard_normal(m.bias.shape) * 0.1))
            elif isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.from_numpy(rng.standard_normal(m.num_features) * 0.1))
                m.running_var.copy_(torch.from_numpy(rng.random(m.num_features) + 0.5))
                m.weight.copy_(torch.from_numpy(rng.random(m.num_features) + 0.5))
                m.bias.copy_(torch.from_numpy(rng.standard_normal(m.num_features) * 0.1))


def _zero_groups(model: nn.Module, rng: np.random.Generator) -> None:
    """Zero whole filters (output channels) and whole input channels of the convs and linears, as
    structured pruning (SSL) leaves them."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                w = m.weight
                w[torch.from_numpy(rng.random(w.shape[0]) < 0.3)] = 0.0
                w[:, torch.from_numpy(rng.random(w.shape[1]) < 0.3)] = 0.0


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-6))


def _folded(model: nn.Module) -> nn.Module:
    """The model with its BatchNorm folded into the convs, as the executor runs it, in float64 (the
    float32 folded weights, evaluated exactly)."""
    nodes = fold_batchnorm(capture(copy.deepcopy(model)))
    return _Eager(nodes).eval().double()


def _within_rounding(y: torch.Tensor, model64: nn.Module, x: torch.Tensor) -> tuple[bool, float]:
    """Whether ``y`` is within float32 rounding of ``model64(x)`` (float64): per element, 1e-4 of the
    output's largest magnitude plus 1e-5 of the terms the last conv/linear sums there (a generated
    model can cancel its output far below its terms), as ``compile``'s check allows; and the
    relative error."""
    ref, terms = _last_layer_terms(model64, x.double())
    allowed = torch.full_like(ref, 1e-4 * float(ref.abs().max()))
    if terms is not None and terms.shape == ref.shape:
        allowed += 1e-5 * terms
    return bool(((y.double() - ref).abs() <= allowed).all()), _rel(y, ref)


def _close(y: torch.Tensor, folded: nn.Module, model: nn.Module, x: torch.Tensor) -> tuple[bool, str]:
    """``y`` within rounding of the folded model evaluated in float64 (:func:`_within_rounding`), and
    within 1e-2 of the original model, or 10x torch's own float32 error there (folding itself: the zoo
    tests hold it to 1e-4 on real architectures)."""
    ok, err = _within_rounding(y, folded, x)
    ref = copy.deepcopy(model).double()(x.double())
    loose, base = _rel(y, ref), _rel(model(x), ref)
    ok = ok and loose <= max(1e-2, 10 * base)
    return ok, f"rel error {err:.3g}; against the unfolded model {loose:.3g} (torch float32 {base:.3g})"


def _through_onnx(model: nn.Module, x: torch.Tensor, directory: str) -> nn.Module:
    """The model exported to ONNX and imported back (``sparsecnn.io``), checked against the original."""
    from sparsecnn.io import export_onnx, load_onnx

    path = export_onnx(model, os.path.join(directory, "model.onnx"), input_shape=tuple(x.shape[1:]))
    net = load_onnx(path)
    with torch.inference_mode():
        ref = copy.deepcopy(model).double()(x.double())
        err, base = _rel(net(x), ref), _rel(model(x), ref)
    assert err <= max(1e-4, 10 * base), f"ONNX import: rel error {err:.3g} (torch {base:.3g})"
    return net


def _caffe_layers(model: _Net) -> list | None:
    """The generated model as Caffe layers (``tests/caffe_writer``), or None where Caffe cannot say
    it: a max pool in floor mode whose size differs from ceil mode (Caffe's pooling always rounds up),
    a padding module."""
    from tests.caffe_writer import Layer

    layers: list[Layer] = []
    count = iter(range(10**6))

    def conv(m: nn.Conv2d, bottom: str) -> str:
        top = f"conv{next(count)}"
        (kh, kw), (sh, sw), (ph, pw), (dh, _) = m.kernel_size, m.stride, m.padding, m.dilation
        params = (f"convolution_param {{ num_output: {m.out_channels} kernel_h: {kh} kernel_w: {kw} "
                  f"stride_h: {sh} stride_w: {sw} pad_h: {ph} pad_w: {pw} dilation: {dh} "
                  f"group: {m.groups} bias_term: {'true' if m.bias is not None else 'false'} }}")
        blobs = [m.weight.detach().numpy()] + ([m.bias.detach().numpy()] if m.bias is not None else [])
        layers.append(Layer(top, "Convolution", [bottom], [top], params, blobs))
        return top

    def relu(x: str) -> str:
        layers.append(Layer(f"relu{next(count)}", "ReLU", [x], [x]))
        return x

    x = "data"
    for op in model.ops:
        kind = op[0]
        m = model.mods[op[1]] if kind in ("layer", "gap") else None
        if isinstance(m, nn.Conv2d):
            x = conv(m, x)
        elif isinstance(m, nn.BatchNorm2d):
            n = next(count)
            stats = [m.running_mean.numpy(), m.running_var.numpy(), np.ones(1, np.float32)]
            layers.append(Layer(f"bn{n}", "BatchNorm", [x], [x], f"batch_norm_param {{ eps: {m.eps} }}",
                                stats))
            layers.append(Layer(f"scale{n}", "Scale", [x], [x], "scale_param { bias_term: true }",
                                [m.weight.detach().numpy(), m.bias.detach().numpy()]))
        elif isinstance(m, nn.MaxPool2d):
            if not m.ceil_mode:
                return None  # floor mode: only when it agrees with ceil mode, which is rare enough
            layers.append(Layer(f"pool{next(count)}", "Pooling", [x], [f"pool{next(count)}"],
                                f"pooling_param {{ pool: MAX kernel_size: {m.kernel_size} stride: {m.stride} "
                                f"pad: {m.padding} }}"))
            x = layers[-1].top[0]
        elif isinstance(m, (nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d, nn.ReLU6)):
            return None  # Caffe has no padding layer, no ReLU6
        elif isinstance(m, nn.LocalResponseNorm):
            top = f"lrn{next(count)}"
            layers.append(Layer(top, "LRN", [x], [top], f"lrn_param {{ local_size: {m.size} alpha: {m.alpha} "
                                                       f"beta: {m.beta} k: {m.k} }}"))
            x = top
        elif isinstance(m, nn.Linear):
            top = f"fc{next(count)}"
            layers.append(Layer(top, "InnerProduct", [x], [top],
                                f"inner_product_param {{ num_output: {m.out_features} }}",
                                [m.weight.detach().numpy(), m.bias.detach().numpy()]))
            x = top
        elif kind == "gap":
            top = f"gap{next(count)}"
            layers.append(Layer(top, "Pooling", [x], [top],
                                "pooling_param { pool: AVE global_pooling: true }"))
            x = top
        elif kind == "relu":
            x = relu(x)
        elif kind == "res":
            _, a, b, down, post = op
            y = conv(model.mods[b], relu(conv(model.mods[a], x)))
            idn = x if down < 0 else conv(model.mods[down], x)
            top = f"add{next(count)}"
            layers.append(Layer(top, "Eltwise", [y, idn], [top], "eltwise_param { operation: SUM }"))
            x = relu(top) if post else top
        elif kind == "cat":
            a, b = conv(model.mods[op[1]], x), conv(model.mods[op[2]], x)
            top = f"cat{next(count)}"
            layers.append(Layer(top, "Concat", [a, b], [top], "concat_param { axis: 1 }"))
            x = top
    return layers


def _through_caffe(model: _Net, x: torch.Tensor, directory: str) -> nn.Module | None:
    """The model written as a Caffe prototxt + caffemodel and imported (``sparsecnn.io.load_caffe``),
    checked against the original; None where Caffe cannot express it."""
    from sparsecnn.io import load_caffe
    from tests.caffe_writer import write

    layers = _caffe_layers(model)
    if layers is None:
        return None
    proto, weights = write(Path(directory), layers, tuple(x.shape))
    net = load_caffe(proto, weights)
    with torch.inference_mode():
        ref = copy.deepcopy(model).double()(x.double())
        err, base = _rel(net(x), ref), _rel(model(x), ref)
    assert err <= max(1e-4, 10 * base), f"Caffe import: rel error {err:.3g} (torch {base:.3g})"
    return net


@SETTINGS
@given(case=models_and_inputs(), how=st.sampled_from(["direct", "torch", "per-layer", "cost-model"]),
       threads=st.sampled_from([1, 2]), pick=st.randoms(use_true_random=False),
       via=st.sampled_from(["torch", "torch", "onnx", "caffe"]), concurrent=st.booleans(),
       structured=st.booleans())
def test_generated_model_compiles_to_the_dense_outputs(case, how, threads, pick, via, concurrent,
                                                       structured) -> None:
    model, x, other = case
    # SSL-like structure (whole filters and input channels zero), physically removed by shrink=True
    shrink = structured and via == "torch"
    if shrink:
        _zero_groups(model, np.random.default_rng(pick.randint(0, 2**31)))
        from sparsecnn.shrink import shrink as _shrink

        event("shrink: channels removed" if _shrink(model, x).changed else "shrink: nothing removable")
    before = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        if via == "onnx":  # the same model as an ONNX file, as a user of ONNX Runtime would bring it
            with tempfile.TemporaryDirectory() as d:
                model = _through_onnx(model, x, d)
            event("via ONNX")
        elif via == "caffe":  # or as a Caffe deploy prototxt + caffemodel
            with tempfile.TemporaryDirectory() as d:
                net = _through_caffe(model, x, d)
            if net is not None:
                model = net
                event("via Caffe")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # strategies that cannot run a geometry fall back, with a warning
            if how == "per-layer":
                probe = sparsecnn.compile(model, x, "torch", check=False, shrink=shrink)
                nodes = {key: n for n in probe._nodes for key in (n.name, n.target) if key}
                strategy = {name: pick.choice(CONV if _conv_of(nodes[name]) is not None else LINEAR)
                            for name in probe.plan.layers}
                compiled = sparsecnn.compile(model, x, strategy, shrink=shrink)  # check=True: no false alarm
                sparse = sparsecnn.sparsify(model, strategy, example_input=x, shrink=shrink)
            elif how == "cost-model":
                compiled = sparsecnn.compile(model, x, "auto", measure=False, tune=False, shrink=shrink)
                sparse = sparsecnn.sparsify(model, "auto", measure=False, example_input=x, shrink=shrink)
            else:
                compiled = sparsecnn.compile(model, x, how, shrink=shrink)
                sparse = sparsecnn.sparsify(model, how, example_input=x, shrink=shrink)
        widest = max((m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)), default=0)
        event("widest conv: " + ("> 16 channels" if widest > 16 else "<= 16 channels"))
        for kind in set(compiled.steps(tuple(x.shape))):
            event(kind.split("+")[0])  # what ran (make fuzz --hypothesis-show-statistics lists them)
        folded = _folded(model)
        with torch.inference_mode():
            # sparsify's layers run eagerly, BatchNorm unfolded: against the model itself in float64
            ok, err = _within_rounding(sparse(x), copy.deepcopy(model).double(), x)
            assert ok, f"sparsify: rel error {err:.3g}"
            for what, inp in (("first call", x), ("second call (buffers reused)", x),
                              (f"batch {other.shape[0]}", other)):
                ok, msg = _close(compiled(inp), folded, model, inp)
                steps = compiled.steps(tuple(inp.shape))
                assert ok, f"{what}: {msg}; plan {dict(compiled.plan)}; steps {steps}"
            if concurrent:
                # three Python threads calling the same compiled model at once, both input shapes
                inputs = [x, other, x * 0.5, other * 2.0, x, other]
                outs = call_from_threads(compiled, inputs, 3)
                for i, (inp, y) in enumerate(zip(inputs, outs, strict=True)):
                    ok, msg = _close(y, folded, model, inp)
                    assert ok, f"call {i} from 3 threads: {msg}"
    finally:
        numba.set_num_threads(before)
