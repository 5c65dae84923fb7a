"""The OpenAI-compatible server, real: uvicorn on a loopback port (a thread of this process),
the real `openai` client and raw HTTP. Outputs equal the Runner's for the same request."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import urllib.parse
from types import SimpleNamespace

import pytest
from server_client import request, wait_idle

from llmc.runtime.runner import Runner
from llmc.runtime.sampler import SamplingParams

openai = pytest.importorskip("openai")
from llmc.runtime.server import OpenAIServer  # noqa: E402

KEY = "sk-test"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def served(tiny_chat_engine):
    runner = Runner(tiny_chat_engine)
    server = OpenAIServer(runner, "tiny", api_key=KEY, max_body_bytes=1 << 16)
    with server.running() as url:
        yield SimpleNamespace(url=url, runner=runner, server=server,
                              client=openai.OpenAI(base_url=url + "/v1", api_key=KEY))
    runner.close()


def solo(runner, prompt, chat=False, **params):
    """What the Runner alone makes of the request."""
    return runner.complete([prompt], SamplingParams(**params), chat=chat)[0]


def test_completions_and_chat_equal_the_runner(served):
    client, runner = served.client, served.runner
    want = solo(runner, "w3 w4 w5", max_tokens=8)
    r = client.completions.create(model="tiny", prompt="w3 w4 w5", max_tokens=8, temperature=0)
    assert r.choices[0].text == want.text and r.choices[0].finish_reason == want.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (3, len(want.token_ids))
    assert r.usage.total_tokens == 3 + len(want.token_ids) and r.id.startswith("cmpl-")

    chunks = list(client.completions.create(model="tiny", prompt="w3 w4 w5", max_tokens=8,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.token_ids)
    assert [c.choices[0].finish_reason for c in chunks[:-1]][-1] == want.finish_reason

    messages = [{"role": "system", "content": "w7"}, {"role": "user", "content": "w9 w10"}]
    want = solo(runner, messages, chat=True, max_tokens=6)
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6,
                                       temperature=0)
    assert r.choices[0].message.content == want.text and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(runner.encode(messages, chat=True)) == want.prompt_tokens
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=6,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    assert all(c.usage is None for c in chunks)   # no include_usage: no usage chunk

    # max_tokens left out: chat may use the rest of the context (64 tokens here)
    r = client.chat.completions.create(model="tiny", messages=messages, temperature=0)
    assert r.usage.prompt_tokens + r.usage.completion_tokens <= 64


def test_stop_seed_penalties_and_logprobs(served):
    client, runner = served.client, served.runner
    want = solo(runner, "w3 w4 w5", max_tokens=8)
    stop = want.text.split()[2]   # a word the greedy output reaches
    r = client.completions.create(model="tiny", prompt="w3 w4 w5", max_tokens=8, temperature=0,
                                  stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == want.text[:want.text.index(stop)]

    sampled = dict(max_tokens=8, temperature=0.9, top_p=0.9, seed=7, presence_penalty=0.5,
                   frequency_penalty=0.3)
    want = solo(runner, "w3 w4", **sampled)
    texts = {client.completions.create(model="tiny", prompt="w3 w4", **sampled).choices[0].text
             for _ in range(2)}
    assert texts == {want.text}

    want = solo(runner, "w3 w4", max_tokens=4, logprobs=2)
    r = client.completions.create(model="tiny", prompt="w3 w4", max_tokens=4, temperature=0,
                                  logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(want.token_ids) and all(len(t) == 2 for t in lp.top_logprobs)
    assert lp.token_logprobs == pytest.approx([p for p, _ in want.logprobs[:len(lp.tokens)]])
    assert lp.tokens == r.choices[0].text.split()   # the word-level tokenizer: a token a word
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "w3"}],
                                       max_tokens=3, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert content and all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)


def test_echo_returns_the_prompt_and_its_logprobs(served):
    """What lm-evaluation-harness sends to score a continuation: the prompt as token ids,
    echo, logprobs 1, max_tokens 1, greedy; it reads token_logprobs and top_logprobs over
    the prompt's tokens."""
    client, runner = served.client, served.runner
    ids = runner.encode("w3 w4 w5 w6 w7")
    want = runner.complete([ids], SamplingParams(max_tokens=1, logprobs=1,
                                                 prompt_logprobs=1))[0]
    assert len(want.prompt_logprobs) == len(ids) and want.prompt_logprobs[0] is None
    r = client.completions.create(model="tiny", prompt=[ids], max_tokens=1, temperature=0,
                                  logprobs=1, echo=True)
    c = r.choices[0]
    assert c.text == runner.tokenizer.decode(ids, skip_special_tokens=False) + want.text
    lp = c.logprobs
    assert len(lp.tokens) == len(ids) + 1 and lp.token_logprobs[0] is None
    assert lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == [e[0] for e in want.prompt_logprobs[1:]] + \
        [want.logprobs[0][0]]
    for entry, top in zip(want.prompt_logprobs[1:], lp.top_logprobs[1:]):
        (token, value), = entry[1]
        assert top == {served.server._token_text(token): value}
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 1)

    # max_tokens 0: the prompt alone; a text prompt comes back as given
    r = client.completions.create(model="tiny", prompt="w3 w4 w5", max_tokens=0, echo=True,
                                  logprobs=0)
    c = r.choices[0]
    assert c.text == "w3 w4 w5" and c.finish_reason == "length"
    assert r.usage.completion_tokens == 0 and len(c.logprobs.tokens) == 3
    assert c.logprobs.token_logprobs[1:] == [e[0] for e in runner.complete(
        ["w3 w4 w5"], SamplingParams(max_tokens=0, prompt_logprobs=0))[0].prompt_logprobs[1:]]
    r = client.completions.create(model="tiny", prompt="w3 w4", max_tokens=0, echo=True)
    assert r.choices[0].text == "w3 w4" and r.choices[0].logprobs is None

    # a stop token that ends the completion has its entry (one a sampled token): the
    # greedy first token made a stop token
    first = solo(runner, "w3 w4 w5", max_tokens=1).token_ids[0]
    r = client.completions.create(model="tiny", prompt="w3 w4 w5", max_tokens=2, temperature=0,
                                  logprobs=1, echo=True, extra_body={"stop_token_ids": [first]})
    c = r.choices[0]
    assert c.text == "w3 w4 w5" and c.finish_reason == "stop"
    assert len(c.logprobs.tokens) == 4 == len(c.logprobs.token_logprobs)
    assert c.logprobs.tokens[-1] == served.server._token_text(first)

    # streamed: the prompt's chunk first, then the completion's
    want = solo(runner, "w3 w4 w5", max_tokens=4)
    chunks = list(client.completions.create(model="tiny", prompt="w3 w4 w5", max_tokens=4,
                                            temperature=0, echo=True, logprobs=0,
                                            stream=True))
    assert chunks[0].choices[0].text == "w3 w4 w5"
    assert chunks[0].choices[0].logprobs.token_logprobs[0] is None
    assert "".join(c.choices[0].text for c in chunks) == "w3 w4 w5" + want.text
    assert sum(len(c.choices[0].logprobs.tokens) for c in chunks
               if c.choices[0].logprobs) == 3 + len(want.token_ids)


