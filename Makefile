# The two commands a new user needs: `make demo` and `make test`.
# Pick your own torch build with e.g. `make demo TORCH="torch --index-url https://download.pytorch.org/whl/cu124"`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check

.PHONY: demo test bench fuzz test-avx2

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e ".[data]"
	touch $@

$(VENV)/.dev-installed: $(VENV)/.installed
	$(PIP) install -q -e ".[dev]"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/sparsecnn report --quick --out report

test: $(VENV)/.dev-installed
	$(VENV)/bin/ruff check src tests benchmarks
	$(PY) -m pytest -q -n 2

# Not one of the two commands: the performance suite (minutes; prints a table, writes JSON).
bench: $(VENV)/.installed
	$(PY) -m benchmarks

# The long fuzz run: the hypothesis tests (loaders, strategies, formats, generated whole models
# through the executor) with many more examples.
fuzz: $(VENV)/.dev-installed
	$(PY) -m pytest -q -n 2 -m fuzz --hypothesis-profile=fuzz --hypothesis-show-statistics \
		tests/test_fuzz_loaders.py tests/test_properties.py tests/test_fuzz_models.py tests/test_fused_blocks.py
	SPARSECNN_FUZZ=1 $(PY) -m pytest -q -n 2 tests/test_resume.py

# The whole test suite with the kernels compiled for an AVX2 CPU without AVX-512 (16 vector registers,
# so the AVX2 tile sizes), run on this machine (which must have AVX2): what a user of such a CPU gets.
# Minutes: every kernel is compiled again, into numba's cache for that target.
AVX2_FEATURES = $(shell $(PY) -c "import llvmlite.binding as l; \
	print(','.join('-' + f[1:] if 'avx512' in f else f for f in l.get_host_cpu_features().flatten().split(',')))")
test-avx2: $(VENV)/.dev-installed
	@case "$(AVX2_FEATURES)" in *+avx2*) ;; *) echo "test-avx2: this CPU has no AVX2"; exit 2;; esac
	NUMBA_CPU_NAME=haswell NUMBA_CPU_FEATURES="$(AVX2_FEATURES)" $(PY) -m pytest -q -n 2
