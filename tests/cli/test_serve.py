"""`llmc serve` as a user runs it: a process on a loopback port, SmolLM2's own chat template,
SIGTERM draining, clear startup errors."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse

import pytest

openai = pytest.importorskip("openai")

KEY = "sk-serve"


class ServeProcess:
    """`llmc serve ENGINE --port 0 ...` in a subprocess; its stderr lines are collected."""

    def __init__(self, engine, *args):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llmc", "serve", str(engine), "--port", "0", *args],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        self.lines: list[str] = []
        self.url = None
        reader = threading.Thread(target=self._read, daemon=True)
        reader.start()
        deadline = time.monotonic() + 120
        while self.url is None and self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.url, "\n".join(self.lines)

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            if m := re.search(r"serving '.*' on (http://\S+)", line):
                self.url = m.group(1)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.mark.slow
def test_chat_template_greedy_and_sigterm_drain(smollm2_engine, hf_smollm2):
    from llmc.runtime.runner import Runner
    from llmc.runtime.sampler import SamplingParams

    server = ServeProcess(smollm2_engine, "--api-key", KEY, "--served-model-name", "smol")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY)
        messages = [{"role": "system", "content": "You are brief."},
                    {"role": "user", "content": "What is the capital of France?"}]
        r = client.chat.completions.create(model="smol", messages=messages, max_tokens=12,
                                           temperature=0)
        tok = hf_smollm2[0]   # transformers' own tokenizer and template (shared fixture)
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert r.usage.prompt_tokens == len(tok(text, add_special_tokens=False)["input_ids"])
        runner = Runner(smollm2_engine)
        want = runner.complete([messages], SamplingParams(max_tokens=12), chat=True)[0]
        runner.close()
        assert r.choices[0].message.content == want.text

        # the tokenizer endpoints against transformers': EOS's text, and its id from it (how
        # lm-evaluation-harness's remote tokenizer finds it)
        info = _json(server.url, "GET", "/tokenizer_info")
        assert info["eos_token"] == tok.eos_token
        got = _json(server.url, "POST", "/tokenize",
                    {"prompt": tok.eos_token, "add_special_tokens": False})
        assert got["tokens"] == [tok.eos_token_id]
        got = _json(server.url, "POST", "/tokenize", {"prompt": "Hello there"})
        assert got["tokens"] == tok("Hello there")["input_ids"]

        # SIGTERM while a stream is in flight: it finishes, a new request gets 503, exit 0
        stream = client.completions.create(model="smol", prompt="Once upon a time",
                                           max_tokens=24, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        chunks = [next(iter(stream))]
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(openai.APIStatusError) as refused:
            client.with_options(max_retries=0).completions.create(model="smol", prompt="Hi",
                                                                  max_tokens=2)
        assert refused.value.status_code == 503
        chunks += list(stream)
        assert chunks[-1].choices[0].finish_reason == "length"
        assert len("".join(c.choices[0].text for c in chunks)) > 0
        assert server.proc.wait(timeout=60) == 0
    finally:
        server.stop()
    lines = [x for x in server.lines if "llmc.serve:" in x]
    assert any(" 200 length prompt=" in x and "completion=24" in x for x in lines)
    assert any(" 503 " in x for x in lines) and any("draining" in x for x in lines)
    assert "Traceback" not in "\n".join(server.lines)


def test_startup_errors_are_one_line(tiny_chat_engine):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    r = subprocess.run([sys.executable, "-m", "llmc", "serve", str(tiny_chat_engine), "--port",
                        str(port)], capture_output=True, text=True, timeout=120)
    busy.close()
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: cannot listen on 127.0.0.1:"
                                                        f"{port}")


def _json(url: str, method: str, path: str, body=None) -> dict:
    """One request's JSON answer, asserting a 200."""
    import http.client

    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    conn.request(method, path, None if body is None else json.dumps(body))
    r = conn.getresponse()
    assert r.status == 200
    return json.loads(r.read())


def test_serve_tiny_engine_answers(tiny_chat_engine):
    """The command's defaults: the model is named after the engine file, no key needed."""
    server = ServeProcess(tiny_chat_engine, "--log-level", "warning")
    try:
        body = _json(server.url, "POST", "/v1/completions",
                     {"model": "tiny", "prompt": "w3", "max_tokens": 3, "temperature": 0})
        assert body["usage"]["completion_tokens"] <= 3 and body["model"] == "tiny"
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=60) == 0
    finally:
        server.stop()
    assert not any("llmc.serve:" in x and " 200 " in x for x in server.lines)   # warning level