def test_n_samples_and_a_batch_of_prompts(served):
    """A choice a prompt and sample, indexed prompt-major; each equals the Runner's request
    with that prompt and seed (the request's seed + j for sample j); usage counts each prompt
    once and every choice's tokens."""
    client, runner = served.client, served.runner
    prompts = ["w3 w4 w5", "w9 w8"]
    r = client.completions.create(model="tiny", prompt=prompts, n=3, max_tokens=5, seed=7,
                                  temperature=1.0, logprobs=0)
    assert [c.index for c in r.choices] == list(range(6))
    for c in r.choices:
        want = solo(runner, prompts[c.index // 3], max_tokens=5, seed=7 + c.index % 3,
                    temperature=1.0)
        assert c.text == want.text and len(c.logprobs.tokens) == len(want.token_ids)
    assert len({c.text for c in r.choices[:3]}) > 1   # the samples differ
    assert r.usage.prompt_tokens == 5
    assert r.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in r.choices)

    chunks = list(client.completions.create(model="tiny", prompt=prompts, n=2, max_tokens=4,
                                            seed=3, temperature=1.0, stream=True,
                                            stream_options={"include_usage": True}))
    texts = {}
    for ch in chunks[:-1]:
        texts[ch.choices[0].index] = texts.get(ch.choices[0].index, "") + ch.choices[0].text
    assert texts == {i: solo(runner, prompts[i // 2], max_tokens=4, seed=3 + i % 2,
                             temperature=1.0).text for i in range(4)}
    assert chunks[-1].usage.prompt_tokens == 5

    messages = [{"role": "user", "content": "w9 w10"}]
    r = client.chat.completions.create(model="tiny", messages=messages, n=2, max_tokens=4,
                                       temperature=0)
    want = solo(runner, messages, chat=True, max_tokens=4)
    assert [c.message.content for c in r.choices] == [want.text] * 2
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, n=2,
                                                 max_tokens=4, temperature=0, stream=True))
    for i in range(2):
        mine = [ch.choices[0].delta for ch in chunks if ch.choices[0].index == i]
        assert mine[0].role == "assistant"
        assert "".join(d.content or "" for d in mine) == want.text


