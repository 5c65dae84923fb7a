"""Shared layers of a decoder-only transformer, as a graph of primitive ONNX ops over the
paged KV cache (llmc/contract.py). A family file subclasses `DecoderGraph` and writes only its
block; everything paged (step values, the cache write, the masked gather-attention) is here.

One engine step takes a ragged batch; the skeleton reads top to bottom like the model:

    h = embed(input_ids, positions)
    for each layer:  h = block(layer, h)        # the family's
    logits = lm_head(final_norm(h[last_token_rows]))

Nothing here is fused: passes/ rewrites the chains (RMSNorm, LayerNorm, RoPE, SwiGLU,
attention) later, so each layer emits the canonical unfused form the passes match.
Precision follows HF: norms and softmax in float32, everything else in the build dtype.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from onnx import TensorProto

from llmc import contract
from llmc.arrays import transposed
from llmc.dtypes import np_dtype, onnx_type
from llmc.graph import GraphBuilder

I32, I64, F32 = TensorProto.INT32, TensorProto.INT64, TensorProto.FLOAT


@dataclass(frozen=True)
class Step:
    """Values computed once per step from the contract's inputs and shared by every layer."""

    positions: str      # int32 [T]
    cos: str | None     # dtype [T, 1, head_dim]; None in a model without RoPE (GPT-2)
    sin: str | None
    write_index: str    # int64 [2, T, Hkv, 4]: (k|v, block, head, row) of each new K/V row
    token_blocks: str   # int64 [T, max_blocks]: the block table of each token's sequence
    mask: str           # float32 [T, 1, 1, max_blocks * block_size]: 0 or contract.MASKED
    layers: tuple[tuple[str, str, str], ...] = ()   # each layer's (mask, cos, sin)

    def for_layer(self, layer: int) -> "Step":
        """The step values one layer sees: the mask of its window and the RoPE table of its
        frequencies (families whose layers differ: Gemma 2, Gemma 3)."""
        mask, cos, sin = self.layers[layer]
        return dataclasses.replace(self, mask=mask, cos=cos, sin=sin)


