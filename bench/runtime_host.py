"""Host time of the in-flight-batching engine a step: scheduler, KV manager, input packing,
token bookkeeping and detokenizing, i.e. everything but the session's own work.

    python3 bench/runtime_host.py [--batch 256] [--context 512] [--steps 50] [--null-session]

A tiny random Llama (hidden 64) runs on the reference backend, so the session's time is
small but real; it is timed separately and subtracted. Every step decodes one token for each
of `batch` running requests whose prompts were `context` tokens. Also: time to first token
of a prompt with and without a 1k-token prefix the cache already holds.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path


def _tiny_model(folder: Path) -> Path:
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      vocab_size=512, max_position_embeddings=4096)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(512)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    return folder


def timed(fn, clock: list[float]):
    """fn, adding the wall seconds each call takes to clock[0] and this thread's CPU seconds
    to clock[1] (what other processes on a shared machine do not inflate)."""
    def wrapper(*args, **kwargs):
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            clock[0] += time.perf_counter() - t0
            clock[1] += time.thread_time() - c0
    return wrapper


class Timed:
    """The session, with the time spent inside it counted."""

    def __init__(self, session):
        self.session, self.seconds = session, 0.0

    def allocate_kv(self, n):
        self.session.allocate_kv(n)

    def step(self, inputs):
        t0 = time.perf_counter()
        try:
            return self.session.step(inputs)
        finally:
            self.seconds += time.perf_counter() - t0


class NullSession:
    """A session that computes nothing: random logits, so the host code runs with the caches
    it leaves warm (the real session and the sampler between two host steps leave them
    cold). It shows how much of the host time is cache misses."""

    def __init__(self, vocab_size: int):
        import numpy as np

        self.vocab_size, self.rng, self.seconds = vocab_size, np.random.default_rng(0), 0.0

    def allocate_kv(self, n):
        pass

    def step(self, inputs):
        import numpy as np

        rows = len(inputs["context_lens"])
        return self.rng.standard_normal((rows, self.vocab_size)).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--null-session", action="store_true",
                    help="time the host code next to a session that computes nothing")
    args = ap.parse_args()

    from llmc.build import BuildOptions, build
    from llmc.engine_file import EngineFile
    from llmc.limits import BuildLimits
    from llmc.runtime.engine import LLMEngine
    from llmc.runtime.runner import open_session
    from llmc.runtime.sampler import SamplingParams

    root = Path(tempfile.mkdtemp())
    limits = BuildLimits(max_batch_size=args.batch, max_num_tokens=max(args.batch, 2048),
                         max_seq_len=args.context + args.steps + 1100, kv_block_size=16)
    build(BuildOptions(_tiny_model(root / "m"), root / "m.engine", backend="reference",
                       dtype="fp32", limits=limits), log=lambda _: None)
    file = EngineFile(root / "m.engine")
    # onnxruntime on one thread: its pool's worker threads spin for a while after each run,
    # and on a 2-core machine they would take the core the host code runs on.
    session = (NullSession(file.header.io.vocab_size) if args.null_session
               else Timed(open_session(file, threads=1)))
    engine = LLMEngine(session, file.header)
    # Enough tokens that none finishes before the timed steps end: the first prompts decode
    # while the others prefill (a budget of max_num_tokens a step), so their count of
    # generated tokens runs ahead of the timed steps by the prefill's length.
    params = SamplingParams(max_tokens=limits.max_seq_len - args.context - 1, ignore_eos=True)
    for i in range(args.batch):
        engine.add_request([(7 * i + k) % 500 + 1 for k in range(args.context)], params)
    while any(r.num_computed_tokens < len(r.prompt_token_ids)
              for r in engine.requests.values()):
        engine.step()                                   # the prompts
    # The target covers the scheduler, the KV manager and the input build: the
    # scheduler's plan (with the KV manager's allocation), the input build, and the
    # scheduler's commit of the sampled tokens after the session step (its persistent
    # batch). The rest of the host step is sampling, token bookkeeping and detokenizing.
    core = [0.0, 0.0]
    engine.scheduler.schedule = timed(engine.scheduler.schedule, core)
    engine._inputs = timed(engine._inputs, core)
    engine.scheduler.commit = timed(engine.scheduler.commit, core)
    host, cores, cpu = [], [], []
    for _ in range(args.steps):
        if len(engine.scheduler.running) != args.batch:
            raise SystemExit(f"{len(engine.scheduler.running)} requests running, not "
                             f"{args.batch}: the figures would be for a smaller batch")
        session.seconds, core[:] = 0.0, [0.0, 0.0]
        t0 = time.perf_counter()
        engine.step()
        host.append(time.perf_counter() - t0 - session.seconds)
        cores.append(core[0])
        cpu.append(core[1])
    print(f"# llmc engine host time a step ({platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, Python {platform.python_version()})")
    print(f"decode step of {args.batch} requests at context {args.context}, over "
          f"{args.steps} steps:")
    print(f"  scheduler + KV manager + input build (schedule, _inputs, commit): "
          f"{statistics.median(cores) * 1e6:.0f} us "
          f"median, {min(cores) * 1e6:.0f} us min wall; {statistics.median(cpu) * 1e6:.0f} us "
          f"median, {min(cpu) * 1e6:.0f} us min CPU (target <= 200 us)")
    print(f"  whole host step (+ sampling, bookkeeping, detokenizing): "
          f"{statistics.median(host) * 1e6:.0f} us median, {min(host) * 1e6:.0f} us min")
    if args.null_session:
        return
    for r in list(engine.requests):
        engine.abort(r)
    while engine.has_unfinished():
        engine.step()

    prefix = [(3 * k) % 500 + 1 for k in range(1024)]
    short = SamplingParams(max_tokens=1)
    for label, warm in (("without a cached prefix", False), ("with a cached 1k prefix", True)):
        engine = LLMEngine(Timed(open_session(file)), file.header, num_kv_blocks=80,
                           enable_prefix_caching=warm)
        if warm:
            engine.add_request(prefix + [9], short)
            while engine.has_unfinished():
                engine.step()
        t0 = time.perf_counter()
        engine.add_request(prefix + [11, 12, 13], short)
        while engine.has_unfinished():
            engine.step()
        print(f"time to first token, 1027-token prompt {label}: "
              f"{(time.perf_counter() - t0) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
