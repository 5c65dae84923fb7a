"""`SamplingParams`: one request's sampling settings, as vLLM and the OpenAI API name them.

Defaults differ from those APIs in two places: temperature 0 (greedy, like `llmc run`;
vLLM and OpenAI default to 1) and max_tokens 64 (`llmc run --max-new-tokens`'s default;
OpenAI's completions default to 16, vLLM's to 16).
"""

from __future__ import annotations

import math
from dataclasses import KW_ONLY, dataclass, fields
from numbers import Integral, Real
from typing import Any, Mapping

import numpy as np

from llmc.errors import LlmcError
from llmc.runtime.structured import StructuredOutputsParams

MAX_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings; every "off" value is the default.

    temperature         0 = greedy (argmax, lowest index on ties)
    top_k               keep the k most likely tokens (ties at the cut all stay); 0 = off
    top_p               keep the smallest most-likely-first set whose mass reaches top_p; 1 = off
    min_p               keep tokens with p >= min_p * p_max; 0 = off
    repetition_penalty  HF/vLLM: the logit of every token seen in prompt + output is divided
                        by it when > 0, multiplied by it when <= 0; 1 = off
    presence_penalty    OpenAI, over the output tokens only: logit -= presence * (count > 0)
    frequency_penalty   ... and logit -= frequency * count; both 0 = off, each in [-2, 2]
    seed                the request's own random stream (independent of its batch slot);
                        None = fresh entropy
    stop                strings that end the output (matched across token boundaries, left
                        out of the returned text); a single string is taken as one stop
    stop_token_ids      token ids that end the output (the id is not part of the text)
    max_tokens          at most this many new tokens; 0 (with prompt_logprobs) scores the
                        prompt and generates nothing
    min_tokens          EOS and stop_token_ids cannot be sampled before this many tokens
    ignore_eos          keep going past EOS (then min_tokens does not mask EOS)
    logit_bias          {token id: bias}: added to those tokens' logits before anything else
                        (OpenAI's; a bias in [-100, 100], -100 bans a token in practice)
    logprobs            None, or n in 0..20: the sampled token's logprob and the n most likely
                        tokens' (log_softmax of the model's raw logits, vLLM's default;
                        with structured_outputs, of the logits its mask leaves)
    prompt_logprobs     None, or n in 0..20: the same for every prompt token after the first
                        (vLLM's prompt_logprobs; what lm-evaluation-harness scores with). The
                        prompt's tokens then go in rows of their own, each row's logits
                        scoring the next prompt token, and it skips the prefix cache
    structured_outputs  None, or a StructuredOutputsParams (a dict of its fields is taken
                        too): the output is held to a JSON schema, a regex, a list of choices
                        or a grammar (runtime/structured.py); it ends when that is complete
    structured_after    None, or a token id: the constraint holds only after this token is
                        sampled (a thinking model's </think>: it reasons freely first)
    skip_special_tokens False: the text keeps the special tokens the model writes (vLLM's;
                        stop tokens are left out either way)

    Only temperature, top_k and top_p may be given positionally.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    _: KW_ONLY
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    max_tokens: int = 64
    min_tokens: int = 0
    ignore_eos: bool = False
    logit_bias: tuple[tuple[int, float], ...] = ()   # (token id, bias) pairs, by token id
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    structured_outputs: StructuredOutputsParams | None = None
    structured_after: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self):
        # Lists become tuples (hashable, immutable); anything else is left for validate().
        stop = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        elif isinstance(stop, (list, tuple)):
            stop = tuple(stop)
        object.__setattr__(self, "stop", stop)
        if isinstance(self.logit_bias, Mapping):   # JSON's keys are strings: "50256"
            try:
                pairs = tuple(sorted((int(k), v) for k, v in self.logit_bias.items()))
            except (TypeError, ValueError):
                pairs = self.logit_bias   # validate() names what is wrong with it
            object.__setattr__(self, "logit_bias", pairs)
        if isinstance(self.stop_token_ids, (list, tuple, np.ndarray)):
            object.__setattr__(self, "stop_token_ids", tuple(
                int(t) if isinstance(t, np.integer) else t for t in self.stop_token_ids))
        if isinstance(self.structured_outputs, Mapping):   # a request body's object
            object.__setattr__(self, "structured_outputs",
                               StructuredOutputsParams.from_dict(self.structured_outputs))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SamplingParams:
        """From a request body's fields (None means the default); validated."""
        known = {f.name for f in fields(cls) if f.name != "_"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise LlmcError(f"unknown sampling parameter(s) {', '.join(map(repr, unknown))}; "
                            f"known: {', '.join(sorted(known))}")
        given = {k: v for k, v in values.items()
                 if v is not None or k in ("seed", "logprobs", "prompt_logprobs")}
        params = cls(**given)
        params.validate()
        return params

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def needs_host(self) -> bool:
        """Whether sampling needs more than the GPU sampler's temperature / top_k / top_p
        (a structured output's mask too is applied on the device where the session can:
        runtime/engine.py decides)."""
        return (self.min_p > 0 or self.repetition_penalty != 1 or self.presence_penalty != 0
                or self.frequency_penalty != 0 or self.min_tokens > 0
                or self.logprobs is not None or self.prompt_logprobs is not None
                or bool(self.logit_bias))

    def validate(self) -> None:
        """Raise LlmcError naming the first bad value (NaN and infinities included)."""
        _real(self.temperature, "temperature", lambda v: v >= 0,
              ">= 0 and finite (0 is greedy)")
        _integer(self.top_k, "top_k", lambda v: v >= 0, ">= 0 (0 keeps all tokens)")
        _real(self.top_p, "top_p", lambda v: 0 < v <= 1, "in (0, 1] (1 keeps all tokens)")
        _real(self.min_p, "min_p", lambda v: 0 <= v <= 1, "in [0, 1] (0 is off)")
        _real(self.repetition_penalty, "repetition_penalty", lambda v: v > 0,
              "> 0 and finite (1 is off)")
        for name in ("presence_penalty", "frequency_penalty"):
            _real(getattr(self, name), name, lambda v: -2 <= v <= 2, "in [-2, 2] (0 is off)")
        if self.seed is not None:
            _integer(self.seed, "seed", lambda v: 0 <= v < 2**64,
                     "None or an integer in [0, 2**64)")
        if not isinstance(self.stop, tuple) or not all(
                isinstance(s, str) and s for s in self.stop):
            raise LlmcError(f"stop must be a string or a list of non-empty strings, "
                            f"got {self.stop!r}")
        if not isinstance(self.stop_token_ids, tuple) or not all(
                _is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise LlmcError(f"stop_token_ids must be a list of token ids (integers >= 0), "
                            f"got {self.stop_token_ids!r}")
        if self.prompt_logprobs is None:
            _integer(self.max_tokens, "max_tokens", lambda v: v >= 1, ">= 1")
        else:   # the prompt's scores alone are an answer
            _integer(self.max_tokens, "max_tokens", lambda v: v >= 0,
                     ">= 0 (0: score the prompt only)")
        _integer(self.min_tokens, "min_tokens", lambda v: 0 <= v <= self.max_tokens,
                 f">= 0 and <= max_tokens ({self.max_tokens})")
        if not isinstance(self.logit_bias, tuple) or not all(
                isinstance(e, tuple) and len(e) == 2 and _is_int(e[0]) and e[0] >= 0
                and isinstance(e[1], Real) and not isinstance(e[1], (bool, np.bool_))
                and math.isfinite(e[1]) and -100 <= e[1] <= 100 for e in self.logit_bias):
            raise LlmcError(f"logit_bias must map token ids (integers >= 0) to biases in "
                            f"[-100, 100], got {self.logit_bias!r}")
        for name in ("ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise LlmcError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                _integer(getattr(self, name), name, lambda v: 0 <= v <= MAX_LOGPROBS,
                         f"None or an integer in 0..{MAX_LOGPROBS}")
        if self.structured_outputs is not None:
            if not isinstance(self.structured_outputs, StructuredOutputsParams):
                raise LlmcError(f"structured_outputs must be a StructuredOutputsParams or a "
                                f"dict of its fields, got {self.structured_outputs!r}")
            if self.min_tokens:   # it would mask EOS where the constraint allows only EOS
                raise LlmcError("min_tokens cannot be combined with structured_outputs: the "
                                "constraint decides where the output ends")
            self.structured_outputs.validate()
        if self.structured_after is not None:
            _integer(self.structured_after, "structured_after", lambda v: v >= 0,
                     ">= 0 (a token id)")


def _is_int(v) -> bool:
    return isinstance(v, Integral) and not isinstance(v, (bool, np.bool_))


def _real(value, name: str, ok, rule: str) -> None:
    if (not isinstance(value, Real) or isinstance(value, (bool, np.bool_))
            or not math.isfinite(value) or not ok(value)):
        raise LlmcError(f"{name} must be {rule}, got {value!r}")


def _integer(value, name: str, ok, rule: str) -> None:
    if not _is_int(value) or not ok(int(value)):
        raise LlmcError(f"{name} must be an integer {rule}, got {value!r}")
