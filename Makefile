# The two commands a new checkout needs: `make demo` and `make test`.
# Both create .venv and install kservice (editable) with every extra the suite uses.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test bench lint clean

$(VENV)/.installed: pyproject.toml setup.py plugins/mmap/_ringfast.c
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools>=68" wheel
	$(PY) -m pip install -q -e '.[ray,dev,plot,dashboard,reload]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m kservice.demo

test: setup
	bash scripts/lint.sh
	bash scripts/browser.sh
	$(PY) -m pytest -q

bench: setup
	$(PY) tests/benchmarks/run_all.py

lint: setup
	bash scripts/lint.sh

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
