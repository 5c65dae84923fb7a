"""Structured outputs (runtime/structured.py) on a real engine: a tiny random Llama with a
byte-level tokenizer, built for the reference backend. Random weights make random text, so
every constrained output is a test of the constraint alone: it must parse, match or be one
of the choices. Greedy constrained tokens are checked against HF transformers' logits
masked by llguidance's own numpy reference; the server is real, with the openai client."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import numpy as np
import pytest

from llmc.build import BuildOptions, build
from llmc.engine_file import EngineFile
from llmc.errors import LlmcError
from llmc.limits import BuildLimits
from llmc.runtime import openai_api as api
from llmc.runtime.engine import LLMEngine
from llmc.runtime.runner import Runner, open_session
from llmc.runtime.sampler import SamplingParams
from llmc.runtime.structured import Grammars, StructuredOutputsParams

llguidance = pytest.importorskip("llguidance")

# Bounded whatever the model picks: a random model would otherwise write strings (or, with
# JSON's free whitespace, blanks) for as long as max_tokens lets it.
SCHEMA = {"type": "object",
          "properties": {"answer": {"enum": ["yes", "no"]},
                         "n": {"type": "integer", "minimum": 0, "maximum": 99},
                         "ok": {"type": "boolean"},
                         "tags": {"type": "array", "items": {"enum": ["a", "b"]},
                                  "maxItems": 3}},
          "required": ["answer", "n", "ok", "tags"], "additionalProperties": False,
          "x-guidance": {"whitespace_flexible": False}}


def valid(text: str) -> bool:
    value = json.loads(text)
    return (set(value) == {"answer", "n", "ok", "tags"} and value["answer"] in ("yes", "no")
            and type(value["n"]) is int and 0 <= value["n"] <= 99
            and type(value["ok"]) is bool and len(value["tags"]) <= 3
            and set(value["tags"]) <= {"a", "b"})


@pytest.fixture(scope="module")
def engine(byte_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("structured") / "bytes.engine"
    build(BuildOptions(byte_model[0], out, backend="reference", dtype="fp32",
                       limits=BuildLimits(4, 64, 128, 16)), log=lambda _: None)
    return out


@pytest.fixture(scope="module")
def runner(engine):
    r = Runner(engine)
    yield r
    r.close()


def constrained(**kind) -> StructuredOutputsParams:
    return StructuredOutputsParams(**kind)


# ---- the settings -------------------------------------------------------------------------

BAD = {
    "none": (dict(), "exactly one of json, json_object, regex, choice, grammar; got none"),
    "two": (dict(regex="a", choice=["a"]), "got regex, choice"),
    "schema of an unknown type": (dict(json={"type": "foo"}), "json: Invalid type: foo"),
    "schema not JSON": (dict(json="{oops"), "json: not JSON text"),
    "regex": (dict(regex="a(b"), "regex: .*unclosed group"),
    "grammar": (dict(grammar='start: "a" | b'), 'grammar: .*unknown name: "b"'),
    "empty choice": (dict(choice=[]), "choice must be a non-empty list"),
    "choice of an empty string": (dict(choice=["a", ""]), "choice must be a non-empty list"),
    "regex not a string": (dict(regex=3), "regex must be a string, got int"),
    "json_object false": (dict(json_object=False, regex="a"), None),   # False is "not given"
}


@pytest.mark.parametrize("fields, message", BAD.values(), ids=BAD)
def test_a_bad_constraint_names_what_is_wrong(fields, message):
    spec = StructuredOutputsParams(**fields)
    if message is None:
        spec.validate()
        return
    with pytest.raises(LlmcError, match=message):
        spec.validate()
    with pytest.raises(LlmcError, match=message):   # through the request's settings too
        SamplingParams(structured_outputs=spec).validate()


def test_settings_from_a_request_body():
    params = SamplingParams.from_dict({"structured_outputs": {"json": SCHEMA}, "seed": 1})
    assert params.structured_outputs == StructuredOutputsParams(json=json.dumps(SCHEMA))
    assert not params.needs_host   # a GPU session bans the masked tokens itself
    with pytest.raises(LlmcError, match="unknown field.*jsn"):
        SamplingParams.from_dict({"structured_outputs": {"jsn": {}}})
    with pytest.raises(LlmcError, match="min_tokens cannot be combined"):
        SamplingParams(min_tokens=2, structured_outputs=constrained(regex="a+")).validate()


def test_masks_equal_llguidance_s_reference(byte_tokenizer):
    """Grammars.masks and apply against llguidance.numpy's own bitmask and apply functions,
    row by row, for three constraints in one batch at different points of their outputs."""
    import llguidance.numpy as lnp

    tok = byte_tokenizer
    vocab = len(tok) + 12   # engines often pad the vocabulary: those ids are never allowed
    grammars = Grammars(tok.backend_tokenizer.to_str(), vocab, [tok.eos_token_id])
    specs = [constrained(json=SCHEMA), constrained(regex="[a-c]{2,4}-[0-9]{3}"),
             constrained(choice=["Paris", "Rome"])]
    prefixes = ['{"answer":"y', "ab", ""]   # no free whitespace in SCHEMA
    matchers, references = [], []
    for spec, prefix in zip(specs, prefixes):
        m = grammars.matcher(spec)
        assert m.consume_tokens(tok(prefix)["input_ids"])
        matchers.append(m)
        references.append(m.deep_copy())
    logits = np.random.default_rng(0).standard_normal((5, vocab)).astype(np.float32)
    want = logits.copy()
    rows = [0, 2, 4]
    grammars.apply(logits, rows, grammars.masks(matchers).result())
    for row, ref in zip(rows, references):
        bitmask = lnp.allocate_token_bitmask(1, vocab)
        lnp.fill_next_token_bitmask(ref, bitmask)
        lnp.apply_token_bitmask_inplace(want[row], bitmask)
    np.testing.assert_array_equal(logits, want)   # rows 1 and 3 untouched too
    assert np.isfinite(logits[4]).sum() == 3      # "P", "Pa" and "R" begin the choices
    assert not np.isfinite(logits[0, len(tok):]).any()


# ---- on the engine ------------------------------------------------------------------------

def test_sampled_json_always_parses_and_fits_the_schema(runner):
    params = SamplingParams(1.0, seed=0, max_tokens=96,
                            structured_outputs=constrained(json=SCHEMA))
    results = runner.complete(["{"] * 3 + ["The capital of France is"] * 3, params)
    assert [r.finish_reason for r in results] == ["stop"] * 6
    assert all(valid(r.text) for r in results), [r.text for r in results]
    assert len({r.text for r in results}) > 1   # sampled, not one forced string


@pytest.mark.parametrize("spec, check, endless", [
    (dict(regex=r"[a-c]{2,4}-[0-9]{3}"), lambda t: re.fullmatch(r"[a-c]{2,4}-[0-9]{3}", t),
     False),
    (dict(choice=["Paris", "Rome", "no idea"]), lambda t: t in ("Paris", "Rome", "no idea"),
     False),
    (dict(grammar='start: item ("," item)*\nitem: "x" | "yy" | NUMBER\nNUMBER: /[0-9]/'),
     lambda t: re.fullmatch(r"(x|yy|[0-9])(,(x|yy|[0-9]))*", t), True),
    (dict(grammar='root ::= "yes" | "no" | "maybe " [0-9]'),   # GBNF, llama.cpp's
     lambda t: re.fullmatch(r"yes|no|maybe [0-9]", t), False),
], ids=["regex", "choice", "lark", "gbnf"])
def test_regex_choice_and_grammars(runner, spec, check, endless):
    """Each output matches; it ends when complete, unless the language has no longest
    sentence (the Lark list), where max_tokens may end it first."""
    params = SamplingParams(1.0, seed=1, max_tokens=40, structured_outputs=constrained(**spec))
    for r in runner.complete(["Paris", "w", "The capital"] * 2, params):
        assert r.finish_reason == "stop" or (endless and r.finish_reason == "length")
        if r.finish_reason == "stop":
            assert check(r.text), r.text


def test_greedy_picks_the_model_s_best_allowed_token(runner, byte_model, byte_tokenizer):
    """Each greedy token is the argmax of HF's logits over what the constraint allows next
    (llguidance's numpy reference masks them; a fresh matcher follows the tokens)."""
    import llguidance.numpy as lnp
    import torch

    tok = byte_tokenizer
    prompt = tok("The capital of France is")["input_ids"]
    spec = constrained(json=SCHEMA)
    got = runner.complete([prompt], SamplingParams(max_tokens=64, structured_outputs=spec))[0]
    assert got.finish_reason == "stop" and valid(got.text)
    eos = tok.eos_token_id   # the engine's stop token, not in token_ids: the argmax too
    matcher = Grammars(tok.backend_tokenizer.to_str(), len(tok), [eos]).matcher(spec)
    model = byte_model[1]
    ids = list(prompt)
    for token in got.token_ids + [eos]:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].numpy().copy()
        bitmask = lnp.allocate_token_bitmask(1, len(tok))
        lnp.fill_next_token_bitmask(matcher, bitmask)
        lnp.apply_token_bitmask_inplace(logits, bitmask)
        assert int(np.argmax(logits)) == token
        assert matcher.consume_token(token)
        ids.append(token)
    assert matcher.is_stopped()


