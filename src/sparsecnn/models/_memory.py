"""A memory guard: refuse, with a message, what would not fit in memory, before allocating it.

A model or batch too big for the machine otherwise ends in a ``DefaultCPUAllocator`` traceback from
deep inside torch, or worse, in the kernel's OOM killer (Linux overcommits: an allocation larger than
the free memory can succeed and the process dies when it touches the pages). The zoo's build, the
analysis input and each conv/linear output of an analysis or benchmark forward pass are checked
against the memory available *now* (``MemAvailable``, capped by a cgroup limit).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from sparsecnn.errors import SparseCNNError

__all__ = ["available_bytes", "check_fits", "format_bytes", "forward_guard"]

# Refuse above this share of the available memory: the rest is headroom for the temporaries that a
# single estimate does not count (torch workspaces, the Python heap, other processes' growth).
_HEADROOM = 0.9


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:  # other POSIX systems: free physical pages
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_available() -> int | None:
    # cgroup v2, then v1: the container's limit minus what it uses already.
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:  # "max" or a huge v1 sentinel: no limit
            return max(int(limit) - usage, 0)
    return None


def available_bytes() -> int | None:
    """Bytes this process could allocate now without swapping or an OOM kill; None if unknown."""
    override = os.environ.get("SPARSECNN_MEMORY_LIMIT")  # bytes; for tests and shared machines
    if override:
        try:
            return int(float(override))
        except ValueError:
            raise SparseCNNError(
                f"SPARSECNN_MEMORY_LIMIT={override!r} is not a number of bytes; unset it or give e.g. 8e9"
            ) from None
    values = [v for v in (_meminfo_available(), _cgroup_available()) if v is not None]
    return min(values) if values else None


def format_bytes(n: float) -> str:
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        size = 1 << {"TiB": 40, "GiB": 30, "MiB": 20, "KiB": 10}[unit]
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def check_fits(nbytes: int, what: str, remedy: str) -> None:
    """Raise :class:`SparseCNNError` if ``nbytes`` more would not fit in the available memory.

    Parameters
    ----------
    nbytes : int
        The estimate of what is about to be allocated.
    what : str
        What needs it, e.g. ``"vgg16 at input_size 20000 (weights)"``.
    remedy : str
        What the user can change, e.g. ``"use a smaller input_size"``.
    """
    avail = available_bytes()
    if avail is not None and nbytes > _HEADROOM * avail:
        raise SparseCNNError(
            f"{what} needs about {format_bytes(nbytes)} of memory, but only {format_bytes(avail)} is "
            f"available; {remedy}"
        )


def _conv_out_hw(conv: nn.Conv2d, h: int, w: int) -> tuple[int, int]:
    if conv.padding == "same":
        return h, w
    pad = (0, 0) if conv.padding == "valid" else conv.padding
    return tuple(  # type: ignore[return-value]
        (size + 2 * p - d * (k - 1) - 1) // s + 1
        for size, p, d, k, s in zip((h, w), pad, conv.dilation, conv.kernel_size, conv.stride, strict=True)
    )


def _output_bytes(module: nn.Module, x: torch.Tensor) -> int:
    if isinstance(module, nn.Linear):
        return x.numel() // max(module.in_features, 1) * module.out_features * x.element_size()
    if x.dim() < 3:
        return 0  # a malformed input: the layer itself will say so
    h, w = _conv_out_hw(module, int(x.shape[-2]), int(x.shape[-1]))
    batch = x.numel() // max(x.shape[-3] * x.shape[-2] * x.shape[-1], 1)
    return batch * module.out_channels * max(h, 0) * max(w, 0) * x.element_size()


@contextlib.contextmanager
def forward_guard(model: nn.Module, remedy: str) -> Iterator[None]:
    """While active, each Conv2d/Linear of ``model`` checks, before it runs, that its output and the
    next layer's output of the same size (ReLU, pooling and normalisation allocate one each) fit in
    the memory available at that moment; otherwise :class:`SparseCNNError` names the layer, the need,
    what is free and ``remedy``."""

    def check(name: str, module: nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], torch.Tensor) and args[0].device.type == "cpu":
            need = 2 * _output_bytes(module, args[0])
            check_fits(need, f"layer {name!r} on an input of shape {tuple(args[0].shape)}", remedy)

    handles = [
        m.register_forward_pre_hook(lambda mod, args, name=name: check(name, mod, args))
        for name, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
