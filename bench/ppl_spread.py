"""Does the accuracy report's standard error say how far Δppl moves with the text?

Two engines of one model (a quantized build and its unquantized reference) are scored over a
long text by their own backend, as `llmc eval` scores them (each window teacher-forced from
its first token). The text is cut into pieces the size of the build report's (4 windows of
256 tokens: 1,020 scored tokens); each piece's Δppl is one reading of what the report would
say on another text of the kind. The spread of those readings is set beside the standard
error a piece claims (quantization/measure.py: delta_ppl_se_pct), which treats the tokens as
independent: if neighbouring tokens' errors go together, the readings spread wider than
claimed.

    python3 bench/ppl_spread.py s-fp8.engine s-fp16.engine --text poems.txt --tokens 8192
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from llmc.engine_file import EngineFile
from llmc.quantization import measure
from llmc.runtime import evaluate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("engine", type=Path)
    ap.add_argument("reference", type=Path)
    ap.add_argument("--text", type=Path, help="default: the bundled eval.txt")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--windows-a-piece", type=int, default=4)
    args = ap.parse_args()

    files = [EngineFile(args.engine), EngineFile(args.reference)]
    text, name = measure.read_text(args.text, "eval")
    windows = measure.token_sequences(files[0].header.tokenizer.json, text, args.tokens,
                                      "evaluation", "--text")
    quant, ref = (evaluate.score_engine(f, windows)[0] for f in files)
    # Scores keep window order: window i's scored tokens are the next len(w) - 1 entries
    ends = np.cumsum([len(w) - 1 for w in windows])
    k = args.windows_a_piece
    print(f"{args.engine} against {args.reference}, {name}, {len(windows)} windows, "
          f"pieces of {k}\n")
    print("| piece | tokens | Δppl | its standard error |")
    print("|---|---:|---:|---:|")
    deltas, errors = [], []
    for p in range(len(windows) // k):
        lo, hi = (ends[p * k - 1] if p else 0), ends[(p + 1) * k - 1]
        lq, lr = quant.logp[lo:hi], ref.logp[lo:hi]
        delta, se = measure.delta_ppl_pct(lr, lq), measure.delta_ppl_se_pct(lr, lq)
        deltas.append(delta)
        errors.append(se)
        print(f"| {p} | {hi - lo} | {delta:+.2f}% | {se:.2f} |")
    whole = measure.delta_ppl_pct(ref.logp, quant.logp)
    print(f"\nwhole text: {whole:+.2f}% ± {measure.delta_ppl_se_pct(ref.logp, quant.logp):.2f} "
          f"over {quant.tokens} tokens")
    print(f"pieces: mean {np.mean(deltas):+.2f}%, spread (sd) {np.std(deltas, ddof=1):.2f}, "
          f"claimed (mean standard error) {np.mean(errors):.2f}")


if __name__ == "__main__":
    main()
