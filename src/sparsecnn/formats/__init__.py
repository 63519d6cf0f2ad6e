"""Sparse storage formats with exact byte accounting.

:class:`CSRMatrix` (compressed sparse row), :class:`BSRMatrix` (block sparse row) and
:class:`RelativeIndexMatrix` (Deep Compression's relative indices with filler zeros, Han et al.,
ICLR 2016) store one 2-D matrix each; a conv weight becomes one matrix per group with
:func:`lower_conv_weight` (Caffe's lowering). Every format stores its integer arrays at the smallest
signed width that holds them (:func:`index_dtype`, :func:`pointer_dtype`) and reports its exact size
in ``nbytes``.
"""

from __future__ import annotations

from sparsecnn.formats._common import index_dtype, pointer_dtype
from sparsecnn.formats.bsr import BSRMatrix
from sparsecnn.formats.csr import CSRMatrix
from sparsecnn.formats.lowering import (
    FORMATS,
    conv_weight_nbytes,
    lower_conv_weight,
    matrix_nbytes,
    unlower_conv_weight,
)
from sparsecnn.formats.relative import RelativeIndexMatrix, pack_gaps, unpack_gaps

__all__ = [
    "FORMATS",
    "BSRMatrix",
    "CSRMatrix",
    "RelativeIndexMatrix",
    "conv_weight_nbytes",
    "index_dtype",
    "lower_conv_weight",
    "matrix_nbytes",
    "pack_gaps",
    "pointer_dtype",
    "unlower_conv_weight",
    "unpack_gaps",
]
