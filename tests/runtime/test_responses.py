"""OpenAI's Responses API (`POST /v1/responses`, runtime/responses_api.py): a request means a
chat request, so its replies are the chat endpoint's, shaped as output items, whole and as
Responses' streaming events; through the real server with the real openai client."""

from __future__ import annotations

import json

import pytest
from engines import HERMES, engine_with
from server_client import request, serving

from llmc.runtime import openai_api as api
from llmc.runtime import responses_api as rapi
from llmc.runtime.openai_api import ApiError

pytest.importorskip("llguidance")

WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}},
                          "required": ["city"], "additionalProperties": False}}


def _chat(body):
    req, _ = rapi.parse_response({"model": "m", **body}, tool_format="hermes")
    return req


def test_input_items_become_chat_messages():
    req = _chat({"instructions": "Be brief.", "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "Weather "},
                                     {"type": "input_text", "text": "in Paris?"}]},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"type": "function_call", "call_id": "c1", "name": "get_weather",
         "arguments": '{"city": "Paris"}'},
        {"type": "function_call", "call_id": "c2", "name": "get_weather",
         "arguments": '{"city": "Rome"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "21 C"},
        {"type": "message", "role": "developer", "content": "Answer in words."}],
        "tools": [WEATHER], "max_output_tokens": 7})
    (messages,) = req.prompts
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "system"]
    assert messages[1]["content"] == "Weather in Paris?"
    assert [c["id"] for c in messages[2]["tool_calls"]] == ["c1", "c2"]
    assert messages[3] == {"role": "tool", "tool_call_id": "c1", "content": "21 C"}
    assert req.max_tokens == 7 and req.tools.mode == "auto"
    assert req.tools.tools[0]["function"]["name"] == "get_weather"
    assert _chat({"input": "hi"}).prompts == ([{"role": "user", "content": "hi"}],)


@pytest.mark.parametrize("body,param,words", [
    ({"input": "hi", "previous_response_id": "resp_1"}, "previous_response_id",
     "llmc keeps no responses"),
    ({"input": "hi", "tools": [{"type": "web_search"}]}, "tools[0]",
     "only function tools are supported, not 'web_search'"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input[0].content", "input_image parts are not supported"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0].type", "not supported"),
    ({"input": "hi", "max_output_tokens": -1}, "max_output_tokens", "max_output_tokens"),
    ({"input": "hi", "truncation": "auto"}, "truncation", "disabled"),
    ({"input": "hi", "background": True}, "background", "background"),
    ({"input": "hi", "temprature": 1}, "temprature", "unrecognized"),
    ({"input": []}, "input", "input is empty"),
    ({"input": "hi", "text": {"format": "json"}}, "text.format", "format"),
    ({"input": "hi", "tool_choice": {"type": "function", "name": "nope"},
      "tools": [WEATHER]}, "tool_choice", "not among the tools"),
])
def test_what_llmc_does_not_do_is_a_400_naming_the_field(body, param, words):
    with pytest.raises(ApiError) as e:
        _chat(body)
    assert e.value.status == 400 and e.value.param == param and words in e.value.message


@pytest.fixture(scope="module")
def served(byte_model, tmp_path_factory):
    with serving(engine_with(HERMES, byte_model, tmp_path_factory)) as s:
        yield s


ASK = [{"role": "user", "content": "Weather in Paris?"}]


def test_a_reply_is_the_chat_reply_as_output_items(served):
    client = served.client
    chat = client.chat.completions.create(model="bytes", messages=[
        {"role": "system", "content": "Be brief."}, *ASK], max_tokens=12, temperature=0)
    r = client.responses.create(model="bytes", instructions="Be brief.",
                                input="Weather in Paris?", max_output_tokens=12,
                                temperature=0)
    assert r.output_text == chat.choices[0].message.content and r.object == "response"
    (item,) = r.output
    assert item.type == "message" and item.role == "assistant"
    assert r.usage.input_tokens == chat.usage.prompt_tokens
    assert r.usage.output_tokens == chat.usage.completion_tokens == 12
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.instructions == "Be brief." and r.max_output_tokens == 12


