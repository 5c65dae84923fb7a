"""Runtime: block pool, sampler, the generation loop and Runner on a real tiny engine."""

from __future__ import annotations

import pytest

from llmc.backends.reference import ReferenceSession
from llmc.build import BuildOptions, build
from llmc.engine_file import EngineFile
from llmc.errors import LlmcError
from llmc.limits import BuildLimits
from llmc.runtime.generator import generate
from llmc.runtime.kv_cache import BlockPool, blocks_needed
from llmc.runtime.runner import Runner, render_chat
from llmc.runtime.sampler import SamplingParams

LIMITS = BuildLimits(max_batch_size=2, max_num_tokens=12, max_seq_len=48, kv_block_size=8)


@pytest.fixture(scope="module")
def tiny_engine(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("rt") / "tiny.engine"
    build(BuildOptions(tiny_models["llama-gqa"][0], out, dtype="fp32", limits=LIMITS),
          log=lambda _: None)
    return out


def test_block_pool_exact_ids():
    pool = BlockPool(5)
    assert pool.allocate(2) == [0, 1] and pool.allocate(2) == [2, 3]
    assert pool.allocate(2) is None and pool.num_free == 1
    pool.free([1, 0])
    assert pool.allocate(3) == [4, 1, 0] and pool.num_free == 0
    assert [blocks_needed(n, 8) for n in (1, 8, 9, 16, 17)] == [1, 1, 2, 2, 3]


def test_batching_does_not_change_results(tiny_engine):
    """5 prompts through 2 slots and 12-token steps (chunked prefill, a waiting queue) give
    the same tokens as each prompt alone."""
    session = ReferenceSession(EngineFile(tiny_engine))
    prompts = [[5, 6, 7], list(range(10, 40)), [9] * 17, [3], list(range(60, 80))]
    together = generate(session, LIMITS, prompts, 6, SamplingParams())
    for prompt, seq in zip(prompts, together):
        alone = generate(session, LIMITS, [prompt], 6, SamplingParams())[0]
        assert seq.generated == alone.generated and len(seq.generated) == 6
    runs = [[s.generated for s in generate(session, LIMITS, prompts, 6,
                                           SamplingParams(1.0, seed=3))] for _ in range(2)]
    assert runs[0] == runs[1]   # seeded sampling is reproducible


def test_stops_at_eos_and_length(tiny_engine):
    session = ReferenceSession(EngineFile(tiny_engine))
    greedy = generate(session, LIMITS, [[5, 6, 7]], 6, SamplingParams())[0].generated
    seq = generate(session, LIMITS, [[5, 6, 7]], 6, SamplingParams(), eos_ids=(greedy[2],))[0]
    assert seq.generated == greedy[:3] and seq.finish_reason == "eos"
    long = generate(session, LIMITS, [list(range(3, 45))], 50, SamplingParams())[0]
    assert len(long.tokens) == LIMITS.max_seq_len and long.finish_reason == "length"


def test_prompt_longer_than_the_engine_allows(tiny_engine):
    runner = Runner(tiny_engine)
    with pytest.raises(LlmcError, match="the prompt has 48 tokens; this engine allows at most "
                                        "47 prompt tokens .*--max-seq-len"):
        runner.generate(" ".join(f"w{3 + i % 100}" for i in range(48)))
    with pytest.raises(LlmcError, match="prompt is empty"):
        runner.generate("")


@pytest.mark.parametrize("prompts, message", [
    (123, "prompts are a string or a list of strings, not int"),
    (None, "prompts are a string or a list of strings, not NoneType"),
    ([None], "a prompt is a string or a list of token ids, not NoneType"),
    ([b"x"], "a prompt is a string or a list of token ids, not bytes"),
    ([{"prompt": "w3"}], "a prompt is a string or a list of token ids, not dict"),
])
def test_runner_refuses_what_is_not_a_prompt(tiny_engine, prompts, message):
    runner = Runner(tiny_engine)
    with pytest.raises(LlmcError, match=message):
        runner.generate(prompts, max_new_tokens=2)
    runner.close()


def test_runner_text_and_streaming(tiny_engine):
    runner = Runner(tiny_engine)
    texts = runner.generate(["w5 w6 w7", "w9 w9"], max_new_tokens=5)
    assert all(len(t.split()) == 5 and all(w.startswith("w") for w in t.split()) for t in texts)
    streamed = []
    again = runner.generate("w5 w6 w7", max_new_tokens=5, on_text=lambda i, t: streamed.append(t))
    assert again == texts[:1] and "".join(streamed).strip() == texts[0]


def test_chat_template_rendering():
    template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}"
                "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    assert render_chat(template, [{"role": "user", "content": "hi"}], "</s>") == \
        "<|user|>hi</s><|assistant|>"
    with pytest.raises(LlmcError, match="chat template error: no"):
        render_chat("{{ raise_exception('no') }}", [])
