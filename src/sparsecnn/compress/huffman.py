"""Canonical Huffman coding of quantized weight codes and sparse index gaps (Deep Compression, Sec. 4).

Han et al. (ICLR 2016) Huffman-code the codebook indices and the relative-index gaps of each layer:
both are far from uniform (the weights are bell-shaped around zero, the gaps geometric), and the
paper saves 20-30% of the storage this way. A code is *canonical* (codes of one length are consecutive
integers, in symbol order), so a table needs only the code length of each symbol: ``n_symbols`` bytes.

Code lengths are limited to :data:`MAX_CODE_LENGTH` bits (frequencies are halved, rounding up, until
the tree fits), which costs nothing in practice and keeps a code inside one 64-bit word.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

from sparsecnn.errors import SparseCNNError

__all__ = ["MAX_CODE_LENGTH", "HuffmanCode", "huffman_code", "huffman_decode", "huffman_encode"]

MAX_CODE_LENGTH = 32  # bits; far above what 256 symbols of any real layer need (~20)


def _lengths(freq: np.ndarray) -> np.ndarray:
    """Huffman code lengths for frequencies ``freq`` (0 for an absent symbol), by the usual
    two-smallest merge; a lone symbol gets length 1."""
    n = freq.size
    lengths = np.zeros(n, dtype=np.int64)
    present = np.flatnonzero(freq)
    if present.size == 0:
        return lengths
    if present.size == 1:
        lengths[present[0]] = 1
        return lengths
    # Each heap item: (weight, tie-breaker, symbols in the subtree); merging deepens every member.
    heap = [(int(freq[s]), int(s), [int(s)]) for s in present]
    heapq.heapify(heap)
    tie = n
    while len(heap) > 1:
        w1, _, a = heapq.heappop(heap)
        w2, _, b = heapq.heappop(heap)
        members = a + b
        lengths[members] += 1
        heapq.heappush(heap, (w1 + w2, tie, members))
        tie += 1
    return lengths


@dataclass(frozen=True, eq=False)
class HuffmanCode:
    """A canonical Huffman code over symbols ``0 .. n_symbols - 1``.

    Attributes
    ----------
    lengths : ndarray, shape (n_symbols,), uint8
        Code length of each symbol in bits; 0 for a symbol without a code. The whole table (what a
        file stores).
    """

    lengths: np.ndarray

    @property
    def n_symbols(self) -> int:
        return int(self.lengths.size)

    def codes(self) -> np.ndarray:
        """The canonical code of each symbol, shape (n_symbols,), uint64 (0 where no code)."""
        first_code, first_index, _, order = self.tables()
        codes = np.zeros(self.n_symbols, dtype=np.uint64)
        ln = self.lengths.astype(np.int64)
        for rank, s in enumerate(order):
            L = ln[s]
            codes[s] = first_code[L] + (rank - first_index[L])
        return codes

    def tables(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Canonical decoding tables ``(first_code, first_index, count, sorted_symbols)``; the first
        three have shape (max_len + 1,), int64."""
        ln = self.lengths.astype(np.int64)
        max_len = int(ln.max()) if ln.size else 0
        count = np.bincount(ln[ln > 0], minlength=max_len + 1).astype(np.int64)
        count[0] = 0
        first_code = np.zeros(max_len + 1, dtype=np.int64)
        first_index = np.zeros(max_len + 1, dtype=np.int64)
        code = idx = 0
        for L in range(1, max_len + 1):
            code = (code + count[L - 1]) << 1  # deflate's canonical order (RFC 1951, 3.2.2)
            first_code[L] = code
            first_index[L] = idx
            idx += count[L]
        present = np.flatnonzero(ln)
        order = present[np.lexsort((present, ln[present]))]
        return first_code, first_index, count, order.astype(np.int64)

    def bits(self, freq: np.ndarray) -> int:
        """Exact bits of a message with symbol counts ``freq`` (shape (n_symbols,))."""
        return int(np.dot(np.asarray(freq, np.int64), self.lengths.astype(np.int64)))

    def check(self, what: str) -> None:
        """Raise a SparseCNNError unless the lengths form a valid prefix code (Kraft sum <= 1)."""
        ln = self.lengths.astype(np.int64)
        if ln.size and (ln.min() < 0 or ln.max() > MAX_CODE_LENGTH):
            raise SparseCNNError(f"{what}: Huffman code lengths must be 0..{MAX_CODE_LENGTH}")
        kraft = sum(2.0 ** -int(L) for L in ln if L > 0)
        if kraft > 1.0 + 1e-12:
            raise SparseCNNError(f"{what}: the Huffman code lengths are not a prefix code "
                                 f"(Kraft sum {kraft})")


