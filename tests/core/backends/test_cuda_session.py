"""The cuda backend on a GPU: engines built here run through the torch-free session.

- tiny random models of every variant: logits against HF over ragged prefill, decode and
  mixed steps on shuffled blocks (CUDA-graphed decode and uncaptured steps alike), the
  mixtures of experts (Mixtral, Qwen2-MoE with its shared expert, Qwen3-MoE) included;
- `llmc build --backend cuda` + `llmc run` on each family's tiny model: HF's greedy tokens;
- SmolLM2 (real weights): greedy tokens equal HF's (fp32) in fp16 and bf16;
- a batch of mixed lengths generates what each prompt generates alone;
- memory: what the session allocates is what the plan says, and 1,000 steps leak nothing.
"""

from __future__ import annotations

import numpy as np
import pytest

from llmc.build import BuildOptions, build
from llmc.devices import list_gpus
from llmc.engine_file import EngineFile
from llmc.limits import BuildLimits

GPUS, WHY = list_gpus()


def _why_not() -> str:
    if not GPUS:
        return f"needs an NVIDIA GPU ({WHY})"
    from llmc.backends.cuda.session import runtime_missing

    return runtime_missing()


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(bool(_why_not()), reason=_why_not() or "-")]

LIMITS = BuildLimits(max_batch_size=4, max_num_tokens=128, max_seq_len=128, kv_block_size=16)
# Max |engine - HF| over max |HF| of a row of logits. The kernels keep activations in the
# build dtype between ops, where HF's fp32 reference for bf16 does not (hf_steps.hf_logits).
TOLERANCE = {"fp16": 2e-2, "bf16": 6e-2}
# Mixtures of experts (the moe op, kernels/moe.cu). In bf16 a token whose router's k-th and
# (k+1)-th logits nearly tie may take the other expert (HF's own bf16 does, for one token of
# this scenario in Mixtral's and Qwen3-MoE's tiny models: 1.9e-2 at most, inside the bound).
MOE_KINDS = ["mixtral-top2", "qwen2moe-shared", "qwen3moe-qknorm"]


def _engine(folder, tmp_path, dtype, limits=LIMITS) -> EngineFile:
    out = tmp_path / f"{folder.name}-{dtype}.engine"
    build(BuildOptions(folder, out, backend="cuda", dtype=dtype, limits=limits),
          log=lambda _: None)
    return EngineFile(out)


def _session(engine, **kw):
    from llmc.backends.cuda.session import CudaSession

    return CudaSession(engine, max_kv_blocks=64, **kw)


@pytest.mark.parametrize("graphs", [True, False])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("kind", ["llama-gqa", "llama-tied-rope3", "mistral-window",
                                  "qwen2-bias", "phi3-window", "qwen3-qknorm", "gemma2-softcap",
                                  "gemma3-local-global", "gpt2-learned-pos", *MOE_KINDS])
def test_ragged_steps_match_hf(tiny_models_d64, tmp_path, kind, dtype, graphs):
    from hf_steps import check_ragged_steps

    folder, model = tiny_models_d64[kind]
    with _session(_engine(folder, tmp_path, dtype), cuda_graphs=graphs) as session:
        check_ragged_steps(session, model, LIMITS.kv_block_size, dtype, TOLERANCE[dtype],
                           f"cuda {kind}")


