"""The module that imported models become: named steps run in order over named tensors.

A Caffe net or an ONNX graph is a list of layers, each reading some named blobs and writing others.
:class:`GraphNet` keeps that shape: every layer is a child module registered under a readable name
(the Caffe layer name, or the ONNX weight's name), so ``named_modules()`` shows ``conv1`` ... ``fc8``
and analysis, pruning and ``sparsify`` find and replace them like in any other module. ``forward``
looks each child up by name at call time, so a child swapped for a sparse layer is used at once.

The architecture is described without pickle by :meth:`GraphNet.describe` (JSON-able: the steps and,
per child, its class and constructor arguments, for a fixed set of classes) and rebuilt by
:func:`from_description`; sparse checkpoints use this to rebuild imported models.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from sparsecnn.errors import SparseCNNError
from sparsecnn.models.zoo import LocalResponseNorm, MaxPool2d

__all__ = ["AvgPoolPadded", "GraphNet", "Pad2d", "Step", "from_description", "module_from_spec",
           "module_spec"]


class Step(NamedTuple):
    """One layer of a :class:`GraphNet`.

    ``flatten`` is the axis from which the first input is flattened before the module runs (Caffe's
    InnerProduct ``axis``), or -1 for none.
    """

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    flatten: int = -1


# ------------------------------------------------------------------------------------------------
# small parameter-free operators (Caffe Concat/Eltwise, ONNX shape arithmetic)


class Concat(nn.Module):
    """Concatenate all inputs along ``dim`` (Caffe Concat, ONNX Concat)."""

    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return torch.cat(xs, dim=self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class Eltwise(nn.Module):
    """Caffe Eltwise: ``sum`` (with per-input coefficients), ``prod`` or ``max`` of same-shape inputs."""

    def __init__(self, op: str = "sum", coeff: Sequence[float] = ()) -> None:
        super().__init__()
        if op not in ("sum", "prod", "max"):
            raise SparseCNNError(f"Eltwise operation must be sum, prod or max, got {op!r}")
        self.op, self.coeff = op, tuple(float(c) for c in coeff)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        if self.op == "sum":
            coeff = self.coeff or (1.0,) * len(xs)
            out = xs[0] * coeff[0] if coeff[0] != 1.0 else xs[0]
            for x, c in zip(xs[1:], coeff[1:], strict=True):
                out = out + (x * c if c != 1.0 else x)
            return out
        out = xs[0]
        for x in xs[1:]:
            out = out * x if self.op == "prod" else torch.maximum(out, x)
        return out

    def extra_repr(self) -> str:
        return f"op={self.op!r}" + (f", coeff={self.coeff}" if self.coeff else "")


class ChannelScale(nn.Module):
    """Caffe Scale with a learned per-channel factor (and bias) along axis 1: ``x * w[c] + b[c]``."""

    def __init__(self, num_features: int, bias: bool = True) -> None:
        super().__init__()
        self.num_features = num_features
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        view = (1, -1) + (1,) * (x.dim() - 2)
        out = x * self.weight.view(view)
        return out + self.bias.view(view) if self.bias is not None else out

    def extra_repr(self) -> str:
        return f"{self.num_features}, bias={self.bias is not None}"


class Binary(nn.Module):
    """ONNX Add / Sub / Mul / Div with numpy broadcasting; a constant operand is a buffer."""

    _OPS: ClassVar[dict[str, Any]] = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div}

    def __init__(self, op: str, const: torch.Tensor | None = None, const_first: bool = False) -> None:
        super().__init__()
        if op not in self._OPS:
            raise SparseCNNError(f"binary operator must be one of {sorted(self._OPS)}, got {op!r}")
        self.op, self.const_first = op, bool(const_first)
        self.register_buffer("const", const)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        fn = self._OPS[self.op]
        if self.const is None:
            return fn(xs[0], xs[1])
        return fn(self.const, xs[0]) if self.const_first else fn(xs[0], self.const)


class Constant(nn.Module):
    """An ONNX Constant: no inputs, one stored output."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("value", value)

    def forward(self) -> torch.Tensor:
        return self.value


