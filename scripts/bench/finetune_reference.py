#!/usr/bin/env python3
"""The reference side of scripts/bench-finetune.sh: LoRA fine-tuning with
Hugging Face `transformers` + `peft` on the same model, data and
hyper-parameters as a medbox-trainer job (read from its job.json), the same
way medbox-trainer trains: loss on assistant turns only (the prompt rendered
with the chat template and tokenized as one piece), right padding, AdamW,
linear warm-up then cosine, gradient clipping, one optimizer step per
`gradient_accumulation_steps` micro-batches of `batch_size`.

Prints one JSON object: tokens_per_second (over the training steps, all
non-padding tokens), final train loss, eval loss, steps.
"""
import json
import math
import sys
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, get_cosine_schedule_with_warmup


def encode(tokenizer, messages, max_len):
    ids, labels = [], []
    rendered = ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
        answered = tokenizer.apply_chat_template(messages[: index + 1], tokenize=False)
        for text, learned in ((prompt[len(rendered):], False), (answered[len(prompt):], True)):
            piece = tokenizer(text, add_special_tokens=False).input_ids
            ids += piece
            labels += piece if learned else [-100] * len(piece)
        rendered = answered
    return ids[:max_len], labels[:max_len]


def batches(examples, size):
    for start in range(0, len(examples), size):
        chunk = examples[start:start + size]
        length = max(len(ids) for ids, _ in chunk)
        ids = torch.tensor([ids + [0] * (length - len(ids)) for ids, _ in chunk])
        labels = torch.tensor([labels + [-100] * (length - len(labels)) for _, labels in chunk])
        yield ids, labels


def loss_sum(model, ids, labels):
    logits = model(input_ids=ids).logits.float()
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
        ignore_index=-100, reduction="sum"), int((labels[:, 1:] != -100).sum())


def main():
    spec = json.load(open(sys.argv[1]))
    hp = spec["hyperparameters"]
    torch.manual_seed(spec["seed"])
    torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else torch.get_num_threads())
    path = spec["base_model"]["path"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    lora = hp["lora"]
    targets = "all-linear" if lora["target_modules"] == ["all-linear"] else lora["target_modules"]
    model = get_peft_model(model, LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                             target_modules=targets, task_type="CAUSAL_LM"))
    read = lambda file: [encode(tokenizer, json.loads(line)["messages"], hp["max_seq_len"])
                         for line in open(file) if line.strip()]
    train, evaluation = read(spec["dataset"]["train_file"]), read(spec["dataset"]["eval_file"])
    steps_per_epoch = math.ceil(math.ceil(len(train) / hp["batch_size"]) / hp["gradient_accumulation_steps"])
    total = steps_per_epoch * hp["epochs"]
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=hp["learning_rate"], weight_decay=hp["weight_decay"])
    schedule = get_cosine_schedule_with_warmup(optimizer, math.ceil(hp["warmup_ratio"] * total), total)
    generator = torch.Generator().manual_seed(spec["seed"])
    seconds, last = 0.0, float("nan")
    model.train()
    for _ in range(hp["epochs"]):
        order = torch.randperm(len(train), generator=generator).tolist()
        micro = list(batches([train[i] for i in order], hp["batch_size"]))
        for start in range(0, len(micro), hp["gradient_accumulation_steps"]):
            group = micro[start:start + hp["gradient_accumulation_steps"]]
            began = time.perf_counter()
            targets_in_step = sum(int((labels[:, 1:] != -100).sum()) for _, labels in group)
            total_loss = 0.0
            for ids, labels in group:
                loss, _ = loss_sum(model, ids, labels)
                (loss / targets_in_step).backward()
                total_loss += loss.item()
            torch.nn.utils.clip_grad_norm_(parameters, hp["max_grad_norm"])
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            seconds += time.perf_counter() - began
            last = total_loss / targets_in_step
    model.eval()
    with torch.no_grad():
        sums = [loss_sum(model, ids, labels) for ids, labels in batches(evaluation, hp["batch_size"])]
    eval_loss = sum(s.item() for s, _ in sums) / max(1, sum(n for _, n in sums))
    non_padding = sum(len(ids) for ids, _ in train) * hp["epochs"]
    print(json.dumps({"tokens_per_second": non_padding / seconds, "train_loss": last,
                      "eval_loss": eval_loss, "steps": total}))


if __name__ == "__main__":
    main()
