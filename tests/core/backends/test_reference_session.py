"""The reference session feeds the graph only the blocks a step names (issue #8, item 5):
bit for bit what the same graph computes over the whole pool, the pools written in place."""

from __future__ import annotations

import numpy as np
import pytest

from llmc import contract
from llmc.backends.reference import ReferenceSession
from llmc.build import BuildOptions, build
from llmc.engine_file import EngineFile
from llmc.limits import BuildLimits

BLOCK = 8


@pytest.fixture(scope="module")
def session(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "tiny.engine"
    build(BuildOptions(model=tiny_models["mistral-window"][0], output=out, backend="reference",
                       dtype="fp16", limits=BuildLimits(4, 64, 64, BLOCK)), log=lambda _: None)
    return ReferenceSession(EngineFile(out))


def test_step_over_named_blocks_equals_the_whole_pool(session):
    """Ragged steps over shuffled blocks of a 40-block pool (prefill, decode, a mixed step
    with one sequence sitting out): logits and every pool, untouched blocks included, equal
    the graph run on the whole pool, and the pools are the arrays allocated at the start."""
    rng = np.random.default_rng(0)
    session.allocate_kv(40)
    pools = list(session.kv)
    for kv in pools:   # stale data in every block, as a pool that has been used holds
        kv[...] = rng.standard_normal(kv.shape)
    whole = [kv.copy() for kv in pools]
    blocks = rng.permutation(40)[:24].reshape(3, 8).tolist()
    tokens = [[], [], []]
    steps = [{0: 5, 1: 19, 2: 13}, {0: 1, 1: 1, 2: 1}, {0: 1, 2: 11}, {1: 1, 2: 1}]
    for step in steps:
        chunks = []
        for s, n in step.items():
            new = rng.integers(0, 128, n).tolist()
            chunks.append(contract.Chunk(new, len(tokens[s]), blocks[s]))
            tokens[s] += new
        inputs = contract.pack_step(chunks, BLOCK)
        names = [contract.LOGITS] + [contract.kv_cache_output(i) for i in range(len(whole))]
        feeds = {**inputs, **{contract.kv_cache_input(i): kv for i, kv in enumerate(whole)}}
        expected, *whole = session._sess.run(names, feeds)   # the graph on the whole pool
        logits = session.step(inputs)
        assert np.array_equal(logits, expected)
        assert all(a is b for a, b in zip(session.kv, pools))
        for kv, ref in zip(pools, whole):
            assert np.array_equal(kv, ref)
