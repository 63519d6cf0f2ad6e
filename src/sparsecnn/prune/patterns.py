"""Structured patterns on the lowered weight matrix: R x C blocks and N:M.

Both work on the matrix a GEMM sees: a Linear weight ``(out, in)`` as is, a conv weight lowered the
Caffe way to ``(g, Cout/g, Cin/g*kh*kw)`` (see :func:`sparsecnn.prune.masks.lowered_view`), so a
block or an N:M group is exactly what a BSR kernel or a 2:4 sparse GEMM skips.

* Block (Narang et al., "Block-Sparse Recurrent Neural Networks", 2017): score each ``R x C`` block
  by the L2 norm of its element scores (with magnitude importance, the block's Frobenius norm),
  remove the lowest blocks. Edge blocks that the matrix only partly covers are ranked by RMS so
  they are neither favoured nor penalised for their size.
* N:M (Mishra et al., "Accelerating Sparse Deep Neural Networks", 2021; NVIDIA's 2:4): in every
  group of ``M`` consecutive weights along the input (reduction, K) dimension keep the ``N`` with
  the highest scores. For a conv the K dimension is the lowered column index ``(c*kh + i)*kw + j``,
  so a group runs along kernel columns first, then kernel rows, then input channels. When K is not
  a multiple of M (LeNet's conv1: K = 25), the last, partial group of ``r < M`` weights keeps
  ``min(N, r)`` of them, so such a layer ends slightly below ``1 - N/M`` sparsity.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from sparsecnn.errors import SparseCNNError
from sparsecnn.prune.base import Pruner
from sparsecnn.prune.importance import Importance
from sparsecnn.prune.masks import lowered_view
from sparsecnn.prune.schedules import Constant, Schedule, check_target

__all__ = ["BlockPruner", "NMPruner", "parse_blocksize", "parse_nm"]


def parse_blocksize(spec: str) -> tuple[int, int]:
    """``"4x4"`` -> ``(4, 4)``."""
    try:
        r, c = (int(x) for x in spec.lower().split("x"))
    except ValueError:
        raise SparseCNNError(f"block size must look like RxC (e.g. 4x4), got {spec!r}") from None
    if r < 1 or c < 1:
        raise SparseCNNError(f"block size must be positive, got {spec!r}")
    return r, c


def parse_nm(spec: str) -> tuple[int, int]:
    """``"2:4"`` -> ``(2, 4)``."""
    try:
        n, m = (int(x) for x in spec.split(":"))
    except ValueError:
        raise SparseCNNError(f"N:M pattern must look like N:M (e.g. 2:4), got {spec!r}") from None
    if not 0 < n < m:
        raise SparseCNNError(f"N:M pattern needs 0 < N < M, got {spec!r}")
    return n, m


class BlockPruner(Pruner):
    """Remove whole ``R x C`` blocks of the lowered weight matrix by block norm.

    Parameters
    ----------
    target : float in [0, 1), optional
        Fraction of the weights to remove (reached by whole blocks); or give ``schedule``.
    blocksize : (int, int)
        ``R, C``: rows (output channels) by columns (lowered input positions).
    policy : {"global", "layer"}
        One block threshold across layers, or each layer to the target.
    """

    def __init__(
        self,
        target: float | None = None,
        *,
        blocksize: tuple[int, int] = (4, 4),
        schedule: Schedule | None = None,
        policy: str = "global",
        importance: Importance | None = None,
        layers: Iterable[str] | None = None,
    ) -> None:
        if (target is None) == (schedule is None):
            raise SparseCNNError("give exactly one of target or schedule")
        if policy not in ("global", "layer"):
            raise SparseCNNError(f"unknown block policy {policy!r}; choose global or layer")
        R, C = blocksize
        if R < 1 or C < 1:
            raise SparseCNNError(f"block size must be positive, got {blocksize}")
        if schedule is None:
            schedule = Constant(check_target(target))
        super().__init__(schedule, importance, layers)
        self.blocksize = (int(R), int(C))
        self.policy = policy

    def _blocks(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Block RMS scores and element counts, both shape (g, ceil(rows/R), ceil(cols/C))."""
        module = self.layers[name]
        s = lowered_view(self.importance(module), getattr(module, "groups", 1)).float()
        R, C = self.blocksize
        pr, pc = -s.shape[1] % R, -s.shape[2] % C
        sq = F.pad(s.pow(2), (0, pc, 0, pr))
        ones = F.pad(torch.ones_like(s), (0, pc, 0, pr))
        g, rows, cols = sq.shape
        def blocksum(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(g, rows // R, R, cols // C, C).sum(dim=(2, 4))
        count = blocksum(ones)
        return (blocksum(sq) / count).sqrt(), count

    def _expand(self, name: str, keep: torch.Tensor) -> torch.Tensor:
        module = self.layers[name]
        w = module.weight
        low_shape = lowered_view(w, getattr(module, "groups", 1)).shape
        R, C = self.blocksize
        full = keep.repeat_interleave(R, dim=1).repeat_interleave(C, dim=2)
        return full[:, : low_shape[1], : low_shape[2]].reshape(w.shape).to(w.device, w.dtype)

    @torch.no_grad()
    def compute_masks(self, target: float) -> dict[str, torch.Tensor]:
        blocks = {n: self._blocks(n) for n in self.layers}
        groups = [list(self.layers)] if self.policy == "global" else [[n] for n in self.layers]
        out: dict[str, torch.Tensor] = {}
        for names in groups:
            scores = torch.cat([blocks[n][0].reshape(-1).cpu() for n in names])
            counts = torch.cat([blocks[n][1].reshape(-1).cpu() for n in names])
            order = torch.argsort(scores, stable=True)
            # Remove blocks in ascending order until the removed weights reach the target fraction.
            removed = torch.cumsum(counts[order], 0)
            n_blocks = int(torch.searchsorted(removed, target * counts.sum() - 0.5, right=False)) + 1
            n_blocks = n_blocks if target > 0 else 0
            keep = torch.ones_like(scores)
            keep[order[:n_blocks]] = 0
            start = 0
            for n in names:
                shape = blocks[n][0].shape
                out[n] = self._expand(n, keep[start:start + shape.numel()].reshape(shape))
                start += shape.numel()
        return out


class NMPruner(Pruner):
    """Keep the ``N`` highest-scoring weights in every ``M`` consecutive along the input dimension.

    The target is fixed at ``1 - N/M`` (one shot); see the module docstring for the conv layout.
    """

    def __init__(
        self,
        n: int = 2,
        m: int = 4,
        *,
        importance: Importance | None = None,
        layers: Iterable[str] | None = None,
    ) -> None:
        if not (isinstance(n, int) and isinstance(m, int) and 0 < n < m):
            raise SparseCNNError(f"N:M pattern needs integers 0 < N < M, got {n}:{m}")
        super().__init__(Constant(1.0 - n / m), importance, layers)
        self.n, self.m = n, m

    @torch.no_grad()
    def compute_masks(self, target: float) -> dict[str, torch.Tensor]:
        out = {}
        for name, module in self.layers.items():
            w = module.weight
            s = lowered_view(self.importance(module), getattr(module, "groups", 1)).float()
            k = s.shape[2]
            pad = -k % self.m
            # Padding scores -1 are below every real (non-negative) score, so they are chosen last.
            sp = F.pad(s, (0, pad), value=-1.0).reshape(*s.shape[:2], -1, self.m)
            top = sp.topk(self.n, dim=3).indices
            keep = torch.zeros_like(sp).scatter_(3, top, 1.0).reshape(*s.shape[:2], -1)[..., :k]
            out[name] = keep.reshape(w.shape).to(w.device, w.dtype)
        return out
