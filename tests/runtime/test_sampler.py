"""The host sampler against the hand-worked table (tests/runtime/sampling_table.py): the
float64 reference `probabilities`, the batch sampler's distributions on every candidate
path, and 20k seeded draws per case; seeds, logprobs and validation."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from sampling_table import CASES

from llmc.errors import LlmcError
from llmc.runtime import sampler
from llmc.runtime.sampler import (
    SamplingParams,
    batch_probabilities,
    probabilities,
    request_generator,
    sample,
    sample_batch,
)

STOCHASTIC = [c for c in CASES if not c.greedy]


def by_vocab(cases):
    groups: dict[int, list] = {}
    for c in cases:
        groups.setdefault(c.logits.size, []).append(c)
    return groups.values()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_reference_matches_the_table(case):
    got = probabilities(case.logits, case.params, case.output, case.prompt, case.eos)
    np.testing.assert_allclose(got, case.expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize("path", ["thresholds", "partial sort", "whole row", "chunks of 2"])
def test_batch_distributions_match_the_table(monkeypatch, path):
    """Every case of a vocabulary size in one batch (mixed params), on each top-p path."""
    if path == "partial sort":
        monkeypatch.setattr(sampler, "THRESHOLDS", ())
        monkeypatch.setattr(sampler, "CANDIDATES", 2)
    elif path == "whole row":
        monkeypatch.setattr(sampler, "THRESHOLDS", (0.99,))
        monkeypatch.setattr(sampler, "CANDIDATES", 1)
    elif path == "chunks of 2":
        monkeypatch.setattr(sampler, "CHUNK", 2)
    for cases in by_vocab(CASES):
        got = batch_probabilities(np.stack([c.logits for c in cases]),
                                  [c.params for c in cases], [c.output for c in cases],
                                  [c.prompt for c in cases], eos_token_ids=cases[0].eos or ())
        for c, row in zip(cases, got):
            if c.eos and c.eos != cases[0].eos:
                row = batch_probabilities(c.logits[None], [c.params], [c.output], [c.prompt],
                                          c.eos)[0]
            np.testing.assert_allclose(row, c.expected, rtol=0, atol=1e-6, err_msg=c.name)


def test_greedy_rows_are_exact_and_draw_nothing():
    greedy = [c for c in CASES if c.greedy]
    for c in greedy:
        rng = np.random.default_rng(5)
        tok = sample_batch(c.logits[None], [c.params], [rng], [c.output], [c.prompt],
                           c.eos).tokens
        assert tok.dtype == np.int32 and tok[0] == int(np.argmax(c.expected)), c.name
        assert rng.random() == np.random.default_rng(5).random(), "a greedy row drew"


@pytest.mark.parametrize("case", STOCHASTIC, ids=[c.name for c in STOCHASTIC])
def test_draws_follow_the_table(case):
    n = 20_000
    rng = np.random.default_rng(1234)
    tokens = sample_batch(np.tile(case.logits, (n, 1)), [case.params] * n, [rng] * n,
                          [case.output] * n, [case.prompt] * n, case.eos).tokens
    freq = np.bincount(tokens, minlength=case.logits.size) / n
    assert set(np.flatnonzero(freq)) <= set(np.flatnonzero(case.expected)), "outside the set"
    assert 0.5 * np.abs(freq - case.expected).sum() < 0.02


def lm_like_logits(v: int, seed: int) -> np.ndarray:
    """A heavy head over a normal body, with ties, and a masked token."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 2, v).astype(np.float32)
    head = rng.choice(v, 40, replace=False)
    x[head] += rng.uniform(4, 12, 40).astype(np.float32)
    x[head[5:8]] = x[head[5]]
    x[0] = -np.inf
    return x


