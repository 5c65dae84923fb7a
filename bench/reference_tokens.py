"""Reference backend (onnxruntime, CPU) throughput on an engine: prefill and decode tokens/s.

    python bench/reference_tokens.py ENGINE [--batch 1 8] [--prompt-len 128] [--new 32]

Prints one row per batch size: prefill tokens/s (all prompts in ragged steps) and decode
tokens/s (every sequence one token per step), from one timed run after a warm-up.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

from llmc.engine_file import EngineFile
from llmc.runtime.generator import Sequence, schedule, step_inputs
from llmc.runtime.kv_cache import BlockPool, blocks_needed
from llmc.runtime.runner import open_session


def run(session, limits, batch, prompt_len, new):
    rng = np.random.default_rng(0)
    seqs = [Sequence(i, rng.integers(100, 10000, prompt_len).tolist(), prompt_len,
                     prompt_len + new, rng, i) for i in range(batch)]
    pool = BlockPool(batch * blocks_needed(prompt_len + new, limits.kv_block_size))
    session.allocate_kv(pool.num_blocks)
    for s in seqs:
        s.blocks = pool.allocate(blocks_needed(prompt_len + new, limits.kv_block_size))
    t0 = time.perf_counter()
    while any(s.num_computed < len(s.tokens) for s in seqs):   # prefill, chunked by limits
        todo = [s for s in seqs if s.num_computed < len(s.tokens)]
        step = schedule(todo, limits)
        session.step(step_inputs(step, limits))
        for s, n in step:
            s.num_computed += n
    t1 = time.perf_counter()
    for _ in range(new):                                       # decode, argmax on the host
        step = [(s, 1) for s in seqs]
        for s in seqs:
            s.tokens.append(int(rng.integers(100, 10000)))
        session.step(step_inputs(step, limits))
        for s, n in step:
            s.num_computed += n
    t2 = time.perf_counter()
    return batch * prompt_len / (t1 - t0), batch * new / (t2 - t1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("engine")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new", type=int, default=32)
    a = ap.parse_args()
    engine = EngineFile(a.engine)
    limits = engine.header.build.limits
    session = open_session(engine)
    print(f"# {a.engine}: {engine.header.build.compute_dtype}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print("| batch | prompt | new | prefill tok/s | decode tok/s |")
    print("|---|---|---|---|---|")
    run(session, limits, 1, 16, 2)  # warm-up
    for b in a.batch:
        pre, dec = run(session, limits, b, a.prompt_len, a.new)
        print(f"| {b} | {a.prompt_len} | {a.new} | {pre:.0f} | {dec:.1f} |")


if __name__ == "__main__":
    main()