def test_constrained_and_free_requests_share_steps(engine, byte_tokenizer):
    """A constrained request in a batch masks its own row only: the free requests' seeded
    outputs equal their runs alone, and a pool too small for the batch preempts without
    losing the constraint's place."""
    free = SamplingParams(1.0, seed=5, max_tokens=30, ignore_eos=True)
    json_ = SamplingParams(1.0, seed=6, max_tokens=64, structured_outputs=constrained(
        json=SCHEMA))
    prompts = [("Paris is", free), ("{", json_), ("Rome", free), ("The", json_)]

    def run(num_kv_blocks=None, only=None):
        e = EngineFile(engine)
        eng = LLMEngine(open_session(e), e.header, num_kv_blocks=num_kv_blocks)
        ids = [eng.add_request(p, s) for p, s in (prompts if only is None else [only])]
        outs = {rid: [] for rid in ids}
        while eng.has_unfinished():
            for out in eng.step():
                outs[out.request_id] += out.token_ids
        return [outs[r] for r in ids], eng.scheduler.num_preemptions

    together, _ = run()
    alone = [run(only=p)[0][0] for p in prompts]
    assert together == alone
    tok = byte_tokenizer
    assert all(valid(tok.decode(together[i])) for i in (1, 3))
    squeezed, preemptions = run(num_kv_blocks=6)
    assert preemptions > 0 and squeezed == together


