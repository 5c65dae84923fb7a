"""Speculative decoding by prompt lookup (runtime/speculative.py) on the reference backend:
the guesses, the options, and outputs that equal those of plain decoding, whatever the
sampling settings, stops, preemptions and prefix hits, in fewer steps."""

from __future__ import annotations

import re

import numpy as np
import pytest
from engines import open_engine as _engine

from llmc.engine_file import EngineFile
from llmc.errors import LlmcError
from llmc.limits import BuildLimits
from llmc.runtime.engine import LLMEngine
from llmc.runtime.sampler import SamplingParams
from llmc.runtime.speculative import NgramDrafter, SpeculativeConfig

LIMITS = BuildLimits(max_batch_size=8, max_num_tokens=32, max_seq_len=128, kv_block_size=8)
SPEC = SpeculativeConfig(num_speculative_tokens=4, prompt_lookup_max=3, prompt_lookup_min=1)


# --- guesses ----------------------------------------------------------------------------------

def _lookup(tokens, k, min_n, max_n):
    """What the drafter should guess, by brute force: the longest suffix (max_n down to
    min_n) with an earlier occurrence, its latest one, and what followed it, repeated."""
    end = len(tokens)
    for n in range(min(max_n, end - 1), min_n - 1, -1):
        suffix = tokens[end - n:]
        for at in range(end - 1, n - 1, -1):
            if tokens[at - n:at] == suffix:
                period = end - at
                return [tokens[at + i % period] for i in range(k)]
    return []


def test_drafter_guesses_what_followed_the_suffix_last_time():
    d = NgramDrafter(2, 4)
    assert d.propose([1, 2, 3, 4, 5, 9, 1, 2, 3], 4) == [4, 5, 9, 1]
    # the longest suffix wins: (9, 2, 3) occurred once, (2, 3) later too
    d = NgramDrafter(2, 4)
    assert d.propose([9, 2, 3, 7, 2, 3, 8, 9, 2, 3], 2) == [7, 2]
    assert NgramDrafter(2, 4).propose([5, 6, 7, 8], 3) == []   # nothing repeats
    assert NgramDrafter(2, 4).propose([7, 7, 7], 5) == [7] * 5  # a run goes on as a run
    assert NgramDrafter(2, 4).propose([1, 2, 1, 2], 5) == [1, 2, 1, 2, 1]


@pytest.mark.parametrize("min_n,max_n", [(1, 1), (1, 3), (2, 4), (3, 3)])
def test_drafter_built_as_tokens_come_equals_a_fresh_lookup(min_n, max_n):
    rng = np.random.default_rng(min_n * 10 + max_n)
    for _ in range(20):
        tokens = rng.integers(0, 4, 60).tolist()   # a small alphabet: many repeats
        d = NgramDrafter(min_n, max_n)
        end = int(rng.integers(1, 5))
        while end <= len(tokens):
            k = int(rng.integers(1, 6))
            assert d.propose(tokens[:end], k) == _lookup(tokens[:end], k, min_n, max_n)
            end += int(rng.integers(1, 4))


def test_config_reads_vllm_s_option():
    c = SpeculativeConfig.parse('{"method": "ngram", "num_speculative_tokens": 5, '
                                '"prompt_lookup_max": 3}')
    assert (c.num_speculative_tokens, c.prompt_lookup_max, c.prompt_lookup_min) == (5, 3, 2)
    assert SpeculativeConfig.parse('{"prompt_lookup_max": 1}').prompt_lookup_min == 1
    assert SpeculativeConfig.parse(" ngram ") == SpeculativeConfig()


@pytest.mark.parametrize("text,message", [
    ("{oops", "--speculative-config is not valid JSON"),
    ("[1]", "--speculative-config is a JSON object"),
    ("eagle", "speculative method 'eagle' is not one llmc has"),
    ('{"draft_model": "x"}', "--speculative-config has no field 'draft_model'"),
    ('{"num_speculative_tokens": 0}', "num_speculative_tokens must be a whole number >= 1"),
    ('{"num_speculative_tokens": 2.5}', "num_speculative_tokens must be a whole number"),
    ('{"disable_by_batch_size": -1}', "disable_by_batch_size must be a whole number >= 1"),
    ('{"prompt_lookup_min": 5, "prompt_lookup_max": 3}', "prompt_lookup_min (5) is above"),
])
def test_config_errors_name_the_field(text, message):
    with pytest.raises(LlmcError, match=re.escape(message)):
        SpeculativeConfig.parse(text)


# --- the engine -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine_file(tiny_llama_engine):
    return tiny_llama_engine(LIMITS)


