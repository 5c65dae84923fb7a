"""`llmc serve`: an OpenAI-compatible HTTP server on the in-flight-batching engine.

    server = OpenAIServer(Runner("smollm2.engine"), model_name="smollm2")
    server.run("127.0.0.1", 8000)            # blocks; SIGTERM drains, then it returns
    with server.running("127.0.0.1", 0) as url: ...   # a background thread (tests, embedding)

Endpoints: POST /v1/completions and /v1/chat/completions (JSON or SSE streams), GET
/v1/models, /health and /metrics (Prometheus); vLLM's tokenizer endpoints POST /tokenize and
/detokenize and GET /tokenizer_info, which lm-evaluation-harness's `tokenizer_backend=remote`
reads (like vLLM's, outside /v1 and so without the API key: they run no model). Every
request shares the engine's steps with every other (one EngineLoop thread steps the engine;
this event loop only parses, tokenizes and writes). Request checking and the JSON shapes are
runtime/openai_api.py's; the metrics are runtime/server_metrics.py's.

Starlette + uvicorn: a small, well-kept ASGI toolkit and server (FastAPI is Starlette plus
pydantic models; the request checks here must answer with OpenAI's error shape and llmc's
own messages, which pydantic's 422s are not, so its layer would be bypassed anyway).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import socket
import threading
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any, AsyncIterator

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from llmc.errors import LlmcError
from llmc.runtime import openai_api as api
from llmc.runtime import reasoning, tools
from llmc.runtime import responses_api as rapi
from llmc.runtime.engine_loop import AsyncEngine
from llmc.runtime.openai_api import ApiError
from llmc.runtime.server_metrics import CONTENT_TYPE, ServerMetrics

log = logging.getLogger("llmc.serve")
GENERATE = {"/v1/completions": "completions", "/v1/chat/completions": "chat",
            "/v1/responses": "responses"}
ID_PREFIX = {"completions": "cmpl", "chat": "chatcmpl", "responses": "resp"}


class OpenAIServer:
    def __init__(self, runner, model_name: str, api_key: str | None = None,
                 max_queue: int = 256, max_body_bytes: int = 16 << 20,
                 tool_call_parser: str = "auto", reasoning_parser: str = "auto",
                 generation_config: str = "auto"):
        """runner: a Runner (its engine loop, tokenizer and chat template). max_queue:
        requests that may wait beyond the engine's max_batch_size running ones; more get
        429. max_body_bytes: larger request bodies get 413. tool_call_parser: the syntax
        of the model's own tool calls, which tool_choice "auto" parses (runtime/tools.py
        FORMATS; "auto": the one its chat template shows, if any; "none": no "auto").
        reasoning_parser: "auto" (when the chat template shows <think> blocks), "none", or
        vLLM's names for the same <think> parser, "deepseek_r1" and "qwen3"
        (runtime/reasoning.py). generation_config: "auto", the model's recommended sampling
        settings where a request gives none (the engine header's `sampling`); "none":
        OpenAI's defaults."""
        self.runner = runner
        self.engine = AsyncEngine(runner.loop)
        self.model_name = model_name
        self.api_key = api_key
        self.max_seq_len = runner.limits.max_seq_len
        self.vocab_size = runner.engine.header.io.vocab_size
        self.capacity = runner.limits.max_batch_size + max_queue
        self.max_body_bytes = max_body_bytes
        self.active = 0          # generation requests inside the server, counted by __call__
        self.draining = False    # set by SIGTERM: new requests get 503
        self.metrics = ServerMetrics(runner.loop, lambda: self.active)
        self.sampling_defaults = runner.engine.header.sampling \
            if generation_config == "auto" else {}
        self.tool_format = (tools.detect_format(runner.chat_template)
                            if tool_call_parser == "auto" else
                            None if tool_call_parser == "none" else tool_call_parser)
        self.thinks = (reasoning.detect(runner.chat_template) if reasoning_parser == "auto"
                       else reasoning_parser != "none")
        # a constraint starts after the reasoning where </think> is a token of its own
        self.think_end = runner.tokenizer.token_to_id(reasoning.CLOSE) if self.thinks else None
        # structured outputs: llguidance's view of the tokenizer takes ~0.2 s (49k vocab),
        # which the first constrained request would otherwise spend on the engine's thread.
        # Started once the socket listens, and waited for before returning: a process that
        # exits while it runs in llguidance's native code may crash at exit (seen as a
        # SIGSEGV after a failed bind, about one start in 30 on a loaded machine).
        self._warm = threading.Thread(target=runner.engine.grammars.warm,
                                      name="llmc-grammar-warm", daemon=True)
        self.app = Starlette(routes=[
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/responses", self.responses, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.scrape, methods=["GET"]),
            Route("/tokenize", self.tokenize, methods=["POST"]),
            Route("/detokenize", self.detokenize, methods=["POST"]),
            Route("/tokenizer_info", self.tokenizer_info, methods=["GET"]),
        ], exception_handlers={HTTPException: self._http_error})

    async def __call__(self, scope, receive, send) -> None:
        """The ASGI app. Counts generation requests here, around the whole response, so a
        stream is counted until its last byte (or its client leaves) and a response that
        never started is not counted forever."""
        if scope["type"] != "http" or scope["path"] not in GENERATE:
            return await self.app(scope, receive, send)
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1
            # A stream whose client left before it started never ran its own close
            if (rec := scope.get("llmc.record")) is not None:
                rec.close(499)

    # --- endpoints ----------------------------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, lambda body: api.parse_completion(
            body, defaults=self.sampling_defaults))

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, lambda body: api.parse_chat(
            body, tool_format=self.tool_format, defaults=self.sampling_defaults))

    async def responses(self, request: Request) -> Response:
        """OpenAI's Responses API, as the chat request it means (runtime/responses_api.py)."""
        spec = []

        def parse(body):
            req, s = rapi.parse_response(body, self.tool_format, self.sampling_defaults)
            spec.append(s)
            return req
        return await self._generate(
            request, parse,
            lambda req, choices, results, rec: self._response(spec[0], choices[0], results[0],
                                                              rec),
            lambda req, choices, rec: self._response_events(spec[0], choices[0], rec))

    async def models(self, request: Request) -> Response:
        if (denied := self._denied(request)) is not None:
            return _error(denied)
        return JSONResponse({"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": int(time.time()),
            "owned_by": "llmc", "max_model_len": self.max_seq_len,
            "vocab_size": self.vocab_size}]})   # llmc's extra: what `llmc bench --url` draws

    async def health(self, request: Request) -> Response:
        if self.runner.loop.error is not None:
            return JSONResponse({"status": f"engine failed: {self.runner.loop.error}"}, 503)
        if self.draining:
            return JSONResponse({"status": "draining"}, 503)
        return JSONResponse({"status": "ok"})

    async def scrape(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    async def tokenize(self, request: Request) -> Response:
        """{"prompt": text, "add_special_tokens": true} or {"messages": [...], "tools":
        [...]} (the chat template's tokens, as a chat request's prompt) -> {"tokens",
        "count", "max_model_len"}."""
        try:
            body = await self._json(request)
            if not isinstance(body, dict):
                raise api.bad("the request body must be a JSON object")
            tools = body.get("tools") or None
            if tools is not None:
                api.check_tools(tools)
            kwargs = api.template_kwargs(body.get("chat_template_kwargs"))
            if "messages" in body:
                prompt, chat, special = api.chat_messages(body["messages"]), True, True
            else:
                prompt, chat = body.get("prompt"), False
                special = body.get("add_special_tokens", True)
                if not isinstance(prompt, str) or not isinstance(special, bool):
                    raise api.bad("give 'prompt' (a string) and, if any, "
                                  "'add_special_tokens' (a boolean), or 'messages'", "prompt")
            tokens, _ = await run_in_threadpool(self._encode, prompt, chat, special, tools,
                                                kwargs)
        except ApiError as e:
            return _error(e)
        return JSONResponse({"tokens": tokens, "count": len(tokens),
                             "max_model_len": self.max_seq_len})

    async def detokenize(self, request: Request) -> Response:
        """{"tokens": [ids]} -> {"prompt": their text, special tokens included}."""
        try:
            body = await self._json(request)
            tokens = body.get("tokens") if isinstance(body, dict) else None
            if not isinstance(tokens, list) or not all(
                    isinstance(t, int) and not isinstance(t, bool)
                    and 0 <= t < self.vocab_size for t in tokens):
                raise api.bad(f"'tokens' must be a list of token ids (0..{self.vocab_size - 1})",
                              "tokens")
        except ApiError as e:
            return _error(e)
        return JSONResponse({"prompt": self.runner.tokenizer.decode(
            tokens, skip_special_tokens=False)})

    async def tokenizer_info(self, request: Request) -> Response:
        """The special tokens' text and the chat template (vLLM's /tokenizer_info)."""
        eos, bos = self.runner.eos_ids, self.runner.engine.header.tokenizer.bos_token_id
        return JSONResponse({
            "eos_token": self._token_text(eos[0]) if eos else None,
            "bos_token": self._token_text(bos) if bos is not None else None,
            "pad_token": None, "chat_template": self.runner.chat_template,
            "model_max_length": self.max_seq_len})

    async def _http_error(self, request: Request, exc: HTTPException) -> Response:
        """Unknown paths and methods answer in OpenAI's JSON too."""
        return _error(ApiError(exc.status_code, f"{request.method} {request.url.path}: "
                               f"{exc.detail}", code="not_found" if exc.status_code == 404
                               else None))

    # --- one generation request ---------------------------------------------------------------

    async def _generate(self, request: Request, parse, whole=None, stream=None) -> Response:
        """Admit, generate and answer one request. whole(req, choices, outputs, rec): the
        JSON of a whole response (default: completions' or chat's); stream(req, choices,
        rec): its server-sent events (the same)."""
        endpoint = GENERATE[request.url.path]
        rec = _Record(self, endpoint, ID_PREFIX[endpoint])
        request.scope["llmc.record"] = rec
        try:
            req, choices = await self._admit(request, parse)
        except ApiError as e:
            rec.close(e.status, error=e.message)
            return _error(e)
        rec.prompt_tokens = sum(len(c.tokens) for c in choices if c.j == 0)
        rec.choices = len(choices)
        if req.stream:
            return StreamingResponse((stream or self._stream)(req, choices, rec),
                                     media_type="text/event-stream",
                                     # nginx would buffer the events otherwise
                                     headers={"Cache-Control": "no-cache",
                                              "X-Accel-Buffering": "no"})
        try:
            results = await _unless_disconnected(request, _all(
                self._collect(c, rec) for c in choices))
        except ApiError as e:
            rec.close(e.status, error=e.message)
            return _error(e)
        if results is None:   # the client left; its requests were aborted, their blocks freed
            rec.close(499)
            return Response(status_code=499)
        body = (whole or self._whole)(req, choices, results, rec)
        rec.close(200)
        return JSONResponse(body)

    def _whole(self, req, choices: list[_Choice], results: list, rec: _Record) -> dict:
        shape = api.chat_response if req.chat else api.completion_response
        return shape(rec.id, self.model_name, [self._choice(req, c, outputs)
                                               for c, outputs in zip(choices, results)],
                     api.usage(rec.prompt_tokens, rec.completion_tokens, rec.cached_tokens))

    def _response(self, spec, c: _Choice, outputs: list, rec: _Record) -> dict:
        """A whole Responses API reply."""
        message, reason = c.reply.message("".join(o.text for o in outputs),
                                          outputs[-1].finish_reason)
        return rapi.response(spec, rec.id, self.model_name, message, reason,
                             rapi.usage(rec.prompt_tokens, rec.completion_tokens,
                                        rec.cached_tokens))

    async def _response_events(self, spec, c: _Choice, rec: _Record) -> AsyncIterator[str]:
        """A Responses API reply's events as the request advances (OpenAI's SSE: each
        event's type on its `event:` line too)."""
        stream = rapi.ResponseStream(spec, rec.id, self.model_name)
        code = 200
        try:
            for e in stream.start():
                yield _sse(e, e["type"])
            async for out in self._outputs(c, rec):
                reason = out.finish_reason if out.finished else None
                delta, reason = c.reply.chunk(out.text, out.finished, reason)
                events = stream.step(delta)
                if out.finished:
                    events += stream.finish(reason, rapi.usage(
                        rec.prompt_tokens, rec.completion_tokens, rec.cached_tokens))
                for e in events:
                    yield _sse(e, e["type"])
        except ApiError as e:   # mid-stream: the status is sent already, so an error event
            code = e.status
            rec.error = e.message
            event = {"type": "error", "sequence_number": stream.seq, "code": e.code,
                     "message": e.message, "param": e.param}
            yield _sse(event, "error")
        finally:   # also when the client left (the request is aborted with the generator)
            rec.close(code if rec.finished or code != 200 else 499)

    def _choice(self, req, c: _Choice, outputs: list) -> dict:
        """One choice of a whole response, from its request's outputs."""
        text = "".join(o.text for o in outputs)
        ids = [t for o in outputs for t in o.token_ids]
        entries = [e for o in outputs for e in o.logprobs or ()]
        last = outputs[-1]
        if req.echo:
            text = self._prompt_text(c) + text
            entries = self._prompt_entries(outputs, c.tokens) + entries
            ids = c.tokens + ids
        lp = self._logprobs(req, entries, ids + self._stop(req, last)) \
            if req.logprobs is not None else None
        if req.chat:
            message, reason = c.reply.message(text, last.finish_reason)
            return api.chat_choice(c.index, message, reason, lp)
        return api.completion_choice(c.index, text, last.finish_reason, lp)

    async def _admit(self, request: Request, parse):
        """Everything checked before the engine sees the request: key, drain, body, fields,
        model, room in the queue, the prompt's tokens and length."""
        if (denied := self._denied(request)) is not None:
            raise denied
        if self.draining:
            raise ApiError(503, "the server is shutting down", "service_unavailable")
        req = parse(await self._json(request))
        if req.model != self.model_name:
            raise ApiError(404, f"the model {req.model!r} does not exist; this server serves "
                           f"{self.model_name!r}", param="model", code="model_not_found")
        if self.active > self.capacity:
            raise ApiError(429, f"the server's queue is full ({self.capacity} requests); "
                           "retry later", "rate_limit_exceeded", code="queue_full")
        choices = []
        for prompt in req.prompts:
            tokens, text = await run_in_threadpool(self._tokens, req, prompt)
            params = req.sampling(len(tokens), self.max_seq_len)
            thinking = self._thinking(text, params)
            if thinking is not None and params.structured_outputs is not None:
                params = replace(params, structured_after=self.think_end)
            for j in range(req.n):
                choices.append(_Choice(len(choices), j, prompt, tokens,
                                       replace(params, seed=req.seed(j)) if j else params,
                                       api.ChatReply(req.tools, thinking) if req.chat
                                       else None))
        return req, choices

    def _thinking(self, text: str | None, params) -> bool | None:
        """Whether a chat prompt leaves its reply inside a <think> block, None where the
        reply is not parsed for reasoning: the parser is off, or the reply is constrained
        and the constraint cannot wait for the reasoning's end (no </think> token, or a
        prompt that closed the block already)."""
        if not self.thinks or text is None:
            return None
        if params.structured_outputs is not None and (self.think_end is None
                                                      or reasoning.closed(text)):
            return None
        return reasoning.opened(text)

    def _denied(self, request: Request) -> ApiError | None:
        if self.api_key is None:
            return None
        given = request.headers.get("authorization", "")
        scheme, _, key = given.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(key.strip().encode(),
                                                               self.api_key.encode()):
            return None
        return ApiError(401, f"{'wrong' if given else 'missing'} API key: send the header "
                        "'Authorization: Bearer KEY' with this server's key",
                        code="invalid_api_key")

    async def _json(self, request: Request) -> Any:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            raise _too_large(self.max_body_bytes)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body_bytes:
                raise _too_large(self.max_body_bytes)
        try:
            return json.loads(body.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise api.bad(f"the request body is not UTF-8 ({e})") from None
        except json.JSONDecodeError as e:
            raise api.bad(f"the request body is not valid JSON ({e})") from None
        except RecursionError:
            raise api.bad("the request body nests too deeply") from None

    def _tokens(self, req: api.GenerationRequest, prompt) -> tuple[list[int], str | None]:
        """A prompt's token ids, and its chat template's text (None for a completion). Runs
        in a worker thread: a long prompt does not stall the others."""
        if isinstance(prompt, list) and not req.chat:
            bad = next((t for t in prompt if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise api.bad(f"token id {bad} is outside the vocabulary "
                              f"(0..{self.vocab_size - 1})", "prompt")
            return prompt, None
        tokens, text = self._encode(prompt, req.chat, tools=req.tools and list(req.tools.tools),
                                    template_kwargs=req.template_kwargs)
        if not tokens:
            raise api.bad("the prompt is empty (0 tokens)", "prompt")
        return tokens, text

    def _encode(self, prompt, chat: bool, special: bool = True,
                tools: list[dict] | None = None, template_kwargs: dict | None = None
                ) -> tuple[list[int], str | None]:
        """Text (with the tokenizer's special tokens, unless `special` is false) or chat
        messages, tools and template variables (through the model's chat template, as
        `llmc run --chat` applies it) to token ids, and the chat template's text; a text
        the tokenizer refuses, or chat without a template, is a 400."""
        try:
            if chat:
                text = self.runner.render(prompt, tools, **(template_kwargs or {}))
                return self.runner.tokenizer.encode(text, add_special_tokens=False).ids, text
            return self.runner.tokenizer.encode(prompt, add_special_tokens=special).ids, None
        except LlmcError as e:
            raise api.bad(str(e), "messages" if chat else "prompt") from None
        except Exception as e:   # the tokenizer refused the text
            raise api.bad(f"the prompt cannot be tokenized ({e})", "prompt") from None

    async def _outputs(self, c: _Choice, rec: _Record):
        """The engine's outputs for one choice; an error before any token is the request's
        own fault (a 400), and an engine that stopped is a 503."""
        try:
            async for out in self.engine.generate(c.tokens, c.params):
                rec.add(c, out)
                if out.finish_reason == "error":
                    raise self._engine_error(out.error)
                yield out
        except LlmcError as e:   # the loop refused the submission: the engine stopped
            raise ApiError(503, str(e), "service_unavailable") from None

    def _engine_error(self, error: str | None) -> ApiError:
        if self.runner.loop.error is not None:
            return ApiError(500, f"the engine failed: {error}", "internal_error")
        return api.bad(error or "the request failed")

    async def _collect(self, c: _Choice, rec: _Record) -> list:
        return [out async for out in self._outputs(c, rec)]

    async def _stream(self, req, choices: list[_Choice], rec: _Record
                      ) -> AsyncIterator[str]:
        """Each choice's chunks as its request advances, the choices interleaved."""
        created, model = int(time.time()), self.model_name
        extra = {"usage": None} if req.include_usage else {}
        code = 200
        offsets, echoed = [0] * len(choices), set()
        events: asyncio.Queue = asyncio.Queue()

        async def pump(c: _Choice) -> None:
            try:
                async for out in self._outputs(c, rec):
                    events.put_nowait((c, out))
            except ApiError as e:
                events.put_nowait((c, e))
        pumps = [asyncio.ensure_future(pump(c)) for c in choices]
        try:
            if req.chat:
                for c in choices:
                    yield _sse({**api.chat_chunk(rec.id, model, created,
                                                 {"role": "assistant", "content": ""},
                                                 index=c.index), **extra})
            left = len(choices)
            while left:
                c, out = await events.get()
                if isinstance(out, ApiError):
                    raise out
                left -= out.finished
                if req.echo and c.index not in echoed:   # the prompt first, with its scores
                    echoed.add(c.index)
                    text = self._prompt_text(c)
                    lp = (self._logprobs(req, self._prompt_entries([out], c.tokens), c.tokens)
                          if req.logprobs is not None else None)
                    offsets[c.index] = len(text)
                    yield _sse({**api.completion_chunk(rec.id, model, created, text, None, lp,
                                                       c.index), **extra})
                lp = None
                ids = out.token_ids + self._stop(req, out)
                if req.logprobs is not None and ids:
                    lp = self._logprobs(req, out.logprobs or [], ids, offsets[c.index])
                offsets[c.index] += len(out.text)
                reason = out.finish_reason if out.finished else None
                if req.chat:
                    delta, reason = c.reply.chunk(out.text, out.finished, reason)
                    chunk = api.chat_chunk(rec.id, model, created, delta, reason, lp, c.index)
                else:
                    chunk = api.completion_chunk(rec.id, model, created, out.text, reason, lp,
                                                 c.index)
                yield _sse({**chunk, **extra})
            if req.include_usage:
                yield _sse(api.usage_chunk(rec.id, model, created, req.chat,
                                           api.usage(rec.prompt_tokens, rec.completion_tokens,
                                                     rec.cached_tokens)))
            yield "data: [DONE]\n\n"
        except ApiError as e:   # mid-stream: the status is sent already, so an error event
            code = e.status
            rec.error = e.message
            yield _sse(e.body())
        finally:   # also when the client left (the stream was cancelled, the requests aborted)
            for t in pumps:
                t.cancel()
            rec.close(code if rec.finished or code != 200 else 499)

    @staticmethod
    def _stop(req, out) -> list[int]:
        """The stop token that ended a completion, for its logprobs: one entry a sampled
        token, as vLLM gives them and lm-evaluation-harness counts on (its text is not in the
        completion's). Chat's logprobs keep to the message's tokens."""
        return [out.stop_token_id] if out.stop_token_id is not None and not req.chat else []

    def _prompt_text(self, c: _Choice) -> str:
        """What echo returns: the prompt as given, or its token ids' text."""
        if isinstance(c.prompt, str):
            return c.prompt
        return self.runner.tokenizer.decode(c.tokens, skip_special_tokens=False)

    @staticmethod
    def _prompt_entries(outputs, tokens: list[int]) -> list:
        """The prompt tokens' logprob entries, from the output that carried them (None
        each when not asked)."""
        scores = next((o.prompt_logprobs for o in outputs if o.prompt_logprobs), None)
        return list(scores) if scores else [None] * len(tokens)

    def _logprobs(self, req, entries, ids, offset: int = 0) -> dict:
        if req.chat:
            return api.chat_logprobs(entries, self._token_text, ids)
        return api.completion_logprobs(entries, self._token_text, ids, offset)

    def _token_text(self, token_id: int) -> str:
        return self.runner.tokenizer.decode([token_id], skip_special_tokens=False)

    # --- running it ---------------------------------------------------------------------------

    def run(self, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
            on_ready=None) -> None:
        """Serve until SIGTERM or SIGINT; then drain (new requests get 503, those in flight
        finish) and return. on_ready(url) is called once the socket listens."""
        sock = bind(host, port)
        server = _Uvicorn(self, uvicorn.Config(self, log_level=log_level, access_log=False,
                                               lifespan="off"))
        self._start_warm()
        try:
            if on_ready:
                on_ready(url_of(sock))
            server.run(sockets=[sock])
        finally:
            self._warm.join()

    def _start_warm(self) -> None:
        if self._warm.ident is None:   # a thread starts once: a server run again skips it
            self._warm.start()

    @contextlib.contextmanager
    def running(self, host: str = "127.0.0.1", port: int = 0):
        """Serve from a background thread; yields the base URL (http://host:port). Leaving
        the block stops the server (the runner stays open)."""
        sock = bind(host, port)
        server = _Uvicorn(self, uvicorn.Config(self, log_config=None, access_log=False,
                                               lifespan="off"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]},
                                  name="llmc-serve", daemon=True)
        self._start_warm()
        thread.start()
        while not server.started and thread.is_alive():
            time.sleep(0.01)
        try:
            yield url_of(sock)
        finally:
            server.should_exit = True
            thread.join()
            self._warm.join()


class _Uvicorn(uvicorn.Server):
    """uvicorn, with SIGTERM and SIGINT draining instead of stopping: new requests get 503
    while those in flight finish, then it stops (and the process exits 0: the signal is not
    re-raised). A second signal stops it at once."""

    def __init__(self, app: OpenAIServer, config: uvicorn.Config):
        super().__init__(config)
        self.llmc = app

    def handle_exit(self, sig, frame) -> None:
        if self.llmc.draining:
            self.should_exit = self.force_exit = True
            return
        self.llmc.draining = True
        log.info("draining: %d request(s) in flight; new ones get 503", self.llmc.active)

    async def on_tick(self, counter: int) -> bool:
        if self.llmc.draining and self.llmc.active == 0:
            self.should_exit = True
        return await super().on_tick(counter)


class _Record:
    """One generation request's id, counts and times; at the end, its metrics and its one
    log line."""

    def __init__(self, server: OpenAIServer, endpoint: str, prefix: str):
        self.server, self.endpoint = server, endpoint
        self.id = f"{prefix}-{uuid.uuid4().hex[:24]}"
        self.t0 = time.monotonic()
        self.first = self.last = None
        self.prompt_tokens = 0   # each prompt once, however many samples it has
        self.choices = 1
        self._done = 0
        # each choice's completion tokens, and its prompt's tokens the prefix cache served
        # (a prompt's first sample's: its later ones would count the same prompt again)
        self._completion: dict[int, int] = {}
        self._cached: dict[int, int] = {}
        self.finish_reason: str | None = None
        self.submitted = False
        self.error: str | None = None
        self.closed = False

    @property
    def completion_tokens(self) -> int:
        return sum(self._completion.values())

    @property
    def cached_tokens(self) -> int:
        return sum(self._cached.values())

    @property
    def finished(self) -> bool:
        return self._done == self.choices

    def add(self, c: _Choice, out) -> None:
        now = time.monotonic()
        self.submitted = True
        if out.token_ids and self.first is None:
            self.first = now
        self._completion[c.index] = out.completion_tokens
        if c.j == 0:
            self._cached[c.index] = out.cached_tokens
        if out.finished:
            self._done += 1
            self.finish_reason, self.last = out.finish_reason, now
            self.error = out.error

    def close(self, code: int, error: str | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        end = time.monotonic()
        e2e = end - self.t0
        ttft = self.first - self.t0 if self.first is not None else None
        n = self.completion_tokens
        tpot = ((self.last or end) - self.first) / (n - 1) if self.first and n > 1 else None
        m = self.server.metrics
        m.http.labels(self.endpoint, str(code)).inc()
        reason = self.finish_reason or ("abort" if code == 499 else "error")
        if self.submitted or code == 499:
            m.observe(reason, self.prompt_tokens, n, ttft, tpot, e2e)
        error = error or self.error
        log.info("%s %s %d %s prompt=%d completion=%d cached=%d ttft=%s duration=%.3fs%s",
                 self.id, self.endpoint, code, reason if code < 400 or code == 499 else "-",
                 self.prompt_tokens, n, self.cached_tokens,
                 f"{ttft:.3f}s" if ttft is not None else "-", e2e,
                 f" error={error!r}" if error else "")


@dataclass(frozen=True)
class _Choice:
    """One choice of a request: its prompt's j-th sample, an engine request of its own."""

    index: int          # in the response: prompt-major, as OpenAI numbers them
    j: int              # which of its prompt's n samples
    prompt: Any         # as the client gave it (text, token ids, chat messages)
    tokens: list[int]
    params: Any         # SamplingParams
    reply: Any = None   # chat: its api.ChatReply (reasoning and tool calls, as they come)


async def _all(works):
    """Await several coroutines; when one fails, cancel the rest (aborting their engine
    requests) and raise its error."""
    tasks = [asyncio.ensure_future(w) for w in works]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()


async def _unless_disconnected(request: Request, work):
    """Await `work` unless the client disconnects first: then cancel it (which aborts its
    engine request and frees its blocks) and return None."""
    async def gone():
        while (await request.receive())["type"] != "http.disconnect":
            pass
    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(gone())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (task, watch):
            if not t.done():
                t.cancel()
    if task.cancelled() or not task.done():
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return None
    return task.result()


def _sse(obj: dict, event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _error(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), e.status)


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is larger than {limit} bytes",
                    code="request_too_large")


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0: any free one), bound before uvicorn starts so that
    the caller knows the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise LlmcError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(2048)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