@pytest.mark.parametrize("kind", ["llama-gqa", "mixtral-top2", "gemma3-local-global"])
def test_graphed_decode_equals_uncaptured(tiny_models_d64, tmp_path, kind):
    """Padding a decode step to its bucket and replaying the graph changes nothing (a
    mixture of experts: its routing, counts and tiles are recomputed on the GPU at every
    replay, the padding row routed like any token); nor does the decode schedule, against
    each context over the grid's splits (contexts past one 64-key tile: scheduled in two
    items; Gemma 3: a schedule for its local layers' window and one for its global ones)."""
    from llmc import contract

    engine = _engine(tiny_models_d64[kind][0], tmp_path, "bf16")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 128, n).tolist() for n in (9, 80, 30)]   # one prefill step
    blocks = [list(range(1 + 7 * i, 8 + 7 * i)) for i in range(3)]
    outs = []
    for graphs, scheduled in ((True, True), (False, True), (True, False)):
        with _session(engine, cuda_graphs=graphs) as s:
            s.scheduled_decode = scheduled
            s.step(contract.pack_step([contract.Chunk(p, 0, b) for p, b in
                                       zip(prompts, blocks)], 16))
            steps = []
            for i in range(5):      # 3 rows: padded to the bucket of 4
                chunks = [contract.Chunk([5 + i], len(p) + i, b) for p, b in zip(prompts, blocks)]
                steps.append(s.step(contract.pack_step(chunks, 16)))
            outs.append(np.stack(steps))
            assert len(s.schedules) == (2 if kind.startswith("gemma3") else 1)
    for out in outs[1:]:
        np.testing.assert_allclose(outs[0], out, rtol=0, atol=2e-2 * np.abs(out).max())


@pytest.fixture(scope="module")
def smollm2_engines(smollm2_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm2-cuda")
    out = {}
    for dtype in ("fp16", "bf16"):
        out[dtype] = root / f"smollm2-{dtype}.engine"
        build(BuildOptions(smollm2_path, out[dtype], backend="cuda", dtype=dtype,
                           limits=BuildLimits(4, 256, 512, 16)), log=lambda _: None)
    return out


PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, there was"]


@pytest.fixture(scope="module")
def hf_greedy(smollm2_path):
    """HF transformers' own greedy tokens (fp32, from the same GGUF file), 32 a prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    kw = dict(gguf_file=smollm2_path.name)
    tok = AutoTokenizer.from_pretrained(smollm2_path.parent, **kw)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path.parent, dtype=torch.float32,
                                                 **kw).eval()
    model.generation_config.eos_token_id = None
    greedy = GenerationConfig(max_new_tokens=32, do_sample=False, pad_token_id=0)
    out = []
    for p in PROMPTS:
        ids = tok(p)["input_ids"]
        with torch.no_grad():
            ref = model.generate(torch.tensor([ids]), generation_config=greedy)
        out.append((ids, ref[0, len(ids):].tolist()))
    return out


@pytest.mark.slow
def test_smollm2_fp16_greedy_equals_hf(smollm2_engines, hf_greedy):
    """fp16 keeps 11 bits of mantissa: all 32 greedy tokens of every prompt equal HF's fp32."""
    from llmc.runtime.runner import Runner
    from llmc.runtime.sampler import SamplingParams

    runner = Runner(smollm2_engines["fp16"], gpu_memory_utilization=0.3)
    ids = [ids for ids, _ in hf_greedy]
    results = runner.complete(ids, SamplingParams(max_tokens=32, ignore_eos=True))
    for result, (_, ref) in zip(results, hf_greedy):
        assert result.token_ids == ref, (
            f"{runner.tokenizer.decode(result.token_ids)!r} vs {runner.tokenizer.decode(ref)!r}")
    runner.close()


def test_smollm2_structured_output_on_the_gpu(smollm2_engines, smollm2_engine):
    """A JSON-schema request samples on the GPU: its masks, computed on the host while the
    forward runs, ban tokens in the logits on the device (no logits cross to the host).
    Greedy, it writes what the reference backend's fp32 engine writes and what the host path
    (the logits copied and masked on the host) writes; the free requests of its steps write
    what they write alone."""
    import json

    from llmc.runtime.runner import Runner
    from llmc.runtime.sampler import SamplingParams
    from llmc.runtime.structured import StructuredOutputsParams

    person = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40},
                                               "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    constrained = SamplingParams(max_tokens=64,
                                 structured_outputs=StructuredOutputsParams(json=person))
    free = SamplingParams(max_tokens=24, ignore_eos=True)
    reference = Runner(smollm2_engine)
    prompt = reference.encode("Describe a fictional person in JSON.", chat=True)
    prompts = [reference.encode(p) for p in PROMPTS]
    want = reference.complete([prompt], constrained)[0]
    reference.close()
    assert want.finish_reason == "stop" and set(json.loads(want.text)) == {"name", "age"}

    def run(requests, on_device=True):
        return _generate_on_gpu(smollm2_engines["fp16"], requests, on_device)

    assert run([(prompt, constrained)]) == [want.token_ids]
    assert run([(prompt, constrained)], on_device=False) == [want.token_ids]
    alone = [run([(p, free)])[0] for p in prompts]
    mixed = run([(prompts[0], free), (prompt, constrained), (prompts[1], free),
                 (prompts[2], free)])
    assert mixed == [alone[0], want.token_ids, alone[1], alone[2]]


