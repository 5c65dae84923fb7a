"""Reasoning outputs: <think>...</think> apart from the answer, whole and streamed, with tool
calls after it; chat_template_kwargs (Qwen3's enable_thinking) through the real server."""

from __future__ import annotations

import random

import pytest
from server_client import request, serving

from llmc.build import BuildOptions, build
from llmc.limits import BuildLimits
from llmc.runtime import openai_api as api
from llmc.runtime import reasoning
from llmc.runtime.runner import Runner
from llmc.runtime.sampler import SamplingParams
from llmc.runtime.tools import ToolChoice

# Thinks by default, with the block opened in the prompt (as DeepSeek-R1's and QwQ's do);
# enable_thinking false closes an empty block there instead (as Qwen3's does).
THINKING = """{%- for m in messages %}<|{{ m['role'] }}|>
{{ m['content'] }}</s>
{% endfor %}
{%- if add_generation_prompt %}<|assistant|>
{% if enable_thinking is defined and enable_thinking is false %}<think>

</think>

{% else %}<think>
{% endif %}{% endif %}"""

REPLIES = [
    # (reply, prompt opened the block, reasoning, content)
    ("<think>\nParis is in France.\n</think>\n\nParis.", False, "Paris is in France.",
     "Paris."),
    ("Paris is in France.</think>Paris.", True, "Paris is in France.", "Paris."),
    ("still thinking when max_tokens came", True, "still thinking when max_tokens came", None),
    ("<think>cut short", False, "cut short", None),
    ("Just an answer.", False, None, "Just an answer."),
    ("An answer that writes </think> mid-text", False, None,
     "An answer that writes </think> mid-text"),
    ("<think></think>Answer at once.", False, None, "Answer at once."),
    ("  <thin", False, None, "  <thin"),
]


@pytest.mark.parametrize("reply,opened,want_reasoning,want_content", REPLIES)
def test_a_reply_s_reasoning_and_content(reply, opened, want_reasoning, want_content):
    assert reasoning.split(reply, opened) == (want_reasoning, want_content)


def pieces(text: str, rng: random.Random) -> list[str]:
    if len(text) < 2:
        return [text]
    cuts = sorted(rng.sample(range(1, len(text)), min(5, len(text) - 1)))
    return [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]


def streamed(reply: api.ChatReply, parts: list[str], reason: str = "stop"):
    """What a client gathers from a streamed reply: reasoning, content, calls, reason."""
    got = {"reasoning": "", "content": "", "calls": []}
    for i, part in enumerate(parts):
        delta, final = reply.chunk(part, i == len(parts) - 1, reason if i == len(parts) - 1
                                   else None)
        assert delta.get("reasoning") == delta.get("reasoning_content")
        got["reasoning"] += delta.get("reasoning") or ""
        got["content"] += delta.get("content", "")
        got["calls"] += [(c["function"]["name"], c["function"]["arguments"])
                         for c in delta.get("tool_calls", [])]
    return got, final


@pytest.mark.parametrize("reply,opened,want_reasoning,want_content", REPLIES)
def test_a_streamed_reply_says_what_the_whole_one_says(reply, opened, want_reasoning,
                                                       want_content):
    rng = random.Random(len(reply))
    for _ in range(20):
        got, _ = streamed(api.ChatReply(thinking=opened), pieces(reply, rng))
        assert got["reasoning"].strip() == (want_reasoning or "")
        assert got["content"] == (want_content or "")


CALL = '{"name": "get_time", "arguments": {"zone": "UTC"}}'
THEN_CALL = f"<think>The user wants the time.</think>\n\n<tool_call>\n{CALL}\n</tool_call>"


def test_tool_calls_after_the_reasoning():
    """Qwen3 thinks, then calls: the reasoning apart, the call parsed from what follows."""
    tools = ToolChoice(({"type": "function", "function": {"name": "get_time"}},), "auto",
                       fmt="hermes")
    message, reason = api.ChatReply(tools, thinking=False).message(THEN_CALL, "stop")
    assert reason == "tool_calls" and message["content"] is None
    assert message["reasoning"] == message["reasoning_content"] == "The user wants the time."
    assert [(c["function"]["name"], c["function"]["arguments"])
            for c in message["tool_calls"]] == [("get_time", '{"zone": "UTC"}')]
    rng = random.Random(0)
    for _ in range(20):
        got, reason = streamed(api.ChatReply(tools, thinking=False), pieces(THEN_CALL, rng))
        assert got["reasoning"].strip() == "The user wants the time."
        assert got["content"].strip() == "" and reason == "tool_calls"
        assert got["calls"] == [("get_time", '{"zone": "UTC"}')]


