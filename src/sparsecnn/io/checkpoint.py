"""Sparse checkpoints: a sparse model saved in its formats, loaded back without pruning or conversion.

A checkpoint holds, for every :class:`~sparsecnn.layers.SparseConv2d` / ``SparseLinear``, its format's
arrays (CSR ``indptr, indices, data``, BSR blocks, the SSL-lowered weight, ...), strategy, geometry,
bias and name; the dense state of everything else; the plan (``model.sparsecnn_plan``); the input
shape; and a pickle-free description of the architecture, so :func:`load` can rebuild the model:

- a zoo model (``model.zoo_name``): the zoo name and its build arguments;
- an imported Caffe/ONNX model (:class:`~sparsecnn.io._graph.GraphNet`): its steps and modules;
- any other module: no description; :func:`load` then needs ``model=`` a freshly built instance of the
  same architecture (dense), into which the sparse layers and the state are put.

File layout: ``.npz`` (numpy, the default) or ``.safetensors``. Array names are
``sparse/<layer>/<field>`` and ``dense/<state key>``; the JSON header (format name, version, layers,
architecture) is the array ``__header__`` (npz) or the metadata key ``sparsecnn`` (safetensors). The file
is written to a temporary file beside the target and renamed over it, so a crash never leaves half a
checkpoint. From version 2 a SHA-256 over the header text and every array (name, dtype, shape, bytes) is
stored beside the header (the array ``__sha256__`` / the metadata key ``sparsecnn_sha256``) and checked on
load: safetensors has no checksum, and a flipped bit in a weight or a header field must not load as a
silently different model. Its size is the formats' ``nbytes`` plus the biases and the dense rest, plus a
small header.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import tempfile
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from sparsecnn.errors import SparseCNNError
from sparsecnn.io import _sparse
from sparsecnn.io._graph import GraphNet, from_description, module_spec

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "load", "save"]

CHECKPOINT_FORMAT = "sparsecnn-checkpoint"
# Bump when the layout changes; load() refuses files with a larger version.
# 2: a SHA-256 digest of the header and arrays, required from this version on.
CHECKPOINT_VERSION = 2
_HEADER = "__header__"
_DIGEST = "__sha256__"  # npz array; the safetensors metadata key is "sparsecnn_sha256"


def _digest(text: str, arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 hex digest of the header text and every array's name, dtype, shape and bytes."""
    import hashlib

    h = hashlib.sha256(text.encode())
    for key in sorted(arrays):
        a = np.ascontiguousarray(arrays[key])
        h.update(f"\0{key}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.view(np.uint8).reshape(-1) if a.size else b"")
    return h.hexdigest()


def _npz_arrays(data: bytes) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` held in ``data``, each member's declared shape checked against its size
    first: numpy allocates the declared shape before it reads, so a corrupt header would ask for
    terabytes."""
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        out = {}
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                raise ValueError(f"member {info.filename!r} is not an array")
            if info.file_size > len(data) * 1032:  # deflate's best ratio: a bomb, not a checkpoint
                raise ValueError(f"member {info.filename!r} declares {info.file_size} bytes")
            with zf.open(info) as f:
                version = np.lib.format.read_magic(f)
                if version not in ((1, 0), (2, 0)):
                    raise ValueError(f"member {info.filename!r} has npy version {version}")
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, _fortran, dtype = read_header(f)
                if dtype.hasobject:
                    raise ValueError(f"member {info.filename!r} holds Python objects")
                need = int(np.prod(shape, dtype=object)) * dtype.itemsize
                if need > info.file_size:
                    raise ValueError(f"member {info.filename!r} declares shape {shape} ({need} bytes) "
                                     f"in {info.file_size} bytes")
            with zf.open(info) as f:
                out[info.filename[:-4]] = np.lib.format.read_array(f, allow_pickle=False)
        return out


def _suffix(path: str) -> str:
    low = path.lower()
    if low.endswith(".npz"):
        return "npz"
    if low.endswith(".safetensors"):
        if importlib.util.find_spec("safetensors") is None:
            raise SparseCNNError(f"{path}: .safetensors files need the safetensors package; "
                                 f"pip install 'sparsecnn[safetensors]', or use a .npz path")
        return "safetensors"
    raise SparseCNNError(f"checkpoint path {path} must end in .npz or .safetensors")


def _graph_spec(module: nn.Module) -> dict[str, Any]:
    if _sparse.is_sparse(module):  # described as its dense equivalent; the sparse layer replaces it on load
        spec = _sparse.layer_spec(module)
        kind = spec.pop("kind")
        return {"class": "Linear" if kind == "linear" else "Conv2d", "args": spec}
    return module_spec(module)


def _architecture(model: nn.Module) -> dict[str, Any]:
    if isinstance(model, GraphNet):
        return {"kind": "graph", "description": model.describe(_graph_spec)}
    zoo = getattr(model, "zoo_name", None)
    shape = getattr(model, "input_shape", None)
    if isinstance(zoo, str) and isinstance(shape, tuple) and len(shape) == 3 and shape[1] == shape[2]:
        last = [m for m in model.modules() if isinstance(m, nn.Linear) or type(m).__name__ == "SparseLinear"]
        build = {"in_channels": int(shape[0]), "input_size": int(shape[1])}
        if last:
            build["num_classes"] = int(last[-1].out_features)
        return {"kind": "zoo", "name": zoo, "build": build}
    return {"kind": "none", "class": type(model).__name__}


def save(model: nn.Module, path: str | os.PathLike[str]) -> str:
    """Write ``model`` (typically from :func:`sparsecnn.sparsify`) as a sparse checkpoint.

    Parameters
    ----------
    model : torch.nn.Module
        Its sparse layers are stored in their formats, the rest as its dense state dict.
    path : path
        ``*.npz`` or ``*.safetensors``; replaced atomically.

    Returns
    -------
    str
        ``path``.
    """
    if not isinstance(model, nn.Module):
        raise SparseCNNError(f"save needs a torch.nn.Module, got {type(model).__name__}")
    path = os.fspath(path)
    kind = _suffix(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise SparseCNNError(f"cannot write {path}: directory {directory} does not exist")
    arrays: dict[str, np.ndarray] = {}
    layers: dict[str, Any] = {}
    for name, m in model.named_modules():
        if not _sparse.is_sparse(m):
            continue
        spec = _sparse.layer_spec(m)
        entry: dict[str, Any] = {
            "strategy": m.strategy,
            "spec": spec,
            "conversion_seconds": float(m.conversion_seconds),
        }
        if m.strategy != "torch":  # torch keeps a dense module, saved with the state dict
            cls, scalars, parts = _sparse.format_parts(m.format)
            entry["format"] = {"class": cls, "fields": scalars, "arrays": sorted(parts)}
            for key, arr in parts.items():
                arrays[f"sparse/{name}/{key}"] = np.ascontiguousarray(arr)
            if spec["bias"]:
                bias = m.dense_bias()
                arrays[f"sparse/{name}/bias"] = bias
        layers[name] = entry
    state = model.state_dict()
    for key, tensor in state.items():
        arrays[f"dense/{key}"] = tensor.detach().cpu().contiguous().numpy()
    plan = getattr(model, "sparsecnn_plan", None)
    shape = getattr(model, "input_shape", None)
    header = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "layers": layers,
        "dense": list(state),
        "architecture": _architecture(model),
        "input_shape": list(shape) if isinstance(shape, tuple) else None,
        "plan": plan.to_json() if hasattr(plan, "to_json") else None,
    }
    text = json.dumps(header, separators=(",", ":"))
    digest = _digest(text, arrays)
    fd, tmp = tempfile.mkstemp(prefix=".ckpt-", suffix="." + kind, dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            if kind == "npz":
                np.savez(f, **{_HEADER: np.frombuffer(text.encode(), np.uint8),
                               _DIGEST: np.frombuffer(digest.encode(), np.uint8)}, **arrays)
            else:
                from safetensors.numpy import save as st_save

                f.write(st_save(arrays, metadata={"sparsecnn": text, "sparsecnn_sha256": digest}))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


# ------------------------------------------------------------------------------------------------


def _read(path: str) -> tuple[dict[str, Any], Mapping[str, np.ndarray]]:
    if not os.path.isfile(path):
        raise SparseCNNError(f"checkpoint {path} does not exist")
    kind = _suffix(path)
    bad = f"checkpoint {path} is truncated or not a sparsecnn checkpoint"
    try:
        with open(path, "rb") as f:
            data = f.read()
        if kind == "npz":
            arrays = _npz_arrays(data)
            raw, raw_digest = arrays.pop(_HEADER, None), arrays.pop(_DIGEST, None)
            text = None if raw is None else raw.tobytes().decode("utf-8")
            digest = None if raw_digest is None else raw_digest.tobytes().decode("ascii")
        else:
            from safetensors.numpy import load as st_load

            arrays = st_load(data)
            meta = _safetensors_metadata(data)
            text, digest = meta.get("sparsecnn"), meta.get("sparsecnn_sha256")
    except SparseCNNError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, UnicodeDecodeError, KeyError) as exc:
        raise SparseCNNError(f"{bad} ({type(exc).__name__}: {exc})") from None
    except Exception as exc:  # safetensors raises its own error type; zlib its own
        raise SparseCNNError(f"{bad} ({type(exc).__name__}: {exc})") from None
    if text is None:
        raise SparseCNNError(f"{bad} (no sparsecnn header)")
    try:
        header = json.loads(text)
    except ValueError:
        raise SparseCNNError(f"{bad} (its header is not JSON)") from None
    if not isinstance(header, dict) or header.get("format") != CHECKPOINT_FORMAT:
        raise SparseCNNError(f"{bad} (format {header.get('format') if isinstance(header, dict) else None!r})")
    version = header.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise SparseCNNError(f"{bad} (format version {version!r})")
    if version > CHECKPOINT_VERSION:
        raise SparseCNNError(
            f"checkpoint {path} has format version {version}, newer than this sparsecnn reads "
            f"({CHECKPOINT_VERSION}); upgrade sparsecnn to load it"
        )
    if digest is None and version >= 2:
        raise SparseCNNError(f"{bad} (its checksum is missing)")
    if digest is not None and digest != _digest(text, arrays):
        raise SparseCNNError(f"checkpoint {path} is corrupt: its checksum does not match its contents "
                             f"(a damaged copy? save it again from the model)")
    return header, arrays


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file in ``data`` (8-byte little-endian header length,
    then a JSON header), read from the same bytes as the arrays (not the file a second time)."""
    n = int.from_bytes(data[:8], "little")
    if len(data) < 8 or n > len(data) - 8:
        raise ValueError("header length beyond the end of the file")
    meta = json.loads(data[8:8 + n]).get("__metadata__") or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ValueError("malformed metadata")
    return meta


def _skeleton(arch: Any, path: str) -> nn.Module:
    if not isinstance(arch, dict):
        raise SparseCNNError(f"checkpoint {path} has a malformed architecture record")
    kind = arch.get("kind")
    if kind == "graph":
        return from_description(arch.get("description"))
    if kind == "zoo":
        from sparsecnn.models import build

        build_kw = arch.get("build") or {}
        if not isinstance(build_kw, dict):
            raise SparseCNNError(f"checkpoint {path} has malformed zoo build arguments")
        return build(str(arch.get("name")), **{k: int(v) for k, v in build_kw.items()})
    raise SparseCNNError(
        f"checkpoint {path} was saved from a {arch.get('class', 'custom')} module, whose architecture it "
        f"cannot "
        f"record; pass model=<a freshly built instance of it> to load"
    )


def load(path: str | os.PathLike[str], *, model: nn.Module | None = None) -> nn.Module:
    """Load a sparse checkpoint written by :func:`save`.

    Parameters
    ----------
    path : path
        ``*.npz`` or ``*.safetensors``.
    model : torch.nn.Module, optional
        A dense instance of the saved architecture, for checkpoints of modules that are neither zoo
        models nor imported graphs. It is copied, not changed.

    Returns
    -------
    torch.nn.Module
        In eval mode, its sparse layers rebuilt from their stored formats (no conversion), with
        ``sparsecnn_plan`` and ``input_shape`` as saved.

    Raises
    ------
    SparseCNNError
        For a missing, truncated or foreign file, a newer format version, or a state that does not fit.
    """
    import copy

    from sparsecnn.layers import _set_submodule

    path = os.fspath(path)
    header, arrays = _read(path)
    bad = f"checkpoint {path} is corrupt"
    try:
        skeleton = copy.deepcopy(model) if model is not None else _skeleton(header.get("architecture"), path)
        layers = header["layers"]
        for name, entry in layers.items():
            spec, strategy = entry["spec"], str(entry["strategy"])
            prefix = f"sparse/{name}/"
            if strategy == "torch":  # the dense module inside the layer is saved with the state dict
                inner = f"dense/{name}.{'linear' if spec['kind'] == 'linear' else 'conv'}."
                fmt = arrays[inner + "weight"]
                bias = arrays[inner + "bias"] if spec["bias"] else None
            else:
                f = entry["format"]
                fmt = _sparse.format_from_parts(
                    str(f["class"]), dict(f["fields"]), {k: arrays[prefix + k] for k in f["arrays"]}
                )
                bias = arrays[prefix + "bias"].astype(np.float32) if spec["bias"] else None
            layer = _sparse.rebuild_layer(
                spec, strategy, name, fmt, bias, float(entry.get("conversion_seconds", 0.0))
            )
            try:
                skeleton.get_submodule(name)
            except AttributeError:
                raise SparseCNNError(
                    f"{bad}: the model has no layer {name!r} for a stored sparse layer"
                ) from None
            _set_submodule(skeleton, name, layer)
        state = {k: torch.from_numpy(np.array(arrays["dense/" + k])) for k in header["dense"]}
        missing, unexpected = skeleton.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise SparseCNNError(
                f"checkpoint {path} does not fit the model: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}"
            )
    except SparseCNNError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError, IndexError) as exc:
        raise SparseCNNError(f"{bad} ({type(exc).__name__}: {exc})") from None
    shape = header.get("input_shape")
    if isinstance(shape, list) and shape:
        skeleton.input_shape = tuple(int(d) for d in shape)
    plan = header.get("plan")
    if isinstance(plan, dict) and isinstance(plan.get("layers"), dict):
        from sparsecnn.plan import LayerChoice, Plan

        skeleton.sparsecnn_plan = Plan(
            {
                n: LayerChoice(
                    str(e["strategy"]),
                    str(e.get("source", "given")),
                    {k: float(v) for k, v in e.get("times_s", {}).items()},
                )
                for n, e in plan["layers"].items()
            }
        )
    return skeleton.eval()
