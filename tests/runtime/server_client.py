"""Raw HTTP against a running server (the standard library's client, no wrapper of ours),
for the server and bench tests; `serving`, an engine behind the real server."""

from __future__ import annotations

import contextlib
import http.client
import json
import time
import urllib.parse
from types import SimpleNamespace

import pytest


def request(url: str, method: str, path: str, body=None, headers=None, raw: bytes | None = None,
            timeout: float = 60):
    """(status, parsed JSON or text) of one request on a fresh connection."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    conn.request(method, path, data, {"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    payload = r.read().decode("utf-8", errors="replace")
    conn.close()
    try:
        return r.status, json.loads(payload)
    except json.JSONDecodeError:
        return r.status, payload


def metrics(url: str) -> dict[str, float]:
    """The /metrics samples by their full name with labels, e.g. 'llmc_kv_blocks_used' or
    'llmc_requests_finished_total{finish_reason="abort"}'."""
    status, text = request(url, "GET", "/metrics")
    assert status == 200
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def wait_idle(url: str, timeout: float = 30) -> dict[str, float]:
    """The metrics once nothing runs, waits or holds a KV block (aborts finish a step later)."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url)
        idle = (m["llmc_kv_blocks_used"] == 0 and m["llmc_num_requests_running"] == 0
                and m["llmc_num_requests_waiting"] == 0
                and m["llmc_num_requests_in_server"] == 0)
        if idle or time.monotonic() > deadline:
            return m
        time.sleep(0.05)


@contextlib.contextmanager
def serving(engine, name: str = "bytes", runner_options: dict | None = None, **options):
    """A Runner of `engine` (with runner_options) behind the real server on a loopback port,
    with the openai client (the test skips without the serve extra); options go to
    OpenAIServer."""
    openai = pytest.importorskip("openai")
    pytest.importorskip("uvicorn", reason="llmc serve needs the serve extra")
    from llmc.runtime.runner import Runner
    from llmc.runtime.server import OpenAIServer

    runner = Runner(engine, **(runner_options or {}))
    try:
        server = OpenAIServer(runner, name, **options)
        with server.running() as url:
            yield SimpleNamespace(client=openai.OpenAI(base_url=url + "/v1", api_key="x"),
                                  runner=runner, server=server, url=url, openai=openai)
    finally:
        runner.close()