def _generate_on_gpu(path, requests, on_device=True, speculative=None,
                     stats: dict | None = None) -> list[list[int]]:
    """Each (prompt, params) request's tokens from a cuda engine, run together; on_device:
    constrained rows banned on the GPU, the test failing if logits go to the host.
    speculative: the engine's SpeculativeConfig; stats: a dict to receive the steps taken
    and the engine's EngineStats."""
    from llmc.runtime.engine import LLMEngine
    from llmc.runtime.runner import open_session

    engine = EngineFile(path)
    session = open_session(engine, gpu_memory_utilization=0.3)
    assert session.bans_tokens
    session._bans = on_device
    steps = session.step
    session.step = lambda inputs: steps(inputs) if not on_device else pytest.fail(
        "the logits went to the host")
    llm = LLMEngine(session, engine.header, speculative=speculative)
    ids = [llm.add_request(p, params) for p, params in requests]
    tokens = {rid: [] for rid in ids}
    taken = 0
    while llm.has_unfinished():
        taken += 1
        for out in llm.step():
            tokens[out.request_id] += out.token_ids
    session.close()
    if stats is not None:
        stats.update(steps=taken, engine=llm.stats())
    return [tokens[rid] for rid in ids]


def test_smollm2_constraint_after_its_token_on_the_gpu(smollm2_engines, smollm2_engine):
    """structured_after (a thinking model's </think>): the row samples freely on the device
    until that token, then under its masks, banned on the device. Greedy: the tokens up to
    it are the free run's, the rest one of the choices; a free request sharing the steps
    writes what it writes alone."""
    from llmc.runtime.runner import Runner
    from llmc.runtime.sampler import SamplingParams
    from llmc.runtime.structured import StructuredOutputsParams

    reference = Runner(smollm2_engine)
    prompt = reference.encode("What is the capital of France?", chat=True)
    other = reference.encode(PROMPTS[0])
    path = smollm2_engines["fp16"]
    free = SamplingParams(max_tokens=16, ignore_eos=True)
    ids, alone = _generate_on_gpu(path, [(prompt, free), (other, free)])
    k = next(i for i in range(2, len(ids)) if ids[i] not in ids[:i])
    after = SamplingParams(max_tokens=40, structured_after=ids[k],
                           structured_outputs=StructuredOutputsParams(choice=["Lyon", "Nice"]))
    got, shared = _generate_on_gpu(path, [(prompt, after), (other, free)])
    assert got[:k + 1] == ids[:k + 1] and shared == alone
    assert reference.tokenizer.decode(got[k + 1:]) in ("Lyon", "Nice")
    reference.close()