def test_logit_bias(served):
    """OpenAI's {token id: bias}: +100 makes a greedy completion that token throughout, and
    -100 on the greedy first token makes it another; as the Runner's requests with it."""
    client, runner = served.client, served.runner
    forced = solo(runner, "w3 w4 w5", max_tokens=4, logit_bias={9: 100})
    assert forced.token_ids == [9] * 4
    r = client.completions.create(model="tiny", prompt="w3 w4 w5", max_tokens=4,
                                  temperature=0, logit_bias={"9": 100})
    assert r.choices[0].text == forced.text
    messages = [{"role": "user", "content": "w3 w4 w5"}]
    first = solo(runner, messages, chat=True, max_tokens=1).token_ids[0]
    banned = solo(runner, messages, chat=True, max_tokens=3, logit_bias={first: -100})
    assert banned.token_ids[0] != first
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=3,
                                       temperature=0, logit_bias={str(first): -100})
    assert r.choices[0].message.content == banned.text


def test_tokenizer_endpoints(served):
    """vLLM's /tokenize, /detokenize and /tokenizer_info (lm-evaluation-harness's remote
    tokenizer reads them): the Runner's tokens and texts, no API key needed, bad bodies a
    400."""
    runner, url = served.runner, served.url
    status, got = request(url, "POST", "/tokenize", {"prompt": "w3 w4 w5"})
    assert status == 200 and got["tokens"] == runner.encode("w3 w4 w5")
    assert got["count"] == 3 and got["max_model_len"] == 64
    messages = [{"role": "user", "content": "w9 w10"}]
    status, got = request(url, "POST", "/tokenize", {"messages": messages})
    assert status == 200 and got["tokens"] == runner.encode(messages, chat=True)
    status, got = request(url, "POST", "/detokenize", {"tokens": runner.encode("w3 w4")})
    assert status == 200 and got["prompt"] == runner.tokenizer.decode(runner.encode("w3 w4"))
    status, info = request(url, "GET", "/tokenizer_info")
    assert status == 200 and info["chat_template"] == runner.chat_template
    assert info["eos_token"] is None and not runner.eos_ids   # SmolLM2's: tests/cli
    for path, body, words in (("/tokenize", {"prompt": 5}, "'prompt' (a string)"),
                              ("/tokenize", {"messages": []}, "messages is empty"),
                              ("/tokenize", {"prompt": "w3 \ud800"}, "cannot be tokenized"),
                              ("/detokenize", {"tokens": [99999]}, "list of token ids"),
                              ("/detokenize", [1], "list of token ids")):
        status, got = request(url, "POST", path, body)
        assert status == 400 and words in got["error"]["message"], (path, got)


def test_async_client_concurrent_requests(served):
    prompts = [f"w{i} w{i + 1}" for i in range(3, 11)]
    want = served.runner.complete(prompts, SamplingParams(max_tokens=6))

    async def one(client, prompt, stream):
        if not stream:
            r = await client.completions.create(model="tiny", prompt=prompt, max_tokens=6,
                                                temperature=0)
            return r.choices[0].text
        text = ""
        async for chunk in await client.completions.create(model="tiny", prompt=prompt,
                                                           max_tokens=6, temperature=0,
                                                           stream=True):
            text += chunk.choices[0].text
        return text

    async def main():
        async with openai.AsyncOpenAI(base_url=served.url + "/v1", api_key=KEY) as client:
            return await asyncio.gather(*(one(client, p, i % 2 == 1)
                                          for i, p in enumerate(prompts)))
    assert asyncio.run(main()) == [w.text for w in want]


