"""A tiny real engine graph for the backend tests: model_zoo's llama block on random
weights, 2 layers of width 32, saved as model.onnx + weights.bin like `llmc build` saves it.
Every name, dtype and dynamic dimension of the engine I/O contract is in it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from llmc import contract
from llmc.graph import save_onnx
from llmc.limits import BuildLimits
from llmc.model_zoo import parse_config
from llmc.model_zoo.llama import build_graph

# Small limits keep a CPU build short while every dimension stays dynamic.
LIMITS = BuildLimits(max_batch_size=4, max_num_tokens=64, max_seq_len=256, kv_block_size=16)
VOCAB, HIDDEN, KV_HEADS, HEAD_DIM, INTER = 64, 32, 2, 16, 64
CONFIG = parse_config({"architectures": ["LlamaForCausalLM"], "vocab_size": VOCAB,
                       "hidden_size": HIDDEN, "intermediate_size": INTER,
                       "num_hidden_layers": 2, "num_attention_heads": 2,
                       "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM})


def _shape(name: str) -> tuple[int, ...]:
    q, kv = 2 * HEAD_DIM, KV_HEADS * HEAD_DIM
    table = {"embed_tokens": (VOCAB, HIDDEN), "lm_head": (VOCAB, HIDDEN), "q_proj": (q, HIDDEN),
             "k_proj": (kv, HIDDEN), "v_proj": (kv, HIDDEN), "o_proj": (HIDDEN, q),
             "gate_proj": (INTER, HIDDEN), "up_proj": (INTER, HIDDEN),
             "down_proj": (HIDDEN, INTER)}
    return next((s for k, s in table.items() if k in name), (HIDDEN,))   # norms


def toy_model(folder: Path, dtype: str = "float32", num_layers: int = 2,
              limits: BuildLimits = LIMITS, seed: int = 0) -> Path:
    """Write the unfused toy graph into `folder`; returns the path of its model.onnx."""
    cfg = dataclasses.replace(CONFIG, num_hidden_layers=num_layers)

    def tensor(name: str) -> np.ndarray:
        rng = np.random.default_rng([seed, *name.encode()])
        return (rng.standard_normal(_shape(name)) * 0.2).astype(np.float32)

    model, weights = build_graph(cfg, tensor, dtype, limits.kv_block_size)
    return save_onnx(model, weights, Path(folder))


def contract_inputs(num_layers: int = 2, block_size: int = 16):
    """The graph inputs as (name, shape) pairs, as onnx_graph_inputs reports them."""
    io = contract.EngineIO(num_layers, VOCAB, "float32", KV_HEADS, block_size, HEAD_DIM)
    return [(name, tuple(shape)) for name, (_, shape) in io.inputs().items()]


def ragged_step(num_blocks: int = 8, dtype: str = "float32", num_layers: int = 2) -> dict:
    """Sequence 0 prefills 3 tokens (positions 0-2) in block 2; sequence 1 decodes position
    5 in block 5."""
    feeds = contract.pack_step([contract.Chunk([1, 2, 3], 0, [2]),
                                contract.Chunk([4], 5, [5])], 16)
    for i in range(num_layers):
        feeds[contract.kv_cache_input(i)] = np.zeros((2, num_blocks, KV_HEADS, 16, HEAD_DIM),
                                                     dtype)
    return feeds
