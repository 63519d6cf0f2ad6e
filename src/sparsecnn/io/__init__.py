"""Model interchange: Caffe and ONNX models in, ONNX out, and sparse checkpoints.

- :func:`load_caffe` (deploy ``.prototxt`` + ``.caffemodel``) and :func:`load_onnx` give a torch module
  with readable layer names and ``input_shape``;
- :func:`export_onnx` writes any model (sparse layers densified) for ONNX Runtime and other runtimes;
- :func:`save` / :func:`load` write and read a sparse model in its formats (CSR/BSR/...), so it comes
  back without pruning or conversion; :func:`load` also reads a Deep Compression ``*.sparsecnn`` file
  (:func:`load_compressed`, written by :func:`save_compressed` / ``sparsecnn compress``);
- :func:`load_model_file` is the file branch of :func:`sparsecnn.models.resolve`.

Nothing heavy is imported until a function is called.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Union

from sparsecnn.errors import SparseCNNError

if TYPE_CHECKING:
    from torch import nn

PathLike = Union[str, "os.PathLike[str]"]

__all__ = [
    "MODEL_FILE_SUFFIXES",
    "export_onnx",
    "is_model_file",
    "load",
    "load_caffe",
    "load_compressed",
    "load_model_file",
    "load_onnx",
    "save",
    "save_compressed",
]

# Suffixes that make a MODEL argument a file rather than a zoo name.
MODEL_FILE_SUFFIXES: tuple[str, ...] = (
    ".prototxt",
    ".caffemodel",
    ".onnx",
    ".pt",
    ".pth",
    ".npz",
    ".safetensors",
    ".sparsecnn",
)


def load_caffe(
    prototxt: PathLike, weights: PathLike | None = None, *, input_shape: Sequence[int] | None = None
) -> nn.Module:
    from sparsecnn.io.caffe import load_caffe as _load

    return _load(prototxt, weights, input_shape=input_shape)


def load_onnx(path: PathLike, *, input_shape: Sequence[int] | None = None) -> nn.Module:
    from sparsecnn.io.onnx import load_onnx as _load

    return _load(path, input_shape=input_shape)


def export_onnx(
    model: nn.Module, path: PathLike, *, input_shape: Sequence[int] | None = None, opset: int = 17
) -> str:
    from sparsecnn.io.onnx import export_onnx as _export

    return _export(model, path, input_shape=input_shape, opset=opset)


def save(model: nn.Module, path: PathLike) -> str:
    from sparsecnn.io.checkpoint import save as _save

    return _save(model, path)


def load(path: PathLike, *, model: nn.Module | None = None) -> nn.Module:
    if os.fspath(path).lower().endswith(".sparsecnn"):
        if model is not None:
            raise SparseCNNError(f"{os.fspath(path)} records its architecture; load it without model=")
        return load_compressed(path)
    from sparsecnn.io.checkpoint import load as _load

    return _load(path, model=model)


def save_compressed(model: nn.Module, books: Any, path: PathLike, *, index_bits: Any = 4) -> str:
    from sparsecnn.io.compressed import save_compressed as _save

    return _save(model, books, path, index_bits=index_bits)


def load_compressed(path: PathLike, *, strategy: str = "qspmv") -> nn.Module:
    from sparsecnn.io.compressed import load_compressed as _load

    return _load(path, strategy=strategy)


for _f, _mod in (
    (load_caffe, "caffe"),
    (load_onnx, "onnx"),
    (export_onnx, "onnx"),
    (save, "checkpoint"),
    (load, "checkpoint"),
    (save_compressed, "compressed"),
    (load_compressed, "compressed"),
):
    _f.__doc__ = f"See :func:`sparsecnn.io.{_mod}.{_f.__name__}`."


def is_model_file(spec: Any) -> bool:
    """Whether a MODEL argument names a model file (by its suffix) rather than a zoo model."""
    return isinstance(spec, (str, os.PathLike)) and os.fspath(spec).lower().endswith(MODEL_FILE_SUFFIXES)


def _input_shape(kw: dict[str, Any]) -> Sequence[int] | None:
    shape = kw.pop("input_shape", None)
    size, channels = kw.pop("input_size", None), kw.pop("in_channels", None)
    if shape is None and (size is not None or channels is not None):
        if size is None or channels is None:
            raise SparseCNNError(
                "for a model file give both in_channels and input_size, or input_shape=(C, H, W)"
            )
        shape = (channels, size, size)
    return shape


def load_model_file(
    spec: str | os.PathLike[str], weights: str | os.PathLike[str] | None = None, **kw: Any
) -> nn.Module:
    """Load a model file named on the command line.

    ``*.prototxt`` (Caffe deploy net; ``weights`` = its ``.caffemodel``), ``*.onnx``, ``*.npz`` /
    ``*.safetensors`` (a sparse checkpoint from :func:`save`), ``*.pt`` / ``*.pth``: a pickled
    ``nn.Module`` (``torch.save(model, path)``), or, with ``model=NAME`` (a zoo name), a state dict
    for that zoo model. Keyword ``input_shape=(C, H, W)`` (or ``in_channels`` + ``input_size``)
    overrides the file's input shape; ``seed`` seeds the initialisation of a Caffe net without weights.
    """
    import torch

    path = os.fspath(spec)
    low = path.lower()
    zoo_name = kw.pop("model", None)
    seed = kw.pop("seed", None)
    if low.endswith((".pt", ".pth")) and zoo_name is not None:
        from sparsecnn.models.zoo import resolve as zoo_resolve

        if seed is not None:
            kw["seed"] = seed
        return zoo_resolve(zoo_name, weights=path, **kw)
    shape = _input_shape(kw)
    unknown = sorted(k for k, v in kw.items() if v is not None)
    if unknown:
        raise SparseCNNError(f"option(s) {', '.join(unknown)} do not apply to a model file ({path})")
    if zoo_name is not None:
        raise SparseCNNError(f"model={zoo_name!r} applies to a .pt/.pth state dict only, not to {path}")
    if low.endswith(".caffemodel"):
        raise SparseCNNError(
            f"{path} holds Caffe weights; pass the deploy .prototxt as MODEL and this file as the weights"
        )
    if low.endswith(".prototxt"):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0 if seed is None else int(seed))
            return load_caffe(path, weights, input_shape=shape)
    if weights is not None:
        raise SparseCNNError(
            f"{path} holds its own weights; --weights applies to zoo models and .prototxt files"
        )
    if low.endswith(".onnx"):
        return load_onnx(path, input_shape=shape)
    if low.endswith((".npz", ".safetensors", ".sparsecnn")):
        model = load(path)
    else:
        model = _load_pickled_module(path)
    if shape is not None:
        model.input_shape = tuple(int(d) for d in shape)
    return model


def _load_pickled_module(path: str) -> nn.Module:
    import pickle

    import torch
    from torch import nn

    if not os.path.isfile(path):
        raise SparseCNNError(f"model file {path} does not exist")
    try:
        # A state dict loads with the safe unpickler; a whole module needs the full one, which runs
        # code named in the file: torch.save(model, path) files are to be loaded only from trusted sources.
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SparseCNNError(f"{path} is not a readable torch file ({first})") from None
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, dict):
        raise SparseCNNError(
            f"{path} holds a state dict, not a model; name its architecture with --model NAME (a zoo model), "
            f"or save the whole module with torch.save(model, path)"
        )
    raise SparseCNNError(f"{path} holds a {type(obj).__name__}, not a torch.nn.Module")
