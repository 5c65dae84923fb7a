"""Runner on a real tiny engine: batching, stops, refusals, text and streaming."""

from __future__ import annotations

import pytest

from llmc.build import BuildOptions, build
from llmc.errors import LlmcError
from llmc.limits import BuildLimits
from llmc.runtime.runner import Runner, render_chat
from llmc.runtime.sampler import SamplingParams

LIMITS = BuildLimits(max_batch_size=2, max_num_tokens=12, max_seq_len=48, kv_block_size=8)


@pytest.fixture(scope="module")
def tiny_engine(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("rt") / "tiny.engine"
    build(BuildOptions(tiny_models["llama-gqa"][0], out, dtype="fp32", limits=LIMITS),
          log=lambda _: None)
    return out


def test_batching_does_not_change_results(tiny_engine):
    """5 prompts through 2 rows and 12-token steps (chunked prefill, a waiting queue) give
    the same tokens as each prompt alone."""
    runner = Runner(tiny_engine)
    prompts = [[5, 6, 7], list(range(10, 40)), [9] * 17, [3], list(range(60, 80))]
    greedy = SamplingParams(max_tokens=6, ignore_eos=True)
    together = runner.complete(prompts, greedy)
    for prompt, result in zip(prompts, together):
        assert result.token_ids == runner.complete([prompt], greedy)[0].token_ids
        assert len(result.token_ids) == 6 and result.finish_reason == "length"
    seeded = SamplingParams(1.0, seed=3, max_tokens=6, ignore_eos=True)
    runs = [[r.token_ids for r in runner.complete(prompts, seeded)] for _ in range(2)]
    assert runs[0] == runs[1]   # seeded sampling is reproducible
    runner.close()


def test_stops_at_a_stop_token_and_at_max_seq_len(tiny_engine):
    runner = Runner(tiny_engine)
    greedy = runner.complete([[5, 6, 7]], SamplingParams(max_tokens=6, ignore_eos=True))[0]
    stop = greedy.token_ids[2]
    until = greedy.token_ids[:greedy.token_ids.index(stop)]
    stopped = runner.complete([[5, 6, 7]], SamplingParams(max_tokens=6, ignore_eos=True,
                                                          stop_token_ids=(stop,)))[0]
    assert stopped.token_ids == until and stopped.finish_reason == "stop"
    prompt = list(range(3, 45))
    long = runner.complete([prompt], SamplingParams(max_tokens=50, ignore_eos=True))[0]
    assert len(prompt) + len(long.token_ids) == LIMITS.max_seq_len
    assert long.finish_reason == "length"
    runner.close()


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
    with pytest.raises(LlmcError, match="chat template error: .*has no attribute 'nope'"):
        render_chat("{{ messages[0].nope.x }}", [{"role": "user", "content": "hi"}])
