"""Canonical Huffman bit packing and decoding (the third stage of Deep Compression, Han et al. ICLR 2016).

Codes are written most significant bit first into a byte stream, bytes filled from their high bit.
The decoder walks the stream one bit at a time with the canonical tables (``first_code[L]``,
``first_index[L]``, ``count[L]`` per code length ``L``), the textbook canonical decoder
(Moffat & Turpin, "On the implementation of minimum redundancy prefix codes", 1997).
"""

from __future__ import annotations

import numpy as np

from sparsecnn.kernels._numba import jit

__all__ = ["huffman_decode", "huffman_encode"]


@jit
def huffman_encode(symbols, codes, lengths, out):
    """Pack ``codes[s]`` (``lengths[s]`` bits, MSB first) of each symbol ``s`` into ``out``.

    Parameters
    ----------
    symbols : ndarray, shape (n,), unsigned int
    codes : ndarray, shape (n_symbols,), uint64
    lengths : ndarray, shape (n_symbols,), uint8; 1..57 for every symbol that occurs
    out : ndarray, shape (ceil(total_bits / 8),), uint8
        Written in full (a trailing partial byte padded with zero bits).

    Returns
    -------
    int
        Bits written.

    NOTE: every symbol has a code (lengths[s] >= 1) and out is large enough.
    """
    acc = np.uint64(0)  # pending bits, right-aligned
    nacc = 0
    pos = 0
    nbits = 0
    for i in range(symbols.size):
        s = symbols[i]
        ln = np.int64(lengths[s])
        acc = (acc << np.uint64(ln)) | codes[s]
        nacc += ln
        nbits += ln
        while nacc >= 8:
            nacc -= 8
            out[pos] = np.uint8((acc >> np.uint64(nacc)) & np.uint64(0xFF))
            pos += 1
        acc &= (np.uint64(1) << np.uint64(nacc)) - np.uint64(1)
    if nacc > 0:
        out[pos] = np.uint8((acc << np.uint64(8 - nacc)) & np.uint64(0xFF))
        pos += 1
    return nbits


@jit
def huffman_decode(stream, nbits, first_code, first_index, count, sorted_symbols, out):
    """Decode ``out.size`` symbols from the first ``nbits`` bits of ``stream``.

    Parameters
    ----------
    stream : ndarray, shape (ceil(nbits / 8),), uint8
    nbits : int
    first_code, first_index, count : ndarray, shape (max_len + 1,), int64
        Canonical tables: the codes of length ``L`` are ``first_code[L] .. first_code[L] + count[L] - 1``
        and stand for ``sorted_symbols[first_index[L] + j]``.
    sorted_symbols : ndarray, shape (n_coded,), int64; symbols by (length, symbol)
    out : ndarray, shape (n,), unsigned int

    Returns
    -------
    int
        Bits consumed, or ``-1`` when the stream ends inside a symbol or holds a code no symbol has
        (a corrupt stream; the caller raises).
    """
    max_len = count.size - 1
    bit = 0
    for i in range(out.size):
        code = 0
        ln = 0
        found = False
        while ln < max_len:
            if bit >= nbits:
                return -1
            b = (stream[bit >> 3] >> (7 - (bit & 7))) & 1
            bit += 1
            code = (code << 1) | b
            ln += 1
            d = code - first_code[ln]
            if d >= 0 and d < count[ln]:
                out[i] = sorted_symbols[first_index[ln] + d]
                found = True
                break
        if not found:
            return -1
    return bit
