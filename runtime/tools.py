"""Tool calling: OpenAI's `tools` and `tool_choice` on chat requests, as vLLM serves them.

    choice = ToolChoice(tools, "auto", fmt="hermes")      # openai_api.parse_chat builds it
    params.structured_outputs = choice.constraint()       # "required" and a named function
    message = choice.reply(text)                          # content and tool_calls
    stream = choice.stream(); stream.step(text) ... stream.finish()

- A named function ({"type": "function", "function": {"name": N}}): the reply is a call of
  N whose arguments are generated under N's parameters schema (structured outputs), so they
  always parse and fit it; a stream sends them as argument deltas. OpenAI ends a forced call
  with finish_reason "stop", and so does llmc.
- "required": one call or more (exactly one with parallel_tool_calls false), generated under
  one schema: an array of {"name", "parameters"} objects with a branch a tool.
- "auto" (OpenAI's default when tools are given): the model writes freely, and calls in its
  own syntax, which its chat template teaches it, are parsed out of the text:
    hermes       <tool_call>{"name": ..., "arguments": {...}}</tool_call>, text before them
                 the content (Qwen2.5, Qwen3, Hermes)
    llama3_json  the whole reply one {"name": ..., "parameters": {...}} or several joined by
                 ";" (Llama 3.1-3.3)
    mistral      [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...] (Mistral 7B v0.3,
                 Mixtral 8x22B, Mistral Nemo) or [TOOL_CALLS]name[ARGS]{...}, once a call
                 (the newer tokenizers: Mistral Small 3.2, Devstral, Magistral); text before
                 it the content. [TOOL_CALLS] is a special token, so such a request's text
                 keeps special tokens (skip_special_tokens false, as vLLM does), and its call
                 ids are 9 letters and digits, the only ids Mistral's templates accept.
  A reply that does not parse as calls is content, as it was written.
- "none": nothing is parsed.

In every mode the chat template gets the tools (transformers' `tools` argument), so a model
whose template shows them knows what it may call.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from llmc.runtime.detokenizer import partial_suffix

FORMATS = ("hermes", "llama3_json", "mistral")
HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
MISTRAL_CALLS, MISTRAL_ARGS, MISTRAL_ID = "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"
# llguidance's JSON-schema options: no free blanks, the separators json.dumps writes
COMPACT = {"x-guidance": {"whitespace_flexible": False, "item_separator": ", ",
                          "key_separator": ": "}}


def detect_format(template: str | None) -> str | None:
    """The tool-call syntax a chat template teaches its model, if llmc parses it."""
    if not template:
        return None
    if HERMES_OPEN in template:
        return "hermes"
    if MISTRAL_CALLS in template:
        return "mistral"
    # Llama 3.1-3.3's templates: "Respond in the format {"name": function name,
    # "parameters": dictionary of argument name and its value}", <|python_tag|> for code
    if '"parameters": dictionary of argument name' in template or "<|python_tag|>" in template:
        return "llama3_json"
    return None


def call_id(fmt: str | None = None) -> str:
    """A new call's id: OpenAI's shape, or for Mistral's templates (which refuse any other
    id when the conversation comes back) 9 letters and digits."""
    return uuid.uuid4().hex[:9] if fmt == "mistral" else f"call_{uuid.uuid4().hex[:24]}"


def tool_call(name: str, arguments: str, index: int | None = None,
              fmt: str | None = None) -> dict:
    """One call in OpenAI's shape (a stream's carries its index among the message's)."""
    call = {"id": call_id(fmt), "type": "function",
            "function": {"name": name, "arguments": arguments}}
    return call if index is None else {"index": index, **call}


