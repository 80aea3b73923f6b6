#!/usr/bin/env bash
# Static checks every change must pass: ruff over the whole tree, mypy --strict over the core.
# Usage: scripts/lint.sh   (uses .venv/bin/python, or $PYTHON)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"

echo "ruff check core plugins middleware tests"
"$PY" -m ruff check core plugins middleware tests

echo "mypy --strict core"
"$PY" -m mypy --strict core
