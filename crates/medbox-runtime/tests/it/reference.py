"""Reference outputs from Hugging Face transformers for the runtime's parity tests.

  reference.py logits MODEL_DIR PROMPT N   -> JSON on stdout:
      prompt_ids: the tokenizer's ids for PROMPT (special tokens added),
      logits: f32 logits for every prompt position,
      greedy_ids: N greedy tokens (argmax, end tokens ignored),
      greedy_text: those tokens decoded without special tokens.
  reference.py reshard MODEL_DIR OUT_DIR  -> saves MODEL_DIR as several shards.
"""

import json
import shutil
import sys

import torch
import transformers
from tokenizers import Tokenizer


def load(model_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    return model


def logits(model_dir, prompt, count):
    tokenizer = Tokenizer.from_file(f"{model_dir}/tokenizer.json")
    ids = tokenizer.encode(prompt).ids
    model = load(model_dir)
    with torch.no_grad():
        prompt_logits = model(torch.tensor([ids])).logits[0]
        sequence = list(ids)
        for _ in range(count):
            next_logits = model(torch.tensor([sequence])).logits[0, -1]
            sequence.append(int(torch.argmax(next_logits)))
    greedy = sequence[len(ids):]
    json.dump({
        "prompt_ids": ids,
        "logits": prompt_logits.tolist(),
        "greedy_ids": greedy,
        "greedy_text": tokenizer.decode(greedy, skip_special_tokens=True),
    }, sys.stdout)


def reshard(model_dir, out_dir):
    model = load(model_dir)
    model.save_pretrained(out_dir, max_shard_size="1MB")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(f"{model_dir}/{name}", f"{out_dir}/{name}")


if __name__ == "__main__":
    torch.manual_seed(0)
    command, *arguments = sys.argv[1:]
    if command == "logits":
        logits(arguments[0], arguments[1], int(arguments[2]))
    elif command == "reshard":
        reshard(arguments[0], arguments[1])
    else:
        raise SystemExit(f"unknown command {command}")