@dataclass(frozen=True)
class ToolChoice:
    """A request's tools (OpenAI's objects, as given) and what it asks of them."""

    tools: tuple[dict, ...]
    mode: str                      # "none", "auto", "required" or "named"
    name: str | None = None        # the function, when named
    parallel: bool = True          # parallel_tool_calls: more than one call a reply
    fmt: str | None = None         # the model's own syntax, for "auto" (FORMATS)

    def parameters(self, name: str) -> dict:
        function = next(t["function"] for t in self.tools if t["function"]["name"] == name)
        return function.get("parameters") or {"type": "object", "properties": {}}

    def constraint(self) -> dict | None:
        """The structured_outputs that write this reply, or None (free text). Without free
        blanks, with json.dumps's separators (what models are taught), where a tool's schema
        does not say otherwise: a weak model could run on in blanks."""
        if self.mode == "named":
            return {"json": {**COMPACT, **self.parameters(self.name)}}
        if self.mode != "required":
            return None
        branches = [{"type": "object",
                     "properties": {"name": {"enum": [t["function"]["name"]]},
                                    "parameters": self.parameters(t["function"]["name"])},
                     "required": ["name", "parameters"], "additionalProperties": False}
                    for t in self.tools]
        schema = {"type": "array", "items": {"anyOf": branches}, "minItems": 1, **COMPACT}
        if not self.parallel:
            schema["maxItems"] = 1
        return {"json": schema}

    def parse(self, text: str) -> tuple[str | None, list[tuple[str, str]] | None]:
        """(content, calls) of a whole reply: calls are (name, arguments as JSON text), None
        when the reply holds none; then all of it is content."""
        calls = None
        if self.mode == "named":
            return None, [(self.name, text)]
        if self.mode == "required":
            calls = _required_calls(text)
        elif self.mode == "auto" and self.fmt == "hermes":
            head, calls = _hermes_calls(text)
            if calls:
                return head.strip() or None, calls
        elif self.mode == "auto" and self.fmt == "llama3_json":
            calls = _llama3_calls(text)
        elif self.mode == "auto" and self.fmt == "mistral":
            head, calls = _mistral_calls(text)
            if calls:
                return head.strip() or None, calls
        return (None, calls) if calls else (text, None)

    @property
    def keeps_special_tokens(self) -> bool:
        """Whether the reply's text must keep special tokens for its calls to be seen."""
        return self.mode == "auto" and self.fmt == "mistral"

    def reply(self, text: str) -> tuple[str | None, list[dict] | None]:
        """A whole reply's message content and tool_calls (OpenAI's objects)."""
        content, calls = self.parse(text)
        return content, [tool_call(n, a, fmt=self.fmt) for n, a in calls] if calls else None

    def finish_reason(self, reason: str | None, called: bool) -> str | None:
        """A reply that made calls it was free not to make ends "tool_calls" (OpenAI's
        reason); a forced named call ends "stop", as OpenAI's does."""
        return "tool_calls" if called and reason == "stop" and self.mode != "named" else reason

    def stream(self) -> ToolStream:
        return ToolStream(self)


class ToolStream:
    """One streamed reply's deltas. Content goes out as it comes until the text may be a
    call; from there it is held, and at the end sent as calls if it parses as calls (whole,
    one delta each: OpenAI's clients join argument deltas of any size) or else as content.
    A named function's arguments go out as they come."""

    def __init__(self, choice: ToolChoice):
        self.choice = choice
        self.text = ""
        self.sent = 0              # characters of text sent as content
        self.holding = False       # a call may have begun at self.sent
        self.started = False       # the named call's first delta went out

    def step(self, piece: str) -> dict:
        """The delta for the next piece of the reply ({} when nothing goes out yet)."""
        self.text += piece
        c = self.choice
        if c.mode == "named":
            if not piece:                  # (the arguments have not begun: reasoning first)
                return {}
            if not self.started:
                self.started = True
                return {"tool_calls": [tool_call(c.name, piece, index=0, fmt=c.fmt)]}
            return {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}
        if c.mode == "required" or self.holding:
            return {}          # a JSON array of calls, or what may be calls: held
        end = len(self.text) if c.mode == "none" else self._safe_end()
        out = self.text[self.sent:end]
        self.sent = end
        return {"content": out} if out else {}

    def _safe_end(self) -> int:
        """How far the text may go out as content: up to where a call may begin."""
        rest = self.text[self.sent:]
        if self.choice.fmt in ("hermes", "mistral"):
            marker = HERMES_OPEN if self.choice.fmt == "hermes" else MISTRAL_CALLS
            at = rest.find(marker)
            if at >= 0:
                self.holding = True
                return self.sent + at
            return len(self.text) - partial_suffix(rest, marker)
        if self.choice.fmt == "llama3_json":
            stripped = self.text.lstrip()
            if not stripped:            # blanks so far: the reply's kind is not known yet
                return self.sent
            if self.sent == 0 and stripped[0] == "{":
                self.holding = True
                return 0
        return len(self.text)

    def finish(self, reason: str | None) -> tuple[dict, str | None]:
        """The last delta (held content, or the calls) and the reply's finish_reason."""
        c = self.choice
        if c.mode == "named":
            return {}, c.finish_reason(reason, True)
        held = self.text[self.sent:]
        calls = None
        if c.mode == "required" or self.holding:
            _, calls = c.parse(self.text)
        if calls:
            return ({"tool_calls": [tool_call(n, a, index=i, fmt=c.fmt)
                                    for i, (n, a) in enumerate(calls)]},
                    c.finish_reason(reason, True))
        return ({"content": held} if held else {}), reason


