#!/usr/bin/env bash
# Set up .venv (first run only) and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
# The default model is converted once and cached (POKESERVE_HOME, default ~/.cache/pokeserve).
"$ROOT/.venv/bin/pokeserve" fetch-model >/dev/null
exec "$ROOT/.venv/bin/python" -m pytest "$@"
