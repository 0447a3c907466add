#!/usr/bin/env bash
# Shared set-up for scripts/test.sh and scripts/serve.sh: a .venv in the repository
# with pokeserve and its dev extra installed. Idempotent: a second run only checks.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "pokeserve: creating $VENV" >&2
    "$PY" -m venv "$VENV"
fi
# Reinstall only when pyproject.toml changed since the last install.
STAMP="$VENV/.pokeserve-installed"
if [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ]; then
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
    if ! command -v nvidia-smi >/dev/null 2>&1; then
        # No CUDA here: pin the CPU build (an unpinned torch pulls a multi-GB CUDA build).
        "$VENV/bin/python" -m pip install -q --disable-pip-version-check "torch==2.13.0"
    fi
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$ROOT[dev]"
    touch "$STAMP"
fi
