"""`Runner`: load an engine and generate text.

    from llmc import Runner
    Runner("smollm2.engine").generate(["The capital of France is"])

A Runner is a thin client of the engine (runtime/engine.py) driven by one background thread
(runtime/engine_loop.py): its methods are safe to call from many threads at once, and
requests from all of them share steps.
"""

from __future__ import annotations

import json
import os
import queue
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator

from llmc import backends
from llmc.backends import Session
from llmc.engine_file import EngineFile
from llmc.errors import LlmcError
from llmc.runtime.engine import LLMEngine
from llmc.runtime.engine_loop import EngineLoop
from llmc.runtime.request import RequestOutput
from llmc.runtime.sampler import SamplingParams
from llmc.runtime.speculative import SpeculativeConfig


def open_session(engine: EngineFile, backend: str = "auto",
                 log: Callable[[str], None] | None = None, **options) -> Session:
    """The session that runs this engine: its own backend, if this machine can run it.
    options go to the backend's session (cuda: gpu_memory_utilization, max_kv_blocks)."""
    built = engine.header.backend
    if backend not in ("auto", built):
        raise LlmcError(f"{engine.path} was built for the {built} backend and cannot run on "
                        f"{backend}; rebuild it with `llmc build --backend {backend}`")
    session = backends.get(built).open(engine, log, **options)
    if log:
        log(f"backend: {built}")
    return session


class Runner:
    def __init__(self, engine_path: str | os.PathLike, backend: str = "auto",
                 log: Callable[[str], None] | None = None,
                 speculative: SpeculativeConfig | str | None = None, **session_options):
        """speculative: speculative decoding by prompt lookup, a SpeculativeConfig or vLLM's
        --speculative-config text ('{"method": "ngram", "num_speculative_tokens": 4}').
        session_options: for GPU backends, e.g. gpu_memory_utilization=0.9 (cuda)."""
        if isinstance(speculative, str):
            speculative = SpeculativeConfig.parse(speculative)
        self.engine = EngineFile(engine_path)
        header = self.engine.header
        self.session = open_session(self.engine, backend, log, **session_options)
        self.limits = header.build.limits
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_str(header.tokenizer.json)
        self.chat_template = header.tokenizer.chat_template
        self.eos_ids = header.tokenizer.eos_token_ids
        self.engine = LLMEngine(self.session, header, tokenizer=self.tokenizer,
                                speculative=speculative)
        self.loop = EngineLoop(self.engine)   # one thread steps the engine for all callers

    def encode(self, prompt: str | list[dict], chat: bool = False,
               tools: list[dict] | None = None, **template_kwargs) -> list[int]:
        """Token ids of a prompt; with chat, of the chat template applied to one user
        message (a string) or to a list of {"role", "content"} messages (render)."""
        if not chat:
            return self.tokenizer.encode(prompt).ids
        text = self.render(prompt, tools, **template_kwargs)
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def render(self, prompt: str | list[dict], tools: list[dict] | None = None,
               **template_kwargs) -> str:
        """The chat template applied to one user message (a string) or to messages, the
        tools the model may call (OpenAI's function objects), if any, and template
        variables (chat_template_kwargs: Qwen3's enable_thinking, ...)."""
        if not self.chat_template:
            raise LlmcError("this model has no chat template; run without --chat")
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        bos = self.engine.header.tokenizer.bos_token_id
        return render_chat(self.chat_template, messages,
                           self._token_text(self.eos_ids[0]) if self.eos_ids else "",
                           self._token_text(bos) if bos is not None else "", tools,
                           **template_kwargs)

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.id_to_token(token_id) or ""

    def complete(self, prompts: list[str] | str, params: SamplingParams | None = None,
                 chat: bool = False,
                 on_output: Callable[[int, RequestOutput], None] | None = None
                 ) -> list[Completion]:
        """Run every prompt as its own request (they share steps with each other and with
        other threads' requests); returns one Completion each, in order. A request that
        fails (a bad prompt, a failing on_output) has finish_reason "error" and its error;
        the others are unaffected. on_output(index, delta) runs in this thread."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise LlmcError(f"prompts are a string or a list of strings, not "
                            f"{type(prompts).__name__}")
        inbox: queue.SimpleQueue = queue.SimpleQueue()
        results = [Completion() for _ in prompts]
        ids = {}
        for index, prompt in enumerate(prompts):
            try:
                tokens = (self.encode(prompt, chat)
                          if isinstance(prompt, str) or chat and isinstance(prompt, list)
                          and all(isinstance(m, dict) for m in prompt) else prompt)
            except LlmcError as e:
                results[index].fail(str(e))
                continue
            except Exception as e:   # the tokenizer refused it (text that is not Unicode)
                results[index].fail(f"the prompt cannot be tokenized ({e})")
                continue
            rid = self.loop.submit(tokens, params, lambda out, i=index: inbox.put((i, out)))
            ids[index] = rid
        pending = set(ids)
        while pending:
            index, out = inbox.get()
            result = results[index]
            result.add(out)
            if on_output is not None and index in pending and result.error is None:
                try:
                    on_output(index, out)
                except Exception as e:   # this request fails, the others go on
                    result.fail(f"the output callback raised {type(e).__name__}: {e}")
                    self.loop.abort(ids[index])
                    pending.discard(index)
            if out.finished:
                pending.discard(index)
        return results

    def stream(self, prompts: list[str] | str, params: SamplingParams | None = None,
               chat: bool = False) -> Iterator[tuple[int, RequestOutput]]:
        """(prompt index, delta) as each request advances, interleaved across requests;
        a request's last delta has finished=True (and its error, if it failed)."""
        deltas: queue.SimpleQueue = queue.SimpleQueue()
        done = object()

        def run():
            try:
                self.complete(prompts, params, chat, lambda i, out: deltas.put((i, out)))
            finally:
                deltas.put(done)
        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        while (item := deltas.get()) is not done:
            yield item
        worker.join()

    def generate(self, prompts: list[str] | str, max_new_tokens: int = 64,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int | None = None, chat: bool = False,
                 on_text: Callable[[int, str], None] | None = None) -> list[str]:
        """The completion text of each prompt (greedy unless temperature > 0). A request
        that failed raises its error once all have finished; `complete` keeps every
        result instead."""
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                max_tokens=max_new_tokens)
        on_output = None
        if on_text:
            def on_output(index: int, out: RequestOutput) -> None:
                if out.text:
                    on_text(index, out.text)
        results = self.complete(prompts, params, chat, on_output)
        failed = next((r for r in results if r.error), None)
        if failed is not None:
            raise LlmcError(failed.error)
        return [r.text for r in results]

    def close(self) -> None:
        self.loop.close()
        close = getattr(self.session, "close", None)
        if close:
            close()


