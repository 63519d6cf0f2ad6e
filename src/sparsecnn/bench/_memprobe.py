"""Child process of the memory-scaling experiment: build one weight matrix, multiply, report.

Run as ``python -m sparsecnn.bench._memprobe '<json spec>'``. This process reads its own peak
resident set size from the kernel (``VmHWM``; the parent's ``os.wait4`` figure is a fallback only,
since ``ru_maxrss`` keeps the forked parent's mark across ``exec``) and prints one JSON line with its
timing and the high-water mark it had *before* the
matrices were made (interpreter, torch, numba and the JIT-compiled kernel), so the parent can report
the matrices' share.

Matrices are generated in row chunks straight into their final storage, so no dense temporary of
the full size inflates the sparse run's peak; the kernel's peak-RSS mark is reset before and after
generation, so the peak counts what is kept (the matrix) and what the products need, not the
generator's temporaries.
"""

from __future__ import annotations

import json
import resource
import sys
import warnings
from typing import Any

import numpy as np

from sparsecnn.errors import SparseCNNError

IMPLS = ("dense", "csr", "torch-csr")
_CHUNK_ELEMS = 1 << 20  # elements generated per chunk: 4 MiB of float32


def _maxrss_bytes() -> int:
    """This process's peak RSS: ``VmHWM`` (which ``_reset_peak`` resets), else ``ru_maxrss``.

    ``ru_maxrss`` survives ``exec``: a child forked from a large parent (the report process holds
    several models) starts with the parent's high-water mark, so it cannot be the measurement.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _reset_peak() -> int:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0) and return the current RSS in bytes.

    Imports (torch, numba's LLVM) leave a transient high-water mark above the RSS they keep; without
    the reset a matrix smaller than that transient would not show in the peak at all. Where the reset
    is not possible, the current high-water mark is returned instead (the matrix's share is then a
    lower bound).
    """
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return _maxrss_bytes()


