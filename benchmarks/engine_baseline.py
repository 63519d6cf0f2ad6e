"""Baseline of the sparse execution engine: AlexNet conv1..conv5 and fc6..fc8 at 90% random sparsity.

For every layer and strategy: conversion time, then (after a JIT warm-up run that is also checked
against torch) the median and the minimum wall time per call at batch 1 with 2 threads, and the
ratio of medians to torch's own dense op (``F.conv2d`` / ``F.linear``; ratio < 1 is faster). The
strategies of a layer are timed in interleaved rounds (each sample lasting at least ``--sample``
seconds), so load from other work hits them alike; ``auto`` is what the planner's rule
(:func:`sparsecnn.plan.pick`) picks from these medians. Each layer sees its real input: the
activations of the pruned dense model on a random image (so conv2..conv5 and fc7/fc8 get ReLU zeros).

Run it under the shared timing lock::

    flock /tmp/sparsecnn-timing.lock .venv/bin/python -m benchmarks.engine_baseline
"""

from __future__ import annotations

import argparse
import statistics
import time

import numba
import torch
from torch import nn

import sparsecnn
from sparsecnn import SparseConv2d, SparseLinear, models
from sparsecnn.plan import DEFAULT_MARGIN, pick

LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")


def _prune_random(model: nn.Module, sparsity: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in LAYERS:
            w = model.get_submodule(name).weight
            n = w.numel()
            w.view(-1)[torch.randperm(n, generator=gen)[: round(sparsity * n)]] = 0.0


def _capture(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda _m, args, n=n: seen.setdefault(n, args[0].detach().clone())) for n in LAYERS]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def _time_interleaved(mods: dict[str, nn.Module], x: torch.Tensor, rounds: int,
                      sample_s: float) -> dict[str, tuple[float, float]]:
    """(median, min) seconds per call of every module, in interleaved rounds."""
    calls = {}
    with torch.no_grad():
        for s, m in mods.items():
            t0 = time.perf_counter()
            m(x)
            calls[s] = max(1, round(sample_s / max(time.perf_counter() - t0, 1e-7)))
        runs: dict[str, list[float]] = {s: [] for s in mods}
        names = list(mods)
        for r in range(rounds):
            for s in names[r % len(names):] + names[: r % len(names)]:
                m, k = mods[s], calls[s]
                t0 = time.perf_counter()
                for _ in range(k):
                    m(x)
                runs[s].append((time.perf_counter() - t0) / k)
    return {s: (statistics.median(v), min(v)) for s, v in runs.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds per layer")
    parser.add_argument("--sample", type=float, default=0.01, help="min seconds of one timed sample")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    numba.set_num_threads(args.threads)

    model = models.build("alexnet").eval()
    _prune_random(model, args.sparsity, seed=0)
    x = torch.randn(1, *models.input_shape(model), generator=torch.Generator().manual_seed(1))
    inputs = _capture(model, x)

    rows = []
    for name in LAYERS:
        layer = model.get_submodule(name)
        xin = inputs[name]
        with torch.no_grad():
            ref = layer(xin)
        is_lin = isinstance(layer, nn.Linear)
        names = sparsecnn.strategies("linear" if is_lin else "conv")
        cells: dict[str, tuple[tuple[float, float], float, int]] = {}
        mods: dict[str, nn.Module] = {}
        convert: dict[str, tuple[float, int]] = {}
        for s in names:
            t0 = time.perf_counter()
            sl = (SparseLinear if is_lin else SparseConv2d).from_dense(layer, s, name=name)
            convert_s = time.perf_counter() - t0
            with torch.no_grad():
                y = sl(xin)  # JIT warm-up and correctness check
            err = float((y - ref).abs().max() / ref.abs().max())
            if err > 1e-4:
                raise SystemExit(f"{name} {s}: wrong output (relative error {err:.2g})")
            mods[s] = sl
            convert[s] = (convert_s, sl.weight_nbytes)
        timed = _time_interleaved(mods, xin, args.rounds, args.sample)
        cells = {s: (timed[s], *convert[s]) for s in names}
        rows.append((name, tuple(layer.weight.shape), tuple(xin.shape), cells))

    print(f"AlexNet, {args.sparsity:.0%} random weight sparsity, batch 1, {args.threads} threads "
          f"(torch {torch.__version__}, numba {numba.__version__})")
    conv_names = sparsecnn.strategies("conv")
    lin_names = sparsecnn.strategies("linear")
    for title, names, which in (("conv", conv_names, rows[:5]), ("linear", lin_names, rows[5:])):
        print(f"\n{title} layers: median / min ms (ratio of medians to torch dense); auto: the planner")
        print(f"| layer | weight | {' | '.join(names)} | auto |")
        print("|---|---|" + "---|" * (len(names) + 1))
        for name, wshape, _, cells in which:
            base = cells["torch"][0][0]
            parts = [f"{cells[s][0][0] * 1e3:.2f} / {cells[s][0][1] * 1e3:.2f} ({cells[s][0][0] / base:.2f}x)"
                     for s in names]
            auto = pick({s: cells[s][0][0] for s in names}, DEFAULT_MARGIN)
            print(f"| {name} | {'x'.join(map(str, wshape))} | {' | '.join(parts)} | {auto} |")
        print(f"\n{title} layers: conversion seconds / stored weight bytes (MB)")
        print(f"| layer | {' | '.join(names)} |")
        print("|---|" + "---|" * len(names))
        for name, _, _, cells in which:
            parts = [f"{cells[s][1]:.3f} / {cells[s][2] / 1e6:.2f}" for s in names]
            print(f"| {name} | {' | '.join(parts)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
