#!/usr/bin/env bash
# The checks a session runs when the device tool lends it a GPU, in one call of at most
# 575 seconds (the steps' limits) (a session has 15 minutes of device time, every start and try counted).
#
#   here, first:  bash scripts/device_check.sh prepare
#   then:         run(command="bash scripts/device_check.sh", carry=[".device"], timeout_s=600)
#
# The lent machine reaches no registry: its image's python3 holds torch, triton,
# transformers, peft and pytest, but not flask (so no API tests there), and the embedded
# model cannot be fetched: `prepare` copies its config and tokenizer (not its weights)
# into .device/, and the machine builds a random model of that shape from them. Each
# step writes $OUT/<step>.txt (what comes back), is cut at its own time limit, and does
# not stop the ones after it. BENCHMARKS.md is where the figures go, with the card named.
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SHAPE_DIR="$ROOT/.device/default-model-shape"

if [ "${1:-}" = "prepare" ]; then
    MODEL="$("$ROOT/.venv/bin/python" -c 'from engine.models.default_model import fetch_default_model as f; print(f(log=lambda *_: None))')"
    mkdir -p "$SHAPE_DIR"
    for name in config.json generation_config.json tokenizer.json tokenizer_config.json \
                chat_template.jinja; do
        [ -f "$MODEL/$name" ] && cp "$MODEL/$name" "$SHAPE_DIR/"
    done
    du -sh "$ROOT/.device"
    exit 0
fi

OUT="${OUT:-/tmp/pokeserve-device}"
mkdir -p "$OUT"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
# A smoke run on a machine without a GPU: DEVICE=cpu DECODE_SHAPE=tiny PYTHON=.venv/bin/python
DEVICE="${DEVICE:-cuda}"
DECODE_SHAPE="${DECODE_SHAPE:-llama-3.1-8b}"

step() {   # step NAME SECONDS COMMAND...: run it, keep its output, say how it ended
    local name=$1 seconds=$2
    shift 2
    timeout "$seconds" "$@" >"$OUT/$name.txt" 2>&1
    echo "rc=$?" >>"$OUT/$name.txt"
    echo "== $name: $(tail -1 "$OUT/$name.txt")"
}

step gpu 20 nvidia-smi
step kernels 180 "$PY" -m pytest -q tests/kernels -p no:cacheprovider
step bench_sampling 60 "$PY" scripts/bench_sampling.py
step bench_decode 100 "$PY" scripts/bench_decode.py --device "$DEVICE" --shape "$DECODE_SHAPE" \
    --batches 1 64
step bench_mxfp4 45 "$PY" scripts/bench_mxfp4.py --device "$DEVICE"
step random_model 30 "$PY" scripts/random_model.py "$SHAPE_DIR" /tmp/default-model-random
step bench_lora_step 60 "$PY" scripts/bench_lora_step.py --device "$DEVICE" \
    --model /tmp/default-model-random
step bench_engine 80 "$PY" scripts/bench_engine.py --device "$DEVICE" --dtypes bfloat16 \
    --cores inline --model /tmp/default-model-random
tail -n 30 "$OUT"/*.txt
