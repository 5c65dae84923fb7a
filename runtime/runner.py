"""`Runner`: load an engine and generate text.

    from llmc import Runner
    Runner("smollm2.engine").generate(["The capital of France is"])
"""

from __future__ import annotations

import os
from typing import Callable

from llmc import backends
from llmc.backends import Session
from llmc.engine_file import EngineFile
from llmc.errors import LlmcError
from llmc.runtime.generator import generate
from llmc.runtime.sampler import SamplingParams


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
                 log: Callable[[str], None] | None = None, **session_options):
        """session_options: for GPU backends, e.g. gpu_memory_utilization=0.9 (cuda)."""
        self.engine = EngineFile(engine_path)
        header = self.engine.header
        self.session = open_session(self.engine, backend, log, **session_options)
        self.limits = header.build.limits
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_str(header.tokenizer.json)
        self.chat_template = header.tokenizer.chat_template
        self.eos_ids = header.tokenizer.eos_token_ids

    def encode(self, prompt: str, chat: bool = False) -> list[int]:
        if not chat:
            return self.tokenizer.encode(prompt).ids
        if not self.chat_template:
            raise LlmcError("this model has no chat template; run without --chat")
        text = render_chat(self.chat_template, [{"role": "user", "content": prompt}],
                           self._token_text(self.eos_ids[0]) if self.eos_ids else "")
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.id_to_token(token_id) or ""

    def generate(self, prompts: list[str] | str, max_new_tokens: int = 64,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int | None = None, chat: bool = False,
                 on_text: Callable[[int, str], None] | None = None) -> list[str]:
        """Generate a completion for each prompt (greedy unless temperature > 0)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        ids = [self.encode(p, chat) for p in prompts]
        params = SamplingParams(temperature, top_k, top_p, seed=seed,
                                max_tokens=max(max_new_tokens, 1))
        on_token = None
        if on_text:
            # Decode the whole tail each time: a token alone can be half a UTF-8 character.
            sent = {i: "" for i in range(len(prompts))}
            tails: dict[int, list[int]] = {i: [] for i in range(len(prompts))}

            def on_token(index: int, token: int) -> None:
                if token in self.eos_ids:
                    return
                tails[index].append(token)
                text = self.tokenizer.decode(tails[index])
                if not text.endswith("\ufffd"):
                    on_text(index, text[len(sent[index]):])
                    sent[index] = text
        seqs = generate(self.session, self.limits, ids, max_new_tokens, params,
                        self.eos_ids, on_token)
        return [self.tokenizer.decode([t for t in s.generated if t not in self.eos_ids])
                for s in seqs]


def render_chat(template: str, messages: list[dict], eos_token: str = "") -> str:
    """Render an HF chat template as transformers does (sandboxed jinja2)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise LlmcError(f"chat template error: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=True,
                                            eos_token=eos_token, bos_token="")
