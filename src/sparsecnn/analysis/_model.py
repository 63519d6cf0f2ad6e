"""Whole-model analysis: one record per conv/linear layer plus totals (``sparsecnn analyze``)."""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
from torch import nn

from sparsecnn.analysis._inputs import load_input
from sparsecnn.analysis.costs import gemm_dims, layer_flops, weight_nbytes
from sparsecnn.analysis.sparsity import activation_stats, weight_sparsity
from sparsecnn.errors import SparseCNNError
from sparsecnn.models import apply_profile, input_shape, prunable_layers

__all__ = ["AnalysisResult", "LayerAnalysis", "TotalAnalysis", "analyze_model"]


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("inf") if a else 1.0


@dataclass(frozen=True)
class LayerAnalysis:
    """One conv or linear layer. Units and meaning of every field: docs/analyze.md."""

    name: str  # module name, as in model.named_modules()
    kind: str  # "conv" or "linear"
    weight_shape: tuple[int, ...]  # (Cout, Cin/g, kh, kw) or (out, in)
    groups: int  # conv groups g; 1 for linear
    m: int  # GEMM rows per group: Cout/g or out
    k: int  # GEMM reduction per group: Cin/g*kh*kw or in
    n: int  # GEMM columns: Hout*Wout (conv, per image) or batch (linear)
    params: int  # weight elements (bias excluded)
    nnz: int  # nonzero weights
    sparsity: float  # element sparsity: 1 - nnz/params
    filter_sparsity: float  # fraction of all-zero output channels
    channel_sparsity: float  # fraction of all-zero input channels (per group)
    kernel_shape_sparsity: float  # fraction of all-zero lowered columns
    dense_bytes: int  # float32 weight bytes
    csr_bytes: int  # CSR bytes, summed over groups
    bsr_bytes: int  # BSR 4x4 bytes, summed over groups
    relative_bytes: int  # relative-index bytes (better of 4/8-bit gaps), summed over groups
    csr_saving: float  # dense_bytes / csr_bytes
    dense_flops: int  # 2*g*M*K*N per image (N = 1 for linear)
    nonzero_flops: int  # 2*nnz*N per image
    activation_sparsity: float  # fraction of exact zeros in the layer's input on the batch


@dataclass(frozen=True)
class TotalAnalysis:
    """Sums over the analysed layers."""

    layers: int  # number of conv/linear layers
    params: int
    nnz: int
    sparsity: float  # 1 - nnz/params
    density: float  # nnz/params: the fraction of weights that remain
    dense_bytes: int
    csr_bytes: int
    bsr_bytes: int
    relative_bytes: int
    csr_saving: float  # dense_bytes / csr_bytes
    dense_flops: int
    nonzero_flops: int
    activation_sparsity: float  # zeros / elements over all the layers' inputs


