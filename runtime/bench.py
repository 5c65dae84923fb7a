"""`llmc bench`: throughput and latency of an engine in this process, or of a server.

    requests = synthetic(64, input_len=128, output_len=128, vocab_size=..., seed=0)
    result = run_offline(runner, requests, request_rate=math.inf)       # the engine loop
    result = asyncio.run(run_online(url, model, requests, ...))        # the OpenAI API
    print(format_table(result.summary()))

Requests are token ids (synthetic: random ids, lengths uniform within +-range_ratio of the
given ones, like `vllm bench`'s random dataset) or a jsonl file of prompts. Each asks for
exactly its output length (ignore_eos), so the tokens counted must equal the tokens
requested: the summary reports both, a consistency check on every run. Requests start all
at once or at a Poisson rate. TTFT runs from a request's (scheduled) start to its first
token, TPOT is the mean gap between its later tokens, as vLLM and trtllm-bench define them.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from llmc.errors import LlmcError
from llmc.runtime.sampling_params import SamplingParams


@dataclass(frozen=True)
class BenchRequest:
    prompt: list[int] | str          # token ids, or text (a jsonl prompt)
    output_len: int


@dataclass
class Timing:
    """One request as the client saw it (monotonic seconds)."""

    requested: int
    start: float = 0.0
    first: float | None = None
    end: float | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first is None else self.first - self.start

    @property
    def tpot(self) -> float | None:
        if self.first is None or self.end is None or self.output_tokens < 2:
            return None
        return (self.end - self.first) / (self.output_tokens - 1)


@dataclass
class BenchResult:
    timings: list[Timing]
    duration: float
    meta: dict = field(default_factory=dict)

    def summary(self) -> dict:
        ok = [t for t in self.timings if t.error is None]
        out = sum(t.output_tokens for t in ok)
        prompt = sum(t.prompt_tokens for t in ok)
        d = self.duration or float("nan")
        return {
            **self.meta,
            "requests": len(self.timings), "failed": len(self.timings) - len(ok),
            "first_error": next((t.error for t in self.timings if t.error), None),
            "duration_s": self.duration,
            "prompt_tokens": prompt, "output_tokens": out,
            "requested_output_tokens": sum(t.requested for t in ok),
            "requests_per_s": len(ok) / d, "output_tokens_per_s": out / d,
            "total_tokens_per_s": (out + prompt) / d,
            "ttft_ms": _percentiles([t.ttft for t in ok]),
            "tpot_ms": _percentiles([t.tpot for t in ok]),
            "e2e_ms": _percentiles([t.end - t.start for t in ok if t.end is not None]),
        }


def _percentiles(values) -> dict:
    v = np.array([x for x in values if x is not None], dtype=np.float64) * 1e3
    if not len(v):
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    return {"mean": float(v.mean()), **{f"p{q}": float(np.percentile(v, q))
                                        for q in (50, 90, 99)}}


# --- datasets ---------------------------------------------------------------------------------

def synthetic(num_requests: int, input_len: int, output_len: int, vocab_size: int,
              range_ratio: float = 0.0, seed: int = 0) -> list[BenchRequest]:
    """Random token ids; each length uniform in [len * (1 - r), len * (1 + r)]."""
    if num_requests < 1 or input_len < 1 or output_len < 1:
        raise LlmcError("--num-requests, --input-len and --output-len must be at least 1")
    if not 0 <= range_ratio < 1:
        raise LlmcError(f"--range-ratio must be in [0, 1), got {range_ratio}")
    rng = np.random.default_rng(seed)

    def lengths(n):
        lo, hi = max(1, int(n * (1 - range_ratio))), int(n * (1 + range_ratio))
        return rng.integers(lo, hi + 1, num_requests)
    ins, outs = lengths(input_len), lengths(output_len)
    return [BenchRequest(rng.integers(0, vocab_size, int(i)).tolist(), int(o))
            for i, o in zip(ins, outs)]


def from_jsonl(path: Path, output_len: int, num_requests: int | None = None
               ) -> list[BenchRequest]:
    """One JSON object a line: "prompt" (text or token ids) and optionally "output_len"
    (default: output_len)."""
    out = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompt, length = row["prompt"], int(row.get("output_len", output_len))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise LlmcError(f"{path} line {n}: expected a JSON object with a \"prompt\" (and "
                            "optionally an integer \"output_len\")") from None
        out.append(BenchRequest(prompt, length))
    if not out:
        raise LlmcError(f"{path} holds no request")
    return out[:num_requests] if num_requests else out


def arrival_offsets(n: int, request_rate: float, seed: int = 0) -> list[float]:
    """When each request starts, in seconds from the first: all at once (rate inf), else a
    Poisson process (exponential gaps of mean 1/rate)."""
    if math.isinf(request_rate):
        return [0.0] * n
    if request_rate <= 0:
        raise LlmcError(f"--request-rate must be > 0 (or inf), got {request_rate}")
    gaps = np.random.default_rng(seed).exponential(1 / request_rate, n)
    gaps[0] = 0.0
    return np.cumsum(gaps).tolist()


# --- offline: the engine in this process ------------------------------------------------------

def run_offline(runner, requests: list[BenchRequest], request_rate: float = math.inf,
                seed: int = 0, on_done: Callable[[], None] | None = None) -> BenchResult:
    """Submit every request to the runner's engine loop (at their arrival times) and time
    their outputs as the loop delivers them."""
    timings = [Timing(r.output_len) for r in requests]
    left = len(requests)
    done = threading.Event()
    lock = threading.Lock()

    def callback(i):
        def on_output(out):   # runs on the engine loop's thread
            nonlocal left
            t, now = timings[i], time.monotonic()
            if out.token_ids and t.first is None:
                t.first = now
            t.output_tokens += len(out.token_ids)
            t.prompt_tokens = out.prompt_tokens
            if out.finished:
                t.end, t.error = now, out.error
                with lock:
                    left -= 1
                    if left == 0:
                        done.set()
                if on_done:
                    on_done()
        return on_output

    prompts = [runner.encode(r.prompt) if isinstance(r.prompt, str) else r.prompt
               for r in requests]
    limit = runner.limits.max_seq_len
    for i, (prompt, r) in enumerate(zip(prompts, requests)):
        if len(prompt) + r.output_len > limit:   # it would stop short: counts would differ
            raise LlmcError(f"request {i}: {len(prompt)} prompt and {r.output_len} output "
                            f"tokens exceed the engine's max_seq_len ({limit}); shorten them")
    offsets = arrival_offsets(len(requests), request_rate, seed)
    # The engine counts them before it hands out the step's outputs, so they are whole
    # when the last request's callback runs.
    spec_before = list(runner.engine.spec_counts)
    t0 = time.monotonic()
    for i, (prompt, r, offset) in enumerate(zip(prompts, requests, offsets)):
        if (wait := t0 + offset - time.monotonic()) > 0:
            time.sleep(wait)
        timings[i].start = time.monotonic()
        params = SamplingParams(max_tokens=r.output_len, ignore_eos=True)
        runner.loop.submit(prompt, params, callback(i))
    done.wait()
    duration = time.monotonic() - t0
    meta = {"mode": "offline"}
    drafts, guessed, kept = (a - b for a, b in zip(runner.engine.spec_counts, spec_before))
    if drafts:
        meta["spec_decode"] = {"drafts": drafts, "draft_tokens": guessed,
                               "accepted_tokens": kept, "acceptance_rate": kept / guessed,
                               "tokens_per_draft": 1 + kept / drafts}
    return BenchResult(timings, duration, meta)


# --- online: a server, through the OpenAI API -------------------------------------------------

async def run_online(url: str, model: str, requests: list[BenchRequest],
                     request_rate: float = math.inf, concurrency: int | None = None,
                     api_key: str | None = None, seed: int = 0,
                     on_done: Callable[[], None] | None = None) -> BenchResult:
    """Stream every request from /v1/completions (at their arrival times, at most
    `concurrency` at once); tokens are the server's usage counts."""
    import openai

    timings = [Timing(r.output_len) for r in requests]
    limit = asyncio.Semaphore(concurrency or len(requests))
    async with openai.AsyncOpenAI(base_url=url.rstrip("/") + "/v1", api_key=api_key or "none",
                                  max_retries=0, timeout=3600) as client:
        async def one(i, r, offset):
            await asyncio.sleep(offset)
            t = timings[i]
            async with limit:
                t.start = time.monotonic()
                try:
                    stream = await client.completions.create(
                        model=model, prompt=r.prompt, max_tokens=r.output_len, temperature=0,
                        stream=True, stream_options={"include_usage": True},
                        extra_body={"ignore_eos": True})
                    async for chunk in stream:
                        if chunk.choices and t.first is None:
                            t.first = time.monotonic()
                        if chunk.usage:
                            t.prompt_tokens = chunk.usage.prompt_tokens
                            t.output_tokens = chunk.usage.completion_tokens
                    t.end = time.monotonic()
                except openai.OpenAIError as e:
                    t.error = str(e)
            if on_done:
                on_done()

        offsets = arrival_offsets(len(requests), request_rate, seed)
        t0 = time.monotonic()
        await asyncio.gather(*(one(i, r, o) for i, (r, o) in enumerate(zip(requests, offsets))))
    return BenchResult(timings, time.monotonic() - t0, {"mode": "online", "url": url,
                                                         "model": model})


