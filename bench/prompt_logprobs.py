"""What scoring a prompt (prompt_logprobs, as lm-evaluation-harness asks for it) costs.

One engine; --requests prompts of --tokens tokens each (from the bundled evaluation text),
each asking for prompt_logprobs=1 and one generated token, all queued at once. Two ways:
  rows        as the engine runs it: a scored prompt's tokens in one-token rows of their
              own, as many a step as the batch's rows leave
  a token     the prompt a token a step (the scheduler's row count for scoring forced to
              1: how the engine scored prompts before rows)
Each runs twice and the second is timed; the scores of the two must agree.

    python3 bench/prompt_logprobs.py smollm2.engine --tokens 200 --requests 1 4
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from engine_session import open_engine, parser

from llmc.runtime.engine import LLMEngine
from llmc.runtime.sampler import SamplingParams
from llmc.runtime.scheduler import Scheduler

TEXT = Path(__file__).resolve().parents[1] / "quantization" / "data" / "eval.txt"


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--requests", type=int, nargs="+", default=[1, 4])
    args = ap.parse_args()
    file, session = open_engine(args)
    from tokenizers import Tokenizer

    ids = Tokenizer.from_str(file.header.tokenizer.json).encode(TEXT.read_text()).ids
    lim = file.header.build.limits
    print(f"engine {args.engine.name} ({file.header.backend}, max_batch_size "
          f"{lim.max_batch_size}), prompts of {args.tokens} tokens")
    print(f"{'requests':>8} {'mode':>8} {'steps':>6} {'seconds':>8} {'tokens/s':>9}  "
          "max |difference|")
    rows = Scheduler._score_rows
    for n in args.requests:
        prompts = [ids[i * 37:i * 37 + args.tokens] for i in range(n)]
        results = {}
        for mode in ("a token", "rows"):
            Scheduler._score_rows = rows if mode == "rows" else (lambda self, *a: 1)
            for _ in range(2):
                scores, steps, seconds = _score(session, file, prompts)
            results[mode] = scores
            diff = np.abs(np.array(scores) - np.array(results["a token"])).max()
            print(f"{n:>8} {mode:>8} {steps:>6} {seconds:>8.3f} "
                  f"{n * (args.tokens - 1) / seconds:>9.0f}  {diff:.2e}")
    Scheduler._score_rows = rows
    session.close()


def _score(session, file, prompts):
    """Every prompt token's logprob (after each prompt's first), the steps, the seconds."""
    engine = LLMEngine(session, file.header, enable_prefix_caching=False)
    params = SamplingParams(max_tokens=1, prompt_logprobs=1)
    ids = [engine.add_request(p, params) for p in prompts]
    got = {}
    steps = 0
    t0 = time.perf_counter()
    while engine.has_unfinished():
        steps += 1
        for out in engine.step():
            if out.prompt_logprobs is not None:
                got[out.request_id] = [lp for lp, _ in out.prompt_logprobs[1:]]
    seconds = time.perf_counter() - t0
    return [x for rid in ids for x in got[rid]], steps, seconds


if __name__ == "__main__":
    main()
