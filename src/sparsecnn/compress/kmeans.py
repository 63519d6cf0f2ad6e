"""Trained quantization with weight sharing, Deep Compression's second stage (Han et al., ICLR 2016, Sec. 3).

Each prunable layer (Conv2d, Linear) gets its own codebook: the nonzero weights are clustered by 1-D
k-means into ``2**bits - 1`` shared values, centroids initialised *linearly* between the smallest and
largest weight (the paper's best initialisation: it keeps the few large weights, which matter most,
represented). Code 0 is reserved for zero, so a pruned weight, and a relative-index filler, stays zero
and needs no centroid. Default widths follow the paper: 8 bits for convolutions, 5 for FC layers.

Over a pruned layer the linear grid puts some centroids into the pruned gap around zero, where no
weight is left. As in the paper, they stay empty by default (``empty="keep"``): their codes are never
used, so after Huffman coding they cost nothing, and the codes in use follow the weights' bell shape
(frequent near the pruning threshold, rare in the tails), which is what Huffman coding gains on.
``empty="split"`` moves each empty centroid to split the cluster of largest squared error (standard
k-means practice, not in the paper): every code carries weights, the quantization error is lower and
the Huffman-coded codes are longer. On the two tails of 2M Gaussian samples, 5-bit codes at 91%
pruned: 23 of 31 codes live and 3.91 bits of entropy (split: 4.25 bits, 1.7x lower squared error);
8-bit codes at 63% pruned: 197 of 255 live, 6.37 bits (split: 7.17 bits, 2.8x lower error). The
paper's AlexNet figures after Huffman (3.6-4.0 bits FC, 5.1-6.3 bits conv) match the unsplit codebook
on such weights, not the split one (docs/compression.md).

Fine-tuning (Sec. 3.3): the weight of every layer is computed as ``codebook[codes] * mask`` in the
forward pass, so autograd sums the gradient of every weight of a cluster into its centroid (the
paper's ``dL/dC_k = sum_ij dL/dW_ij 1(I_ij = k)``) and the pruned zeros stay zero; the centroids (and
biases, and any other parameter) are trained by :func:`sparsecnn.train.fit`, in one process or under
``torchrun`` with DDP.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from sparsecnn.errors import SparseCNNError

__all__ = [
    "LayerCodebook",
    "QuantizeConfig",
    "finetune_centroids",
    "kmeans_1d",
    "quantize_model",
    "quantized_layers",
    "share_weights",
    "unshare_weights",
]


def kmeans_1d(values: np.ndarray, k: int, iters: int = 50,
              split_empty: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means on scalars with linear initialisation (Han et al. 2016, Sec. 3.1).

    Parameters
    ----------
    values : ndarray, shape (n,), float
    k : int
        Number of clusters (>= 1).
    iters : int
        Most Lloyd iterations; stops early when no label changes.
    split_empty : bool
        False (the paper's algorithm): a centroid whose cluster is empty (linear initialisation puts
        some into the pruned gap around 0) keeps its place and its code is never used. True: each
        empty cluster is re-seeded by splitting the cluster of largest squared error, so all ``k``
        codes are used when there are at least ``k`` distinct values.

    Returns
    -------
    centroids : ndarray, shape (k,), float32, sorted
    labels : ndarray, shape (n,), int64
        The nearest centroid of each value.
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size == 0:
        return np.zeros(k, np.float32), np.zeros(0, np.int64)
    # 1-D: every cluster is a contiguous run of the sorted values, so one Lloyd step is k binary
    # searches and prefix-sum differences (O(k log n)), not a pass over all n values.
    vs = np.sort(v)
    cs = np.concatenate(([0.0], np.cumsum(vs)))
    cs2 = np.concatenate(([0.0], np.cumsum(vs * vs)))
    n_distinct = int(np.count_nonzero(np.diff(vs))) + 1
    c = np.linspace(vs[0], vs[-1], k) if k > 1 else np.array([vs.mean()])

    def runs(c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        edges = np.concatenate(([0], np.searchsorted(vs, (c[1:] + c[:-1]) / 2), [vs.size]))
        counts = np.diff(edges)
        sums = cs[edges[1:]] - cs[edges[:-1]]
        sse = cs2[edges[1:]] - cs2[edges[:-1]] - sums * sums / np.maximum(counts, 1)
        return edges, counts, sums, sse

    reseeds = 0
    prev = None
    for _ in range(max(1, iters) + k):
        edges, counts, sums, sse = runs(c)
        empty = np.flatnonzero(counts == 0)
        if split_empty and empty.size and reseeds < 4 * k and n_distinct > k - empty.size:
            # Linear initialisation over a pruned (two-tailed) layer leaves the centroids that fall in
            # the pruned gap empty. Each empty one is moved to split the cluster with the largest
            # squared error (standard k-means practice), so every code carries weights.
            sse = sse.copy()
            for e in empty:
                j = int(np.argmax(sse))
                lo, hi = int(edges[j]), int(edges[j + 1])
                mid = lo + int(np.searchsorted(vs[lo:hi], sums[j] / max(counts[j], 1), side="right"))
                if mid <= lo or mid >= hi:
                    sse[j] = 0.0
                    continue
                c[j] = (cs[mid] - cs[lo]) / (mid - lo)
                c[e] = (cs[hi] - cs[mid]) / (hi - mid)
                sse[j] = 0.0  # split once per round
            c.sort()
            reseeds += 1
            prev = None
            continue
        if prev is not None and np.array_equal(edges, prev):
            break
        prev = edges
        c = np.where(counts > 0, sums / np.maximum(counts, 1), c)
        c.sort()  # means of ordered runs stay ordered; sort guards float ties
    labels = np.searchsorted((c[1:] + c[:-1]) / 2, v) if k > 1 else np.zeros(v.size, np.int64)
    return c.astype(np.float32), labels


@dataclass(frozen=True)
class QuantizeConfig:
    """Bit widths of the shared weights (Deep Compression's defaults)."""

    conv_bits: int = 8  # the paper's width for convolutions (Sec. 3, Table 4)
    fc_bits: int = 5  # the paper's width for FC layers
    bits: Mapping[str, int] = field(default_factory=dict)  # per-layer overrides, layer name -> 1..8
    iters: int = 50  # Lloyd iterations at most (1-D k-means converges in a few dozen)
    empty: str = "keep"  # empty clusters: "keep" (the paper's; unused codes) or "split" (re-seeded)

    def __post_init__(self) -> None:
        if self.empty not in ("keep", "split"):
            raise SparseCNNError(f"empty must be 'keep' (the paper's: empty clusters leave their codes "
                                 f"unused) or 'split' (re-seed them), got {self.empty!r}")
        for what, b in (("conv_bits", self.conv_bits), ("fc_bits", self.fc_bits), *self.bits.items()):
            if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= 8:
                raise SparseCNNError(f"bits for {what} must be an integer 1..8 (codes are stored in one "
                                     f"byte), got {b!r}")
        if isinstance(self.iters, bool) or not isinstance(self.iters, int) or self.iters < 1:
            raise SparseCNNError(f"iters must be a positive integer, got {self.iters!r}")

    def bits_for(self, name: str, layer: nn.Module) -> int:
        if name in self.bits:
            return int(self.bits[name])
        return self.fc_bits if isinstance(layer, nn.Linear) else self.conv_bits


@dataclass(frozen=True, eq=False)
class LayerCodebook:
    """One layer's shared weights: ``weight = codebook[codes]`` (code 0 is the zero weight).

    Attributes
    ----------
    name : str
    bits : int
        1..8; the codebook has ``2**bits`` entries.
    codebook : ndarray, shape (2**bits,), float32; ``codebook[0] == 0``
    codes : ndarray, shape of the weight, uint8
    """

    name: str
    bits: int
    codebook: np.ndarray
    codes: np.ndarray

    def weight(self) -> np.ndarray:
        """The quantized weight, float32, shape of ``codes``."""
        return self.codebook[self.codes]

    @property
    def nnz(self) -> int:
        return int(np.count_nonzero(self.codes))


def quantized_layers(model: nn.Module) -> dict[str, nn.Conv2d | nn.Linear]:
    """The layers weight sharing applies to: every Conv2d and Linear, by name."""
    from sparsecnn.models.profiles import prunable_layers

    return prunable_layers(model)


def _check_layer_names(config: QuantizeConfig, layers: Mapping[str, nn.Module]) -> None:
    unknown = sorted(set(config.bits) - set(layers))
    if unknown:
        raise SparseCNNError(f"bits given for unknown layer(s) {', '.join(unknown)}; the model's layers are "
                             f"{', '.join(layers)}")


def quantize_model(model: nn.Module, config: QuantizeConfig = QuantizeConfig()) -> dict[str, LayerCodebook]:
    """Cluster every Conv2d/Linear weight of ``model`` into its codebook and write the shared values
    back (in place; zeros stay zero).

    Returns
    -------
    dict of str to LayerCodebook
        By layer name, in model order.
    """
    if not isinstance(model, nn.Module):
        raise SparseCNNError(f"quantize_model needs a torch.nn.Module, got {type(model).__name__}")
    layers = quantized_layers(model)
    if not layers:
        raise SparseCNNError("the model has no Conv2d or Linear layer to quantize")
    _check_layer_names(config, layers)
    books: dict[str, LayerCodebook] = {}
    for name, layer in layers.items():
        if getattr(layer, "_sparsecnn_shared", None) is not None:
            raise SparseCNNError(f"layer {name!r} already shares its weights; call unshare_weights first")
        w = layer.weight.detach().cpu().float().numpy()
        if not np.isfinite(w).all():
            raise SparseCNNError(f"layer {name!r} has NaN/Inf weights; they cannot be quantized")
        bits = config.bits_for(name, layer)
        nz = w != 0
        centroids, labels = kmeans_1d(w[nz], (1 << bits) - 1, config.iters, config.empty == "split")
        codebook = np.concatenate(([np.float32(0)], centroids)).astype(np.float32)
        codes = np.zeros(w.shape, dtype=np.uint8)
        codes[nz] = (labels + 1).astype(np.uint8)
        books[name] = LayerCodebook(name, bits, codebook, codes)
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(codebook[codes]).to(layer.weight))
    return books