def test_smollm2_speculative_decoding_on_the_gpu(smollm2_engines, smollm2_engine):
    """Prompt lookup on the cuda engine: a request's guesses go in one-token rows that share
    its block table (a graphed decode step), sampled on the device. Greedy and seeded
    sampling write the tokens of plain decoding in fewer steps, and a request sharing the
    steps writes what it writes without speculation. (The seeded request keeps to a top-k of
    5: over a whole vocabulary at temperature 1, the last bits of logits computed in a batch
    of another shape move the draw's landing place in the tail, to a neighbouring token id.)"""
    from llmc.runtime.runner import Runner
    from llmc.runtime.sampler import SamplingParams
    from llmc.runtime.speculative import SpeculativeConfig

    reference = Runner(smollm2_engine)
    prompt = reference.encode(
        "Repeat this sentence exactly: The old lighthouse keeper climbed the spiral stairs "
        "every evening, lit the great lamp, and watched the ships pass safely through the "
        "narrow channel.", chat=True)
    other = reference.encode(PROMPTS[1])
    reference.close()
    path = smollm2_engines["fp16"]
    greedy = SamplingParams(max_tokens=40, ignore_eos=True)
    short = SamplingParams(max_tokens=8, ignore_eos=True)   # the copy sets the steps
    seeded = SamplingParams(max_tokens=40, ignore_eos=True, temperature=0.7, top_k=5, seed=5)
    for params in (greedy, seeded):
        plain, spec = {}, {}
        want = _generate_on_gpu(path, [(prompt, params), (other, short)], stats=plain)
        got = _generate_on_gpu(path, [(prompt, params), (other, short)],
                               speculative=SpeculativeConfig(), stats=spec)
        assert got == want
        assert spec["engine"].spec_accepted_tokens > 10 and spec["steps"] < plain["steps"], (
            spec, plain["steps"])


