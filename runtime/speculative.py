"""Speculative decoding by prompt lookup: a request's next tokens guessed from its own text,
all of them checked in one step.

    engine = LLMEngine(session, header, speculative=SpeculativeConfig(num_speculative_tokens=4))

Guessing (`NgramDrafter`, vLLM's "ngram" method): the request's last n tokens, n from
`prompt_lookup_max` down to `prompt_lookup_min`, are looked up among its earlier tokens
(prompt and output); at the most recent earlier place they occur, the k tokens that followed
are the draft. Text that repeats what came before (code edits, extraction, quoting, summaries
that reuse the source's words, structured lists) is guessed well; other text mostly is not,
and then a step costs what it did.

Checking: the step feeds the request's last token and its k guesses, each in a row of its
own that shares the request's block table, at consecutive positions. No engine or kernel
change is needed for that: within a layer every new K/V row is written before attention
reads the pool (llmc/contract.py), so row i sees the guesses before it, and a row of one
token is a decode row for every backend (a graphed decode step on the cuda backend). Each
row is sampled as that position would have been (its own settings, its own place in the
request's random stream), and the sampled tokens are kept while they agree with the guesses,
plus the first one that does not: 1 to k + 1 tokens a step.

Drawing each token from the model given the tokens before it and stopping at the first
disagreement gives every kept token the distribution it has without speculation: the output
follows the same distribution, greedy or sampled. With a seed, on the device the draw of a
request's i-th token depends on (seed, i) alone, as without speculation; but its logits come
from a step of more rows, whose GEMMs may round differently in the last bits, and where the
draw lands in a flat tail (temperature 1 over the whole vocabulary) that can move it to a
neighbouring token, as a change of batch does without speculation. On the host a rejected
row's draw is used up and the stream moves on.

What is not speculated: structured outputs (the grammar would have to follow each guess),
prompts still being computed or scored, and whatever the step's rows and tokens
(max_batch_size, max_num_tokens) have no room for. While requests wait to start, nothing is
speculated: their prompts get the step; nor while more than `disable_by_batch_size` run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields

from llmc.errors import LlmcError

METHODS = ("ngram",)


@dataclass(frozen=True)
class SpeculativeConfig:
    """vLLM's --speculative-config names, for the methods llmc has."""

    method: str = "ngram"
    num_speculative_tokens: int = 4   # k: guesses a step a request
    prompt_lookup_max: int = 4        # the longest suffix looked up
    prompt_lookup_min: int = 2        # the shortest one that may make a draft
    # No guesses while more requests than this run: a step with guesses is planned request
    # by request, which at a large batch costs the host more than guesses save.
    disable_by_batch_size: int | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise LlmcError(f"speculative method {self.method!r} is not one llmc has; the "
                            f"methods are {', '.join(METHODS)} (prompt lookup: no draft "
                            "model needed)")
        for name in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min",
                     "disable_by_batch_size"):
            value = getattr(self, name)
            if name == "disable_by_batch_size" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LlmcError(f"speculative {name} must be a whole number >= 1, got "
                                f"{value!r}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise LlmcError(f"speculative prompt_lookup_min ({self.prompt_lookup_min}) is "
                            f"above prompt_lookup_max ({self.prompt_lookup_max})")

    @classmethod
    def parse(cls, text: str) -> "SpeculativeConfig":
        """From vLLM's --speculative-config JSON ('{"method": "ngram",
        "num_speculative_tokens": 4, "prompt_lookup_max": 4}') or a bare method name. A
        prompt_lookup_max given alone may be below the default prompt_lookup_min, which then
        follows it down."""
        text = text.strip()
        if text.isidentifier():
            return cls(method=text)
        try:
            given = json.loads(text)
        except json.JSONDecodeError as e:
            raise LlmcError(f"--speculative-config is not valid JSON ({e.msg} at character "
                            f"{e.pos}); e.g. '{{\"method\": \"ngram\", "
                            "\"num_speculative_tokens\": 4}'") from None
        if not isinstance(given, dict):
            raise LlmcError("--speculative-config is a JSON object, e.g. "
                            "'{\"method\": \"ngram\", \"num_speculative_tokens\": 4}'")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(given) - known)
        if unknown:
            raise LlmcError(f"--speculative-config has no field {unknown[0]!r}; the fields "
                            f"are {', '.join(sorted(known))}")
        if "prompt_lookup_max" in given and "prompt_lookup_min" not in given:
            given["prompt_lookup_min"] = min(cls.prompt_lookup_min, given["prompt_lookup_max"])
        return cls(**given)


class NgramDrafter:
    """One request's n-gram index: each n-gram of its tokens (n from min to max) -> where
    its most recent occurrence ends. Built as tokens come, so a step's lookup is a few dict
    reads whatever the length of the request."""

    __slots__ = ("min_n", "max_n", "_ends", "_indexed")

    def __init__(self, min_n: int, max_n: int):
        self.min_n, self.max_n = min_n, max_n
        self._ends: dict[tuple[int, ...], int] = {}
        self._indexed = 0   # n-grams ending at positions up to here are in _ends

    def propose(self, tokens, k: int) -> list[int]:
        """Up to k tokens guessed to follow `tokens` (a sequence that only ever grows: a
        request's prompt + output): what followed the longest suffix's latest earlier
        occurrence. Where that runs into the end of the text, the guess goes on as the
        repeat it is (a suffix that occurred p tokens back repeats with period p)."""
        end = len(tokens)
        if k < 1 or end <= self.min_n:
            return []
        # Index the n-grams ending at positions after the last call's, up to end - 1 (the
        # suffix itself stays out, so a lookup finds an earlier occurrence). `recent` holds
        # them and the longest suffix.
        lo = max(0, self._indexed + 1 - self.max_n)
        recent = list(tokens[lo:end])
        ends = self._ends
        for e in range(max(self._indexed + 1, self.min_n), end):
            for n in range(self.min_n, min(self.max_n, e) + 1):
                ends[tuple(recent[e - n - lo:e - lo])] = e
        self._indexed = end - 1
        for n in range(min(self.max_n, end - 1), self.min_n - 1, -1):
            at = ends.get(tuple(recent[end - n - lo:]))
            if at is not None:
                period = end - at
                follow = list(tokens[at:at + min(k, period)])
                return [follow[i % period] for i in range(k)]
        return []