class _Shared:
    """Forward pre-hook computing ``weight = codebook[codes] * mask`` (see the module docstring)."""

    def __call__(self, module: nn.Module, args: Any) -> None:
        module.weight = module.weight_codebook[module.weight_codes] * module.weight_mask


def share_weights(model: nn.Module, books: Mapping[str, LayerCodebook]) -> None:
    """Replace each quantized layer's ``weight`` parameter by a trainable ``weight_codebook``
    (shape (2**bits,)) and buffers ``weight_codes`` (int64) and ``weight_mask``; the weight is
    recomputed from them before every forward. Undo with :func:`unshare_weights`."""
    layers = quantized_layers(model)
    for name, book in books.items():
        layer = layers.get(name)
        if layer is None:
            raise SparseCNNError(f"the model has no layer {name!r} for a codebook")
        if tuple(layer.weight.shape) != book.codes.shape:
            raise SparseCNNError(f"layer {name!r}: codes of shape {book.codes.shape} do not fit its weight "
                                 f"{tuple(layer.weight.shape)}")
        dev, dtype = layer.weight.device, layer.weight.dtype
        del layer.weight
        layer.register_parameter("weight_codebook",
                                 nn.Parameter(torch.from_numpy(book.codebook.copy()).to(dev, dtype)))
        codes = torch.from_numpy(book.codes.astype(np.int64)).to(dev)
        layer.register_buffer("weight_codes", codes)
        layer.register_buffer("weight_mask", (codes != 0).to(dtype))
        layer.weight = layer.weight_codebook[codes] * layer.weight_mask
        layer._sparsecnn_shared = layer.register_forward_pre_hook(_Shared())


