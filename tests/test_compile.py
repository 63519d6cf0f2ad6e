"""The whole-model executor (``sparsecnn.compile``) against the dense torch model, and its kernels."""

from __future__ import annotations

import copy
import pickle
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsecnn
from sparsecnn import models
from sparsecnn.errors import SparseCNNError
from sparsecnn.kernels._numba import num_threads
from sparsecnn.kernels._simd import VW
from sparsecnn.kernels.elementwise import add_relu, global_avg_pool, max_pool2d, relu_
from tests.threads import call_from_threads


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def _randomise_bn(model: nn.Module, seed: int = 0) -> None:
    """Running statistics and affine terms away from the identity, so folding is tested for real."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)


ZOO = [
    ("lenet5", {"in_channels": 1, "input_size": 8}, "uniform:0.9"),
    ("alexnet", {"input_size": 99, "num_classes": 50}, "deep-compression"),
    ("vgg16", {"input_size": 32, "num_classes": 10}, "uniform:0.9"),
    ("resnet18", {"input_size": 64, "num_classes": 10}, "uniform:0.8"),
    ("resnet50", {"input_size": 32, "num_classes": 10}, "uniform:0.9"),
    ("mobilenet_v2", {"input_size": 64, "num_classes": 10}, "uniform:0.7"),
]


@pytest.mark.parametrize(("name", "kwargs", "profile"), ZOO, ids=[z[0] for z in ZOO])
@pytest.mark.parametrize("strategy", ["direct", "torch"])
def test_zoo_model_equals_dense(name: str, kwargs: dict, profile: str, strategy: str) -> None:
    model = models.build(name, **kwargs).eval()
    models.apply_profile(model, profile)
    _randomise_bn(model)
    x = torch.randn(2, *models.input_shape(model), generator=torch.Generator().manual_seed(1))
    compiled = sparsecnn.compile(model, x, strategy)
    with torch.inference_mode():
        ref = model(x)
    assert _rel(compiled(x), ref) <= 1e-4
    assert compiled.max_rel_error <= 1e-4
    kinds = compiled.steps(tuple(x.shape))
    assert not any(k.startswith("torch:") for k in kinds), kinds  # every zoo op runs in the engine
    if name.startswith("resnet"):
        # the residual add carries its ReLU; a direct conv takes both into its epilogue
        assert ("conv:direct+add+relu" if strategy == "direct" else "add+relu") in kinds, kinds
        assert "add+relu" not in kinds or strategy != "direct"
        assert any(k.endswith("+relu") and k.startswith("conv:") for k in kinds)  # BN folded, ReLU fused
    if name == "mobilenet_v2" and strategy == "direct":
        # each of the 17 depthwise layers takes the ReLU6 before it (the first conv's or the 1x1
        # expansion's) and the one after it; the last 1x1 layer's ReLU6 is a step of its own
        assert kinds.count("clamp>conv:direct+clamp") == 17 and kinds.count("clamp") == 1, kinds
    # another batch size gets its own program, same answers
    x1 = x[:1]
    with torch.inference_mode():
        assert _rel(compiled(x1), model(x1)) <= 1e-4


@pytest.mark.parametrize(("batch", "want", "not_want"),
                         [(1, "spmv-act", "direct"), (4, "direct", "spmv-act")])
def test_executor_tunes_linears_with_the_batch_lanes_form_from_batch_2(batch, want, not_want) -> None:
    from types import SimpleNamespace

    from sparsecnn import engine

    node = SimpleNamespace(args=[SimpleNamespace(name="x")], fn=nn.Linear(6, 3))
    names = engine._tune_candidates(node, SimpleNamespace(strategy="torch"), {"x": torch.zeros(batch, 6)})
    assert names[0] == "torch" and want in names and not_want not in names


def test_linears_in_the_batch_lanes_form_from_four_threads() -> None:
    """Linears planned ``direct`` (the batch in the vector lanes) run as bound steps with ReLU fused,
    equal to the dense model, and from 4 threads at once (each thread its own transposed buffers)."""
    model = models.build("alexnet", input_size=99, num_classes=50).eval()
    models.apply_profile(model, "deep-compression")
    plan = {n: "direct" for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, *models.input_shape(model), generator=g)
    compiled = sparsecnn.compile(model, x, plan)
    kinds = compiled.steps(tuple(x.shape))
    assert kinds.count("linear:direct+relu") == 2 and kinds.count("linear:direct") == 1, kinds
    inputs = [torch.randn((3, 5, 1)[i % 3], *models.input_shape(model), generator=g) for i in range(24)]
    with torch.inference_mode():
        refs = [model(v) for v in inputs]
    out = call_from_threads(compiled, inputs, 4)
    assert all(o is not None and _rel(o, r) <= 1e-4 for o, r in zip(out, refs, strict=True))


def test_auto_plan_cost_model_and_numpy_callable(tmp_path) -> None:
    model = models.build("alexnet", input_size=67, num_classes=10).eval()
    models.apply_profile(model, "uniform:0.9")
    x = torch.randn(1, 3, 67, 67, generator=torch.Generator().manual_seed(0))
    compiled = sparsecnn.compile(model, x, measure=False, plan_path=tmp_path / "plans.json")
    layers = {n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert set(compiled.plan) == layers
    with torch.inference_mode():
        ref = model(x).numpy()
    y = compiled.numpy(x.numpy())
    assert isinstance(y, np.ndarray) and y.dtype == np.float32
    assert np.abs(y - ref).max() / np.abs(ref).max() <= 1e-4
    # outputs are fresh arrays: the next call does not overwrite them
    y2 = compiled.numpy(x.numpy() * 2)
    assert not np.allclose(y, y2)
    assert np.abs(y - ref).max() / np.abs(ref).max() <= 1e-4


def test_executor_tuning_is_cached_with_the_plan(tmp_path, monkeypatch) -> None:
    """``compile(..., "auto")`` stores each layer's executor timing decision in the plan cache: a second
    build with the same cache re-times nothing (``_tune`` is not called) and builds the same plan; a
    cached decision is what the build follows (an entry edited to ``torch`` runs that layer through
    torch)."""
    import json

    from sparsecnn import engine

    model = models.build("lenet5").eval()
    models.apply_profile(model, "uniform:0.9")
    x = torch.randn(1, *models.input_shape(model), generator=torch.Generator().manual_seed(0))
    path = tmp_path / "plans.json"
    first = sparsecnn.compile(model, x, "auto", plan_path=path, layout="plain")
    entries = json.loads(path.read_text())["entries"]
    tuned = {k: e for k, e in entries.items() if k.startswith("executor-pass|")}
    layers = {n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert len(tuned) == len(layers)

    def refuse(*args, **kwargs):
        raise AssertionError("re-timed a layer whose decision is cached")

    monkeypatch.setattr(engine, "_tune", refuse)
    second = sparsecnn.compile(model, x, "auto", plan_path=path, layout="plain")
    assert dict(second.plan) == dict(first.plan)
    # follow an edited decision: the first conv through the other of torch and direct
    conv1 = next(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    other = "direct" if first.plan[conv1] == "torch" else "torch"
    key = next(k for k in tuned if k.split("|")[1].startswith("conv20x1"))
    assert other in key.split("|")[5].split(",")  # one of the candidates the executor times
    entries[key]["strategy"] = other
    path.write_text(json.dumps({**json.loads(path.read_text()), "entries": entries}))
    third = sparsecnn.compile(model, x, "auto", plan_path=path, layout="plain")
    assert third.plan[conv1] == other != first.plan[conv1]
    # recorded as the executor's decision, unless the planner's own (cached) choice was that already
    planner = sparsecnn.compile(model, x, "auto", plan_path=path, layout="plain", tune=False).plan[conv1]
    assert third.plan.layers[conv1].source == ("cache" if planner == other else "executor")
    assert any(k.startswith(f"conv:{other}") for k in third.steps(tuple(x.shape)))
    with torch.inference_mode():
        ref = model(x)
        for c in (second, third):
            assert _rel(c(x), ref) <= 1e-4


@pytest.mark.parametrize("alt_faster", [True, False])
def test_torch_choices_are_checked_in_the_whole_pass(tmp_path, monkeypatch, alt_faster) -> None:
    """A layer the executor's tuning gives to torch is timed again in the whole forward pass against
    its fastest numba alternative (``engine._torch_in_pass``); the faster pass keeps its layer, the
    decision goes to the plan cache marked ``in_pass``, and a rebuild re-times nothing."""
    import json

    from sparsecnn import engine
    from sparsecnn.layers import SparseConv2d

    model = models.build("lenet5").eval()
    models.apply_profile(model, "uniform:0.9")
    x = torch.randn(1, *models.input_shape(model), generator=torch.Generator().manual_seed(0))
    conv1 = next(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    tune = engine._tune

    def torch_for_conv1(node, layer, values):
        if layer.name != conv1:
            return tune(node, layer, values)
        pick = [SparseConv2d.from_dense(node.fn, s, name=conv1) for s in ("torch", "direct")]
        return pick[0], pick[1]

    passes: list[int] = []

    def whole_passes(fns, rounds=5, min_time_s=0.002):
        for f in fns:
            f()  # each side runs (and is correct: the compile's check below reads the kept one)
        passes.append(len(fns))
        return [2.0, 1.0] if alt_faster else [1.0, 2.0]

    monkeypatch.setattr(engine, "_tune", torch_for_conv1)
    monkeypatch.setattr(engine, "_time_steps", whole_passes)
    path = tmp_path / "plans.json"
    first = sparsecnn.compile(model, x, "auto", plan_path=path, layout="plain")
    want = "direct" if alt_faster else "torch"
    assert first.plan[conv1] == want
    assert any(k.startswith(f"conv:{want}") for k in first.steps(tuple(x.shape)))
    entries = json.loads(path.read_text())["entries"]
    checked = [e for k, e in entries.items() if k.startswith("executor-pass|conv20x1")]
    assert checked == [{"strategy": want, "in_pass": True, "times_s": {}}]
    assert passes and passes[0] == 2
    with torch.inference_mode():
        assert _rel(first(x), model(x)) <= 1e-4

    def refuse(*args, **kwargs):
        raise AssertionError("re-timed a decision the plan cache holds")

    monkeypatch.setattr(engine, "_tune", refuse)
    monkeypatch.setattr(engine, "_torch_in_pass", refuse)
    second = sparsecnn.compile(model, x, "auto", plan_path=path, layout="plain")
    assert dict(second.plan) == dict(first.plan)


@pytest.mark.parametrize(("first", "second", "wins"), [
    ([1.0, 0.5], None, True),  # clear: no second timing
    ([1.0, 1.5], None, False),
    ([1.0, 0.98], [1.0, 1.02], False),  # close: the longer second timing outweighs the first
    ([1.0, 1.02], [1.0, 0.97], True),
    ([1.0, 0.995], [1.0, 0.995], False),  # faster, but under the 1% margin
])
def test_alt_pass_wins_retimes_close_calls(monkeypatch, first, second, wins) -> None:
    """``engine._alt_pass_wins``: a numba layer replaces a torch one in the pass only with a 1% margin,
    and a first comparison within 5% is timed again with more rounds before it decides."""
    from sparsecnn import engine

    answers = [first] + ([second] if second is not None else [])
    calls: list[int] = []

    def timed(fns, rounds=5, min_time_s=0.002):
        calls.append(rounds)
        return answers[len(calls) - 1]

    monkeypatch.setattr(engine, "_time_steps", timed)
    assert engine._alt_pass_wins(lambda: None, lambda: None) is wins
    assert len(calls) == len(answers)
    assert calls[0] == 7 and all(3 <= r <= 14 for r in calls[1:])


def test_time_in_pass_times_each_function() -> None:
    """``engine._time_in_pass`` gives one median per function, in order, and each longer call longer."""
    import time

    from sparsecnn import engine

    calls = [0, 0]

    def short():
        calls[0] += 1

    def long():
        calls[1] += 1
        time.sleep(0.003)

    t = engine._time_in_pass([short, long], rounds=3)
    assert calls == [4, 4]  # one warm-up and one call a round
    assert 0 < t[0] < 0.003 <= t[1]


class _Odd(nn.Module):
    """Ops the engine runs natively next to ones it leaves to torch (softmax, sigmoid, cat, permute)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 8, 3, padding=2, dilation=2, bias=False)
        self.pool = nn.AvgPool2d(3, stride=2, padding=1)
        self.fc = nn.Linear(16 * 5 * 5, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn(self.a(x)))
        z = torch.sigmoid(self.b(y))
        y = torch.cat([y, z * 2.0], dim=1)  # shared input y: conv a's ReLU stays its own step
        y = self.pool(y).float()  # .float() returns its input: a view the engine must not let go stale
        y = y.permute(0, 1, 3, 2).contiguous()
        y = F.max_pool2d(y, 2, ceil_mode=True)
        return torch.softmax(self.fc(y.view(y.size(0), -1)), dim=1) + y.mean()