@pytest.mark.parametrize("params", [
    SamplingParams(1.0), SamplingParams(0.7, 0, 0.9), SamplingParams(1.3, 0, 0.8),
    SamplingParams(1.0, 50, 0.8), SamplingParams(1.0, 7), SamplingParams(0.8, min_p=0.05),
    SamplingParams(5.0, 0, 0.8), SamplingParams(1.0, 0, 0.5, min_p=0.01)])
@pytest.mark.parametrize("path", ["default", "partial sort"])
def test_large_vocab_batch_matches_reference(monkeypatch, params, path):
    if path == "partial sort":
        monkeypatch.setattr(sampler, "THRESHOLDS", ())
        monkeypatch.setattr(sampler, "CANDIDATES", 300)
    v = 50_000
    x = np.stack([lm_like_logits(v, s) for s in range(3)])
    for row in x:
        if params.top_p < 1:   # keep off a cut boundary (fp32 vs fp64 sums)
            ref = probabilities(row, SamplingParams(params.temperature, params.top_k,
                                                    min_p=params.min_p))
            margin = np.abs(np.cumsum(np.sort(ref)[::-1]) - params.top_p).min()
            assert margin > 1e-6
    got = batch_probabilities(x, [params] * 3, [[]] * 3, [[]] * 3)
    for row, g in zip(x, got):
        want = probabilities(row, params)
        assert set(np.flatnonzero(g)) == set(np.flatnonzero(want))
        np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-7)


def test_one_row_sample_keeps_the_old_draws():
    """`sample` draws what rng.choice(p=probabilities) drew (one uniform, index order)."""
    logits = np.array([0.1, 3.0, 2.9, -1.0, 0.5], np.float32)
    for params in [SamplingParams(1.0), SamplingParams(0.7, 3), SamplingParams(1.0, 0, 0.8)]:
        a, b = np.random.default_rng(3), np.random.default_rng(3)
        p = probabilities(logits, params)
        assert [sample(logits, params, a) for _ in range(300)] == \
               [int(b.choice(5, p=p)) for _ in range(300)]


def test_seeded_request_gets_the_same_tokens_in_any_slot():
    v = 1000
    logits = np.stack([lm_like_logits(v, s % 5) for s in range(6)])   # 5 is 0's again
    reqs = [SamplingParams(1.0, seed=11), SamplingParams(0.8, 0, 0.9, seed=12),
            SamplingParams(), SamplingParams(1.2, 20, seed=13),
            SamplingParams(1.0, min_p=0.02, seed=14, presence_penalty=0.5),
            SamplingParams(1.0, seed=11)]

    def run(order):
        gens = {i: request_generator(reqs[i]) for i in order}
        out = {i: [] for i in order}
        for _ in range(5):
            toks = sample_batch(logits[order], [reqs[i] for i in order],
                                [gens[i] for i in order], [out[i] for i in order],
                                [[]] * len(order)).tokens
            for i, t in zip(order, toks):
                out[i].append(int(t))
        return out

    a, b, alone = run([0, 1, 2, 3, 4, 5]), run([5, 3, 1, 4, 2, 0]), run([4])
    assert a == b and a[4] == alone[4]
    assert run([0])[0] == run([5])[5] != run([1])[1]
    assert a[2] == [int(np.argmax(logits[2]))] * 5


def test_logprobs_are_raw_log_softmax():
    x = np.array([[2.0, 1.0, 1.0, -1.0, 0.5], [0, 3, 1, 1, 1]], np.float32)
    params = [SamplingParams(2.0, 1, logprobs=3, repetition_penalty=1.5),
              SamplingParams(logprobs=0)]
    res = sample_batch(x, params, [np.random.default_rng(0)] * 2, [[0], []], [[], []])
    raw = x - np.log(np.exp(x.astype(np.float64)).sum(1, keepdims=True))
    assert res.tokens.tolist() == [0, 1]
    np.testing.assert_allclose(res.logprobs, [raw[0, 0], raw[1, 1]], rtol=1e-6)
    assert [t for t, _ in res.top_logprobs[0]] == [0, 1, 2]     # ties: lower id first
    np.testing.assert_allclose([lp for _, lp in res.top_logprobs[0]], raw[0, [0, 1, 2]],
                               rtol=1e-6)
    assert res.top_logprobs[1] == []
    none = sample_batch(x, [SamplingParams(), SamplingParams(logprobs=20)], [None, None],
                        [[], []], [[], []])
    assert math.isnan(none.logprobs[0]) and none.top_logprobs[0] is None
    assert len(none.top_logprobs[1]) == 5
    assert sample_batch(x, [SamplingParams()] * 2, [None] * 2, [[]] * 2,
                        [[]] * 2).logprobs is None