def _chunks(m: int, k: int) -> list[tuple[int, int]]:
    rows = max(1, _CHUNK_ELEMS // max(k, 1))
    return [(r, min(m, r + rows)) for r in range(0, m, rows)]


def _dense_chunk(rng: np.random.Generator, rows: int, k: int, sparsity: float) -> np.ndarray:
    a = rng.standard_normal((rows, k), dtype=np.float32)
    a[rng.random((rows, k), dtype=np.float32) < sparsity] = 0.0
    return a


def build_csr(m: int, k: int, sparsity: float, seed: int) -> Any:
    """A random (M, K) CSRMatrix with about ``sparsity`` zeros, built without a full dense copy."""
    from sparsecnn.formats import CSRMatrix, index_dtype, pointer_dtype

    rng = np.random.default_rng(seed)
    expect = m * k * (1.0 - sparsity)
    cap = int(expect + 8 * np.sqrt(expect + 1) + 16)  # binomial: 8 sigma above the mean
    idx_dt = index_dtype(k)
    data = np.empty(cap, np.float32)
    indices = np.empty(cap, idx_dt)
    indptr = np.zeros(m + 1, np.int64)
    nnz = 0
    for r0, r1 in _chunks(m, k):
        a = _dense_chunk(rng, r1 - r0, k, sparsity)
        rows, cols = np.nonzero(a)
        n = len(rows)
        if nnz + n > cap:
            raise SparseCNNError("random matrix drew far more nonzeros than expected; use another seed")
        data[nnz : nnz + n] = a[rows, cols]
        indices[nnz : nnz + n] = cols
        indptr[r0 + 1 : r1 + 1] = nnz + np.cumsum(np.bincount(rows, minlength=r1 - r0))
        nnz += n
    ptr_dt = pointer_dtype(nnz)
    return CSRMatrix(indptr.astype(ptr_dt), indices[:nnz], data[:nnz], (m, k))


def build_dense(m: int, k: int, sparsity: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((m, k), np.float32)
    for r0, r1 in _chunks(m, k):
        out[r0:r1] = _dense_chunk(rng, r1 - r0, k, sparsity)
    return out


def _check_rows(a_csr: Any, b: np.ndarray, y: np.ndarray, seed: int) -> float:
    """Verify ``y = A B`` on 32 random rows against a float64 product of those rows."""
    from sparsecnn.bench.harness import check_close

    rng = np.random.default_rng(seed + 1)
    rows = rng.choice(a_csr.shape[0], size=min(32, a_csr.shape[0]), replace=False)
    ref = np.zeros((len(rows), b.shape[1]))
    for i, r in enumerate(rows):
        lo, hi = int(a_csr.indptr[r]), int(a_csr.indptr[r + 1])
        ref[i] = a_csr.data[lo:hi].astype(np.float64) @ b[a_csr.indices[lo:hi].astype(np.int64)]
    return check_close(y[rows], ref, rtol=1e-4, what="sparse product")


def probe(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from sparsecnn import ops
    from sparsecnn.bench.harness import set_threads, time_call

    m, k, n = int(spec["m"]), int(spec["k"]), int(spec["n"])
    sparsity, impl, seed = float(spec["sparsity"]), spec["impl"], int(spec.get("seed", 0))
    device = spec.get("device", "cpu")
    if impl not in IMPLS:
        raise SparseCNNError(f"unknown impl {impl!r}; choose one of {', '.join(IMPLS)}")
    warnings.filterwarnings("ignore", message="Sparse (CSR tensor support|invariant checks)")
    set_threads(int(spec.get("threads") or 0) or None)
    torch.set_grad_enabled(False)
    b = np.random.default_rng(seed + 2).standard_normal((k, n), dtype=np.float32)
    if impl == "csr":  # compile (or load) the kernel before the baseline, on a tiny product
        small = build_csr(8, 8, 0.5, seed)
        ops.csr_matmul(small, np.ones((8, 2), np.float32))
    baseline = _reset_peak()
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    operand = 0
    err = 0.0
    if impl == "dense":
        a = torch.from_numpy(build_dense(m, k, sparsity, seed)).to(device)
        bt = torch.from_numpy(b).to(device)
        operand = a.numel() * 4

        def fn() -> Any:
            return a @ bt
    else:
        a_csr = build_csr(m, k, sparsity, seed)
        operand = a_csr.nbytes
        if impl == "csr":
            if cuda:
                raise SparseCNNError(
                    "impl 'csr' (the numba kernel) runs on the CPU only; use torch-csr on cuda"
                )
            out = np.empty((m, n), np.float32)

            def fn() -> Any:
                return ops.csr_matmul(a_csr, b, out)
        else:
            at = torch.sparse_csr_tensor(
                torch.from_numpy(a_csr.indptr.astype(np.int64)),
                torch.from_numpy(a_csr.indices.astype(np.int64)),
                torch.from_numpy(a_csr.data),
                size=(m, k),
                device=device,
            )
            operand = at.values().numel() * 4 + (at.col_indices().numel() + at.crow_indices().numel()) * 8
            bt = torch.from_numpy(b).to(device)

            def fn() -> Any:
                return at @ bt

        y = fn()
        y_np = y.cpu().numpy() if hasattr(y, "cpu") else y
        err = _check_rows(a_csr, b, y_np, seed)
        del y, y_np
    # The generation temporaries are freed: from here the peak is the matrices plus the products.
    _reset_peak()
    sync = torch.cuda.synchronize if cuda else None
    timing = time_call(
        fn,
        repeats=int(spec.get("repeats", 5)),
        warmup=1,
        max_total_s=float(spec.get("max_total_s", 20.0)),
        sync=sync,
    )
    result = {
        "baseline_rss_bytes": baseline,
        "peak_rss_self_bytes": _maxrss_bytes(),
        "operand_bytes": int(operand),
        "max_rel_err": err,
        "timing": timing.to_dict(),
    }
    if cuda:
        result["cuda_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        spec = json.loads(argv[0])
        print(json.dumps(probe(spec)), flush=True)
    except (SparseCNNError, ValueError, IndexError, MemoryError, RuntimeError) as exc:
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
