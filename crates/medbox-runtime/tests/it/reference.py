"""Reference outputs from Hugging Face transformers for the runtime's parity tests.

  reference.py logits MODEL_DIR PROMPT N   -> JSON on stdout:
      prompt_ids: the tokenizer's ids for PROMPT (special tokens added),
      logits: f32 logits for every prompt position,
      greedy_ids: N greedy tokens (argmax, end tokens ignored),
      greedy_text: those tokens decoded without special tokens.
  reference.py parity PROMPT N MODEL_DIR... -> JSON on stdout: a list with, for
      each model, what `logits` gives plus min_margin, the smallest gap between
      the best and the second best logit over the N greedy steps (one process
      for every model, so that torch is imported once).
  reference.py reshard MODEL_DIR OUT_DIR  -> saves MODEL_DIR as several shards.
  reference.py chat MODEL_DIR < CONVERSATIONS_JSON -> JSON on stdout: for each
      conversation (a list of {role, content}), {"text", "ids"} from
      apply_chat_template(add_generation_prompt=True), rendered and tokenized.
  reference.py greedy MODEL_DIR PROMPT N DTYPE -> JSON on stdout: prompt_ids and
      greedy_ids, N greedy tokens with the model in DTYPE (float32, bfloat16, float16).
  reference.py embed MODEL_DIR < texts.json -> JSON on stdout: the
      sentence-transformers embeddings of a JSON list of texts, and max_seq_length.
  reference.py peft BASE_DIR MADE_DIR READ_DIR PROMPT -> JSON on stdout: makes a
      LoRA adapter of BASE_DIR with peft (r 8, alpha 16, all linear layers, every
      weight random) and saves it in MADE_DIR; loads the adapter medbox wrote in
      READ_DIR with peft; {"prompt_ids", "made": logits, "read": logits} for PROMPT.
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


def reference_logits(model_dir, prompt, count):
    tokenizer = Tokenizer.from_file(f"{model_dir}/tokenizer.json")
    ids = tokenizer.encode(prompt).ids
    model = load(model_dir)
    margins = []
    with torch.no_grad():
        prompt_logits = model(torch.tensor([ids])).logits[0]
        sequence = list(ids)
        for _ in range(count):
            next_logits = model(torch.tensor([sequence])).logits[0, -1]
            top = torch.topk(next_logits, 2).values
            margins.append(float(top[0] - top[1]))
            sequence.append(int(torch.argmax(next_logits)))
    greedy = sequence[len(ids):]
    return {
        "prompt_ids": ids,
        "logits": prompt_logits.tolist(),
        "greedy_ids": greedy,
        "greedy_text": tokenizer.decode(greedy, skip_special_tokens=True),
        "min_margin": min(margins, default=None),
    }


def logits(model_dir, prompt, count):
    json.dump(reference_logits(model_dir, prompt, count), sys.stdout)


def parity(prompt, count, model_dirs):
    json.dump([reference_logits(model_dir, prompt, count) for model_dir in model_dirs], sys.stdout)


def greedy(model_dir, prompt, count, dtype):
    tokenizer = Tokenizer.from_file(f"{model_dir}/tokenizer.json")
    ids = tokenizer.encode(prompt).ids
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    model.eval()
    sequence = list(ids)
    with torch.no_grad():
        for _ in range(count):
            next_logits = model(torch.tensor([sequence])).logits[0, -1]
            sequence.append(int(torch.argmax(next_logits)))
    json.dump({"prompt_ids": ids, "greedy_ids": sequence[len(ids):]}, sys.stdout)


def embed(model_dir):
    from sentence_transformers import SentenceTransformer

    texts = json.load(sys.stdin)
    model = SentenceTransformer(model_dir, device="cpu")
    vectors = model.encode(texts, convert_to_numpy=True, batch_size=32)
    json.dump({
        "embeddings": vectors.tolist(),
        "max_seq_length": model.max_seq_length,
        "token_counts": [len(model.tokenizer(text)["input_ids"]) for text in texts],
    }, sys.stdout)


def reshard(model_dir, out_dir):
    model = load(model_dir)
    model.save_pretrained(out_dir, max_shard_size="1MB")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(f"{model_dir}/{name}", f"{out_dir}/{name}")


def chat(model_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    results = []
    for messages in json.load(sys.stdin):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        results.append({"text": text, "ids": list(encoded["input_ids"])})
    json.dump(results, sys.stdout, ensure_ascii=False)


def peft_logits(base_dir, made_dir, read_dir, prompt):
    import peft

    tokenizer = Tokenizer.from_file(f"{base_dir}/tokenizer.json")
    ids = torch.tensor([tokenizer.encode(prompt).ids])
    config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                             init_lora_weights=False)
    made = peft.get_peft_model(load(base_dir), config)
    made.eval()
    made.save_pretrained(made_dir)
    read = peft.PeftModel.from_pretrained(load(base_dir), read_dir)
    read.eval()
    with torch.no_grad():
        json.dump({
            "prompt_ids": ids[0].tolist(),
            "made": made(ids).logits[0].tolist(),
            "read": read(ids).logits[0].tolist(),
        }, sys.stdout)


if __name__ == "__main__":
    torch.manual_seed(0)
    command, *arguments = sys.argv[1:]
    if command == "logits":
        logits(arguments[0], arguments[1], int(arguments[2]))
    elif command == "parity":
        parity(arguments[0], int(arguments[1]), arguments[2:])
    elif command == "greedy":
        greedy(arguments[0], arguments[1], int(arguments[2]), arguments[3])
    elif command == "embed":
        embed(arguments[0])
    elif command == "reshard":
        reshard(arguments[0], arguments[1])
    elif command == "chat":
        chat(arguments[0])
    elif command == "peft":
        peft_logits(*arguments)
    else:
        raise SystemExit(f"unknown command {command}")
