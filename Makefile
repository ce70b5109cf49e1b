# Two entry points: `make run` (the main job on the embedded digits data) and `make test`.
# Both create .venv on first use (every pin lives in pyproject.toml) and reuse it afterwards.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test test-fast lint bench

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/cmt-flow --preset digits

# two processes (pytest-xdist), one test file each: module fixtures stay shared, and the suite takes about half the time
test: $(STAMP)
	.ci/system-packages
	$(PY) -m pytest -q -n 2 --dist loadfile

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(PY) -m ruff check .

bench: $(STAMP)
	$(PY) benchmarks/run_all.py
