"""The reference: Hugging Face transformers' `generate` on the same model, in
this process, with the same prompt ids and the same thread count.

Greedy decoding, the end-of-sequence token ignored (the model's
generation_config gets no eos_token_id, so every row runs to max_new_tokens),
timed with a streamer that notes when each step's tokens come out.
"""

import time

import torch
from transformers import AutoModelForCausalLM
from transformers.generation.streamers import BaseStreamer

from .medbox_client import StreamTiming

TORCH_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


class TimingStreamer(BaseStreamer):
    """Notes the time of every decoding step; generate's first put is the prompt."""

    def __init__(self, device):
        self.device = device
        self.prompt_seen = False
        self.times = []
        self.tokens = []

    def put(self, value):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        value.cpu()  # waits for the device, so the time is when the token exists
        self.times.append(time.perf_counter())
        self.tokens.append(value.numel())

    def end(self):
        pass


class HfReference:
    def __init__(self, model_dir, dtype, device):
        self.device = torch.device(device)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=TORCH_DTYPES[dtype])
        self.model.to(self.device).eval()
        self.pad_id = self.model.config.eos_token_id
        # Ignore EOS: without an end token, generate runs to max_new_tokens.
        self.model.generation_config.eos_token_id = None
        self.model.generation_config.pad_token_id = self.pad_id

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def _generate(self, rows, new_tokens, streamer=None):
        """Greedy generation for a batch of prompt id lists (left padded)."""
        width = max(len(row) for row in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for index, row in enumerate(rows):
            ids[index, width - len(row):] = torch.tensor(row)
            mask[index, width - len(row):] = 1
        output = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                     max_new_tokens=new_tokens, do_sample=False, streamer=streamer)
        generated = output.shape[1] - width
        if generated != new_tokens:
            raise RuntimeError(f"generate made {generated} tokens, expected {new_tokens}")
        return output

    def stream(self, ids, new_tokens):
        """One prompt, timed step by step as medbox's stream is."""
        streamer = TimingStreamer(self.device)
        self._sync()
        started = time.perf_counter()
        self._generate([ids], new_tokens, streamer)
        first, last = streamer.times[0], streamer.times[-1]
        return StreamTiming(first - started, last - first, last - started, sum(streamer.tokens),
                            streamer.tokens[0], "", "length")

    def time_to_first_token(self, ids):
        return self.stream(ids, 1).ttft_s

    def batch(self, rows, new_tokens):
        """Total generated tokens per second of one generate call on the whole batch."""
        self._sync()
        started = time.perf_counter()
        self._generate(rows, new_tokens)
        self._sync()
        return len(rows) * new_tokens / (time.perf_counter() - started)

    def close(self):
        del self.model
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
