"""Deep Compression's second and third stages: trained quantization with weight sharing and Huffman coding.

Han, Mao & Dally, "Deep Compression: Compressing Deep Neural Networks with Pruning, Trained Quantization
and Huffman Coding", ICLR 2016. Pruning (the first stage) is :mod:`sparsecnn.prune`; here:

- :func:`quantize_model`: per-layer k-means codebooks (linear initialisation), 8 bits conv / 5 bits FC
  by default, 1-8 bits per layer; :func:`finetune_centroids` trains the centroids on real data;
- :func:`huffman_code` / :func:`huffman_encode` / :func:`huffman_decode`: canonical Huffman coding;
- :func:`storage_report`: exact bytes per layer at each stage, beside the paper's published rates
  (:func:`compression_report`: quantize a model and account it, as ``analyze --compression`` does);
- the compressed file: :func:`sparsecnn.io.compressed.save_compressed` / ``load_compressed``.
"""

from __future__ import annotations

from sparsecnn.compress.huffman import HuffmanCode, huffman_code, huffman_decode, huffman_encode
from sparsecnn.compress.kmeans import (
    LayerCodebook,
    QuantizeConfig,
    finetune_centroids,
    kmeans_1d,
    quantize_model,
    quantized_layers,
    share_weights,
    unshare_weights,
)
from sparsecnn.compress.storage import (
    PAPER,
    LayerStorage,
    StorageReport,
    compression_report,
    layer_storage,
    storage_report,
)

__all__ = [
    "PAPER",
    "HuffmanCode",
    "LayerCodebook",
    "LayerStorage",
    "QuantizeConfig",
    "StorageReport",
    "compression_report",
    "finetune_centroids",
    "huffman_code",
    "huffman_decode",
    "huffman_encode",
    "kmeans_1d",
    "layer_storage",
    "quantize_model",
    "quantized_layers",
    "share_weights",
    "storage_report",
    "unshare_weights",
]