def test_logit_bias_is_added_before_everything_else():
    """The distribution drawn from is that of logits + bias (then the penalties); logprobs
    stay those of the raw logits; JSON's string keys are token ids."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 50)).astype(np.float32)
    bias = {"7": 3.5, "3": -100.0}
    p = SamplingParams(0.8, top_p=0.9, logit_bias=bias, repetition_penalty=1.3)
    assert p.logit_bias == ((3, -100.0), (7, 3.5)) and p.needs_host
    assert SamplingParams.from_dict({"logit_bias": bias}) == SamplingParams(logit_bias=bias)
    biased = x.copy()
    biased[:, 7] += 3.5
    biased[:, 3] -= 100
    got = batch_probabilities(x, [p] * 3, [[1, 7]] * 3, [[2]] * 3)
    want = batch_probabilities(biased, [replace(p, logit_bias=())] * 3, [[1, 7]] * 3, [[2]] * 3)
    np.testing.assert_allclose(got, want)
    assert got[:, 3].max() == 0
    greedy = sample_batch(x, [SamplingParams(logit_bias={11: 100}, logprobs=0)] * 3, [None] * 3,
                          [[]] * 3, [[]] * 3)
    assert greedy.tokens.tolist() == [11] * 3
    raw = x - np.log(np.exp(x.astype(np.float64)).sum(1, keepdims=True))
    np.testing.assert_allclose(greedy.logprobs, raw[:, 11], rtol=1e-6)


def test_a_row_with_no_finite_logit_is_an_error():
    x = np.array([[0, 1], [-np.inf, -np.inf]], np.float32)
    with pytest.raises(LlmcError, match="row 1 of the logits has no finite maximum"):
        sample_batch(x, [SamplingParams(1.0)] * 2, [np.random.default_rng(0)] * 2,
                     [[]] * 2, [[]] * 2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-1), "temperature must be >= 0"),
    (dict(temperature=float("nan")), "temperature must be >= 0 and finite"),
    (dict(temperature=float("inf")), "temperature must be"),
    (dict(temperature="hot"), "temperature must be"),
    (dict(temperature=True), "temperature must be"),
    (dict(top_k=-2), "top_k must be an integer >= 0"),
    (dict(top_k=2.5), "top_k must be an integer"),
    (dict(top_p=0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), "top_p must be in"),
    (dict(top_p=float("inf")), "top_p must be in"),
    (dict(top_p=float("nan")), "top_p must be in"),
    (dict(min_p=-0.1), r"min_p must be in \[0, 1\]"),
    (dict(min_p=float("nan")), "min_p must be in"),
    (dict(repetition_penalty=0), "repetition_penalty must be > 0"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty must be > 0 and finite"),
    (dict(presence_penalty=2.5), r"presence_penalty must be in \[-2, 2\]"),
    (dict(frequency_penalty=float("-inf")), "frequency_penalty must be in"),
    (dict(seed=-1), "seed must be an integer None or"),
    (dict(seed=2**64), "seed must be"),
    (dict(seed=1.5), "seed must be"),
    (dict(stop=[1]), "stop must be a string or a list of non-empty strings"),
    (dict(stop=["ok", ""]), "stop must be"),
    (dict(stop=3), "stop must be"),
    (dict(stop_token_ids=[-1]), "stop_token_ids must be a list of token ids"),
    (dict(stop_token_ids=["a"]), "stop_token_ids must be"),
    (dict(max_tokens=0), "max_tokens must be an integer >= 1"),
    (dict(max_tokens=-5), "max_tokens must be"),
    (dict(min_tokens=-1), "min_tokens must be an integer >= 0"),
    (dict(min_tokens=10, max_tokens=5), r"min_tokens must be .*<= max_tokens \(5\)"),
    (dict(ignore_eos="yes"), "ignore_eos must be true or false"),
    (dict(skip_special_tokens=0), "skip_special_tokens must be true or false"),
    (dict(logprobs=21), "logprobs must be an integer None or an integer in 0..20"),
    (dict(logprobs=-1), "logprobs must be"),
    (dict(logit_bias={"a": 1}), "logit_bias must map token ids"),
    (dict(logit_bias={5: 101}), "logit_bias must map .* to biases in"),
    (dict(logit_bias={-1: 1}), "logit_bias must map token ids"),
    (dict(logit_bias={5: float("nan")}), "logit_bias must"),
])
def test_bad_sampling_params(kwargs, message):
    with pytest.raises(LlmcError, match=message):
        SamplingParams(**kwargs).validate()
    with pytest.raises(LlmcError, match=message):
        SamplingParams.from_dict(kwargs)


def test_params_defaults_and_from_dict():
    p = SamplingParams()
    assert (p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty,
            p.presence_penalty, p.frequency_penalty, p.seed, p.stop, p.stop_token_ids,
            p.max_tokens, p.min_tokens, p.ignore_eos, p.logprobs) == \
        (0.0, 0, 1.0, 0.0, 1.0, 0.0, 0.0, None, (), (), 64, 0, False, None)
    p.validate()
    q = SamplingParams.from_dict({"temperature": 0.7, "stop": "\n", "stop_token_ids": [7],
                                  "top_p": None, "seed": 3, "logprobs": 2})
    assert q == SamplingParams(0.7, stop=("\n",), stop_token_ids=(7,), seed=3, logprobs=2)
    assert hash(q) == hash(SamplingParams(0.7, stop=["\n"], stop_token_ids=[7], seed=3,
                                          logprobs=2))
    with pytest.raises(LlmcError, match="unknown sampling parameter.*'best_of'"):
        SamplingParams.from_dict({"best_of": 2})
    with pytest.raises(TypeError):
        SamplingParams(1.0, 0, 1.0, 5)   # only three positional fields
    assert not SamplingParams(1.0, 5, 0.5, seed=1).needs_host
    assert SamplingParams(min_p=0.1).needs_host and SamplingParams(logprobs=0).needs_host


@pytest.mark.parametrize("v", [5, 1024, 2048, 3000])
def test_blocked_draw_is_the_inverse_cdf(v):
    """The dense draw (block sums, then one block) lands where a cumulative sum over the
    whole row puts u * total, zero-mass tokens never drawn."""
    rng = np.random.default_rng(v)
    e = rng.random((64, v)).astype(np.float32) ** 4
    e[e < 0.05] = 0
    e[:, -300:] = 0     # a tail (and at v = 2048 a whole block) with no mass
    e[:, 0] = np.maximum(e[:, 0], 0.01)
    u = rng.random(64)
    u[:3] = [0.0, 1 - 2**-53, 0.5]
    got = sampler._draw_dense(e, u)
    cdf = np.cumsum(e, axis=1, dtype=np.float64)
    want = [np.searchsorted(c, ui * c[-1], side="right") for c, ui in zip(cdf, u)]
    want = np.minimum(want, [np.flatnonzero(row)[-1] for row in e])
    assert (e[np.arange(64), got] > 0).all()
    assert np.array_equal(got, want)
