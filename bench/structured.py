"""What a structured output costs a decode step.

One engine, B identical requests a run, each decoding exactly --tokens tokens (greedy). Five
modes, each run twice, the second timed:
  free, device       no constraint; on a GPU backend the tokens are sampled on the device
  free, host         no constraint, sampled on the host (the session's device sampler hidden
                     from the engine): the logits' copy to the host and numpy's sampling
  json, host         a JSON schema (an array of at least 1,000 short strings, so it cannot
                     end early), its masks applied to the logits on the host
  json, masks first  the masks banned on the device, but computed before the step is
                     launched (`overlap_masks` off)
  json               as the engine runs it: the masks computed on a worker thread while the
                     forward runs, banned on the device, sampled there
On a backend without a device sampler (reference) every mode samples on the host. The masks'
own time is taken around `Grammars._fill` (runtime/structured.py).

    python3 bench/structured.py smollm2.engine --batch 1 8 32 --tokens 128
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from llmc.runtime.runner import Runner
from llmc.runtime.sampler import SamplingParams
from llmc.runtime.structured import StructuredOutputsParams

SCHEMA = {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 1000}
PROMPT = "List the names of a thousand cities as a JSON array of strings."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("engine", type=Path)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    args = ap.parse_args()

    runner = Runner(args.engine, gpu_memory_utilization=args.gpu_memory_utilization) \
        if _is_cuda(args.engine) else Runner(args.engine)
    masked = [0.0, 0]   # seconds computing masks (on the worker thread), rows masked
    grammars = runner.engine.grammars
    fill = grammars._fill

    def timed_fill(matchers):
        t0 = time.perf_counter()
        out = fill(matchers)
        masked[0] += time.perf_counter() - t0
        masked[1] += len(matchers)
        return out
    grammars._fill = timed_fill

    device = runner.engine.session
    host = HostSampling(device)
    prompt = runner.encode(PROMPT, chat=bool(runner.chat_template))
    json = SamplingParams(max_tokens=args.tokens,
                          structured_outputs=StructuredOutputsParams(json=SCHEMA))
    free = SamplingParams(max_tokens=args.tokens, ignore_eos=True)
    modes = {"free, device": free, "free, host": free, "json, host": json,
             "json, masks first": json, "json": json}
    print(f"engine {args.engine.name} ({runner.engine.header.backend}), {args.tokens} tokens "
          f"a request, greedy\n")
    print("| batch | mode | tok/s | ms a step | vs free, device | mask ms a step |")
    print("|---:|---|---:|---:|---:|---:|")
    for batch in args.batch:
        base = None
        for name, params in modes.items():
            runner.engine.overlap_masks = name != "json, masks first"
            runner.engine.session = host if name.endswith("host") else device
            for attempt in range(2):   # the first warms up (graphs, the tokenizer, grammar)
                masked[:] = [0.0, 0]
                t0 = time.perf_counter()
                results = runner.complete([prompt] * batch, params)
                seconds = time.perf_counter() - t0
            tokens = [len(r.token_ids) for r in results]
            assert all(r.error is None for r in results), results[0].error
            assert tokens == [args.tokens] * batch, tokens   # none ended early
            step_ms = seconds / args.tokens * 1e3
            base = base or step_ms
            print(f"| {batch} | {name} | {sum(tokens) / seconds:,.0f} | {step_ms:.2f} | "
                  f"{step_ms / base:.2f}x | "
                  f"{masked[0] / args.tokens * 1e3:.3f} |", flush=True)
    runner.close()


class HostSampling:
    """The session without its device sampler: the engine then samples on the host."""

    def __init__(self, session):
        self._session = session

    def __getattr__(self, name):
        if name == "step_sample":
            raise AttributeError(name)
        return getattr(self._session, name)


def _is_cuda(path: Path) -> bool:
    from llmc.engine_file import EngineFile

    return EngineFile(path, verify=False).header.backend == "cuda"


if __name__ == "__main__":
    main()
