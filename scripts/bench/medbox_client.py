"""medbox's side: what an application sees through the gRPC service.

Every figure is timed on this side of the wire, with time.perf_counter, from
just before the call to the arrival of the streamed chunks.
"""

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc

from .server import NotSupported

REFUSALS = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNIMPLEMENTED)


@dataclass
class StreamTiming:
    """One generation, timed as the caller saw it."""
    ttft_s: float          # from the call to the first chunk with a token
    decode_s: float        # from the first such chunk to the last one
    total_s: float         # from the call to the last chunk with a token
    tokens: int            # generated tokens
    first_chunk_tokens: int
    text: str
    finish_reason: str

    @property
    def decode_tps(self):
        """Tokens after the first one, over the time they took (prefill excluded)."""
        return (self.tokens - self.first_chunk_tokens) / self.decode_s

    @property
    def end_to_end_tps(self):
        return self.tokens / self.total_s


class MedboxClient:
    def __init__(self, server):
        self.stub = server.stub
        self.pb = server.pb
        self.model = "bench"

    def tokenize(self, text):
        reply = self.stub.Tokenize(self.pb.TokenizeRequest(model=self.model, text=text), timeout=60)
        return [token.id for token in reply.tokens]

    def _request(self, prompt, new_tokens, json_schema=None):
        sampling = self.pb.SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        request = self.pb.GenerateRequest(model=self.model, prompt=prompt, sampling=sampling)
        if json_schema is not None:
            request.json_schema = json_schema
        return request

    def stream(self, prompt, prompt_tokens, new_tokens, json_schema=None):
        """One GenerateStream call, timed chunk by chunk."""
        request = self._request(prompt, new_tokens, json_schema)
        started = time.perf_counter()
        first = last = None
        tokens = first_chunk_tokens = 0
        text, finish_reason, usage = [], "", None
        try:
            for chunk in self.stub.GenerateStream(request, timeout=3600):
                if chunk.token_ids:
                    last = time.perf_counter()
                    if first is None:
                        first, first_chunk_tokens = last, len(chunk.token_ids)
                    tokens += len(chunk.token_ids)
                text.append(chunk.text)
                if chunk.finish_reason:
                    finish_reason, usage = chunk.finish_reason, chunk.usage
        except grpc.RpcError as error:
            if json_schema is not None and error.code() in REFUSALS:
                raise NotSupported(f"{error.code().name}: {error.details()}") from None
            raise
        check_usage(usage, prompt_tokens, tokens, new_tokens, json_schema is None)
        if new_tokens > 1 and first == last:
            raise RuntimeError(f"medboxd sent all {tokens} tokens in one chunk: decoding cannot be timed")
        return StreamTiming(first - started, last - first, last - started, tokens,
                            first_chunk_tokens, "".join(text), finish_reason)

    def time_to_first_token(self, prompt, prompt_tokens):
        return self.stream(prompt, prompt_tokens, 1).ttft_s

    def concurrent_streams(self, prompts, prompt_tokens, new_tokens):
        """len(prompts) GenerateStream calls at once; total generated tokens per second
        from the moment they are all released to the end of the last one."""
        barrier = threading.Barrier(len(prompts) + 1)

        def one(prompt):
            barrier.wait()
            return self.stream(prompt, prompt_tokens, new_tokens)

        with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
            futures = [pool.submit(one, prompt) for prompt in prompts]
            barrier.wait()
            started = time.perf_counter()
            results = [future.result() for future in futures]
            finished = time.perf_counter()
        return sum(result.tokens for result in results) / (finished - started)


def check_usage(usage, prompt_tokens, tokens, new_tokens, exact_length):
    """The server counted the prompt as we did, and generated what was asked."""
    if usage is None:
        raise RuntimeError("the stream ended without usage")
    if usage.prompt_tokens != prompt_tokens:
        raise RuntimeError(f"medboxd counted {usage.prompt_tokens} prompt tokens, expected {prompt_tokens}")
    if usage.completion_tokens != tokens:
        raise RuntimeError(f"medboxd streamed {tokens} tokens but counted {usage.completion_tokens}")
    if exact_length and tokens != new_tokens:
        raise RuntimeError(f"medboxd generated {tokens} tokens with ignore_eos, expected {new_tokens}")