def test_user_module_with_fallback_ops() -> None:
    torch.manual_seed(0)
    net = _Odd().eval()
    _randomise_bn(net)
    x = torch.randn(3, 3, 17, 17)
    compiled = sparsecnn.compile(net, x, "direct")
    with torch.inference_mode():
        assert _rel(compiled(x), net(x)) <= 1e-4
    kinds = compiled.steps(tuple(x.shape))
    assert any(k.startswith("torch:") for k in kinds) and "conv:direct" in kinds


def test_onnx_file_runs_through_the_engine(tmp_path) -> None:
    pytest.importorskip("onnx")
    from sparsecnn.io import export_onnx

    model = models.build("resnet18", input_size=32, num_classes=10).eval()
    models.apply_profile(model, "uniform:0.8")
    _randomise_bn(model)
    path = tmp_path / "r18.onnx"
    export_onnx(model, path, input_shape=(3, 32, 32))
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    compiled = sparsecnn.compile(str(path), x, "direct")
    with torch.inference_mode():
        assert _rel(compiled(x), model(x)) <= 1e-4
    assert "conv:direct+add+relu" in compiled.steps((1, 3, 32, 32))


class _Residuals(nn.Module):
    """Residual adds the executor may and may not fuse into a direct conv's epilogue."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 8, 1)
        self.d = nn.Conv2d(8, 8, 1, bias=False)
        self.e = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.a(x))
        z = torch.relu(self.b(y) + y)  # fused: y is ready before b runs (conv:direct+add+relu)
        u = self.c(z) + self.d(z)  # both convs: the later one (d) takes the add, no ReLU
        v = self.e(u)
        w = v + u  # not fused: v is also read below
        return w * 0.5 + v


def test_residual_adds_fused_into_the_conv() -> None:
    torch.manual_seed(0)
    net = _Residuals().eval()
    models.apply_profile(net, "uniform:0.5")
    x = torch.randn(2, 4, 9, 11)
    compiled = sparsecnn.compile(net, x, "direct")
    kinds = compiled.steps(tuple(x.shape))
    assert kinds.count("conv:direct+add+relu") == 1 and kinds.count("conv:direct+add") == 1, kinds
    assert kinds.count("add") == 2, kinds  # v + u (v read twice) and w * 0.5 + v (no conv)
    with torch.inference_mode():
        for xb in (x, x[:1], torch.randn(3, 4, 6, 5)):
            assert _rel(compiled(xb), net(xb)) <= 1e-5
    # as a step of its own when the fusion is off (the A/B baseline), same answers
    from sparsecnn.engine import _lower

    saved = _lower.FUSE_RESIDUAL
    try:
        _lower.FUSE_RESIDUAL = False
        plain = sparsecnn.compile(net, x, "direct")
        assert not any("+add" in k for k in plain.steps(tuple(x.shape)))
        assert torch.equal(plain(x), compiled(x))
    finally:
        _lower.FUSE_RESIDUAL = saved


class _TinyResNet(nn.Module):
    """A stem, one residual block with BatchNorm and a projection, pools and a linear: every kind of
    step the zoo's ResNets lower to, small enough for 200 calls from 4 threads."""

    def __init__(self, width: int = 24) -> None:
        super().__init__()
        from sparsecnn.models.zoo import BasicBlock

        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.block = BasicBlock(16, width, stride=2)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.bn(self.stem(x))))
        return self.fc(torch.flatten(self.gap(self.block(x)), 1))


