"""What speculative decoding by prompt lookup gains, task by task.

One engine; each task a chat request that decodes up to --tokens tokens (greedy, stopping
at EOS), run alone (batch 1) without speculation and with each --k (num_speculative_tokens,
prompt_lookup_max 4, min 2), then all tasks at once (batch = tasks). Each configuration runs
twice and the second run is timed. Reported a task: decode tok/s (tokens after the first
over the time after the first: the prompt's step excluded), the ratio to plain decoding,
the steps after the first token, the share of guesses kept, and whether the text equals
plain decoding's (the same greedy text; a near tie of logits computed in a step of
another shape may differ).

The tasks, written for this benchmark: three that copy or edit their input (where guesses
are found) and two that write freely (where few are).

    python3 bench/speculative.py smollm2.engine --tokens 128 --k 2 4 8
"""

from __future__ import annotations

import time

from engine_session import open_engine, parser

from llmc.engine_file import EngineFile
from llmc.runtime.engine import LLMEngine
from llmc.runtime.runner import render_chat
from llmc.runtime.sampler import SamplingParams
from llmc.runtime.speculative import SpeculativeConfig

CODE = '''def total_price(items, tax):
    result = 0
    for item in items:
        result = result + item["price"] * item["quantity"]
    result = result + result * tax
    return result
'''
TASKS = {
    "copy": "Repeat this paragraph exactly, word for word: The old lighthouse keeper climbed "
            "the spiral stairs every evening, lit the great lamp, and watched the ships pass "
            "safely through the narrow channel. In winter the storms came early, and he kept "
            "the lamp burning through the night.",
    "edit": "Fix the spelling mistakes in this text and write it out again: The anual "
            "meeting of the garden club will be held on Tuesday evenning in the town hall. "
            "Members are asked to bring there own chairs and a dish to share.",
    "code": "Rename the variable result to total in this Python function and write the whole "
            "function again:\n\n" + CODE,
    "story": "Write a short story about a dragon who learns to bake bread.",
    "explain": "Explain why the sky is blue in a few sentences.",
}


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--k", type=int, nargs="+", default=[2, 4, 8])
    args = ap.parse_args()
    file, session = open_engine(args)
    prompts = {name: _chat(file, text) for name, text in TASKS.items()}
    params = SamplingParams(max_tokens=args.tokens)
    configs = [None] + [SpeculativeConfig(num_speculative_tokens=k) for k in args.k]
    print(f"engine {args.engine.name} ({file.header.backend}), {args.tokens} tokens at most, "
          "greedy")
    print(f"{'task':>8} {'k':>3} {'tok/s':>8} {'x plain':>8} {'steps':>6} {'kept':>7} "
          f"{'tokens':>6}  same")
    for batch in ("alone", "together"):
        plain = {}
        for config in configs:
            if batch == "alone":
                results = {name: _run(session, file, [p], params, config)
                           for name, p in prompts.items()}
                results = {name: (r[0][0], r[1], r[2]) for name, r in results.items()}
            else:
                texts, rate, stats = _run(session, file, list(prompts.values()), params,
                                          config)
                results = {"all 5": (sum(texts, []), rate, stats)}
                plain_all = plain.get("all 5")
            for name, (tokens, rate, stats) in results.items():
                base = plain.setdefault(name, (tokens, rate))
                if batch == "together" and plain_all is not None:
                    base = plain_all
                kept = (f"{stats.spec_accepted_tokens / stats.spec_draft_tokens:.0%}"
                        if stats.spec_draft_tokens else "-")
                print(f"{name:>8} {config.num_speculative_tokens if config else 0:>3} "
                      f"{rate:>8.1f} {rate / base[1]:>8.2f} {stats.steps_after_first:>6} "
                      f"{kept:>7} {len(tokens):>6}  {'yes' if tokens == base[0] else 'NO'}")
        print()
    session.close()


def _chat(file: EngineFile, text: str) -> list[int]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(file.header.tokenizer.json)
    t = file.header.tokenizer
    eos = tok.id_to_token(t.eos_token_ids[0]) if t.eos_token_ids else ""
    bos = tok.id_to_token(t.bos_token_id) if t.bos_token_id is not None else ""
    rendered = render_chat(t.chat_template, [{"role": "user", "content": text}], eos, bos)
    return tok.encode(rendered, add_special_tokens=False).ids


class _Stats:
    """The engine's speculation counters over one run, and its steps after the first
    token."""

    def __init__(self, engine: LLMEngine, before: list[int], steps: int):
        drafts, guessed, kept = (a - b for a, b in zip(engine.spec_counts, before))
        self.spec_drafts, self.spec_draft_tokens, self.spec_accepted_tokens = (
            drafts, guessed, kept)
        self.steps_after_first = steps


def _run(session, file, prompts, params, config):
    """Twice (the first warms the session's graphs and buffers); of the second: each
    request's tokens, decode tok/s after every request's first token, and _Stats."""
    for _ in range(2):
        engine = LLMEngine(session, file.header, speculative=config,
                           enable_prefix_caching=False)
        before = list(engine.spec_counts)
        ids = [engine.add_request(p, params) for p in prompts]
        tokens = {rid: [] for rid in ids}
        started = steps = 0
        t0 = None
        while engine.has_unfinished():
            outs = engine.step()
            for out in outs:
                tokens[out.request_id] += out.token_ids
            if t0 is None and all(tokens.values()):   # every request has its first token
                t0, started = time.perf_counter(), sum(map(len, tokens.values()))
            elif t0 is not None:
                steps += 1
        seconds = time.perf_counter() - t0
        total = sum(map(len, tokens.values()))
    rate = (total - started) / seconds if seconds > 0 else float("nan")
    return [tokens[r] for r in ids], rate, _Stats(engine, before, steps)


if __name__ == "__main__":
    main()