class Shape(nn.Module):
    """ONNX Shape: the input's shape as an int64 vector."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tensor(x.shape, dtype=torch.int64)


class Gather(nn.Module):
    """ONNX Gather along ``dim`` with integer indices (negative ones count from the end)."""

    def __init__(self, dim: int = 0) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        index = index.long()
        index = torch.where(index < 0, index + x.shape[self.dim], index)
        if index.dim() == 0:
            return x.select(self.dim, int(index))
        return torch.index_select(x, self.dim, index.reshape(-1)).reshape(
            x.shape[: self.dim % x.dim()] + index.shape + x.shape[self.dim % x.dim() + 1 :]
        )


class Unsqueeze(nn.Module):
    """ONNX Unsqueeze: insert size-1 axes (axes given in output numbering, as ONNX does)."""

    def __init__(self, axes: Sequence[int]) -> None:
        super().__init__()
        self.axes = tuple(int(a) for a in axes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rank = x.dim() + len(self.axes)
        for a in sorted(a % rank for a in self.axes):
            x = x.unsqueeze(a)
        return x


class Squeeze(nn.Module):
    """ONNX Squeeze: drop the given size-1 axes (all size-1 axes when none are given)."""

    def __init__(self, axes: Sequence[int] = ()) -> None:
        super().__init__()
        self.axes = tuple(int(a) for a in axes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.axes:
            return x.squeeze()
        for a in sorted((a % x.dim() for a in self.axes), reverse=True):
            x = x.squeeze(a)
        return x


class Reshape(nn.Module):
    """ONNX Reshape: target shape from a fixed tuple or a second input; 0 copies the input's size."""

    def __init__(self, shape: Sequence[int] | None = None, allowzero: bool = False) -> None:
        super().__init__()
        self.shape = None if shape is None else tuple(int(d) for d in shape)
        self.allowzero = bool(allowzero)

    def forward(self, x: torch.Tensor, shape: torch.Tensor | None = None) -> torch.Tensor:
        dims = self.shape if self.shape is not None else tuple(int(d) for d in shape.tolist())
        if not self.allowzero:
            dims = tuple(x.shape[i] if d == 0 else d for i, d in enumerate(dims))
        return x.reshape(dims)

    def extra_repr(self) -> str:
        return f"shape={self.shape}" if self.shape is not None else "shape=<input>"


class Softmax2D(nn.Module):
    """ONNX Softmax before opset 13: flatten to 2-D at ``axis``, softmax over the second dimension."""

    def __init__(self, axis: int = 1) -> None:
        super().__init__()
        self.axis = axis

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axis = self.axis % x.dim()
        return torch.softmax(x.reshape(math.prod(x.shape[:axis]), -1), dim=1).reshape(x.shape)


