"""Tool calling: chat templates rendered with tools as transformers renders them, the
model's own call syntax parsed (whole and streamed), tool_choice "required" and named
functions generated under the tools' schemas, and the real server with the openai client.

The model is a tiny random Llama speaking a byte-level tokenizer (conftest's byte_model) with
a Hermes-style template written here; structured outputs stand in for a trained model where
a test needs the model to write a call in that syntax."""

from __future__ import annotations

import json
import random

import pytest
from engines import HERMES, engine_with
from server_client import request, serving

from llmc.build import BuildOptions, build
from llmc.limits import BuildLimits
from llmc.runtime import openai_api as api
from llmc.runtime.runner import Runner, render_chat
from llmc.runtime.tools import ToolChoice, detect_format

pytest.importorskip("llguidance")

# Llama 3.1-style: BOS, the tools as indented JSON in the first user turn, bare JSON calls.
LLAMA3 = """{{- bos_token }}
{%- if tools is not none %}<|user|>
Given these functions, answer with a JSON call.
Respond in the format {"name": function name,
"parameters": dictionary of argument name and its value}.

{% for t in tools %}{{ t | tojson(indent=4) }}

{% endfor %}{% endif %}
{%- for m in messages %}<|{{ m['role'] }}|>
{% if m.get('tool_calls') %}
{% for c in m['tool_calls'] %}
{"name": "{{ c.function.name }}", "parameters": {{ c.function.arguments | tojson }}}
{% endfor %}
{% else %}
{{ m['content'] }}
{% endif %}
{{ eos_token }}
{% endfor %}
{%- if add_generation_prompt %}<|assistant|>
{% endif %}"""

