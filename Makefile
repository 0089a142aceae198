# Every target creates .venv if it is missing and installs what it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
JOBS ?= 2

.PHONY: help venv test test-slow lint demo bench clean

help:
	@echo "make demo       set up and run the main job (MX training study on Shakespeare)"
	@echo "make test       set up and run the default test suite"
	@echo "make test-slow  run the slow studies (training to convergence, accuracy)"
	@echo "make bench      run the benchmarks in benchmarks/"
	@echo "make lint       ruff check + format check"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[train,dev]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n $(JOBS) -m "not slow" jaxmx tests

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

demo: $(STAMP)
	$(PY) examples/format_tour.py

bench: $(STAMP)
	$(PY) benchmarks/quantize.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
