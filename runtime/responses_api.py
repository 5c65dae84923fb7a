"""OpenAI's Responses API (`POST /v1/responses`) over the chat path: plain functions, as
openai_api.py's; no HTTP here.

    req, spec = parse_response(body, tool_format, defaults)   # a chat GenerationRequest
    response(spec, rid, model, message, finish_reason, use)   # a whole reply's object
    stream = ResponseStream(spec, rid, model); stream.start(); stream.step(delta); ...

A request becomes the chat request it means, and is checked and generated as one:
`instructions` a system message first, `input` a string (one user message) or a list of
items: messages (role and text content, a string or input_text / output_text parts), the
model's earlier `function_call` items (an assistant message's tool_calls) and the tools'
`function_call_output` items (tool messages). `tools` are function tools (Responses' flat
shape: {"type": "function", "name", "parameters", ...}), `tool_choice` the same modes as
chat's, `text.format` the response format (text, json_object, json_schema), and
`max_output_tokens` max_tokens. A reply comes back as output items: its reasoning
(`reasoning`, where the server parses it), its text (`message`, with one `output_text`
part) and its calls (`function_call`), whole or as Responses' streaming events.

llmc keeps no responses: `previous_response_id` is refused (send the conversation in
`input`), and `store` changes nothing. Built-in tools (web search, file search, ...),
images and files are refused with a 400 that names them.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from llmc.runtime import openai_api as api
from llmc.runtime.openai_api import ANY, BOOL, INT, NUM, OBJ, STR, ApiError, bad

ITEMS = ("a string or a list of input items", lambda v: isinstance(v, (str, list)))
FIELDS = {
    "model": STR, "input": ITEMS, "instructions": STR, "max_output_tokens": INT,
    "temperature": NUM, "top_p": NUM, "tools": ANY, "tool_choice": ANY,
    "parallel_tool_calls": BOOL, "text": OBJ, "stream": BOOL, "store": BOOL, "metadata": OBJ,
    "user": STR, "previous_response_id": STR, "reasoning": OBJ, "include": ANY,
    "truncation": STR, "background": BOOL, "service_tier": STR, "top_logprobs": INT,
    # vLLM's extensions, as on chat
    "top_k": INT, "min_p": NUM, "repetition_penalty": NUM, "seed": INT,
    "chat_template_kwargs": OBJ,
}
# chat's name -> the Responses name, for errors that a checked chat field raises
RENAMED = {"max_tokens": "max_output_tokens", "messages": "input",
           "response_format": "text.format"}


class ResponseSpec:
    """What the response object repeats of its request."""

    def __init__(self, f: dict):
        self.f = f
        self.created = int(time.time())

    def echo(self) -> dict:
        f = self.f
        return {"instructions": f.get("instructions"),
                "max_output_tokens": f.get("max_output_tokens"),
                "temperature": f.get("temperature", 1.0), "top_p": f.get("top_p", 1.0),
                "tools": f.get("tools") or [], "tool_choice": f.get("tool_choice", "auto"),
                "parallel_tool_calls": f.get("parallel_tool_calls", True),
                "text": f.get("text") or {"format": {"type": "text"}},
                "metadata": f.get("metadata") or {}, "user": f.get("user"),
                "previous_response_id": None, "reasoning": f.get("reasoning"),
                "store": False, "truncation": "disabled", "background": False,
                "service_tier": "default", "error": None}


def parse_response(body: Any, tool_format: str | None = None, defaults: dict | None = None
                   ) -> tuple[api.GenerationRequest, ResponseSpec]:
    """The chat GenerationRequest a Responses request means, and its ResponseSpec; an
    ApiError (a 400 naming the Responses field) where it asks for what llmc does not do."""
    f = api._fields(body, FIELDS, required=("model", "input"))
    if f.get("previous_response_id") is not None:
        raise bad("llmc keeps no responses: send the whole conversation in 'input' instead of "
                  "previous_response_id", "previous_response_id")
    if f.get("background"):
        raise bad("background responses are not supported: llmc keeps no responses",
                  "background")
    if f.get("truncation") not in (None, "disabled"):
        raise bad("truncation must be \"disabled\": a conversation longer than the engine's "
                  "max_seq_len is an error, not cut", "truncation")
    if f.get("top_logprobs") is not None:
        raise bad("top_logprobs is not supported on /v1/responses; use /v1/chat/completions",
                  "top_logprobs")
    messages = ([{"role": "system", "content": f["instructions"]}]
                if f.get("instructions") is not None else []) + _messages(f["input"])
    chat = {"model": f["model"], "messages": messages, "stream": f.get("stream")}
    for name in ("temperature", "top_p", "parallel_tool_calls", "top_k", "min_p",
                 "repetition_penalty", "seed", "chat_template_kwargs"):
        if name in f:
            chat[name] = f[name]
    if "max_output_tokens" in f:
        chat["max_tokens"] = f["max_output_tokens"]
    if f.get("tools"):
        chat["tools"] = _tools(f["tools"])
    if "tool_choice" in f:
        chat["tool_choice"] = _tool_choice(f["tool_choice"])
    if f.get("text"):
        chat["response_format"] = _format(f["text"])
    try:
        req = api.parse_chat(chat, tool_format, defaults)
    except ApiError as e:
        raise _renamed(e) from None
    return req, ResponseSpec(f)


def _renamed(e: ApiError) -> ApiError:
    """A chat field's error in the Responses API's names."""
    param, message = e.param, e.message
    for chat_name, name in RENAMED.items():
        message = message.replace(chat_name, name)
        if param is not None and param.startswith(chat_name):
            param = name + param[len(chat_name):]
    return ApiError(e.status, message, e.type, param, e.code)


def _messages(items) -> list[dict]:
    """Input items as chat messages: consecutive function calls become one assistant
    message's tool_calls."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    if not items:
        raise bad("input is empty: give a string or at least one item", "input")
    out: list[dict] = []
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise bad(f"{where} must be an object (a message or a function call's item)",
                      where)
        kind = item.get("type", "message")
        if kind == "message":
            out.append({"role": item.get("role"), "content": _text(item.get("content"),
                                                                   where)})
        elif kind == "function_call":
            call = {"id": _str(item, "call_id", where), "type": "function", "function": {
                "name": _str(item, "name", where), "arguments": _str(item, "arguments", where)}}
            if out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls") \
                    and not out[-1]["content"]:
                out[-1]["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            out.append({"role": "tool", "tool_call_id": _str(item, "call_id", where),
                        "content": output if isinstance(output, str)
                        else _text(output, where, "output")})
        elif kind == "reasoning":
            continue   # a model's earlier reasoning: chat templates leave it out of history
        else:
            raise bad(f"{where}.type {api._short(kind)} is not supported: llmc takes "
                      "messages, function_call and function_call_output items",
                      f"{where}.type")
    return out


