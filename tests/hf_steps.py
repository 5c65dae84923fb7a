"""Ragged steps through any backend's session against HF transformers' logits.

The scenario every backend must pass: three prompts whose lengths do not divide the block
size prefilled in one ragged step over shuffled physical blocks, decode steps, then a step
mixing decode tokens with a prefill chunk while one sequence sits out; after each step the
logits of every sequence that ran are compared with HF's full-sequence forward.
"""

from __future__ import annotations

import numpy as np
import torch

from llmc import contract
from llmc.dtypes import np_dtype
from llmc.graph import save_onnx


def hf_logits(model, tokens: list[int], dtype: str) -> np.ndarray:
    """HF logits [len(tokens), vocab] for one sequence, in the precision an engine mirrors:
    fp16 in fp16, bf16 as fp32 on bf16-rounded weights, fp32 as is."""
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


GREEDY_PROMPT = "w3 w17 w5 w60 w9 w21 w33 w40 w11 w7 w50 w29 w8"   # longer than the windows


def hf_greedy(model, folder, prompt: str = GREEDY_PROMPT, new: int = 12
              ) -> tuple[list[int], list[int]]:
    """(prompt ids, HF's greedy continuation) for a tiny model's word tokenizer; the EOS HF
    keeps where it stops is dropped, as llmc's token_ids leave it out."""
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(prompt).ids
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=new, do_sample=False,
                             pad_token_id=0)[0, len(ids):].tolist()
    if ref[-1:] == [model.generation_config.eos_token_id]:
        ref = ref[:-1]
    return ids, ref


class Ragged:
    """Drives a session through ragged steps the way the runtime does, with chosen blocks."""

    def __init__(self, session, blocks: list[list[int]], block_size: int):
        self.session, self.blocks, self.block_size = session, blocks, block_size
        self.tokens = [[] for _ in blocks]

    def step(self, new: dict[int, list[int]]) -> np.ndarray:
        chunks = []
        for s, toks in new.items():
            chunks.append(contract.Chunk(toks, len(self.tokens[s]), self.blocks[s]))
            self.tokens[s] += toks
        return self.session.step(contract.pack_step(chunks, self.block_size))


def two_engine_steps(vocab: int, block_size: int):
    """The ragged scenario two engines of one build are driven through side by side
    (tests/core/backends/test_cuda_quant.py, test_cuda_kv_fp8.py): three prompts whose
    lengths do not divide the block size, over shuffled blocks; three decode steps; a step
    mixing a decode token with a prefill chunk; one with a sequence sitting out; then a short
    prompt starting beside a decode token (a step of 7 rows), and a one-token prompt beside
    one (a decode-shaped step, a sequence's first token in it), decoded once more. Returns
    (each sequence's blocks, the blocks to allocate, the steps as Ragged.step takes them)."""
    rng = np.random.default_rng(1)
    lengths = [21, 37, 13]
    per_seq = -(-(max(lengths) + 16) // block_size)
    physical = rng.permutation(5 * per_seq + 1).tolist()
    blocks = [physical[i * per_seq:(i + 1) * per_seq] for i in range(5)]
    prompts = [rng.integers(0, vocab, n).tolist() for n in lengths]
    steps = [{s: p for s, p in enumerate(prompts)}]
    steps += [{s: [int(rng.integers(vocab))] for s in range(3)} for _ in range(3)]
    steps += [{0: [3], 2: rng.integers(0, vocab, 11).tolist()}, {1: [7], 2: [9]}]
    steps += [{1: [5], 3: rng.integers(0, vocab, 6).tolist()}, {3: [11], 4: [13]},
              {4: [2], 0: [8], 3: [4]}]
    return blocks, 5 * per_seq + 1, steps


def check_ragged_steps(session, model, block_size: int, dtype: str, tolerance: float,
                       label: str = "") -> float:
    """Run the scenario; returns the largest relative error seen (max |engine - HF| over
    max |HF| of a row of logits)."""
    rng = np.random.default_rng(1)
    lengths = [5, 19, 13] if block_size == 8 else [21, 37, 13]   # none divides the block size
    per_seq = -(-(max(lengths) + 16) // block_size)
    physical = rng.permutation(3 * per_seq + 1).tolist()          # shuffled blocks
    run = Ragged(session, [physical[i * per_seq:(i + 1) * per_seq] for i in range(3)],
                 block_size)
    session.allocate_kv(3 * per_seq + 1)
    vocab = model.config.vocab_size
    prompts = [rng.integers(0, vocab, n).tolist() for n in lengths]
    worst = 0.0

    def check(logits, seqs):
        nonlocal worst
        for row, s in enumerate(seqs):
            ref = hf_logits(model, run.tokens[s], dtype)[-1]
            err = float(np.abs(logits[row] - ref).max() / np.abs(ref).max())
            worst = max(worst, err)
            assert err < tolerance, f"{label} {dtype} seq {s}: rel err {err:.2e}"

    check(run.step({s: p for s, p in enumerate(prompts)}), [0, 1, 2])
    for _ in range(2):
        check(run.step({s: [int(rng.integers(vocab))] for s in range(3)}), [0, 1, 2])
    check(run.step({0: [3], 2: rng.integers(0, vocab, 11).tolist()}), [0, 2])
    check(run.step({1: [7], 2: [9]}), [1, 2])
    return worst


class OrtStepSession:
    """The runtime's Session protocol over a saved graph (what ReferenceSession does for an
    engine file), so generation can compare unfused and fused graphs directly."""

    def __init__(self, model, weights, folder, cfg, block_size: int, dtype: str = "float32"):
        import onnxruntime as ort

        path = save_onnx(model, weights, folder)
        self._sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.cfg, self.dtype, self.block_size = cfg, np_dtype(dtype), block_size
        self.kv: list[np.ndarray] = []

    def allocate_kv(self, num_blocks: int) -> None:
        c = self.cfg
        shape = (2, num_blocks, c.num_key_value_heads, self.block_size, c.head_dim)
        self.kv = [np.zeros(shape, self.dtype) for _ in range(c.num_hidden_layers)]

    def step(self, inputs: dict) -> np.ndarray:
        feeds = dict(inputs, **{f"kv_cache_{i}": kv for i, kv in enumerate(self.kv)})
        outs = ["logits"] + [f"kv_cache_out_{i}" for i in range(len(self.kv))]
        logits, *self.kv = self._sess.run(outs, feeds)
        return logits


def compare_engines(cuda_engine, ref_engine, vocab: int, block_size: int, what: str,
                    tolerance: float, graphs: bool) -> None:
    """A cuda engine against the reference backend's engine of the same build over
    two_engine_steps: each row of logits within `tolerance` of the reference row's max |.|."""
    from llmc.backends.cuda.session import CudaSession
    from llmc.backends.reference import ReferenceSession
    from llmc.engine_file import EngineFile

    blocks, num_blocks, steps = two_engine_steps(vocab, block_size)
    with CudaSession(EngineFile(cuda_engine), max_kv_blocks=64, cuda_graphs=graphs) as cuda:
        ref = ReferenceSession(EngineFile(ref_engine))
        runs = [Ragged(s, blocks, block_size) for s in (cuda, ref)]
        for s in (cuda, ref):
            s.allocate_kv(num_blocks)
        for i, step in enumerate(steps):
            got, want = (r.step(step) for r in runs)
            err = np.abs(got - want).max(axis=1) / np.abs(want).max(axis=1)
            assert err.max() < tolerance, f"{what} step {i}: rel err {err.max():.2e}"
