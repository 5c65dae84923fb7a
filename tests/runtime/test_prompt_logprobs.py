"""Prompt logprobs (`SamplingParams.prompt_logprobs`, vLLM's name): the engine scores every
prompt token after the first with the logits of the step that fed the token before it.

On the reference backend, against HF transformers' log-softmax over the same prompt (fp32
engine, bound 2e-4), mixed with requests that only generate, through preemptions and past
the prefix cache; what scoring may not change (a request's generated tokens) stays equal to
its run without it.
"""

from __future__ import annotations

import numpy as np
import pytest
from engines import open_engine as _engine

from llmc.build import BuildOptions, build
from llmc.engine_file import EngineFile
from llmc.errors import LlmcError
from llmc.limits import BuildLimits
from llmc.runtime.engine import LLMEngine
from llmc.runtime.runner import open_session
from llmc.runtime.sampler import SamplingParams

LIMITS = BuildLimits(max_batch_size=4, max_num_tokens=24, max_seq_len=64, kv_block_size=8)
TOL = 2e-4
# one token (nothing to score), two, a block's worth and more, and past two blocks
LENGTHS = (1, 2, 8, 13, 30)


@pytest.fixture(scope="module")
def llama(tiny_models, tiny_llama_engine):
    return tiny_llama_engine(LIMITS), tiny_models["llama-gqa"][1]


def _run(engine: LLMEngine, requests):
    """requests: (prompt, params) pairs, all queued at once -> per request: its generated
    tokens, its prompt logprobs (None when not asked), its finish reason."""
    ids = [engine.add_request(p, params) for p, params in requests]
    out = {rid: [[], None, None] for rid in ids}
    while engine.has_unfinished():
        for o in engine.step():
            rec = out[o.request_id]
            rec[0] += o.token_ids
            if o.prompt_logprobs is not None:
                assert rec[1] is None, "prompt logprobs come once"
                rec[1] = o.prompt_logprobs
            if o.finished:
                rec[2] = o.finish_reason
    return [out[r] for r in ids]


def _hf(model, prompt, k):
    """HF's log-softmax at each position before the last: each next token's logprob and the
    k most likely tokens."""
    import torch

    with torch.no_grad():
        lp = model(torch.tensor([prompt])).logits[0, :-1].double().log_softmax(-1)
    target = lp[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])].numpy()
    return target, lp.topk(k, -1).indices.numpy(), lp.numpy()


def _check(model, prompt, scores, k):
    assert len(scores) == len(prompt) and scores[0] is None
    if len(prompt) == 1:
        return
    target, top_ids, lp = _hf(model, prompt, k)
    got = np.array([s[0] for s in scores[1:]])
    np.testing.assert_allclose(got, target, atol=TOL)
    for i, (_, top) in enumerate(scores[1:]):
        assert [t for t, _ in top] == top_ids[i].tolist()
        np.testing.assert_allclose([v for _, v in top], lp[i, top_ids[i]], atol=TOL)


def _prompts(seed=0, lengths=LENGTHS):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 128, n).tolist() for n in lengths]


@pytest.mark.parametrize("max_tokens", [0, 5])
def test_prompt_logprobs_equal_hf_among_generating_requests(llama, max_tokens):
    path, model = llama
    prompts = _prompts()
    scored = SamplingParams(max_tokens=max_tokens, ignore_eos=True, prompt_logprobs=3)
    plain = SamplingParams(max_tokens=5, ignore_eos=True)
    others = _prompts(seed=1, lengths=(20, 3))   # generate only, in the same steps
    results = _run(_engine(path), [(p, scored) for p in prompts] + [(p, plain) for p in others])
    alone = _run(_engine(path), [(p, plain) for p in prompts + others])
    for prompt, (tokens, scores, reason) in zip(prompts, results):
        _check(model, prompt, scores, 3)
        assert reason == "length"
        # scoring changes nothing that is generated
        assert tokens == (alone[prompts.index(prompt)][0] if max_tokens else [])
    for (tokens, scores, _), (ref, _, _) in zip(results[len(prompts):], alone[len(prompts):]):
        assert scores is None and tokens == ref


def test_prompt_scoring_through_preemption_and_the_prefix_cache(llama):
    """12 blocks of 8 tokens cannot hold these at once: requests are preempted and their
    prompts recomputed; the same prompt twice is scored in full both times (its blocks are
    cached by then, and scoring skips them)."""
    path, model = llama
    prompts = _prompts(seed=2, lengths=(30, 30, 25, 30))
    prompts.append(prompts[0])
    params = SamplingParams(max_tokens=12, ignore_eos=True, prompt_logprobs=2)
    engine = _engine(path, num_kv_blocks=12)
    results = _run(engine, [(p, params) for p in prompts])
    assert engine.scheduler.num_preemptions > 0
    alone = _run(_engine(path), [(p, SamplingParams(max_tokens=12, ignore_eos=True))
                                 for p in prompts])
    for prompt, (tokens, scores, _), (ref, _, _) in zip(prompts, results, alone):
        _check(model, prompt, scores, 2)
        assert tokens == ref
    assert engine.kv.pool.num_free_blocks == 12


