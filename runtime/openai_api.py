"""The OpenAI API's request and response shapes, as plain functions: no HTTP here.

    req = parse_completion(body)      # or parse_chat; ApiError (a 4xx) names the bad field
    params = req.sampling(prompt_tokens, max_seq_len)
    completion_response(...), completion_chunk(...), chat_response(...), chat_chunk(...)

Requests are checked as OpenAI checks them: an unknown field, a wrong type or a value out
of range is a 400 naming the field (OpenAI refuses unknown fields too; vLLM's extensions
top_k, min_p, repetition_penalty, min_tokens, ignore_eos, stop_token_ids and
skip_special_tokens are known).
Fields that change nothing here (user, metadata, ...) are accepted; a field asking for what
llmc does not do (suffix) is a 400 that says so. `n` samples a prompt and a batch of prompts
(completions) give a choice each, indexed prompt-major as OpenAI indexes them.

`tools` and `tool_choice` (chat) become a ToolChoice (runtime/tools.py): a named function or
"required" writes the reply under a schema; "auto" parses the model's own call syntax, which
the server names (`tool_format`, from the chat template).

response_format json_object and json_schema (both endpoints, as vLLM takes them) and vLLM's
structured_outputs (json, json_object, regex, choice, grammar) hold the output to that
constraint (runtime/structured.py); one that does not compile is a 400 naming the field.

`echo` (completions) returns the prompt before the completion; with `logprobs`, the prompt
tokens' too (the first one's null), which is how lm-evaluation-harness scores a text through
an OpenAI-compatible server. `max_tokens: 0` is allowed with echo: the prompt alone.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

from llmc.errors import LlmcError
from llmc.runtime.reasoning import ReasoningStream
from llmc.runtime.reasoning import split as reasoning_split
from llmc.runtime.sampling_params import MAX_LOGPROBS, SamplingParams
from llmc.runtime.structured import StructuredOutputsParams
from llmc.runtime.tools import FORMATS, ToolChoice, template_messages

MAX_STOP = 16            # stop strings a request may give (OpenAI: 4; vLLM: any)
MAX_STOP_CHARS = 1024    # one stop string's length
COMPLETION_MAX_TOKENS = 16   # OpenAI's default for /v1/completions; chat defaults to the rest
ROLES = {"system", "developer", "user", "assistant", "tool"}
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")   # OpenAI's rule for a function's name
# An assistant message's reasoning, under the names clients send it (vLLM's, its older one,
# gpt-oss's); templates get it as reasoning_content (Qwen3's) and thinking, as transformers
# passes it
REASONING_FIELDS = ("reasoning", "reasoning_content", "thinking")
MAX_CHOICES = 128        # n x prompts in one request (OpenAI's n goes to 128)


class ApiError(Exception):
    """An error the client gets as OpenAI's JSON: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code = param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


# --- field types ------------------------------------------------------------------------------

def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _str_list(v) -> bool:
    return isinstance(v, list) and all(isinstance(s, str) for s in v)


def _int_list(v) -> bool:
    return isinstance(v, list) and all(_int(t) for t in v)


INT = ("an integer", _int)
NUM = ("a number", _num)
BOOL = ("a boolean", lambda v: isinstance(v, bool))
STR = ("a string", lambda v: isinstance(v, str))
OBJ = ("an object", lambda v: isinstance(v, dict))
ANY = ("anything", lambda v: True)
STOP = ("a string or a list of strings", lambda v: isinstance(v, str) or _str_list(v))
INTS = ("a list of integers", _int_list)
PROMPT = ("a string, a list of token ids, or a list of strings or of token id lists",
          lambda v: isinstance(v, str) or _int_list(v) or isinstance(v, list))
MESSAGES = ("a list of messages", lambda v: isinstance(v, list))

