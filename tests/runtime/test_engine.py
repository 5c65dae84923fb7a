"""The in-flight-batching engine on the reference backend: requests join and leave, the KV
cache preempts and reuses prefixes, and every greedy request still equals its solo run."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
from engines import open_engine as _engine

from llmc.limits import BuildLimits
from llmc.runtime.engine import LLMEngine
from llmc.runtime.runner import Runner
from llmc.runtime.sampler import SamplingParams

LIMITS = BuildLimits(max_batch_size=4, max_num_tokens=24, max_seq_len=64, kv_block_size=8)


@pytest.fixture(scope="module")
def engine_file(tiny_llama_engine):
    return tiny_llama_engine(LIMITS)


def _run(engine: LLMEngine, prompts, params) -> dict[str, list[int]]:
    ids = [engine.add_request(p, params) for p in prompts]
    tokens = {rid: [] for rid in ids}
    reasons = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
            if out.finished:
                reasons[out.request_id] = out.finish_reason
    return [tokens[r] for r in ids], [reasons[r] for r in ids]


def _solo(engine_file, prompt, params):
    return _run(_engine(engine_file), [prompt], params)[0][0]


GREEDY = SamplingParams(max_tokens=10, ignore_eos=True)


def _prompts(rng, n, shared=None):
    out = []
    for _ in range(n):
        body = rng.integers(3, 128, int(rng.integers(1, 30))).tolist()
        out.append((shared or []) + body)
    return out


def test_batched_greedy_equals_each_alone(engine_file):
    rng = np.random.default_rng(0)
    prompts = _prompts(rng, 6)
    together, reasons = _run(_engine(engine_file), prompts, GREEDY)
    assert together == [_solo(engine_file, p, GREEDY) for p in prompts]
    assert reasons == ["length"] * 6 and all(len(t) == 10 for t in together)


def test_preemption_keeps_every_request_and_its_greedy_output(engine_file):
    """A pool of 12 blocks of 8 tokens cannot hold four 40-token sequences at once."""
    rng = np.random.default_rng(1)
    prompts = _prompts(rng, 8)
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    engine = _engine(engine_file, num_kv_blocks=12)
    together, reasons = _run(engine, prompts, params)
    assert engine.scheduler.num_preemptions > 0
    assert together == [_solo(engine_file, p, params) for p in prompts]
    assert engine.kv.pool.num_free_blocks == 12          # nothing leaked
    stats = engine.stats()                                # what a server's /metrics shows
    assert stats.preemptions == engine.scheduler.num_preemptions
    assert (stats.waiting, stats.running, stats.kv_blocks_used, stats.kv_blocks_total) == (
        0, 0, 0, 12)


def test_step_inputs_are_those_of_the_requests(engine_file):
    """Whatever the engine keeps from step to step (a decode step's tokens, contexts and
    block tables, packed unchecked), each step's inputs are what `pack_step` makes from the
    scheduled requests themselves, through joins, finishes and preemptions."""
    from llmc import contract

    engine = _engine(engine_file, num_kv_blocks=12)
    build_inputs, kept = engine._inputs, []

    def checked(plan):
        inputs = build_inputs(plan)
        chunks = [contract.Chunk(r.tokens(r.num_computed_tokens, n), r.num_computed_tokens,
                                 engine.kv.block_ids(r)) for r, n in plan.scheduled]
        want = contract.pack_step(chunks, engine.block_size)
        assert inputs.keys() == want.keys()
        for name, array in want.items():
            assert inputs[name].dtype == np.int32 and inputs[name].tolist() == array.tolist()
        kept.append(plan.tables is not None)
        return inputs

    engine._inputs = checked
    rng = np.random.default_rng(3)
    _run(engine, _prompts(rng, 8), SamplingParams(max_tokens=30, ignore_eos=True))
    assert engine.scheduler.num_preemptions > 0 and sum(kept) > 20   # decode steps kept


def test_prefix_caching_skips_shared_blocks_and_changes_nothing(engine_file):
    rng = np.random.default_rng(2)
    shared = rng.integers(3, 128, 17).tolist()          # two full blocks of 8, and a bit
    prompts = _prompts(rng, 4, shared)
    engine = _engine(engine_file)
    first, _ = _run(engine, prompts[:1], GREEDY)
    rid = engine.add_request(prompts[1], GREEDY)
    cached = None
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id == rid and out.finished:
                cached = out.cached_tokens
    assert cached == 16
    uncached = _engine(engine_file, enable_prefix_caching=False)
    assert _run(engine, prompts, GREEDY)[0] == _run(uncached, prompts, GREEDY)[0]


def test_a_bad_request_errors_alone(engine_file):
    engine = _engine(engine_file)
    good = engine.add_request([5, 6, 7], GREEDY)
    empty = engine.add_request([], GREEDY)
    long = engine.add_request(list(range(3, 70)), GREEDY)
    outside = engine.add_request([5, 999], GREEDY)
    bad = engine.add_request([5], SamplingParams(temperature=float("nan")))
    finished = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert finished[good].finish_reason == "length"
    assert "empty" in finished[empty].error
    assert "this engine allows at most 63 prompt tokens" in finished[long].error
    assert "outside the vocabulary" in finished[outside].error
    assert "temperature" in finished[bad].error
    assert {finished[r].finish_reason for r in (empty, long, outside, bad)} == {"error"}


def test_abort_frees_the_request(engine_file):
    engine = _engine(engine_file)
    rid = engine.add_request([5, 6, 7], SamplingParams(max_tokens=40, ignore_eos=True))
    engine.step()
    engine.abort(rid)
    outs = engine.step()
    assert [(o.request_id, o.finish_reason) for o in outs if o.finished] == [(rid, "abort")]
    assert engine.kv.pool.num_free_blocks == engine.kv.pool.num_blocks


def test_seed_is_per_request_not_per_position(engine_file):
    """Neither the batch row nor how a long prompt was chunked (the budget is shared)
    changes a seeded request's tokens."""
    params = SamplingParams(temperature=1.0, seed=7, max_tokens=8, ignore_eos=True)
    long = list(range(3, 33))                   # 30 tokens: two prefill chunks of <= 24
    first = [5] * 20                            # so the long prompt takes three chunks
    a, _ = _run(_engine(engine_file), [first, [9, 9, 9], long], params)
    b, _ = _run(_engine(engine_file), [long, [9, 9, 9], first], params)
    assert a == b[::-1]
    assert a[2] == _solo(engine_file, long, params)


