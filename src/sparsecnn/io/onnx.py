"""ONNX models in (a small mapping of our own onto torch modules) and out (``torch.onnx.export``).

Import maps each node to a torch module in a :class:`~sparsecnn.io._graph.GraphNet`, named after its
weight (``conv1.weight`` -> ``conv1``) or its node name, so a model exported from torch comes back with
the same layer names. Supported operators:

Conv (2-D, symmetric pads), Gemm, MatMul (constant right-hand side), Relu, MaxPool, AveragePool,
GlobalAveragePool, GlobalMaxPool, Flatten (axis 1), Reshape, LRN (odd size), Add, Sub, Mul, Div, Concat,
BatchNormalization (inference), Dropout, Softmax, Identity, and the shape arithmetic torch emits for
``x.view(x.size(0), -1)``: Constant, Shape, Gather, Unsqueeze, Squeeze.

Why not onnx2torch: it is not installable here, and the list above is small enough that a mapping we
control (readable names, our error messages, no extra dependency) is simpler than a converter.

Export goes through the TorchScript exporter (``dynamo=False``): it needs no onnxscript, takes a fraction
of a second, and maps ``nn.LocalResponseNorm`` to one ONNX ``LRN`` node (registered below) rather than
the dozens of shape and pooling nodes torch decomposes it into. Sparse layers are densified for export
(ONNX has no sparse convolution operator); pruned zeros stay zeros.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import tempfile
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from sparsecnn.errors import SparseCNNError
from sparsecnn.io import _sparse
from sparsecnn.io._graph import (
    AvgPoolPadded,
    BatchNorm,
    Binary,
    Concat,
    Constant,
    Gather,
    GraphNet,
    Pad2d,
    Reshape,
    Shape,
    Softmax2D,
    Squeeze,
    Step,
    Unsqueeze,
    safe_name,
)
from sparsecnn.models.zoo import LocalResponseNorm, MaxPool2d

__all__ = ["SUPPORTED_OPS", "export_onnx", "load_onnx"]


def _onnx():
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:  # pragma: no cover - onnx is a declared optional dependency
        raise SparseCNNError("ONNX support needs the onnx package: pip install 'sparsecnn[onnx]'") from None
    return onnx, numpy_helper


# ------------------------------------------------------------------------------------------------
# import


class _Importer:
    def __init__(self, model: Any, path: str) -> None:
        onnx, self.numpy_helper = _onnx()
        self.onnx = onnx
        self.path = path
        self.graph = model.graph
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        if self.opset <= 0:
            raise SparseCNNError("the model imports no default-domain (ai.onnx) opset")
        self.consts: dict[str, np.ndarray] = {}
        for t in self.graph.initializer:
            self.consts[t.name] = self._array(t, f"initializer {t.name!r}")
        self.blobs: set[str] = set()
        self.steps: list[Step] = []
        self.modules: dict[str, nn.Module] = {}
        self.taken: set[str] = set()
        self.materialized: set[str] = set()

    def _array(self, tensor: Any, where: str) -> np.ndarray:
        try:
            arr = np.array(self.numpy_helper.to_array(tensor))
        except Exception as exc:  # onnx raises assorted types for a malformed tensor
            raise SparseCNNError(f"{where} is malformed ({type(exc).__name__}: {exc})") from None
        # A scalar +-inf is a value, not a diverged weight: the -inf that pads a max pool's input
        # (torch's exporter writes F.pad's value as a Constant), a Clip bound.
        scalar_inf = arr.size == 1 and np.isinf(arr).all()
        if arr.dtype.kind == "f" and not np.isfinite(arr).all() and not scalar_inf:
            raise SparseCNNError(
                f"{where} holds {int((~np.isfinite(arr)).sum())} NaN/Inf value(s); the file is corrupt or "
                f"its training diverged: export the model again from good weights"
            )
        return arr

    # -- helpers ----------------------------------------------------------------------------------

    def attrs(self, node: Any) -> dict[str, Any]:
        out = {}
        for a in node.attribute:
            try:
                value = self.onnx.helper.get_attribute_value(a)
            except Exception as exc:
                raise SparseCNNError(f"attribute {a.name!r} is malformed ({exc})") from None
            if isinstance(value, bytes):
                value = value.decode("utf-8", "replace")
            elif isinstance(value, self.onnx.TensorProto):
                value = self._array(value, f"attribute {a.name!r}")
            out[a.name] = value
        return out

    def const(self, name: str, where: str, what: str, finite: bool = False) -> np.ndarray:
        """Constant ``name``; with ``finite`` (weights, biases, BatchNorm statistics) no NaN or inf in
        it, not even a single one (:meth:`_array` lets a scalar inf through as a value)."""
        if name not in self.consts:
            raise SparseCNNError(f"{where}: {what} ({name!r}) must be a constant (an initializer)")
        arr = self.consts[name]
        if finite and arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise SparseCNNError(f"{where}: {what} ({name!r}) holds {int((~np.isfinite(arr)).sum())} NaN/Inf "
                                 f"value(s); the file is corrupt or its training diverged: export the model "
                                 f"again from good weights")
        return arr

    def need(self, name: str, where: str) -> None:
        """Make tensor ``name`` available at run time (a constant becomes a Constant step)."""
        if name in self.blobs:
            return
        if name in self.consts:
            if name not in self.materialized:
                self.add(Constant(torch.from_numpy(self.consts[name].copy())), "const_" + name, (), (name,))
                self.materialized.add(name)
            return
        raise SparseCNNError(f"{where}: input {name!r} is not produced by any earlier node or graph input")

    def add(self, module: nn.Module, name: str, inputs: Sequence[str], outputs: Sequence[str]) -> None:
        key = safe_name(name, self.taken, type(module).__name__.lower())
        self.modules[key] = module
        self.steps.append(Step(key, tuple(inputs), tuple(outputs), -1))
        self.blobs.update(outputs)

    @staticmethod
    def node_name(node: Any, index: int) -> str:
        parts = [p for p in node.name.split("/") if p]
        if len(parts) > 1 and parts[-1].split("_")[0] == node.op_type:
            parts = parts[:-1]
        if not parts or parts[-1].split("_")[0] == node.op_type:
            return node.op_type.lower()
        return parts[-1]

    @staticmethod
    def weight_name(name: str) -> str | None:
        return name[: -len(".weight")] if name.endswith(".weight") else None

    @staticmethod
    def padding(where: str, a: dict[str, Any], k: Sequence[int], stride: Sequence[int],
                dilation: Sequence[int], value: float) -> tuple[tuple[int, int], Pad2d | None]:
        """The symmetric padding that the torch layer takes, and the :class:`Pad2d` to run before it
        for the rest (asymmetric ``pads``, ``auto_pad`` SAME_UPPER / SAME_LOWER), or None."""
        auto = a.get("auto_pad", "NOTSET")
        if auto == "VALID":
            return (0, 0), None
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            same = auto.removeprefix("SAME_").lower()
            return (0, 0), Pad2d(value=value, same=same, kernel=k, stride=stride, dilation=dilation)
        if auto != "NOTSET":
            raise SparseCNNError(
                f"{where}: unknown auto_pad {auto!r} (NOTSET, VALID, SAME_UPPER, SAME_LOWER)")
        pads = [int(v) for v in a.get("pads", [0, 0, 0, 0])]
        if len(pads) != 4:
            raise SparseCNNError(f"{where}: pads {pads} are not those of a 2-D layer (4 values)")
        if min(pads) < 0:
            raise SparseCNNError(f"{where}: negative pads {pads} are not supported")
        top, left, bottom, right = pads
        sym = (min(top, bottom), min(left, right))
        if (top, left) == (bottom, right):
            return sym, None
        return sym, Pad2d((left - sym[1], right - sym[1], top - sym[0], bottom - sym[0]), value=value)

    def padded(self, node: Any, where: str, name: str, x: str, pre: Pad2d | None) -> str:
        """``x``, or the output of ``pre`` run on it (a step of its own, named ``NAME_pad``)."""
        self.need(x, where)
        if pre is None:
            return x
        out = f"{node.output[0]}::pad"
        self.add(pre, f"{name}_pad", (x,), (out,))
        return out

    # -- operators --------------------------------------------------------------------------------

    def convert(self) -> GraphNet:
        inputs = [i for i in self.graph.input if i.name not in self.consts]
        if not inputs:
            raise SparseCNNError("the graph has no inputs")
        self.blobs.update(i.name for i in inputs)
        for index, node in enumerate(self.graph.node):
            where = f"node {node.name or index!r} ({node.op_type})"
            if node.domain not in ("", "ai.onnx"):
                raise SparseCNNError(f"{where}: operator domain {node.domain!r} is not supported")
            handler = getattr(self, "op_" + node.op_type, None)
            if handler is None:
                raise SparseCNNError(
                    f"{where}: operator {node.op_type!r} is not supported; "
                    f"supported: {', '.join(SUPPORTED_OPS)}"
                )
            if not node.output:
                raise SparseCNNError(f"{where}: has no outputs")
            handler(node, where, self.attrs(node), self.node_name(node, index))
        outputs = [o.name for o in self.graph.output]
        if not outputs:
            raise SparseCNNError("the graph has no outputs")
        for o in outputs:
            self.need(o, f"graph output {o!r}")
        dims = self.input_dims(inputs[0])
        return GraphNet(
            self.steps, self.modules, [i.name for i in inputs], outputs, dims, source=f"onnx:{self.path}"
        )

    def input_dims(self, value_info: Any) -> tuple[int, ...]:
        shape = value_info.type.tensor_type.shape
        dims = [d.dim_value if d.HasField("dim_value") else 0 for d in shape.dim]
        return tuple(int(d) for d in dims[1:]) if len(dims) > 1 else ()

    def _inputs(self, node: Any) -> list[str]:
        return [i for i in node.input]  # "" marks an omitted optional input

    def op_Conv(self, node, where, a, name):
        ins = self._inputs(node)
        w = self.const(ins[1], where, "the weight", finite=True)
        if w.ndim != 4:
            raise SparseCNNError(f"{where}: only 2-D convolution is supported (weight shape {w.shape})")
        group = int(a.get("group", 1))
        k = tuple(int(v) for v in a.get("kernel_shape", w.shape[2:]))
        if k != tuple(w.shape[2:]):
            raise SparseCNNError(f"{where}: kernel_shape {k} does not match the weight shape {w.shape}")
        stride = tuple(int(v) for v in a.get("strides", (1, 1)))
        dilation = tuple(int(v) for v in a.get("dilations", (1, 1)))
        pad, pre = self.padding(where, a, k, stride, dilation, 0.0)
        bias = ins[2] if len(ins) > 2 and ins[2] else None
        module = nn.utils.skip_init(
            nn.Conv2d,
            w.shape[1] * group,
            w.shape[0],
            k,
            stride=stride,
            padding=pad,
            dilation=dilation,
            groups=group,
            bias=bias is not None,
        )
        with torch.no_grad():
            module.weight.copy_(torch.from_numpy(w.astype(np.float32)))
            if bias is not None:
                b = self.const(bias, where, "the bias", finite=True)
                module.bias.copy_(torch.from_numpy(b.astype(np.float32)))
        layer = self.weight_name(ins[1]) or name
        x = self.padded(node, where, layer, ins[0], pre)
        self.add(module, layer, (x,), node.output[:1])

    def _linear(self, node, where, name, x, weight, weight_name, bias):
        out_f, in_f = weight.shape
        module = nn.utils.skip_init(nn.Linear, in_f, out_f, bias=bias is not None)
        with torch.no_grad():
            module.weight.copy_(torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32)))
            if bias is not None:
                module.bias.copy_(torch.from_numpy(np.ascontiguousarray(bias, dtype=np.float32)))
        self.need(x, where)
        self.add(module, self.weight_name(weight_name) or name, (x,), node.output[:1])

    def op_Gemm(self, node, where, a, name):
        ins = self._inputs(node)
        if a.get("transA", 0):
            raise SparseCNNError(f"{where}: Gemm with transA=1 is not supported")
        b = self.const(ins[1], where, "B (the weight)", finite=True)
        if b.ndim != 2:
            raise SparseCNNError(f"{where}: B must be 2-D, got shape {b.shape}")
        weight = (b if a.get("transB", 0) else b.T) * float(a.get("alpha", 1.0))
        bias = None
        if len(ins) > 2 and ins[2]:
            c = self.const(ins[2], where, "C (the bias)", finite=True)
            try:
                bias = np.broadcast_to(c, (1, weight.shape[0])).reshape(-1) * float(a.get("beta", 1.0))
            except ValueError:
                raise SparseCNNError(
                    f"{where}: C of shape {c.shape} does not broadcast to the output"
                ) from None
        self._linear(node, where, name, ins[0], weight, ins[1], bias)

    def op_MatMul(self, node, where, a, name):
        ins = self._inputs(node)
        b = self.const(ins[1], where, "the right-hand side", finite=True)
        if b.ndim != 2:
            raise SparseCNNError(f"{where}: the right-hand side must be 2-D, got shape {b.shape}")
        self._linear(node, where, name, ins[0], b.T, ins[1], None)

    def _simple(self, node, where, name, module, n_inputs=1):
        ins = [i for i in self._inputs(node)[:n_inputs] if i]
        for i in ins:
            self.need(i, where)
        self.add(module, name, ins, node.output[:1])

    def op_Relu(self, node, where, a, name):
        self._simple(node, where, name, nn.ReLU())

    def op_Clip(self, node, where, a, name):
        """Clip(x, min, max) -> ``nn.Hardtanh`` (torch's ReLU6 exports as Clip(x, 0, 6)); bounds from
        the attributes before opset 11, from constant inputs after; a missing bound is infinite."""
        ins = self._inputs(node)
        if self.opset < 11:
            lo, hi = float(a.get("min", -math.inf)), float(a.get("max", math.inf))
        else:
            bounds = []
            for i, what in ((1, "min"), (2, "max")):
                if len(ins) > i and ins[i]:
                    v = self.const(ins[i], where, what)
                    if v.size != 1:
                        raise SparseCNNError(f"{where}: Clip's {what} must be one value, got shape {v.shape}")
                    bounds.append(float(v.reshape(-1)[0]))
                else:
                    bounds.append(-math.inf if what == "min" else math.inf)
            lo, hi = bounds
        if math.isnan(lo) or math.isnan(hi) or lo > hi:
            raise SparseCNNError(f"{where}: Clip bounds [{lo}, {hi}] are not an interval")
        module = nn.ReLU6() if (lo, hi) == (0.0, 6.0) else nn.Hardtanh(lo, hi)
        self._simple(node, where, name, module)

    def op_LeakyRelu(self, node, where, a, name):
        self._simple(node, where, name, nn.LeakyReLU(float(a.get("alpha", 0.01))))

    def op_Sigmoid(self, node, where, a, name):
        self._simple(node, where, name, nn.Sigmoid())

    def op_Tanh(self, node, where, a, name):
        self._simple(node, where, name, nn.Tanh())

    def op_Identity(self, node, where, a, name):
        ins = list(node.input)
        if ins and ins[0] in self.consts and ins[0] not in self.blobs:
            # torch's exporter shares equal initializers through Identity nodes (AlexNet's conv4/conv5
            # biases): the output is the same constant
            self.consts[node.output[0]] = self.consts[ins[0]]
            return
        self._simple(node, where, name, nn.Identity())

    def op_Dropout(self, node, where, a, name):
        if len(node.output) > 1 and node.output[1]:
            raise SparseCNNError(f"{where}: the Dropout mask output is not supported")
        self._simple(
            node, where, name, nn.Dropout(float(a.get("ratio", 0.5))) if self.opset < 12 else nn.Dropout()
        )

    def _pool(self, node, where, a, name, avg):
        if len(node.output) > 1 and node.output[1]:
            raise SparseCNNError(f"{where}: the MaxPool indices output is not supported")
        k = tuple(int(v) for v in a.get("kernel_shape", ()))
        if len(k) != 2:
            raise SparseCNNError(f"{where}: only 2-D pooling is supported (kernel_shape {k})")
        stride = tuple(int(v) for v in a.get("strides", (1, 1)))
        dilation = tuple(int(v) for v in a.get("dilations", (1, 1)))
        ceil = bool(a.get("ceil_mode", 0))
        include = bool(a.get("count_include_pad", 0))
        # Padding outside the torch layer: -inf before a max pool (never the max), zeros before an
        # average that counts the padding.
        pad, pre = self.padding(where, a, k, stride, dilation, 0.0 if avg else -math.inf)
        if 2 * pad[0] > k[0] or 2 * pad[1] > k[1]:  # above what torch's pools take: all of it outside
            pre = Pad2d((pad[1], pad[1], pad[0], pad[0]) if pre is None else
                        tuple(p + q for p, q in zip(pre.pads, (pad[1], pad[1], pad[0], pad[0]), strict=True)),
                        value=0.0 if avg else -math.inf)
            pad = (0, 0)
        if pre is not None and ceil:
            raise SparseCNNError(f"{where}: ceil_mode with asymmetric, SAME or above-half-kernel pads is not "
                                 "supported; export with ceil_mode 0 or symmetric pads")
        if pre is not None and avg and not include:
            # the divisor counts only input pixels: one module pads and divides (Pad2d + a count)
            whole = pre.pads if pre.same else tuple(
                p + q for p, q in zip(pre.pads, (pad[1], pad[1], pad[0], pad[0]), strict=True))
            if max(whole[:2]) >= k[1] or max(whole[2:]) >= k[0]:
                raise SparseCNNError(f"{where}: pads {whole} of a kernel or more leave windows without input "
                                     "pixels; not supported with count_include_pad 0")
            module = AvgPoolPadded(k, stride, whole, same=pre.same)
            self._simple(node, where, name, module)
            return
        if avg:
            module = nn.AvgPool2d(k, stride, pad, ceil_mode=ceil, count_include_pad=include)
        else:
            if int(a.get("storage_order", 0)):
                raise SparseCNNError(f"{where}: storage_order 1 is not supported")
            module = MaxPool2d(k, stride, pad, dilation=dilation, ceil_mode=ceil)
        x = self.padded(node, where, name, self._inputs(node)[0], pre)
        self.add(module, name, (x,), node.output[:1])

    def op_MaxPool(self, node, where, a, name):
        self._pool(node, where, a, name, avg=False)

    def op_AveragePool(self, node, where, a, name):
        self._pool(node, where, a, name, avg=True)

    def op_Pad(self, node, where, a, name):
        ins = self._inputs(node)
        mode = a.get("mode", "constant")
        modes = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}
        if mode not in modes:
            raise SparseCNNError(f"{where}: Pad mode {mode!r} is not supported (constant, reflect, edge)")
        if self.opset < 11:
            pads, value, axes = a.get("pads", []), float(a.get("value", 0.0)), None
        else:
            pads = self.const(ins[1], where, "pads") if len(ins) > 1 and ins[1] else []
            value = 0.0
            if len(ins) > 2 and ins[2]:
                v = self.const(ins[2], where, "constant_value")
                if v.size != 1:
                    raise SparseCNNError(f"{where}: constant_value must be one value, got shape {v.shape}")
                value = float(v.reshape(-1)[0])
            axes = self.const(ins[3], where, "axes") if len(ins) > 3 and ins[3] else None
        pads = [int(v) for v in np.asarray(pads).reshape(-1)]
        axes = list(range(len(pads) // 2)) if axes is None else [int(v) for v in np.asarray(axes).reshape(-1)]
        if len(pads) != 2 * len(axes):
            raise SparseCNNError(f"{where}: {len(pads)} pads for {len(axes)} axes")
        if axes and axes == list(range(len(axes))) and len(axes) != 4:
            raise SparseCNNError(f"{where}: only 4-D (N, C, H, W) inputs can be padded, got {len(axes)} axes")
        amount = {2: [0, 0], 3: [0, 0]}  # axis: [begin, end]
        for i, ax in enumerate(axes):
            begin, end = pads[i], pads[i + len(axes)]
            if begin < 0 or end < 0:
                raise SparseCNNError(f"{where}: negative pads (cropping) {pads} are not supported")
            if ax % 4 in amount:
                amount[ax % 4] = [begin, end]
            elif begin or end:
                raise SparseCNNError(f"{where}: only the spatial axes (H, W) can be padded, got pads {pads} "
                                     f"for axes {axes}")
        module = Pad2d((*amount[3], *amount[2]), mode=modes[mode], value=value)
        self._simple(node, where, name, module)

    def op_GlobalAveragePool(self, node, where, a, name):
        self._simple(node, where, name, nn.AdaptiveAvgPool2d(1))

    def op_GlobalMaxPool(self, node, where, a, name):
        self._simple(node, where, name, nn.AdaptiveMaxPool2d(1))

    def op_Flatten(self, node, where, a, name):
        if int(a.get("axis", 1)) != 1:
            raise SparseCNNError(f"{where}: Flatten is supported for axis 1 only, got {a.get('axis')}")
        self._simple(node, where, name, nn.Flatten(1))

    def op_Reshape(self, node, where, a, name):
        ins = self._inputs(node)
        allowzero = bool(a.get("allowzero", 0))
        if ins[0] in self.consts and ins[1] in self.consts:  # fold at import (torch's pad arithmetic)
            data, dims = self.consts[ins[0]], [int(d) for d in self.consts[ins[1]].reshape(-1)]
            if not allowzero:
                dims = [data.shape[i] if d == 0 else d for i, d in enumerate(dims)]
            try:
                self.consts[node.output[0]] = data.reshape(dims)
            except ValueError as exc:
                raise SparseCNNError(f"{where}: cannot reshape {data.shape} to {dims} ({exc})") from None
            return
        if ins[1] in self.consts:
            self._simple(node, where, name, Reshape(self.consts[ins[1]].reshape(-1).tolist(), allowzero))
        else:
            self._simple(node, where, name, Reshape(None, allowzero), n_inputs=2)

    def op_LRN(self, node, where, a, name):
        size = int(a.get("size", 0))
        if size <= 0 or size % 2 == 0:
            raise SparseCNNError(f"{where}: LRN size must be odd and positive, got {size}")
        module = LocalResponseNorm(
            size, float(a.get("alpha", 1e-4)), float(a.get("beta", 0.75)), float(a.get("bias", 1.0))
        )
        self._simple(node, where, name, module)

    def _binary(self, node, where, name, op):
        x, y = self._inputs(node)[:2]
        if x in self.consts and y in self.consts:  # fold at import
            fn = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide}[op]
            self.consts[node.output[0]] = np.asarray(fn(self.consts[x], self.consts[y]))
            return
        if y in self.consts:
            module = Binary(op, torch.from_numpy(self.consts[y].copy()))
            ins = [x]
        elif x in self.consts:
            module = Binary(op, torch.from_numpy(self.consts[x].copy()), const_first=True)
            ins = [y]
        else:
            module, ins = Binary(op), [x, y]
        for i in ins:
            self.need(i, where)
        self.add(module, name, ins, node.output[:1])

    def op_Add(self, node, where, a, name):
        self._binary(node, where, name, "add")

    def op_Sub(self, node, where, a, name):
        self._binary(node, where, name, "sub")

    def op_Mul(self, node, where, a, name):
        self._binary(node, where, name, "mul")

    def op_Div(self, node, where, a, name):
        self._binary(node, where, name, "div")

    def op_Concat(self, node, where, a, name):
        ins = self._inputs(node)
        if ins and all(i in self.consts for i in ins):  # fold at import
            try:
                axis = int(a["axis"]) if "axis" in a else 1
                self.consts[node.output[0]] = np.concatenate([self.consts[i] for i in ins], axis)
            except ValueError as exc:
                raise SparseCNNError(f"{where}: cannot concatenate its constants ({exc})") from None
            return
        self._simple(node, where, name, Concat(int(a["axis"]) if "axis" in a else 1), n_inputs=len(ins))

    def op_BatchNormalization(self, node, where, a, name):
        ins = self._inputs(node)
        if len(ins) < 5 or int(a.get("training_mode", 0)):
            raise SparseCNNError(
                f"{where}: only inference-mode BatchNormalization with 5 inputs is supported"
            )
        scale, bias, mean, var = (
            self.const(n, where, w, finite=True)
            for n, w in zip(ins[1:5], ("scale", "B", "mean", "var"), strict=True)
        )
        c = scale.shape[0] if scale.ndim == 1 else -1
        if c <= 0 or any(t.shape != (c,) for t in (bias, mean, var)):
            raise SparseCNNError(f"{where}: scale, B, mean and var must be vectors of one length")
        module = BatchNorm(c, eps=float(a.get("epsilon", 1e-5)), momentum=0.1, affine=True)
        with torch.no_grad():
            for t, v in (
                (module.weight, scale),
                (module.bias, bias),
                (module.running_mean, mean),
                (module.running_var, var),
            ):
                t.copy_(torch.from_numpy(v.astype(np.float32)))
        prefix = ins[1][: -len(".weight")] if ins[1].endswith(".weight") else name
        self._simple(node, where, prefix, module)

    def op_Softmax(self, node, where, a, name):
        if self.opset >= 13:
            self._simple(node, where, name, nn.Softmax(dim=int(a.get("axis", -1))))
        else:
            self._simple(node, where, name, Softmax2D(int(a.get("axis", 1))))

    def op_Constant(self, node, where, a, name):
        if "value" not in a or not isinstance(a["value"], np.ndarray):
            raise SparseCNNError(f"{where}: only tensor-valued Constants are supported")
        self.consts[node.output[0]] = a["value"]

    def op_Shape(self, node, where, a, name):
        if "start" in a or "end" in a:
            raise SparseCNNError(f"{where}: Shape with start/end is not supported")
        self._simple(node, where, name, Shape())

    def op_Gather(self, node, where, a, name):
        ins = self._inputs(node)
        if ins[0] in self.consts and ins[1] in self.consts:
            self.consts[node.output[0]] = np.take(
                self.consts[ins[0]], self.consts[ins[1]], axis=int(a.get("axis", 0))
            )
            return
        self._simple(node, where, name, Gather(int(a.get("axis", 0))), n_inputs=2)

    def _axes(self, node, where, a) -> list[int]:
        ins = self._inputs(node)
        if "axes" in a:
            return [int(v) for v in a["axes"]]
        if len(ins) > 1 and ins[1]:
            return [int(v) for v in self.const(ins[1], where, "axes").reshape(-1)]
        return []

    def op_Unsqueeze(self, node, where, a, name):
        axes = self._axes(node, where, a)
        if not axes:
            raise SparseCNNError(f"{where}: Unsqueeze needs axes")
        self._simple(node, where, name, Unsqueeze(axes))

    def op_Squeeze(self, node, where, a, name):
        self._simple(node, where, name, Squeeze(self._axes(node, where, a)))


    # -- arithmetic on constants, folded at import: torch's exporter computes a Pad node's pads with
    # ConstantOfShape / Concat / Reshape / Slice / Transpose / Cast (F.pad, nn.ZeroPad2d, ...)

    def folded(self, node, where, *names):
        """The constant inputs ``names``; a clear error where one is computed at run time."""
        for n in names:
            if n not in self.consts:
                raise SparseCNNError(f"{where}: {node.op_type} of a tensor computed at run time is not "
                                     f"supported (only of constants, folded at import)")
        return [self.consts[n] for n in names]

    def op_ConstantOfShape(self, node, where, a, name):
        (shape,) = self.folded(node, where, self._inputs(node)[0])
        value = a.get("value", np.zeros(1, np.float32))
        self.consts[node.output[0]] = np.full([int(d) for d in shape.reshape(-1)], value.reshape(-1)[0],
                                              dtype=value.dtype)

    def op_Slice(self, node, where, a, name):
        ins = self._inputs(node)
        if self.opset < 10:
            (data,) = self.folded(node, where, ins[0])
            starts, ends = a.get("starts", []), a.get("ends", [])
            axes, steps = a.get("axes", list(range(len(starts)))), [1] * len(starts)
        else:
            data, starts, ends = self.folded(node, where, *ins[:3])
            axes = self.folded(node, where, ins[3])[0] if len(ins) > 3 and ins[3] else range(len(starts))
            steps = self.folded(node, where, ins[4])[0] if len(ins) > 4 and ins[4] else [1] * len(starts)
        index = [slice(None)] * data.ndim
        for ax, lo, hi, st in zip(axes, np.ravel(starts), np.ravel(ends), np.ravel(steps), strict=True):
            # ONNX clamps out-of-range starts and ends as Python slicing does (INT64_MAX means "to the end")
            index[int(ax)] = slice(int(lo), int(hi), int(st))
        self.consts[node.output[0]] = data[tuple(index)]

    def op_Transpose(self, node, where, a, name):
        (data,) = self.folded(node, where, self._inputs(node)[0])
        perm = a.get("perm")
        self.consts[node.output[0]] = np.transpose(data, None if perm is None else [int(p) for p in perm])

    def op_Cast(self, node, where, a, name):
        (data,) = self.folded(node, where, self._inputs(node)[0])
        try:
            dtype = self.onnx.helper.tensor_dtype_to_np_dtype(int(a["to"]))
        except (KeyError, ValueError, TypeError):
            raise SparseCNNError(f"{where}: Cast to an unknown type {a.get('to')!r}") from None
        self.consts[node.output[0]] = data.astype(dtype)


SUPPORTED_OPS: tuple[str, ...] = tuple(sorted(n[3:] for n in dir(_Importer) if n.startswith("op_")))


def load_onnx(path: str | os.PathLike[str], *, input_shape: Sequence[int] | None = None) -> GraphNet:
    """Load an ONNX model as a torch module.

    Parameters
    ----------
    path : path
        The ``.onnx`` file (external data files beside it are read too).
    input_shape : (C, H, W), optional
        Recorded as ``input_shape`` when the graph's input has symbolic dimensions.

    Returns
    -------
    GraphNet
        In eval mode, with ``nn.Conv2d`` / ``nn.Linear`` children named after their weights.

    Raises
    ------
    SparseCNNError
        For an unreadable or corrupt file, an unsupported operator (named with its node), or
        constants that do not fit.
    """
    onnx, _ = _onnx()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise SparseCNNError(f"ONNX model {path} does not exist")
    try:
        model = onnx.load(path)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SparseCNNError(f"ONNX model {path} is truncated or not an ONNX ModelProto ({first})") from None
    if not model.HasField("graph") or not model.graph.node:
        raise SparseCNNError(f"ONNX model {path} holds no graph nodes; is it an ONNX model?")
    try:
        net = _Importer(model, path).convert()
    except SparseCNNError as exc:
        raise SparseCNNError(f"ONNX model {path}: {exc}") from None
    except (TypeError, IndexError, KeyError, RuntimeError, OverflowError, ValueError, AttributeError) as exc:
        raise SparseCNNError(
            f"ONNX model {path}: cannot convert the graph ({type(exc).__name__}: {exc})"
        ) from None
    if input_shape is not None:
        net.input_shape = tuple(int(d) for d in input_shape)
    if not net.input_shape or any(d <= 0 for d in net.input_shape):
        net.input_shape = ()
    net.eval()
    _dry_run(net, path)
    return net


_DRY_RUN_MAX_ELEMENTS = 1 << 24  # a 64 MB input: larger declared shapes are not tried


def _dry_run(net: GraphNet, path: str) -> None:
    """One forward on zeros of the declared input shape (batch 1): ONNX files carry no checksum and the
    importer does not infer shapes, so a corrupt attribute or dimension (a 1-element ``strides``, a
    flattened size that no longer matches the Gemm) must fail here, not in the user's first call."""
    shape = net.input_shape
    if not shape or math.prod(shape) > _DRY_RUN_MAX_ELEMENTS:
        return
    try:
        with torch.no_grad():
            net(torch.zeros((1, *shape)))
    except SparseCNNError as exc:
        raise SparseCNNError(f"ONNX model {path} does not run on its input shape {shape}: {exc}") from None
    except (RuntimeError, IndexError, ValueError, TypeError, OverflowError, ZeroDivisionError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SparseCNNError(
            f"ONNX model {path} does not run on its input shape {shape} ({type(exc).__name__}: {first}); "
            f"the file is corrupt or its input shape is wrong: pass input_shape="
        ) from None


# ------------------------------------------------------------------------------------------------
# export


class _LRNFunction(torch.autograd.Function):
    """``F.local_response_norm`` that the TorchScript exporter writes as one ONNX LRN node."""

    @staticmethod
    def forward(ctx, x, size, alpha, beta, k):
        return nn.functional.local_response_norm(x, size, alpha, beta, k)

    @staticmethod
    def symbolic(g, x, size, alpha, beta, k):
        return g.op("LRN", x, size_i=size, alpha_f=alpha, beta_f=beta, bias_f=k)


class _ExportLRN(nn.Module):
    def __init__(self, lrn: nn.LocalResponseNorm) -> None:
        super().__init__()
        self.size, self.alpha, self.beta, self.k = lrn.size, lrn.alpha, lrn.beta, lrn.k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _LRNFunction.apply(x, self.size, self.alpha, self.beta, self.k)


class _PadFunction(torch.autograd.Function):
    """``F.pad`` of the last two dimensions that the exporter writes as one ONNX Pad node (torch's own
    export computes the pads with a dozen shape nodes)."""

    @staticmethod
    def forward(ctx, x, left, right, top, bottom, mode, value):
        pads = (left, right, top, bottom)
        if mode == "constant":
            return nn.functional.pad(x, pads, value=value)
        return nn.functional.pad(x, pads, mode=mode)

    @staticmethod
    def symbolic(g, x, left, right, top, bottom, mode, value):
        onnx_pads = g.op("Constant", value_t=torch.tensor([0, 0, top, left, 0, 0, bottom, right],
                                                          dtype=torch.int64))
        onnx_mode = {"constant": "constant", "reflect": "reflect", "replicate": "edge"}[mode]
        if mode != "constant":
            return g.op("Pad", x, onnx_pads, mode_s=onnx_mode)
        return g.op("Pad", x, onnx_pads, g.op("Constant", value_t=torch.tensor(value, dtype=torch.float32)),
                    mode_s=onnx_mode)


class _ExportPad(nn.Module):
    def __init__(self, pad: Pad2d) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = self.pad.amounts(int(x.shape[-2]), int(x.shape[-1]))
        return _PadFunction.apply(x, *pads, self.pad.mode, self.pad.value)


class _AvgPoolPaddedFunction(torch.autograd.Function):
    """:class:`AvgPoolPadded` as one ONNX AveragePool (``count_include_pad`` 0, explicit or SAME pads)."""

    @staticmethod
    def forward(ctx, x, kh, kw, sh, sw, left, right, top, bottom, same):
        return AvgPoolPadded((kh, kw), (sh, sw), (left, right, top, bottom), same=same)(x)

    @staticmethod
    def symbolic(g, x, kh, kw, sh, sw, left, right, top, bottom, same):
        kw_ = dict(kernel_shape_i=[kh, kw], strides_i=[sh, sw], count_include_pad_i=0)
        if same:
            return g.op("AveragePool", x, auto_pad_s=f"SAME_{same.upper()}", **kw_)
        return g.op("AveragePool", x, pads_i=[top, left, bottom, right], **kw_)


class _ExportAvgPoolPadded(nn.Module):
    def __init__(self, pool: AvgPoolPadded) -> None:
        super().__init__()
        self.args = (*pool.kernel_size, *pool.stride, *pool.pad.pads, pool.pad.same)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _AvgPoolPaddedFunction.apply(x, *self.args)


@contextlib.contextmanager
def _for_export(model: nn.Module):
    """A copy of ``model`` in eval mode with export-friendly layers (sparse -> dense, LRN, Pad2d and
    AvgPoolPadded -> one ONNX node each). The replacements are seeded into deepcopy's memo, so the
    sparse formats are never copied and the caller's model is never touched."""
    memo: dict[int, Any] = {}
    for m in model.modules():
        if isinstance(m, nn.LocalResponseNorm) and m.size % 2 == 1:
            memo[id(m)] = _ExportLRN(m)
        elif isinstance(m, Pad2d):
            memo[id(m)] = _ExportPad(m)
        elif isinstance(m, AvgPoolPadded):
            memo[id(m)] = _ExportAvgPoolPadded(m)
        elif _sparse.is_sparse(m):
            memo[id(m)] = _sparse.dense_module(m)
    yield copy.deepcopy(model, memo).eval()


def onnx_opsets() -> tuple[int, int]:
    """The ONNX opsets the installed torch's exporter writes, e.g. ``(7, 20)``."""
    try:
        from torch.onnx import _constants as c

        return c.ONNX_MIN_OPSET, c.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET
    except (ImportError, AttributeError):  # a private module: torch 2.x's range
        return 7, 20


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    input_shape: Sequence[int] | None = None,
    opset: int = 17,
) -> str:
    """Export ``model`` to ONNX for ONNX Runtime and other runtimes.

    Parameters
    ----------
    model : torch.nn.Module
        Any model torch can trace; sparsecnn's sparse layers are written as their dense equivalent.
        The model is copied, not changed.
    path : path
        Output file, written atomically (a temporary file beside it, then renamed).
    input_shape : (C, H, W), optional
        Defaults to ``model.input_shape``. The batch dimension is dynamic (``batch``).
    opset : int
        ONNX opset version.

    Returns
    -------
    str
        ``path``. The graph's input is named ``input`` and its output ``output`` (``output0``, ... for
        several).
    """
    if not isinstance(model, nn.Module):
        raise SparseCNNError(f"export_onnx needs a torch.nn.Module, got {type(model).__name__}")
    onnx, _ = _onnx()
    shape = tuple(input_shape) if input_shape is not None else tuple(getattr(model, "input_shape", ()) or ())
    if not shape or any(not isinstance(d, int) or d <= 0 for d in shape):
        raise SparseCNNError(
            f"cannot export {type(model).__name__}: its input shape is unknown; pass input_shape=(C, H, W)"
        )
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise SparseCNNError(f"cannot write {path}: directory {directory} does not exist")
    if os.path.isdir(path):
        raise SparseCNNError(f"cannot write {path}: it is a directory; give a file path such as "
                             f"{os.path.join(path, 'model.onnx')}")
    lo, hi = onnx_opsets()
    if isinstance(opset, bool) or not isinstance(opset, int) or not lo <= opset <= hi:
        # torch prints its whole graph to stderr before refusing an opset it does not export
        raise SparseCNNError(f"opset {opset!r}: torch {torch.__version__.split('+')[0]} exports ONNX opsets "
                             f"{lo}..{hi}; choose one of them (default 17)")
    from sparsecnn.models.zoo import check_finite

    check_finite(model.state_dict().items(), f"cannot export {type(model).__name__}")
    with _for_export(model) as export_model:
        x = torch.zeros(1, *shape)
        with torch.no_grad():
            try:
                y = export_model(x)
            except RuntimeError as exc:
                raise SparseCNNError(
                    f"cannot run {type(model).__name__} on an input of shape {(1, *shape)}: {exc}"
                ) from None
        n_out = len(y) if isinstance(y, (tuple, list)) else 1
        outputs = ["output"] if n_out == 1 else [f"output{i}" for i in range(n_out)]
        dynamic = {name: {0: "batch"} for name in ["input", *outputs]}
        fd, tmp = tempfile.mkstemp(prefix=".export-", suffix=".onnx", dir=directory)
        os.close(fd)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    export_model,
                    (x,),
                    tmp,
                    dynamo=False,
                    input_names=["input"],
                    output_names=outputs,
                    dynamic_axes=dynamic,
                    opset_version=opset,
                    do_constant_folding=True,
                    # PRESERVE: the model is in eval mode, and conv+BN are not folded, so names stay
                    training=torch.onnx.TrainingMode.PRESERVE,
                )
            onnx.checker.check_model(tmp)
            os.replace(tmp, path)
        except SparseCNNError:
            raise
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise SparseCNNError(f"cannot export {type(model).__name__} to ONNX: {first}") from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return path