# Every field either endpoint takes (None = not given, as OpenAI reads null).
COMMON = {
    "model": STR, "stream": BOOL, "stream_options": OBJ, "max_tokens": INT,
    "temperature": NUM, "top_p": NUM, "presence_penalty": NUM, "frequency_penalty": NUM,
    "seed": INT, "stop": STOP, "n": INT, "logit_bias": OBJ, "user": STR,
    # vLLM's extensions
    "top_k": INT, "min_p": NUM, "repetition_penalty": NUM, "min_tokens": INT,
    "ignore_eos": BOOL, "stop_token_ids": INTS, "structured_outputs": OBJ,
    "skip_special_tokens": BOOL,
    # OpenAI's on chat; vLLM takes it on completions too
    "response_format": OBJ,
}
COMPLETION_FIELDS = {**COMMON, "prompt": PROMPT, "logprobs": INT, "echo": BOOL,
                     "suffix": STR, "best_of": INT}
CHAT_FIELDS = {**COMMON, "messages": MESSAGES, "logprobs": BOOL, "top_logprobs": INT,
               "max_completion_tokens": INT, "tools": ANY,
               "tool_choice": ANY, "parallel_tool_calls": BOOL, "metadata": OBJ,
               "store": BOOL, "service_tier": STR, "chat_template_kwargs": OBJ}
# what the chat template gets from llmc itself, not from chat_template_kwargs
TEMPLATE_OWN = {"messages", "tools", "add_generation_prompt", "bos_token", "eos_token"}


@dataclass(frozen=True)
class GenerationRequest:
    """One checked request: what to generate from, and how."""

    model: str
    prompts: tuple                          # each: text, token ids, or chat messages
    chat: bool
    params: SamplingParams                  # max_tokens still to settle (see sampling)
    max_tokens: int | None                  # as given; None: the endpoint's default
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None             # top-n alternatives per token, when asked
    echo: bool = False                      # the prompt (and its logprobs) before the text
    n: int = 1                              # choices a prompt
    tools: ToolChoice | None = None         # chat with tools: what the reply may call
    template_kwargs: dict | None = None     # chat: more variables for the chat template

    @property
    def prompt(self):
        """The first (for most requests, the only) prompt."""
        return self.prompts[0]

    def seed(self, j: int) -> int | None:
        """The seed of a prompt's j-th sample: the request's plus j, so n seeded samples
        differ from each other and repeat together."""
        seed = self.params.seed
        return None if seed is None else (seed + j) % 2**64

    def sampling(self, prompt_tokens: int, max_seq_len: int) -> SamplingParams:
        """The settings for a prompt of this many tokens; a request that cannot fit the
        engine's max_seq_len is a 400, as OpenAI's context-length error is."""
        room = max_seq_len - prompt_tokens
        if room < 1:
            raise bad(f"the prompt has {prompt_tokens} tokens; this engine's context is "
                      f"{max_seq_len} tokens (prompt + completion), so at most "
                      f"{max_seq_len - 1} prompt tokens", "messages" if self.chat else "prompt",
                      "context_length_exceeded")
        if self.max_tokens is None:
            return replace(self.params, max_tokens=room if self.chat
                           else min(COMPLETION_MAX_TOKENS, room))
        if self.max_tokens > room:
            raise bad(f"this engine's context is {max_seq_len} tokens, but {prompt_tokens} "
                      f"prompt tokens and max_tokens {self.max_tokens} make "
                      f"{prompt_tokens + self.max_tokens}; lower max_tokens or the prompt",
                      "max_tokens", "context_length_exceeded")
        return replace(self.params, max_tokens=self.max_tokens)


def parse_completion(body: Any, defaults: dict | None = None) -> GenerationRequest:
    """defaults: sampling settings for the fields the request leaves out (the model's
    recommended ones), before OpenAI's own."""
    f = {**(defaults or {}), **_fields(body, COMPLETION_FIELDS, required=("model", "prompt"))}
    if f.get("suffix"):
        raise bad("suffix is not supported", "suffix")
    logprobs = f.get("logprobs")
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise bad(f"logprobs must be an integer in 0..{MAX_LOGPROBS}, got {logprobs}",
                  "logprobs")
    return _request(f, _prompts(f["prompt"]), False, logprobs, bool(f.get("echo")))