def test_models_health_and_metrics(served):
    status, body = request(served.url, "GET", "/v1/models", headers=AUTH)
    assert status == 200 and body["data"][0]["id"] == "tiny"
    assert body["data"][0]["max_model_len"] == 64
    assert [m.id for m in served.client.models.list()] == ["tiny"]
    assert request(served.url, "GET", "/health") == (200, {"status": "ok"})
    before = wait_idle(served.url)   # the previous tests' streams are closed and counted
    served.client.completions.create(model="tiny", prompt="w3 w4", max_tokens=5,
                                     temperature=0, extra_body={"ignore_eos": True})
    after = wait_idle(served.url)
    assert after["llmc_generation_tokens_total"] - before["llmc_generation_tokens_total"] == 5
    assert after["llmc_prompt_tokens_total"] - before["llmc_prompt_tokens_total"] == 2
    code = 'llmc_http_requests_total{code="200",endpoint="completions"}'
    assert after[code] - before.get(code, 0) == 1
    for name in ("llmc_time_to_first_token_seconds_count", "llmc_e2e_request_latency_seconds"
                 "_count", "llmc_time_per_output_token_seconds_count"):
        assert after[name] - before.get(name, 0) == 1
    assert after["llmc_kv_blocks_total"] > 0 and after["llmc_kv_blocks_used"] == 0
    # the same 20-token prompt twice: the second finds two full 8-token blocks cached
    prompt = " ".join(f"w{i}" for i in range(40, 60))
    usage = [served.client.completions.create(model="tiny", prompt=prompt, max_tokens=1).usage
             for _ in range(2)]
    assert usage[1].prompt_tokens_details.cached_tokens == 16
    m = wait_idle(served.url)
    assert m["llmc_prefix_cache_hits_total"] - after["llmc_prefix_cache_hits_total"] == 16
    assert m["llmc_prefix_cache_hit_rate"] > 0
    for name in ("llmc_prefix_cache_hit_rate", "llmc_num_preemptions_total",
                 "llmc_prefix_cache_queries_total"):
        assert name in after


LONG = "w3 " * 70            # beyond the engine's max_seq_len of 64
OK_BODY = {"model": "tiny", "prompt": "w3 w4", "max_tokens": 2}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "w3"}], "max_tokens": 2}
BAD = [   # (name, path, body or raw bytes, headers, status, words in the message)
    ("malformed JSON", "c", b'{"model": "tiny", ', AUTH, 400, "not valid JSON"),
    ("not an object", "c", [1, 2], AUTH, 400, "JSON object"),
    ("non-UTF-8 bytes", "c", b'{"model": "tiny", "prompt": "w3 \xff"}', AUTH, 400, "UTF-8"),
    ("wrong type", "c", {**OK_BODY, "max_tokens": "5"}, AUTH, 400, "'max_tokens' must be"),
    ("negative max_tokens", "c", {**OK_BODY, "max_tokens": -1}, AUTH, 400, "max_tokens"),
    ("temperature out of range", "c", {**OK_BODY, "temperature": 3}, AUTH, 400, "temperature"),
    ("top_p out of range", "c", {**OK_BODY, "top_p": 0}, AUTH, 400, "top_p"),
    ("penalty out of range", "c", {**OK_BODY, "presence_penalty": 5}, AUTH, 400,
     "presence_penalty"),
    ("n of 0", "c", {**OK_BODY, "n": 0}, AUTH, 400, "n must be at least 1"),
    ("n x prompts > 128", "c", {**OK_BODY, "prompt": ["w3", "w4"], "n": 65}, AUTH, 400,
     "at most 128 choices"),
    ("best_of other than n", "c", {**OK_BODY, "n": 2, "best_of": 3}, AUTH, 400,
     "best_of must equal n"),
    ("no role", "chat", {**CHAT, "messages": [{"content": "w3"}]}, AUTH, 400, "role"),
    ("content not text", "chat", {**CHAT, "messages": [{"role": "user", "content": 5}]}, AUTH,
     400, "content"),
    ("empty messages", "chat", {**CHAT, "messages": []}, AUTH, 400, "messages is empty"),
    ("missing prompt", "c", {"model": "tiny"}, AUTH, 400, "'prompt' is required"),
    ("empty prompt", "c", {**OK_BODY, "prompt": ""}, AUTH, 400, "empty"),
    ("an empty prompt in a batch", "c", {**OK_BODY, "prompt": ["w3", ""]}, AUTH, 400,
     "prompt 1 is empty"),
    ("token outside vocab", "c", {**OK_BODY, "prompt": [5, 999]}, AUTH, 400, "vocabulary"),
    ("unknown model", "c", {**OK_BODY, "model": "gpt-9"}, AUTH, 404, "does not exist"),
    ("no API key", "c", OK_BODY, {}, 401, "API key"),
    ("wrong API key", "c", OK_BODY, {"Authorization": "Bearer nope"}, 401, "API key"),
    ("oversized body", "c", {**OK_BODY, "prompt": "w3 " * 30000}, AUTH, 413, "larger than"),
    ("prompt beyond max_seq_len", "c", {**OK_BODY, "prompt": LONG}, AUTH, 400, "at most 63"),
    ("prompt + max_tokens beyond", "c", {**OK_BODY, "max_tokens": 63}, AUTH, 400, "context"),
    ("JSON nested too deep", "c", b"[" * 30000 + b"]" * 30000, AUTH, 400, "nests"),
    ("unknown field", "c", {**OK_BODY, "frobnicate": 1}, AUTH, 400, "unrecognized"),
    ("stop list too long", "c", {**OK_BODY, "stop": [f"w{i}" for i in range(17)]}, AUTH, 400,
     "stop"),
    ("logprobs out of range", "c", {**OK_BODY, "logprobs": 21}, AUTH, 400, "logprobs"),
    ("top_logprobs out of range", "chat", {**CHAT, "logprobs": True, "top_logprobs": 30}, AUTH,
     400, "top_logprobs"),
    ("stream_options without stream", "c", {**OK_BODY, "stream_options": {"include_usage": 1}},
     AUTH, 400, "stream"),
    ("a tool without its function", "chat", {**CHAT, "tools": [{"type": "function"}]}, AUTH,
     400, "tools[0] must be"),
    ("min_tokens > max_tokens", "c", {**OK_BODY, "min_tokens": 5}, AUTH, 400, "min_tokens"),
    ("max_tokens 0 without echo", "c", {**OK_BODY, "max_tokens": 0}, AUTH, 400,
     "0 only with echo"),
    ("logit_bias key not a token id", "c", {**OK_BODY, "logit_bias": {"w3": 1}}, AUTH, 400,
     "logit_bias must map token ids"),
    ("logit_bias out of range", "c", {**OK_BODY, "logit_bias": {"5": 300}}, AUTH, 400,
     "biases in [-100, 100]"),
    ("logit_bias outside the vocab", "c", {**OK_BODY, "logit_bias": {"99999": 1}}, AUTH, 400,
     "outside the vocabulary"),
]


