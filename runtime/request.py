"""One generation request as the engine tracks it, and what it hands back each step."""

from __future__ import annotations

import enum
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class Status(enum.Enum):
    WAITING = "waiting"        # not scheduled yet, or preempted (its blocks were freed)
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)   # a request is itself: identity, not field-by-field equality
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: Any                          # runtime.sampler.SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    priority: int = 0                    # lower runs first (vLLM's convention)
    status: Status = Status.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0         # tokens whose K/V sit in the cache
    finish_reason: str | None = None     # stop | length | abort | error
    error: str | None = None
    num_preemptions: int = 0
    num_cached_prompt_tokens: int = 0    # prompt tokens a prefix-cache hit skipped
    first_token_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    seed: int = 0                        # one random stream per request (host and GPU)
    rng: np.random.Generator | None = None
    detokenizer: Any = None
    pending_text: str = ""                     # text and ids not handed out yet
    pending_ids: list[int] = field(default_factory=list)
    pending_logprobs: list = field(default_factory=list)
    # With params.prompt_logprobs: (logprob, top-n) of prompt tokens 1, 2, ... as far as
    # they are scored, and whether they went out (once, with the request's first output).
    prompt_logprobs: list | None = None
    prompt_logprobs_sent: bool = False
    stop_token_id: int | None = None     # the stop token that ended it (not in the output)
    matcher: Any = None                  # with params.structured_outputs: its llguidance matcher
    matching: bool = False               # the matcher holds the output (not while reasoning)
    # Speculative decoding: this step's guesses of the next tokens, and what makes them
    # (runtime/speculative.py's NgramDrafter)
    draft: list[int] = field(default_factory=list)
    drafter: Any = None

    @property
    def all_token_ids(self) -> "TokenIds":
        return TokenIds(self)

    def tokens(self, start: int, n: int) -> list[int]:
        """Tokens start..start+n of prompt + output, without copying the whole sequence (a
        decode step reads one token of each of hundreds of requests)."""
        p = len(self.prompt_token_ids)
        if start >= p:
            return self.output_token_ids[start - p:start - p + n]
        return (self.prompt_token_ids[start:start + n]
                + self.output_token_ids[:max(0, start + n - p)])

    def chunk_limit(self) -> int | None:
        """The most new tokens the next step may bring this request in one sequence, or None
        for no limit. A step returns the logits of a sequence's last new token alone, so
        while its prompt is scored a chunk must end where those logits score the next prompt
        token: one token (the scheduler then gives it more, a row each: StepPlan.split), or
        after a preemption, the recomputed part in one chunk."""
        scored = self.prompt_logprobs
        if scored is None or len(scored) >= len(self.prompt_token_ids) - 1:
            return None
        return max(1, len(scored) + 1 - self.num_computed_tokens)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED


class TokenIds(Sequence):
    """A request's prompt + output as one read-only sequence, without copying either: the KV
    manager reads a block's worth at a time of sequences thousands of tokens long."""

    __slots__ = ("_request",)

    def __init__(self, request: Request):
        self._request = request

    def __len__(self) -> int:
        return self._request.num_tokens

    def __getitem__(self, index):
        n = len(self)
        if isinstance(index, slice):
            start, stop, step = index.indices(n)
            if step != 1:
                return list(self)[index]
            return self._request.tokens(start, max(0, stop - start))
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError("token index out of range")
        return self._request.tokens(index, 1)[0]


@dataclass
class RequestOutput:
    """What one step (or the end) brings for one request."""

    request_id: str
    text: str                            # the new text since the last output
    token_ids: list[int]                 # the new token ids since the last output
    finished: bool = False
    finish_reason: str | None = None     # stop | length | abort | error
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    logprobs: list | None = None         # per new token: (logprob, {token: logprob} top-n)
    time_to_first_token: float | None = None
    token_times: list[float] = field(default_factory=list)
    # Once, with the first output, when asked: None for the first prompt token, then
    # (logprob, top-n) for each of the others.
    prompt_logprobs: list | None = None
    # With the last output: the stop token (EOS or a stop_token_ids one) that ended the
    # request. Not in token_ids or text, but sampled: its logprob is logprobs' last entry.
    stop_token_id: int | None = None

    @property
    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}
