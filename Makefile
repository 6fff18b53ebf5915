# `make demo` and `make test` both bootstrap .venv on first use (offline except for the package registries).
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test bench gpu-check venv compile clean

venv: $(STAMP)

# torch is pinned through constraints.txt: only the local CPU wheel satisfies it; a looser spec would pull
# a multi-GB CUDA build.
$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (ppcl needs Python 3.11)"; exit 2; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/ppcl demo

# One pytest worker per core (pytest-xdist), whole files per worker so a module's fixtures are built once:
# 16.6 -> 10.0 min on a 2-core machine like CI's (docs/DEVELOPING.md, "Tests").
test: $(STAMP)
	$(BIN)/python -m pytest -q -n auto --dist loadfile --durations=15

# Benchmarks marked `slow`: run on request, never in CI.
bench: $(STAMP)
	$(BIN)/python -m pytest -q -m slow -s

# The GPU check of issue 15 (docs/resources.md): one CUDA GPU of >= 80 GB, < 8 min, no download. Needs a CUDA
# build of torch in the venv (refused in one line otherwise); writes ppcl-bench/gpu/gpu_check.{json,md}.
gpu-check: $(STAMP)
	$(BIN)/ppcl bench gpu --device cuda --out ppcl-bench/gpu

compile: $(STAMP)
	$(BIN)/ppcl pipeline compile

clean:
	rm -rf $(VENV) ppcl-runs .pytest_cache