@pytest.mark.parametrize("name,path,body,headers,status,words", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_are_4xx_json(served, name, path, body, headers, status, words):
    path = "/v1/completions" if path == "c" else "/v1/chat/completions"
    raw = body if isinstance(body, bytes) else None
    got, answer = request(served.url, "POST", path, body, headers, raw)
    assert got == status, answer
    error = answer["error"]
    assert words in error["message"] and isinstance(error["type"], str)


def test_the_server_keeps_serving_after_bad_requests(served):
    for _, path, body, headers, _, _ in BAD:
        request(served.url, "POST", "/v1/completions" if path == "c"
                else "/v1/chat/completions", None if isinstance(body, bytes) else body,
                headers, body if isinstance(body, bytes) else None)
    status, body = request(served.url, "GET", "/nowhere")
    assert status == 404 and "error" in body
    status, body = request(served.url, "GET", "/v1/completions", headers=AUTH)
    assert status == 405 and "error" in body
    assert request(served.url, "GET", "/health")[0] == 200
    status, body = request(served.url, "POST", "/v1/completions", OK_BODY, AUTH)
    assert status == 200 and body["usage"]["prompt_tokens"] == 2
    assert wait_idle(served.url)["llmc_kv_blocks_used"] == 0


def _open(url: str, path: str, body: dict) -> socket.socket:
    """Send a request and return the socket without reading the answer."""
    u = urllib.parse.urlsplit(url)
    sock = socket.create_connection((u.hostname, u.port))
    data = json.dumps(body).encode()
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
                 .encode() + data)
    return sock


def test_a_client_that_leaves_aborts_its_request(served):
    before = wait_idle(served.url)   # the previous tests' streams are closed and counted
    # streaming: read the first event, then hang up
    sock = _open(served.url, "/v1/completions", {**OK_BODY, "max_tokens": 60, "stream": True,
                                                 "ignore_eos": True})
    received = b""
    while b"data:" not in received:
        received += sock.recv(4096)
    sock.close()
    # not streaming: hang up while the engine works on it
    sock = _open(served.url, "/v1/chat/completions", {**CHAT, "max_tokens": 60,
                                                       "ignore_eos": True})
    sock.close()
    after = wait_idle(served.url)
    abort = 'llmc_requests_finished_total{finish_reason="abort"}'
    assert after.get(abort, 0) - before.get(abort, 0) >= 1
    assert after["llmc_kv_blocks_used"] == 0
    # neither ran to its 60 tokens
    assert after["llmc_generation_tokens_total"] - before["llmc_generation_tokens_total"] < 120