class DecoderGraph:
    """The skeleton and shared layers; subclasses define `block` and the names below."""

    EMBED = "model.embed_tokens.weight"
    FINAL_NORM = "model.norm"
    LM_HEAD = "lm_head"

    def __init__(self, config: Any, tensor: Callable[[str], np.ndarray], dtype: str,
                 kv_block_size: int, weights_rounded_to: str | None = None):
        self.c = config
        self.tensor = tensor
        self.rounding = np_dtype(weights_rounded_to) if weights_rounded_to else None
        self.dtype = dtype
        self.elem = onnx_type(dtype)
        self.bs = kv_block_size
        self.g = GraphBuilder(config.architecture)

    def block(self, layer: int, h: str, step: Step, cache: str) -> tuple[str, str]:
        """One decoder layer: returns (h, the layer's updated KV pool)."""
        raise NotImplementedError

    # --- the skeleton --------------------------------------------------------------------------

    def build(self) -> GraphBuilder:
        c, g = self.c, self.g
        ids = g.input(contract.INPUT_IDS, I32, ["num_tokens"])
        step = self.step_values()
        last = g.input(contract.LAST_TOKEN_ROWS, I32, ["batch"])
        kv_shape = [2, "num_blocks", c.num_key_value_heads, self.bs, c.head_dim]
        caches = [g.input(contract.kv_cache_input(i), self.elem, kv_shape)
                  for i in range(c.num_hidden_layers)]
        embed = self.weight(self.EMBED, (c.vocab_size, c.hidden_size))
        h = self.embed(embed, ids, step)                                  # [T, hidden]
        for i in range(c.num_hidden_layers):
            with g.scope(f"layers.{i}"):
                h, caches[i] = self.block(i, h, step.for_layer(i), caches[i])
        with g.scope("head"):
            h = self.final_norm(g.Gather(h, last))                        # [B, hidden]
            if c.tie_word_embeddings:   # the embedding table, read as [vocab, hidden]
                logits = g.Gemm(h, embed, transB=1)
            else:
                logits = self.linear(h, self.LM_HEAD, c.vocab_size, c.hidden_size)
            g.output(self.final_logits(g.Cast(logits, to=F32)), contract.LOGITS, F32,
                     ["batch", c.vocab_size])
        for i, cache in enumerate(caches):
            g.output(cache, contract.kv_cache_output(i), self.elem, kv_shape)
        return g

    # what a family may change around the blocks (Gemma 2: a scaled embedding, per-layer
    # windows, soft-capped logits; Gemma 3: per-layer RoPE frequencies; GPT-2: learned
    # positions, LayerNorm, no RoPE)

    def embed(self, table: str, ids: str, step: Step) -> str:
        return self.g.Gather(table, ids)

    def final_norm(self, h: str) -> str:
        return self.rms_norm(h, self.FINAL_NORM)

    def window(self, layer: int) -> int:
        """The layer's sliding window in tokens, 0 for none."""
        return self.c.sliding_window or 0

    def inv_freq(self, layer: int) -> np.ndarray | None:
        """The layer's RoPE inverse frequencies [head_dim / 2]; None: no RoPE."""
        return self.c.inv_freq()

    def final_logits(self, logits: str) -> str:
        """float32 [B, vocab] -> the logits the engine returns."""
        return logits

    # --- weights -------------------------------------------------------------------------------

    def weight(self, name: str, shape: tuple[int, ...], transpose: bool = False,
               convert: Callable[[np.ndarray], np.ndarray] | None = None) -> str:
        """A checkpoint tensor (HF name); linear weights are stored [in, out] so MatMul needs
        no transpose (the passes match MatMul). `convert` changes the checkpoint's float32
        values first (Gemma's 1 + w norm weights), as HF does in float32."""
        read, dt = self._reader(name), np_dtype(self.dtype)

        def load():
            w = read()
            if convert is not None:
                w = convert(w.astype(np.float32))
            if transpose:   # converted in the source's layout (one contiguous pass), then
                return transposed(w.astype(dt, copy=False))   # transposed a tile at a time
            return w.astype(dt)

        out_shape = tuple(reversed(shape)) if transpose else shape
        return self.g.weight(name, self.dtype, out_shape, load)

    def _reader(self, name: str) -> Callable[[], np.ndarray]:
        """A checkpoint tensor as stored, rounded first where the build says so (e.g. bf16
        weights computed in fp32 on onnxruntime)."""
        tensor, rounding = self.tensor, self.rounding

        def read():
            w = tensor(name)
            return w.astype(rounding) if rounding is not None else w
        return read

    def linear(self, x: str, name: str, n_out: int, n_in: int, bias: bool = False) -> str:
        y = self.g.MatMul(x, self.weight(f"{name}.weight", (n_out, n_in), transpose=True))
        return self.g.Add(y, self.weight(f"{name}.bias", (n_out,))) if bias else y

    # --- layers --------------------------------------------------------------------------------

    def rms_norm(self, x: str, name: str, width: int | None = None) -> str:
        """HF semantics: normalise in float32, cast back, then scale by the weight.
        Over the last axis, `width` wide (default hidden_size; head_dim for a per-head norm)."""
        g = self.g
        x32 = g.Cast(x, to=F32)
        var = g.ReduceMean(g.Mul(x32, x32), g.const([-1]), keepdims=1)
        inv = g.Reciprocal(g.Sqrt(g.Add(var, g.const(self.c.rms_norm_eps, np.float32))))
        y = g.Cast(g.Mul(x32, inv), to=self.elem)
        return g.Mul(y, self.norm_weight(name, width or self.c.hidden_size))

    def norm_weight(self, name: str, width: int) -> str:
        return self.weight(f"{name}.weight", (width,))

    def layer_norm(self, x: str, name: str, eps: float) -> str:
        """HF's nn.LayerNorm over hidden_size: normalise in float32, cast back, then scale by
        the weight and shift by the bias (the form passes/norms.py matches)."""
        g, n = self.g, self.c.hidden_size
        x32 = g.Cast(x, to=F32)
        centred = g.Sub(x32, g.ReduceMean(x32, g.const([-1]), keepdims=1))
        var = g.ReduceMean(g.Mul(centred, centred), g.const([-1]), keepdims=1)
        inv = g.Reciprocal(g.Sqrt(g.Add(var, g.const(eps, np.float32))))
        y = g.Cast(g.Mul(centred, inv), to=self.elem)
        return g.Add(g.Mul(y, self.weight(f"{name}.weight", (n,))),
                     self.weight(f"{name}.bias", (n,)))

    def swiglu_mlp(self, x: str, p: str, bias: bool = False) -> str:
        """down(silu(gate(x)) * up(x)), HF's gate_proj / up_proj / down_proj."""
        c = self.c
        gate = self.linear(x, f"{p}.gate_proj", c.intermediate_size, c.hidden_size, bias)
        up = self.linear(x, f"{p}.up_proj", c.intermediate_size, c.hidden_size, bias)
        act = self.swiglu(gate, up)
        return self.linear(act, f"{p}.down_proj", c.hidden_size, c.intermediate_size, bias)

    def swiglu(self, gate: str, up: str) -> str:
        """silu(gate) * up, the form passes/activations.py matches."""
        g = self.g
        return g.Mul(g.Mul(gate, g.Sigmoid(gate)), up)

    def gelu_tanh(self, x: str) -> str:
        """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), HF's gelu_pytorch_tanh."""
        g, dt = self.g, np_dtype(self.dtype)
        inner = g.Add(x, g.Mul(g.const(0.044715, dt), g.Mul(g.Mul(x, x), x)))
        t = g.Tanh(g.Mul(g.const(np.sqrt(2 / np.pi), dt), inner))
        return g.Mul(g.Mul(g.const(0.5, dt), x), g.Add(g.const(1.0, dt), t))

    def routed_experts(self, x: str, router: str, gate_up: str, down: str, num_experts: int,
                       inter: int, top_k: int, renormalise: bool) -> str:
        """A mixture of SwiGLU experts over x [T, hidden]: each token goes to the top_k
        experts of softmax(router(x)) (float32; renormalise: the k weights divided by their
        sum) and takes the sum of their outputs times those weights.

        gate_up [E, hidden, 2 inter] and down [E, inter, hidden] are the experts' weights,
        stacked (`expert_weights`). Routing is a gather and a scatter: TopK picks each token's
        experts and weights, ScatterElements spreads them into [T, E] with 0 for the experts
        a token was not routed to. Every expert then runs on every token as one batched GEMM
        and the outputs are weighted by that table, so an unrouted expert adds exactly 0:
        the same sum as running each expert on its own tokens, at E / top_k times the
        FLOPs. The routed form (NonZero, rows gathered per expert) is data-dependent in
        shape, which TensorRT-RTX 1.7 cannot build (its NonZero is a plugin it lacks); a
        grouped GEMM over routed rows is a backend's kernel, not this reference graph."""
        g, c = self.g, self.c
        logits = self.linear(x, router, num_experts, c.hidden_size)             # [T, E]
        probs = g.Softmax(g.Cast(logits, to=F32), axis=-1)
        top, chosen = g.TopK(probs, g.const([top_k]), axis=-1, outputs=2)       # [T, k]
        if renormalise:
            top = g.Div(top, g.ReduceSum(top, g.const([-1]), keepdims=1))
        weights = g.ScatterElements(g.ConstantOfShape(g.Shape(probs)), chosen, top,
                                    axis=1)                                      # [T, E]
        gate, up = self.split(g.MatMul(x, gate_up), [inter, inter])             # [E, T, I]
        y = g.Cast(g.MatMul(self.swiglu(gate, up), down), to=F32)               # [E, T, H]
        weighted = g.Mul(y, g.Unsqueeze(g.Transpose(weights, perm=[1, 0]), g.const([2])))
        return g.Cast(g.ReduceSum(weighted, g.const([0]), keepdims=0), to=self.elem)

    def expert_weights(self, name: str, experts: list[list[str]], shape: tuple[int, ...]
                       ) -> str:
        """[E, in, out] from each expert's checkpoint tensors ([out_j, in] each, joined
        along out in the order given: gate then up), as MatMul reads them."""
        parts = [[self._reader(n) for n in names] for names in experts]
        dt = np_dtype(self.dtype)

        def load():   # each expert converted, then transposed a tile at a time into place
            out = np.empty((len(parts), *shape[1:]), dt)
            for e, rs in enumerate(parts):
                transposed(np.concatenate([r() for r in rs], axis=0).astype(dt, copy=False),
                           out[e])
            return out

        return self.g.weight(name, self.dtype, shape, load,
                             stacked=tuple(tuple(names) for names in experts))

    def split(self, x: str, sizes: list[int]) -> list[str]:
        """x's last axis cut into parts of `sizes` (a checkpoint's fused projection)."""
        return self.g.Split(x, self.g.const(sizes), axis=-1, outputs=len(sizes))

    def heads(self, x: str, n_heads: int) -> str:
        """[T, H*D] -> [T, H, D]."""
        return self.g.Reshape(x, self.g.const([0, n_heads, self.c.head_dim]))

    def rope(self, x: str, s: Step) -> str:
        """Rotate-half RoPE on [T, H, D]: x * cos + rotate_half(x) * sin."""
        g, half = self.g, self.c.head_dim // 2
        x1 = g.Slice(x, g.const([0]), g.const([half]), g.const([-1]))
        x2 = g.Slice(x, g.const([half]), g.const([2 * half]), g.const([-1]))
        rotated = g.Concat(g.Neg(x2), x1, axis=-1)
        return g.Add(g.Mul(x, s.cos), g.Mul(rotated, s.sin))

    def paged_attention(self, q: str, k: str, v: str, s: Step, cache: str,
                        scale: float | None = None, softcap: float | None = None
                        ) -> tuple[str, str]:
        """q [T, Hq, D], k/v [T, Hkv, D] -> ([T, Hq*D], the updated pool).

        Write this step's K/V rows into their blocks, then every token gathers its own
        sequence's blocks back and attends (GQA) to the keys the step's mask lets it see.
        softcap (Gemma 2): the scaled scores become cap * tanh(scores / cap) before the mask."""
        c, g = self.c, self.g
        hq, hkv, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        new_kv = g.Concat(g.Unsqueeze(k, g.const([0])), g.Unsqueeze(v, g.const([0])), axis=0)
        cache = g.ScatterND(cache, s.write_index, new_kv)                 # [2, NB, Hkv, BS, D]
        ctx = g.Gather(cache, s.token_blocks, axis=1)                   # [2, T, MB, Hkv, BS, D]
        ctx = g.Reshape(g.Transpose(ctx, perm=[0, 1, 3, 2, 4, 5]),
                        g.const([2, 0, hkv, -1, d]))                      # [2, T, Hkv, C, D]
        keys = g.Gather(ctx, g.const(0), axis=0)                          # [T, Hkv, C, D]
        values = g.Gather(ctx, g.const(1), axis=0)

        qg = g.Reshape(q, g.const([0, hkv, hq // hkv, d]))                # [T, Hkv, G, D]
        scores = g.MatMul(qg, g.Transpose(keys, perm=[0, 1, 3, 2]))       # [T, Hkv, G, C]
        scale = d ** -0.5 if scale is None else scale
        scores = g.Mul(g.Cast(scores, to=F32), g.const(scale, np.float32))
        if softcap:
            cap = g.const(softcap, np.float32)
            scores = g.Mul(g.Tanh(g.Div(scores, cap)), cap)
        probs = g.Cast(g.Softmax(g.Add(scores, s.mask), axis=-1), to=self.elem)
        return g.Reshape(g.MatMul(probs, values), g.const([0, hq * d])), cache  # [T, Hq*D]

    # --- per-step values -----------------------------------------------------------------------

    def step_values(self) -> Step:
        c, g = self.c, self.g
        with g.scope("step"):
            pos = g.input(contract.POSITION_IDS, I32, ["num_tokens"])
            starts = g.input(contract.SEQ_STARTS, I32, ["batch_plus_one"])
            ctx_lens = g.input(contract.CONTEXT_LENS, I32, ["batch"])
            tables = g.input(contract.BLOCK_TABLES, I32, ["batch", "max_blocks"])

            seq, n_tok = contract.token_sequences(g, pos, starts)
            token_blocks = contract.token_block_tables(g, tables, seq)
            pos64 = g.Cast(pos, to=I64)
            bs = g.const(self.bs)
            write_index = contract.kv_write_index(g, token_blocks, pos64, n_tok,
                                                  g.const([c.num_key_value_heads]), bs)
            # one mask per distinct window and one cos/sin pair per distinct frequency table,
            # shared by the layers that use them
            masks, ropes, layers = {}, {None: (None, None)}, []
            for i in range(c.num_hidden_layers):
                w, freq = self.window(i), self.inv_freq(i)
                if w not in masks:
                    lowest = None
                    if w:   # passes/attention.py reads W back from this Sub
                        lowest = g.Sub(g.Unsqueeze(pos64, g.const([1])), g.const(w))
                    masks[w] = contract.key_mask(g, tables, ctx_lens, seq, pos64, bs, lowest)
                key = None if freq is None else freq.astype(np.float32).tobytes()
                if key not in ropes:
                    ropes[key] = self._rope_table(pos64, freq.astype(np.float32))
                layers.append((masks[w], *ropes[key]))
        mask, cos, sin = layers[0]
        return Step(pos, cos, sin, write_index, token_blocks, mask, tuple(layers))

    def _rope_table(self, pos64: str, inv_freq: np.ndarray) -> tuple[str, str]:
        """cos and sin [T, 1, D] of each token's position times inv_freq."""
        g = self.g
        freqs = g.Mul(g.Cast(g.Unsqueeze(pos64, g.const([1])), to=F32),
                      g.const(inv_freq[None, :], np.float32))                 # [T, D/2]
        emb = g.Unsqueeze(g.Concat(freqs, freqs, axis=-1), g.const([1]))      # [T, 1, D]
        return g.Cast(g.Cos(emb), to=self.elem), g.Cast(g.Sin(emb), to=self.elem)


def graph_builder(cls: type[DecoderGraph]):
    """A family's build_graph for its DecoderGraph subclass: returns (onnx.ModelProto,
    lazy weights) of one engine step."""
    def build_graph(config, tensor, dtype: str, kv_block_size: int,
                    weights_rounded_to: str | None = None):
        g = cls(config, tensor, dtype, kv_block_size, weights_rounded_to).build()
        return g.model(), g.weights
    return build_graph