def _arguments(value) -> str | None:
    """A call's arguments as JSON text: an object as the model wrote it, or text that is
    one; None for anything else."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    return json.dumps(value, ensure_ascii=False) if isinstance(value, dict) else None


def _call(obj, key: str) -> tuple[str, str] | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = _arguments(obj.get(key, {}))
    return None if arguments is None else (obj["name"], arguments)


def _required_calls(text: str) -> list[tuple[str, str]] | None:
    try:
        items = json.loads(text)
    except json.JSONDecodeError:
        return None            # cut short (max_tokens)
    calls = [_call(item, "parameters") for item in items] if isinstance(items, list) else None
    return calls if calls and all(calls) else None


_HERMES = re.compile(re.escape(HERMES_OPEN) + r"(.*?)(?:" + re.escape(HERMES_CLOSE) + r"|$)",
                     re.DOTALL)


def _hermes_calls(text: str) -> tuple[str, list[tuple[str, str]] | None]:
    """The text before the first <tool_call>, and the calls (a last one left unclosed at
    the end of the reply counts: the model may stop there)."""
    at = text.find(HERMES_OPEN)
    if at < 0:
        return text, None
    calls = []
    for body in _HERMES.findall(text, at):
        try:
            calls.append(_call(json.loads(body), "arguments"))
        except json.JSONDecodeError:
            return text, None
    return (text[:at], calls) if calls and all(calls) else (text, None)


def _llama3_calls(text: str) -> list[tuple[str, str]] | None:
    """Objects with a name and parameters, joined by ";" (Llama 3's parallel calls)."""
    decoder, rest, calls = json.JSONDecoder(), text.strip(), []
    while rest:
        try:
            obj, end = decoder.raw_decode(rest)
        except json.JSONDecodeError:
            return None
        call = _call(obj, "parameters" if "parameters" in obj else "arguments") \
            if isinstance(obj, dict) else None
        if call is None:
            return None
        calls.append(call)
        rest = rest[end:].lstrip()
        if rest.startswith(";"):
            rest = rest[1:].lstrip()
        elif rest:
            return None
    return calls or None


def _mistral_calls(text: str) -> tuple[str, list[tuple[str, str]] | None]:
    """The text before the first [TOOL_CALLS], and the calls after it: a JSON array of
    {"name", "arguments"} objects (or one object), or name[ARGS]{...} after each
    [TOOL_CALLS] (a [CALL_ID]id between name and [ARGS] is passed over)."""
    at = text.find(MISTRAL_CALLS)
    if at < 0:
        return text, None
    decoder, calls = json.JSONDecoder(), []
    for part in text[at + len(MISTRAL_CALLS):].split(MISTRAL_CALLS):
        part = part.strip()
        if part.startswith(("[", "{")):
            try:
                items, end = decoder.raw_decode(part)
            except json.JSONDecodeError:
                return text, None
            if part[end:].strip():
                return text, None
            items = items if isinstance(items, list) else [items]
            calls += [_call(item, "arguments") for item in items] or [None]
        elif MISTRAL_ARGS in part:
            name, _, arguments = part.partition(MISTRAL_ARGS)
            name = name.partition(MISTRAL_ID)[0].strip()
            arguments = _arguments(arguments.strip())
            calls.append((name, arguments) if name and arguments is not None else None)
        else:
            return text, None
    return (text[:at], calls) if calls and all(calls) else (text, None)


def template_messages(messages: list[dict]) -> list[dict]:
    """Messages as chat templates read them: an assistant's tool_calls' arguments as
    objects (what transformers' templates expect; OpenAI sends JSON text), so a template's
    `arguments | tojson` does not quote them twice."""
    out = []
    for m in messages:
        if m.get("tool_calls"):
            m = {**m, "tool_calls": [
                {**c, "function": {**c["function"],
                                   "arguments": _as_object(c["function"]["arguments"])}}
                for c in m["tool_calls"]]}
        out.append(m)
    return out


def _as_object(arguments: str):
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError:
        return arguments
    return value if isinstance(value, dict) else arguments
