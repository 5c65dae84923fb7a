"""The reference graph on onnxruntime equals HF transformers, step by step.

Each tiny model runs ragged steps through the engine's I/O contract directly: prefills of
several sequences whose lengths do not divide the block size, then a step that mixes decode
tokens with a prefill chunk, over shuffled physical blocks; logits are compared with HF's
full-sequence forward at the same positions.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmc import contract
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


def _hf_logits(model, tokens: list[int], dtype: str) -> np.ndarray:
    """HF logits [len(tokens), vocab] for one sequence, in the precision the engine mirrors."""
    m = model
    if dtype == "bf16":
        m = type(model)(model.config).eval()
        m.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in
                           model.state_dict().items()})
    elif dtype == "fp16":
        m = type(model)(model.config).eval().half()
        m.load_state_dict(model.state_dict())
    with torch.no_grad():
        return m(torch.tensor([tokens])).logits[0].float().numpy()


class Ragged:
    """Drives a session through ragged steps the way the runtime does, with chosen blocks."""

    def __init__(self, session, blocks: list[list[int]]):
        self.session, self.blocks = session, blocks
        self.tokens = [[] for _ in blocks]

    def step(self, new: dict[int, list[int]]) -> np.ndarray:
        chunks = []
        for s, toks in new.items():
            chunks.append(contract.Chunk(toks, len(self.tokens[s]), self.blocks[s]))
            self.tokens[s] += toks
        return self.session.step(contract.pack_step(chunks, BLOCK))


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("kind", ["llama-gqa", "llama-tied-rope3", "mistral-window",
                                  "qwen2-bias"])
def test_ragged_steps_match_hf(tiny_models, tmp_path, kind, dtype):
    folder, model = tiny_models[kind]
    session = _engine(folder, tmp_path, dtype)
    rng = np.random.default_rng(1)
    lengths = [5, 19, 13]                       # none divides the block size of 8
    physical = rng.permutation(16).tolist()     # shuffled blocks, 5 per sequence
    run = Ragged(session, [physical[0:5], physical[5:10], physical[10:15]])
    session.allocate_kv(16)
    vocab = model.config.vocab_size
    prompts = [rng.integers(0, vocab, n).tolist() for n in lengths]

    def check(logits, seqs):
        for row, s in enumerate(seqs):
            ref = _hf_logits(model, run.tokens[s], dtype)[-1]
            err = np.abs(logits[row] - ref).max() / np.abs(ref).max()
            assert err < TOLERANCE[dtype], f"{kind} {dtype} seq {s}: rel err {err:.2e}"

    # 1. prefill all three in one ragged step
    check(run.step({s: p for s, p in enumerate(prompts)}), [0, 1, 2])
    # 2. two decode steps for every sequence
    for _ in range(2):
        check(run.step({s: [int(rng.integers(vocab))] for s in range(3)}), [0, 1, 2])
    # 3. decode tokens and a prefill chunk in one step; sequence 1 sits out
    check(run.step({0: [3], 2: rng.integers(0, vocab, 11).tolist()}), [0, 2])
    check(run.step({1: [7], 2: [9]}), [1, 2])


def test_engine_generation_matches_hf_greedy(tiny_models, tmp_path):
    from llmc.runtime.generator import generate
    from llmc.runtime.sampler import SamplingParams

    folder, model = tiny_models["llama-gqa"]
    session = _engine(folder, tmp_path, "fp32")
    prompts = [[1, 2, 3], list(range(10, 30)), [5] * 9]
    limits = BuildLimits(2, 16, 64, BLOCK)   # 2 sequences at a time, chunked prefill of 16
    seqs = generate(session, limits, prompts, 12, SamplingParams())
    for prompt, seq in zip(prompts, seqs):
        with torch.no_grad():
            ref = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                 pad_token_id=0)[0, len(prompt):].tolist()
        assert seq.generated == ref
        assert seq.finish_reason == "length"