def _run(engine: LLMEngine, prompts, params):
    """Each request's outputs (tokens, logprobs, finish reason), and the steps taken."""
    if isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    ids = [engine.add_request(p, q) for p, q in zip(prompts, params)]
    got = {rid: ([], [], None) for rid in ids}
    steps = 0
    while engine.has_unfinished():
        steps += 1
        for out in engine.step():
            tokens, logprobs, _ = got[out.request_id]
            got[out.request_id] = (tokens + out.token_ids, logprobs + (out.logprobs or []),
                                   out.finish_reason)
    return [got[r] for r in ids], steps


def _prompts(seed: int, n: int) -> list[list[int]]:
    """Prompts that repeat a phrase, so that the tiny model's greedy text repeats too."""
    rng = np.random.default_rng(seed)
    return [(rng.integers(3, 128, int(rng.integers(3, 7))).tolist() * 5)[
        :int(rng.integers(8, 24))] for _ in range(n)]


@pytest.mark.parametrize("k", [1, 3, 6])
def test_greedy_output_equals_plain_decoding_in_fewer_steps(engine_file, k):
    prompts = _prompts(k, 5)
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    plain, plain_steps = _run(_engine(engine_file), prompts, params)
    engine = _engine(engine_file, speculative=SpeculativeConfig(
        num_speculative_tokens=k, prompt_lookup_max=3, prompt_lookup_min=1))
    spec, spec_steps = _run(engine, prompts, params)
    assert spec == plain
    stats = engine.stats()
    assert stats.spec_accepted_tokens > 0 and spec_steps < plain_steps
    assert stats.spec_draft_tokens <= k * stats.spec_drafts
    # every kept guess saved a step: the tokens are those of the steps plus the kept guesses
    assert engine.kv.pool.num_free_blocks == engine.kv.pool.num_blocks   # nothing leaked


def test_one_request_guesses_as_far_as_it_may(engine_file):
    """Alone, a request takes k guesses a step; never past max_tokens."""
    engine = _engine(engine_file, speculative=SpeculativeConfig(num_speculative_tokens=7,
                                                                prompt_lookup_min=1))
    prompt = [5, 6, 7] * 6
    for max_tokens in (1, 2, 9, 23):
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        (got,), _ = _run(engine, [prompt], params)
        (want,), _ = _run(_engine(engine_file), [prompt], params)
        assert got == want and len(got[0]) == max_tokens


@pytest.mark.parametrize("settings", [
    dict(repetition_penalty=1.3),
    dict(frequency_penalty=0.05, presence_penalty=0.05),
    dict(logprobs=3),
    dict(temperature=0.7, top_k=1, seed=3),     # sampled, through the draw, but certain
    dict(min_tokens=12, stop_token_ids=[]),     # EOS banned for a while (ids set below)
], ids=["repetition", "frequency-presence", "logprobs", "sampled-top1", "min-tokens"])
def test_host_sampling_sees_the_guesses_before_each_row(engine_file, settings):
    """Penalties and min_tokens count the output so far: a row after guesses counts them."""
    prompts = _prompts(7, 4)
    if "min_tokens" in settings:   # make a token the model writes often a stop token
        (free,), _ = _run(_engine(engine_file), prompts[:1],
                          SamplingParams(max_tokens=30, ignore_eos=True))
        settings = {**settings, "stop_token_ids": [free[0][5]]}
    params = SamplingParams(max_tokens=30, ignore_eos="min_tokens" not in settings, **settings)
    plain, _ = _run(_engine(engine_file), prompts, params)
    engine = _engine(engine_file, speculative=SPEC)
    spec, _ = _run(engine, prompts, params)
    assert engine.stats().spec_accepted_tokens > 0
    for (t1, lp1, r1), (t2, lp2, r2) in zip(plain, spec):
        assert t1 == t2 and r1 == r2
        assert len(lp1) == len(lp2)
        for (a, top_a), (b, top_b) in zip(lp1, lp2):
            assert a == pytest.approx(b, abs=1e-4)
            assert list(top_a) == list(top_b)


def test_sampled_output_keeps_its_distribution(engine_file):
    """Seeded sampling at temperature 1: a token's frequency over many requests matches
    plain decoding's (the draws differ: a rejected row's draw is used up)."""
    prompt = [9, 10, 11, 12] * 4
    n = 300
    params = [SamplingParams(max_tokens=3, ignore_eos=True, temperature=1.0, seed=s)
              for s in range(n)]
    plain, _ = _run(_engine(engine_file), [prompt] * n, params)
    spec, _ = _run(_engine(engine_file, speculative=SPEC), [prompt] * n, params)

    def freq(runs, i):
        values = [tuple(t[:i + 1]) for t, _, _ in runs]
        return {v: values.count(v) / n for v in set(values)}
    for i in range(3):   # the first token: the same draw; then the prefixes' frequencies
        a, b = freq(plain, i), freq(spec, i)
        top = max(a, key=a.get)
        assert abs(a[top] - b.get(top, 0)) < 0.1, (i, a[top], b.get(top))
    assert [t[:1] for t, _, _ in plain] == [t[:1] for t, _, _ in spec]


