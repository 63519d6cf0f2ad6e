"""The bytes of each Deep Compression stage, exactly, per layer and in total.

Stages (Han et al., ICLR 2016, Tables 1-5):

- dense: float32 weights, 4 bytes each;
- pruned, CSR: float32 values + the narrowest column index (uint16 for <= 65536 columns) + int32 row
  pointers (what :mod:`sparsecnn.kernels.spmv` runs);
- pruned, relative index: float32 values + ``index_bits``-bit gaps, fillers included (the paper's
  format, over the layer's weights flattened in row-major order, as the paper does);
- + quantized: ``bits``-bit codebook indices instead of float32 values, + the codebook;
- + Huffman: the codes and the gaps Huffman-coded, + both code-length tables + the codebook.

The relative gaps here run over the whole flattened layer (no row pointers): entry ``e`` sits at
position ``pos[e] = pos[e-1] + gap[e] + 1``; a longer run of zeros is bridged by filler entries (code
0, gap ``2**index_bits - 1``). This is the encoding the compressed file stores.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from sparsecnn.compress.huffman import huffman_code
from sparsecnn.errors import SparseCNNError

__all__ = ["PAPER", "LayerStorage", "StorageReport", "compression_report", "decode_gaps", "encode_gaps",
           "layer_storage", "storage_report"]

# Published per-layer figures (Han, Mao & Dally, "Deep Compression", ICLR 2016): fraction of weights kept
# after pruning, weight bits and index bits after quantization (P+Q) and after Huffman (P+Q+H), and
# the compressed size as a fraction of the dense float32 layer (P+Q, P+Q+H). Table 4 (AlexNet) and
# Table 3 (LeNet-5).
_PAPER_FIELDS = ("kept", "wbits", "wbits_h", "ibits", "ibits_h", "rate", "rate_h")
_PAPER_ROWS: dict[str, dict[str, tuple[float, ...]]] = {
    "alexnet": {  # Table 4
        "conv1": (0.84, 8, 6.3, 4, 1.2, 0.326, 0.2053),
        "conv2": (0.38, 8, 5.5, 4, 2.3, 0.145, 0.0943),
        "conv3": (0.35, 8, 5.1, 4, 2.6, 0.131, 0.0844),
        "conv4": (0.37, 8, 5.2, 4, 2.5, 0.141, 0.0911),
        "conv5": (0.37, 8, 5.6, 4, 2.5, 0.147, 0.0943),
        "fc6": (0.09, 5, 3.9, 4, 3.2, 0.030, 0.0239),
        "fc7": (0.09, 5, 3.6, 4, 3.7, 0.030, 0.0246),
        "fc8": (0.25, 5, 4.0, 4, 3.2, 0.073, 0.0585),
        "total": (0.11, 5.4, 4.0, 4, 3.2, 0.037, 0.0288),  # 27x (P+Q), 35x (P+Q+H)
    },
    "lenet5": {  # Table 3
        "conv1": (0.66, 8, 7.2, 5, 1.5, 0.785, 0.6745),
        "conv2": (0.12, 8, 7.2, 5, 3.7, 0.060, 0.0528),
        "fc1": (0.08, 5, 4.5, 5, 4.5, 0.027, 0.0245),
        "fc2": (0.19, 5, 5.2, 5, 3.7, 0.069, 0.0613),
        "total": (0.08, 5.3, 4.1, 5, 3.1, 0.0305, 0.0255),  # 33x (P+Q), 39x (P+Q+H)
    },
}
PAPER: dict[str, dict[str, dict[str, float]]] = {
    net: {layer: dict(zip(_PAPER_FIELDS, row, strict=True)) for layer, row in rows.items()}
    for net, rows in _PAPER_ROWS.items()
}


def encode_gaps(codes: np.ndarray, index_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Relative-index entries of a layer's codes (flattened row-major), fillers included.

    Parameters
    ----------
    codes : ndarray, any shape, uint8; 0 = zero weight
    index_bits : int
        1..8 bits per gap.

    Returns
    -------
    gaps : ndarray, shape (n_entries,), uint8, each in ``[0, 2**index_bits - 1]``
    entry_codes : ndarray, shape (n_entries,), uint8; 0 for a filler
    """
    if isinstance(index_bits, bool) or not isinstance(index_bits, (int, np.integer)) \
            or not 1 <= index_bits <= 8:
        raise SparseCNNError(f"index_bits must be an integer 1..8, got {index_bits!r}")
    flat = np.asarray(codes).reshape(-1)
    pos = np.flatnonzero(flat)
    period = 1 << int(index_bits)
    skip = np.diff(pos, prepend=-1) - 1
    nf = skip // period
    idx = np.cumsum(nf + 1) - 1  # where each nonzero lands among the entries
    n_entries = int(idx[-1]) + 1 if idx.size else 0
    gaps = np.full(n_entries, period - 1, dtype=np.uint8)
    gaps[idx] = (skip - nf * period).astype(np.uint8)
    entry_codes = np.zeros(n_entries, dtype=np.uint8)
    entry_codes[idx] = flat[pos]
    return gaps, entry_codes