def parse_chat(body: Any, tool_format: str | None = None, defaults: dict | None = None
               ) -> GenerationRequest:
    """tool_format: the syntax of the model's own tool calls (runtime/tools.py FORMATS), which
    tool_choice "auto" needs; None where the server knows none. defaults: as for
    parse_completion."""
    f = {**(defaults or {}), **_fields(body, CHAT_FIELDS, required=("model", "messages"))}
    tools = _tools(f, tool_format)
    top = f.get("top_logprobs")
    if top is not None and not 0 <= top <= MAX_LOGPROBS:
        raise bad(f"top_logprobs must be an integer in 0..{MAX_LOGPROBS}, got {top}",
                  "top_logprobs")
    if top is not None and not f.get("logprobs"):
        raise bad("top_logprobs needs logprobs: true", "top_logprobs")
    if f.get("max_completion_tokens") is not None:   # the newer name wins, as in OpenAI
        f["max_tokens"] = f["max_completion_tokens"]
    req = _request(f, [chat_messages(f["messages"])], True,
                   (top or 0) if f.get("logprobs") else None, tools=tools)
    return replace(req, template_kwargs=template_kwargs(f.get("chat_template_kwargs")))


def template_kwargs(kwargs) -> dict | None:
    """chat_template_kwargs, checked: variables the chat template reads (Qwen3's
    enable_thinking, ...), none of those llmc sets itself."""
    if kwargs is None:
        return None
    if not isinstance(kwargs, dict):
        raise bad("chat_template_kwargs must be an object", "chat_template_kwargs")
    if TEMPLATE_OWN & set(kwargs):
        own = ", ".join(sorted(TEMPLATE_OWN & set(kwargs)))
        raise bad(f"chat_template_kwargs may not set {own} (llmc sets them)",
                  "chat_template_kwargs")
    return kwargs or None


def _tools(f: dict, tool_format: str | None) -> ToolChoice | None:
    """The request's tools and tool_choice, checked; None without tools."""
    tools, choice = f.get("tools") or [], f.get("tool_choice")
    if not tools:
        if choice not in (None, "none"):
            raise bad(f"tool_choice {_short(choice)} needs tools", "tool_choice")
        return None
    return _tool_choice(tools, check_tools(tools), choice, f, tool_format)


def check_tools(tools) -> list[str]:
    """A request's tools, checked as OpenAI checks them; their names."""
    if not isinstance(tools, list):
        raise bad(f"'tools' must be a list of tools, got {type(tools).__name__}", "tools")
    names = []
    for i, t in enumerate(tools):
        where = f"tools[{i}]"
        function = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(function,
                                                                                    dict):
            raise bad(f'{where} must be {{"type": "function", "function": {{"name": ..., '
                      f'"parameters": {{...}}}}}}, got {_short(t)}', where)
        name = function.get("name")
        if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
            raise bad(f"{where}.function.name must be 1-64 letters, digits, _ or -, got "
                      f"{_short(name)}", f"{where}.function.name")
        if name in names:
            raise bad(f"{where}: two tools are named {name!r}", f"{where}.function.name")
        if not isinstance(function.get("parameters", {}), dict):
            raise bad(f"{where}.function.parameters must be a JSON schema object",
                      f"{where}.function.parameters")
        names.append(name)
    return names