def server_model(url: str, model: str | None, api_key: str | None) -> tuple[str, int]:
    """The model to ask for (given, or the server's first) and the vocabulary size to draw
    synthetic token ids from: what an llmc server's /v1/models says, else 100 (ids that any
    real vocabulary holds)."""
    import openai

    client = openai.OpenAI(base_url=url.rstrip("/") + "/v1", api_key=api_key or "none",
                           max_retries=0)
    try:
        models = client.models.list().data
    except openai.OpenAIError as e:
        raise LlmcError(f"cannot list the models of {url}: {e}") from None
    card = next((m for m in models if model in (None, m.id)), None)
    if card is None:
        raise LlmcError(f"{url} serves no model {model!r} (it has: "
                        f"{', '.join(m.id for m in models)})")
    return card.id, int((card.model_extra or {}).get("vocab_size") or 100)


# --- the report -------------------------------------------------------------------------------

def format_table(s: dict) -> str:
    def ms(d, k):
        return "-" if d[k] is None else f"{d[k]:.1f}"
    rows = [
        ("requests", f"{s['requests'] - s['failed']} ok, {s['failed']} failed"),
        ("duration", f"{s['duration_s']:.2f} s"),
        ("tokens", f"{s['prompt_tokens']} prompt, {s['output_tokens']} output (requested "
                   f"{s['requested_output_tokens']})"),
        ("throughput", f"{s['requests_per_s']:.2f} req/s, {s['output_tokens_per_s']:.1f} "
                       f"output tok/s, {s['total_tokens_per_s']:.1f} total tok/s"),
    ]
    lines = [f"{k:>12}: {v}" for k, v in rows]
    lines.append(f"{'':>12}  {'mean':>9} {'p50':>9} {'p90':>9} {'p99':>9}")
    for name, key in (("TTFT (ms)", "ttft_ms"), ("TPOT (ms)", "tpot_ms"), ("E2E (ms)", "e2e_ms")):
        d = s[key]
        lines.append(f"{name:>12}: " + " ".join(f"{ms(d, q):>9}"
                                               for q in ("mean", "p50", "p90", "p99")))
    if s.get("spec_decode"):
        d = s["spec_decode"]
        lines.append(f"{'speculation':>12}: {d['accepted_tokens']} of {d['draft_tokens']} "
                     f"guesses kept ({d['acceptance_rate']:.1%}), "
                     f"{d['tokens_per_draft']:.2f} tokens a step that guessed")
    if s["first_error"]:
        lines.append(f"{'first error':>12}: {s['first_error']}")
    return "\n".join(lines)
