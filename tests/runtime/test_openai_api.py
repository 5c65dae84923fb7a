"""The OpenAI request checks and response shapes, without a server (test_server.py sends
the same over HTTP)."""

from __future__ import annotations

import pytest

from llmc.runtime import openai_api as api
from llmc.runtime.openai_api import ApiError


def chat(**fields):
    return api.parse_chat({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                           **fields})


def test_chat_messages_defaults_and_max_tokens():
    req = api.parse_chat({"model": "m", "messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text",
                                                                       "text": "b"}]}]})
    assert req.prompt == [{"role": "system", "content": "be brief"},
                          {"role": "user", "content": "ab"}]
    assert req.chat and req.params.temperature == 1.0 and req.logprobs is None
    assert req.sampling(10, 64).max_tokens == 54            # chat: the rest of the context
    assert chat(max_tokens=5, max_completion_tokens=7).sampling(10, 64).max_tokens == 7
    assert chat(logprobs=True).logprobs == 0 and chat(logprobs=True, top_logprobs=3).logprobs == 3
    assert chat(temperature=0, seed=3, stop="x").params.stop == ("x",)


def test_completion_defaults_and_context():
    req = api.parse_completion({"model": "m", "prompt": ["w3"]})
    assert req.prompt == "w3" and req.sampling(3, 64).max_tokens == 16   # OpenAI's default
    assert req.sampling(60, 64).max_tokens == 4                          # ... within the room
    assert api.parse_completion({"model": "m", "prompt": [[5, 6]]}).prompt == [5, 6]
    with pytest.raises(ApiError, match="at most 63 prompt tokens") as e:
        req.sampling(64, 64)
    assert e.value.status == 400 and e.value.code == "context_length_exceeded"
    with pytest.raises(ApiError, match="'prompt' must be"):
        api.parse_completion({"model": "m", "prompt": [{"a": 1}]})
    with pytest.raises(ApiError, match="top_k must be") as e:
        api.parse_completion({"model": "m", "prompt": "x", "top_k": -1})
    assert e.value.param == "top_k"


def test_the_model_s_sampling_defaults_fill_what_a_request_leaves_out():
    defaults = {"temperature": 0.6, "top_p": 0.95, "top_k": 20}
    p = api.parse_chat({"model": "m", "messages": [{"role": "user", "content": "hi"}]},
                       defaults=defaults).params
    assert (p.temperature, p.top_p, p.top_k) == (0.6, 0.95, 20)
    p = api.parse_completion({"model": "m", "prompt": "x", "temperature": 0, "top_k": None},
                             defaults=defaults).params
    assert (p.temperature, p.top_p, p.top_k) == (0, 0.95, 20)   # null: not given
    assert chat().params.temperature == 1.0 and chat().params.top_k == 0   # OpenAI's


def test_logprob_shapes():
    text = {5: "a", 6: "bc", 7: "d"}.get
    entries = [(-0.5, [(5, -0.5), (7, -1.0)]), (-0.1, [(6, -0.1), (5, -3.0)]), (-0.2, None)]
    lp = api.completion_logprobs(entries, text, [5, 6, 7], offset=4)   # 7: a stop token
    assert lp == {"tokens": ["a", "bc", "d"], "token_logprobs": [-0.5, -0.1, -0.2],
                  "top_logprobs": [{"a": -0.5, "d": -1.0}, {"bc": -0.1, "a": -3.0}, {}],
                  "text_offset": [4, 5, 7]}
    lp = api.completion_logprobs([None] + entries[:1], text, [6, 5])   # echo: the prompt's
    assert lp["token_logprobs"] == [None, -0.5] and lp["top_logprobs"][0] is None
    lp = api.chat_logprobs(entries[:1], text, [5])
    assert lp == {"content": [{"token": "a", "logprob": -0.5, "bytes": [97], "top_logprobs": [
        {"token": "a", "logprob": -0.5, "bytes": [97]},
        {"token": "d", "logprob": -1.0, "bytes": [100]}]}]}
    assert api.usage(3, 4, 1) == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7,
                                  "prompt_tokens_details": {"cached_tokens": 1}}
