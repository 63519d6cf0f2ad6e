"""The measurement harness: warm-up, verify, repeat, environment capture, JSONL append and resume.

Every measurement is one :class:`Task` (an experiment name, its parameters and a thunk). The
:class:`Harness` runs tasks under one rich progress bar and appends each result to ``results.jsonl``
as soon as it exists (write, flush, fsync), so a killed run loses at most the measurement in flight.
With ``resume=True`` a task whose key (experiment + canonical parameters) is already in the file is
skipped, so a resumed run ends with every measurement exactly once.

The record schema is documented in ``docs/report.md`` and checked by :func:`validate_record`.

Timing follows the usual benchmark rules (DESIGN rule 7): the callable is warmed up first (numba JIT
compilation and first-touch allocation are excluded), its output is compared with the dense reference
*before* timing (a mismatch becomes an ``error`` record and is not timed), and the reported figure is
the median with the interquartile range over repeats.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sparsecnn._paths import check_output_dir
from sparsecnn.errors import SparseCNNError

__all__ = [
    "SCHEMA_VERSION",
    "Harness",
    "Outcome",
    "ResultsLog",
    "Task",
    "Timing",
    "VerificationError",
    "capture_environment",
    "check_close",
    "measurement_key",
    "read_records",
    "set_threads",
    "time_call",
    "time_paired",
    "validate_record",
]

# Bumped when a field changes meaning; readers refuse records of another version.
SCHEMA_VERSION = 1

# Record types in results.jsonl.
ENV = "env"
MEASUREMENT = "measurement"
STATUSES = ("ok", "error")


class VerificationError(SparseCNNError):
    """A strategy's output differs from the dense reference; the measurement is recorded as an error."""


# --------------------------------------------------------------------------------------------------
# timing


@dataclass(frozen=True)
class Timing:
    """Seconds per call over ``repeats`` samples; each sample averages ``inner`` back-to-back calls."""

    median_s: float
    q1_s: float
    q3_s: float
    min_s: float
    max_s: float
    repeats: int
    inner: int  # calls per sample, so that a sample of a tiny call is long enough for the clock
    warmup: int  # untimed calls before the first sample (JIT compile, caches, first-touch pages)

    @property
    def iqr_s(self) -> float:
        return self.q3_s - self.q1_s

    def to_dict(self) -> dict[str, float | int]:
        d = asdict(self)
        d["iqr_s"] = self.iqr_s
        return d


def _quartiles(samples: list[float]) -> tuple[float, float, float]:
    if len(samples) == 1:
        return samples[0], samples[0], samples[0]
    q = statistics.quantiles(samples, n=4, method="inclusive")
    return q[0], statistics.median(samples), q[2]


def time_call(
    fn: Callable[[], object],
    *,
    repeats: int = 7,
    warmup: int = 1,
    min_sample_s: float = 2e-3,
    max_total_s: float = 10.0,
    sync: Callable[[], None] | None = None,
) -> Timing:
    """Time ``fn()``: warm up, then ``repeats`` samples; return median and quartiles per call.

    Parameters
    ----------
    fn : callable
        Called with no arguments; its result is ignored.
    repeats : int
        Samples to take (fewer if ``max_total_s`` runs out, but always at least 3 when ``repeats >= 3``).
    warmup : int
        Untimed calls first; the first call of a numba kernel compiles it.
    min_sample_s : float
        A call shorter than this is repeated ``inner`` times per sample, so the clock resolution
        and the Python call overhead of the loop do not dominate.
    max_total_s : float
        Stop sampling once this much time has gone (a slow strategy at a large size would otherwise
        take minutes); the number of samples actually taken is recorded.
    sync : callable, optional
        Called after each sample's calls (``torch.cuda.synchronize`` on a GPU).
    """
    return _round_robin([fn], repeats, warmup, min_sample_s, max_total_s, sync)[0]


def time_paired(
    fn: Callable[[], object],
    other: Callable[[], object],
    *,
    repeats: int = 7,
    warmup: int = 1,
    min_sample_s: float = 2e-3,
    max_total_s: float = 10.0,
    sync: Callable[[], None] | None = None,
) -> tuple[Timing, Timing]:
    """Time ``fn()`` and ``other()`` in alternating samples (as :func:`time_call` times one): a spell
    of the machine (a VM's speed can swing 1.5x within minutes) slows both alike, so the ratio of the
    two medians holds where two separate timings taken minutes apart do not. ``max_total_s`` bounds
    the two together."""
    first, second = _round_robin([fn, other], repeats, warmup, min_sample_s, max_total_s, sync)
    return first, second


