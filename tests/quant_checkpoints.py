"""Pre-quantized checkpoints in the formats of other quantizers, written by the tests from a
tiny model's folder exactly as those tools lay them out (the tools themselves are not test
dependencies): every decoder GEMM quantized, the embeddings and LM head left 16-bit."""

from __future__ import annotations

import json
import shutil

import numpy as np
from safetensors.numpy import load_file, save_file

from llmc.quantization.prequantized import AWQ_ORDER


def pack_cols(u, order=tuple(range(8))):
    """Codes [rows, cols] -> int32 [rows, cols / 8]: nibble i (from the low one) of word c
    holds column 8c + order[i]."""
    u = u.astype(np.uint32).reshape(u.shape[0], -1, 8)
    words = np.zeros(u.shape[:2], np.uint32)
    for i, col in enumerate(order):
        words |= u[:, :, col] << (4 * i)
    return words.view(np.int32)


def with_config(src, out, quantization_config):
    """Finish the checkpoint in `out`: src's config.json with this quantization_config, and
    src's tokenizer files."""
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (out / "config.json").write_text(json.dumps(config))
    for f in src.glob("*token*"):
        shutil.copy(f, out)
    return out


def autoawq_checkpoint(src, out, group):
    """`src` in AutoAWQ's GEMM format, as its quantizer writes it (min/max per block of
    `group` along in, 15 steps, zero points; qweight/qzeros packed eight to an int32 in
    AWQ's column order)."""
    out.mkdir(parents=True)
    tensors = load_file(src / "model.safetensors")
    for name in [n for n in tensors if ".layers." in n and n.endswith("_proj.weight")]:
        w = tensors.pop(name).astype(np.float32).T                        # [in, out]
        blocks = w.reshape(w.shape[0] // group, group, w.shape[1])
        lo, hi = blocks.min(1), blocks.max(1)
        scale = (np.maximum(hi - lo, 1e-5) / 15).astype(np.float16)
        s = scale.astype(np.float32)[:, None, :]
        zero = np.clip(np.round(-lo / scale.astype(np.float32)), 0, 15)
        u = np.clip(np.round(blocks / s) + zero[:, None, :], 0, 15).reshape(w.shape)
        base = name.removesuffix("weight")
        tensors.update({base + "qweight": pack_cols(u, AWQ_ORDER),
                        base + "qzeros": pack_cols(zero, AWQ_ORDER),
                        base + "scales": scale})
    save_file(tensors, out / "model.safetensors")
    return with_config(src, out, {"quant_method": "awq", "bits": 4, "group_size": group,
                                  "zero_point": True, "version": "gemm"})


def gptq_checkpoint(src, out, group, sym=True, fmt="gptq", act_order=False, seed=0,
                    lm_head=False):
    """`src` in GPTQ's format (AutoGPTQ / GPTQModel): qweight int32 [in / 8, out] packed along
    in, qzeros int32 [in / B, out / 8] packed along out (format "gptq" stores z - 1), scales
    fp16 [in / B, out], g_idx [in]; group -1: one group a row. The codes are plain rounding
    (GPTQ's error feedback changes which codes, not the format): sym, scale 2 |max| / 15 and
    z = 8; otherwise min/max with z in 1..15. act_order: the rows of a block scattered by a
    random permutation, as desc_act orders them. lm_head: the (untied) LM head quantized too,
    as GPTQModel's lm_head=True does."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True)
    tensors = load_file(src / "model.safetensors")
    for name in [n for n in tensors if ".layers." in n and n.endswith("_proj.weight")
                 or lm_head and n == "lm_head.weight"]:
        w = tensors.pop(name).astype(np.float32).T                        # [in, out]
        k = w.shape[0]
        size = k if group == -1 else group   # -1: one group a row, as GPTQ writes it
        g_idx = np.arange(k) // size
        if act_order:
            g_idx[rng.permutation(k)] = np.arange(k) // size
        scale = np.empty((k // size, w.shape[1]), np.float16)
        zero = np.empty(scale.shape, np.int64)
        for g in range(k // size):
            rows = w[g_idx == g]
            lo, hi = rows.min(0), rows.max(0)
            if sym:
                scale[g], zero[g] = np.maximum(2 * np.maximum(-lo, hi), 1e-5) / 15, 8
            else:
                scale[g] = np.maximum(hi - lo, 1e-5) / 15
                zero[g] = np.clip(np.round(-lo / scale[g].astype(np.float32)), 1, 15)
        s, z = scale.astype(np.float32)[g_idx], zero[g_idx]
        u = np.clip(np.round(w / s) + z, 0, 15)
        base = name.removesuffix("weight")
        tensors.update({base + "qweight": np.ascontiguousarray(pack_cols(u.T).T),   # along in
                        base + "qzeros": pack_cols(zero - (fmt == "gptq")),
                        base + "scales": scale, base + "g_idx": g_idx.astype(np.int32)})
    save_file(tensors, out / "model.safetensors")
    return with_config(src, out, {"quant_method": "gptq", "bits": 4, "group_size": group,
                                  "desc_act": act_order, "sym": sym, "checkpoint_format": fmt,
                                  "lm_head": lm_head,
                                  "meta": {"quantizer": ["gptqmodel:2.2.0"]}})


def compressed_tensors_checkpoint(src, out, group, sym=True, act_order=False, seed=0):
    """`src` as llm-compressor saves a W4A16 model: compressed-tensors' pack-quantized format,
    the codes and zero points packed by compressed-tensors' own `pack_to_int32`, the config
    from its `QuantizationConfig` (so HF transformers, which decompresses through the same
    library, reads it back). Codes by plain rounding: sym, q = round(w / s) with s = |max| /
    7.5, as compressed-tensors' symmetric observer; otherwise min/max over 15 steps and a zero
    point zp in [-8, 7], W = (q - zp) s. act_order: actorder "group" as compressed-tensors
    before 0.20 saved it, the rows of a group scattered by a random permutation and named by
    weight_g_idx. group -1: one scale a row (strategy "channel")."""
    import torch
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
    )

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True)
    tensors = load_file(src / "model.safetensors")
    for name in [n for n in tensors if ".layers." in n and n.endswith("_proj.weight")]:
        w = tensors.pop(name).astype(np.float32)                          # [out, in]
        n, k = w.shape
        size = k if group == -1 else group
        g_idx = np.arange(k) // size
        if act_order:
            g_idx[rng.permutation(k)] = np.arange(k) // size
        scale = np.empty((n, k // size), np.float16)
        zp = np.zeros(scale.shape, np.int64)
        for g in range(k // size):
            cols = w[:, g_idx == g]
            lo, hi = np.minimum(cols.min(1), 0), np.maximum(cols.max(1), 0)
            if sym:
                scale[:, g] = np.maximum(np.maximum(-lo, hi), 1e-5) / 7.5
            else:
                scale[:, g] = np.maximum(hi - lo, 1e-5) / 15
                zp[:, g] = np.clip(-8 - np.round(lo / scale[:, g].astype(np.float32)), -8, 7)
        s, z = scale.astype(np.float32)[:, g_idx], zp[:, g_idx]
        q = np.clip(np.round(w / s) + z, -8, 7).astype(np.int8)
        base = name.removesuffix("weight")
        tensors[base + "weight_packed"] = pack_to_int32(torch.from_numpy(q), 4).numpy()
        tensors[base + "weight_scale"] = scale
        tensors[base + "weight_shape"] = np.array([n, k], np.int64)
        if not sym:
            tensors[base + "weight_zero_point"] = pack_to_int32(
                torch.from_numpy(zp.astype(np.int8)), 4, packed_dim=0).numpy()
        if act_order:
            tensors[base + "weight_g_idx"] = g_idx.astype(np.int32)
    save_file(tensors, out / "model.safetensors")
    args = QuantizationArgs(num_bits=4, type="int", symmetric=sym, strategy="channel") \
        if group == -1 else QuantizationArgs(num_bits=4, type="int", symmetric=sym,
                                             strategy="group", group_size=group)
    qc = QuantizationConfig(config_groups={"group_0": QuantizationScheme(
        targets=["Linear"], weights=args)}, format="pack-quantized",
        quantization_status="compressed", ignore=["lm_head"]).model_dump(mode="json")
    if act_order:   # what earlier compressed-tensors versions wrote (0.20 no longer takes it)
        qc["config_groups"]["group_0"]["weights"]["actorder"] = "group"
    return with_config(src, out, {**qc, "quant_method": "compressed-tensors"})


def compressed_tensors_fp8_checkpoint(src, out, strategy="channel", dynamic=False, kv=False):
    """`src` as llm-compressor saves an FP8 model (its FP8 and FP8_DYNAMIC schemes):
    compressed-tensors' float-quantized format, the config from its `QuantizationConfig`.
    Weights E4M3 with a scale a row ("channel") or one a weight ("tensor"), |max| / 448, as
    its min-max observer; inputs per tensor with the static scale (input_scale) of their
    |max| / 448 over a forward pass of random tokens, or dynamic per token (no input_scale).
    kv: an FP8 KV-cache scheme too, each layer's self_attn.k_scale and v_scale the |max| / 448
    of its k_proj and v_proj outputs over the same pass (RoPE not applied: the test's choice)."""
    import torch
    import transformers
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
    )
    from safetensors.torch import load_file as load_torch
    from safetensors.torch import save_file as save_torch

    out.mkdir(parents=True)
    tensors = load_torch(src / "model.safetensors")
    names = [n for n in tensors if ".layers." in n and n.endswith("_proj.weight")]
    x_amax, y_amax = {}, {}
    if not dynamic or kv:
        model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)

        def observe(name, x, y):
            x_amax[name], y_amax[name] = x.abs().max().item(), y.abs().max().item()

        hooks = [m.register_forward_hook(lambda m, a, y, name=name: observe(name, a[0], y))
                 for name, m in model.named_modules() if name + ".weight" in names]
        with torch.no_grad():
            model(torch.tensor(np.random.default_rng(0).integers(3, 128, (2, 48))))
        for h in hooks:
            h.remove()
    for layer in sorted({n.split(".")[2] for n in names}) if kv else ():
        for x in "kv":
            tensors[f"model.layers.{layer}.self_attn.{x}_scale"] = torch.tensor(
                [y_amax[f"model.layers.{layer}.self_attn.{x}_proj"] / 448], dtype=torch.float32)
    for name in names:
        w = tensors[name].float()
        amax = w.abs().amax(1, keepdim=True) if strategy == "channel" else \
            w.abs().amax().reshape(1)                                      # [out, 1] or [1]
        scale = (amax / 448).clamp(min=1e-12)
        tensors[name] = (w / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
        base = name.removesuffix("weight")
        tensors[base + "weight_scale"] = scale.to(torch.float32)
        if not dynamic:
            tensors[base + "input_scale"] = torch.tensor([x_amax[name.removesuffix(".weight")]
                                                          / 448], dtype=torch.float32)
    save_torch(tensors, out / "model.safetensors")
    weights = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy=strategy)
    inputs = QuantizationArgs(num_bits=8, type="float", symmetric=True,
                              strategy="token" if dynamic else "tensor", dynamic=dynamic)
    kv_scheme = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="tensor",
                                 dynamic=False) if kv else None
    qc = QuantizationConfig(config_groups={"group_0": QuantizationScheme(
        targets=["Linear"], weights=weights, input_activations=inputs)},
        format="float-quantized", quantization_status="compressed", kv_cache_scheme=kv_scheme,
        ignore=["lm_head"]).model_dump(mode="json")
    return with_config(src, out, {**qc, "quant_method": "compressed-tensors"})