def test_logprobs_are_of_the_masked_distribution(runner, byte_tokenizer):
    """vLLM's rule: the constraint's mask comes before the logprobs, so every top-n
    alternative is a token the constraint allows there."""
    tok = byte_tokenizer
    params = SamplingParams(max_tokens=8, logprobs=5,
                            structured_outputs=constrained(choice=["Paris", "Rome"]))
    r = runner.complete(["The capital"], params)[0]
    assert r.text in ("Paris", "Rome")
    first_logprob, first_top = r.logprobs[0][0], dict(r.logprobs[0][1])
    allowed = {t for t in range(len(tok)) if tok.decode([t]) and any(
        c.startswith(tok.decode([t])) for c in ("Paris", "Rome"))}
    assert 1 < len(allowed) < 5   # "P", "Pa", "R": the whole distribution fits the top-5
    assert set(first_top) == allowed and np.isfinite(first_logprob)
    assert np.isclose(sum(np.exp(list(first_top.values()))), 1.0, atol=1e-5)


def test_a_bad_constraint_fails_its_request_alone(engine):
    e = EngineFile(engine)
    eng = LLMEngine(open_session(e), e.header)
    good = eng.add_request("The", SamplingParams(max_tokens=4, ignore_eos=True))
    bad = eng.add_request("The", SamplingParams(structured_outputs=constrained(regex="(")))
    done = {}
    while eng.has_unfinished():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
    assert done[bad].finish_reason == "error" and "structured_outputs regex" in done[bad].error
    assert done[good].finish_reason == "length" and done[good].completion_tokens == 4


# ---- the OpenAI API -----------------------------------------------------------------------

def _parse(**body):
    return api.parse_chat({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                           **body}).params.structured_outputs


def test_response_format_and_structured_outputs_fields():
    assert _parse() is None and _parse(response_format={"type": "text"}) is None
    assert _parse(response_format={"type": "json_object"}) == constrained(json_object=True)
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "strict": True, "schema": SCHEMA}}
    assert _parse(response_format=fmt) == constrained(json=SCHEMA)
    assert _parse(structured_outputs={"choice": ["a", "b"]}) == constrained(choice=("a", "b"))
    completion = api.parse_completion({"model": "m", "prompt": "x",
                                       "response_format": {"type": "json_object"}})
    assert completion.params.structured_outputs == constrained(json_object=True)

    cases = [
        (dict(response_format={"type": "json_schema", "json_schema": {"name": "x"}}),
         "response_format", "needs json_schema.schema"),
        (dict(response_format={"type": "yaml"}), "response_format", "response_format must be"),
        (dict(response_format={"type": "json_object"}, structured_outputs={"regex": "a"}),
         "response_format", "not both"),
        (dict(response_format={"type": "json_schema", "json_schema": {
            "schema": {"type": "foo"}}}), "response_format",
         "response_format's schema: Invalid type: foo"),
        (dict(response_format={"type": "json_schema", "json_schema": {
            "schema": {"type": "array", "uniqueItems": True}}}), "response_format",
         'Unimplemented keys: ["uniqueItems"]'),
        (dict(structured_outputs={"regex": "("}), "structured_outputs", "regex"),
        (dict(structured_outputs={"jsn": {}}), "structured_outputs", "unknown field"),
        (dict(structured_outputs={"regex": "a"}, min_tokens=1), "min_tokens", "min_tokens"),
    ]
    for body, param, message in cases:
        with pytest.raises(api.ApiError) as e:
            _parse(**body)
        assert e.value.status == 400 and e.value.param == param and message in e.value.message


