"""Thread splits of grouped convs on conv-group edges (docs/engine.md, "Session of 2026-12-07
(twenty-first)") against the split by cost alone.

``python -m benchmarks.group_split [--cases alexnet-dc,alexnet-ssl] [--batch 1] [--turns 5] [--threads 2]``
first times AlexNet deep-compression's grouped conv layers (conv2, conv4, conv5) alone, bound as the
executor binds them (ReLU fused, batch ``--batch``): ``before`` built with the bounds of the cost
split (``kernels._numba.UNIT_SLACK`` below zero, so no bound moves), ``now`` as the library builds
them; both outputs equal bit for bit, then ``--turns`` turns of 15 x 20 interleaved calls, with each
side's thread bounds printed. Then each case's whole compiled model, the same two ways
(:func:`benchmarks.end_to_end.ab_run`).
"""

from __future__ import annotations

import numpy as np

from benchmarks.end_to_end import _interleaved, ab_run, ab_setup
from sparsecnn import models
from sparsecnn.bench.placement import probe_cores
from sparsecnn.kernels import _numba, conv

BEFORE = [(_numba, "UNIT_SLACK", -1.0)]


def _bound(layer, x: np.ndarray, slack: float):
    """The layer bound for ``x`` with ``UNIT_SLACK = slack`` while its workspace is built: (run, out,
    thread bounds)."""
    w = layer.weight.detach().numpy()
    saved, _numba.UNIT_SLACK = _numba.UNIT_SLACK, slack
    try:
        prep = conv.prepare_direct(w, layer.groups, layer.stride, layer.padding, layer.dilation)
        out = np.empty(prep.output_shape(x.shape), np.float32)
        run = conv.bind_direct_conv2d(prep, x.shape, layer.bias.detach().numpy(), out, relu=True)
        run(x)
    finally:
        _numba.UNIT_SLACK = saved
    ws = prep.workspace(x.shape)
    return run, out, (ws.grouped.bounds if ws.grouped is not None else ws.bounds)


def _layers(batch: int, turns: int) -> None:
    model = models.build("alexnet").eval()
    models.apply_profile(model, "deep-compression")
    rng = np.random.default_rng(0)
    for name, hw in (("conv2", 27), ("conv4", 13), ("conv5", 13)):
        layer = getattr(model, name)
        cin = layer.weight.shape[1] * layer.groups
        x = np.maximum(rng.standard_normal((batch, cin, hw, hw)).astype(np.float32), 0)
        (r0, o0, b0), (r1, o1, b1) = _bound(layer, x, BEFORE[0][2]), _bound(layer, x, _numba.UNIT_SLACK)
        r0(x)
        r1(x)
        np.testing.assert_array_equal(o0, o1)
        print(f"{name}: thread bounds before {b0.tolist()}, now {b1.tolist()}")
        fns = [lambda r=r0, v=x: r(v), lambda r=r1, v=x: r(v)]
        for _ in range(turns):
            t0, t1 = _interleaved(fns, 15, 20, 0.0)
            print(f"  {name} b{batch} {probe_cores().label:5s} {t0 * 1e3:9.3f} {t1 * 1e3:9.3f} "
                  f"{t0 / t1:6.3f}x", flush=True)


def main(argv: list[str] | None = None) -> int:
    args, cases = ab_setup(argv, "python -m benchmarks.group_split", __doc__.split("\n")[0],
                           "alexnet-dc,alexnet-ssl", 5, ("before", "now"))
    _layers(args.batch, args.turns)
    ab_run(args, cases, BEFORE)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