@dataclass(frozen=True)
class AnalysisResult:
    """Everything ``sparsecnn analyze`` reports about one model."""

    model: str  # zoo name (or class name of a user module)
    profile: str | None  # the profile applied before analysis, if any
    input: str  # "random", "digits" or the path given
    batch: int  # images in the batch actually used
    input_shape: tuple[int, int, int]  # (C, H, W)
    layers: tuple[LayerAnalysis, ...]
    total: TotalAnalysis

    def to_dict(self) -> dict:
        """A JSON-ready dict; tuples become lists."""
        return asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        """The result as JSON text (schema: docs/analyze.md)."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=True)


def dense_equivalent(model: nn.Module) -> nn.Module:
    """A sparse model (``sparsify``, a sparse checkpoint) as its dense equivalent, zeros included, so
    its layers are analysed like any Conv2d/Linear; any other model as it is."""
    layers_module = sys.modules.get("sparsecnn.layers")  # no sparse layer exists before it is imported
    if layers_module is None or not any(
        isinstance(m, (layers_module.SparseConv2d, layers_module.SparseLinear)) for m in model.modules()
    ):
        return model
    from sparsecnn.io import _sparse

    memo = {id(m): _sparse.dense_module(m) for m in model.modules() if _sparse.is_sparse(m)}
    return copy.deepcopy(model, memo)


def analyze_model(
    model: nn.Module,
    *,
    input: str = "random",
    batch: int = 8,  # small enough that AlexNet analyses in seconds on 2 cores
    seed: int = 0,  # seed of the "random" input
    profile: str | Mapping[str, float] | None = None,  # pruned into a copy of the model first
    input_shape_: tuple[int, int, int] | None = None,  # default: model.input_shape
    name: str | None = None,  # default: the zoo name or the class name
) -> AnalysisResult:
    """Analyse the sparsity, storage and compute of every Conv2d and Linear layer of ``model``.

    Parameters
    ----------
    model : torch.nn.Module
        Left unchanged (a profile is applied to a deep copy); run once in eval mode on the batch.
    input : str
        ``"random"``, ``"digits"`` or a path; see :func:`sparsecnn.analysis.load_input`.
    batch : int
        Images per batch; also ``N`` of the linear layers' GEMMs.
    profile : str or Mapping, optional
        A profile for :func:`sparsecnn.models.apply_profile`.
    input_shape_ : tuple of int, optional
        (C, H, W) for a module without an ``input_shape`` attribute.

    Returns
    -------
    AnalysisResult
        Layers in module order; layers the forward pass never calls are left out.
    """
    shape = tuple(input_shape_) if input_shape_ is not None else input_shape(model)
    model = dense_equivalent(model)
    for lname, module in prunable_layers(model).items():
        for pname in ("weight", "bias"):
            p = getattr(module, pname, None)
            if isinstance(p, torch.Tensor) and p.is_floating_point() and not bool(torch.isfinite(p).all()):
                bad = int((~torch.isfinite(p)).sum())
                raise SparseCNNError(
                    f"layer {lname!r}: {pname} holds {bad} NaN/Inf value(s), so its sparsity and bytes "
                    f"would be meaningless; fix or reload the weights (training diverged or the file is "
                    f"corrupt)"
                )
    profile_name = None
    if profile is not None:
        model = copy.deepcopy(model)
        apply_profile(model, profile)
        profile_name = profile if isinstance(profile, str) else "custom"
    x = load_input(input, shape, batch, seed)
    layers = prunable_layers(model)
    if not layers:
        raise SparseCNNError(f"{type(model).__name__} has no Conv2d or Linear layers to analyse")
    stats = activation_stats(model, x, layers)

    records = []
    for lname, st in stats.items():
        module = layers[lname]
        linear = isinstance(module, nn.Linear)
        dims = gemm_dims(module, st.output_shape)
        ws = weight_sparsity(module.weight, dims.groups)
        params = module.weight.numel()
        nnz = int((module.weight != 0).sum())
        nb = weight_nbytes(module)
        dense_flops, nonzero_flops = layer_flops(dims, nnz, linear)
        records.append(LayerAnalysis(
            name=lname, kind="linear" if linear else "conv", weight_shape=tuple(module.weight.shape),
            groups=dims.groups, m=dims.m, k=dims.k, n=dims.n, params=params, nnz=nnz,
            sparsity=1.0 - nnz / params, filter_sparsity=ws.filter, channel_sparsity=ws.channel,
            kernel_shape_sparsity=ws.kernel_shape, dense_bytes=nb.dense, csr_bytes=nb.csr, bsr_bytes=nb.bsr,
            relative_bytes=nb.relative, csr_saving=_ratio(nb.dense, nb.csr), dense_flops=dense_flops,
            nonzero_flops=nonzero_flops, activation_sparsity=st.sparsity,
        ))

    params = sum(r.params for r in records)
    nnz = sum(r.nnz for r in records)
    dense_bytes = sum(r.dense_bytes for r in records)
    csr_bytes = sum(r.csr_bytes for r in records)
    zeros = sum(st.zeros for st in stats.values())
    elements = sum(st.elements for st in stats.values())
    total = TotalAnalysis(
        layers=len(records), params=params, nnz=nnz, sparsity=1.0 - nnz / params, density=nnz / params,
        dense_bytes=dense_bytes, csr_bytes=csr_bytes, bsr_bytes=sum(r.bsr_bytes for r in records),
        relative_bytes=sum(r.relative_bytes for r in records), csr_saving=_ratio(dense_bytes, csr_bytes),
        dense_flops=sum(r.dense_flops for r in records), nonzero_flops=sum(r.nonzero_flops for r in records),
        activation_sparsity=zeros / elements if elements else 0.0,
    )
    return AnalysisResult(
        model=name or getattr(model, "zoo_name", None) or type(model).__name__,
        profile=profile_name, input=input, batch=int(x.shape[0]), input_shape=shape,
        layers=tuple(records), total=total,
    )