def test_a_streamed_reply_is_responses_events(served):
    client = served.client
    body = dict(model="bytes", input=ASK, max_output_tokens=10, temperature=0)
    whole = client.responses.create(**body)
    events = list(client.responses.create(**body, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text == events[-1].response.output_text
    assert events[-1].response.usage.output_tokens == 10


def test_function_calls_and_their_outputs_go_round(served):
    """tool_choice "required": a function_call item whose arguments fit the schema; sent
    back with its output, the next turn's prompt is the chat request's with tool_calls and
    a tool message."""
    client = served.client
    r = client.responses.create(model="bytes", input=ASK, tools=[WEATHER],
                                tool_choice="required", max_output_tokens=64, temperature=0)
    (call,) = [o for o in r.output if o.type == "function_call"]
    assert call.name == "get_weather" and json.loads(call.arguments)["city"] in ("Paris", "Rome")
    assert r.status == "completed"
    turn = ASK + [{"type": "function_call", "call_id": call.call_id, "name": call.name,
                   "arguments": call.arguments},
                  {"type": "function_call_output", "call_id": call.call_id, "output": "21 C"}]
    again = client.responses.create(model="bytes", input=turn, tools=[WEATHER],
                                    max_output_tokens=8, temperature=0)
    chat = client.chat.completions.create(
        model="bytes", max_tokens=8, temperature=0, tools=[{"type": "function", "function": {
            k: WEATHER[k] for k in ("name", "description", "parameters")}}],
        messages=ASK + [{"role": "assistant", "content": None, "tool_calls": [
            {"id": call.call_id, "type": "function",
             "function": {"name": call.name, "arguments": call.arguments}}]},
            {"role": "tool", "tool_call_id": call.call_id, "content": "21 C"}])
    assert again.usage.input_tokens == chat.usage.prompt_tokens
    assert again.output_text == (chat.choices[0].message.content or "")
    # a named function streams its arguments as deltas
    events = list(client.responses.create(
        model="bytes", input=ASK, tools=[WEATHER], max_output_tokens=64, temperature=0,
        tool_choice={"type": "function", "name": "get_weather"}, stream=True))
    deltas = "".join(e.delta for e in events
                     if e.type == "response.function_call_arguments.delta")
    (done,) = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert deltas == done.arguments and json.loads(deltas)["city"] in ("Paris", "Rome")
    assert events[-1].type == "response.completed"
    assert events[-1].response.output[0].arguments == deltas


def test_text_format_holds_the_reply_to_a_schema(served):
    # no free blanks: a random model would spend its tokens on them
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False,
              "x-guidance": {"whitespace_flexible": False}}
    r = served.client.responses.create(
        model="bytes", input="Answer in JSON.", max_output_tokens=32, temperature=0,
        text={"format": {"type": "json_schema", "name": "answer", "schema": schema}})
    assert set(json.loads(r.output_text)) == {"ok"}


def test_errors_come_back_as_openai_errors(served):
    status, body = request(served.url, "POST", "/v1/responses",
                           {"model": "bytes", "input": "hi", "previous_response_id": "x"})
    assert status == 400 and body["error"]["param"] == "previous_response_id"
    status, body = request(served.url, "POST", "/v1/responses", {"model": "other",
                                                                  "input": "hi"})
    assert status == 404 and body["error"]["code"] == "model_not_found"
    with pytest.raises(served.openai.BadRequestError, match="only function tools"):
        served.client.responses.create(model="bytes", input="hi",
                                       tools=[{"type": "file_search", "vector_store_ids": []}])


def test_output_items_of_a_message():
    items = rapi.output_items({"role": "assistant", "content": "Hi.", "reasoning": "think",
                               "tool_calls": [api_call()]})
    assert [i["type"] for i in items] == ["reasoning", "message", "function_call"]
    assert items[1]["content"][0] == {"type": "output_text", "text": "Hi.", "annotations": [],
                                      "logprobs": []}
    assert items[2]["call_id"] == "call_x" and items[2]["arguments"] == "{}"


def api_call():
    return {"id": "call_x", "type": "function", "function": {"name": "f", "arguments": "{}"}}


def test_chat_fields_are_named_as_the_responses_api_names_them():
    e = rapi._renamed(api.bad("max_tokens must be an integer >= 1", "max_tokens"))
    assert (e.param, e.message) == ("max_output_tokens", "max_output_tokens must be an integer "
                                    ">= 1")
