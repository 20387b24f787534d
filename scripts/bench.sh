#!/usr/bin/env bash
# The inference benchmark: medbox through its gRPC service against Hugging
# Face transformers' generate, same model, same machine, same threads, in one
# run; prints one markdown table with both, their ratio and the targets of
# docs/performance.md.
#
#   scripts/bench.sh [--quick] [--dtype f32,bf16,int8] [--device cpu|cuda]
#                    [--threads 2] [--runs 3] [--out FILE] [--model-key KEY=VALUE]
#
# Uses the medboxd already built (release, $CARGO_TARGET_DIR or
# $MEDBOX_BIN_DIR); it does not build it. See docs/performance.md.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/env.sh
source scripts/env.sh

model="$MEDBOX_CACHE/models/bench-llama-768"
if [ ! -f "$MEDBOX_CACHE/models/tiny/tokenizer.json" ]; then
  scripts/make-tiny-model "$MEDBOX_CACHE/models/tiny"
fi
scripts/make-bench-model "$model"

PYTHONPATH="$PWD/scripts${PYTHONPATH:+:$PYTHONPATH}" exec python -m bench --model "$model" "$@"