def test_a_scoring_request_brings_its_prompt_a_row_a_token(llama):
    """A step returns one row of logits a sequence, so a scored prompt's tokens go in rows
    of their own, as many as the batch's rows leave (max_batch_size 4): beside a request
    that waits, 3 (one row kept for it), then 4, then the last 3."""
    path, _ = llama
    engine = _engine(path)
    a = engine.add_request(list(range(3, 13)), SamplingParams(max_tokens=0, prompt_logprobs=0))
    b = engine.add_request(list(range(3, 13)), SamplingParams(max_tokens=1))
    plan = engine.scheduler.schedule()
    assert [(r.request_id, n) for r, n in plan.scheduled] == [(a, 3), (b, 10)]
    assert list(plan.split.values()) == [3] and plan.extra_rows == 2
    engine = _engine(path)
    a = engine.add_request(list(range(3, 13)), SamplingParams(max_tokens=0, prompt_logprobs=0))
    b = engine.add_request(list(range(3, 13)), SamplingParams(max_tokens=1))
    steps = 0
    while engine.has_unfinished():
        steps += 1
        for o in engine.step():
            if o.request_id == a and o.finished:
                assert o.prompt_logprobs[1][1] == []   # top-0: the token's own logprob only
                assert len(o.prompt_logprobs) == 10
    assert steps == 3   # tokens 0-2, 3-6, 7-9 (9 fed to no use: max_tokens 0)


def test_prompt_logprobs_settings_are_checked():
    with pytest.raises(LlmcError, match="max_tokens must be an integer >= 1"):
        SamplingParams(max_tokens=0).validate()
    with pytest.raises(LlmcError, match="prompt_logprobs must be an integer"):
        SamplingParams(prompt_logprobs=21).validate()
    SamplingParams(max_tokens=0, prompt_logprobs=0).validate()


# --------------------------------------------------------------------------- on the GPU

def _why_not() -> str:
    from llmc.devices import list_gpus

    gpus, why = list_gpus()
    if not gpus:
        return f"needs an NVIDIA GPU ({why})"
    from llmc.backends.cuda.session import runtime_missing

    return runtime_missing()


@pytest.mark.gpu
@pytest.mark.skipif(bool(_why_not()), reason=_why_not() or "-")
def test_cuda_engine_scores_prompts_as_the_reference_engine(tiny_models_d64, tmp_path):
    """The cuda backend's steps of a token a prompt (its decode kernels, CUDA graphs on) next
    to requests that generate, against the reference backend's engine of the same fp16
    graph; bound 5e-3 on a logprob (measured on an H200: 5.2e-4 to 6.7e-4 over these three
    prompts)."""
    folder, _ = tiny_models_d64["llama-gqa"]
    limits = BuildLimits(max_batch_size=4, max_num_tokens=64, max_seq_len=64, kv_block_size=16)
    results = []
    for backend in ("reference", "cuda"):
        out = tmp_path / f"{backend}.engine"
        build(BuildOptions(folder, out, backend=backend, dtype="fp16", limits=limits),
              log=lambda _: None)
        e = EngineFile(out)
        session = open_session(e, max_kv_blocks=64) if backend == "cuda" else open_session(e)
        scored = SamplingParams(max_tokens=3, ignore_eos=True, prompt_logprobs=2)
        plain = SamplingParams(max_tokens=6, ignore_eos=True)
        prompts = _prompts(seed=3, lengths=(5, 17, 40))
        results.append(_run(LLMEngine(session, e.header),
                            [(p, scored) for p in prompts] + [(prompts[1], plain)]))
    for (t_ref, s_ref, _), (t_cuda, s_cuda, _) in zip(*results):
        assert len(t_cuda) == len(t_ref)
        if s_ref is None:
            assert s_cuda is None
            continue
        got, want = (np.array([e[0] for e in s[1:]]) for s in (s_cuda, s_ref))
        assert np.abs(got - want).max() < 5e-3
        for (_, top_cuda), (_, top_ref) in zip(s_cuda[1:], s_ref[1:]):
            ref = dict(top_ref)
            assert all(abs(v - ref[t]) < 5e-3 for t, v in top_cuda if t in ref)
            if top_ref[0][1] - top_ref[1][1] > 1e-2:   # no near-tie: the same most likely
                assert top_cuda[0][0] == top_ref[0][0]
