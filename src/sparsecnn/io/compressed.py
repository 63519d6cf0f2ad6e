"""The compressed model file (``*.sparsecnn``): Deep Compression's pruned, quantized, Huffman-coded model.

Layout (little-endian)::

    magic      b"SPARSECNN-DC\\n"                      13 bytes
    n_header   uint64                                  8 bytes
    header     JSON, utf-8                             n_header bytes
    payload    the arrays the header points into       (offsets relative to the payload start)
    sha256     of everything above                     32 bytes

Each quantized layer (every Conv2d / Linear) stores its codebook (``2**bits`` float32, entry 0 = 0),
the Huffman code lengths of its weight codes (``2**bits`` bytes) and of its relative-index gaps
(``2**index_bits`` bytes), and the two Huffman bit streams (entries over the layer flattened in
row-major order, fillers included; :mod:`sparsecnn.compress.storage`). Everything else of the state
dict (biases, BatchNorm, ...) is stored raw. The header records the architecture as checkpoints do
(a zoo name and its build arguments, or an imported graph's description), so :func:`load_compressed`
rebuilds the model with exactly the quantized weights. The file's size is the Huffman-stage arithmetic
of :func:`sparsecnn.compress.storage.layer_storage` plus the raw rest, the header and 53 bytes.

A truncated file, a flipped byte, or a foreign file fails the checksum (or the magic) and raises one
:class:`~sparsecnn.errors.SparseCNNError`.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from sparsecnn.errors import SparseCNNError

__all__ = ["COMPRESSED_FORMAT", "COMPRESSED_VERSION", "SUFFIX", "load_compressed", "save_compressed"]

COMPRESSED_FORMAT = "sparsecnn-compressed"
COMPRESSED_VERSION = 1  # bump when the layout changes; load refuses newer files
SUFFIX = ".sparsecnn"
MAGIC = b"SPARSECNN-DC\n"
_DIGEST = 32


class _Payload:
    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0

    def add(self, arr: np.ndarray) -> list[int]:
        b = np.ascontiguousarray(arr).tobytes()
        where = [self.size, len(b)]
        self.parts.append(b)
        self.size += len(b)
        return where


def save_compressed(model: nn.Module, books: Mapping[str, Any], path: str | os.PathLike[str], *,
                    index_bits: int | Mapping[str, int] = 4) -> str:
    """Write a quantized model as a compressed file.

    Parameters
    ----------
    model : torch.nn.Module
        Holds the quantized weights (``books[name].weight()`` for each layer in ``books``); its other
        state (biases, ...) is stored raw. A zoo model or an imported graph, so that the file can
        rebuild it.
    books : dict of str to LayerCodebook
        From :func:`sparsecnn.compress.quantize_model` (or :func:`~sparsecnn.compress.finetune_centroids`).
    path : path
        Replaced atomically.
    index_bits : int or dict of str to int
        Gap width 1..8 per layer (default 4, the paper's AlexNet width).

    Returns
    -------
    str
        ``path``.
    """
    from sparsecnn.compress.huffman import huffman_code, huffman_encode
    from sparsecnn.compress.storage import encode_gaps
    from sparsecnn.io.checkpoint import _architecture

    if not isinstance(model, nn.Module):
        raise SparseCNNError(f"save_compressed needs a torch.nn.Module, got {type(model).__name__}")
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise SparseCNNError(f"cannot write {path}: directory {directory} does not exist")
    arch = _architecture(model)
    if arch.get("kind") == "none":
        raise SparseCNNError(f"a {type(model).__name__} records no architecture; compress a zoo model or an "
                             f"imported Caffe/ONNX model")
    state = model.state_dict()
    payload = _Payload()
    layers = []
    for name, book in books.items():
        key = f"{name}.weight"
        if key not in state:
            raise SparseCNNError(f"the model has no weight {key!r} for codebook {name!r}")
        if tuple(state[key].shape) != book.codes.shape:
            raise SparseCNNError(f"codebook {name!r}: codes {book.codes.shape} do not fit the weight "
                                 f"{tuple(state[key].shape)}")
        ib = int(index_bits.get(name, 4) if isinstance(index_bits, Mapping) else index_bits)
        gaps, entry_codes = encode_gaps(book.codes, ib)
        wcode = huffman_code(entry_codes, 1 << book.bits)
        gcode = huffman_code(gaps, 1 << ib)
        wstream, wbits = huffman_encode(entry_codes, wcode)
        gstream, gbits = huffman_encode(gaps, gcode)
        layers.append({
            "name": name, "shape": list(book.codes.shape), "bits": int(book.bits), "index_bits": ib,
            "n_entries": int(gaps.size),
            "codebook": payload.add(book.codebook.astype("<f4")),
            "weight_lengths": payload.add(wcode.lengths), "gap_lengths": payload.add(gcode.lengths),
            "weight_stream": payload.add(wstream), "weight_nbits": int(wbits),
            "gap_stream": payload.add(gstream), "gap_nbits": int(gbits),
        })
    quantized = {f"{n}.weight" for n in books}
    dense = []
    for key, t in state.items():
        if key in quantized:
            continue
        a = t.detach().cpu().contiguous().numpy()
        dense.append({"key": key, "dtype": a.dtype.str, "shape": list(a.shape), "at": payload.add(a)})
    shape = getattr(model, "input_shape", None)
    header = {"format": COMPRESSED_FORMAT, "version": COMPRESSED_VERSION, "architecture": arch,
              "input_shape": list(shape) if isinstance(shape, tuple) else None,
              "layers": layers, "dense": dense, "payload_bytes": payload.size}
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    h = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(prefix=".cmp-", suffix=SUFFIX, dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in (MAGIC, struct.pack("<Q", len(text)), text, *payload.parts):
                h.update(chunk)
                f.write(chunk)
            f.write(h.digest())
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp's 0600 would make the model unreadable to others
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _read(path: str) -> tuple[dict[str, Any], memoryview]:
    if not os.path.isfile(path):
        raise SparseCNNError(f"compressed model {path} does not exist")
    with open(path, "rb") as f:
        data = f.read()
    bad = f"compressed model {path} is truncated, altered or not a sparsecnn compressed file"
    if len(data) < len(MAGIC) + 8 + _DIGEST or not data.startswith(MAGIC):
        raise SparseCNNError(f"{bad} (no {MAGIC[:-1].decode()} magic)")
    body, digest = data[:-_DIGEST], data[-_DIGEST:]
    if hashlib.sha256(body).digest() != digest:
        raise SparseCNNError(f"{bad} (sha256 checksum mismatch); write it again with sparsecnn compress")
    (n,) = struct.unpack_from("<Q", body, len(MAGIC))
    start = len(MAGIC) + 8
    try:
        header = json.loads(body[start : start + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise SparseCNNError(f"{bad} (its header is not JSON)") from None
    if not isinstance(header, dict) or header.get("format") != COMPRESSED_FORMAT:
        raise SparseCNNError(f"{bad} (format {header.get('format') if isinstance(header, dict) else None!r})")
    version = header.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise SparseCNNError(f"{bad} (format version {version!r})")
    if version > COMPRESSED_VERSION:
        raise SparseCNNError(f"compressed model {path} has format version {version}, newer than this "
                             f"sparsecnn reads ({COMPRESSED_VERSION}); upgrade sparsecnn to load it")
    payload = memoryview(body)[start + n :]
    if len(payload) != header.get("payload_bytes"):
        raise SparseCNNError(f"{bad} (payload of {len(payload)} bytes, header says "
                             f"{header.get('payload_bytes')})")
    return header, payload


def _array(payload: memoryview, where: Any, dtype: Any) -> np.ndarray:
    off, n = int(where[0]), int(where[1])
    if off < 0 or n < 0 or off + n > len(payload):
        raise SparseCNNError("an array points outside the file's payload")
    return np.frombuffer(payload[off : off + n], dtype=dtype)


def read_codebooks(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The header and the decoded codebooks (name -> LayerCodebook) of a compressed file."""
    from sparsecnn.compress.huffman import HuffmanCode, huffman_decode
    from sparsecnn.compress.kmeans import LayerCodebook
    from sparsecnn.compress.storage import decode_gaps

    path = os.fspath(path)
    header, payload = _read(path)
    books: dict[str, Any] = {}
    try:
        for e in header["layers"]:
            name, bits, ib = str(e["name"]), int(e["bits"]), int(e["index_bits"])
            shape = tuple(int(d) for d in e["shape"])
            what = f"compressed model {path}, layer {name!r}"
            n = int(e["n_entries"])
            codebook = _array(payload, e["codebook"], "<f4").astype(np.float32)
            wcode = HuffmanCode(_array(payload, e["weight_lengths"], np.uint8).copy())
            gcode = HuffmanCode(_array(payload, e["gap_lengths"], np.uint8).copy())
            if codebook.size != 1 << bits or wcode.n_symbols != 1 << bits or gcode.n_symbols != 1 << ib:
                raise SparseCNNError(f"{what}: tables do not match bits={bits}, index_bits={ib}")
            codes_e = huffman_decode(_array(payload, e["weight_stream"], np.uint8), int(e["weight_nbits"]), n,
                                     wcode, np.uint8, what + " weights")
            gaps = huffman_decode(_array(payload, e["gap_stream"], np.uint8), int(e["gap_nbits"]), n, gcode,
                                  np.uint8, what + " gaps")
            size = int(np.prod(shape))
            pos, codes_nz = decode_gaps(gaps, codes_e, size)
            codes = np.zeros(size, dtype=np.uint8)
            codes[pos] = codes_nz
            books[name] = LayerCodebook(name, bits, codebook, codes.reshape(shape))
    except SparseCNNError:
        raise
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise SparseCNNError(f"compressed model {path} is corrupt ({type(exc).__name__}: {exc})") from None
    return header, books


def load_compressed(path: str | os.PathLike[str], *, strategy: str = "qspmv") -> nn.Module:
    """Load a compressed model file into a runnable model with exactly the quantized weights.

    Parameters
    ----------
    path : path
        A ``*.sparsecnn`` file from :func:`save_compressed` (``sparsecnn compress``).
    strategy : str
        ``"qspmv"`` (default): every Linear runs from its codebook indices
        (:class:`~sparsecnn.layers.SparseLinear` with the ``qspmv`` strategy); convolutions are plain
        ``nn.Conv2d`` with the quantized weights (sparsify them as any model). ``"dense"``: every layer
        a plain torch layer with the quantized weights.

    Returns
    -------
    torch.nn.Module
        In eval mode, with ``input_shape`` and ``sparsecnn_codebooks`` (name -> LayerCodebook).

    Raises
    ------
    SparseCNNError
        For a missing, truncated, altered or foreign file, or a newer format version.
    """
    from sparsecnn.io.checkpoint import _skeleton
    from sparsecnn.layers import SparseLinear, _set_submodule

    if strategy not in ("qspmv", "dense"):
        raise SparseCNNError(f"load_compressed: strategy must be 'qspmv' or 'dense', got {strategy!r}")
    path = os.fspath(path)
    header, books = read_codebooks(path)
    _, payload = _read(path)
    model = _skeleton(header.get("architecture"), path)
    state: dict[str, torch.Tensor] = {}
    try:
        for d in header["dense"]:
            a = _array(payload, d["at"], np.dtype(str(d["dtype"]))).reshape([int(s) for s in d["shape"]])
            state[str(d["key"])] = torch.from_numpy(a.copy())
        for name, book in books.items():
            state[f"{name}.weight"] = torch.from_numpy(book.weight())
        missing, unexpected = model.load_state_dict(state, strict=False)
    except SparseCNNError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise SparseCNNError(f"compressed model {path} does not fit its architecture ({exc})") from None
    if missing or unexpected:
        raise SparseCNNError(f"compressed model {path} does not fit its architecture: missing "
                             f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    model.eval()
    if strategy == "qspmv":
        from sparsecnn.kernels.qspmv import quant_prep_from_codes

        for name, book in books.items():
            layer = model.get_submodule(name)
            if not isinstance(layer, nn.Linear):
                continue
            m, k = book.codes.shape
            rows, cols = np.nonzero(book.codes)
            indptr = np.zeros(m + 1, dtype=np.int64)
            np.cumsum(np.bincount(rows, minlength=m), out=indptr[1:])
            prep = quant_prep_from_codes((m, k), indptr, cols, book.codes[rows, cols], book.codebook)
            bias = None if layer.bias is None else layer.bias.detach().numpy().copy()
            _set_submodule(model, name, SparseLinear.from_format(prep, "qspmv", in_features=k, out_features=m,
                                                                 bias=bias, name=name))
    shape = header.get("input_shape")
    if isinstance(shape, list) and shape:
        model.input_shape = tuple(int(s) for s in shape)
    model.sparsecnn_codebooks = books
    return model