def huffman_code(symbols: np.ndarray, n_symbols: int) -> HuffmanCode:
    """The canonical Huffman code of a message.

    Parameters
    ----------
    symbols : ndarray, shape (n,), integers in ``[0, n_symbols)``
    n_symbols : int
        Alphabet size (``2**bits`` for weight codes, ``2**index_bits`` for gaps).

    Returns
    -------
    HuffmanCode
        Every symbol that occurs has a code of 1 .. :data:`MAX_CODE_LENGTH` bits.
    """
    symbols = np.asarray(symbols)
    if symbols.size and (int(symbols.min()) < 0 or int(symbols.max()) >= n_symbols):
        raise SparseCNNError(f"huffman_code: symbols must lie in [0, {n_symbols}), got "
                             f"{int(symbols.min())}..{int(symbols.max())}")
    freq = np.bincount(symbols.astype(np.int64), minlength=n_symbols)
    lengths = _lengths(freq)
    while lengths.max(initial=0) > MAX_CODE_LENGTH:
        freq = np.where(freq > 0, (freq + 1) // 2, 0)
        lengths = _lengths(freq)
    return HuffmanCode(lengths.astype(np.uint8))


def huffman_encode(symbols: np.ndarray, code: HuffmanCode) -> tuple[np.ndarray, int]:
    """Encode ``symbols`` with ``code``.

    Returns
    -------
    stream : ndarray, shape (ceil(nbits / 8),), uint8
    nbits : int
        Exact bits of the message.
    """
    from sparsecnn.kernels.huffman import huffman_encode as _encode

    symbols = np.ascontiguousarray(symbols)
    if symbols.size == 0:
        return np.zeros(0, np.uint8), 0
    ln = code.lengths
    if int(symbols.max()) >= ln.size or (ln[symbols] == 0).any():
        raise SparseCNNError("huffman_encode: a symbol of the message has no code in this table")
    nbits = code.bits(np.bincount(symbols.astype(np.int64), minlength=ln.size))
    out = np.empty(-(-nbits // 8), dtype=np.uint8)
    written = _encode(symbols, code.codes(), ln, out)
    if written != nbits:  # pragma: no cover - the kernel and the count disagree: a bug, not bad input
        raise AssertionError(f"huffman_encode wrote {written} bits, expected {nbits}")
    return out, nbits


def huffman_decode(stream: np.ndarray, nbits: int, n: int, code: HuffmanCode, dtype: type = np.uint8,
                   what: str = "Huffman stream") -> np.ndarray:
    """Decode ``n`` symbols from ``stream`` (the inverse of :func:`huffman_encode`).

    Raises
    ------
    SparseCNNError
        If the stream is shorter than ``nbits``, ends inside a symbol, holds a code with no symbol, or
        does not use exactly ``nbits`` bits.
    """
    from sparsecnn.kernels.huffman import huffman_decode as _decode

    out = np.empty(int(n), dtype=dtype)
    if n == 0:
        if nbits != 0:
            raise SparseCNNError(f"{what} is corrupt: {nbits} bits for no symbols")
        return out
    code.check(what)
    if stream.size * 8 < nbits or code.lengths.max(initial=0) == 0:
        raise SparseCNNError(f"{what} is truncated: {stream.size * 8} bits stored, {nbits} needed")
    first_code, first_index, count, order = code.tables()
    used = _decode(np.ascontiguousarray(stream, np.uint8), int(nbits), first_code, first_index, count,
                   order, out)
    if used != nbits:
        raise SparseCNNError(f"{what} is corrupt: decoding {n} symbols used {used} of {nbits} bits")
    return out