def _tool_choice(tools: list, names: list[str], choice, f: dict,
                 tool_format: str | None) -> ToolChoice:
    """What tool_choice asks of the tools; a constraint's schemas checked one by one, so a
    bad one's error names it."""
    if choice is None or choice in ("none", "auto", "required"):
        mode, name = choice or "auto", None
    elif (isinstance(choice, dict) and choice.get("type") == "function"
          and isinstance(choice.get("function"), dict)
          and isinstance(choice["function"].get("name"), str)):
        mode, name = "named", choice["function"]["name"]
        if name not in names:
            raise bad(f"tool_choice names {name!r}, which is not among the tools "
                      f"({', '.join(names)})", "tool_choice")
    else:
        raise bad(f'tool_choice must be "none", "auto", "required" or {{"type": "function", '
                  f'"function": {{"name": ...}}}}, got {_short(choice)}', "tool_choice")
    if mode == "auto" and tool_format not in FORMATS:
        raise bad('tool_choice "auto" parses the model\'s own tool calls, and this model\'s '
                  f"chat template shows none of the syntaxes llmc parses ({', '.join(FORMATS)}); "
                  'ask for "required" or a named function (generated under the tools\' '
                  "schemas), or start the server with --tool-call-parser", "tool_choice")
    result = ToolChoice(tuple(tools), mode, name, f.get("parallel_tool_calls", True),
                        tool_format)
    if result.constraint() is not None:
        if f.get("response_format") not in (None, {"type": "text"}) or \
                f.get("structured_outputs") is not None:
            raise bad(f"tool_choice {_short(choice)} writes the reply under the tools' schemas; "
                      "give no response_format or structured_outputs with it", "tool_choice")
        for i, t in enumerate(tools):
            if mode == "required" or t["function"]["name"] == name:
                try:
                    StructuredOutputsParams(json=result.parameters(
                        t["function"]["name"])).validate()
                except LlmcError as e:
                    raise bad(f"tools[{i}].function.parameters: "
                              + str(e).removeprefix("structured_outputs json: "),
                              f"tools[{i}].function.parameters") from None
    return result


def _fields(body: Any, known: dict, required: tuple[str, ...]) -> dict:
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - set(known))
    if unknown:
        raise bad(f"unrecognized request argument(s): {', '.join(unknown)}", unknown[0])
    for name in required:
        if body.get(name) is None:
            raise bad(f"'{name}' is required", name, "missing_required_parameter")
    for name, value in body.items():
        what, ok = known[name]
        if value is not None and not ok(value):
            raise bad(f"'{name}' must be {what}, got {type(value).__name__} "
                      f"{_short(value)}", name, "invalid_type")
    return {k: v for k, v in body.items() if v is not None}