def unshare_weights(model: nn.Module) -> dict[str, LayerCodebook]:
    """Turn shared layers back into plain ``weight`` parameters holding the (fine-tuned) shared values.

    Returns
    -------
    dict of str to LayerCodebook
        The fine-tuned codebooks (``codebook[0]`` kept at 0).
    """
    books: dict[str, LayerCodebook] = {}
    for name, layer in quantized_layers(model).items():
        handle = getattr(layer, "_sparsecnn_shared", None)
        if handle is None:
            continue
        handle.remove()
        del layer._sparsecnn_shared
        cb = layer.weight_codebook.detach().cpu().float().numpy().copy()
        cb[0] = 0.0
        codes = layer.weight_codes.cpu().numpy().astype(np.uint8)
        bits = max(1, int(cb.size).bit_length() - 1)
        dev, dtype = layer.weight_codebook.device, layer.weight_codebook.dtype
        del layer.weight_codebook, layer.weight_codes, layer.weight_mask
        if "weight" in layer.__dict__:
            del layer.__dict__["weight"]
        layer.weight = nn.Parameter(torch.from_numpy(cb[codes]).to(dev, dtype))
        books[name] = LayerCodebook(name, bits, cb, codes)
    return books


def finetune_centroids(model: nn.Module, books: Mapping[str, LayerCodebook], train_set: Any, test_set: Any,
                       config: Any = None, **fit_kw: Any) -> tuple[dict[str, LayerCodebook], Any]:
    """Fine-tune the shared centroids of a quantized model on real data (Han et al. 2016, Sec. 3.3).

    Parameters
    ----------
    model : torch.nn.Module
        Quantized by :func:`quantize_model` (its codebooks ``books``); trained in place.
    books : dict of str to LayerCodebook
    train_set, test_set : Dataset
    config : sparsecnn.train.TrainConfig, optional
        Default: 5 epochs of SGD at lr 0.01 (fine-tuning, not training).
    **fit_kw
        Passed to :func:`sparsecnn.train.fit` (``checkpoint``, ``resume``, ...). Works under torchrun.

    Returns
    -------
    books : dict of str to LayerCodebook
        The fine-tuned codebooks (same codes); the model holds exactly ``codebook[codes]``.
    result : sparsecnn.train.TrainResult
    """
    from sparsecnn.train import TrainConfig, fit

    if config is None:
        config = TrainConfig(epochs=5, lr=0.01)
    share_weights(model, books)
    try:
        result = fit(model, train_set, test_set, config, **fit_kw)
    finally:
        tuned = unshare_weights(model)
    return tuned, result
