"""Reference backend (onnxruntime, CPU) on an engine: prefill and decode tokens/s, and a
decode step's time against the KV pool's size.

    python bench/reference_tokens.py ENGINE [--batch 1 8] [--prompt-len 128] [--new 32]
    python bench/reference_tokens.py ENGINE --pool-blocks 104 1024 4096 [--batch 8]
                                     [--threads 1]

Without --pool-blocks: one row per batch size, prefill tokens/s (all prompts in ragged steps
of the engine's token budget) and decode tokens/s (every sequence one token a step), from one
timed run after a warm-up. With it: for each pool size, the median time of a decode step of
the first --batch size, as the session runs it (only the blocks a step names go through the
graph) and, for comparison, the same graph fed the whole pool (what the session did before
issue #8's item 5, when every step's ScatterND copied the pool); wall time and the process's
CPU time (with --threads 1 the CPU time is the step's cost, whatever else the machine runs).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np

from llmc import contract
from llmc.engine_file import EngineFile
from llmc.runtime.kv_cache import blocks_needed
from llmc.runtime.runner import open_session


class Batch:
    """`batch` sequences of random prompts, each owning a run of blocks, stepped directly
    on the session (no sampling: the bench times the session, not the engine)."""

    def __init__(self, session, limits, batch: int, prompt_len: int, new: int,
                 first_block: int = 0):
        rng = np.random.default_rng(0)
        self.session, self.limits, self.rng = session, limits, rng
        per_seq = blocks_needed(prompt_len + new, limits.kv_block_size)
        self.tokens = [rng.integers(100, 10000, prompt_len).tolist() for _ in range(batch)]
        self.blocks = [list(range(first_block + i * per_seq, first_block + (i + 1) * per_seq))
                       for i in range(batch)]
        self.computed = [0] * batch

    @staticmethod
    def pool_blocks(limits, batch: int, prompt_len: int, new: int) -> int:
        return batch * blocks_needed(prompt_len + new, limits.kv_block_size)

    def prefill(self) -> None:
        """All prompts, in steps of at most max_num_tokens tokens and max_batch_size rows."""
        while any(c < len(t) for c, t in zip(self.computed, self.tokens)):
            budget, chunks, rows = self.limits.max_num_tokens, [], []
            for i, (c, t) in enumerate(zip(self.computed, self.tokens)):
                n = min(len(t) - c, budget)
                if n == 0 or len(rows) == self.limits.max_batch_size:
                    continue
                chunks.append(contract.Chunk(t[c:c + n], c, self.blocks[i]))
                rows.append((i, n))
                budget -= n
            self.session.step(contract.pack_step(chunks, self.limits.kv_block_size))
            for i, n in rows:
                self.computed[i] += n

    def decode_inputs(self) -> dict[str, np.ndarray]:
        """The next decode step's inputs: one random token more for every sequence."""
        for i, t in enumerate(self.tokens):
            t.append(int(self.rng.integers(100, 10000)))
            self.computed[i] = len(t)
        return contract.pack_step([contract.Chunk(t[-1:], len(t) - 1, b)
                                   for t, b in zip(self.tokens, self.blocks)],
                                  self.limits.kv_block_size)


def rates(session, limits, batch: int, prompt_len: int, new: int) -> tuple[float, float]:
    session.allocate_kv(Batch.pool_blocks(limits, batch, prompt_len, new))
    b = Batch(session, limits, batch, prompt_len, new)
    t0 = time.perf_counter()
    b.prefill()
    t1 = time.perf_counter()
    for _ in range(new):
        session.step(b.decode_inputs())
    t2 = time.perf_counter()
    return batch * prompt_len / (t1 - t0), batch * new / (t2 - t1)


def whole_pool_step(session, inputs):
    """The engine's graph run on the whole pool, the pools replaced by its outputs: the
    reference session's step before item 5 (reaches into the session on purpose)."""
    names = [contract.LOGITS] + [contract.kv_cache_output(i) for i in range(len(session.kv))]
    feeds = {**inputs, **{contract.kv_cache_input(i): kv for i, kv in enumerate(session.kv)}}
    logits, *session.kv = session._sess.run(names, feeds)
    return logits


def step_times(session, limits, pool: int, batch: int, prompt_len: int, steps: int):
    """Median decode step time (s) over `pool` blocks: the session's step, and the graph
    on the whole pool. The sequences' blocks sit at the end of the pool."""
    need = Batch.pool_blocks(limits, batch, prompt_len, 2 * steps)
    if pool < need:
        raise SystemExit(f"--pool-blocks {pool}: the batch needs {need} blocks")
    session.allocate_kv(pool)
    b = Batch(session, limits, batch, prompt_len, 2 * steps, first_block=pool - need)
    b.prefill()
    out = []
    # One after the other, not alternating: a whole-pool step writes the whole pool anew,
    # which would leave the caches cold for the step after it. Wall time and this process's
    # CPU time (all its threads; what other processes on a shared machine do not inflate).
    for step in (session.step, lambda inputs: whole_pool_step(session, inputs)):
        wall, cpu = [], []
        for _ in range(steps):
            inputs = b.decode_inputs()
            t0, c0 = time.perf_counter(), time.process_time()
            step(inputs)
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        out += [statistics.median(wall), statistics.median(cpu)]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("engine")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--pool-blocks", type=int, nargs="+", default=[],
                    help="time a decode step of the first --batch at these pool sizes")
    ap.add_argument("--threads", type=int, default=0,
                    help="onnxruntime's intra-op threads (default: its own choice)")
    a = ap.parse_args()
    engine = EngineFile(a.engine)
    limits = engine.header.build.limits
    session = open_session(engine, **({"threads": a.threads} if a.threads else {}))
    print(f"# {a.engine}: {engine.header.build.compute_dtype}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"onnxruntime threads: {a.threads or 'default'}")
    rates(session, limits, 1, 16, 2)  # warm-up
    if a.pool_blocks:
        print(f"decode steps of batch {a.batch[0]}, context {a.prompt_len}+, median of "
              f"{a.new}")
        print("| pool blocks | session step: wall ms | CPU ms | graph on the whole pool: "
              "wall ms | CPU ms |")
        print("|---|---|---|---|---|")
        for pool in a.pool_blocks:
            times = step_times(session, limits, pool, a.batch[0], a.prompt_len, a.new)
            print(f"| {pool} | " + " | ".join(f"{t * 1e3:.1f}" for t in times) + " |")
        return
    print("| batch | prompt | new | prefill tok/s | decode tok/s |")
    print("|---|---|---|---|---|")
    for b in a.batch:
        pre, dec = rates(session, limits, b, a.prompt_len, a.new)
        print(f"| {b} | {a.prompt_len} | {a.new} | {pre:.0f} | {dec:.1f} |")


if __name__ == "__main__":
    main()