def test_threads_sharing_one_runner_get_their_serial_outputs(engine_file):
    runner = Runner(engine_file)
    prompts = [f"w{3 + i} w{40 + i} w{7 * i % 100 + 3}" for i in range(8)]
    serial = [runner.generate(p, max_new_tokens=6)[0] for p in prompts]
    for _ in range(20):
        got = [None] * 8

        def work(i):
            got[i] = runner.generate(prompts[i], max_new_tokens=6)[0]
        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert got == serial
    runner.close()


def test_stream_yields_every_request_s_deltas(engine_file):
    runner = Runner(engine_file)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    texts, finished = ["", ""], []
    for index, out in runner.stream(["w3 w4", "w9"], params):
        texts[index] += out.text
        if out.finished:
            finished.append((index, out.finish_reason))
    assert sorted(finished) == [(0, "length"), (1, "length")]
    assert texts == [r.text for r in runner.complete(["w3 w4", "w9"], params)]
    runner.close()


def test_a_failing_callback_fails_its_request_alone(engine_file):
    runner = Runner(engine_file)

    def on_output(index, out):
        if index == 1:
            raise ValueError("boom")
    results = runner.complete(["w3 w4", "w5 w6", "w7"], SamplingParams(max_tokens=5,
                                                                       ignore_eos=True),
                              on_output=on_output)
    assert [r.finish_reason for r in results] == ["length", "error", "length"]
    assert "ValueError: boom" in results[1].error
    runner.close()


def test_async_engine_streams_and_cancels(engine_file):
    from llmc.runtime.engine_loop import AsyncEngine, EngineLoop

    loop = EngineLoop(_engine(engine_file))
    engine = AsyncEngine(loop)

    async def main():
        params = SamplingParams(max_tokens=6, ignore_eos=True)
        full = [out async for out in engine.generate([5, 6, 7], params)]
        assert full[-1].finished and sum(len(o.token_ids) for o in full) == 6
        async for out in engine.generate([5, 6, 7], SamplingParams(max_tokens=50,
                                                                   ignore_eos=True)):
            break   # leaving early aborts the request
        await asyncio.sleep(0.2)
        return loop.engine.kv.pool.num_free_blocks == loop.engine.kv.pool.num_blocks

    assert asyncio.run(main())
    loop.close()


@pytest.mark.slow
def test_soak_random_requests_against_a_small_pool(engine_file):
    """1,000 requests: random lengths, shared prefixes, max_tokens and cancellations against
    a pool small enough to preempt and evict: every finished greedy request equals its solo
    run, none is lost, no block leaks."""
    rng = np.random.default_rng(3)
    engine = _engine(engine_file, num_kv_blocks=14)
    shared = rng.integers(3, 128, 16).tolist()
    wanted, tokens, finished, params_of = {}, {}, {}, {}
    for i in range(1000):
        prompt = (shared if rng.random() < 0.5 else []) + rng.integers(
            3, 128, int(rng.integers(1, 20))).tolist()
        params = SamplingParams(max_tokens=int(rng.integers(1, 16)), ignore_eos=True)
        rid = engine.add_request(prompt, params)
        wanted[rid], tokens[rid], params_of[rid] = prompt, [], params
        if rng.random() < 0.3:
            for out in engine.step():
                tokens[out.request_id] += out.token_ids
                if out.finished:
                    finished[out.request_id] = out.finish_reason
        if rng.random() < 0.05:
            engine.abort(rid)
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
            if out.finished:
                finished[out.request_id] = out.finish_reason
    assert set(finished) == set(wanted)
    assert engine.kv.pool.num_free_blocks == 14
    for rid, reason in finished.items():
        if reason == "length":
            assert tokens[rid] == _solo(engine_file, wanted[rid], params_of[rid]), rid