def _request(f: dict, prompts: list, chat: bool, logprobs: int | None, echo: bool = False,
             tools: ToolChoice | None = None) -> GenerationRequest:
    n = f.get("n", 1)
    if n < 1:
        raise bad(f"n must be at least 1, got {n}", "n")
    if n * len(prompts) > MAX_CHOICES:
        raise bad(f"at most {MAX_CHOICES} choices a request: n ({n}) x prompts "
                  f"({len(prompts)}) is {n * len(prompts)}", "n")
    if f.get("best_of") not in (None, n):
        raise bad(f"best_of must equal n ({n}): llmc returns every sample it draws, got "
                  f"{f['best_of']}", "best_of")
    max_tokens = f.get("max_tokens")
    if max_tokens is not None and max_tokens < (0 if echo else 1):
        raise bad(f"max_tokens must be at least {0 if echo else 1}, got {max_tokens}"
                  + ("" if echo else " (0 only with echo: the prompt alone)"), "max_tokens")
    temperature = f.get("temperature")
    if temperature is not None and not 0 <= temperature <= 2:
        raise bad(f"temperature must be in [0, 2], got {temperature}", "temperature")
    stop = [f["stop"]] if isinstance(f.get("stop"), str) else f.get("stop", [])
    if len(stop) > MAX_STOP:
        raise bad(f"at most {MAX_STOP} stop strings, got {len(stop)}", "stop")
    if any(not s or len(s) > MAX_STOP_CHARS for s in stop):
        raise bad(f"a stop string must have 1 to {MAX_STOP_CHARS} characters", "stop")
    options = f.get("stream_options") or {}
    if set(options) - {"include_usage"}:
        raise bad(f"unknown stream_options {sorted(options)}", "stream_options")
    if options and not f.get("stream"):
        raise bad("stream_options needs stream: true", "stream_options")
    f.setdefault("temperature", 1.0)   # the API's default (llmc run's is greedy)
    names = ("temperature", "top_p", "presence_penalty", "frequency_penalty", "seed", "top_k",
             "min_p", "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids",
             "logit_bias", "skip_special_tokens")
    # echo with logprobs scores the prompt; so does echo with max_tokens 0 (top-0), the one
    # kind of request SamplingParams lets generate nothing
    prompt_logprobs = None
    if echo and (logprobs is not None or max_tokens == 0):
        prompt_logprobs = logprobs or 0
    structured, field = _structured(f)
    if tools is not None and tools.keeps_special_tokens:   # the calls' marker is one
        f["skip_special_tokens"] = False
    constraint = tools.constraint() if tools is not None else None
    if constraint is not None:
        structured, field = constraint, "tool_choice"
    try:   # max_tokens is settled once the prompt's length is known (see sampling)
        params = SamplingParams.from_dict(
            {**{k: f[k] for k in names if k in f}, "stop": stop, "logprobs": logprobs,
             "prompt_logprobs": prompt_logprobs, "structured_outputs": structured,
             "max_tokens": max_tokens if max_tokens is not None
             else max(f.get("min_tokens", 0), 1)})
    except LlmcError as e:   # its message starts with the field's name
        message, name = str(e), str(e).split()[0].rstrip(":")
        if name == "structured_outputs" and field == "response_format":
            message = message.replace("structured_outputs json", "response_format's schema", 1)
        raise bad(message, field if name == "structured_outputs" else name) from None
    return GenerationRequest(f["model"], tuple(prompts), chat, params, max_tokens,
                             bool(f.get("stream")), bool(options.get("include_usage")),
                             logprobs, echo, n, tools)


def _structured(f: dict) -> tuple[dict | None, str]:
    """The output's constraint, from OpenAI's response_format or vLLM's
    structured_outputs (one of them), and the field it came from."""
    fmt, structured = f.get("response_format"), f.get("structured_outputs")
    if fmt is None or fmt == {"type": "text"}:
        return structured, "structured_outputs"
    if structured is not None:
        raise bad("give response_format or structured_outputs, not both", "response_format")
    kind = fmt.get("type")
    if kind == "json_object" and set(fmt) == {"type"}:
        return {"json_object": True}, "response_format"
    if kind == "json_schema" and set(fmt) == {"type", "json_schema"}:
        spec = fmt["json_schema"]
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise bad("response_format json_schema needs json_schema.schema, a JSON schema "
                      "object: {\"type\": \"json_schema\", \"json_schema\": {\"name\": ..., "
                      "\"schema\": {...}}}", "response_format")
        return {"json": spec["schema"]}, "response_format"
    raise bad(f"response_format must be {{\"type\": \"text\"}}, {{\"type\": \"json_object\"}} or "
              f"{{\"type\": \"json_schema\", \"json_schema\": {{...}}}}, got {_short(fmt)}",
              "response_format")


def _prompts(prompt) -> list:
    """The prompts: one (text or token ids) or a batch of them."""
    batch = [prompt]
    if isinstance(prompt, list) and prompt and not _int_list(prompt):
        if not all(isinstance(p, str) or _int_list(p) for p in prompt):
            raise bad(f"'prompt' must be {PROMPT[0]}", "prompt", "invalid_type")
        batch = prompt
    for i, p in enumerate(batch):
        if not p:
            raise bad("the prompt is empty" if len(batch) == 1 else f"prompt {i} is empty",
                      "prompt")
    return batch


