# The two commands a new checkout needs: `make demo` and `make test`.
# Both create .venv and install kservice (editable) with every extra the suite uses.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test bench lint clean soak

$(VENV)/.installed: pyproject.toml setup.py plugins/mmap/_ringfast.c
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools>=68" wheel
	$(PY) -m pip install -q -e '.[ray,dev,plot,dashboard,reload]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m kservice.demo

# The suite on TEST_WORKERS pytest-xdist workers; each worker is a test session of its own (its own
# runtime directories), and every test that uses Ray runs on one of them (--dist loadgroup).
TEST_WORKERS ?= 2
test: setup
	bash scripts/lint.sh
	bash scripts/browser.sh
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

bench: setup
	$(PY) -m pip install -q -e '.[bench]' || echo "note: the bench extra did not install; its peers' rows say so"
	$(PY) tests/benchmarks/run_all.py

lint: setup
	bash scripts/lint.sh

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache

# The fault suite as a longer soak (SECONDS per transport), printing its figures.
SECONDS ?= 120
soak: setup
	KSERVICE_FAULT_SOAK=$(SECONDS) $(PY) -m pytest -q -s tests/faults tests/ray/test_ray_fault_suite.py