def _round_robin(fns: list[Callable[[], object]], repeats: int, warmup: int, min_sample_s: float,
                 max_total_s: float, sync: Callable[[], None] | None) -> list[Timing]:
    """:func:`time_call`'s samples for each of ``fns``, one sample of each in turn."""
    if repeats < 1:
        raise SparseCNNError(f"repeats must be >= 1, got {repeats}")
    done = sync or (lambda: None)
    inner = [_calls_per_sample(f, warmup, min_sample_s, done) for f in fns]
    samples: list[list[float]] = [[] for _ in fns]
    start = time.perf_counter()
    floor = min(3, repeats)
    for _ in range(repeats):
        for i, f in enumerate(fns):
            samples[i].append(_sample(f, inner[i], done))
        if len(samples[0]) >= floor and time.perf_counter() - start > max_total_s:
            break
    return [_timing(s, n, warmup) for s, n in zip(samples, inner, strict=True)]


def _calls_per_sample(fn: Callable[[], object], warmup: int, min_sample_s: float,
                      done: Callable[[], None]) -> int:
    """Warm ``fn`` up, then time one more call: the calls that make a sample of at least
    ``min_sample_s``."""
    for _ in range(max(warmup, 0)):
        fn()
    done()
    t0 = time.perf_counter()
    fn()
    done()
    one = time.perf_counter() - t0
    return 1 if one >= min_sample_s else min(1000, max(1, math.ceil(min_sample_s / max(one, 1e-9))))


def _sample(fn: Callable[[], object], inner: int, done: Callable[[], None]) -> float:
    """Seconds per call of ``inner`` calls of ``fn``."""
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    done()
    return (time.perf_counter() - t0) / inner


def _timing(samples: list[float], inner: int, warmup: int) -> Timing:
    q1, med, q3 = _quartiles(samples)
    return Timing(
        median_s=med,
        q1_s=q1,
        q3_s=q3,
        min_s=min(samples),
        max_s=max(samples),
        repeats=len(samples),
        inner=inner,
        warmup=max(warmup, 0),
    )


# Bytes read before each call of time_cold: well above the last-level cache of the machines this
# project measures on (32 MB L3 on the 2-core Zen 4 VM).
EVICT_BYTES = 96 << 20
_evict: np.ndarray | None = None