def test_a_full_queue_is_429(served):
    server = OpenAIServer(served.runner, "tiny", max_queue=0)   # room for 16 requests
    with server.running() as url:
        async def main():
            async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x",
                                          max_retries=0) as client:
                async def one(i):
                    try:
                        await client.completions.create(model="tiny", prompt=f"w{i + 3}",
                                                        max_tokens=60, temperature=0,
                                                        extra_body={"ignore_eos": True})
                        return 200
                    except openai.RateLimitError as e:
                        assert "queue is full" in e.message
                        return 429
                return await asyncio.gather(*(one(i) for i in range(48)))
        codes = asyncio.run(main())
        assert 429 in codes and codes.count(200) >= 16
        assert wait_idle(url)["llmc_kv_blocks_used"] == 0


def test_load_200_streams_some_leaving(served):
    """200 concurrent streaming requests of random lengths, 10% of clients leaving midway:
    every completed stream equals its solo greedy run, no KV block leaks, still healthy.
    (A few seconds on the tiny model, so not marked slow.)"""
    rng = random.Random(0)
    prompts = [" ".join(f"w{rng.randrange(3, 128)}" for _ in range(rng.randrange(1, 12)))
               for _ in range(20)]
    jobs = [(rng.choice(prompts), rng.choice([2, 5, 9, 16]), i % 10 == 0) for i in range(200)]
    want = {(p, n): solo(served.runner, p, max_tokens=n).text for p, n, _ in set(jobs)}

    async def one(client, prompt, n, leave):
        stream = await client.completions.create(model="tiny", prompt=prompt, max_tokens=n,
                                                 temperature=0, stream=True)
        text, reason = "", None
        async for chunk in stream:
            text += chunk.choices[0].text
            reason = chunk.choices[0].finish_reason or reason
            if leave:
                await stream.close()
                return None
        return text, reason

    async def main():
        async with openai.AsyncOpenAI(base_url=served.url + "/v1", api_key=KEY,
                                      max_retries=0, timeout=120) as client:
            return await asyncio.gather(*(one(client, *job) for job in jobs))
    results = asyncio.run(main())
    for (prompt, n, leave), got in zip(jobs, results):
        if not leave:
            assert got[0] == want[prompt, n] and got[1] in ("stop", "length")
    m = wait_idle(served.url)
    assert m["llmc_kv_blocks_used"] == 0 and m["llmc_num_requests_in_server"] == 0
    assert request(served.url, "GET", "/health")[0] == 200


def test_the_model_s_sampling_defaults_where_a_request_gives_none(tiny_models, tmp_path,
                                                                   capsys):
    """A checkpoint's generation_config.json top_k 1 makes a request that gives no sampling
    settings greedy (as vLLM's --generation-config auto does); --generation-config none
    samples at OpenAI's defaults. The engine keeps the settings; `llmc inspect` shows them."""
    import shutil

    from llmc.build import BuildOptions, build
    from llmc.cli.main import main
    from llmc.limits import BuildLimits

    folder = tmp_path / "model"
    shutil.copytree(tiny_models["llama-gqa"][0], folder)
    (folder / "generation_config.json").write_text(json.dumps({"top_k": 1, "do_sample": True}))
    out = tmp_path / "tiny.engine"
    build(BuildOptions(folder, out, backend="reference", dtype="fp32",
                       limits=BuildLimits(2, 32, 32, 8)), log=lambda _: None)
    with pytest.raises(SystemExit):
        main(["inspect", str(out)])
    assert "sampling: top_k 1 (the model's defaults" in capsys.readouterr().out

    runner = Runner(out)
    greedy = solo(runner, [5, 6, 7], max_tokens=8, ignore_eos=True).text
    body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 8, "ignore_eos": True,
            "seed": 1}
    texts = {}
    for config in ("auto", "none"):
        server = OpenAIServer(runner, "tiny", generation_config=config)
        with server.running() as url:
            status, got = request(url, "POST", "/v1/completions", body)
            assert status == 200
            texts[config] = got["choices"][0]["text"]
    runner.close()
    assert texts["auto"] == greedy and texts["none"] != greedy