def _text(content, where: str, name: str = "content") -> str:
    """A message's content: a string, or text parts (input_text, output_text) joined."""
    if isinstance(content, str):
        return content
    parts = content if isinstance(content, list) else None
    if parts is None or not all(isinstance(p, dict) and p.get("type") in (
            "input_text", "output_text", "text") and isinstance(p.get("text"), str)
            for p in parts):
        kinds = sorted({p.get("type") for p in parts or () if isinstance(p, dict)} -
                       {"input_text", "output_text", "text"})
        raise bad(f"{where}.{name} must be a string or a list of text parts"
                  + (f"; {', '.join(map(str, kinds))} parts are not supported (llmc serves "
                     "text models)" if kinds else ""), f"{where}.{name}")
    return "".join(p["text"] for p in parts)


def _str(item: dict, key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise bad(f"{where}.{key} must be a string", f"{where}.{key}")
    return value


def _tools(tools) -> list[dict]:
    """Responses' function tools ({"type": "function", "name", "description",
    "parameters", "strict"}) in chat's shape; any other tool is a 400."""
    if not isinstance(tools, list):
        raise bad("tools must be a list of function tools", "tools")
    out = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or t.get("type") != "function":
            kind = t.get("type") if isinstance(t, dict) else None
            raise bad(f"tools[{i}]: only function tools are supported, not "
                      f"{api._short(kind)} (llmc runs no built-in tools)", f"tools[{i}]")
        out.append({"type": "function", "function": {
            k: t[k] for k in ("name", "description", "parameters") if k in t}})
    return out


def _tool_choice(choice):
    if isinstance(choice, dict) and choice.get("type") == "function" and "name" in choice:
        return {"type": "function", "function": {"name": choice["name"]}}
    return choice


def _format(text: dict) -> dict:
    """text.format as chat's response_format."""
    fmt = text.get("format")
    if fmt is None or not isinstance(fmt, dict):
        raise bad("text must be {\"format\": {\"type\": \"text\" | \"json_object\" | "
                  "\"json_schema\", ...}}", "text.format")
    if fmt.get("type") == "json_schema":
        inner = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        return {"type": "json_schema", "json_schema": inner}
    return fmt


# --- the response -----------------------------------------------------------------------------

def response(spec: ResponseSpec, rid: str, model: str, message: dict | None,
             finish_reason: str | None, use: dict | None, status: str | None = None) -> dict:
    """The response object; message None while it is in progress (status given)."""
    items = output_items(message) if message is not None else []
    if status is None:
        status = "incomplete" if finish_reason == "length" else "completed"
    return {"id": rid, "object": "response", "created_at": spec.created, "model": model,
            "status": status, "output": items,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete"
            else None, "usage": use, **spec.echo()}


def output_items(message: dict) -> list[dict]:
    """An assistant message (openai_api.ChatReply's) as Responses' output items."""
    items = []
    if message.get("reasoning"):
        items.append(reasoning_item(message["reasoning"]))
    if message.get("content"):
        items.append(message_item(message["content"]))
    for call in message.get("tool_calls") or ():
        items.append(call_item(call["id"], call["function"]["name"],
                               call["function"]["arguments"]))
    return items


def reasoning_item(text: str) -> dict:
    return {"type": "reasoning", "id": _id("rs"), "summary": [],
            "content": [{"type": "reasoning_text", "text": text}], "status": "completed"}


def message_item(text: str) -> dict:
    return {"type": "message", "id": _id("msg"), "status": "completed", "role": "assistant",
            "content": [output_text(text)]}


def output_text(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def call_item(call_id: str, name: str, arguments: str, status: str = "completed") -> dict:
    return {"type": "function_call", "id": _id("fc"), "call_id": call_id,
            "name": name, "arguments": arguments, "status": status}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {"input_tokens": prompt_tokens,
            "input_tokens_details": {"cached_tokens": cached_tokens},
            "output_tokens": completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt_tokens + completion_tokens}


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


class ResponseStream:
    """One streamed response's events, from the chat deltas its ChatReply makes: each
    output item opened when its first piece comes, its text or arguments as deltas, and
    closed before the next one opens or at the end."""

    def __init__(self, spec: ResponseSpec, rid: str, model: str):
        self.spec, self.rid, self.model = spec, rid, model
        self.seq = 0
        self.items: list[dict] = []   # the output so far, each item as it stands
        self.open: dict | None = None   # the item still receiving text
        self.calls: dict[int, dict] = {}   # a streamed call's index -> its item

    def _event(self, kind: str, **fields) -> dict:
        event = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return event

    def start(self) -> list[dict]:
        body = response(self.spec, self.rid, self.model, None, None, None, "in_progress")
        return [self._event("response.created", response=body),
                self._event("response.in_progress", response=body)]

    def step(self, delta: dict) -> list[dict]:
        """Events for one chat delta (reasoning, content, tool_calls)."""
        events = []
        if delta.get("reasoning"):
            events += self._text("reasoning", delta["reasoning"])
        if delta.get("content"):
            events += self._text("message", delta["content"])
        for call in delta.get("tool_calls") or ():
            events += self._call(call)
        return events

    def finish(self, finish_reason: str | None, use: dict) -> list[dict]:
        events = self._close()
        for item in self.calls.values():
            if item["status"] != "completed":
                events += self._close_call(item)
        status = "incomplete" if finish_reason == "length" else "completed"
        body = {**response(self.spec, self.rid, self.model, None, finish_reason, use, status),
                "output": self.items}
        return events + [self._event(f"response.{status}", response=body)]

    def _index(self, item: dict) -> int:
        return self.items.index(item)

    def _text(self, kind: str, piece: str) -> list[dict]:
        events = []
        if self.open is None or self.open["kind"] != kind:
            events += self._close()
            item = {**(reasoning_item("") if kind == "reasoning" else message_item("")),
                    "content": [], "status": "in_progress"}
            self.items.append(item)
            self.open = {"item": item, "kind": kind, "text": ""}
            events.append(self._event("response.output_item.added",
                                      output_index=self._index(item), item=dict(item)))
            part = ({"type": "reasoning_text", "text": ""} if kind == "reasoning"
                    else output_text(""))
            events.append(self._event("response.content_part.added", item_id=item["id"],
                                      output_index=self._index(item), content_index=0,
                                      part=part))
        item = self.open["item"]
        self.open["text"] += piece
        name = "response.reasoning_text.delta" if kind == "reasoning" else \
            "response.output_text.delta"
        extra = {} if kind == "reasoning" else {"logprobs": []}
        events.append(self._event(name, item_id=item["id"], output_index=self._index(item),
                                  content_index=0, delta=piece, **extra))
        return events

    def _close(self) -> list[dict]:
        """Close the open text item: its text's done event, its part's, its own."""
        if self.open is None:
            return []
        item, text, kind = self.open["item"], self.open["text"], self.open["kind"]
        self.open = None
        index = self._index(item)
        if kind == "reasoning":
            part = {"type": "reasoning_text", "text": text}
            done = self._event("response.reasoning_text.done", item_id=item["id"],
                               output_index=index, content_index=0, text=text)
        else:
            part = output_text(text)
            done = self._event("response.output_text.done", item_id=item["id"],
                               output_index=index, content_index=0, text=text, logprobs=[])
        item.update(content=[part], status="completed")
        return [done,
                self._event("response.content_part.done", item_id=item["id"],
                            output_index=index, content_index=0, part=part),
                self._event("response.output_item.done", output_index=index, item=dict(item))]

    def _call(self, call: dict) -> list[dict]:
        """A chat tool_calls entry: a call's first (with its id and name) opens its item;
        its arguments, whole or in pieces, go out as argument deltas."""
        events = []
        index = call.get("index", len(self.calls))
        item = self.calls.get(index)
        if item is None:
            events += self._close()
            item = call_item(call["id"], call["function"]["name"], "", status="in_progress")
            self.items.append(item)
            self.calls[index] = item
            events.append(self._event("response.output_item.added",
                                      output_index=self._index(item), item=dict(item)))
        piece = call["function"].get("arguments") or ""
        if piece:
            item["arguments"] += piece
            events.append(self._event("response.function_call_arguments.delta",
                                      item_id=item["id"], output_index=self._index(item),
                                      delta=piece))
        return events

    def _close_call(self, item: dict) -> list[dict]:
        item["status"] = "completed"
        index = self._index(item)
        return [self._event("response.function_call_arguments.done", item_id=item["id"],
                            output_index=index, arguments=item["arguments"]),
                self._event("response.output_item.done", output_index=index,
                            item=dict(item))]
