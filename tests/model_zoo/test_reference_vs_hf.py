"""The reference graph on onnxruntime equals HF transformers, step by step.

Each tiny model runs ragged steps through the engine's I/O contract directly: prefills of
several sequences whose lengths do not divide the block size, then a step that mixes decode
tokens with a prefill chunk, over shuffled physical blocks; logits are compared with HF's
full-sequence forward at the same positions.
"""

from __future__ import annotations

import pytest
import torch
from hf_steps import check_ragged_steps

from llmc.backends.reference import ReferenceSession
from llmc.build import BuildOptions, build
from llmc.engine_file import EngineFile
from llmc.limits import BuildLimits

BLOCK = 8
# Max |engine - HF| over max |HF| of the logits, per engine dtype. bf16 engines compute in
# fp32 on bf16-rounded weights, so they are compared with HF on the same rounded weights.
TOLERANCE = {"fp32": 1e-4, "bf16": 1e-4, "fp16": 2e-2}


def _engine(folder, tmp_path, dtype):
    out = tmp_path / f"{folder.name}-{dtype}.engine"
    build(BuildOptions(model=folder, output=out, backend="reference", dtype=dtype,
                       limits=BuildLimits(4, 64, 64, BLOCK)), log=lambda _: None)
    session = ReferenceSession(EngineFile(out))
    return session


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("kind", ["llama-gqa", "llama-tied-rope3", "mistral-window",
                                  "qwen2-bias", "phi3-window", "qwen3-qknorm",
                                  "gemma2-softcap", "gemma3-local-global",
                                  "gpt2-learned-pos", "mixtral-top2", "qwen2moe-shared",
                                  "qwen3moe-qknorm"])
def test_ragged_steps_match_hf(tiny_models, tmp_path, kind, dtype):
    folder, model = tiny_models[kind]
    check_ragged_steps(_engine(folder, tmp_path, dtype), model, BLOCK, dtype,
                       TOLERANCE[dtype], kind)


@pytest.mark.parametrize("kind", ["llama-gqa", "phi3-window", "qwen3-qknorm", "gemma2-softcap",
                                  "gemma3-local-global", "gpt2-learned-pos", "mixtral-top2",
                                  "qwen2moe-shared", "qwen3moe-qknorm"])
def test_engine_generation_matches_hf_greedy(tiny_models, tmp_path, kind):
    """Through the whole runtime (Runner, engine, scheduler): 2 sequences a step, chunked
    prefill of 16, greedy tokens equal HF's generate."""
    from llmc.runtime.runner import Runner
    from llmc.runtime.sampler import SamplingParams

    folder, model = tiny_models[kind]
    out = tmp_path / "gen.engine"
    build(BuildOptions(model=folder, output=out, backend="reference", dtype="fp32",
                       limits=BuildLimits(2, 16, 64, BLOCK)), log=lambda _: None)
    prompts = [[1, 2, 3], list(range(10, 30)), [5] * 9]
    results = Runner(out).complete(prompts, SamplingParams(max_tokens=12, ignore_eos=True))
    for prompt, result in zip(prompts, results):
        with torch.no_grad():
            ref = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                 pad_token_id=0)[0, len(prompt):].tolist()
        assert result.token_ids == ref
        assert result.finish_reason == "length"