def test_stops_inside_the_kept_guesses_end_the_output_there(engine_file):
    prompts = _prompts(11, 3)
    (free, *_), _ = _run(_engine(engine_file), prompts, SamplingParams(max_tokens=30,
                                                                      ignore_eos=True))
    stop = free[0][9]   # written after several repeats: inside a run of kept guesses
    params = SamplingParams(max_tokens=30, stop_token_ids=[stop])
    plain, _ = _run(_engine(engine_file), prompts, params)
    spec, _ = _run(_engine(engine_file, speculative=SPEC), prompts, params)
    assert spec == plain and plain[0][2] == "stop" and len(plain[0][0]) <= 9


def test_preemption_and_prefix_hits_keep_the_outputs(engine_file):
    """A pool too small for all requests preempts some; later requests share prefixes with
    those that guessed: every output still equals its plain solo run."""
    rng = np.random.default_rng(5)
    shared = [40, 41, 42, 43] * 4
    prompts = [shared + rng.integers(3, 128, int(rng.integers(1, 6))).tolist()
               for _ in range(6)] + _prompts(12, 4)
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    engine = _engine(engine_file, num_kv_blocks=14, speculative=SPEC)
    spec, _ = _run(engine, prompts, params)
    assert engine.scheduler.num_preemptions > 0 and engine.stats().spec_accepted_tokens > 0
    assert engine.kv.prefix_hits > 0
    assert engine.kv.pool.num_free_blocks == 14
    solo = [_run(_engine(engine_file, enable_prefix_caching=False), [p], params)[0][0]
            for p in prompts]
    assert spec == solo


def test_prompts_scored_beside_requests_that_guess(engine_file):
    """Prompt logprobs (a prompt's tokens in rows of their own) and guesses in the same
    steps: the same scores and tokens as without speculation."""
    prompts = _prompts(21, 6)
    params = [SamplingParams(max_tokens=16, ignore_eos=True,
                             prompt_logprobs=2 if i % 2 else None) for i in range(6)]

    def run(spec):
        engine = _engine(engine_file, speculative=spec)
        ids = [engine.add_request(p, q) for p, q in zip(prompts, params)]
        got = {rid: [[], None] for rid in ids}
        while engine.has_unfinished():
            for out in engine.step():
                got[out.request_id][0] += out.token_ids
                if out.prompt_logprobs is not None:
                    got[out.request_id][1] = out.prompt_logprobs
        return [got[r] for r in ids], engine.stats()
    (plain, _), (spec, stats) = run(None), run(SPEC)
    assert stats.spec_accepted_tokens > 0
    for (t1, s1), (t2, s2) in zip(plain, spec):
        assert t1 == t2 and (s1 is None) == (s2 is None)
        if s1 is not None:
            assert len(s1) == len(s2)
            np.testing.assert_allclose([e[0] for e in s1[1:]], [e[0] for e in s2[1:]],
                                       atol=1e-4)


def test_structured_requests_do_not_guess(engine_file):
    engine = _engine(engine_file, speculative=SPEC)
    params = SamplingParams(max_tokens=12, structured_outputs={"regex": "(w5 )+"})
    _run(engine, [[5, 5, 5, 5, 5]], params)
    assert engine.stats().spec_drafts == 0


def test_guesses_only_where_the_batch_has_rows_to_spare(engine_file):
    """No guesses while a request waits to start or while the batch's rows are full; once
    requests finish, those left guess."""
    engine = _engine(engine_file, speculative=SPEC)
    for i, p in enumerate(_prompts(3, LIMITS.max_batch_size)):
        engine.add_request(p, SamplingParams(max_tokens=4 + 8 * (i % 2), ignore_eos=True))
    while len(engine.scheduler.waiting) + len(engine.scheduler.running) == 8:
        engine.step()
        assert engine.stats().spec_drafts == 0
    while engine.has_unfinished():
        engine.step()
    assert engine.stats().spec_drafts > 0
    # and none while more than disable_by_batch_size run
    engine = _engine(engine_file, speculative=SpeculativeConfig(
        prompt_lookup_min=1, disable_by_batch_size=2))
    for p, n in zip(_prompts(4, 3), (4, 20, 20)):
        engine.add_request(p, SamplingParams(max_tokens=n, ignore_eos=True))
    engine.step()
    while len(engine.scheduler.running) == 3:
        assert engine.step() is not None and engine.stats().spec_drafts == 0
    assert engine.has_unfinished()   # two run on, and guess
    while engine.has_unfinished():
        engine.step()
    assert engine.stats().spec_drafts > 0


