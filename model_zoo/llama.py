"""The llama family (Llama, Mistral, Qwen2) as a graph of primitive ONNX ops.

One engine step takes a ragged batch: the new tokens of B sequences packed into T rows, the
per-layer paged KV pools and each sequence's block table (docs/architecture.md, "Engine I/O
contract"). The graph reads top to bottom like the model:

    h = embed(input_ids)
    for each layer:  h = h + attention(rms_norm(h));  h = h + mlp(rms_norm(h))
    logits = lm_head(rms_norm(h)[last_token_rows])

Nothing here is fused: passes/ rewrites the chains (RMSNorm, RoPE, SwiGLU, attention) later.
Attention writes the new K/V into the pool with ScatterND, then every token gathers its own
sequence's blocks and attends to positions 0..p (causal, within the sliding window if any).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from llmc.checkpoint import Checkpoint
from llmc.config import LlamaConfig
from llmc.graph import DTYPES, GraphBuilder, np_dtype

I32, I64, F32 = TensorProto.INT32, TensorProto.INT64, TensorProto.FLOAT
MASKED = float(np.finfo(np.float32).min)


@dataclass(frozen=True)
class Step:
    """Values computed once per step and shared by every layer."""

    positions: str      # int32 [T]
    cos: str            # dtype [T, 1, head_dim]
    sin: str            # dtype [T, 1, head_dim]
    write_index: str    # int64 [2, T, Hkv, 4]: (k|v, block, head, row) of each new K/V row
    token_blocks: str   # int64 [T, max_blocks]: the block table of each token's sequence
    mask: str           # float32 [T, 1, 1, max_blocks * block_size]: 0 or MASKED


class LlamaGraph:
    def __init__(self, config: LlamaConfig, ckpt: Checkpoint | None, dtype: str,
                 kv_block_size: int, weights_rounded_to: str | None = None):
        self.c = config
        self.rounding = np_dtype(weights_rounded_to) if weights_rounded_to else None
        self.ckpt = ckpt
        self.dtype = dtype
        self.elem = DTYPES[dtype][0]
        self.bs = kv_block_size
        self.g = GraphBuilder(f"{config.architecture}")

    # --- weights ---------------------------------------------------------------------------

    def _w(self, name: str, shape: tuple[int, ...], transpose: bool = False) -> str:
        """A checkpoint tensor; linear weights are stored [in, out] so MatMul needs no transpose."""
        ckpt, dt, rounding = self.ckpt, np_dtype(self.dtype), self.rounding

        def load():
            w = ckpt.tensor(name)
            if rounding is not None:  # e.g. bf16 weights computed in fp32 on onnxruntime
                w = w.astype(rounding)
            return (w.T if transpose else w).astype(dt)

        out_shape = tuple(reversed(shape)) if transpose else shape
        return self.g.weight(name, self.dtype, out_shape, load)

    def linear(self, x: str, name: str, n_out: int, n_in: int, bias: bool = False) -> str:
        y = self.g.MatMul(x, self._w(f"{name}.weight", (n_out, n_in), transpose=True))
        return self.g.Add(y, self._w(f"{name}.bias", (n_out,))) if bias else y

    # --- the model -------------------------------------------------------------------------

    def build(self):
        c, g = self.c, self.g
        ids = g.input("input_ids", I32, ["num_tokens"])
        step = self.step_inputs()
        kv_shape = [2, "num_blocks", c.num_key_value_heads, self.bs, c.head_dim]
        embed = self._w("model.embed_tokens.weight", (c.vocab_size, c.hidden_size))
        h = g.Gather(embed, ids)                                          # [T, hidden]
        for i in range(c.num_hidden_layers):
            with g.scope(f"layers.{i}"):
                cache = g.input(f"kv_cache_{i}", self.elem, kv_shape)
                p = f"model.layers.{i}"
                with g.scope("attn"):
                    a, cache = self.attention(self.rms_norm(h, f"{p}.input_layernorm"),
                                              step, cache, f"{p}.self_attn")
                h = g.Add(h, a)
                with g.scope("mlp"):
                    h = g.Add(h, self.mlp(self.rms_norm(h, f"{p}.post_attention_layernorm"),
                                          f"{p}.mlp"))
                g.output(cache, f"kv_cache_out_{i}", self.elem, kv_shape)
        with g.scope("head"):
            last = g.input("last_token_rows", I32, ["batch"])
            h = self.rms_norm(g.Gather(h, last), "model.norm")           # [B, hidden]
            if c.tie_word_embeddings:   # the embedding table, read as [vocab, hidden]
                logits = g.Gemm(h, embed, transB=1)
            else:
                logits = self.linear(h, "lm_head", c.vocab_size, c.hidden_size)
            g.output(g.Cast(logits, to=F32), "logits", F32, ["batch", c.vocab_size])
        return g

    def rms_norm(self, x: str, name: str) -> str:
        """HF semantics: normalise in float32, cast back, then scale by the weight."""
        g = self.g
        x32 = g.Cast(x, to=F32)
        var = g.ReduceMean(g.Mul(x32, x32), g.const([-1]), keepdims=1)
        inv = g.Reciprocal(g.Sqrt(g.Add(var, g.const(self.c.rms_norm_eps, np.float32))))
        y = g.Cast(g.Mul(x32, inv), to=self.elem)
        return g.Mul(y, self._w(f"{name}.weight", (self.c.hidden_size,)))

    def mlp(self, x: str, p: str) -> str:
        c, g = self.c, self.g
        gate = self.linear(x, f"{p}.gate_proj", c.intermediate_size, c.hidden_size, c.mlp_bias)
        up = self.linear(x, f"{p}.up_proj", c.intermediate_size, c.hidden_size, c.mlp_bias)
        act = g.Mul(g.Mul(gate, g.Sigmoid(gate)), up)                     # silu(gate) * up
        return self.linear(act, f"{p}.down_proj", c.hidden_size, c.intermediate_size, c.mlp_bias)

    def attention(self, x: str, s: Step, cache: str, p: str) -> tuple[str, str]:
        c, g = self.c, self.g
        hq, hkv, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        b = c.attention_bias
        q = g.Reshape(self.linear(x, f"{p}.q_proj", c.q_size, c.hidden_size, b),
                      g.const([0, hq, d]))                                # [T, Hq, D]
        k = g.Reshape(self.linear(x, f"{p}.k_proj", c.kv_size, c.hidden_size, b),
                      g.const([0, hkv, d]))                               # [T, Hkv, D]
        v = g.Reshape(self.linear(x, f"{p}.v_proj", c.kv_size, c.hidden_size, b),
                      g.const([0, hkv, d]))
        q, k = self.rope(q, s), self.rope(k, s)

        # Write this step's K/V rows into their blocks, then read every token's context back.
        new_kv = g.Concat(g.Unsqueeze(k, g.const([0])), g.Unsqueeze(v, g.const([0])), axis=0)
        cache = g.ScatterND(cache, s.write_index, new_kv)                 # [2, NB, Hkv, BS, D]
        ctx = g.Gather(cache, s.token_blocks, axis=1)                   # [2, T, MB, Hkv, BS, D]
        ctx = g.Reshape(g.Transpose(ctx, perm=[0, 1, 3, 2, 4, 5]),
                        g.const([2, 0, hkv, -1, d]))                      # [2, T, Hkv, C, D]
        keys = g.Gather(ctx, g.const(0), axis=0)                          # [T, Hkv, C, D]
        values = g.Gather(ctx, g.const(1), axis=0)

        qg = g.Reshape(q, g.const([0, hkv, hq // hkv, d]))                # [T, Hkv, G, D]
        scores = g.MatMul(qg, g.Transpose(keys, perm=[0, 1, 3, 2]))       # [T, Hkv, G, C]
        scores = g.Mul(g.Cast(scores, to=F32), g.const(d ** -0.5, np.float32))
        probs = g.Cast(g.Softmax(g.Add(scores, s.mask), axis=-1), to=self.elem)
        out = g.Reshape(g.MatMul(probs, values), g.const([0, hq * d]))    # [T, Hq*D]
        return self.linear(out, f"{p}.o_proj", c.hidden_size, c.q_size), cache

    def rope(self, x: str, s: Step) -> str:
        """Rotate-half RoPE: x * cos + rotate_half(x) * sin."""
        g, half = self.g, self.c.head_dim // 2
        x1 = g.Slice(x, g.const([0]), g.const([half]), g.const([-1]))
        x2 = g.Slice(x, g.const([half]), g.const([2 * half]), g.const([-1]))
        rotated = g.Concat(g.Neg(x2), x1, axis=-1)
        return g.Add(g.Mul(x, s.cos), g.Mul(rotated, s.sin))

    # --- per-step values ---------------------------------------------------------------------

    def step_inputs(self) -> Step:
        c, g, bs = self.c, self.g, self.bs
        with g.scope("step"):
            pos = g.input("position_ids", I32, ["num_tokens"])
            starts = g.input("seq_starts", I32, ["batch_plus_one"])
            ctx_lens = g.input("context_lens", I32, ["batch"])
            tables = g.input("block_tables", I32, ["batch", "max_blocks"])

            # Which sequence each token belongs to: how many sequence ends lie at or before it.
            n_tok = g.Shape(pos)
            rows = g.Unsqueeze(g.Range(g.const(0), g.Squeeze(n_tok, g.const([0])),
                                       g.const(1)), g.const([1]))        # [T, 1] int64
            ends = g.Unsqueeze(g.Cast(g.Slice(starts, g.const([1]), g.const([2**31 - 1])),
                                      to=I64), g.const([0]))             # [1, B]
            seq = g.ReduceSum(g.Cast(g.GreaterOrEqual(rows, ends), to=I64), g.const([1]),
                              keepdims=0)                                 # [T]
            token_blocks = g.Cast(g.Gather(tables, seq), to=I64)          # [T, MB]

            pos64 = g.Cast(pos, to=I64)
            block = g.GatherElements(token_blocks,
                                     g.Unsqueeze(g.Div(pos64, g.const(bs)), g.const([1])),
                                     axis=1)                              # [T, 1]
            row = g.Unsqueeze(g.Mod(pos64, g.const(bs)), g.const([1]))  # [T, 1]
            write_index = self._write_index(block, row, n_tok)

            # Key j is visible to a token at position p iff j <= p (and within the window).
            n_keys = g.Mul(g.Shape(tables, start=1, end=2), g.const([bs]))
            keys = g.Range(g.const(0), g.Squeeze(n_keys, g.const([0])), g.const(1))  # [C]
            pos_col = g.Unsqueeze(pos64, g.const([1]))                    # [T, 1]
            visible = g.LessOrEqual(keys, pos_col)                        # [T, C]
            seq_len = g.Unsqueeze(g.Cast(g.Gather(ctx_lens, seq), to=I64), g.const([1]))
            visible = g.And(visible, g.Less(keys, seq_len))
            if c.sliding_window:
                visible = g.And(visible, g.Greater(keys, g.Sub(pos_col,
                                                               g.const(c.sliding_window))))
            mask = g.Where(visible, g.const(0.0, np.float32), g.const(MASKED, np.float32))
            mask = g.Unsqueeze(mask, g.const([1, 2]))                     # [T, 1, 1, C]

            inv_freq = g.const(c.inv_freq().astype(np.float32)[None, :], np.float32)
            freqs = g.Mul(g.Cast(pos_col, to=F32), inv_freq)             # [T, D/2]
            emb = g.Unsqueeze(g.Concat(freqs, freqs, axis=-1), g.const([1]))  # [T, 1, D]
            cos = g.Cast(g.Cos(emb), to=self.elem)
            sin = g.Cast(g.Sin(emb), to=self.elem)
        return Step(pos, cos, sin, write_index, token_blocks, mask)

    def _write_index(self, block: str, row: str, n_tok: str) -> str:
        """ScatterND indices [2, T, Hkv, 4] = (k or v, block, kv head, row in block)."""
        g, hkv = self.g, self.c.num_key_value_heads
        shape = g.Concat(g.const([2]), n_tok, g.const([hkv, 1]), axis=0)
        parts = [
            g.const(np.arange(2).reshape(2, 1, 1, 1)),
            g.Unsqueeze(block, g.const([0, 3])),                          # [1, T, 1, 1]
            g.const(np.arange(hkv).reshape(1, 1, hkv, 1)),
            g.Unsqueeze(row, g.const([0, 3])),
        ]
        return g.Concat(*[g.Expand(part, shape) for part in parts], axis=-1)


def build_graph(config: LlamaConfig, ckpt: Checkpoint | None, dtype: str, kv_block_size: int,
                weights_rounded_to: str | None = None):
    """The unfused graph of one engine step; returns (onnx.ModelProto, weights)."""
    g = LlamaGraph(config, ckpt, dtype, kv_block_size, weights_rounded_to).build()
    return g.model(), g.weights
