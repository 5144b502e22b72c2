# The two commands: `make test` (whole suite) and `make demo` (the guarded demo).
# Each creates .venv and installs what it needs on first use; later runs only reinstall
# when pyproject.toml or TORCH_SPEC changed (the stamp file records both).
PYTHON ?= python3
VENV ?= .venv
# The single place the torch pin lives. Override: make test TORCH_SPEC='torch==2.14.1'
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.gradguard-installed
SPEC_FILE := $(VENV)/.torch-spec
# the suite in one worker process per core (pytest-xdist; at most 4: each worker holds torch and Lightning in memory);
# tests of one module or class stay in one worker, so an expensive module fixture is built once. Serial: PYTEST_ARGS=
PYTEST_ARGS ?= -n auto --maxprocesses=4 --dist loadscope

.PHONY: install test demo demo-check bench bench-full lint docs wheel-check pictures clean FORCE

# Rewrite the spec file only when the spec changes, so make sees a new mtime only then.
$(SPEC_FILE): FORCE
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo '$(TORCH_SPEC)' | cmp -s - $@ || echo '$(TORCH_SPEC)' > $@

$(STAMP): pyproject.toml $(SPEC_FILE)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: an unpinned torch would pull the multi-GB CUDA build.
	$(PY) -m pip install -q '$(TORCH_SPEC)'
	$(PY) -m pip install -q -e '.[dev,examples]' '$(TORCH_SPEC)'
	@touch $@

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/gradguard demo

# the demo's story in every mode (lstm/cnn, default and --quick, unguarded and guarded) on seeds 0, 1, 2 under three
# CPU kernel paths (native, ONEDNN_MAX_CPU_ISA=AVX2, ONEDNN_MAX_CPU_ISA=SSE41), every cell with its margin (slow);
# options: make demo-check DEMO_CHECK_ARGS='--jobs 2 --json out.json'
DEMO_CHECK_ARGS ?=
demo-check: $(STAMP)
	$(PY) tools/demo_check.py $(DEMO_CHECK_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/overhead.py --quick
	$(PY) benchmarks/rescue.py --quick

bench-full: $(STAMP)
	$(PY) benchmarks/overhead.py
	$(PY) benchmarks/rescue.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check lightning_gradguard tests benchmarks examples
	$(VENV)/bin/mypy lightning_gradguard

# API reference from the docstrings (pdoc, Google style) into build/docs/api; any warning fails the target.
docs: $(STAMP)
	$(PY) docs/api/build.py --out build/docs/api

# The README's TensorBoard pictures from today's demo (runs it; headless Chromium, apt-get install chromium), written
# to build/pictures; the README's own: make pictures PICTURES_OUT=docs/images (tests/test_readme_pictures.py checks
# each picture's stamp against the sources it shows)
PICTURES_OUT ?= build/pictures
pictures: $(STAMP)
	$(PY) tools/tensorboard_screenshots.py --out $(PICTURES_OUT)

# Build sdist + wheel from a copy of the tree, install the wheel into a fresh venv, import every module and fit.
wheel-check: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests/test_packaging.py

clean:
	rm -rf $(VENV) lightning_logs gradguard_logs .pytest_cache
