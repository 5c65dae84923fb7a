"""Host sampler speed: `sample_batch` on B x V float32 logits, in µs per row, beside the
previous per-row sampler (float64 `probabilities` with a full argsort for top-p, then
rng.choice), timed on a few rows of the same logits on the same machine.

    python bench/sampler.py [--batch 256] [--vocab 128256] [--top-p 0.9] [--repeat 3]

Logits are LM-like (a normal body, sd 2, and a head of 40 tokens 10-20 higher: top-p 0.9
keeps a handful), and
--flat gives a plain normal(0, 3) row, where top-p 0.9 spans thousands of tokens.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from llmc.runtime.sampler import SamplingParams, sample_batch


def old_sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """The sampler before per-request SamplingParams (runtime/sampler.py at 43cc873)."""
    z = logits.astype(np.float64) / params.temperature
    if 0 < params.top_k < z.size:
        kth = np.partition(z, -params.top_k)[-params.top_k]
        z = np.where(z < kth, -np.inf, z)
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    if params.top_p < 1:
        order = np.argsort(-probs, kind="stable")
        cut = int(np.searchsorted(np.cumsum(probs[order]), params.top_p)) + 1
        keep = np.zeros_like(probs, dtype=bool)
        keep[order[:cut]] = True
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum()
    return int(rng.choice(probs.size, p=probs))


def make_logits(b: int, v: int, flat: bool, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if flat:
        return rng.normal(0, 3, (b, v)).astype(np.float32)
    x = rng.normal(0, 2, (b, v)).astype(np.float32)
    head = rng.integers(0, v, (b, 40))
    np.put_along_axis(x, head, np.take_along_axis(x, head, 1)
                      + rng.uniform(10, 20, (b, 40)).astype(np.float32), 1)
    return x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--old-rows", type=int, default=16, help="rows timed for the old sampler")
    ap.add_argument("--flat", action="store_true", help="normal(0, 3) logits")
    args = ap.parse_args()
    b, v = args.batch, args.vocab
    logits = make_logits(b, v, args.flat)
    gens = [np.random.default_rng(i) for i in range(b)]
    print(f"B={b} V={v} logits={'flat' if args.flat else 'lm-like'} "
          f"temperature={args.temperature}")
    for label, params in [
            (f"top_p {args.top_p}", SamplingParams(args.temperature, 0, args.top_p)),
            ("top_k 50", SamplingParams(args.temperature, 50)),
            ("no truncation", SamplingParams(args.temperature)),
            ("greedy", SamplingParams()),
            (f"top_p {args.top_p} + penalties", SamplingParams(
                args.temperature, 0, args.top_p, repetition_penalty=1.1,
                presence_penalty=0.5, frequency_penalty=0.5))]:
        outputs = [list(range(i, i + 64)) for i in range(b)]
        prompts = [list(range(1000 + i, 1512 + i)) for i in range(b)]
        best = float("inf")
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            sample_batch(logits, [params] * b, gens, outputs, prompts)
            best = min(best, time.perf_counter() - t0)
        line = f"  {label:32s} sample_batch {best / b * 1e6:8.1f} µs/row"
        if params.needs_host or params.temperature == 0:
            print(line)
            continue
        n = min(args.old_rows, b)
        rng = np.random.default_rng(0)
        t0 = time.perf_counter()
        for r in range(n):
            old_sample(logits[r], params, rng)
        print(f"{line}   old per-row sampler {(time.perf_counter() - t0) / n * 1e6:8.1f} µs/row")


if __name__ == "__main__":
    main()