@pytest.mark.slow
def test_smollm2_bf16_greedy_follows_hf_up_to_its_error(smollm2_engines, hf_greedy, hf_smollm2):
    """bf16 keeps 8 bits of mantissa between ops, and so does HF's own bf16: run freely, HF
    bf16 leaves HF fp32's greedy path at token 17 of the first prompt and 18 of the third
    (transformers 5, CPU). So bf16 is held to HF fp32 teacher-forced: along HF's 32 greedy
    tokens, each of llmc's logit rows is within the bf16 tolerance of HF's, and where llmc's
    top token differs, HF's own margin between the two is smaller than llmc's error on that
    row (a near-tie the dtype cannot resolve, not a wrong token)."""
    import torch

    from llmc import contract
    from llmc.runtime.runner import Runner

    _, hf = hf_smollm2
    runner = Runner(smollm2_engines["bf16"], gpu_memory_utilization=0.3)
    session, bs = runner.session, runner.limits.kv_block_size
    flips = 0
    for ids, ref in hf_greedy:
        with torch.no_grad():
            want = hf(torch.tensor([ids + ref])).logits[0, len(ids) - 1:-1].double().numpy()
        blocks = list(range(-(-(len(ids) + len(ref)) // bs)))
        got = [session.step(contract.pack_step([contract.Chunk(ids, 0, blocks)], bs))[0]]
        for i, tok in enumerate(ref[:-1]):
            step = contract.pack_step([contract.Chunk([tok], len(ids) + i, blocks)], bs)
            got.append(session.step(step)[0])
        for i, (row, w) in enumerate(zip(got, want)):
            err = np.abs(row - w).max()
            assert err <= TOLERANCE["bf16"] * np.abs(w).max(), (i, err)
            top = int(np.argmax(row))
            if top != ref[i]:
                flips += 1
                assert w[ref[i]] - w[top] <= err, (i, w[ref[i]] - w[top], err)
    assert flips <= 2, f"{flips} of 96 greedy choices differ from HF's"
    runner.session.close()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_batch_equals_each_prompt_alone(smollm2_engines, dtype):
    """A prompt decodes the same in a batch of mixed lengths as alone, up to near-ties: a
    step of 1-2 rows runs llmc's GEMV and a larger one cuBLASLt, which round differently,
    so where alone's top two tokens are within half a nat the batch may take the other one
    (and go its own way after). Any other difference is a bug."""
    from llmc.runtime.runner import Runner
    from llmc.runtime.sampler import SamplingParams

    runner = Runner(smollm2_engines[dtype], gpu_memory_utilization=0.3)
    prompts = PROMPTS + ["Write a haiku about the sea. " * 6, "1, 2, 3,"]
    params = SamplingParams(max_tokens=24, ignore_eos=True, logprobs=2)
    together = runner.complete(prompts, params)
    alone = [runner.complete([p], params)[0] for p in prompts]
    flips = 0
    for t, a in zip(together, alone):
        assert len(t.token_ids) == len(a.token_ids) == 24
        j = next((i for i, (x, y) in enumerate(zip(t.token_ids, a.token_ids)) if x != y), None)
        if j is None:
            continue
        flips += 1
        chosen, top = a.logprobs[j][0], dict(a.logprobs[j][1])
        assert t.token_ids[j] in top, (j, t.token_ids[j], top)   # alone's runner-up
        assert chosen - top[t.token_ids[j]] < 0.5, (j, chosen, top)
    assert flips <= 2, f"{flips} of {len(prompts)} prompts left their solo path"
    runner.close()


def test_memory_is_what_the_plan_says_and_steps_leak_nothing(tiny_models_d64, tmp_path):
    from cuda.bindings import driver

    from llmc import contract
    from llmc.backends.cuda.plan import PLAN, Plan

    engine = _engine(tiny_models_d64["qwen2-bias"][0], tmp_path, "fp16")
    plan = Plan.from_dict(__import__("json").loads(engine.section(PLAN).tobytes()))
    driver.cuInit(0)
    with _session(engine) as s:
        free_loaded, _ = driver.cuMemGetInfo()[1:]
        predicted = (plan.weights_bytes + plan.arena_bytes
                     + s.num_blocks * s.block_bytes * plan.num_layers)
        # what the session holds beyond the plan: workspaces and inputs, all counted in mem
        assert abs(s.mem.nbytes - predicted) <= 0.02 * s.mem.nbytes + (40 << 20)
        prompt = contract.pack_step([contract.Chunk(list(range(3, 40)), 0, [0, 1, 2])], 16)
        s.step(prompt)
        for i in range(1000):
            s.step(contract.pack_step([contract.Chunk([7], 37 + i % 80, [0, 1, 2, 3, 4, 5, 6,
                                                                         7])], 16))
        free_after, _ = driver.cuMemGetInfo()[1:]
        assert free_after >= free_loaded - (2 << 20)   # graphs and algos: at most 2 MiB


def test_engine_for_another_arch_is_refused(tiny_models_d64, tmp_path):
    from llmc.errors import LlmcError

    other = "sm_80" if GPUS[0].arch != "sm_80" else "sm_89"
    out = tmp_path / "other.engine"
    build(BuildOptions(tiny_models_d64["llama-gqa"][0], out, backend="cuda", dtype="bf16",
                       limits=LIMITS, gpu_arch=other), log=lambda _: None)
    with pytest.raises(LlmcError, match=f"holds kernels for {other}, but this machine has"):
        _session(EngineFile(out))


def test_a_cuda_error_fails_the_step_and_asks_for_a_reload(tiny_models_d64, tmp_path,
                                                            monkeypatch):
    from llmc import contract
    from llmc.devices import CudaError
    from llmc.errors import LlmcError

    with _session(_engine(tiny_models_d64["llama-gqa"][0], tmp_path, "bf16")) as s:
        prefill = contract.pack_step([contract.Chunk([5, 6, 7], 0, [0])], 16)
        s.step(prefill)
        too_long = contract.pack_step([contract.Chunk([5] * 200, 0, list(range(13)))], 16)
        with pytest.raises(LlmcError, match="outside this engine's limits"):
            s.step(too_long)            # bad input: the session stays usable
        s.step(prefill)

        def fail(*args):
            raise CudaError("CUDA error CUDA_ERROR_LAUNCH_FAILED (injected)")

        monkeypatch.setattr(s.functions, "launch", fail)
        with pytest.raises(LlmcError, match="a CUDA error stopped this step .* reloaded"):
            s.step(prefill)
        monkeypatch.undo()
        with pytest.raises(LlmcError, match="hit a CUDA error earlier .* must be reloaded"):
            s.step(prefill)


def test_runner_on_the_engine_batches_like_alone(tiny_models_d64, tmp_path):
    """The in-flight-batching engine over a cuda session (sampling on the GPU)."""
    from llmc.runtime.runner import Runner
    from llmc.runtime.sampler import SamplingParams

    engine = _engine(tiny_models_d64["qwen2-bias"][0], tmp_path, "bf16")
    runner = Runner(engine.path, max_kv_blocks=64)
    prompts = [[5, 6, 7], list(range(10, 60)), [9] * 20, [3, 4]]
    greedy = SamplingParams(max_tokens=12, ignore_eos=True)
    together = [r.token_ids for r in runner.complete(prompts, greedy)]
    alone = [runner.complete([p], greedy)[0].token_ids for p in prompts]
    assert together == alone and all(len(t) == 12 for t in together)
    sampled = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=3, max_tokens=12,
                             ignore_eos=True)
    a = [r.token_ids for r in runner.complete(prompts, sampled)]
    b = [r.token_ids for r in runner.complete(prompts[::-1], sampled)][::-1]
    assert a == b   # a request's draws follow its seed, not its batch row
    runner.close()


def _cli(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "llmc", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def test_cli_auto_picks_cuda_and_generates(tiny_models_d64, tmp_path):
    """`llmc build` with the default backend (auto) on a GPU machine without TensorRT builds
    a cuda engine and says so; `llmc run` generates with it (greedy, so twice the same)."""
    from llmc.backends import tensorrt

    if tensorrt.backend("tensorrt").available()[0]:
        pytest.skip("TensorRT can run here, so auto picks it")
    out = tmp_path / "auto.engine"
    b = _cli("build", "--model", tiny_models_d64["llama-gqa"][0], "--dtype", "bf16", "-o", out)
    assert b.returncode == 0, b.stderr
    assert "backend auto -> cuda" in b.stderr, b.stderr
    assert EngineFile(out).header.backend == "cuda"
    runs = [_cli("run", out, "-p", "w3 w4 w5", "--max-new-tokens", "6")
            for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr
    assert runs[0].stdout == runs[1].stdout and runs[0].stdout.strip()


CLI_LIMITS = ["--max-batch-size", "2", "--max-num-tokens", "64", "--max-seq-len", "64",
              "--kv-block-size", "16"]


@pytest.mark.parametrize("kind", ["llama-gqa", "qwen3-qknorm", "gemma2-softcap",
                                  "gemma3-local-global", "gpt2-learned-pos", "mixtral-top2",
                                  "qwen2moe-shared"])
def test_cli_build_and_run_give_hf_greedy_tokens(tiny_models_d64, tmp_path, kind):
    """`llmc build --backend cuda` (fp16) + `llmc run`, as a user types them, against HF's
    greedy tokens (fp32). A prompt longer than the windows, 12 new tokens. Where the two
    part, HF's own margin between its token and llmc's must be within the fp16 tolerance of
    the ragged-step test (a near-tie of random weights, not a wrong token); no other
    difference passes, and the tokens before it must be equal."""
    import json

    from hf_steps import GREEDY_PROMPT, hf_greedy, hf_logits

    folder, model = tiny_models_d64[kind]
    out = tmp_path / "m.engine"
    b = _cli("build", "--model", folder, "-o", out, "--backend", "cuda", "--dtype", "fp16",
             *CLI_LIMITS)
    assert b.returncode == 0 and "Traceback" not in b.stderr, b.stderr
    r = _cli("run", out, "-p", GREEDY_PROMPT, "--max-new-tokens", "12", "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.splitlines()[-1])["token_ids"]
    ids, ref = hf_greedy(model, folder)
    j = next((i for i, (x, y) in enumerate(zip(got, ref)) if x != y), None)
    if j is None:
        assert got == ref
        return
    row = hf_logits(model, ids + ref[:j], "fp32")[-1]
    margin = row[ref[j]] - row[got[j]]
    assert margin <= TOLERANCE["fp16"] * np.abs(row).max(), (j, got, ref, margin)


def test_kv_pool_that_cannot_fit_is_one_clear_error(tiny_models_d64, tmp_path):
    out = _engine(tiny_models_d64["llama-gqa"][0], tmp_path, "bf16").path
    r = _cli("run", out, "-p", "w3", "--gpu-memory-utilization", "0.0001")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "the KV cache needs at least" in errors[0], r.stderr
    assert "raise --gpu-memory-utilization" in errors[0]
