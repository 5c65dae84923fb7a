"""`llmc bench` on the reference backend: the figures are consistent (tokens counted equal
tokens requested, counts and rates agree), not fast."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys

import pytest

from llmc.errors import LlmcError
from llmc.runtime import bench
from llmc.runtime.runner import Runner


@pytest.fixture(scope="module")
def runner(tiny_chat_engine):
    r = Runner(tiny_chat_engine)
    yield r
    r.close()


def check(summary, requests):
    assert summary["failed"] == 0 and summary["requests"] == len(requests)
    assert summary["output_tokens"] == summary["requested_output_tokens"] == sum(
        r.output_len for r in requests)
    s = summary
    assert s["requests_per_s"] == pytest.approx(len(requests) / s["duration_s"])
    assert s["total_tokens_per_s"] == pytest.approx(
        (s["prompt_tokens"] + s["output_tokens"]) / s["duration_s"])
    for key in ("ttft_ms", "tpot_ms", "e2e_ms"):
        d = s[key]
        assert 0 <= d["p50"] <= d["p90"] <= d["p99"]
    assert s["ttft_ms"]["p99"] <= s["e2e_ms"]["p99"]


def test_synthetic_dataset_lengths():
    reqs = bench.synthetic(50, 20, 10, vocab_size=128, range_ratio=0.5, seed=1)
    assert all(10 <= len(r.prompt) <= 30 and 5 <= r.output_len <= 15 for r in reqs)
    assert all(0 <= t < 128 for r in reqs for t in r.prompt)
    assert reqs == bench.synthetic(50, 20, 10, vocab_size=128, range_ratio=0.5, seed=1)
    assert bench.arrival_offsets(3, math.inf) == [0, 0, 0]
    offsets = bench.arrival_offsets(200, 100.0, seed=0)
    assert offsets == sorted(offsets) and 1.0 < offsets[-1] < 3.0   # ~ 200 / 100 s
    with pytest.raises(LlmcError, match="range-ratio"):
        bench.synthetic(1, 1, 1, 128, range_ratio=1.5)


def test_offline_counts_equal_requested(runner, tmp_path):
    reqs = bench.synthetic(24, 12, 8, vocab_size=128, range_ratio=0.5, seed=0)
    summary = bench.run_offline(runner, reqs).summary()
    check(summary, reqs)
    assert summary["prompt_tokens"] == sum(len(r.prompt) for r in reqs)
    summary = bench.run_offline(runner, reqs[:8], request_rate=200.0).summary()
    check(summary, reqs[:8])
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "w3 w4 w5", "output_len": 4}\n\n{"prompt": [5, 6]}\n')
    reqs = bench.from_jsonl(data, output_len=6)
    assert [r.output_len for r in reqs] == [4, 6]
    summary = bench.run_offline(runner, reqs).summary()
    check(summary, reqs)
    assert summary["prompt_tokens"] == 5
    data.write_text('{"text": 1}\n')
    with pytest.raises(LlmcError, match="line 1"):
        bench.from_jsonl(data, 6)


def test_online_counts_equal_requested(runner):
    pytest.importorskip("openai")
    from llmc.runtime.server import OpenAIServer

    with OpenAIServer(runner, "tiny").running() as url:
        model, vocab = bench.server_model(url, None, None)
        assert (model, vocab) == ("tiny", 128)
        reqs = bench.synthetic(16, 10, 6, vocab, range_ratio=0.3, seed=2)
        result = asyncio.run(bench.run_online(url, model, reqs, concurrency=4))
        check(result.summary(), reqs)
        assert result.summary()["prompt_tokens"] == sum(len(r.prompt) for r in reqs)
        # the command, against the same server, with a table
        r = subprocess.run([sys.executable, "-m", "llmc", "bench", "--url", url,
                            "--num-requests", "6", "--input-len", "5", "--output-len", "3"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert "tokens: 30 prompt, 18 output (requested 18)" in r.stdout
        assert "TTFT (ms)" in r.stdout and "TPOT (ms)" in r.stdout


def test_the_command_offline_json(tiny_chat_engine):
    r = subprocess.run([sys.executable, "-m", "llmc", "bench", str(tiny_chat_engine),
                        "--num-requests", "10", "--input-len", "6", "--output-len", "5",
                        "--request-rate", "500", "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert (s["requests"], s["failed"], s["prompt_tokens"]) == (10, 0, 60)
    assert s["output_tokens"] == s["requested_output_tokens"] == 50
    r = subprocess.run([sys.executable, "-m", "llmc", "bench", str(tiny_chat_engine),
                        "--num-requests", "2", "--input-len", "60", "--output-len", "10"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "exceed the engine's max_seq_len (64)" in r.stderr.strip().splitlines()[-1]