def time_cold(fns: list[Callable[[], object]], *, repeats: int = 15,
              evict_bytes: int = EVICT_BYTES) -> list[float]:
    """Median seconds of one call of each fn with cold caches, timed interleaved.

    Before every timed call, ``evict_bytes`` of an unrelated buffer are read (untimed), which evicts
    the callee's data from every cache level: what a layer meets in a forward pass whose other
    layers stream more than the last-level cache holds (AlexNet's FC weights alone). Each fn is
    called once untimed first (numba compiles on the first call).

    Parameters
    ----------
    fns : list of callable
        Called with no arguments; results ignored.
    repeats : int
        Timed calls of each fn, taken in turns (fn 0, fn 1, ..., fn 0, ...).
    evict_bytes : int
        Size of the eviction read.
    """
    global _evict
    if repeats < 1:
        raise SparseCNNError(f"repeats must be >= 1, got {repeats}")
    n = max(1, evict_bytes // 4)
    if _evict is None or _evict.size != n:
        _evict = np.ones(n, np.float32)
    for fn in fns:
        fn()
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            float(_evict.sum())
            t0 = time.perf_counter()
            fn()
            samples[i].append(time.perf_counter() - t0)
    return [statistics.median(s) for s in samples]


def check_close(out: Any, ref: Any, *, rtol: float = 1e-4, what: str = "output") -> float:
    """Compare ``out`` with the dense reference ``ref``; return the normalised max error.

    The error is ``max|out - ref| / max|ref|`` (fp32 sums over thousands of terms reassociate, so an
    element-wise relative test would fail on values near zero that are right to the last bit that
    matters).

    Raises
    ------
    VerificationError
        On a shape mismatch, a NaN/Inf, or an error above ``rtol``.
    """
    o = _as_array(out)
    r = _as_array(ref)
    if o.shape != r.shape:
        raise VerificationError(f"{what}: shape {o.shape} differs from the dense reference's {r.shape}")
    if not np.isfinite(o).all():
        raise VerificationError(f"{what}: contains NaN/Inf where the dense reference is finite")
    scale = float(np.abs(r).max()) if r.size else 0.0
    err = float(np.abs(o.astype(np.float64) - r.astype(np.float64)).max()) if r.size else 0.0
    rel = err / scale if scale > 0 else err
    if rel > rtol:
        raise VerificationError(
            f"{what}: max |out - dense| / max |dense| = {rel:.2e} exceeds {rtol:.0e}; the strategy's "
            "result is wrong, so it was not timed"
        )
    return rel


def _as_array(a: Any) -> np.ndarray:
    if hasattr(a, "toarray"):  # scipy.sparse
        a = a.toarray()
    if hasattr(a, "to_dense") and getattr(a, "layout", None) is not None and "sparse" in str(a.layout):
        a = a.to_dense()
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def set_threads(threads: int | None) -> int:
    """Fix the thread count of torch (intra-op) and numba; return the count in force.

    ``None`` means all cores this process may use. numba cannot go above the ``NUMBA_NUM_THREADS``
    its pool was started with, so the count is clipped to that.
    """
    n = _usable_cores() if threads is None else threads
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise SparseCNNError(f"threads must be >= 1, got {threads}")
    import numba
    import torch

    torch.set_num_threads(n)
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    return n


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# --------------------------------------------------------------------------------------------------
# environment


_SIMD_FLAG = re.compile(r"^(sse4_[12]|avx|avx2|fma|f16c|avx512\w*|amx\w*|avx_vnni\w*|neon|asimd\w*|sve\w*)$")


def _cpuinfo() -> tuple[str, list[str]]:
    model, flags = platform.processor() or platform.machine(), []
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = value.split()
    return model, flags


def _blas_info() -> dict[str, str]:
    info: dict[str, str] = {}
    try:
        cfg = np.show_config(mode="dicts")
        blas = cfg.get("Build Dependencies", {}).get("blas", {})
        info["numpy"] = f"{blas.get('name', '?')} {blas.get('version', '')}".strip()
    except (TypeError, AttributeError, KeyError):  # numpy < 1.26 has no mode="dicts"
        info["numpy"] = "unknown"
    import torch

    text = torch.__config__.show()
    m = re.search(r"BLAS_INFO=(\w+)", text)
    parts = [m.group(1) if m else "unknown"]
    for pattern in (r"Math Kernel Library Version ([\w.\-]+)", r"MKL-DNN (v[\d.]+)", r"OpenBLAS ([\d.]+)"):
        mm = re.search(pattern, text)
        if mm:
            parts.append(mm.group(0))
    cap = re.search(r"CPU capability usage: (\w+)", text)
    if cap:
        parts.append(f"CPU capability {cap.group(1)}")
    info["torch"] = "; ".join(parts)
    return info


def capture_environment(device: str = "cpu") -> dict[str, Any]:
    """What a reader needs to judge a number: CPU, cores, threads, library versions, BLAS, GPU.

    Returns a JSON-serialisable dict; ``cpu_flags`` is the full flag list and ``simd`` the vector
    extensions among them.
    """
    import numba
    import scipy
    import torch

    import sparsecnn

    model, flags = _cpuinfo()
    versions = {
        "python": platform.python_version(),
        "sparsecnn": sparsecnn.__version__,
        "torch": torch.__version__,
        "numba": numba.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
    }
    try:
        import onnxruntime

        versions["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        versions["onnxruntime"] = None
    gpu = None
    if device.startswith("cuda") and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(torch.device(device))
        versions["cuda"] = torch.version.cuda
    return {
        "cpu_model": model,
        "cpu_flags": flags,
        "simd": [f for f in flags if _SIMD_FLAG.match(f)],
        "machine": platform.machine(),
        "os": f"{platform.system()} {platform.release()}",
        "cores": os.cpu_count(),
        "usable_cores": _usable_cores(),
        "torch_threads": torch.get_num_threads(),
        "numba_threads": numba.get_num_threads(),
        "versions": versions,
        "blas": _blas_info(),
        "device": device,
        "gpu": gpu,
        # 1/5/15-minute load when the run started: other processes on the machine skew timings.
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


# Recorded in the env header but not part of its identity: it changes from minute to minute.
_VOLATILE = ("loadavg",)


def environment_id(env: Mapping[str, Any]) -> str:
    """A short stable hash of an environment, which measurement records reference."""
    stable = {k: v for k, v in env.items() if k not in _VOLATILE}
    text = json.dumps(stable, sort_keys=True, separators=(",", ":"))
    return hashlib.sha1(text.encode()).hexdigest()[:12]


# --------------------------------------------------------------------------------------------------
# records and the JSONL log


def _canonical(value: Any) -> Any:
    """Parameters as JSON values that print the same every time (floats rounded to 12 digits)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        f = float(value)
        return round(f, 12) if math.isfinite(f) else str(f)
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    raise SparseCNNError(f"measurement parameter {value!r} ({type(value).__name__}) is not a JSON value")


def measurement_key(experiment: str, params: Mapping[str, Any]) -> str:
    """``experiment|{canonical JSON params}``: what ``--resume`` matches on."""
    return experiment + "|" + json.dumps(_canonical(params), sort_keys=True, separators=(",", ":"))


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


_REQUIRED: dict[str, dict[str, type | tuple[type, ...]]] = {
    ENV: {"schema": int, "type": str, "env_id": str, "time": str, "env": dict},
    MEASUREMENT: {
        "schema": int,
        "type": str,
        "key": str,
        "experiment": str,
        "params": dict,
        "env_id": str,
        "time": str,
        "status": str,
        "metrics": dict,
        "timing": (dict, type(None)),
        "error": (str, type(None)),
        "threads": int,
        "device": str,
    },
}
_ENV_FIELDS = ("cpu_model", "cpu_flags", "cores", "torch_threads", "numba_threads", "versions", "blas")
_TIMING_FIELDS = ("median_s", "q1_s", "q3_s", "iqr_s", "min_s", "max_s", "repeats", "inner", "warmup")


def validate_record(rec: Mapping[str, Any]) -> None:
    """Raise :class:`SparseCNNError` naming the first field of ``rec`` that breaks the schema."""
    if not isinstance(rec, Mapping):
        raise SparseCNNError(f"results record {rec!r:.80} is a {type(rec).__name__}, not a JSON object")
    kind = rec.get("type")
    if kind not in _REQUIRED:
        raise SparseCNNError(f"results record has type {kind!r}; expected one of {sorted(_REQUIRED)}")
    for name, typ in _REQUIRED[kind].items():
        if name not in rec:
            raise SparseCNNError(f"{kind} record lacks field {name!r}: {dict(rec)!r:.200}")
        if not isinstance(rec[name], typ) or (typ is int and isinstance(rec[name], bool)):
            raise SparseCNNError(f"{kind} record field {name!r} = {rec[name]!r:.80} has the wrong type")
    if rec["schema"] != SCHEMA_VERSION:
        raise SparseCNNError(
            f"results record has schema {rec['schema']}, this sparsecnn reads {SCHEMA_VERSION}"
        )
    if kind == ENV:
        missing = [f for f in _ENV_FIELDS if f not in rec["env"]]
        if missing:
            raise SparseCNNError(f"env record lacks {', '.join(missing)}")
        return
    if rec["status"] not in STATUSES:
        raise SparseCNNError(f"measurement status {rec['status']!r} is not one of {STATUSES}")
    if rec["key"] != measurement_key(rec["experiment"], rec["params"]):
        raise SparseCNNError(f"measurement key {rec['key']!r} does not match its experiment and params")
    if rec["status"] == "error" and not rec["error"]:
        raise SparseCNNError(f"error record {rec['key']!r} has no error message")
    if rec["status"] == "ok" and rec["error"] is not None:
        raise SparseCNNError(f"ok record {rec['key']!r} carries an error message")
    if rec["timing"] is not None:
        missing = [f for f in _TIMING_FIELDS if f not in rec["timing"]]
        if missing:
            raise SparseCNNError(f"timing of {rec['key']!r} lacks {', '.join(missing)}")


def read_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All complete records of a results file; a partial last line (a run killed mid-write) is ignored.

    Raises
    ------
    SparseCNNError
        If the file is missing, or a line other than the last is not JSON, or a line is JSON but
        not an object.
    """
    return [rec for _, rec in _numbered_records(Path(path))]


def _numbered_records(p: Path) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, record)`` of every complete record of ``p``, as :func:`read_records` reads them."""
    if not p.exists():
        raise SparseCNNError(f"results file {p} does not exist; run `sparsecnn report` to make it")
    records: list[tuple[int, dict[str, Any]]] = []
    lines = p.read_text(encoding="utf-8").split("\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            if i == len(lines) - 1:  # no trailing newline: the write was cut off
                break
            raise SparseCNNError(
                f"{p}:{i + 1} is not a JSON record ({exc.msg}); the file is corrupt"
            ) from exc
        if not isinstance(rec, dict):
            raise SparseCNNError(
                f"{p}:{i + 1} is not a JSON record (a {type(rec).__name__}); the file is corrupt"
            )
        records.append((i + 1, rec))
    return records


class ResultsLog:
    """Append-only JSONL results file.

    Parameters
    ----------
    path : path-like
        The file; its directory is created.
    resume : bool
        Keep the records already there (dropping a partial last line) and report their keys as done.
        Without ``resume`` an existing file is replaced.

    Raises
    ------
    SparseCNNError
        If ``path`` is a folder, lies under a file or cannot be written, or (with ``resume``) a line
        of the file is not a valid record.
    """

    def __init__(self, path: str | os.PathLike[str], *, resume: bool = False) -> None:
        self.path = Path(path)
        self._make_folder()
        self.records: list[dict[str, Any]] = []
        if resume and self.path.exists():
            # drop a torn last line first (a run killed mid-append): read after, so that a line that is
            # JSON but lacks its newline is not kept in memory while cut from the file
            self._truncate_partial_tail()
            self.records = self._read_for_resume()
        else:
            try:
                self.path.write_text("", encoding="utf-8")
            except OSError as exc:
                raise SparseCNNError(
                    f"cannot write results file {self.path} ({exc.strerror}); choose another path"
                ) from None
        self._by_key = {r["key"]: r for r in self.records if r.get("type") == MEASUREMENT}

    def _make_folder(self) -> None:
        """Create the file's folder, refusing a path that is a folder or lies under a file."""
        if self.path.is_dir():
            raise SparseCNNError(
                f"results file {self.path} is a folder; give a file path, e.g. {self.path / 'results.jsonl'}"
            )
        check_output_dir(f"results file {self.path}: folder", self.path.parent)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SparseCNNError(
                f"cannot create the folder of results file {self.path} ({exc.strerror}); choose another path"
            ) from None

    def _read_for_resume(self) -> list[dict[str, Any]]:
        """The records of the file, each checked against the schema: resuming reuses them as results."""
        remedy = "delete the file, or run without --resume to replace it"
        try:
            numbered = _numbered_records(self.path)
        except SparseCNNError as exc:
            raise SparseCNNError(f"cannot resume: {exc}; {remedy}") from None
        for line, rec in numbered:
            try:
                validate_record(rec)
            except SparseCNNError as exc:
                raise SparseCNNError(f"cannot resume: {self.path}:{line}: {exc}; {remedy}") from None
        return [rec for _, rec in numbered]

    def _truncate_partial_tail(self) -> None:
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end != len(data):
            with open(self.path, "r+b") as fh:
                fh.truncate(end)

    def has(self, key: str) -> bool:
        return key in self._by_key

    def get(self, key: str) -> dict[str, Any] | None:
        return self._by_key.get(key)

    def measurements(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("type") == MEASUREMENT]

    def append(self, record: Mapping[str, Any]) -> None:
        """Validate, write one line, flush and fsync: once this returns the record survives a kill."""
        validate_record(record)
        line = json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n"
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
        self.records.append(dict(record))
        if record["type"] == MEASUREMENT:
            self._by_key[record["key"]] = dict(record)

    def write_env(self, env: Mapping[str, Any]) -> str:
        """Append an env header unless an identical one is already in the file; return its id."""
        eid = environment_id(env)
        if not any(r.get("type") == ENV and r.get("env_id") == eid for r in self.records):
            self.append(
                {"schema": SCHEMA_VERSION, "type": ENV, "env_id": eid, "time": _now(), "env": dict(env)}
            )
        return eid


# --------------------------------------------------------------------------------------------------
# tasks and the harness


@dataclass(frozen=True)
class Outcome:
    """What a task returns: its numbers, and the timing when it timed something."""

    metrics: dict[str, Any] = field(default_factory=dict)
    timing: Timing | None = None


@dataclass(frozen=True)
class Task:
    """One measurement: ``run()`` does the work (verify, then time) and returns an :class:`Outcome`."""

    experiment: str
    params: dict[str, Any]
    run: Callable[[], Outcome]
    label: str = ""  # shown beside the progress bar

    @property
    def key(self) -> str:
        return measurement_key(self.experiment, self.params)


def _json_safe(value: Any) -> Any:
    if isinstance(value, Timing):
        return value.to_dict()
    if isinstance(value, (np.floating, float)):
        f = float(value)
        return f if math.isfinite(f) else None
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


class Harness:
    """Runs tasks, one progress bar over all of them, appending each result to a :class:`ResultsLog`.

    Parameters
    ----------
    log : ResultsLog
    threads : int, optional
        Thread count for torch and numba (default: all usable cores); fixed before the first task.
    device : str
        ``"cpu"`` or ``"cuda"``; recorded in every measurement and the environment.
    progress : bool
        Show the rich progress bar (on stderr).
    """

    def __init__(
        self, log: ResultsLog, *, threads: int | None = None, device: str = "cpu", progress: bool = True
    ) -> None:
        self.log = log
        self.device = device
        self.threads = set_threads(threads)
        self.env = capture_environment(device)
        self.env_id = log.write_env(self.env)
        self.progress = progress

    def record(self, task: Task, outcome: Outcome | None, error: str | None) -> dict[str, Any]:
        rec = {
            "schema": SCHEMA_VERSION,
            "type": MEASUREMENT,
            "key": task.key,
            "experiment": task.experiment,
            "params": _canonical(task.params),
            "env_id": self.env_id,
            "time": _now(),
            "status": "error" if error else "ok",
            "error": error,
            "metrics": _json_safe(outcome.metrics) if outcome else {},
            "timing": outcome.timing.to_dict() if outcome and outcome.timing else None,
            "threads": self.threads,
            "device": self.device,
        }
        self.log.append(rec)
        return rec

    def run_one(self, task: Task) -> dict[str, Any]:
        """Run ``task`` unless its key is already logged; errors become ``error`` records."""
        done = self.log.get(task.key)
        if done is not None:
            return done
        try:
            outcome = task.run()
        except (
            SparseCNNError,
            ArithmeticError,
            RuntimeError,
            ValueError,
            TypeError,
            MemoryError,
            OSError,
            NotImplementedError,
            ImportError,
        ) as exc:
            # Recorded, not raised: one failing strategy must not end a 20-minute run.
            return self.record(task, None, f"{type(exc).__name__}: {exc}"[:2000])
        return self.record(task, outcome, None)

    def run(self, tasks: Iterable[Task], *, title: str = "measuring") -> list[dict[str, Any]]:
        """Run every task in order; return their records (fresh or from the log)."""
        tasks = list(tasks)
        seen: set[str] = set()
        for t in tasks:
            if t.key in seen:
                raise SparseCNNError(f"two tasks share the key {t.key!r}; give them distinct params")
            seen.add(t.key)
        out: list[dict[str, Any]] = []
        with self._bar(len(tasks), title) as step:
            for t in tasks:
                step(t.label or t.experiment, 0)
                out.append(self.run_one(t))
                step("", 1)
        return out

    @contextlib.contextmanager
    def _bar(self, total: int, title: str) -> Iterator[Callable[[str, int], None]]:
        if not self.progress:
            yield lambda _label, _n: None
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        console = Console(stderr=True)
        with Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[label]}"),
            console=console,
            transient=False,
            disable=not console.is_terminal,
        ) as bar:
            tid = bar.add_task(title, total=total, label="")

            def step(label: str, n: int) -> None:
                bar.update(tid, advance=n, label=label)

            yield step
        if not console.is_terminal:
            print(f"{title}: {total} measurements done", file=sys.stderr)
