"""The `llmc` command end to end, as a user runs it: output, exit codes, clear errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

LIMITS = ["--max-batch-size", "2", "--max-num-tokens", "16", "--max-seq-len", "32",
          "--kv-block-size", "8"]


def llmc(*args, ok=True):
    r = subprocess.run([sys.executable, "-m", "llmc", *map(str, args)], capture_output=True,
                       text=True, timeout=300)
    assert (r.returncode == 0) == ok, r.stderr
    assert "Traceback" not in r.stderr
    return r


@pytest.fixture(scope="module")
def engine(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "tiny.engine"
    r = llmc("build", "--model", tiny_models["qwen2-bias"][0], "-o", out, "--backend",
             "reference", "--dtype", "fp32", *LIMITS)
    assert "wrote" in r.stderr and "Qwen2ForCausalLM" in r.stderr
    return out


def test_build_inspect_run(engine):
    r = llmc("inspect", engine)
    assert "backend: reference" in r.stdout and "max_seq_len=32" in r.stdout
    r = llmc("run", engine, "-p", "w3 w4", "-p", "w9", "--max-new-tokens", "4")
    lines = [x for x in r.stdout.splitlines() if x.startswith("w")]
    assert len(lines) == 2 and all(len(x.split()) >= 4 for x in lines)
    assert "backend: reference" in r.stderr
    r = llmc("run", engine, "-p", "w3 w4", "--temperature", "0.8", "--top-k", "5", "--seed", "1")
    assert r.stdout == llmc("run", engine, "-p", "w3 w4", "--temperature", "0.8", "--top-k",
                            "5", "--seed", "1").stdout


def test_auto_backend_says_what_it_picked(tiny_models, tmp_path):
    r = llmc("build", "--model", tiny_models["llama-gqa"][0], "-o", tmp_path / "a.engine",
             *LIMITS)
    assert "backend auto -> reference" in r.stderr


def test_tensorrt_rtx_engine(tiny_models, tmp_path):
    pytest.importorskip("tensorrt_rtx")
    out = tmp_path / "rtx.engine"
    llmc("build", "--model", tiny_models["llama-gqa"][0], "-o", out, "--backend",
         "tensorrt-rtx", "--dtype", "fp16", *LIMITS)
    assert "backend: tensorrt-rtx" in llmc("inspect", out).stdout
    from llmc.backends.tensorrt.session import available

    runs_here, why = available("tensorrt-rtx")
    r = llmc("run", out, "-p", "w3", ok=runs_here)   # an Ampere/Ada/Blackwell GPU runs it
    if not runs_here:
        assert r.returncode == 2 and "cannot run" in r.stderr and why in r.stderr


def test_run_json_prompts_file_and_per_request_errors(engine, tmp_path):
    import json

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "w3 w4"}\nw9\n\n')
    r = llmc("run", engine, "--prompts-file", prompts, "-p", "w5", "--json",
             "--max-new-tokens", "3")
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["prompt"] for x in rows] == ["w5", "w3 w4", "w9"]
    assert all(x["finish_reason"] in ("length", "stop") and x["error"] is None for x in rows)
    assert all(x["usage"]["completion_tokens"] == len(x["token_ids"]) for x in rows)
    assert "generated tok/s" in r.stderr
    # one bad prompt among good ones: it fails alone, the others print, exit status 2
    r = llmc("run", engine, "-p", "w3", "-p", " ".join(["w5"] * 40), "--max-new-tokens", "2",
             ok=False)
    assert r.returncode == 2 and r.stdout.startswith("w3")
    assert "1 of 2 requests failed" in r.stderr.splitlines()[-1]


def test_stream_many_logprobs_and_an_interactive_chat(engine, tiny_models, tmp_path):
    import json
    import shutil

    r = llmc("run", engine, "-p", "w3 w4", "-p", "w9", "--stream", "--json",
             "--max-new-tokens", "3", "--logprobs", "2")
    events = [json.loads(line) for line in r.stdout.splitlines()]
    assert {e["index"] for e in events} == {0, 1}
    assert sum(e["finished"] for e in events) == 2
    for i in (0, 1):   # a logprob a token (and one for a stop token that ended it)
        mine = [e for e in events if e["index"] == i]
        lps = [x for e in mine for x in e["logprobs"]]
        tokens = sum(len(e["token_ids"]) for e in mine)
        assert tokens <= len(lps) <= tokens + 1 and all(len(top) == 2 for _, top in lps)
    r = llmc("run", engine, "-p", "w3", "--json", "--max-new-tokens", "2", "--logprobs", "2",
             "--temperature", "0.5", "--seed", "1")
    (row,) = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(row["logprobs"]) == 2 and all(len(top) == 2 for _, top in row["logprobs"])

    folder = tmp_path / "chat-model"     # the tiny model with a chat template
    shutil.copytree(tiny_models["llama-gqa"][0], folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    out = tmp_path / "chat.engine"
    llmc("build", "--model", folder, "-o", out, "--backend", "reference", "--dtype", "fp32",
         *LIMITS)
    r = subprocess.run([sys.executable, "-m", "llmc", "run", str(out), "--chat", "--system",
                        "w5", "--max-new-tokens", "2"], input="w3 w4\nw9\n\n",
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("> ") == 3          # two turns, then the empty line ends it


def test_an_engine_is_an_ordinary_output_file_and_replacing_one_is_said(tiny_models, tmp_path):
    """(What build refuses to overwrite is in test_errors.py.)"""
    import os

    model = tiny_models["llama-gqa"][0]
    # an engine is an ordinary output file (the umask decides), and replacing one is said
    out = tmp_path / "b.engine"
    llmc("build", "--model", model, "-o", out, *LIMITS)
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask
    assert "replacing the existing engine" in llmc("build", "--model", model, "-o", out,
                                                   *LIMITS).stderr
