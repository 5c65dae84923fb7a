"""A cuda engine of Llama-3.1-8B's shapes with a Llama 3-sized vocabulary that spells real
text: random bf16 weights (bench/e2e.py's make_model, made on the GPU) and a byte-level BPE
tokenizer of 128,256 tokens trained here on random pseudo-words and JSON. For timing what
depends on the vocabulary, structured outputs' masks above all:

    python3 bench/big_vocab_engine.py /tmp/m8.engine
    python3 bench/structured.py /tmp/m8.engine --batch 1 8 32 --tokens 64 \
        --gpu-memory-utilization 0.9

(e2e.py's own models speak a word-level tokenizer of 1,000 words, which cannot spell JSON.)
Needs a GPU and about 32 GB of disk for the checkpoint and the engine; the checkpoint is
deleted once the engine is built.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import shutil
import sys
import time
from pathlib import Path

VOCAB = 128256


def train_tokenizer(out: Path, lines: int = 600_000) -> None:
    """~40 s on two cores: 58 MB of Zipf-distributed pseudo-words, a third of the lines JSON."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(0)
    syllables = [a + b for a in "bcdfghjklmnprstvwz" for b in "aeiouy"] + list("aeiou")
    words = sorted({"".join(rng.choice(syllables) for _ in range(rng.randint(1, 5)))
                    for _ in range(400_000)})
    cum = list(itertools.accumulate(1 / (i + 1) ** 0.8 for i in range(len(words))))

    def line() -> str:
        ws = rng.choices(words, cum_weights=cum, k=12)
        if rng.random() < 0.3:
            return json.dumps({ws[0]: ws[1:4], ws[4]: rng.randint(0, 99999),
                               "ok": rng.random() < 0.5})
        return " ".join(ws).capitalize() + "."

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([line() for _ in range(lines)], trainer)
    tok.save(str(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("engine", type=Path)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--work", type=Path, default=Path("/tmp/big-vocab"))
    args = ap.parse_args()

    sys.path.insert(0, str(Path(__file__).parent))
    import e2e

    from llmc.limits import BuildLimits

    t0 = time.perf_counter()
    e2e.make_model("llama-3.1-8b", args.work, args.layers)
    train_tokenizer(args.work / "tokenizer.json")
    print(f"checkpoint and tokenizer in {time.perf_counter() - t0:.0f} s")
    e2e.build_engine(args.work, args.engine, BuildLimits(32, 2048, 512, 16), dtype="bf16")
    shutil.rmtree(args.work)


if __name__ == "__main__":
    main()
