"""GGUF files of the tiny models in llama.cpp's conventions, and the round-trip check: llmc
reads the file to the logits transformers' own GGUF loader gets from it."""

from __future__ import annotations

from collections.abc import Callable

import gguf
import numpy as np
import torch
from hf_steps import OrtStepSession, check_ragged_steps

from llmc.model_zoo import load_model
from llmc.passes import run_passes

BLOCK = 8


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's Q/K row permutation."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
             .swapaxes(1, 2).reshape(w.shape))


def permuted_qk(cfg) -> Callable[[str, np.ndarray], np.ndarray]:
    """write_gguf's convert for llama-layout files: Q and K rows permuted as
    convert_hf_to_gguf.py permutes them, every other tensor as it is."""
    def convert(name: str, t: np.ndarray) -> np.ndarray:
        if name.endswith("q_proj.weight"):
            return permute_qk(t, cfg.num_attention_heads)
        if name.endswith("k_proj.weight"):
            return permute_qk(t, cfg.num_key_value_heads)
        return t
    return convert


def write_gguf(path, arch: str, model, names: dict[str, str],
               meta: Callable[[gguf.GGUFWriter], None],
               convert: Callable[[str, np.ndarray], np.ndarray] = lambda name, t: t,
               extra: dict[str, np.ndarray] | None = None, state: dict | None = None,
               quantize: Callable[[str, np.ndarray], tuple | None] = lambda name, t: None
               ) -> None:
    """Every tensor of `model` (or of `state`, tensors under the names the table uses)
    under its llama.cpp name (`names`: a family's GGUF table, llama.cpp name -> HF name
    with {i} for the layer), changed by `convert` the way llama.cpp's convert_hf_to_gguf.py
    changes it, stored as `quantize` says (its bytes and GGML type, or None: as it is), and
    `extra` tensors under llama.cpp names; `meta` writes the metadata."""
    hf_to_gguf = {hf: g for g, hf in names.items()}
    w = gguf.GGUFWriter(path, arch)
    meta(w)
    for name, t in (model.state_dict() if state is None else state).items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue   # llama.cpp stores no output.weight for a tied head
        parts = name.split(".")
        # the layer index is the first number in the name (model.layers.3., transformer.h.3.)
        at = next((k for k, p in enumerate(parts) if p.isdigit()), None)
        key = ".".join(parts[:at] + ["{i}"] + parts[at + 1:]) if at is not None else name
        g = hf_to_gguf[key].replace("{i}", parts[at]) if at is not None else hf_to_gguf[key]
        t = convert(name, t.detach().float().numpy() if isinstance(t, torch.Tensor) else t)
        stored = quantize(name, t)
        if stored is None:
            w.add_tensor(g, t)
        else:
            w.add_tensor(g, stored[0], raw_dtype=stored[1])
    for g, t in (extra or {}).items():
        w.add_tensor(g, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def stacked_experts_state(model, moe_intermediate_size: int) -> dict[str, np.ndarray]:
    """A transformers 5 MoE model's state (experts held as [E, 2I, H] gate_up and [E, H, I]
    down tensors) under the stacked names the Qwen MoE families' GGUF tables use, as
    convert_hf_to_gguf.py stacks each layer's experts; every other tensor as it is."""
    state, inter = {}, moe_intermediate_size
    for name, t in model.state_dict().items():
        t = t.detach().float().numpy()
        layer = ".".join(name.split(".")[:3])
        if name.endswith(".mlp.experts.gate_up_proj"):
            state[f"{layer}.mlp.experts.gate_proj.stacked"] = t[:, :inter]
            state[f"{layer}.mlp.experts.up_proj.stacked"] = t[:, inter:]
        elif name.endswith(".mlp.experts.down_proj"):
            state[f"{layer}.mlp.experts.down_proj.stacked"] = t
        else:
            state[name] = t
    return state


def common_meta(w: gguf.GGUFWriter, cfg, head_dim: bool = False) -> None:
    """The keys llama.cpp writes for every llama-shaped architecture; head_dim: the key and
    value lengths too (the architectures whose head_dim is not hidden / heads)."""
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    rope = cfg.rope_parameters
    rope = rope.get("full_attention", rope)   # Gemma 3: the global layers' theta
    w.add_rope_freq_base(float(rope["rope_theta"]))
    w.add_vocab_size(cfg.vocab_size)   # no tokenizer in these files: the size says it
    # special tokens inside the tiny vocabulary (transformers' defaults may lie outside it)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    if head_dim:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)


def qwen3moe_meta(w: gguf.GGUFWriter, cfg) -> None:
    """common_meta and the keys llama.cpp's qwen3moe adds: head_dim, the experts."""
    common_meta(w, cfg, head_dim=True)
    w.add_expert_count(cfg.num_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)


def check_against_transformers(path, tmp_path, label: str, ref=None) -> None:
    """transformers' GGUF loader and llmc (through the passes, on onnxruntime) read `path`
    to the same logits over the ragged prefill / decode / mixed steps, in fp32. ref: the
    model to compare with where transformers' loader cannot read the architecture."""
    from transformers import AutoModelForCausalLM

    if ref is None:
        ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                   dtype=torch.float32).eval()
    m = load_model(path)
    m.check_tensors()
    model, weights = m.build_graph("float32", BLOCK)
    fused, fused_weights, _ = run_passes(model, weights)
    session = OrtStepSession(fused, fused_weights, tmp_path / "graph", m.config, BLOCK)
    check_ragged_steps(session, ref, BLOCK, "fp32", 1e-4, label)
