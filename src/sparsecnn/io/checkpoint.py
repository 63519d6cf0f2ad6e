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
checkpoint. Its size is the formats' ``nbytes`` plus the biases and the dense rest, plus a small header.
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
CHECKPOINT_VERSION = 1
_HEADER = "__header__"


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
    fd, tmp = tempfile.mkstemp(prefix=".ckpt-", suffix="." + kind, dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            if kind == "npz":
                np.savez(f, **{_HEADER: np.frombuffer(text.encode(), np.uint8)}, **arrays)
            else:
                from safetensors.numpy import save as st_save

                f.write(st_save(arrays, metadata={"sparsecnn": text}))
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
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            raw = arrays.pop(_HEADER, None)
            text = None if raw is None else raw.tobytes().decode("utf-8")
        else:
            from safetensors import safe_open
            from safetensors.numpy import load as st_load

            arrays = st_load(data)
            with safe_open(path, "np") as f:
                text = (f.metadata() or {}).get("sparsecnn")
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
    return header, arrays


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
