"""Token perplexity of short texts scored from their start, with and without a special token
first, for engines of one model against the first given (bench/results/quantization.md, "A
sequence's first token in FP8").

    python3 bench/short_texts.py s-fp16.engine s-fp8.engine [more engines] [--paragraphs 8]

The texts are the first N paragraphs of at least 20 words of the bundled evaluation text (as
`bench/fp8_scales.py --texts paragraphs` cuts them). Each is scored from scratch after
nothing and after the EOS token: lm-evaluation-harness's rolling loglikelihood puts EOS
first, and a chat prompt starts with a special token too. Each paragraph's first token is
left unscored both ways, so both score the same positions. The scores come from
`Runner.complete` with `SamplingParams(max_tokens=0, prompt_logprobs=0)`, on the engine's
own backend.
"""
from __future__ import annotations

import argparse
import math
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("engines", nargs="+", help="the first is the baseline")
    ap.add_argument("--paragraphs", type=int, default=8)
    args = ap.parse_args()

    from llmc.quantization import measure
    from llmc.runtime.runner import Runner
    from llmc.runtime.sampling_params import SamplingParams

    texts = measure.bundled_paragraphs("eval")[:args.paragraphs]
    rows, base = [], None
    for path in args.engines:
        runner = Runner(path)
        try:
            t0 = time.perf_counter()
            ids = [runner.tokenizer.encode(t, add_special_tokens=False).ids for t in texts]
            eos = runner.eos_ids[0]
            prefixes = {"no prefix": [], "EOS first": [eos]}
            prompts = [p + s for p in prefixes.values() for s in ids]
            done = runner.complete(prompts, SamplingParams(max_tokens=0, prompt_logprobs=0))
            ppl, n = {}, 0
            for k, (label, prefix) in enumerate(prefixes.items()):
                nll, n = 0.0, 0
                for c in done[k * len(ids):(k + 1) * len(ids)]:
                    if c.error:
                        raise SystemExit(f"error: {path}: {c.error}")
                    scored = c.prompt_logprobs[len(prefix) + 1:]
                    nll -= sum(lp for lp, _ in scored)
                    n += len(scored)
                ppl[label] = math.exp(nll / n)
            rows.append((path, ppl, time.perf_counter() - t0))
            base = base or ppl
        finally:
            runner.close()
    print(f"{len(texts)} paragraphs, {n} positions scored\n")
    print("| engine | no prefix | vs first | EOS first | vs first | time |")
    print("|---|---|---|---|---|---|")
    for path, ppl, secs in rows:
        d = {k: f"{100 * (ppl[k] / base[k] - 1):+.2f}%" if ppl is not base else ""
             for k in ppl}
        print(f"| {path} | {ppl['no prefix']:.3f} | {d['no prefix']} | "
              f"{ppl['EOS first']:.3f} | {d['EOS first']} | {secs:.0f} s |")


if __name__ == "__main__":
    main()
