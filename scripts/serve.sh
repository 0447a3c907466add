#!/usr/bin/env bash
# Set up .venv (first run only), fetch the default model, and serve it on
# http://127.0.0.1:8000/v1. Extra arguments go to `pokeserve serve`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
"$ROOT/.venv/bin/pokeserve" fetch-model >/dev/null
exec "$ROOT/.venv/bin/pokeserve" serve "$@"