def chat_messages(messages) -> list[dict]:
    """Messages for the chat template: {"role", "content"}, text content parts joined; an
    assistant's tool_calls (its content may then be null) and reasoning, and a tool
    message's tool_call_id pass through (runtime/tools.py template_messages)."""
    if not messages:
        raise bad("messages is empty: give at least one message", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"{where} must be an object with a role and content", where)
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise bad(f"{where}.role must be one of {', '.join(sorted(ROLES))}, got "
                      f"{_short(role)}", f"{where}.role")
        calls = m.get("tool_calls") if role == "assistant" else None
        if calls is not None:
            _check_calls(calls, f"{where}.tool_calls")
        if isinstance(content, list):   # content parts: only text ones
            if not all(isinstance(p, dict) and p.get("type") == "text"
                       and isinstance(p.get("text"), str) for p in content):
                raise bad(f"{where}.content: only text parts are supported",
                          f"{where}.content")
            content = "".join(p["text"] for p in content)
        if content is None and calls:
            content = ""
        if not isinstance(content, str):
            raise bad(f"{where}.content must be a string or a list of text parts, got "
                      f"{type(content).__name__}", f"{where}.content")
        # "developer" is OpenAI's newer name for "system", which chat templates know
        message = {"role": "system" if role == "developer" else role, "content": content}
        if calls:
            message["tool_calls"] = calls
        if role == "tool":
            if not isinstance(m.get("tool_call_id"), str):
                raise bad(f"{where}: a tool message needs tool_call_id, the id of the call it "
                          "answers", f"{where}.tool_call_id")
            message["tool_call_id"] = m["tool_call_id"]
        if isinstance(m.get("name"), str):
            message["name"] = m["name"]
        thought = next((m[k] for k in REASONING_FIELDS if isinstance(m.get(k), str)), None)
        if role == "assistant" and thought is not None:   # its reasoning, sent back
            message.update(reasoning_content=thought, thinking=thought)
        out.append(message)
    return template_messages(out)


def _check_calls(calls, where: str) -> None:
    """An assistant message's tool_calls: [{"id", "type": "function", "function": {"name",
    "arguments": JSON text}}]."""
    if not isinstance(calls, list):
        raise bad(f"{where} must be a list of tool calls", where)
    for j, c in enumerate(calls):
        function = c.get("function") if isinstance(c, dict) else None
        if not (isinstance(function, dict) and isinstance(function.get("name"), str)
                and isinstance(function.get("arguments"), str)):
            raise bad(f'{where}[{j}] must be {{"id": ..., "type": "function", "function": '
                      f'{{"name": ..., "arguments": "JSON text"}}}}, got {_short(c)}',
                      f"{where}[{j}]")