def test_the_reasoning_a_client_sends_back_reaches_the_template(byte_tokenizer):
    """As transformers passes it: under reasoning_content (Qwen3's templates keep the last
    turn's while it calls tools) and thinking, whichever name the client used."""
    from llmc.runtime.runner import render_chat

    template = ("{% for m in messages %}{{ m.role }}: {% if m.reasoning_content %}<think>"
                "{{ m.reasoning_content }}|{{ m.thinking }}</think>{% endif %}{{ m.content }}\n"
                "{% endfor %}")
    for name in api.REASONING_FIELDS:
        messages = [{"role": "user", "content": "Capital of France?"},
                    {"role": "assistant", "content": "Paris.", name: "It is in France."},
                    {"role": "user", "content": "And Italy?"}]
        want = byte_tokenizer.apply_chat_template(messages, chat_template=template,
                                                  tokenize=False)
        assert render_chat(template, api.chat_messages(messages)) == want
        assert "<think>It is in France.|It is in France.</think>Paris." in want


def test_which_prompts_open_the_block():
    assert reasoning.detect(THINKING) and not reasoning.detect("{{ messages }}")
    assert reasoning.opened("<|assistant|>\n<think>\n")
    assert not reasoning.opened("<|assistant|>\n<think>\n\n</think>\n\n")
    assert not reasoning.opened("<|assistant|>\n")


def test_chat_template_kwargs_are_checked():
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    req = api.parse_chat({**body, "chat_template_kwargs": {"enable_thinking": False}})
    assert req.template_kwargs == {"enable_thinking": False}
    with pytest.raises(api.ApiError) as e:
        api.parse_chat({**body, "chat_template_kwargs": {"messages": []}})
    assert e.value.param == "chat_template_kwargs" and "may not set messages" in e.value.message


# ---- the server ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine(byte_tokenizer, make_tiny, tmp_path_factory):
    """A tiny random Llama speaking the byte-level tokenizer plus <think> and </think> as
    tokens of their own (not special: their text is part of the reply, as in Qwen3's and
    DeepSeek-R1's tokenizers), with the THINKING template."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("thinking") / "model"
    byte_tokenizer.save_pretrained(folder)   # a copy of the shared one, to add tokens to
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_tokens([reasoning.OPEN, reasoning.CLOSE])
    tokenizer.chat_template = THINKING
    make_tiny("llama-gqa", folder, head_dim_64=True, vocab_size=len(tokenizer),
              bos_token_id=0, eos_token_id=1)
    tokenizer.save_pretrained(folder)
    out = folder.parent / "thinking.engine"
    build(BuildOptions(folder, out, backend="reference", dtype="fp32",
                       limits=BuildLimits(4, 64, 256, 16)), log=lambda _: None)
    return out


@pytest.fixture(scope="module")
def tokenizer(engine):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(engine.parent / "model" /
                                                      "tokenizer.json"))


@pytest.fixture(scope="module")
def served(engine):
    with serving(engine) as s:
        yield s


ASK = [{"role": "user", "content": "Capital of France?"}]


def raw(runner, **kwargs) -> str:
    """The reply's text as the engine writes it (greedy, 24 tokens)."""
    tokens = runner.encode(ASK, chat=True, **kwargs)
    return runner.complete([tokens], SamplingParams(max_tokens=24))[0].text


def test_the_server_sends_reasoning_apart(served):
    """The template opens the block, so the reply is reasoning up to its </think>."""
    assert served.server.thinks
    text = raw(served.runner)
    want_reasoning, want_content = reasoning.split(text, opened=True)
    r = served.client.chat.completions.create(model="bytes", messages=ASK, max_tokens=24,
                                              temperature=0)
    message = r.choices[0].message
    assert message.model_extra["reasoning"] == want_reasoning
    assert message.model_extra["reasoning_content"] == want_reasoning
    assert message.content == want_content

    chunks = list(served.client.chat.completions.create(model="bytes", messages=ASK,
                                                        max_tokens=24, temperature=0,
                                                        stream=True))
    deltas = [c.choices[0].delta for c in chunks]
    sent = "".join((d.model_extra or {}).get("reasoning") or "" for d in deltas)
    assert sent.strip() == (want_reasoning or "")
    assert "".join(d.content or "" for d in deltas) == (want_content or "")


