"""The figures, each measured on both sides in turn: the warm-ups, then run 1
of medbox, run 1 of the reference, run 2 of medbox, and so on, so that a
machine that slows down mid-run slows both sides alike.

Every run of every figure has prompts of its own (a seed per figure and run),
so that no figure of medbox is helped by a prefix cached by an earlier run.
"""

import sys
import time
from dataclasses import dataclass

import grpc

from .json_constraint import SCHEMA_TEXT, check_answer
from .server import NotSupported


@dataclass(frozen=True)
class Workload:
    new_tokens: int = 128
    prompt_tokens: int = 64          # decode and concurrent streams
    ttft_prompt_tokens: int = 512
    prefix_tokens: int = 1000
    suffix_tokens: int = 8
    streams: tuple = (4, 16, 32)
    runs: int = 3
    warmups: int = 1                 # per figure, before the runs


# key: (unit, higher is better)
UNITS = {
    "decode": ("tok/s", True),
    "end_to_end": ("tok/s", True),
    "ttft_512": ("ms", False),
    "prefill_512": ("tok/s", True),
    "prefix_first": ("ms", False),
    "prefix_second": ("ms", False),
    "prefix_share": ("%", False),
    "json_decode": ("tok/s", True),
}
for _count in Workload.streams:
    UNITS[f"streams_{_count}"] = ("tok/s", True)


def log(message):
    print(f"bench: {message}", file=sys.stderr, flush=True)


