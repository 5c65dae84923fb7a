"""Sampling cases with their exact distributions, worked out by hand: (logits, params, the
row's output / prompt tokens, EOS ids) -> the probability vector the sampler must draw from.

Logits are mostly logs of small integers, so softmax gives fractions: ln [8, 4, 2, 1, 1]
at temperature 1 is [8, 4, 2, 1, 1] / 16. Where penalties move logits, the penalised logits
are written out and the expectation is their plain softmax. No case sits on a top-p or
min-p boundary (float rounding would decide it). Shared by the host sampler's tests and
usable by the GPU sampler's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from llmc.runtime.sampler import SamplingParams


def ln(*values) -> np.ndarray:
    return np.log(np.array(values, np.float64)).astype(np.float32)


def frac(*values) -> np.ndarray:
    v = np.array(values, np.float64)
    return v / v.sum()


def softmax(*logits) -> np.ndarray:
    z = np.array(logits, np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


@dataclass
class Case:
    name: str
    logits: np.ndarray          # float32 [V]
    params: SamplingParams
    expected: np.ndarray        # float64 [V]
    output: list[int] = field(default_factory=list)
    prompt: list[int] = field(default_factory=list)
    eos: tuple[int, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.params.temperature == 0


P = SamplingParams
L5 = ln(8, 4, 2, 1, 1)      # p = [.5, .25, .125, .0625, .0625]
NEG = np.float32(-np.inf)

CASES = [
    # greedy
    Case("greedy", L5, P(), frac(1, 0, 0, 0, 0)),
    Case("greedy ties: lowest index", np.array([1, 3, 3, 0], np.float32), P(), frac(0, 1, 0, 0)),
    Case("greedy ignores top_k/top_p/min_p", np.array([1, 3, 3.5, 0], np.float32),
         P(0, 1, 0.1, min_p=0.9), frac(0, 0, 1, 0)),
    Case("greedy after a repetition penalty", np.array([4, 3, 0, 0], np.float32),
         P(repetition_penalty=2.0), frac(0, 1, 0, 0), output=[0]),
    # temperature
    Case("temperature 1", L5, P(1.0), frac(8, 4, 2, 1, 1)),
    Case("temperature 2 (square roots)", ln(16, 4, 1, 1), P(2.0), frac(4, 2, 1, 1)),
    Case("temperature 0.5 (squares)", ln(4, 2, 1, 1), P(0.5), frac(16, 4, 1, 1)),
    Case("-inf logits never drawn", np.array([0, NEG, 0, NEG], np.float32), P(1.0),
         frac(1, 0, 1, 0)),
    # top-k
    Case("top_k 2", L5, P(1.0, 2), frac(8, 4, 0, 0, 0)),
    Case("top_k 3 with ties at the cut: all stay", ln(8, 4, 2, 2, 1), P(1.0, 3),
         frac(8, 4, 2, 2, 0)),
    Case("top_k >= vocab is off", L5, P(1.0, 9), frac(8, 4, 2, 1, 1)),
    Case("top_k 1 is greedy", L5, P(3.0, 1), frac(1, 0, 0, 0, 0)),
    # top-p: cumulative .5 .75 .875 .9375 1
    Case("top_p 0.8 cuts mid-list", L5, P(1.0, 0, 0.8), frac(8, 4, 2, 0, 0)),
    Case("top_p 0.6", L5, P(1.0, 0, 0.6), frac(8, 4, 0, 0, 0)),
    Case("top_p 0.3 keeps the top token", L5, P(1.0, 0, 0.3), frac(1, 0, 0, 0, 0)),
    Case("top_p 0.9 keeps one of the tied pair: the lower index", L5, P(1.0, 0, 0.9),
         frac(8, 4, 2, 1, 0)),
    # p = .4 .2 .2 .2 (cum .4 .6 .8): two of the three tied tokens, lowest indices first
    Case("top_p cuts inside a tie group", ln(4, 2, 2, 2), P(1.0, 0, 0.7),
         frac(4, 2, 2, 0)),
    Case("top_p after top_k renormalises", L5, P(1.0, 3, 0.8), frac(8, 4, 0, 0, 0)),
    Case("top_p after temperature", ln(4, 2, 1, 1), P(0.5, 0, 0.85), frac(16, 4, 0, 0)),
    # min-p: p / p_max = [1, .5, .25, .125, .125]
    Case("min_p 0.2", L5, P(1.0, min_p=0.2), frac(8, 4, 2, 0, 0)),
    Case("min_p 0.3", L5, P(1.0, min_p=0.3), frac(8, 4, 0, 0, 0)),
    Case("min_p 0.1 keeps the tied tail", L5, P(1.0, min_p=0.1), frac(8, 4, 2, 1, 1)),
    Case("min_p after temperature", ln(4, 2, 1, 1), P(0.5, min_p=0.1), frac(16, 4, 0, 0)),
    Case("min_p then top_p on what is left", L5, P(1.0, 0, 0.8, min_p=0.2),
         frac(8, 4, 0, 0, 0)),
    # repetition penalty: seen tokens (prompt + output), positive / 2, non-positive * 2
    Case("repetition_penalty over prompt and output", np.array([2, 2, -1, 0.5, 0], np.float32),
         P(1.0, repetition_penalty=2.0), softmax(2, 1, -2, 0.5, 0), output=[1, 1],
         prompt=[2, 4]),
    Case("repetition_penalty < 1 rewards", np.array([1, 1, -1, 0], np.float32),
         P(1.0, repetition_penalty=0.5), softmax(2, 1, -0.5, 0), prompt=[0, 2]),
    # presence / frequency: over the output only (count 2 for token 1, 1 for token 2)
    Case("presence_penalty", np.array([1, 1, 1, 1], np.float32), P(1.0, presence_penalty=0.5),
         softmax(1, 0.5, 0.5, 1), output=[1, 2, 1], prompt=[3]),
    Case("frequency_penalty", np.array([1, 1, 1, 1], np.float32),
         P(1.0, frequency_penalty=0.25), softmax(1, 0.5, 0.75, 1), output=[1, 2, 1], prompt=[3]),
    Case("negative presence and frequency", np.array([0, 0, 0], np.float32),
         P(1.0, presence_penalty=-1.0, frequency_penalty=-0.5), softmax(0, 2, 1.5),
         output=[1, 1, 2]),
    Case("all penalties together", np.array([2, 2, -1, 0.5, 0], np.float32),
         P(1.0, repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25),
         # rep: [2, 1, -2, .5, 0]; output counts {1: 2, 2: 1}: -(.5 + .5), -(.5 + .25)
         softmax(2, 0, -2.75, 0.5, 0), output=[1, 2, 1], prompt=[4]),
    # min_tokens masks EOS and stop ids while the output is short
    Case("min_tokens masks EOS and stop ids", L5, P(1.0, min_tokens=3, stop_token_ids=[2]),
         frac(8, 4, 0, 1, 0), output=[0, 0], eos=(4,)),
    Case("min_tokens reached: nothing masked", L5, P(1.0, min_tokens=2, stop_token_ids=[2]),
         frac(8, 4, 2, 1, 1), output=[3, 3], eos=(4,)),
    Case("min_tokens with ignore_eos masks only stop ids", L5,
         P(1.0, min_tokens=3, stop_token_ids=[2], ignore_eos=True), frac(8, 4, 0, 1, 1),
         output=[0], eos=(4,)),
    Case("greedy under min_tokens skips EOS", L5, P(min_tokens=1), frac(0, 1, 0, 0, 0),
         eos=(0,)),
    # combinations: penalties -> temperature -> min_p / top_k / top_p
    Case("penalty then temperature then top_k then top_p",
         np.array([2 * np.log(8), 2 * np.log(4), 2 * np.log(2), 0, 0], np.float32) + 1,
         # presence 1 on token 0 (output): z = (x - [1, 0, 0, 0, 0]) / 2 is
         # ln [8, 4, 2, 1, 1] + [0, .5, .5, .5, .5]: p ∝ [8, 4e^.5, 2e^.5, e^.5, e^.5];
         # top_k 3 leaves [.447, .368, .184], top_p .65 the first two
         P(2.0, 3, 0.65, presence_penalty=1.0),
         frac(8, 4 * np.exp(0.5), 0, 0, 0), output=[0]),
    Case("all truncations, top_p decides", L5, P(1.0, 4, 0.7, min_p=0.05),
         frac(8, 4, 0, 0, 0)),
    Case("all truncations, top_k decides", L5, P(1.0, 2, 0.99, min_p=0.05),
         frac(8, 4, 0, 0, 0)),
    Case("all truncations, min_p decides", L5, P(1.0, 4, 0.99, min_p=0.2),
         frac(8, 4, 2, 0, 0)),
]
