"""Prompts of an exact token count, the same for medbox and the reference.

A prompt is corpus words (scripts/corpus/en.txt) in a seeded order, joined by
single spaces. The tokenizer's byte-level pre-tokenizer splits before every
space, so the token count of a prompt is the sum of its words' counts: the
longest run of words that fits is found by bisection, and the rest is filled
with a one-token word. The count is then checked with the tokenizer
(medboxd's Tokenize RPC), whose ids, beginning-of-text token included, are
what the reference is given.
"""

import pathlib
import random

CORPUS = pathlib.Path(__file__).resolve().parents[1] / "corpus" / "en.txt"
FILLER = "the"


def corpus_words():
    return CORPUS.read_text(encoding="utf-8").split()


class PromptMaker:
    def __init__(self, tokenize):
        """tokenize: text -> list of token ids, as medboxd encodes a prompt."""
        self.tokenize = tokenize
        self.words = corpus_words()
        if len(self.tokenize(" " + FILLER)) != len(self.tokenize("")) + 1:
            raise RuntimeError(f"the filler word {FILLER!r} is not one token")

    def _words(self, seed, count):
        rng = random.Random(seed)
        out = []
        while len(out) < count:
            shuffled = list(self.words)
            rng.shuffle(shuffled)
            out.extend(shuffled)
        return out[:count]

    def text(self, tokens, seed):
        """A text that tokenizes to exactly `tokens` ids (beginning-of-text included)."""
        words = self._words(seed, tokens)  # every word is at least one token
        low, high = 0, len(words)
        while low < high:  # the most words whose count is <= tokens
            middle = (low + high + 1) // 2
            if len(self.tokenize(" ".join(words[:middle]))) <= tokens:
                low = middle
            else:
                high = middle - 1
        text = " ".join(words[:low])
        missing = tokens - len(self.tokenize(text))
        text = " ".join([text] + [FILLER] * missing) if text else " ".join([FILLER] * missing)
        ids = self.tokenize(text)
        if len(ids) != tokens:
            raise RuntimeError(f"built a prompt of {len(ids)} tokens, wanted {tokens}")
        return text

    def prompt(self, tokens, seed):
        """(text, ids) of exactly `tokens` tokens."""
        text = self.text(tokens, seed)
        return text, self.tokenize(text)

    def shared_prefix_pair(self, prefix_tokens, suffix_tokens, seed):
        """Two prompts that share their first `prefix_tokens` ids and differ after them."""
        prefix = self.text(prefix_tokens, seed)
        prefix_ids = self.tokenize(prefix)
        pair = []
        for variant in (1, 2):
            suffix_words = self._words(seed * 1000 + variant, suffix_tokens)
            text = prefix
            for word in suffix_words:  # one word at a time, up to the wanted length
                candidate = f"{text} {word}"
                if len(self.tokenize(candidate)) > prefix_tokens + suffix_tokens:
                    break
                text = candidate
            missing = prefix_tokens + suffix_tokens - len(self.tokenize(text))
            text = " ".join([text] + [FILLER] * missing)
            ids = self.tokenize(text)
            if ids[:prefix_tokens] != prefix_ids or len(ids) != prefix_tokens + suffix_tokens:
                raise RuntimeError("the shared-prefix prompts do not share their prefix ids")
            pair.append((text, ids))
        if pair[0][1] == pair[1][1]:
            raise RuntimeError("the shared-prefix prompts are identical")
        return pair