def decode_gaps(gaps: np.ndarray, entry_codes: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`encode_gaps`: the flat positions and codes of the nonzero entries.

    Raises
    ------
    SparseCNNError
        If an entry lands outside ``size`` weights.
    """
    pos = np.cumsum(gaps.astype(np.int64) + 1) - 1
    keep = entry_codes != 0
    if pos.size and pos[-1] >= size:
        raise SparseCNNError(f"the relative indices run past the layer's {size} weights")
    return pos[keep], entry_codes[keep]


@dataclass(frozen=True)
class LayerStorage:
    """Bytes of one layer at each stage (see the module docstring); sizes in bytes, bits per entry."""

    name: str
    shape: tuple[int, ...]
    n_weights: int
    nnz: int
    n_entries: int  # relative-index entries, fillers included
    bits: int  # weight code width (P+Q)
    index_bits: int  # gap width (P+Q)
    dense_bytes: int
    csr_bytes: int
    relative_bytes: float  # float32 values + packed gaps
    quantized_bytes: float  # codes + gaps at their fixed widths + codebook
    huffman_bytes: float  # Huffman codes + gaps + tables + codebook
    weight_bits_huffman: float  # mean Huffman bits per weight code
    index_bits_huffman: float  # mean Huffman bits per gap

    @property
    def ratio(self) -> float:
        """dense / (P+Q+H)."""
        return self.dense_bytes / self.huffman_bytes if self.huffman_bytes else float("inf")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["ratio"] = self.ratio
        return d


def _csr_bytes(shape: tuple[int, ...], nnz: int) -> int:
    m = int(shape[0])
    k = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    index = 2 if k <= 65536 else 4
    return nnz * (4 + index) + (m + 1) * 4


def layer_storage(name: str, codes: np.ndarray, bits: int, index_bits: int) -> LayerStorage:
    """Storage of one quantized layer (``codes``: uint8, 0 = zero weight) at each stage."""
    gaps, entry_codes = encode_gaps(codes, index_bits)
    n_e = int(gaps.size)
    nnz = int(np.count_nonzero(codes))
    codebook = (1 << bits) * 4
    wcode = huffman_code(entry_codes, 1 << bits)
    gcode = huffman_code(gaps, 1 << index_bits)
    wbits = wcode.bits(np.bincount(entry_codes, minlength=1 << bits))
    gbits = gcode.bits(np.bincount(gaps, minlength=1 << index_bits))
    tables = (1 << bits) + (1 << index_bits)  # one byte per code length
    return LayerStorage(
        name=name, shape=tuple(int(d) for d in codes.shape), n_weights=int(codes.size), nnz=nnz,
        n_entries=n_e, bits=int(bits), index_bits=int(index_bits),
        dense_bytes=int(codes.size) * 4,
        csr_bytes=_csr_bytes(codes.shape, nnz),
        relative_bytes=n_e * 4 + n_e * index_bits / 8,
        quantized_bytes=n_e * (bits + index_bits) / 8 + codebook,
        huffman_bytes=(wbits + gbits) / 8 + tables + codebook,
        weight_bits_huffman=wbits / n_e if n_e else 0.0,
        index_bits_huffman=gbits / n_e if n_e else 0.0,
    )


@dataclass(frozen=True)
class StorageReport:
    """Per-layer storage and the totals; ``paper`` names the published table compared against (or None)."""

    layers: tuple[LayerStorage, ...]
    paper: str | None = None

    def total(self, field: str) -> float:
        return float(sum(getattr(s, field) for s in self.layers))

    @property
    def ratio(self) -> float:
        """Whole-model dense / (P+Q+H) over the quantized layers."""
        h = self.total("huffman_bytes")
        return self.total("dense_bytes") / h if h else float("inf")

    def rows(self) -> list[dict[str, Any]]:
        """One table row per layer plus ``total``: MB at each stage, ratios, and the paper's rate."""
        paper = PAPER.get(self.paper or "", {})
        out = []
        entries = [*self.layers, None]
        for s in entries:
            if s is None:
                name = "total"
                vals = {f: self.total(f) for f in ("dense_bytes", "csr_bytes", "relative_bytes",
                                                   "quantized_bytes", "huffman_bytes", "n_weights", "nnz",
                                                   "n_entries")}
                n_e = max(vals["n_entries"], 1)
                wb = sum(s2.weight_bits_huffman * s2.n_entries for s2 in self.layers) / n_e
                ib = sum(s2.index_bits_huffman * s2.n_entries for s2 in self.layers) / n_e
            else:
                name = s.name
                vals = {f: float(getattr(s, f)) for f in ("dense_bytes", "csr_bytes", "relative_bytes",
                                                          "quantized_bytes", "huffman_bytes", "n_weights",
                                                          "nnz", "n_entries")}
                wb, ib = s.weight_bits_huffman, s.index_bits_huffman
            p = paper.get(name)
            dense = vals["dense_bytes"]
            out.append({
                "layer": name,
                "kept": vals["nnz"] / max(vals["n_weights"], 1),
                "dense_bytes": dense,
                "csr_bytes": vals["csr_bytes"],
                "relative_bytes": vals["relative_bytes"],
                "quantized_bytes": vals["quantized_bytes"],
                "huffman_bytes": vals["huffman_bytes"],
                "weight_bits_huffman": wb,
                "index_bits_huffman": ib,
                "rate_pq": vals["quantized_bytes"] / dense if dense else 0.0,
                "rate_pqh": vals["huffman_bytes"] / dense if dense else 0.0,
                "ratio": dense / vals["huffman_bytes"] if vals["huffman_bytes"] else float("inf"),
                "paper_rate_pq": None if p is None else p["rate"],
                "paper_rate_pqh": None if p is None else p["rate_h"],
                "paper_ratio": None if p is None else 1.0 / p["rate_h"],
            })
        return out

    def to_json(self) -> dict[str, Any]:
        return {"paper": self.paper, "layers": [s.to_json() for s in self.layers], "rows": self.rows(),
                "ratio": self.ratio}


def storage_report(books: Any, index_bits: int | dict[str, int] = 4,
                   paper: str | None = None) -> StorageReport:
    """Storage of every codebook in ``books`` (name -> :class:`~sparsecnn.compress.kmeans.LayerCodebook`).

    ``index_bits``: one width for all layers or a per-layer dict (default 4, as in the paper's AlexNet).
    ``paper``: ``"alexnet"`` or ``"lenet5"`` to put the published rates beside the measured ones.
    """
    if paper is not None and paper not in PAPER:
        raise SparseCNNError(f"no published table for {paper!r}; choose one of {', '.join(PAPER)}")
    layers = []
    for name, book in books.items():
        ib = index_bits.get(name, 4) if isinstance(index_bits, dict) else index_bits
        layers.append(layer_storage(name, book.codes, book.bits, ib))
    return StorageReport(tuple(layers), paper)


def compression_report(model: Any, index_bits: int | dict[str, int] = 4, paper: str | None = None,
                       config: Any = None) -> tuple[StorageReport, dict[str, Any]]:
    """Quantize ``model`` **in place** and account its storage: what ``sparsecnn analyze --compression``
    prints and the report's compression section shows (pass a copy to keep the float weights).

    Parameters
    ----------
    model : torch.nn.Module
        Pruned (or not); every Conv2d and Linear gets a codebook.
    index_bits : int or dict of str to int
        Gap width, as in :func:`storage_report`.
    paper : str, optional
        ``"alexnet"`` or ``"lenet5"``: the published table to put beside the measured rates.
    config : sparsecnn.compress.QuantizeConfig, optional
        Bit widths (default: 8 bits conv, 5 bits FC, the paper's).

    Returns
    -------
    report : StorageReport
    books : dict of str to LayerCodebook
        The codebooks; ``model`` now holds exactly ``codebook[codes]``.
    """
    from sparsecnn.compress.kmeans import QuantizeConfig, quantize_model

    books = quantize_model(model, config if config is not None else QuantizeConfig())
    return storage_report(books, index_bits, paper), books
