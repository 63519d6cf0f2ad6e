"""The peers every sparse strategy is compared with: what a user could run instead.

- ``torch-dense``: torch's own dense op (``F.conv2d`` through oneDNN, ``F.linear``/``mm`` through MKL
  or cuBLAS).
- ``torch-csr``: the lowered weight as a ``torch.sparse_csr_tensor`` times the im2col-lowered input
  (MKL on the CPU, cuSPARSE on a GPU): the library CSRMM the seed study measured.
- ``scipy-csr``: ``scipy.sparse.csr_matrix`` times the lowered input (CPU).
- ``onnxruntime``: ONNX Runtime's dense CPU kernels, when ``onnxruntime`` and ``onnx`` are installed.

Each factory converts once and returns ``{name: callable}``; a callable takes no arguments and
returns the layer's output in the layer's own layout (NCHW for a conv, ``(B, out)`` for a linear),
so the harness can check it against the dense reference before timing. The lowering (``unfold``)
is inside the timed call: a peer pays for it as the sparse strategies do.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["conv_peers", "have_onnxruntime", "linear_peers", "matrix_peers", "model_peers"]

Peer = Callable[[], Any]


def have_onnxruntime() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def _ort_session(model_bytes: bytes, threads: int) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    # Without this, ONNX Runtime's intra-op threads spin after each run and slow whatever runs next
    # on a small machine (AlexNet at 90% measured 14.8 ms right after an ORT call, 7.3 ms without).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model_bytes, sess_options=opts, providers=["CPUExecutionProvider"])


def _ort_single_node(
    op: str,
    x_shape: tuple[int, ...],
    y_shape: tuple[int, ...],
    inits: dict[str, np.ndarray],
    inputs: list[str],
    **attrs: Any,
) -> bytes:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    node = helper.make_node(op, ["x", *inputs], ["y"], **attrs)
    graph = helper.make_graph(
        [node],
        f"sparsecnn_{op.lower()}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(y_shape))],
        [numpy_helper.from_array(np.ascontiguousarray(v, dtype=np.float32), k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 9)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _csr_groups(
    w2d: list[torch.Tensor], device: str, want: Any = lambda _name: True
) -> tuple[list[torch.Tensor], list[Any]]:
    import scipy.sparse as sp

    torch_csr: list[torch.Tensor] = []
    if want("torch-csr"):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support")
            torch_csr = [w.to(device).to_sparse_csr() for w in w2d]
    scipy_csr = [sp.csr_matrix(w.cpu().numpy()) for w in w2d] if device == "cpu" and want("scipy-csr") else []
    return torch_csr, scipy_csr


@torch.no_grad()
def conv_peers(
    conv: nn.Conv2d,
    x: torch.Tensor,
    *,
    device: str = "cpu",
    threads: int = 1,
    onnx: bool = True,
    only: str | None = None,
) -> dict[str, Peer]:
    """Peers for one conv layer on input ``x`` (shape (B, Cin, H, W)).

    Returns
    -------
    dict of str to callable
        ``torch-dense``, ``torch-csr``, ``scipy-csr`` (CPU only) and ``onnxruntime`` (CPU, when
        installed and ``onnx`` is true); each returns the (B, Cout, Hout, Wout) output. With
        ``only``, just that peer is built (the others' conversions are skipped).
    """

    def want(name: str) -> bool:
        return only is None or only == name

    conv = conv.eval().to(device)
    x = x.to(device)
    g = conv.groups
    weight = conv.weight.detach()
    cout = weight.shape[0]
    w2d = [wg.reshape(cout // g, -1).contiguous() for wg in weight.chunk(g, dim=0)]
    bias = conv.bias.detach() if conv.bias is not None else None
    with torch.no_grad():
        y_shape = tuple(conv(x).shape)
    b, _, hout, wout = y_shape
    torch_csr, scipy_csr = _csr_groups(w2d, device, want)
    kw = {
        "kernel_size": conv.kernel_size,
        "dilation": conv.dilation,
        "padding": conv.padding,
        "stride": conv.stride,
    }

    def lowered() -> list[torch.Tensor]:
        cols = F.unfold(x, **kw)  # (B, Cin kh kw, L), rows grouped by input channel
        k = cols.shape[1] // g
        # (K, B L) per group: the whole batch in one product
        return [cols[:, i * k : (i + 1) * k].permute(1, 0, 2).reshape(k, -1) for i in range(g)]

    def finish(parts: list[torch.Tensor]) -> torch.Tensor:
        y = torch.cat(parts, 0).reshape(cout, b, hout * wout).permute(1, 0, 2).reshape(y_shape)
        return y + bias.view(1, -1, 1, 1) if bias is not None else y

    peers: dict[str, Peer] = {
        "torch-dense": lambda: conv(x),
        "torch-csr": lambda: finish([a @ c for a, c in zip(torch_csr, lowered(), strict=True)]),
    }
    if device == "cpu":

        def scipy_peer() -> torch.Tensor:
            return finish(
                [
                    torch.from_numpy(np.asarray(a @ c.numpy()))
                    for a, c in zip(scipy_csr, lowered(), strict=True)
                ]
            )

        peers["scipy-csr"] = scipy_peer
        if onnx and want("onnxruntime") and have_onnxruntime():
            inits = {"w": weight.cpu().numpy()}
            if bias is not None:
                inits["b"] = bias.cpu().numpy()
            model = _ort_single_node(
                "Conv",
                tuple(x.shape),
                y_shape,
                inits,
                list(inits),
                group=g,
                kernel_shape=list(conv.kernel_size),
                strides=list(conv.stride),
                dilations=list(conv.dilation),
                pads=[*conv.padding, *conv.padding],
            )
            sess = _ort_session(model, threads)
            xn = x.cpu().numpy()
            peers["onnxruntime"] = lambda: sess.run(None, {"x": xn})[0]
    return peers


@torch.no_grad()
def linear_peers(
    linear: nn.Linear,
    x: torch.Tensor,
    *,
    device: str = "cpu",
    threads: int = 1,
    onnx: bool = True,
    only: str | None = None,
) -> dict[str, Peer]:
    """Peers for one linear layer on input ``x`` (shape (B, in)); each returns (B, out).

    ``only`` builds just that peer, as for :func:`conv_peers`.
    """

    def want(name: str) -> bool:
        return only is None or only == name

    linear = linear.eval().to(device)
    x = x.to(device)
    w = linear.weight.detach()
    bias = linear.bias.detach() if linear.bias is not None else None
    torch_csr, scipy_csr = _csr_groups([w], device, want)
    xt = x.t().contiguous()

    def add_bias(y: torch.Tensor) -> torch.Tensor:
        return y + bias if bias is not None else y

    peers: dict[str, Peer] = {
        "torch-dense": lambda: linear(x),
        "torch-csr": lambda: add_bias((torch_csr[0] @ xt).t()),
    }
    if device == "cpu":
        xn = xt.numpy()
        peers["scipy-csr"] = lambda: add_bias(torch.from_numpy(np.asarray(scipy_csr[0] @ xn)).t())
        if onnx and want("onnxruntime") and have_onnxruntime():
            inits = {"w": w.t().cpu().numpy()}
            nodes_in = ["w"]
            if bias is not None:
                inits["b"] = bias.cpu().numpy()
                nodes_in.append("b")
            model = _ort_single_node("Gemm", tuple(x.shape), (x.shape[0], w.shape[0]), inits, nodes_in)
            sess = _ort_session(model, threads)
            xnp = x.cpu().numpy()
            peers["onnxruntime"] = lambda: sess.run(None, {"x": xnp})[0]
    return peers


def matrix_peers(
    a: np.ndarray, b: np.ndarray, *, device: str = "cpu", threads: int = 1, onnx: bool = True
) -> dict[str, Peer]:
    """Peers for ``A @ B`` with a dense-stored sparse ``A`` (M, K) and a dense ``B`` (K, N)."""
    import scipy.sparse as sp

    at = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(device)
    bt = torch.from_numpy(np.ascontiguousarray(b, dtype=np.float32)).to(device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support")
        a_csr = at.to_sparse_csr()
    peers: dict[str, Peer] = {
        "torch-dense": lambda: at @ bt,
        "torch-csr": lambda: a_csr @ bt,
    }
    if device == "cpu":
        a_sp = sp.csr_matrix(a)
        bn = np.ascontiguousarray(b, dtype=np.float32)
        peers["scipy-csr"] = lambda: a_sp @ bn
        if onnx and have_onnxruntime():
            # MatMul(x, c) with a constant second operand: feed x = B^T (N, K), c = A^T, read (A B)^T
            model = _ort_single_node(
                "MatMul",
                (b.shape[1], b.shape[0]),
                (b.shape[1], a.shape[0]),
                {"at": np.ascontiguousarray(a.T)},
                ["at"],
            )
            sess = _ort_session(model, threads)
            bT = np.ascontiguousarray(b.T, dtype=np.float32)
            peers["onnxruntime"] = lambda: sess.run(None, {"x": bT})[0].T
    return peers


def model_peers(model: nn.Module, x: torch.Tensor, *, threads: int = 1) -> dict[str, Peer]:
    """Whole-model peers: ONNX Runtime running the dense model (exported with torch's TorchScript
    exporter), when installed. Torch dense itself is the baseline, not a peer here."""
    if not have_onnxruntime():
        return {}
    buf = io.BytesIO()
    model = model.eval()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buf, dynamo=False, input_names=["x"], output_names=["y"])
    sess = _ort_session(buf.getvalue(), threads)
    xn = x.cpu().numpy()
    return {"onnxruntime": lambda: sess.run(None, {"x": xn})[0]}
