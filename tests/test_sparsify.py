"""Whole models through ``sparsify``: every strategy and "auto" match the dense model; fallbacks,
NaN rejection, plans and the decision cache."""

from __future__ import annotations

import json
from collections import OrderedDict

import pytest
import torch
from torch import nn

import sparsecnn
from sparsecnn import SparseCNNError, SparseConv2d, SparseLinear, models
from sparsecnn.plan import DEFAULT_MARGIN, CostModel, LayerChoice, Plan, choose, estimate_seconds, pick
from tests.reference import assert_close

# Whole models chain many layers; each layer's summation-order error (~1e-6 relative) compounds
# through the network; measured end to end it stays near 1e-6 of the largest logit, so the same 1e-4 holds.
MODEL_RTOL = 1e-4


def _model(name: str, profile: str, **build) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    model = models.build(name, **build).eval()
    models.apply_profile(model, profile)
    x = torch.randn(1, *models.input_shape(model), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x)
    return model, x, ref


@pytest.fixture(scope="module")
def lenet():
    return _model("lenet5", "uniform:0.9")


@pytest.fixture(scope="module")
def alexnet():
    return _model("alexnet", "deep-compression")


@pytest.fixture(scope="module")
def resnet18():
    return _model("resnet18", "uniform:0.8", input_size=32)


def _check(sparse: nn.Module, dense: nn.Module, x: torch.Tensor, ref: torch.Tensor,
           expect: str | None) -> None:
    layers = [m for m in sparse.modules() if isinstance(m, (SparseConv2d, SparseLinear))]
    n_dense = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in dense.modules())
    assert len(layers) == n_dense  # every conv and linear was replaced
    assert not any(isinstance(m, (nn.Conv2d, nn.Linear)) and not _inside_torch_layer(sparse, m)
                   for m in sparse.modules())
    if expect is not None:
        conv_s = expect if expect in sparsecnn.strategies("conv") else "csrmm"
        # a conv strategy's name (direct too, which also names a linear strategy) runs linears as spmm
        conv_named = expect in sparsecnn.strategies("conv") and expect not in ("torch", "dense")
        lin_s = "spmm" if conv_named else expect
        for m in layers:
            assert m.strategy == (lin_s if isinstance(m, SparseLinear) else conv_s), m.name
    with torch.no_grad():
        assert_close(sparse(x), ref, rtol=MODEL_RTOL, what=f"{expect} model output")


def _inside_torch_layer(model: nn.Module, module: nn.Module) -> bool:
    """The dense module kept inside a SparseConv2d/SparseLinear running the torch strategy."""
    return any(getattr(m, "conv", None) is module or getattr(m, "linear", None) is module
               for m in model.modules() if isinstance(m, (SparseConv2d, SparseLinear)))


ALL = tuple(dict.fromkeys(sparsecnn.strategies("conv") + sparsecnn.strategies("linear")))


@pytest.mark.parametrize("strategy", ALL)
def test_lenet5_every_strategy(lenet, strategy: str) -> None:
    model, x, ref = lenet
    sparse = sparsecnn.sparsify(model, strategy)
    _check(sparse, model, x, ref, strategy)
    assert all(c.source == "given" for c in sparse.sparsecnn_plan.layers.values())


@pytest.mark.slow
@pytest.mark.parametrize("strategy", (*sparsecnn.strategies("conv"), "spmv"))
def test_alexnet_deep_compression_every_strategy(alexnet, strategy: str) -> None:
    model, x, ref = alexnet
    _check(sparsecnn.sparsify(model, strategy), model, x, ref, strategy)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", sparsecnn.strategies("conv"))
def test_resnet18_uniform_every_strategy(resnet18, strategy: str) -> None:
    model, x, ref = resnet18
    _check(sparsecnn.sparsify(model, strategy), model, x, ref, strategy)


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["lenet", "alexnet", "resnet18"])
def test_auto_matches_dense_and_second_call_hits_cache(fixture: str, request, tmp_path) -> None:
    model, x, ref = request.getfixturevalue(fixture)
    path = tmp_path / "plans.json"
    first = sparsecnn.sparsify(model, "auto", plan_path=path)
    _check(first, model, x, ref, None)
    plan = first.sparsecnn_plan
    # layers with the same cache key (shape, sparsity, input density) share one measurement
    sources = [c.source for c in plan.layers.values()]
    assert set(sources) <= {"measured", "cache"} and sources[0] == "measured"
    for choice in plan.layers.values():
        times = choice.times_s
        assert "torch" in times  # torch is always a candidate...
        # ...and a sparse strategy wins only by beating it clearly (issue 7: never > 5% slower)
        assert choice.strategy == pick(times, DEFAULT_MARGIN)
        if choice.strategy != "torch":
            assert times[choice.strategy] <= (1 - DEFAULT_MARGIN) * times["torch"]
            assert times[choice.strategy] == min(times.values())
    assert len(json.loads(path.read_text())["entries"]) >= 1
    second = sparsecnn.sparsify(model, "auto", plan_path=path)
    # a cache hit does no timing: every layer's choice comes from the file
    assert {c.source for c in second.sparsecnn_plan.layers.values()} == {"cache"}
    assert dict(second.sparsecnn_plan) == dict(plan)
    _check(second, model, x, ref, None)