def _short(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# --- responses --------------------------------------------------------------------------------

def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def _envelope(rid: str, obj: str, model: str, created: int | None = None) -> dict:
    return {"id": rid, "object": obj, "created": created or int(time.time()), "model": model}


def completion_choice(index: int, text, finish_reason, logprobs=None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_choice(index: int, message: dict, finish_reason, logprobs=None) -> dict:
    return {"index": index, "message": message, "logprobs": logprobs,
            "finish_reason": finish_reason}


class ChatReply:
    """One chat choice's text as OpenAI's assistant message: its reasoning apart, where the
    server parses it (runtime/reasoning.py), then its tool calls, where the request has tools
    (runtime/tools.py); whole (message) or piece by piece (chunk)."""

    def __init__(self, tools: ToolChoice | None = None, thinking: bool | None = None):
        """thinking: None where reasoning is not parsed, else whether the prompt left the
        reply inside a <think> block (reasoning.opened)."""
        self.tools, self.thinking = tools, thinking
        self._reasoning = ReasoningStream(thinking) if thinking is not None else None
        self._calls = tools.stream() if tools is not None else None

    def message(self, text: str, finish_reason: str | None) -> tuple[dict, str | None]:
        """A whole reply's message, and its finish_reason ("tool_calls" where it called)."""
        reasoning, content = (None, text) if self.thinking is None else \
            reasoning_split(text, self.thinking)
        message = {"role": "assistant", "content": content}
        if self.tools is not None and content is not None:
            message["content"], calls = self.tools.reply(content)
            if calls:
                message["tool_calls"] = calls
            finish_reason = self.tools.finish_reason(finish_reason, bool(calls))
        if reasoning is not None:   # vLLM's field, and its older name, which clients read
            message["reasoning"] = message["reasoning_content"] = reasoning
        return message, finish_reason

    def chunk(self, piece: str, finished: bool, finish_reason: str | None
              ) -> tuple[dict, str | None]:
        """The delta for a streamed reply's next piece (all that is held, once finished),
        and its finish_reason."""
        reasoning, content = self._reasoning.step(piece) if self._reasoning else ("", piece)
        if finished and self._reasoning:
            more = self._reasoning.finish()
            reasoning, content = reasoning + more[0], content + more[1]
        delta = {"reasoning": reasoning, "reasoning_content": reasoning} if reasoning else {}
        if self._calls is None:
            return {**delta, **({"content": content} if content else {})}, finish_reason
        delta.update(self._calls.step(content))
        if finished:
            last, finish_reason = self._calls.finish(finish_reason)
            if "content" in last:
                delta["content"] = delta.get("content", "") + last["content"]
            if "tool_calls" in last:
                delta["tool_calls"] = delta.get("tool_calls", []) + last["tool_calls"]
        return delta, finish_reason


def completion_response(rid, model, choices: list[dict], use) -> dict:
    return {**_envelope(rid, "text_completion", model), "choices": choices, "usage": use}


def chat_response(rid, model, choices: list[dict], use) -> dict:
    return {**_envelope(rid, "chat.completion", model), "choices": choices, "usage": use}


def completion_chunk(rid, model, created, text, finish_reason=None, logprobs=None,
                     index: int = 0) -> dict:
    return {**_envelope(rid, "text_completion", model, created),
            "choices": [completion_choice(index, text, finish_reason, logprobs)]}


def chat_chunk(rid, model, created, delta: dict, finish_reason=None, logprobs=None,
               index: int = 0) -> dict:
    return {**_envelope(rid, "chat.completion.chunk", model, created),
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                         "finish_reason": finish_reason}]}


def usage_chunk(rid, model, created, chat: bool, use: dict) -> dict:
    """The last chunk of a stream with stream_options.include_usage: no choices, the usage."""
    obj = "chat.completion.chunk" if chat else "text_completion"
    return {**_envelope(rid, obj, model, created), "choices": [], "usage": use}


def completion_logprobs(entries: list, token_text: Callable[[int], str], ids: list[int],
                        offset: int = 0) -> dict:
    """The legacy completions shape: tokens, token_logprobs, top_logprobs, text_offset; an
    entry and a token each of `ids` (a stop token that ended the text included). An entry is
    (logprob, top-n) or None (an echoed prompt's first token: null in both)."""
    tokens = [token_text(t) for t in ids]
    offsets = []
    for tok in tokens:
        offsets.append(offset)
        offset += len(tok)
    return {"tokens": tokens,
            "token_logprobs": [None if e is None else e[0] for e in entries],
            "top_logprobs": [None if e is None else {token_text(t): lp for t, lp in e[1] or ()}
                             for e in entries],
            "text_offset": offsets}


def chat_logprobs(entries: list, token_text: Callable[[int], str], ids: list[int]) -> dict:
    """The chat shape: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    def one(token_id, lp):
        text = token_text(token_id)
        return {"token": text, "logprob": lp, "bytes": list(text.encode())}
    return {"content": [{**one(t, lp), "top_logprobs": [one(a, b) for a, b in top or ()]}
                        for t, (lp, top) in zip(ids, entries)]}