def fp8_block_checkpoint(src, out, block=(128, 128), fmt="fp8"):
    """`src` as a block-wise FP8 checkpoint: each weight in [bn, bk] blocks, E4M3 of w over
    the block's |max| / 448. fmt "fp8": HF transformers' fine-grained FP8, as DeepSeek-V3 and
    Qwen3's FP8 releases store it (quant_method fp8, weight_block_size; the scales as
    X.weight_scale_inv [ceil(out / bn), ceil(in / bk)], W = weight * scale_inv);
    "compressed-tensors": llm-compressor's FP8_BLOCK (strategy block, block_structure; the
    same scales as X.weight_scale), its config from compressed-tensors' QuantizationConfig.
    A mixture of experts as Qwen3-30B-A3B-FP8 stores it: every expert's projections so
    (Qwen2/3-MoE's experts.J.{gate,up,down}_proj, Mixtral's experts.J.w1/w2/w3), the routers
    (mlp.gate, block_sparse_moe.gate) and Qwen2-MoE's shared_expert_gate left as they are and
    named in modules_to_not_convert (compressed-tensors: ignore)."""
    import re

    import torch
    from safetensors.torch import load_file as load_torch
    from safetensors.torch import save_file as save_torch

    out.mkdir(parents=True)
    tensors = load_torch(src / "model.safetensors")
    bn, bk = block
    routers = [n.removesuffix(".weight") for n in tensors
               if re.search(r"\.layers\.\d+\.(mlp\.gate|block_sparse_moe\.gate|"
                            r"mlp\.shared_expert_gate)\.weight$", n)]
    for name in [n for n in tensors if ".layers." in n and (
            n.endswith("_proj.weight") or re.search(r"\.experts\.\d+\.w[123]\.weight$", n))]:
        w = tensors[name].float()
        rows, cols = w.shape
        pad = torch.zeros(-(-rows // bn) * bn, -(-cols // bk) * bk)
        pad[:rows, :cols] = w
        blocks = pad.reshape(pad.shape[0] // bn, bn, pad.shape[1] // bk, bk)
        scale = (blocks.abs().amax((1, 3)) / 448).clamp(min=1e-12)     # [rows / bn, cols / bk]
        full = scale.repeat_interleave(bn, 0).repeat_interleave(bk, 1)[:rows, :cols]
        tensors[name] = (w / full).clamp(-448, 448).to(torch.float8_e4m3fn)
        tensors[name.removesuffix("weight") + (
            "weight_scale_inv" if fmt == "fp8" else "weight_scale")] = scale
    save_torch(tensors, out / "model.safetensors")
    if fmt == "fp8":
        return with_config(src, out, {"quant_method": "fp8", "activation_scheme": "dynamic",
                                      "fmt": "e4m3", "weight_block_size": list(block)} | (
            {"modules_to_not_convert": ["lm_head", *routers]} if routers else {}))
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
    )

    weights = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="block",
                               block_structure=list(block))
    inputs = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="group",
                              group_size=bk, dynamic=True)
    qc = QuantizationConfig(config_groups={"group_0": QuantizationScheme(
        targets=["Linear"], weights=weights, input_activations=inputs)},
        format="float-quantized", quantization_status="compressed",
        ignore=["lm_head", *routers]).model_dump(mode="json")
    return with_config(src, out, {**qc, "quant_method": "compressed-tensors"})