@pytest.mark.parametrize("layout", ["plain", "blocked", "fused"])
def test_compiled_model_from_four_threads(layout: str) -> None:
    """Every thread its own buffers and workspaces, also for channel-blocked activations (the block's
    convs at 50%: dense enough to run the channel-vector GEMM) and MobileNet-v2's inverted residual
    blocks run as one step each (``fused``: each thread its own rings and row buffers)."""
    torch.manual_seed(0)
    side = 64 if layout == "fused" else 16
    if layout == "fused":
        model = models.build("mobilenet_v2", input_size=side, num_classes=10).eval()
    else:
        model = _TinyResNet(32 if layout == "blocked" else 24).eval()
    _randomise_bn(model)
    models.apply_profile(model, "uniform:0.7" if layout == "plain" else "uniform:0.5")
    layout = "blocked" if layout == "fused" else layout
    compiled = sparsecnn.compile(model, torch.randn(1, 3, side, side), "direct", layout=layout)
    assert compiled.layout == layout
    kinds = compiled.steps((1, 3, side, side))
    assert any(k.startswith("conv:blocked") for k in kinds) == (layout == "blocked")
    assert any("expand" in k for k in kinds) == (side == 64 and num_threads() <= 2), kinds
    g = torch.Generator().manual_seed(5)
    shapes = [(1, 3, side, side), (2, 3, side, side), (1, 3, side + 4, side + 4)]
    inputs = [torch.randn(shapes[(i // 4) % 3], generator=g) for i in range(200)]
    with torch.inference_mode():
        refs = [model(x) for x in inputs]
    out: list = [None] * len(inputs)
    barrier = threading.Barrier(4)
    errors: list = []

    def work(t: int) -> None:
        try:
            barrier.wait()
            for i in range(t, len(inputs), 4):
                out[i] = compiled(inputs[i])
        except BaseException as exc:  # re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    assert not errors, errors[0]
    bad = [i for i in range(len(inputs)) if out[i] is None or _rel(out[i], refs[i]) > 1e-4]
    assert not bad, f"{len(bad)} of {len(inputs)} outputs wrong"


BLOCKED_ZOO = [
    ("resnet18", {"input_size": 64, "num_classes": 10}),
    ("resnet50", {"input_size": 32, "num_classes": 10}),
    ("vgg16", {"input_size": 32, "num_classes": 10}),
    ("alexnet", {"input_size": 99, "num_classes": 50}),
    ("mobilenet_v2", {"input_size": 64, "num_classes": 10}),
]


@pytest.mark.parametrize(("name", "kwargs"), BLOCKED_ZOO, ids=[z[0] for z in BLOCKED_ZOO])
def test_zoo_model_with_blocked_activations_equals_dense(name: str, kwargs: dict) -> None:
    """Dense zoo models with channel-blocked activations (layout="blocked"): the same outputs; the
    ResNets' residual adds fused into blocked convs, the pools blocked, a plain copy made for VGG's
    flatten; AlexNet's grouped layers and LRN leave nothing to block."""
    model = models.build(name, **kwargs).eval()
    _randomise_bn(model)
    x = torch.randn(2, *models.input_shape(model), generator=torch.Generator().manual_seed(1))
    compiled = sparsecnn.compile(model, x, "direct", layout="blocked")
    kinds = compiled.steps(tuple(x.shape))
    with torch.inference_mode():
        ref = model(x)
        assert _rel(compiled(x), ref) <= 1e-4
        assert _rel(compiled(x[:1]), model(x[:1])) <= 1e-4
    if name == "alexnet":
        assert not any(k.startswith("conv:blocked") for k in kinds) and compiled.layout == "plain", kinds
        return
    assert compiled.layout == "blocked"
    if name == "mobilenet_v2":
        # the depthwise layers in the chain too (engine._layout.DEPTHWISE), each with the ReLU6s before
        # and after it fused, each computing the projecting 1x1 layer after it (with the residual add)
        # and the 16 after an expanding 1x1 layer that one too, where each thread gets enough rows or
        # whole images (kernels.expand_depthwise; at batch 2 and 2 threads, all of them); off, the
        # chains stop at them
        dw = [k for k in kinds if "blocked-dw" in k]
        expand, project = sum("expand" in k for k in dw), sum("+project" in k for k in dw)
        assert len(dw) == 17 and all(k.startswith("clamp>") and "dw+clamp" in k for k in dw), kinds
        assert (expand, project) == (16, 17) or num_threads() != 2, kinds
        assert sum(k.endswith("+project+add") for k in dw) == 10 or num_threads() != 2, kinds  # residuals
        assert kinds[0].startswith("conv:blocked") and "to-plain" not in kinds, kinds
        assert kinds.count("conv:blocked") + kinds.count("conv:blocked+add") == 35 - expand - project, kinds
        from sparsecnn.engine import _layout, _lower

        for module, flag, gone in ((_lower, "FUSE_EXPAND", "+project"), (_layout, "DEPTHWISE", "blocked-dw")):
            setattr(module, flag, False)
            try:
                off = sparsecnn.compile(model, x, "direct", layout="blocked")
            finally:
                setattr(module, flag, True)
            assert not any(gone in k for k in off.steps(tuple(x.shape))), flag
            with torch.inference_mode():
                assert _rel(off(x), ref) <= 1e-4
        return
    # the max pools read and write the blocked layout, ResNet's average pool reads it
    assert kinds[0].startswith("conv:blocked") and "maxpool:blocked" in kinds, kinds
    if name.startswith("resnet"):
        assert "avgpool:blocked" in kinds and "to-plain" not in kinds and "maxpool" not in kinds, kinds
        assert "conv:blocked+add+relu" in kinds and "add+relu" not in kinds, kinds
    else:  # VGG's last pool feeds the flatten: the conv before it writes plain for it
        assert "to-plain" not in kinds and kinds.count("maxpool") == 1, kinds


class _Mixed(nn.Module):
    """Blocked chains broken by a grouped conv, a conv with 24 filters, a sparse conv and a flatten."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.c = nn.Conv2d(32, 32, 3, padding=1, groups=2)
        self.d = nn.Conv2d(32, 32, 1)
        self.e = nn.Conv2d(32, 32, 3, padding=1)
        self.f = nn.Conv2d(32, 24, 1)
        self.fc = nn.Linear(24 * 25, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = torch.relu(self.b(torch.relu(self.a(x))))
        u = torch.relu(self.c(b) + self.d(b))
        v = self.e(u) + u
        return self.fc(torch.flatten(self.f(torch.relu(v)), 1))


def test_blocked_chains_around_what_cannot_read_them() -> None:
    torch.manual_seed(0)
    net = _Mixed().eval()
    with torch.no_grad():
        net.e.weight.mul_((torch.rand_like(net.e.weight) > 0.9).float())  # 10% dense: stays sparse
    x = torch.randn(2, 3, 10, 10)
    compiled = sparsecnn.compile(net, x, "direct", layout="blocked")
    kinds = compiled.steps(tuple(x.shape))
    # a writes blocked, b reads and writes it, d reads it (adding c's output, plain); c (grouped) reads a
    # plain copy of b's output; e (10% dense) adds u into its own output; f has 24 filters
    assert sum(k.startswith("conv:blocked") for k in kinds) == 3, kinds
    assert kinds.count("to-plain") == 1, kinds
    assert "conv:blocked+add+relu" in kinds and "conv:direct+add+relu" in kinds, kinds
    with torch.inference_mode():
        for xb in (x, x[:1], torch.randn(3, 3, 10, 10)):
            assert _rel(compiled(xb), net(xb)) <= 1e-5
    plain = sparsecnn.compile(net, x, "direct", layout="plain")
    assert plain.layout == "plain" and not any("blocked" in k for k in plain.steps(tuple(x.shape)))
    auto = sparsecnn.compile(net, x, "auto", layout="auto")
    assert auto.layout in ("plain", "blocked")
    with torch.inference_mode():
        assert _rel(auto(x), net(x)) <= 1e-5
    with pytest.raises(SparseCNNError, match="layout must be"):
        sparsecnn.compile(net, x, "direct", layout="nchw16c")


def test_pickle_and_deepcopy() -> None:
    model = models.build("lenet5", in_channels=1, input_size=8).eval()
    models.apply_profile(model, "uniform:0.9")
    x = torch.randn(1, 1, 8, 8)
    compiled = sparsecnn.compile(model, x, "direct")
    y = compiled(x)
    for other in (copy.deepcopy(compiled), pickle.loads(pickle.dumps(compiled))):
        assert torch.equal(other(x), y)


def test_bad_input() -> None:
    model = models.build("lenet5", in_channels=1, input_size=8).eval()
    compiled = sparsecnn.compile(model, torch.randn(1, 1, 8, 8), "direct")
    with pytest.raises(SparseCNNError, match="does not fit the model"):
        compiled(torch.randn(1, 3, 8, 8))
    with pytest.raises(SparseCNNError, match=r"torch\.Tensor"):
        compiled(np.zeros((1, 1, 8, 8), np.float32))
    with pytest.raises(SparseCNNError, match="float numpy array"):
        compiled.numpy(np.zeros((1, 1, 8, 8), np.int32))
    with pytest.raises(SparseCNNError, match="unknown strategy"):
        sparsecnn.compile(model, torch.randn(1, 1, 8, 8), "fastest")
    with pytest.raises(SparseCNNError, match="lacks"):
        sparsecnn.compile(model, torch.randn(1, 1, 8, 8), {"nope": "direct"})

    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(SparseCNNError, match="could not trace"):
        sparsecnn.compile(Branchy(), torch.randn(1, 1, 4, 4))
    with pytest.raises(SparseCNNError, match="Module or a model path"):
        sparsecnn.compile(42)


def _cancelling_model() -> tuple[nn.Module, torch.Tensor]:
    """conv + BatchNorm + a linear whose one output cancels to ~1e-5 of its terms' sum: folding the
    BatchNorm alone moves it by more than 1e-4 of itself."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Flatten(),
                          nn.Linear(8 * 16 * 16, 1)).eval()
    _randomise_bn(model)
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        m64 = copy.deepcopy(model).double()
        terms = m64[3].weight[0] * m64[:3](x.double())[0]
        model[3].bias.fill_(float(-terms.sum() + 1e-5 * terms.abs().sum()))
    return model, x


@pytest.mark.parametrize("strategy", ["torch", "direct"])
def test_check_tells_rounding_from_a_wrong_result(strategy: str, monkeypatch) -> None:
    model, x = _cancelling_model()
    compiled = sparsecnn.compile(model, x, strategy)  # the check's second opinion: folding, not a bug
    assert 1e-4 < compiled.max_rel_error <= 1e-2
    # a kernel that is wrong by more than rounding can explain is still caught
    from sparsecnn.engine import _lower

    real = _lower._bind_gemm

    def off(env, x, s, wt, bt, relu):
        run = real(env, x, s, wt, bt, relu)

        def step(env=env):
            run()
            env[s] += 5e-3 * np.abs(env[s]).max()
        return step

    monkeypatch.setattr(_lower, "_bind_gemm", off)
    with torch.no_grad():
        model[3].bias.zero_()  # no cancellation: 5e-3 of the output is far above its rounding
    with pytest.raises(SparseCNNError, match="differs from the original"):
        sparsecnn.compile(model, x, "torch")


# --------------------------------------------------------------------------------------------------
# kernels


@pytest.mark.parametrize("seed", range(80))
def test_max_pool_matches_torch(seed: int, monkeypatch) -> None:
    # windows 1-4 wide (2 and 3 have their own unrolled column pass), NaN in some planes; odd seeds
    # run every plane through the tiny-plane loop, even ones through the separable kernel
    from sparsecnn.kernels import elementwise

    monkeypatch.setattr(elementwise, "_SMALL_PLANE", 1 << 30 if seed % 2 else 0)
    rng = np.random.default_rng(seed)
    k = tuple(int(v) for v in rng.integers(1, 5, 2))
    s = tuple(int(v) for v in rng.integers(1, 4, 2))
    p = tuple(int(rng.integers(0, kk // 2 + 1)) for kk in k)
    d = tuple(int(v) for v in rng.integers(1, 3, 2))
    ceil = bool(rng.integers(0, 2))
    h, w = (int(v) for v in rng.integers(8, 20, 2))  # >= the widest window (4 taps, dilation 2)
    x = torch.from_numpy(rng.standard_normal((2, 3, h, w)).astype(np.float32))
    if seed % 4 in (0, 1):
        x[0, 1, 2, 3] = float("nan")
    ref = F.max_pool2d(x, k, s, p, d, ceil_mode=ceil)
    out = np.empty(tuple(ref.shape), np.float32)
    max_pool2d(x.numpy(), out, k, s, p, d)
    np.testing.assert_array_equal(out, ref.numpy())  # exact, NaN where torch has NaN


@pytest.mark.parametrize("padding", [0, 1])
def test_3x3_stride_2_pools_take_nan_and_inf_in_every_lane(padding: int) -> None:
    """AlexNet's and ResNet's 3x3 / 2 pools run as whole vectors (``_simd.max3_rows``, ``max3_cols2``:
    even and odd lanes, and the even lanes moved one on): a NaN or -inf in each lane position of a
    group of outputs, and rows of 4 * VW + 3 outputs (whole vectors and a scalar tail), against torch."""
    w = 2 * (4 * VW + 3) + 1
    x = torch.randn(2, 3, 9, w, generator=torch.Generator().manual_seed(padding))
    for lane in range(2 * VW + 1):  # one special value per row and plane, at every column of a group
        x[lane % 2, lane % 3, lane % 9, lane] = float("nan") if lane % 4 else float("-inf")
    x[1, 1, 4, :] = float("-inf")
    ref = F.max_pool2d(x, 3, 2, padding)
    out = np.empty(tuple(ref.shape), np.float32)
    max_pool2d(x.numpy(), out, (3, 3), (2, 2), (padding, padding), (1, 1))
    np.testing.assert_array_equal(out, ref.numpy())


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("window", [(2, 2), (3, 3), (2, 3), (1, 4)])
def test_tiling_max_pools_match_torch(batch: int, window: tuple[int, int]) -> None:
    """Windows that tile small planes (stride = window, no padding) run as one tall image
    (``_max_pool_tiled``): serial at batch 1, split among the threads above, NaN kept as torch."""
    import numba

    from sparsecnn.kernels.elementwise import bind_max_pool2d

    rng = np.random.default_rng(sum(window) + batch)
    h, w = 8 // window[0] * window[0], 8 // window[1] * window[1]  # whole windows, at most 64 pixels
    x = torch.from_numpy(rng.standard_normal((batch, 5, h, w)).astype(np.float32))
    x[0, 1, 0, 0] = float("nan")
    x[-1, 4, h - 1, w - 1] = float("nan")
    ref = F.max_pool2d(x, window, window).numpy()
    threads = numba.get_num_threads()
    try:
        for t in sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)}):
            numba.set_num_threads(t)
            out = np.full(ref.shape, 7.0, np.float32)
            run = bind_max_pool2d(tuple(x.shape), out, window, window, (0, 0), (1, 1))
            assert run.__name__ == "run_tiled"
            run(x.numpy())
            np.testing.assert_array_equal(out, ref)
    finally:
        numba.set_num_threads(threads)


def test_elementwise_kernels_match_torch() -> None:
    rng = np.random.default_rng(0)
    for n in (5, 1000, 70_001):
        a = rng.standard_normal(n).astype(np.float32)
        b = rng.standard_normal(n).astype(np.float32)
        a[0] = np.nan
        out = np.empty_like(a)
        add_relu(a, b, out, True)
        np.testing.assert_array_equal(out, torch.relu(torch.from_numpy(a) + torch.from_numpy(b)).numpy())
        add_relu(a, b, out, False)
        np.testing.assert_array_equal(out, a + b)
        c = a.copy()
        relu_(c)
        np.testing.assert_array_equal(c, torch.relu(torch.from_numpy(a)).numpy())
    x = rng.standard_normal((2, 5, 7, 7)).astype(np.float32)
    g = np.empty((2, 5), np.float32)
    global_avg_pool(x, g)
    np.testing.assert_allclose(g, x.mean(axis=(2, 3)), rtol=1e-5, atol=1e-6)


def test_structured_ssl_model_compiles_shrunk() -> None:
    """compile(shrink=True): SSL's removed filters and channels are gone from the compiled layers."""
    model = models.build("alexnet", input_size=99, num_classes=20).eval()
    models.apply_profile(model, "ssl")
    x = torch.randn(1, 3, 99, 99, generator=torch.Generator().manual_seed(3))
    compiled = sparsecnn.compile(model, x, "direct", shrink=True)
    with torch.inference_mode():
        assert _rel(compiled(x), model(x)) <= 1e-4
    convs = {layer.name: layer for layer in compiled.layers if hasattr(layer, "out_channels")}
    assert convs["conv3"].out_channels < model.conv3.out_channels


def test_engine_workspaces_made_while_building_stay_writable() -> None:
    """Layers that keep torch workspace tensors (lowered) run after the program was built (its shape
    recording must not leave them inference tensors) and when the input is an inference tensor."""
    model = models.build("alexnet", input_size=67, num_classes=10).eval()
    models.apply_profile(model, "ssl")  # removed filters: lowered keeps a torch buffer for the compact rows
    with torch.inference_mode():
        x = torch.randn(2, 3, 67, 67)
    compiled = sparsecnn.compile(model, x, "lowered")
    y = compiled(x.clone())
    with torch.inference_mode():
        assert _rel(y, model(x)) <= 1e-4


def test_programs_are_built_from_shapes_not_a_forward_pass(monkeypatch) -> None:
    from sparsecnn import engine

    model = models.build("vgg16", input_size=32, num_classes=10).eval()
    models.apply_profile(model, "uniform:0.9")
    compiled = sparsecnn.compile(model, torch.randn(1, 3, 32, 32), "direct")

    def no_forward(*args, **kwargs):
        raise AssertionError("a program was built by running the model")

    monkeypatch.setattr(engine._graph, "record", no_forward)
    monkeypatch.setattr(engine, "record", no_forward)
    prog = compiled.program((512, 3, 32, 32))  # shapes only: no 512-image activations held
    assert prog.kinds == compiled.program((1, 3, 32, 32)).kinds
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert _rel(compiled(x), model(x)) <= 1e-4
    monkeypatch.undo()
    with pytest.raises(SparseCNNError, match="does not fit the model"):
        compiled.program((1, 3, 8, 8))  # too small for the pools


def _through_numpy(y: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.tanh(y.detach().numpy()))  # reads the values: no meta kernel


torch.fx.wrap("_through_numpy")


class _NeedsData(nn.Module):
    """An op that reads its input's values: shapes are recorded on zeros instead."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(_through_numpy(self.conv(x)), 1))


def test_a_model_that_needs_data_falls_back_to_recording_a_forward_pass() -> None:
    model = _NeedsData().eval()
    models.apply_profile(model, "uniform:0.5")
    compiled = sparsecnn.compile(model, torch.randn(1, 2, 6, 6), "direct")
    x = torch.randn(5, 2, 6, 6, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert _rel(compiled(x), model(x)) <= 1e-4


def test_a_batch_too_big_for_memory_is_refused_before_allocating(monkeypatch) -> None:
    model = models.build("lenet5", in_channels=1, input_size=8).eval()
    compiled = sparsecnn.compile(model, torch.randn(1, 1, 8, 8), "direct")
    monkeypatch.setenv("SPARSECNN_MEMORY_LIMIT", "1e6")
    # 1e6 bytes: enough for batch 1's buffers, not for batch 4096's (a few MB)
    with pytest.raises(SparseCNNError, match=r"activation buffers.*smaller batch"):
        compiled.numpy(np.zeros((4096, 1, 8, 8), np.float32))
    assert compiled.numpy(np.zeros((1, 1, 8, 8), np.float32)).shape == (1, 10)



@pytest.mark.parametrize(("threads", "batch", "shared", "nbuf"), [(2, 1, 2, 4), (2, 2, 0, 5), (1, 1, 0, 2),
                                                          (1, 2, 0, 2)])
def test_buffers_read_in_place_by_every_thread_are_not_reused(monkeypatch, threads, batch, shared,
                                                              nbuf) -> None:
    """The inputs of 1x1 convs (read in place) while two threads split the filters keep their buffers:
    a later value would rewrite lines the other core still holds. Split by images, every value has
    its own buffer (each image stays with one core); on one thread every dead buffer is reused. The
    outputs are the same either way."""
    from sparsecnn.kernels import _numba

    monkeypatch.setattr(_numba, "num_threads", lambda: threads)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 1), nn.ReLU(), nn.Conv2d(16, 16, 1), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 1), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1)).eval()
    models.apply_profile(model, "uniform:0.5")
    x = torch.randn(batch, 8, 12, 12)
    compiled = sparsecnn.compile(model, x, "direct")
    with torch.inference_mode():
        assert _rel(compiled(x), model(x)) <= 1e-4
    prog = compiled.program(tuple(x.shape))
    # Planned values: the five conv outputs (ReLUs fused). The 1x1 convs 2 and 4 read conv 1's and
    # conv 3's outputs in place (conv 1 reads the caller's input, not a planned buffer). Reused:
    # A, B, A, B, A. Kept: A (shared), B, C (shared), B, D. Own: A, B, C, D, E.
    assert len(prog.shared) == shared
    assert len(prog.buffers) == nbuf


def test_own_buffers_past_the_cap_or_memory_are_reused(monkeypatch) -> None:
    """Split by images, each value's own buffer only while they fit the cap and a quarter of the
    available memory; past either, dead buffers are reused, with the same outputs."""
    from sparsecnn.engine import _lower
    from sparsecnn.kernels import _numba

    monkeypatch.setattr(_numba, "num_threads", lambda: 2)
    model = models.build("resnet18", input_size=32, num_classes=10).eval()
    models.apply_profile(model, "uniform:0.8")
    _randomise_bn(model)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = model(x)

    def compiled_bytes():
        c = sparsecnn.compile(model, x, "direct")
        with torch.inference_mode():
            assert _rel(c(x), ref) <= 1e-4
        return 4 * sum(c.program(tuple(x.shape)).buffers)

    own = compiled_bytes()
    monkeypatch.setattr(_lower, "OWN_BUFFERS_MAX_BYTES", own - 1)
    reused = compiled_bytes()
    assert reused < own / 2  # ResNet-18: 2-3 live activations at a time out of ~30 values
    monkeypatch.setattr(_lower, "OWN_BUFFERS_MAX_BYTES", own)
    assert compiled_bytes() == own
    monkeypatch.setenv("SPARSECNN_MEMORY_LIMIT", str(4 * own - 1))
    assert compiled_bytes() == reused


class _SevenBySeven(nn.Module):
    """Direct convs on 7x7 planes (49 floats: not whole vectors), read by what can and cannot take
    planes padded to whole vectors."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 1)
        self.c = nn.Conv2d(16, 16, 1)
        self.d = nn.Conv2d(16, 16, 3, padding=1)
        self.e = nn.Conv2d(16, 16, 1)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.a(x))  # padded: read by b (1x1) and as c's residual
        z = torch.relu(self.b(y))  # padded: read by c
        u = torch.relu(self.c(z) + y)  # padded: read by d, e and the global average pool
        v = self.d(u)  # plain: torch reads it (v * 0.5)
        w = self.e(u) + v  # plain: its residual v is plain
        return self.fc(torch.flatten(self.gap(u), 1)) + w.mean((2, 3))[:, :5] * 0.5 + (v * 0.5).sum()


def test_direct_chains_write_planes_padded_to_whole_vectors() -> None:
    from sparsecnn.engine import _lower

    torch.manual_seed(0)
    net = _SevenBySeven().eval()
    models.apply_profile(net, "uniform:0.5")
    x = torch.randn(2, 4, 7, 7)
    compiled = sparsecnn.compile(net, x, "direct", layout="plain")
    padded = compiled.program(tuple(x.shape)).padded
    assert {"a", "b", "c"} <= set(padded) and not {"d", "e"} & set(padded), padded
    assert set(padded.values()) == {-(-49 // VW) * VW}
    assert not compiled.program((1, 4, 8, 8)).padded  # 64-float planes: whole vectors already
    saved = _lower.PAD_PLANES
    try:
        _lower.PAD_PLANES = False
        plain = sparsecnn.compile(net, x, "direct", layout="plain")
        assert not plain.program(tuple(x.shape)).padded
        with torch.inference_mode():
            for xb in (x, x[:1], torch.randn(3, 4, 7, 7), torch.randn(1, 4, 5, 3), torch.randn(1, 4, 8, 8)):
                y = compiled(xb)
                assert torch.equal(y, plain(xb))  # the same sums in the same order
                assert _rel(y, net(xb)) <= 1e-5
    finally:
        _lower.PAD_PLANES = saved


def _lenet() -> nn.Module:
    return models.build("lenet5", in_channels=1, input_size=8).eval()


@pytest.mark.parametrize("strategy", ["direct", "lowered", "torch"])
def test_an_empty_batch_gives_an_empty_output(strategy: str) -> None:
    compiled = sparsecnn.compile(_lenet(), torch.randn(1, 1, 8, 8), strategy)
    assert compiled(torch.randn(0, 1, 8, 8)).shape == (0, 10)
    assert compiled.numpy(np.zeros((0, 1, 8, 8), np.float32)).shape == (0, 10)
    assert compiled(torch.randn(2, 1, 8, 8)).shape == (2, 10)  # the one-image program it used still works


def test_bad_example_inputs_and_nan_weights_are_one_clear_error() -> None:
    with pytest.raises(SparseCNNError, match="holds no image"):
        sparsecnn.compile(_lenet(), torch.randn(0, 1, 8, 8))
    with pytest.raises(SparseCNNError, match="holds no image"):
        sparsecnn.sparsify(_lenet(), example_input=torch.randn(0, 1, 8, 8))
    x = torch.randn(1, 1, 8, 8)
    x[0, 0, 3, 3] = float("nan")
    with pytest.raises(SparseCNNError, match="example_input holds 1 NaN/Inf"):
        sparsecnn.compile(_lenet(), x)
    model = _lenet()
    with torch.no_grad():
        model.conv1.weight[0, 0, 0, 0] = float("inf")
    for build in (lambda: sparsecnn.compile(model, torch.randn(1, 1, 8, 8)),
                  lambda: sparsecnn.sparsify(model, measure=False)):
        with pytest.raises(SparseCNNError, match="layer 'conv1': weight holds 1 NaN/Inf"):
            build()


def test_lrn_then_max_pool_run_as_one_step_equal_to_the_two() -> None:
    """AlexNet's norm -> pool pairs run as ``lrn+maxpool`` (the normalised tensor never stored), with
    the values of the two passes bit for bit, NaN included; a pool the fused pass does not take (2 x 2)
    keeps the two steps."""
    from sparsecnn.kernels.elementwise import bind_max_pool2d
    from sparsecnn.kernels.lrn import bind_lrn, bind_lrn_max_pool

    model = models.build("alexnet", input_size=99, num_classes=50).eval()
    models.apply_profile(model, "deep-compression")
    x = torch.randn(2, 3, 99, 99, generator=torch.Generator().manual_seed(0))
    compiled = sparsecnn.compile(model, x[:1], measure=False)
    assert compiled.program((2, 3, 99, 99)).kinds.count("lrn+maxpool") == 2
    with torch.no_grad():
        assert _rel(compiled(x), model(x)) < 1e-4
    for shape in ((1, 96, 23, 23), (3, 7, 9, 12), (2, 256, 13, 13)):
        a = torch.relu(torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 3).numpy()
        a[0, 0, 1, 1] = np.nan
        a[-1, -1, 0, :] = np.inf
        fused = np.empty((shape[0], shape[1], (shape[2] - 3) // 2 + 1, (shape[3] - 3) // 2 + 1), np.float32)
        bind_lrn_max_pool(shape, 5, 1e-4, 0.75, 2.0, fused)(a)
        mid, two = np.empty(shape, np.float32), np.empty_like(fused)
        bind_lrn(shape, 5, 1e-4, 0.75, 2.0, mid)(a)
        bind_max_pool2d(shape, two, (3, 3), (2, 2), (0, 0), (1, 1))(mid)
        np.testing.assert_array_equal(fused, two)
    lrn_pool = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.LocalResponseNorm(5), nn.MaxPool2d(2, 2))
    lrn_pool.eval()
    kinds = sparsecnn.compile(lrn_pool, torch.randn(1, 3, 12, 12), "direct").program((1, 3, 12, 12)).kinds
    assert "lrn" in kinds and "maxpool" in kinds and "lrn+maxpool" not in kinds


_PAD_CASES = [((1, 1, 1, 1), (0, 0, 0, 0)), ((1, 2, 1, 5), (3, 0, 0, 2)), ((2, 3, 5, 4), (1, 2, 3, 0)),
              ((1, 4, 9, 7), (6, 5, 8, 1)), ((2, 40, 30, 33), (1, 1, 2, 2))]  # the last one in parallel


@pytest.mark.parametrize(("shape", "pads", "mode"), [
    (shape, pads, mode) for shape, pads in _PAD_CASES for mode in ("constant", "reflect", "replicate")
    # torch (and ONNX) refuse reflect pads of the padded size or more
    if mode != "reflect" or (max(pads[:2]) < shape[3] and max(pads[2:]) < shape[2])])
def test_pad_kernel_equals_torch(shape, pads, mode):
    from sparsecnn.kernels.elementwise import bind_pad2d

    c = shape[1]
    x = torch.randn(shape)
    value = -np.inf if c == 4 else 2.5
    ref = F.pad(x, pads, mode=mode, value=value) if mode == "constant" else F.pad(x, pads, mode=mode)
    out = np.full(ref.shape, np.nan, np.float32)
    bind_pad2d(shape, out, pads, mode, value)(x.numpy())
    np.testing.assert_array_equal(out, ref.numpy())


def test_imported_padding_runs_as_an_engine_step(tmp_path):
    """An ONNX graph's asymmetric / SAME padding is a ``pad`` step of the executor, not torch."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    from sparsecnn.io import load_onnx

    w = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], kernel_shape=[3, 3], strides=[2, 2],
                              pads=[0, 0, 1, 1]),
             helper.make_node("Pad", ["c", "pads"], ["output"], mode="reflect")]
    graph = helper.make_graph(nodes, "g",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 9, 9])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w"),
                               numpy_helper.from_array(np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64), "pads")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "p.onnx")
    model = load_onnx(tmp_path / "p.onnx")
    x = torch.randn(2, 3, 9, 9)
    compiled = sparsecnn.compile(model, x, "direct")
    assert compiled.program(tuple(x.shape)).kinds.count("pad") == 2
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [1, 37, 70_001])  # serial, and parallel chunks with a short last one
def test_clamp_kernel_equals_torch(n):
    from sparsecnn.kernels.elementwise import clamp_

    x = torch.randn(n) * 4
    x[::7] = float("nan")
    x[1::11] = float("inf")
    x[2::13] = -float("inf")
    for lo, hi in ((0.0, 6.0), (-1.5, 2.0), (-np.inf, 0.25), (0.5, np.inf), (1.0, 1.0)):
        a = x.numpy().copy()
        clamp_(a, lo, hi)
        want = torch.clamp(x, lo, hi)
        torch.testing.assert_close(torch.from_numpy(a), want, equal_nan=True, rtol=0, atol=0)


class _Clamps(nn.Module):
    """Every clamp spelling the executor runs itself (a ``clamp`` step), after convs and a linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, padding=1)
        self.r6, self.ht = nn.ReLU6(), nn.Hardtanh(-0.5, 0.75)
        self.fc = nn.Linear(8 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.r6(self.c1(x))
        b = self.ht(self.c2(a))
        c = F.relu6(self.c3(b)) + torch.clamp(b, min=0.1) + F.hardtanh(a, -2.0, 1.5)
        d = c.clamp(max=0.9).flatten(1)
        return torch.clip(self.fc(d), -0.2, 0.3)


def test_clamps_run_as_engine_steps():
    torch.manual_seed(0)
    model = _Clamps().eval()
    x = torch.randn(3, 3, 8, 8) * 3
    compiled = sparsecnn.compile(model, x, "direct")
    kinds = compiled.program(tuple(x.shape)).kinds
    assert kinds.count("clamp") == 7 and not any(k.startswith("torch:") and "lamp" in k for k in kinds), kinds
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(compiled(x[:1]), model(x[:1]), rtol=1e-5, atol=1e-6)


def test_relu6_fuses_into_a_depthwise_conv():
    """A clamp whose input is a depthwise conv run ``direct`` (its only reader) is that conv's epilogue
    (``conv:direct+clamp``); one whose only reader is such a conv is applied to that conv's input copies
    (``clamp>conv:direct``); with ``FUSE_CLAMP`` off, ``clamp`` steps."""
    from sparsecnn.engine import _lower

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU6(), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU6(),
                          nn.Conv2d(8, 8, 3, 2, 1, groups=8), nn.Hardtanh(-0.25, 0.5)).eval()
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Conv2d):
                m.weight.mul_(4)
    x = torch.randn(2, 3, 12, 11)
    fused = sparsecnn.compile(model, x, "direct")
    kinds = fused.program(tuple(x.shape)).kinds
    # the first ReLU6 on the next layer's input copies, the others on the depthwise outputs
    assert kinds == ["conv:direct", "clamp>conv:direct+clamp", "conv:direct+clamp"], kinds
    _lower.FUSE_CLAMP = False
    try:
        separate = sparsecnn.compile(model, x, "direct")
        assert separate.program(tuple(x.shape)).kinds.count("clamp") == 3
    finally:
        _lower.FUSE_CLAMP = True
    with torch.no_grad():
        for compiled in (fused, separate):
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(compiled(x[:1]), model(x[:1]), rtol=1e-5, atol=1e-6)


class _ThreeConvs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 1)
        self.c = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c(torch.relu(self.b(torch.relu(self.a(x))))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@pytest.mark.parametrize("winner", ["plain", "blocked", "dense"])
def test_layout_choice_times_the_sparser_convs_dense_too(winner: str, monkeypatch) -> None:
    """``compile``'s layout choice (``engine._faster_layout``) times the plain program, the blocked one
    (convs of at least ``_layout.MIN_DENSITY`` nonzero weights dense, conv ``c`` at 30% sparse) and,
    since ``c`` holds at least ``_layout.DENSE_TRY``, the blocked one with ``c`` dense too; it keeps
    the fastest, builds ``c``'s dense weights only to try them and drops them when that one loses."""
    from sparsecnn import engine
    from sparsecnn.engine import _layout

    torch.manual_seed(0)
    model = _ThreeConvs().eval()
    models.apply_profile(model, {"c": 0.7})
    x = torch.randn(1, 3, 12, 12)
    compiled = sparsecnn.compile(model, x, "direct", layout="plain")
    cache = compiled._chan_cache
    assert _layout.below_threshold(compiled._nodes, cache) == pytest.approx(0.3, abs=0.01)
    assert all(callable(e[2]) for e in cache.values() if 0.0 <= e[1] < _layout.MIN_DENSITY)  # none built
    order = ["plain", "blocked", "dense"]

    def timing(fns, rounds=5, min_time_s=0.002):
        assert len(fns) == 3
        for f in fns:
            f()
        return [1.0 if name == winner else 2.0 for name in order]

    monkeypatch.setattr(engine, "_time_steps", timing)
    chosen = engine._faster_layout(compiled, x)
    kinds = chosen.steps(tuple(x.shape))
    assert chosen.layout == ("plain" if winner == "plain" else "blocked")
    convs = [k for k in kinds if k.startswith("conv:")]
    want = {"plain": 0, "blocked": 2, "dense": 3}[winner]
    assert sum(k.startswith("conv:blocked") for k in convs) == want, kinds
    built_sparse = [e for e in chosen._chan_cache.values() if e[1] < _layout.MIN_DENSITY and
                    e[2] is not None and not callable(e[2])]
    assert bool(built_sparse) == (winner == "dense")
    with torch.inference_mode():
        assert _rel(chosen(x), model(x)) <= 1e-4
