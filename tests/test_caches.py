"""Caches and the package namespace: numba's kernel cache keyed by every kernel source, the plan cache
under two processes at once, and every submodule reachable as an attribute of ``sparsecnn``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import sparsecnn

SRC = Path(sparsecnn.__file__).resolve().parent

SUBMODULES = ("models", "analysis", "prune", "formats", "io", "bench", "report", "train", "data", "kernels",
              "plan", "ops", "layers", "errors", "engine", "shrink")


def test_submodules_are_attributes_and_import_stays_cheap() -> None:
    names = ",".join(repr(n) for n in SUBMODULES)
    code = textwrap.dedent(f"""
        import sys, sparsecnn
        assert 'numba' not in sys.modules and 'torch' not in sys.modules
        assert set(({names})) <= set(dir(sparsecnn))
        mods = {{n: getattr(sparsecnn, n) for n in ({names})}}
        assert all(m.__name__ == 'sparsecnn.' + n for n, m in mods.items())
        sparsecnn.models.build('lenet5')
        try:
            sparsecnn.nonexistent
        except AttributeError as e:
            assert 'nonexistent' in str(e)
        else:
            raise SystemExit('no AttributeError')
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --------------------------------------------------------------------------------------------------
# numba's cache: keyed by all kernel sources


def test_kernel_source_key_covers_every_kernel_file(tmp_path: Path) -> None:
    from sparsecnn.kernels._numba import kernel_source_key

    d = tmp_path / "k"
    d.mkdir()
    (d / "a.py").write_text("x = 1\n")
    (d / "_helper.py").write_text("y = 2\n")
    k0 = kernel_source_key.__wrapped__(str(d))
    assert k0 == kernel_source_key.__wrapped__(str(d))  # deterministic
    (d / "_helper.py").write_text("y = 3\n")
    k1 = kernel_source_key.__wrapped__(str(d))
    assert k1 != k0
    (d / "b.py").write_text("")
    assert kernel_source_key.__wrapped__(str(d)) not in (k0, k1)  # a new module counts too
    (d / "notes.txt").write_text("not a source")
    assert len(kernel_source_key()) == 16 and kernel_source_key() == kernel_source_key.__wrapped__(None)


_PROBE = """
import sys
from sparsecnn.kernels import probe
assert probe.__file__.startswith(sys.argv[1]), probe.__file__
print(probe.f(), sum(probe.f.stats.cache_hits.values()))
"""


def _probe(pkg_root: Path, numba_dir: Path | None = None) -> tuple[float, bool]:
    """``(f(), whether f came from the disk cache)`` in a fresh process."""
    env = {**os.environ, "PYTHONPATH": str(pkg_root), "NUMBA_DISABLE_JIT": "0"}
    env.pop("NUMBA_CACHE_DIR", None)
    if numba_dir is not None:
        env["NUMBA_CACHE_DIR"] = str(numba_dir)
    out = subprocess.run([sys.executable, "-c", _PROBE, str(pkg_root)], env=env, check=True,
                         capture_output=True, text=True, timeout=300).stdout.split()
    return float(out[0]), int(out[1]) > 0


@pytest.mark.parametrize("user_dir", [False, True], ids=["in-tree", "NUMBA_CACHE_DIR"])
def test_editing_an_inlined_helper_recompiles_its_callers(tmp_path: Path, user_dir: bool) -> None:
    """A kernel in ``probe.py`` inlines a function of ``_probe_helper.py``; only the helper is edited.
    numba's own per-file stamp would load the stale machine code (the first value again)."""
    root = tmp_path / "pkg"
    (root / "sparsecnn" / "kernels").mkdir(parents=True)
    (root / "sparsecnn" / "__init__.py").write_text("")
    (root / "sparsecnn" / "kernels" / "_numba.py").write_bytes((SRC / "kernels" / "_numba.py").read_bytes())
    kern = root / "sparsecnn" / "kernels"
    (kern / "_probe_helper.py").write_text(textwrap.dedent("""
        from sparsecnn.kernels._numba import jit

        @jit(inline="always")
        def value():
            return 1.0
    """))
    (kern / "probe.py").write_text(textwrap.dedent("""
        from sparsecnn.kernels._numba import jit
        from sparsecnn.kernels._probe_helper import value

        @jit
        def f():
            return value() + 0.5
    """))
    numba_dir = tmp_path / "numba-cache" if user_dir else None
    assert _probe(root, numba_dir) == (1.5, False)  # compiled
    assert _probe(root, numba_dir) == (1.5, True)  # loaded from the disk cache
    (kern / "_probe_helper.py").write_text((kern / "_probe_helper.py").read_text().replace("1.0", "2.0"))
    assert _probe(root, numba_dir) == (2.5, False)  # recompiled, not the stale 1.5
    assert _probe(root, numba_dir) == (2.5, True)
    base = numba_dir if user_dir else kern / "__pycache__"
    keyed = [p for p in base.rglob("k*") if p.is_dir() and len(p.name) == 17]  # k + 16 hex digits
    assert len(keyed) == 2  # one folder per source version


# --------------------------------------------------------------------------------------------------
# plan cache


_WRITER = """
import sys, warnings
from pathlib import Path
from sparsecnn import plan
warnings.simplefilter("error")  # an unreadable cache (a torn file seen by a reader) fails the run
path, tag, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
for i in range(n):
    entry = {"strategy": "csrmm", "times_s": {"torch": 1e-3, "csrmm": i * 1e-6}}
    plan._write_cache(path, {f"{tag}{i}": entry})
    assert f"{tag}{i}" in plan._read_cache(path)
"""


def test_plan_cache_two_processes_lose_nothing(tmp_path: Path) -> None:
    from sparsecnn import plan

    path = tmp_path / "cache" / "plans.json"
    n = 150
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(path), tag, str(n)], stderr=subprocess.PIPE,
                              text=True) for tag in ("a", "b")]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    raw = json.loads(path.read_text())
    assert raw["version"] == plan._CACHE_VERSION
    assert set(raw["entries"]) == {f"{t}{i}" for t in "ab" for i in range(n)}
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_plan_cache_malformed_is_dropped_with_a_warning(tmp_path: Path) -> None:
    from sparsecnn import plan

    path = tmp_path / "plans.json"
    plan._write_cache(path, {"k": {"strategy": "csrmm", "times_s": {"torch": 1.0}}})
    assert plan._read_cache(path) == {"k": {"strategy": "csrmm", "times_s": {"torch": 1.0}}}
    v = plan._CACHE_VERSION  # malformed entries in a cache of the current version
    for bad in ('{"version": V, "entries": {"k": {"strategy": 1}}}',
                '{"version": V, "entries": {"k": {"strategy": "x", "times_s": {"t": "fast"}}}}',
                '{"version": V, "entries": {"k": {"strategy": "x", "times_s": []}}}',
                "[1, 2]", "[" * 100000, '{"version": V, "entr'):
        path.write_text(bad.replace("V", str(v)))
        with pytest.warns(UserWarning, match="unreadable"):
            assert plan._read_cache(path) == {}


def test_plan_save_is_atomic(tmp_path: Path) -> None:
    from sparsecnn.plan import LayerChoice, Plan

    p = Plan({"fc": LayerChoice("csrmm", "given")})
    path = tmp_path / "plan.json"
    p.save(path)
    assert Plan.load(path) == p
    assert sorted(x.name for x in tmp_path.iterdir()) == ["plan.json"]
    path.write_text("[" * 100000)
    with pytest.raises(sparsecnn.SparseCNNError, match="not a sparsecnn plan"):
        Plan.load(path)