class Pad2d(nn.Module):
    """Padding of the last two dimensions: an ONNX Pad node, or the asymmetric or ``auto_pad`` SAME
    padding of a Conv / pool made explicit before it (torch's layers pad both sides alike).

    ``pads`` is ``(left, right, top, bottom)``; ``mode`` ``"constant"`` (with ``value``: 0, or -inf
    before a max pool), ``"reflect"`` or ``"replicate"`` (ONNX's ``edge``). With ``same`` (``"upper"``
    or ``"lower"``) the amounts come from each input's size as ONNX's ``auto_pad`` SAME_UPPER /
    SAME_LOWER computes them for ``kernel``, ``stride`` and ``dilation``: the output has
    ``ceil(size / stride)`` positions, and an odd total puts the extra row or column at the end
    (``"upper"``) or at the start (``"lower"``).
    """

    def __init__(self, pads: Sequence[int] = (0, 0, 0, 0), mode: str = "constant", value: float = 0.0,
                 same: str = "", kernel: Sequence[int] = (1, 1), stride: Sequence[int] = (1, 1),
                 dilation: Sequence[int] = (1, 1)) -> None:
        super().__init__()
        if mode not in ("constant", "reflect", "replicate"):
            raise ValueError(f"unknown padding mode {mode!r}")
        if same not in ("", "upper", "lower"):
            raise ValueError(f"unknown SAME padding {same!r}")
        self.pads = tuple(int(p) for p in pads)
        if len(self.pads) != 4 or min(self.pads) < 0:
            raise ValueError(f"pads must be 4 non-negative sizes, got {pads}")
        self.mode, self.value, self.same = mode, float(value), same
        self.kernel, self.stride, self.dilation = (
            tuple(int(v) for v in t) for t in (kernel, stride, dilation))

    def amounts(self, h: int, w: int) -> tuple[int, int, int, int]:
        """``(left, right, top, bottom)`` for an input of ``h`` x ``w``."""
        if not self.same:
            return self.pads  # type: ignore[return-value]
        out: list[int] = []
        for n, k, s, d in zip((w, h), self.kernel[::-1], self.stride[::-1], self.dilation[::-1], strict=True):
            total = max((-(-n // s) - 1) * s + (k - 1) * d + 1 - n, 0)
            small = total // 2
            out += [small, total - small] if self.same == "upper" else [total - small, small]
        return tuple(out)  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = self.amounts(int(x.shape[-2]), int(x.shape[-1]))
        if self.mode == "constant":
            return nn.functional.pad(x, pads, value=self.value)
        if self.mode == "reflect" and (max(pads[:2]) >= x.shape[-1] or max(pads[2:]) >= x.shape[-2]):
            raise SparseCNNError(
                f"reflect padding {pads} needs an input larger than the padding, got {tuple(x.shape[-2:])}"
            )
        return nn.functional.pad(x, pads, mode=self.mode)

    def extra_repr(self) -> str:
        where = (f"same={self.same}, kernel={self.kernel}, stride={self.stride}" if self.same
                 else f"pads={self.pads}")
        return f"{where}, mode={self.mode}" + (f", value={self.value}" if self.mode == "constant" else "")


class AvgPoolPadded(nn.Module):
    """An average pool over padding that torch's layer cannot take (asymmetric, SAME, above half the
    kernel) and that leaves the padding out of each window's divisor (ONNX ``count_include_pad=0``):
    the window sums of the zero-padded input over the number of input pixels in each window.

    ``pads`` and ``same`` as :class:`Pad2d`'s (the whole padding; the pool itself pads nothing).
    NOTE: every window must hold an input pixel (the importer refuses pads of a kernel or more).
    """

    def __init__(self, kernel_size: Sequence[int], stride: Sequence[int], pads: Sequence[int] = (0, 0, 0, 0),
                 same: str = "") -> None:
        super().__init__()
        self.kernel_size = tuple(int(v) for v in kernel_size)
        self.stride = tuple(int(v) for v in stride)
        self.pad = Pad2d(pads, same=same, kernel=self.kernel_size, stride=self.stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = self.pad.amounts(int(x.shape[-2]), int(x.shape[-1]))
        f = nn.functional
        window = f.avg_pool2d(f.pad(x, pads), self.kernel_size, self.stride)
        inside = f.avg_pool2d(f.pad(x.new_ones((1, 1, *x.shape[-2:])), pads), self.kernel_size, self.stride)
        return window / inside

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, {self.pad.extra_repr()}"


class BatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over dimension 1 for inputs of any rank >= 2 (ONNX BatchNormalization)."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input with at least 2 dimensions, got {input.dim()}")


# ------------------------------------------------------------------------------------------------
# pickle-free description of the children: class name + constructor arguments


def _pair(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


_SPECS: dict[type[nn.Module], Any] = {
    nn.Conv2d: lambda m: dict(
        in_channels=m.in_channels,
        out_channels=m.out_channels,
        kernel_size=_pair(m.kernel_size),
        stride=_pair(m.stride),
        padding=_pair(m.padding),
        dilation=_pair(m.dilation),
        groups=m.groups,
        bias=m.bias is not None,
        padding_mode=m.padding_mode,
    ),
    nn.Linear: lambda m: dict(
        in_features=m.in_features, out_features=m.out_features, bias=m.bias is not None
    ),
    nn.ReLU: lambda m: {},
    nn.LeakyReLU: lambda m: dict(negative_slope=m.negative_slope),
    nn.ReLU6: lambda m: {},
    nn.Hardtanh: lambda m: dict(min_val=m.min_val, max_val=m.max_val),
    nn.Sigmoid: lambda m: {},
    nn.Tanh: lambda m: {},
    nn.Identity: lambda m: {},
    nn.Dropout: lambda m: dict(p=m.p),
    nn.Softmax: lambda m: dict(dim=m.dim),
    nn.Flatten: lambda m: dict(start_dim=m.start_dim, end_dim=m.end_dim),
    nn.MaxPool2d: lambda m: dict(
        kernel_size=_pair(m.kernel_size),
        stride=_pair(m.stride),
        padding=_pair(m.padding),
        dilation=_pair(m.dilation),
        ceil_mode=m.ceil_mode,
    ),
    nn.AvgPool2d: lambda m: dict(
        kernel_size=_pair(m.kernel_size),
        stride=_pair(m.stride),
        padding=_pair(m.padding),
        ceil_mode=m.ceil_mode,
        count_include_pad=m.count_include_pad,
    ),
    nn.AdaptiveAvgPool2d: lambda m: dict(output_size=_pair(m.output_size)),
    nn.AdaptiveMaxPool2d: lambda m: dict(output_size=_pair(m.output_size)),
    nn.LocalResponseNorm: lambda m: dict(size=m.size, alpha=m.alpha, beta=m.beta, k=m.k),
    nn.BatchNorm1d: lambda m: dict(
        num_features=m.num_features,
        eps=m.eps,
        momentum=m.momentum,
        affine=m.affine,
        track_running_stats=m.track_running_stats,
    ),
    Concat: lambda m: dict(dim=m.dim),
    Eltwise: lambda m: dict(op=m.op, coeff=list(m.coeff)),
    ChannelScale: lambda m: dict(num_features=m.num_features, bias=m.bias is not None),
    Shape: lambda m: {},
    Gather: lambda m: dict(dim=m.dim),
    Unsqueeze: lambda m: dict(axes=list(m.axes)),
    Squeeze: lambda m: dict(axes=list(m.axes)),
    Reshape: lambda m: dict(shape=None if m.shape is None else list(m.shape), allowzero=m.allowzero),
    Softmax2D: lambda m: dict(axis=m.axis),
    AvgPoolPadded: lambda m: dict(kernel_size=list(m.kernel_size), stride=list(m.stride),
                                  pads=list(m.pad.pads), same=m.pad.same),
    Pad2d: lambda m: dict(pads=list(m.pads), mode=m.mode, value=m.value, same=m.same, kernel=list(m.kernel),
                          stride=list(m.stride), dilation=list(m.dilation)),
}
_SPECS[nn.BatchNorm2d] = _SPECS[nn.BatchNorm1d]
_SPECS[LocalResponseNorm] = _SPECS[nn.LocalResponseNorm]
_SPECS[MaxPool2d] = _SPECS[nn.MaxPool2d]
_SPECS[BatchNorm] = _SPECS[nn.BatchNorm1d]
# Modules whose tensors are buffers created from data: rebuilt empty of the recorded shape and
# filled from the state dict.
_BUFFERED = {
    Constant: lambda m: dict(shape=list(m.value.shape), dtype=str(m.value.dtype).removeprefix("torch.")),
    Binary: lambda m: dict(
        op=m.op,
        const_first=m.const_first,
        const=None
        if m.const is None
        else dict(shape=list(m.const.shape), dtype=str(m.const.dtype).removeprefix("torch.")),
    ),
}
_CLASSES = {cls.__name__: cls for cls in (*_SPECS, *_BUFFERED)}


def module_spec(module: nn.Module) -> dict[str, Any]:
    """``{"class": name, "args": {...}}`` for a module :func:`module_from_spec` can rebuild."""
    cls = type(module)
    if cls in _SPECS:
        return {"class": cls.__name__, "args": _SPECS[cls](module)}
    if cls in _BUFFERED:
        return {"class": cls.__name__, "args": _BUFFERED[cls](module)}
    raise SparseCNNError(
        f"cannot describe a {cls.__name__} module without pickle; supported: {', '.join(sorted(_CLASSES))}"
    )


def _empty(spec: dict[str, Any]) -> torch.Tensor:
    dtype = getattr(torch, str(spec["dtype"]), None)
    if not isinstance(dtype, torch.dtype):
        raise SparseCNNError(f"unknown tensor dtype {spec['dtype']!r} in a model description")
    return torch.zeros([int(d) for d in spec["shape"]], dtype=dtype)


def module_from_spec(spec: dict[str, Any]) -> nn.Module:
    """Rebuild an (uninitialised) module from :func:`module_spec`'s output."""
    try:
        cls = _CLASSES[spec["class"]]
        args = dict(spec["args"])
        for key in ("kernel_size", "stride", "padding", "dilation", "output_size"):
            if isinstance(args.get(key), list):
                args[key] = tuple(args[key])
        if cls is Constant:
            return Constant(_empty(args))
        if cls is Binary:
            const = args.pop("const")
            return Binary(const=None if const is None else _empty(const), **args)
        if cls in (nn.Conv2d, nn.Linear):
            return nn.utils.skip_init(cls, **args)  # weights come from the state dict
        return cls(**args)
    except SparseCNNError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise SparseCNNError(f"malformed module description {spec!r}: {exc}") from None


# ------------------------------------------------------------------------------------------------


_RESERVED = set(dir(nn.Module)) | {"steps", "inputs", "outputs", "input_shape", "source"}


def safe_name(name: str, taken: set[str], fallback: str) -> str:
    """A unique attribute name for a child module made from a layer's name."""
    base = re.sub(r"\W", "_", name.strip()).strip("_") or fallback
    if base in _RESERVED or base.startswith("_"):
        base = "layer_" + base
    out, i = base, 1
    while out in taken:
        i += 1
        out = f"{base}_{i}"
    taken.add(out)
    return out


class GraphNet(nn.Module):
    """Runs named child modules in order over a dictionary of named tensors.

    Parameters
    ----------
    steps : sequence of Step
        In execution order; ``step.name`` is the child's attribute name.
    modules : dict[str, nn.Module]
        The children by name.
    inputs, outputs : sequence of str
        Names of the network's input tensors (positional arguments of ``forward``, in order) and of the
        tensors ``forward`` returns (one tensor, or a tuple for several).
    input_shape : tuple of int
        Shape of one sample of the first input, e.g. (C, H, W).
    source : str
        Where the net came from, e.g. ``"caffe:deploy.prototxt"``; for messages and reports.
    """

    def __init__(
        self,
        steps: Sequence[Step],
        modules: dict[str, nn.Module],
        inputs: Sequence[str],
        outputs: Sequence[str],
        input_shape: tuple[int, ...],
        source: str = "",
    ) -> None:
        super().__init__()
        self.steps = [Step(str(s[0]), tuple(s[1]), tuple(s[2]), int(s[3])) for s in steps]
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        self.input_shape = tuple(int(d) for d in input_shape)
        self.source = source
        for name, module in modules.items():
            self.add_module(name, module)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if len(xs) != len(self.inputs):
            raise TypeError(f"{type(self).__name__} takes {len(self.inputs)} input(s), got {len(xs)}")
        blobs = dict(zip(self.inputs, xs, strict=True))
        for name, ins, outs, flatten in self.steps:
            args = [blobs[i] for i in ins]
            if flatten >= 0 and args[0].dim() > flatten + 1:
                args[0] = args[0].flatten(flatten)
            y = self._modules[name](*args)
            if len(outs) == 1:
                blobs[outs[0]] = y
            else:
                blobs.update(zip(outs, y, strict=True))
        if len(self.outputs) == 1:
            return blobs[self.outputs[0]]
        return tuple(blobs[o] for o in self.outputs)

    def extra_repr(self) -> str:
        return f"inputs={self.inputs}, outputs={self.outputs}, input_shape={self.input_shape}"

    def describe(self, spec: Any = None) -> dict[str, Any]:
        """A JSON-able description of the architecture (no weights) for :func:`from_description`.

        ``spec(module) -> {"class", "args"}`` describes each child (default :func:`module_spec`).
        """
        spec = spec or module_spec
        return {
            "steps": [[s.name, list(s.inputs), list(s.outputs), s.flatten] for s in self.steps],
            "modules": {name: spec(self._modules[name]) for name in self._modules},
            "inputs": self.inputs,
            "outputs": self.outputs,
            "input_shape": list(self.input_shape),
            "source": self.source,
        }


def from_description(desc: dict[str, Any]) -> GraphNet:
    """Rebuild a :class:`GraphNet` (weights uninitialised) from :meth:`GraphNet.describe`."""
    try:
        modules = {str(name): module_from_spec(spec) for name, spec in desc["modules"].items()}
        steps = [
            Step(str(n), tuple(str(i) for i in ins), tuple(str(o) for o in outs), int(f))
            for n, ins, outs, f in desc["steps"]
        ]
        for step in steps:
            if step.name not in modules:
                raise SparseCNNError(f"step {step.name!r} has no module")
        return GraphNet(
            steps,
            modules,
            [str(i) for i in desc["inputs"]],
            [str(o) for o in desc["outputs"]],
            tuple(int(d) for d in desc["input_shape"]),
            str(desc.get("source", "")),
        )
    except SparseCNNError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise SparseCNNError(f"malformed model description ({type(exc).__name__}: {exc})") from None
