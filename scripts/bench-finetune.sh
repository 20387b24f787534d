#!/usr/bin/env bash
# Fine-tuning benchmark: medbox-trainer against Hugging Face transformers +
# peft (scripts/bench/finetune_reference.py) on the same tiny model, the same
# synthetic lab-flag data and the same hyper-parameters (LoRA r 16, alpha 32,
# dropout 0.05, all linear layers), in one run, one after the other, with
# the same number of CPU threads. Prints a table: training tokens/s (all
# non-padding tokens of the training steps), final train and eval loss, and
# the ratio medbox / reference.
#
#   scripts/bench-finetune.sh [--quick] [--threads N]
#
# Run it on a quiet machine; --quick is a smoke run (a few steps).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
source "$root/scripts/env.sh"
quick=0
threads=$(nproc)
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=1 ;;
    --threads) threads="$2"; shift ;;
    *) echo "usage: $0 [--quick] [--threads N]" >&2; exit 2 ;;
  esac
  shift
done
if [ "$quick" = 1 ]; then train_count=64; epochs=1; else train_count=2000; epochs=3; fi
cd "$root"
cargo build --release -p medbox-finetune --bin medbox-trainer --example lab_task >&2
model="$MEDBOX_CACHE/models/tiny"
python3 scripts/make-tiny-model "$model" >&2
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$CARGO_TARGET_DIR/release/examples/lab_task" 1 "$train_count" > "$work/train.jsonl"
"$CARGO_TARGET_DIR/release/examples/lab_task" 2 64 > "$work/eval.jsonl"
python3 - "$work" "$model" "$epochs" "$train_count" <<'PY'
import json, sys
work, model, epochs, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
spec = {
    "protocol_version": 1, "job_id": "job_bench", "method": "lora",
    "base_model": {"name": "tiny", "path": model},
    "dataset": {"id": "bench", "name": "lab-flags", "sha256": "0" * 64, "format": "messages",
                "train_file": f"{work}/train.jsonl", "eval_file": f"{work}/eval.jsonl",
                "train_examples": count, "eval_examples": 64},
    "hyperparameters": {"epochs": epochs, "learning_rate": 3e-3, "batch_size": 16,
                        "gradient_accumulation_steps": 1, "max_seq_len": 64, "warmup_ratio": 0.03,
                        "weight_decay": 0.0, "max_grad_norm": 1.0, "eval_every": 1000000,
                        "early_stopping_patience": 0,
                        "lora": {"r": 16, "alpha": 32.0, "dropout": 0.05, "target_modules": ["all-linear"]}},
    "seed": 42, "checkpoint_every": 1000000, "device": "cpu",
    "checkpoints_dir": f"{work}/checkpoints", "output_dir": f"{work}/output", "output_name": "bench",
}
json.dump(spec, open(f"{work}/job.json", "w"), indent=1)
PY
echo "medbox-trainer: $train_count examples × $epochs epochs, $threads threads" >&2
OMP_NUM_THREADS="$threads" "$CARGO_TARGET_DIR/release/medbox-trainer" --job-dir "$work" > "$work/events.jsonl" 2> "$work/trainer.log"
echo "transformers + peft: the same" >&2
OMP_NUM_THREADS="$threads" python3 scripts/bench/finetune_reference.py "$work/job.json" "$threads" > "$work/reference.json"
python3 - "$work" <<'PY'
import json, sys
work = sys.argv[1]
events = [json.loads(line) for line in open(f"{work}/events.jsonl")]
progress = [e for e in events if e["event"] == "progress"]
done = [e for e in events if e["event"] == "succeeded"][0]["metrics"]
# Steps carry about the same number of tokens: the mean of the per-step rates
# weighted by time is total tokens over total time.
seconds = sum(1 / e["tokens_per_second"] for e in progress)
medbox = {"tokens_per_second": len(progress) / seconds, "train_loss": done["train_loss"],
          "eval_loss": done["eval_loss"], "steps": len(progress)}
reference = json.load(open(f"{work}/reference.json"))
print(f"{'':22}{'medbox':>12}{'transformers+peft':>20}{'ratio':>8}")
for key in ("tokens_per_second", "train_loss", "eval_loss", "steps"):
    a, b = medbox[key], reference[key]
    print(f"{key:22}{a:12.4g}{b:20.4g}{a / b if b else float('nan'):8.2f}")
PY