def test_the_responses_api_gives_the_reasoning_an_item(served):
    """/v1/responses: the reasoning is a reasoning item before the message, whole and as
    reasoning_text events."""
    message = served.client.chat.completions.create(
        model="bytes", messages=ASK, max_tokens=24, temperature=0).choices[0].message
    body = dict(model="bytes", input=ASK, max_output_tokens=24, temperature=0)
    r = served.client.responses.create(**body)
    assert r.output[0].type == "reasoning"
    assert r.output[0].content[0].text == message.model_extra["reasoning"]
    assert r.output_text == (message.content or "")
    events = list(served.client.responses.create(**body, stream=True))
    sent = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert sent.strip() == message.model_extra["reasoning"].strip()
    assert events[-1].response.output[0].type == "reasoning"


def test_enable_thinking_false_reaches_the_template(served, tokenizer):
    """chat_template_kwargs as transformers' apply_chat_template takes them: the prompt
    closes an empty block, so the reply is all content."""
    want = tokenizer.apply_chat_template(ASK, chat_template=THINKING, tokenize=True,
                                         add_generation_prompt=True, return_dict=True,
                                         enable_thinking=False)["input_ids"]
    assert served.runner.encode(ASK, chat=True, enable_thinking=False) == want
    status, got = request(served.url, "POST", "/tokenize",
                          {"messages": ASK, "chat_template_kwargs": {"enable_thinking": False}})
    assert status == 200 and got["tokens"] == want

    r = served.client.chat.completions.create(
        model="bytes", messages=ASK, max_tokens=24, temperature=0,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert r.choices[0].message.content == raw(served.runner, enable_thinking=False)
    assert "reasoning" not in (r.choices[0].message.model_extra or {})
    assert r.usage.prompt_tokens == len(want)


CHOICE = {"structured_outputs": {"choice": ["Paris", "Rome"]}}


def test_a_constraint_starts_after_the_reasoning(served, tokenizer):
    """The model reasons freely, then answers under the constraint: the same reasoning as
    the seeded reply with no constraint (the same draws, up to </think>), then one of the
    choices. A logit bias on </think> makes the random model close its reasoning soon."""
    client, end = served.client, tokenizer.convert_tokens_to_ids(reasoning.CLOSE)
    assert served.server.think_end == end
    body = dict(model="bytes", messages=ASK, temperature=1.0, logit_bias={str(end): 1.0})
    for seed in range(100):
        free = client.chat.completions.create(**body, max_tokens=16, seed=seed)
        message = free.choices[0].message
        if message.content is not None and message.model_extra.get("reasoning"):
            break
    else:
        pytest.fail("no seed closed the reasoning after a token or more within 16 tokens")
    r = client.chat.completions.create(**body, max_tokens=40, seed=seed, extra_body=CHOICE)
    message = r.choices[0].message
    assert r.choices[0].message.model_extra["reasoning"] == message.model_extra["reasoning"]
    assert r.choices[0].message.content in ("Paris", "Rome")
    assert r.choices[0].finish_reason == "stop"

    # a prompt that closed the block: the constraint holds from the first token
    r = client.chat.completions.create(
        model="bytes", messages=ASK, max_tokens=40, temperature=0,
        extra_body={**CHOICE, "chat_template_kwargs": {"enable_thinking": False}})
    assert r.choices[0].message.content in ("Paris", "Rome")
    assert "reasoning" not in (r.choices[0].message.model_extra or {})


def test_the_engine_holds_the_constraint_after_its_token(engine):
    """structured_after: the tokens up to it are the free run's (seeded: the same draws),
    the rest one of the choices."""
    from llmc.runtime.structured import StructuredOutputsParams

    runner = Runner(engine)
    prompt = runner.encode(ASK, chat=True)
    sampled = dict(temperature=1.0, seed=3)
    ids = runner.complete([prompt], SamplingParams(max_tokens=12, ignore_eos=True,
                                                   **sampled))[0].token_ids
    k = next(i for i in range(2, len(ids)) if ids[i] not in ids[:i])
    choice = StructuredOutputsParams(choice=["Paris", "Rome"])
    r = runner.complete([prompt], SamplingParams(max_tokens=40, structured_outputs=choice,
                                                 structured_after=ids[k], **sampled))[0]
    assert r.token_ids[:k + 1] == ids[:k + 1] and r.finish_reason == "stop"
    assert runner.tokenizer.decode(r.token_ids[k + 1:]) in ("Paris", "Rome")
    r = runner.complete([prompt], SamplingParams(max_tokens=40, structured_outputs=choice))[0]
    assert r.text in ("Paris", "Rome")
    runner.close()


def test_reasoning_parser_none_leaves_the_text_whole(engine):
    with serving(engine, reasoning_parser="none") as s:
        r = s.client.chat.completions.create(model="bytes", messages=ASK, max_tokens=24,
                                             temperature=0)
        assert r.choices[0].message.content == raw(s.runner)