@pytest.fixture(scope="module")
def served(runner):
    openai = pytest.importorskip("openai")
    pytest.importorskip("uvicorn", reason="llmc serve needs the serve extra")
    from llmc.runtime.server import OpenAIServer

    server = OpenAIServer(runner, "bytes")
    with server.running() as url:
        yield SimpleNamespace(client=openai.OpenAI(base_url=url + "/v1", api_key="x"),
                              openai=openai)


def test_a_server_reads_the_tokenizer_into_llguidance_at_start(engine):
    """Once it listens, not on the engine's thread at the first constrained request, holding
    up the rest; and before it returns (a process exiting meanwhile may crash)."""
    pytest.importorskip("uvicorn", reason="llmc serve needs the serve extra")
    from llmc.runtime.server import OpenAIServer

    runner = Runner(engine)
    assert not runner.engine.grammars.warmed   # a Runner alone does not pay for it
    server = OpenAIServer(runner, "bytes")
    assert not runner.engine.grammars.warmed   # nor a server that has not started
    with server.running():
        pass
    assert runner.engine.grammars.warmed
    runner.close()


def test_the_server_holds_outputs_to_the_constraint(served):
    client = served.client
    fmt = {"type": "json_schema", "json_schema": {"name": "reply", "schema": SCHEMA}}
    r = client.chat.completions.create(model="bytes", max_tokens=96, temperature=0,
                                       messages=[{"role": "user", "content": "Reply"}],
                                       response_format=fmt)
    assert r.choices[0].finish_reason == "stop" and valid(r.choices[0].message.content)

    chunks = list(client.completions.create(
        model="bytes", prompt="The capital of France is", max_tokens=16, temperature=1.0,
        seed=3, n=4, stream=True, extra_body={"structured_outputs": {
            "choice": ["Paris", "Rome"]}}))
    texts = ["".join(c.choices[0].text for c in chunks if c.choices[0].index == i)
             for i in range(4)]
    assert all(t in ("Paris", "Rome") for t in texts), texts

    with pytest.raises(served.openai.BadRequestError) as e:
        client.completions.create(model="bytes", prompt="x", max_tokens=4,
                                  extra_body={"structured_outputs": {"regex": "a(b"}})
    assert "unclosed group" in str(e.value) and e.value.body["param"] == "structured_outputs"


def test_llmc_run_takes_a_constraint(engine, tmp_path, capsys):
    from llmc.cli.main import main

    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    cases = [(["--json-schema", schema], valid),
             (["--json-schema", json.dumps(SCHEMA)], valid),
             (["--regex", "[0-9]{3}-[a-z]{2}"], lambda t: re.fullmatch("[0-9]{3}-[a-z]{2}", t)),
             (["--choice", "Paris", "--choice", "Rome"], lambda t: t in ("Paris", "Rome"))]
    for args, check in cases:
        with pytest.raises(SystemExit) as done:
            main(["run", str(engine), "-p", "The", "-p", "{", "--json", "--temperature", "1",
                  "--seed", "2", "--max-new-tokens", "64", *map(str, args)])
        assert done.value.code in (0, None)
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert len(lines) == 2 and all(r["finish_reason"] == "stop" and check(r["text"])
                                       for r in lines), lines


@pytest.mark.slow
def test_smollm2_answers_in_json(smollm2_engine):
    """The real model, greedy, through its chat template: a JSON object, and an object of
    the schema, each complete ("stop") within the token budget."""
    runner = Runner(smollm2_engine)
    person = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40},
                                               "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    for spec, check in [(constrained(json_object=True), lambda v: isinstance(v, dict)),
                        (constrained(json=person), lambda v: set(v) == {"name", "age"}
                         and isinstance(v["name"], str) and type(v["age"]) is int)]:
        r = runner.complete(["Describe a fictional person in JSON."],
                            SamplingParams(max_tokens=200, structured_outputs=spec),
                            chat=True)[0]
        assert r.finish_reason == "stop" and check(json.loads(r.text)), r.text
    runner.close()