def test_auto_cache_key_changes_with_batch(lenet, tmp_path) -> None:
    model, x, _ = lenet
    path = tmp_path / "plans.json"
    sparsecnn.sparsify(model, "auto", plan_path=path)
    x3 = torch.randn(3, *x.shape[1:])
    again = sparsecnn.sparsify(model, "auto", plan_path=path, example_input=x3)
    assert {c.source for c in again.sparsecnn_plan.layers.values()} == {"measured"}
    # batch 3: a batch strategy (spmm, or `direct` with the batch in the vector lanes), not spmv
    assert again.sparsecnn_plan["fc1"] in ("torch", "dense", "spmm", "direct")
    with torch.no_grad():
        assert_close(again(x3), model(x3), rtol=MODEL_RTOL)


def test_auto_plan_path_that_is_a_directory_is_one_clear_error(lenet, tmp_path) -> None:
    model, _, _ = lenet
    with pytest.raises(SparseCNNError, match=r"is a directory.*plans\.json"):
        sparsecnn.sparsify(model, "auto", plan_path=tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing half-written beside it


def test_auto_default_cache_dir_from_env(lenet, tmp_path, monkeypatch) -> None:
    model, _, _ = lenet
    monkeypatch.setenv("SPARSECNN_CACHE_DIR", str(tmp_path / "cache"))
    sparsecnn.sparsify(model, "auto")
    assert (tmp_path / "cache" / "plans.json").exists()


def test_auto_cost_model_does_no_timing(lenet, tmp_path) -> None:
    model, x, ref = lenet
    sparse = sparsecnn.sparsify(model, "auto", measure=False, plan_path=tmp_path / "p.json")
    assert {c.source for c in sparse.sparsecnn_plan.layers.values()} == {"cost-model"}
    assert not (tmp_path / "p.json").exists()
    _check(sparse, model, x, ref, None)


def test_pick_needs_a_clear_margin_over_torch() -> None:
    assert pick({"torch": 1.0, "csrmm": 0.97, "direct": 0.99}, 0.04) == "torch"
    assert pick({"torch": 1.0, "csrmm": 0.95, "direct": 0.90}, 0.04) == "direct"
    assert pick({"torch": 1.0}, 0.04) == "torch"


@pytest.mark.parametrize(("rotation", "paired", "want", "confirmed"), [
    # a close call that the pair does not bear out; the next best then gets the same test
    ({"torch": 1.0, "direct": 0.94, "csrmm": 0.955}, {"direct": 0.99, "csrmm": 0.99}, "torch",
     ["direct", "csrmm"]),
    # a close call the pair confirms (its torch slower in that moment: the others rescale with it)
    ({"torch": 1.0, "direct": 0.94, "csrmm": 0.955}, {"direct": 0.90 * 1.1}, "direct", ["direct"]),
    ({"torch": 1.0, "direct": 0.70}, {}, "direct", []),  # a clear win: no second timing
    ({"torch": 1.0, "direct": 0.98}, {}, "torch", []),  # no win: no second timing
])
def test_a_close_call_against_torch_is_timed_again_as_a_pair(rotation, paired, want, confirmed,
                                                              monkeypatch) -> None:
    """A winner within ``CONFIRM_BAND`` of torch in the rotation of every candidate is timed again
    against torch alone (``plan._confirm``), and kept only if it still beats torch by the margin;
    the times recorded are consistent with the choice (``pick`` of them)."""
    from sparsecnn import plan

    calls = []

    def fake_confirm(candidate, torch_layer, x, name, rounds, min_time_s):
        calls.append(name)
        candidate(x), torch_layer(x)  # the two modules really run on the layer's input
        return {name: paired[name], "torch": 1.1 if want == "direct" and paired else 1.0}

    monkeypatch.setattr(plan, "_measure", lambda modules, x, **kw: {n: rotation[n] for n in modules})
    monkeypatch.setattr(plan, "_confirm", fake_confirm)
    conv = _pruned_conv(16, 16, 3, 0.5)
    choice, module = choose(conv, torch.randn(1, 16, 12, 12), candidates=tuple(rotation))
    assert choice.strategy == want and getattr(module, "strategy", "torch") == want
    assert calls == confirmed and pick(choice.times_s, DEFAULT_MARGIN) == want
    for name in confirmed:  # the pair's own times are the ones recorded for the last pair
        assert choice.times_s[name] == pytest.approx(paired[name]) or name != calls[-1]
    if confirmed and want == "direct":  # csrmm keeps its ratio to torch, on the pair's torch
        assert choice.times_s["csrmm"] / choice.times_s["torch"] == pytest.approx(0.955)


def test_confirm_times_the_pair_in_alternation(monkeypatch) -> None:
    """``plan._confirm`` returns the medians of ``time_paired`` for the candidate and torch."""
    from sparsecnn import plan
    from sparsecnn.bench import harness

    order = []
    monkeypatch.setattr(harness, "time_paired", lambda fn, other, **kw: (
        order.append(kw["repeats"]) or (harness.Timing(0.5, 0, 0, 0, 0, 1, 1, 1),
                                         harness.Timing(0.7, 0, 0, 0, 0, 1, 1, 1))))
    conv = _pruned_conv(8, 8, 3, 0.5)
    assert plan._confirm(conv, conv, torch.randn(1, 8, 6, 6), "direct", 7, 0.035) == {"direct": 0.5,
                                                                                     "torch": 0.7}
    assert order == [15]


def _pruned_conv(cin: int, cout: int, k: int, sparsity: float, seed: int = 0) -> nn.Conv2d:
    gen = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(cin, cout, k, padding=k // 2).eval()
    with torch.no_grad():
        flat = conv.weight.view(-1)
        flat[torch.randperm(flat.numel(), generator=gen)[: int(sparsity * flat.numel())]] = 0.0
    return conv


@pytest.mark.parametrize(("shape", "sparsity", "want_dense"), [
    ((4, 4, 1, 4), 0.9, True),        # tiny: the kernels' fixed cost dominates
    ((3, 16, 3, 12), 0.95, True),     # small
    ((256, 384, 3, 13), 0.3, True),   # below break-even
    ((256, 384, 3, 13), 0.0, True),   # dense weights
    ((256, 384, 3, 13), 0.95, False),  # AlexNet conv3 at 95%
    ((128, 128, 3, 28), 0.9, False),   # ResNet 3x3 at 90%
])
def test_cost_model_picks_a_dense_engine_below_break_even(shape, sparsity: float, want_dense: bool) -> None:
    """Below break-even (and for tiny layers) the pick is a dense engine: torch, or ``lowered`` where
    it runs the dense Winograd form (3x3 stride 1 with every filter and column, planes of 32+ tiles:
    faster than torch's own convolution, ``kernels/winograd.py``); above it a sparse kernel."""
    from sparsecnn.kernels.implicit_gemm import winograd_tile

    cin, cout, k, hw = shape
    conv = _pruned_conv(cin, cout, k, sparsity)
    est = {s: estimate_seconds(conv, (1, cin, hw, hw), s, input_density=0.5)
           for s in sparsecnn.strategies("conv")}
    winograd = winograd_tile((k, k), (1, 1), (1, 1), cin, (hw, hw), 1.0)
    dense_engines = ("torch", "dense", "lowered") if winograd else ("torch", "dense")
    assert (pick(est, DEFAULT_MARGIN) in dense_engines) == want_dense, est
    if sparsity == 0.0:
        assert pick(est, DEFAULT_MARGIN) == ("lowered" if winograd else "torch"), est
    lin = nn.Linear(4096, 4096)
    with torch.no_grad():
        lin.weight.view(-1)[torch.randperm(lin.weight.numel())[: int(sparsity * lin.weight.numel())]] = 0.0
    est = {s: estimate_seconds(lin, (1, 4096), s) for s in ("torch", "dense", "spmv")}
    assert (pick(est, DEFAULT_MARGIN) == "torch") == (sparsity < 0.5), est
    slow = CostModel(direct_flops=1e6, csr_flops=1e6, bsr_flops=1e6, spgemm_flops=1e6, gemm_flops=1e15)
    assert pick({s: estimate_seconds(conv, (1, cin, hw, hw), s, model=slow)
                 for s in sparsecnn.strategies("conv")}, DEFAULT_MARGIN) in dense_engines


@pytest.fixture
def one_thread():
    """One torch and one numba thread. With two, every parallel region of a call waits for a
    scheduler quantum (4 ms here) whenever another process holds the second core, so on this shared
    machine a 2-thread timing measures barriers more than work; one thread measures the work."""
    import numba

    before = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    yield
    torch.set_num_threads(before[0])
    numba.set_num_threads(before[1])


def test_measured_choice_torch_below_break_even_sparse_above(one_thread) -> None:
    # A 4-channel 1x1 layer is call overhead on both sides (~10 us each): either may win, but only
    # by the margin rule, and the module runs what was chosen.
    tiny = _pruned_conv(4, 4, 1, 0.5)
    choice, module = choose(tiny, torch.randn(1, 4, 4, 4), rounds=5, min_time_s=0.03)
    assert choice.source == "measured" and module.strategy == choice.strategy
    if choice.strategy != "torch":
        t = choice.times_s
        assert t[choice.strategy] <= (1 - DEFAULT_MARGIN) * t["torch"], t
    x = torch.relu(torch.randn(1, 128, 28, 28))
    # No zeros at all: nothing to skip, so no strategy that skips zeros can clear the margin. (At 30%
    # the direct kernel now sometimes does: the break-even fell below it, and the test failed in CI.)
    # `lowered` keeps every column of a weight with no zeros and is then a dense implicit GEMM, and
    # `direct` with every weight kept is a dense direct convolution; either can beat oneDNN on this
    # layer by itself (lowered did in CI; direct with 16-wide tiles on an Intel AVX-512 core): if a
    # dense path wins, only by the margin.
    low = _pruned_conv(128, 128, 3, 0.0)
    choice = choose(low, x, rounds=5, min_time_s=0.03)[0]
    assert choice.strategy in ("torch", "lowered", "dense", "direct"), choice.times_s
    if choice.strategy != "torch":
        assert choice.times_s[choice.strategy] <= (1 - DEFAULT_MARGIN) * choice.times_s["torch"]
    big = _pruned_conv(128, 128, 3, 0.95)
    choice, module = choose(big, x, rounds=5, min_time_s=0.05)
    assert choice.strategy != "torch", choice.times_s
    assert choice.times_s[choice.strategy] <= (1 - DEFAULT_MARGIN) * choice.times_s["torch"]
    assert_close(module(x), big(x).detach())


def test_plan_mapping_save_load(lenet, tmp_path) -> None:
    model, x, ref = lenet
    plan = Plan({"conv1": "direct", "conv2": "spgemm", "fc1": "spmv", "fc2": LayerChoice("dense", "given")})
    sparse = sparsecnn.sparsify(model, plan)
    assert dict(sparse.sparsecnn_plan) == {"conv1": "direct", "conv2": "spgemm", "fc1": "spmv",
                                           "fc2": "dense"}
    _check(sparse, model, x, ref, None)
    plan.save(tmp_path / "plan.json")
    assert Plan.load(tmp_path / "plan.json") == plan
    partial = sparsecnn.sparsify(model, {"conv2": "bsr"})  # unnamed layers stay torch
    assert partial.sparsecnn_plan == {"conv2": "bsr"}
    assert isinstance(partial.conv1, nn.Conv2d)
    with pytest.raises(SparseCNNError, match="'conv9'"):
        sparsecnn.sparsify(model, {"conv9": "csrmm"})
    with pytest.raises(SparseCNNError, match="not a sparsecnn plan"):
        (tmp_path / "bad.json").write_text("{}")
        Plan.load(tmp_path / "bad.json")


@pytest.mark.parametrize("strategy", ["csrmm", "direct", "lowered", "spmv", "torch"])
def test_sparsified_model_deepcopies_and_pickles(lenet, strategy: str, tmp_path) -> None:
    import copy

    model, x, _ = lenet
    sparse = sparsecnn.sparsify(model, strategy)
    with torch.no_grad():
        y = sparse(x)
    twin = copy.deepcopy(sparse)
    torch.save(sparse, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    for other in (twin, loaded):
        assert other.sparsecnn_plan == sparse.sparsecnn_plan
        assert dict(other.sparsecnn_plan.layers) == dict(sparse.sparsecnn_plan.layers)
        with torch.no_grad():
            assert torch.equal(other(x), y)
    with pytest.raises(TypeError):
        twin.sparsecnn_plan.layers["conv1"] = LayerChoice("torch")  # type: ignore[index]


def test_sparsify_does_not_touch_the_model(lenet) -> None:
    model, _, _ = lenet
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sparsecnn.sparsify(model, "csrmm")
    assert isinstance(model.conv1, nn.Conv2d)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _odd_model() -> nn.Sequential:
    return nn.Sequential(OrderedDict(
        conv=nn.Conv2d(3, 4, 3, padding=1),
        refl=nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
        up=nn.ConvTranspose2d(4, 2, 2, stride=2),
        flat=nn.Flatten(),
        fc=nn.Linear(2 * 12 * 12, 5),
    )).eval()


def test_fallback_warns_naming_layer_and_stays_correct(tmp_path) -> None:
    model = _odd_model()
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        ref = model(x)
    for strategy in ("csrmm", "auto"):
        with pytest.warns(UserWarning) as record:
            sparse = sparsecnn.sparsify(model, strategy, example_input=x, plan_path=tmp_path / "p.json")
        messages = " | ".join(str(w.message) for w in record)
        assert "'refl'" in messages and "reflect" in messages
        assert "'up'" in messages and "ConvTranspose2d" in messages
        assert sparse.refl.strategy == "torch"
        assert sparse.sparsecnn_plan.layers["refl"].strategy == "torch"
        with torch.no_grad():
            assert_close(sparse(x), ref)


def test_nan_weights_rejected_naming_layer(lenet) -> None:
    model, _, _ = lenet
    bad = models.build("lenet5")
    bad.load_state_dict(model.state_dict())
    with torch.no_grad():
        bad.conv2.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(SparseCNNError, match=r"'conv2'.*NaN"):
        sparsecnn.sparsify(bad, "csrmm")


def test_sparsify_errors(lenet) -> None:
    model, _, _ = lenet
    with pytest.raises(SparseCNNError, match="unknown strategy 'fastest'"):
        sparsecnn.sparsify(model, "fastest")
    with pytest.raises(SparseCNNError, match=r"nn\.Module"):
        sparsecnn.sparsify("lenet5", "csrmm")
    with pytest.raises(SparseCNNError, match="input shape"):
        sparsecnn.sparsify(nn.Sequential(nn.Linear(3, 2)), "auto")


def test_import_is_lazy() -> None:
    import subprocess
    import sys

    code = ("import sys, sparsecnn; assert 'sparsecnn.layers' not in sys.modules; "
            "assert 'numba' not in sys.modules; sparsecnn.sparsify; assert 'sparsecnn.layers' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("strategy", ALL)
def test_cuda_lenet(lenet, strategy: str) -> None:
    model, x, ref = lenet
    with pytest.warns(UserWarning) if strategy == "direct" else _nothing():
        sparse = sparsecnn.sparsify(model, strategy, device="cuda").cuda()
    with torch.no_grad():
        assert_close(sparse(x.cuda()).cpu(), ref, rtol=MODEL_RTOL)


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def test_auto_cache_from_an_older_version_is_replaced_silently(lenet, tmp_path) -> None:
    import json
    import warnings

    from sparsecnn import plan as plan_mod

    model, _, _ = lenet
    path = tmp_path / "plans.json"
    old = {"version": plan_mod._CACHE_VERSION - 1, "entries": {"stale": {"strategy": "x"}}}
    path.write_text(json.dumps(old))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an older cache is expected after an upgrade: no warning
        fast = sparsecnn.sparsify(model, "auto", plan_path=path)
    assert {c.source for c in fast.sparsecnn_plan.layers.values()} == {"measured"}
    entries = json.loads(path.read_text())["entries"]
    assert "stale" not in entries and entries
    path.write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable"):  # a corrupt cache still says so
        sparsecnn.sparsify(model, "auto", plan_path=path)


def test_sparsify_runs_torch_pools_and_lrn_with_the_numba_passes() -> None:
    from sparsecnn.models.zoo import LocalResponseNorm, MaxPool2d

    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(
        conv=nn.Conv2d(3, 16, 3, padding=1), relu=nn.ReLU(), norm=nn.LocalResponseNorm(5, 1e-3, 0.75, 2.0),
        pool=nn.MaxPool2d(3, 2, ceil_mode=True), flat=nn.Flatten(), fc=nn.Linear(16 * 6 * 6, 4))).eval()
    seen = []
    model.pool.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        ref = model(x)
    fast = sparsecnn.sparsify(model, "direct")
    assert type(fast.pool) is MaxPool2d and type(fast.norm) is LocalResponseNorm
    assert type(model.pool) is nn.MaxPool2d and type(model.norm) is nn.LocalResponseNorm  # not modified
    assert fast.pool.kernel_size == 3 and fast.pool.ceil_mode and fast.norm.k == 2.0
    seen.clear()
    with torch.no_grad():
        assert_close(fast(x), ref, rtol=MODEL_RTOL)
    assert seen == [(2, 16, 6, 6)]  # the module's hooks came along