def test_runner_takes_the_option_text(engine_file):
    from llmc.runtime.runner import Runner

    with pytest.raises(LlmcError, match="no field 'k'"):
        Runner(engine_file, speculative='{"k": 1}')
    runner = Runner(engine_file, speculative='{"num_speculative_tokens": 3, '
                                             '"prompt_lookup_min": 1}')
    try:
        params = SamplingParams(max_tokens=20, ignore_eos=True)
        got = runner.complete([[7, 8, 9] * 4], params)[0]
        assert got.token_ids == _run(_engine(engine_file), [[7, 8, 9] * 4], params)[0][0][0]
        assert runner.engine.stats().spec_accepted_tokens > 0
    finally:
        runner.close()


def test_server_counts_guesses(tiny_chat_engine):
    from server_client import serving, wait_idle

    with serving(tiny_chat_engine, "tiny", runner_options={"speculative": SPEC}) as served:
        prompt = "w5 w6 w7 " * 5
        text = served.client.completions.create(model="tiny", prompt=prompt, max_tokens=20,
                                                temperature=0,
                                                extra_body={"ignore_eos": True}).choices[0].text
        m = wait_idle(served.url)
    assert len(text.split()) == 20
    assert m["llmc_spec_decode_num_drafts_total"] > 0
    assert 0 < m["llmc_spec_decode_num_accepted_tokens_total"] \
        <= m["llmc_spec_decode_num_draft_tokens_total"]


@pytest.mark.slow
def test_smollm2_repeats_its_input_in_fewer_steps(smollm2_engine):
    """A real model asked to copy a sentence: most guesses are kept, and the text is the
    greedy text of plain decoding."""
    from tokenizers import Tokenizer

    header = EngineFile(smollm2_engine).header
    tok = Tokenizer.from_str(header.tokenizer.json)
    sentence = ("The old lighthouse keeper climbed the spiral stairs every evening, lit the "
                "great lamp, and watched the ships pass safely through the narrow channel.")
    prompt = tok.encode(f"<|im_start|>user\nRepeat this sentence exactly: {sentence}"
                        "<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False).ids
    params = SamplingParams(max_tokens=40)
    plain, plain_steps = _run(_engine(smollm2_engine), [prompt], params)
    engine = _engine(smollm2_engine, speculative=SpeculativeConfig())
    spec, spec_steps = _run(engine, [prompt], params)
    assert spec[0][0] == plain[0][0]
    assert tok.decode(spec[0][0]).startswith("The old lighthouse keeper")
    s = engine.stats()
    assert s.spec_accepted_tokens / s.spec_draft_tokens > 0.5
    assert spec_steps < plain_steps / 2


def test_bench_reports_the_guesses_kept(tiny_chat_engine, tmp_path):
    """`llmc bench --speculative-config` and `llmc run` with it: the table's line, the
    JSON's counts, and run's text equal to plain decoding's."""
    import json
    import subprocess
    import sys

    dataset = tmp_path / "prompts.jsonl"
    dataset.write_text("".join(json.dumps({"prompt": "w5 w6 w7 " * (3 + i)}) + "\n"
                               for i in range(3)))

    def llmc(*args):
        r = subprocess.run([sys.executable, "-m", "llmc", *map(str, args)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        return r
    spec = '{"num_speculative_tokens": 3, "prompt_lookup_min": 1}'
    r = llmc("bench", tiny_chat_engine, "--dataset", dataset, "--output-len", "12", "--json",
             "--speculative-config", spec)
    s = json.loads(r.stdout)["spec_decode"]
    assert s["drafts"] > 0 and 0 < s["accepted_tokens"] <= s["draft_tokens"]
    assert s["acceptance_rate"] == pytest.approx(s["accepted_tokens"] / s["draft_tokens"])
    assert "speculative decoding: ngram, up to 3 tokens a step" in r.stderr
    r = llmc("bench", tiny_chat_engine, "--dataset", dataset, "--output-len", "12",
             "--speculative-config", spec)
    assert "guesses kept" in r.stdout
    run = ["run", tiny_chat_engine, "-p", "w5 w6 w7 w5 w6 w7", "--max-new-tokens", "16"]
    assert llmc(*run, "--speculative-config", spec).stdout == llmc(*run).stdout