class Suite:
    """The figures for one dtype: medbox (a MedboxClient, or None with why)
    against the reference in hf_dtype (an HfReference, or None when it is
    not rerun)."""

    def __init__(self, results, dtype, hf_dtype, workload, prompts, medbox, medbox_missing, hf):
        self.results = results
        self.dtypes = {"medbox": dtype, "hf": hf_dtype}
        self.dtype = dtype
        self.work = workload
        self.prompts = prompts
        self.medbox = medbox
        self.medbox_missing = medbox_missing
        self.hf = hf

    # -- the loop shared by every figure ------------------------------------

    def measure(self, title, keys, seed_base, medbox_run, hf_run):
        """medbox_run / hf_run: run seed -> {key: value} for each of `keys`; None for no such side."""
        sides = [("medbox", medbox_run if self.medbox else None), ("hf", hf_run if self.hf else None)]
        if self.medbox is None:
            self.mark_missing("medbox", keys, self.medbox_missing)
        started = time.monotonic()
        refused = set()
        runs = [(f"warm-up {n + 1}", seed_base + 500 + n, False) for n in range(self.work.warmups)]
        runs += [(f"run {n + 1}/{self.work.runs}", seed_base + n, True) for n in range(self.work.runs)]
        for label, seed, keep in runs:
            for side, run in sides:
                if run is None or side in refused:
                    continue
                log(f"{self.dtype}: {title}: {side} {label}")
                try:
                    values = run(seed)
                except NotSupported as reason:
                    refused.add(side)
                    marker = self.results.note(f"{self.dtypes[side]}, {title}: {reason}")
                    self.mark_missing(side, keys, f"not supported {marker}")
                    continue
                except (grpc.RpcError, RuntimeError) as error:
                    if side != "medbox":
                        raise
                    # A failing server must not cost the figures of the rest of the run.
                    refused.add(side)
                    log(f"{self.dtype}: {title}: medbox failed: {describe(error)}")
                    marker = self.results.note(f"{self.dtype}, {title}: medbox failed: {describe(error)}")
                    self.mark_missing(side, keys, f"failed {marker}")
                    continue
                if keep:
                    for key, value in values.items():
                        self.results.figure(side, self.dtypes[side], key, *UNITS[key]).samples.append(value)
        log(f"{self.dtype}: {title}: {time.monotonic() - started:.0f}s")

    def mark_missing(self, side, keys, why):
        """No figure for `keys` on this side (samples of earlier runs are dropped)."""
        for key in keys:
            figure = self.results.figure(side, self.dtypes[side], key, *UNITS[key])
            figure.samples.clear()
            figure.missing = why

    # -- the figures ---------------------------------------------------------

    def run_all(self):
        self.decode()
        self.time_to_first_token()
        for count in self.work.streams:
            self.concurrent_streams(count)
        self.shared_prefix()
        self.json_schema()

    def decode(self):
        work = self.work

        def medbox(seed):
            text, ids = self.prompts.prompt(work.prompt_tokens, seed)
            return stream_values(self.medbox.stream(text, len(ids), work.new_tokens))

        def hf(seed):
            text, ids = self.prompts.prompt(work.prompt_tokens, seed)
            return stream_values(self.hf.stream(ids, work.new_tokens))

        self.measure(f"decode, 1 stream, {work.new_tokens} tokens", ["decode", "end_to_end"], 1000, medbox, hf)

    def time_to_first_token(self):
        tokens = self.work.ttft_prompt_tokens

        def values(seconds):
            return {"ttft_512": 1000 * seconds, "prefill_512": tokens / seconds}

        def medbox(seed):
            text, ids = self.prompts.prompt(tokens, seed)
            return values(self.medbox.time_to_first_token(text, len(ids)))

        def hf(seed):
            text, ids = self.prompts.prompt(tokens, seed)
            return values(self.hf.time_to_first_token(ids))

        self.measure(f"time to first token, {tokens}-token prompt", ["ttft_512", "prefill_512"], 2000, medbox, hf)

    def concurrent_streams(self, count):
        work = self.work
        key = f"streams_{count}"

        def batch(seed):
            return [self.prompts.prompt(work.prompt_tokens, seed * 100 + row) for row in range(count)]

        def medbox(seed):
            texts = [text for text, _ in batch(seed)]
            return {key: self.medbox.concurrent_streams(texts, work.prompt_tokens, work.new_tokens)}

        def hf(seed):
            rows = [ids for _, ids in batch(seed)]
            return {key: self.hf.batch(rows, work.new_tokens)}

        self.measure(f"{count} concurrent streams", [key], 3000 + 10 * count, medbox, hf)

    def shared_prefix(self):
        work = self.work

        def pair(seed):
            return self.prompts.shared_prefix_pair(work.prefix_tokens, work.suffix_tokens, seed)

        def values(first, second):
            return {"prefix_first": 1000 * first, "prefix_second": 1000 * second,
                    "prefix_share": 100 * second / first}

        def medbox(seed):
            (text_1, ids_1), (text_2, ids_2) = pair(seed)
            first = self.medbox.time_to_first_token(text_1, len(ids_1))
            return values(first, self.medbox.time_to_first_token(text_2, len(ids_2)))

        def hf(seed):
            (_, ids_1), (_, ids_2) = pair(seed)
            first = self.hf.time_to_first_token(ids_1)
            return values(first, self.hf.time_to_first_token(ids_2))

        self.measure(f"second request sharing a {work.prefix_tokens}-token prefix",
                     ["prefix_first", "prefix_second", "prefix_share"], 4000, medbox, hf)

    def json_schema(self):
        work = self.work

        def medbox(seed):
            text, ids = self.prompts.prompt(work.prompt_tokens, seed)
            timing = self.medbox.stream(text, len(ids), work.new_tokens, json_schema=SCHEMA_TEXT)
            problem = check_answer(timing.text, timing.finish_reason)
            if problem:
                raise NotSupported(f"the answer does not follow json_schema (ignored?): {problem}")
            return {"json_decode": timing.decode_tps}

        self.measure("decode with a JSON schema", ["json_decode"], 5000, medbox, None)


def describe(error):
    if isinstance(error, grpc.RpcError):
        return f"{error.code().name}: {error.details()}"
    return str(error)


def stream_values(timing):
    return {"decode": timing.decode_tps, "end_to_end": timing.end_to_end_tps}
