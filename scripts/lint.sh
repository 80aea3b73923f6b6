#!/usr/bin/env bash
# Static checks every change must pass: ruff's lint rules and its formatting over the whole tree,
# mypy --strict over the whole kservice package (core/, plugins/, middleware/; see scripts/typecheck.py).
# Usage: scripts/lint.sh   (uses .venv/bin/python, or $PYTHON)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
PATHS=(core plugins middleware tests scripts)

echo "ruff check ${PATHS[*]}"
"$PY" -m ruff check "${PATHS[@]}"

echo "mypy --strict -p kservice (core, plugins, middleware)"
"$PY" scripts/typecheck.py

# `ruff format` (settings in pyproject.toml) is what formats the tree; fix a failure with
# `.venv/bin/python -m ruff format core plugins middleware tests scripts`.
echo "ruff format --check ${PATHS[*]}"
"$PY" -m ruff format --check "${PATHS[@]}"