@dataclass
class Completion:
    """One request's result: the text, its token ids, why it stopped, usage and timings."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    time_to_first_token: float | None = None
    logprobs: list = field(default_factory=list)
    prompt_logprobs: list | None = None   # with SamplingParams.prompt_logprobs

    def add(self, out: RequestOutput) -> None:
        if self.error:
            return
        self.text += out.text
        self.token_ids += out.token_ids
        self.logprobs += out.logprobs or []
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        self.prompt_tokens, self.cached_tokens = out.prompt_tokens, out.cached_tokens
        if out.time_to_first_token is not None:
            self.time_to_first_token = out.time_to_first_token
        if out.finished:
            self.finish_reason, self.error = out.finish_reason, out.error

    def fail(self, error: str) -> None:
        self.finish_reason, self.error = "error", error


def render_chat(template: str, messages: list[dict], eos_token: str = "", bos_token: str = "",
                tools: list[dict] | None = None, **template_kwargs) -> str:
    """Render an HF chat template as transformers' apply_chat_template does: sandboxed
    jinja2 with its globals and its tojson (JSON as json.dumps writes it, not jinja2's
    HTML-escaped form), the special tokens' text, `tools` when given (templates test
    `tools is not none`) and any other variables the template reads."""
    import datetime

    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise LlmcError(f"chat template error: {message}")

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda f: datetime.datetime.now().strftime(f)
    try:
        return env.from_string(template).render(**template_kwargs, messages=messages,
                                                tools=tools or None, add_generation_prompt=True,
                                                eos_token=eos_token, bos_token=bos_token)
    except TemplateError as e:   # a message the template cannot render (a role it lacks)
        raise LlmcError(f"chat template error: {e}") from None
