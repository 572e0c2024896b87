#!/usr/bin/env bash
# The linter (ruff, configured in pyproject.toml) in its own small venv, pinned and cached beside the
# project's: it needs none of the project's dependencies, and changing it rebuilds nothing else.
set -euo pipefail
cd "$(dirname "$0")/.."
RUFF_VERSION=0.17.5
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
VENV=${SEGREPORT_VENV_CACHE:-$HOME/.cache/segreport}/ruff-$RUFF_VERSION
if [ ! -x "$VENV/bin/ruff" ]; then
    rm -rf "$VENV"
    "$PY" -m venv "$VENV"
    PIP_CONSTRAINT= "$VENV/bin/pip" install -q --disable-pip-version-check "ruff==$RUFF_VERSION" >&2
fi
"$VENV/bin/ruff" check segreport tests benchmarks scripts