# Mistral-style (v3 tokenizers): the tools before the last user turn, calls after the special
# token [TOOL_CALLS] as a JSON array, results with the call's id, which must be 9 characters.
MISTRAL = """{{- bos_token }}
{%- for m in messages %}
{%- if m['role'] == 'user' %}
{%- if tools and loop.last %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}
{{- '[INST]' + m['content'] + '[/INST]' }}
{%- elif m['role'] == 'assistant' and m.get('tool_calls') %}[TOOL_CALLS][
{%- for c in m['tool_calls'] %}{"name": "{{ c.function.name }}", "arguments": \
{{ c.function.arguments | tojson }}, "id": "{{ c.id }}"}{% if not loop.last %}, {% endif %}
{%- endfor %}]{{ eos_token }}
{%- elif m['role'] == 'assistant' %}{{ m['content'] + eos_token }}
{%- elif m['role'] == 'tool' %}
{%- if m['tool_call_id'] | length != 9 %}
{{- raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}
{%- endif %}[TOOL_RESULTS]{"content": {{ m['content'] | tojson }}, "call_id": \
"{{ m['tool_call_id'] }}"}[/TOOL_RESULTS]
{%- endif %}
{%- endfor %}"""

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city, <now> & later",
    "parameters": {"type": "object",
                   "properties": {"city": {"enum": ["Paris", "Rome"]},
                                  "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
        "required": ["zone"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]

# A conversation as an OpenAI client sends it: the call's arguments as JSON text.
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [{
        "id": "Call12345", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'}}]},
    {"role": "tool", "tool_call_id": "Call12345", "content": "21 C, sunny"},
    {"role": "user", "content": "And in Rome?"}]


def hf_messages() -> list[dict]:
    """CONVERSATION as transformers takes it: the call's arguments as an object."""
    messages = [dict(m) for m in CONVERSATION]
    messages[2] = {**messages[2], "content": "", "tool_calls": [{
        "id": "Call12345", "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}}]}
    return messages


def valid_weather(arguments: str) -> bool:
    value = json.loads(arguments)
    return value.keys() == {"city", "unit"} and value["city"] in ("Paris", "Rome") \
        and value["unit"] in ("C", "F")


# ---- templates ----------------------------------------------------------------------------

@pytest.mark.parametrize("template", [HERMES, LLAMA3, MISTRAL],
                         ids=["hermes", "llama3", "mistral"])
@pytest.mark.parametrize("tools", [TOOLS, None], ids=["tools", "no-tools"])
def test_templates_render_as_transformers_renders_them(byte_tokenizer, template, tools):
    """The same text as apply_chat_template, given the messages as transformers takes them
    (arguments as objects) and as the OpenAI API sends them (arguments as JSON text)."""
    want = byte_tokenizer.apply_chat_template(hf_messages(), tools=tools, chat_template=template,
                                              tokenize=False, add_generation_prompt=True)
    got = render_chat(template, api.chat_messages(CONVERSATION), "</s>", "<s>", tools)
    assert got == want
    if tools:   # tojson as json.dumps writes it, not jinja2's HTML-escaped form
        assert "<now> & later" in got


def test_the_template_names_the_call_syntax():
    assert detect_format(HERMES) == "hermes" and detect_format(LLAMA3) == "llama3_json"
    assert detect_format(MISTRAL) == "mistral"
    assert detect_format("{{ messages }}") is None and detect_format(None) is None


# ---- parsing the model's calls ------------------------------------------------------------

def auto(fmt: str) -> ToolChoice:
    return ToolChoice(tuple(TOOLS), "auto", fmt=fmt)


HERMES_REPLIES = [
    # (reply, content, calls)
    ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
     '</tool_call>', "Let me look.", [("get_weather", '{"city": "Paris"}')]),
    ('<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>\n'
     '<tool_call>{"name": "get_time", "arguments": "{\\"zone\\": \\"UTC\\"}"}</tool_call>',
     None, [("get_weather", '{"city": "Rome"}'), ("get_time", '{"zone": "UTC"}')]),
    # left open at the end (the model stopped there), and no arguments at all
    ('<tool_call>\n{"name": "get_time"}', None, [("get_time", "{}")]),
    ("No call, just text with < and <tool", "No call, just text with < and <tool", None),
    # not JSON, or not a call: the reply stays content, as written
    ("<tool_call>{oops}</tool_call>", "<tool_call>{oops}</tool_call>", None),
    ('<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"arguments": {}}</tool_call>',
     None),
]
LLAMA3_REPLIES = [
    ('{"name": "get_weather", "parameters": {"city": "Paris", "unit": "C"}}', None,
     [("get_weather", '{"city": "Paris", "unit": "C"}')]),
    ('  {"name": "get_time", "arguments": {"zone": "CET"}}; {"name": "get_time", '
     '"parameters": {"zone": "UTC"}}', None,
     [("get_time", '{"zone": "CET"}'), ("get_time", '{"zone": "UTC"}')]),
    ("It is sunny.", "It is sunny.", None),
    ('{"answer": 42}', '{"answer": 42}', None),
    ('{"name": "get_time", "parameters": {}} and more', '{"name": "get_time", "parameters": {}} '
     'and more', None),
]


MISTRAL_REPLIES = [
    ('Let me look.[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]',
     "Let me look.", [("get_weather", '{"city": "Paris"}')]),
    ('[TOOL_CALLS] [{"name": "get_time", "arguments": {"zone": "UTC"}}, {"name": "get_time", '
     '"arguments": "{\\"zone\\": \\"CET\\"}"}]', None,
     [("get_time", '{"zone": "UTC"}'), ("get_time", '{"zone": "CET"}')]),
    # the newer tokenizers' syntax: a name, [ARGS] and the arguments, a [TOOL_CALLS] a call
    ('[TOOL_CALLS]get_weather[ARGS]{"city": "Rome"}[TOOL_CALLS]get_time[CALL_ID]a1b2c3d4e'
     '[ARGS]{}', None, [("get_weather", '{"city": "Rome"}'), ("get_time", "{}")]),
    ("It is sunny [TOOL", "It is sunny [TOOL", None),
    ("[TOOL_CALLS]get_weather", "[TOOL_CALLS]get_weather", None),
    ('[TOOL_CALLS][{"name": "get_time"}] and more', '[TOOL_CALLS][{"name": "get_time"}] and '
     'more', None),
]


@pytest.mark.parametrize("fmt,reply,content,calls",
                         [("hermes", *r) for r in HERMES_REPLIES]
                         + [("llama3_json", *r) for r in LLAMA3_REPLIES]
                         + [("mistral", *r) for r in MISTRAL_REPLIES])
def test_a_reply_s_calls_are_parsed(fmt, reply, content, calls):
    assert auto(fmt).parse(reply) == (content, calls)


def test_mistral_calls_have_ids_its_templates_take():
    _, calls = auto("mistral").reply(MISTRAL_REPLIES[1][0])
    assert [len(c["id"]) for c in calls] == [9, 9] and all(c["id"].isalnum() for c in calls)
    assert auto("mistral").keeps_special_tokens and not auto("hermes").keeps_special_tokens


@pytest.mark.parametrize("fmt,reply", [("hermes", r[0]) for r in HERMES_REPLIES]
                         + [("llama3_json", r[0]) for r in LLAMA3_REPLIES]
                         + [("mistral", r[0]) for r in MISTRAL_REPLIES]
                         + [("hermes", "text that ends in <tool_c"), ("llama3_json", "  \n")])
def test_a_streamed_reply_says_what_the_whole_one_says(fmt, reply):
    """Cut anywhere (a marker split across pieces too): the content sent joins to the whole
    reply's content, up to the blanks before a call, and the calls are the same."""
    choice = auto(fmt)
    content, calls = choice.parse(reply)
    rng = random.Random(len(reply))
    for _ in range(20):
        stream, sent, got_calls = choice.stream(), "", []
        cuts = sorted(rng.sample(range(1, len(reply)), min(4, len(reply) - 1)))
        pieces = [reply[a:b] for a, b in zip([0] + cuts, cuts + [len(reply)])]
        deltas = [stream.step(p) for p in pieces]
        last, reason = stream.finish("stop")
        for d in deltas + [last]:
            sent += d.get("content", "")
            got_calls += [(c["function"]["name"], c["function"]["arguments"])
                          for c in d.get("tool_calls", [])]
        assert sent.strip() == (content or "").strip()
        assert (got_calls or None) == calls
        assert reason == ("tool_calls" if calls else "stop")


def test_content_before_a_call_goes_out_before_the_reply_ends():
    stream = auto("hermes").stream()
    assert stream.step("Looking ") == {"content": "Looking "}
    assert stream.step("it up <tool") == {"content": "it up "}   # "<tool" may be a call
    assert stream.step('_call>{"name": "get_time", ') == {}
    assert stream.step('"arguments": {"zone": "UTC"}}</tool_call>') == {}
    last, reason = stream.finish("stop")
    assert [c["index"] for c in last["tool_calls"]] == [0] and reason == "tool_calls"
    assert last["tool_calls"][0]["id"].startswith("call_")


def test_required_and_named_calls_are_parsed():
    required = ToolChoice(tuple(TOOLS), "required")
    assert required.parse('[{"name": "get_time", "parameters": {"zone": "UTC"}}]') == \
        (None, [("get_time", '{"zone": "UTC"}')])
    assert required.parse('[{"name": "get_time", "parameters": {"zo') == \
        ('[{"name": "get_time", "parameters": {"zo', None)    # cut short by max_tokens
    named = ToolChoice(tuple(TOOLS), "named", "get_time")
    assert named.parse('{"zone": "UTC"}') == (None, [("get_time", '{"zone": "UTC"}')])
    assert named.finish_reason("stop", True) == "stop"        # as OpenAI ends a forced call
    assert required.finish_reason("length", False) == "length"


# ---- the request's fields -----------------------------------------------------------------

def chat(tool_format="hermes", **body):
    return api.parse_chat({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                           **body}, tool_format=tool_format)


def test_tool_choice_sets_the_constraint():
    assert chat().tools is None and chat(tools=[]).tools is None
    req = chat(tools=TOOLS)
    assert req.tools.mode == "auto" and req.params.structured_outputs is None
    req = chat(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert req.tools.mode == "named"
    assert json.loads(req.params.structured_outputs.json)["required"] == ["zone"]
    req = chat(tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    schema = json.loads(req.params.structured_outputs.json)
    assert schema["maxItems"] == 1 and len(schema["items"]["anyOf"]) == 2
    # "none" shows the tools to the template and parses nothing; auto takes a response_format
    assert chat(tool_format=None, tools=TOOLS, tool_choice="none").tools.mode == "none"
    assert chat(tools=TOOLS, response_format={"type": "json_object"}).params.structured_outputs


BAD_TOOLS = {
    "not a list": (dict(tools={"a": 1}), "tools", "'tools' must be a list"),
    "not a function": (dict(tools=[{"type": "code"}]), "tools[0]", '"type": "function"'),
    "bad name": (dict(tools=[{"type": "function", "function": {"name": "a b"}}]),
                 "tools[0].function.name", "letters, digits"),
    "two of a name": (dict(tools=[WEATHER, WEATHER]), "tools[1].function.name", "two tools"),
    "parameters not a schema": (
        dict(tools=[{"type": "function", "function": {"name": "f", "parameters": [1]}}]),
        "tools[0].function.parameters", "JSON schema object"),
    "a schema that does not compile": (
        dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"a": {"type": "foo"}}}}}], tool_choice="required"),
        "tools[0].function.parameters", "Invalid type: foo"),
    "an unknown function": (dict(tools=TOOLS, tool_choice={"type": "function",
                                                           "function": {"name": "nope"}}),
                            "tool_choice", "'nope', which is not among the tools"),
    "a choice without tools": (dict(tool_choice="required"), "tool_choice", "needs tools"),
    "an unknown choice": (dict(tools=TOOLS, tool_choice="always"), "tool_choice",
                          'must be "none", "auto"'),
    "two constraints": (dict(tools=TOOLS, tool_choice="required",
                             response_format={"type": "json_object"}),
                        "tool_choice", "give no response_format"),
    "a tool message without its call's id": (
        dict(messages=[{"role": "tool", "content": "x"}]), "messages[0].tool_call_id",
        "needs tool_call_id"),
    "a call without arguments": (
        dict(messages=[{"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]}]),
        "messages[0].tool_calls[0]", '"arguments": "JSON text"'),
}


@pytest.mark.parametrize("body,param,message", BAD_TOOLS.values(), ids=BAD_TOOLS)
def test_bad_tools_are_a_400_naming_the_field(body, param, message):
    with pytest.raises(api.ApiError) as e:
        chat(**body)
    assert e.value.status == 400 and e.value.param == param and message in e.value.message


def test_auto_needs_a_call_syntax_the_server_parses():
    with pytest.raises(api.ApiError) as e:
        chat(tool_format=None, tools=TOOLS)
    assert e.value.param == "tool_choice" and "--tool-call-parser" in e.value.message
    assert chat(tool_format=None, tools=TOOLS, tool_choice="required").tools.mode == "required"


# ---- the server ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine(byte_model, tmp_path_factory):
    return engine_with(HERMES, byte_model, tmp_path_factory)


@pytest.fixture(scope="module")
def llama3_engine(byte_model, tmp_path_factory):
    return engine_with(LLAMA3, byte_model, tmp_path_factory)


@pytest.mark.parametrize("which", ["engine", "llama3_engine"])
def test_the_prompt_is_transformers_tokens(which, request, byte_tokenizer):
    """The conversation and tools through the engine's template are the tokens of
    transformers' apply_chat_template: the BOS a template writes included."""
    runner = Runner(request.getfixturevalue(which))
    template = runner.chat_template
    want = byte_tokenizer.apply_chat_template(hf_messages(), tools=TOOLS,
                                              chat_template=template, tokenize=True,
                                              add_generation_prompt=True, return_dict=True)
    got = runner.encode(api.chat_messages(CONVERSATION), chat=True, tools=TOOLS)
    assert got == want["input_ids"] and (got[0] == byte_tokenizer.bos_token_id) == \
        (template == LLAMA3)
    runner.close()


@pytest.fixture(scope="module")
def served(engine):
    with serving(engine) as s:
        yield s


ASK = [{"role": "user", "content": "Weather in Paris?"}]


def test_a_named_function_is_called_with_arguments_that_fit_its_schema(served):
    client = served.client
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(model="bytes", messages=ASK, tools=TOOLS,
                                       tool_choice=named, max_tokens=64, temperature=1.0,
                                       seed=1)
    message = r.choices[0].message
    assert r.choices[0].finish_reason == "stop" and message.content is None
    (call,) = message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather" and valid_weather(call.function.arguments)
    # written without free blanks, as json.dumps writes it
    assert call.function.arguments == json.dumps(json.loads(call.function.arguments))
    # the conversation goes on with the reply as the client got it, and the call's result
    again = client.chat.completions.create(
        model="bytes", tools=TOOLS, max_tokens=4, messages=ASK + [message, {
            "role": "tool", "tool_call_id": call.id, "content": "21 C, sunny"}])
    assert again.choices[0].message.content is not None
    assert again.usage.prompt_tokens == len(served.runner.encode(
        api.chat_messages(ASK + [message.model_dump(), {
            "role": "tool", "tool_call_id": call.id, "content": "21 C, sunny"}]),
        chat=True, tools=TOOLS))

    chunks = list(client.chat.completions.create(
        model="bytes", messages=ASK, tools=TOOLS, tool_choice=named, max_tokens=64,
        temperature=1.0, seed=1, stream=True))
    deltas = [d for c in chunks for d in c.choices[0].delta.tool_calls or []]
    assert len(deltas) > 2 and deltas[0].id.startswith("call_")   # the arguments as they come
    assert {d.index for d in deltas} == {0} and deltas[0].function.name == "get_weather"
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize("parallel", [False, True])
def test_required_calls_fit_the_tools(served, parallel):
    r = served.client.chat.completions.create(
        model="bytes", messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=400,
        temperature=0.8, seed=4, n=3, parallel_tool_calls=parallel)
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        calls = choice.message.tool_calls
        assert len(calls) >= 1 and (parallel or len(calls) == 1)
        for call in calls:
            if call.function.name == "get_weather":
                assert valid_weather(call.function.arguments)
            else:
                assert call.function.name == "get_time"
                assert json.loads(call.function.arguments)["zone"] in ("UTC", "CET")
        assert len({c.id for c in calls}) == len(calls)


# What a model taught the Hermes syntax would write; a regex makes the random model write it.
HERMES_CALL = ('Checking\\. <tool_call>\\n\\{"name": "get_weather", "arguments": '
               '\\{"city": "(Paris|Rome)", "unit": "C"\\}\\}\\n</tool_call>')


def test_auto_parses_the_model_s_own_calls(served):
    client = served.client
    body = dict(model="bytes", messages=ASK, tools=TOOLS, max_tokens=96, temperature=1.0,
                seed=2, extra_body={"structured_outputs": {"regex": HERMES_CALL}})
    r = client.chat.completions.create(**body)
    message = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and message.content == "Checking."
    (call,) = message.tool_calls
    assert call.function.name == "get_weather" and valid_weather(call.function.arguments)

    chunks = list(client.chat.completions.create(**body, stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    calls = [d for c in chunks for d in c.choices[0].delta.tool_calls or []]
    assert content == "Checking. " and len(calls) == 1
    assert calls[0].function.arguments == call.function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    # free text is content, whole and streamed alike
    free = dict(model="bytes", messages=ASK, tools=TOOLS, max_tokens=24, temperature=0,
                extra_body={"structured_outputs": {"regex": "Sunny, (21|22) C\\."}})
    r = client.chat.completions.create(**free)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(**free, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == \
        r.choices[0].message.content


@pytest.fixture(scope="module")
def mistral_engine(byte_tokenizer, make_tiny, tmp_path_factory):
    """A tiny random Llama whose byte-level tokenizer has Mistral's [TOOL_CALLS] as a special
    token (id 320), with MISTRAL's template."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("mistral")
    byte_tokenizer.save_pretrained(root / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    tokenizer.add_special_tokens({"additional_special_tokens": ["[TOOL_CALLS]"]})
    tokenizer.chat_template = MISTRAL
    make_tiny("llama-gqa", root / "model", head_dim_64=True, vocab_size=len(tokenizer),
              bos_token_id=0, eos_token_id=1)
    tokenizer.save_pretrained(root / "model")
    build(BuildOptions(root / "model", root / "m.engine", backend="reference", dtype="fp32",
                       limits=BuildLimits(4, 256, 1024, 16)), log=lambda _: None)
    return root / "m.engine"


# The special token, then the calls: what a Mistral model writes; a grammar makes the random
# model write it.
MISTRAL_CALL = ('start: "Sure. " <[320]> "[{\\"name\\": \\"get_weather\\", '
                '\\"arguments\\": {\\"city\\": \\"Rome\\", \\"unit\\": \\"F\\"}}]"')


def test_mistral_calls_are_parsed_after_their_special_token(mistral_engine):
    with serving(mistral_engine) as served:
        client = served.client
        assert served.server.tool_format == "mistral"
        body = dict(model="bytes", messages=ASK, tools=TOOLS, max_tokens=96, temperature=0,
                    extra_body={"structured_outputs": {"grammar": MISTRAL_CALL}})
        r = client.chat.completions.create(**body)
        message = r.choices[0].message
        assert r.choices[0].finish_reason == "tool_calls" and message.content == "Sure."
        (call,) = message.tool_calls
        assert call.function.name == "get_weather" and len(call.id) == 9
        assert json.loads(call.function.arguments) == {"city": "Rome", "unit": "F"}
        chunks = list(client.chat.completions.create(**body, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Sure. "
        (streamed,) = [d for c in chunks for d in c.choices[0].delta.tool_calls or []]
        assert streamed.function.arguments == call.function.arguments
        # the conversation goes on with the call's id, which the template checks
        turn = ASK + [message.model_dump(exclude_none=True),
                      {"role": "tool", "tool_call_id": call.id, "content": "30 F"}]
        r = client.chat.completions.create(model="bytes", messages=turn, tools=TOOLS,
                                           max_tokens=4, temperature=0)
        assert r.choices[0].finish_reason in ("stop", "length")
        status, body = request(served.url, "POST", "/v1/chat/completions", {
            "model": "bytes", "max_tokens": 2, "messages": turn[:-1] + [
                {"role": "tool", "tool_call_id": "call_1", "content": "30 F"}]})
        assert status == 400 and "length 9" in body["error"]["message"]
        # skip_special_tokens (vLLM's): the token's own text only when asked for
        for skip, text in ((True, ""), (False, "[TOOL_CALLS]" * 3)):
            r = client.completions.create(model="bytes", prompt="Hi", max_tokens=3,
                                          temperature=0, logit_bias={"320": 100},
                                          extra_body={"skip_special_tokens": skip})
            assert r.choices[0].text == text


def test_the_server_s_prompt_shows_the_tools_and_the_conversation(served):
    want = served.runner.encode(api.chat_messages(CONVERSATION), chat=True, tools=TOOLS)
    r = served.client.chat.completions.create(model="bytes", messages=CONVERSATION,
                                              tools=TOOLS, tool_choice="none", max_tokens=1)
    assert r.usage.prompt_tokens == len(want)
    without = served.client.chat.completions.create(model="bytes", messages=CONVERSATION,
                                                    max_tokens=1)
    assert without.usage.prompt_tokens < len(want) - 100    # the tools' listing


def test_tokenize_takes_the_tools(served):
    url = served.url
    status, got = request(url, "POST", "/tokenize", {"messages": CONVERSATION, "tools": TOOLS})
    assert status == 200 and got["tokens"] == served.runner.encode(
        api.chat_messages(CONVERSATION), chat=True, tools=TOOLS)
    status, got = request(url, "POST", "/tokenize", {"messages": CONVERSATION,
                                                     "tools": [{"type": "code"}]})
    assert status == 400 and got["error"]["param"] == "tools[0]"


def test_a_server_without_a_call_syntax_refuses_auto_alone(engine):
    with serving(engine, tool_call_parser="none") as s:
        client = s.client
        with pytest.raises(s.openai.BadRequestError) as e:
            client.chat.completions.create(model="bytes", messages=ASK, tools=TOOLS,
                                           max_tokens=4)
        assert e.value.body["param"] == "tool_choice"
        r = client.chat.completions.create(
            model="bytes", messages=ASK, tools=TOOLS, max_tokens=64,
            tool_choice={"type": "function", "function": {"name": "get_weather"}})
        assert valid_weather(r.choices[0].message.tool_calls[0].function.arguments)


@pytest.mark.slow
def test_smollm2_calls_the_tool_a_question_needs(smollm2_engine):
    """The real model, greedy. Its chat template shows no tools, so "auto" is refused; under
    the tools' schema it calls the one the question needs, with the city it asked about."""
    openai = pytest.importorskip("openai")
    pytest.importorskip("uvicorn", reason="llmc serve needs the serve extra")
    from llmc.runtime.server import OpenAIServer

    weather = {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 40},
            "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]}}}
    time_in = {"type": "function", "function": {
        "name": "get_time", "description": "Current time in a time zone",
        "parameters": {"type": "object", "properties": {
            "zone": {"type": "string", "maxLength": 40}}, "required": ["zone"]}}}
    runner = Runner(smollm2_engine)
    server = OpenAIServer(runner, "smollm2")
    assert server.tool_format is None
    with server.running() as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x")
        calls = {}
        for question in ["What is the weather like in Paris today?",
                         "What time is it in Tokyo?"]:
            r = client.chat.completions.create(
                model="smollm2", messages=[{"role": "user", "content": question}],
                tools=[weather, time_in], tool_choice="required", max_tokens=100,
                temperature=0)
            assert r.choices[0].finish_reason == "tool_calls"
            (call,) = r.choices[0].message.tool_calls
            calls[question] = (call.function.name, json.loads(call.function.arguments))
    runner.close()
    name, arguments = calls["What is the weather like in Paris today?"]
    assert name == "get_weather" and arguments["city"] == "Paris", calls
    assert calls["What time is it in Tokyo?"][0] == "get_time", calls
