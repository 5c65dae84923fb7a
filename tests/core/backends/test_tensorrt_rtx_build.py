"""The real TensorRT-RTX builder parses and builds every model graph on the CPU.

Each family and variant, and SmolLM2, go through `llmc build --backend tensorrt-rtx`; the
test reads back the parsed network's inputs, outputs and optimization profile from the engine
header (recorded there by the lowering, read from TensorRT's own objects).
"""

from __future__ import annotations

import pytest

from llmc.build import BuildOptions, build
from llmc.contract import dim_ranges
from llmc.engine_file import EngineFile
from llmc.limits import BuildLimits

pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 is not installed")

LIMITS = BuildLimits(max_batch_size=4, max_num_tokens=64, max_seq_len=128, kv_block_size=16)
TRT_DTYPE = {"float32": "FLOAT", "float16": "HALF", "bfloat16": "BF16"}


def _check_network(header, cfg_layers, kv_heads, head_dim, vocab, dtype):
    net = header.lowering
    inputs = {t["name"]: t for t in net["inputs"]}
    outputs = {t["name"]: t for t in net["outputs"]}
    control = ["input_ids", "position_ids", "seq_starts", "context_lens", "block_tables",
               "last_token_rows"]
    assert set(inputs) == set(control) | {f"kv_cache_{i}" for i in range(cfg_layers)}
    assert set(outputs) == {"logits"} | {f"kv_cache_out_{i}" for i in range(cfg_layers)}
    assert all(inputs[n]["dtype"] == "INT32" for n in control)
    assert outputs["logits"]["dtype"] == "FLOAT" and outputs["logits"]["shape"] == [-1, vocab]
    kv = inputs["kv_cache_0"]
    assert kv["dtype"] == TRT_DTYPE[dtype] and kv["shape"] == [2, -1, kv_heads, 16, head_dim]
    ranges = dim_ranges(LIMITS)
    profile = net["profile"]
    assert [list(s) for s in profile["input_ids"]] == [[v] for v in ranges["num_tokens"]]
    assert [list(s) for s in profile["block_tables"]] == [
        [b, m] for b, m in zip(ranges["batch"], ranges["max_blocks"])]
    assert [list(s) for s in profile["kv_cache_0"]] == [
        [2, n, kv_heads, 16, head_dim] for n in ranges["num_blocks"]]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("kind", ["llama-gqa", "llama-tied-rope3", "mistral-window",
                                  "qwen2-bias", "phi3-window", "qwen3-qknorm",
                                  "gemma2-softcap", "gemma3-local-global",
                                  "gpt2-learned-pos", "mixtral-top2", "qwen2moe-shared",
                                  "qwen3moe-qknorm"])
def test_tiny_models_build(tiny_models, tmp_path, kind, dtype):
    folder, model = tiny_models[kind]
    out = tmp_path / "m.engine"
    lines: list[str] = []
    header = build(BuildOptions(folder, out, backend="tensorrt-rtx", dtype=dtype,
                                limits=LIMITS), log=lines.append)
    # the inlined function bodies are named per instance: no "A node named ... already exists"
    assert not [x for x in lines if "WARNING" in x], lines
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", c.num_attention_heads)   # GPT-2: MHA
    _check_network(header, c.num_hidden_layers, kv_heads, head_dim, c.vocab_size, dtype)
    e = EngineFile(out)
    assert e.header.backend == "tensorrt-rtx" and len(e.section("plan")) > 0


@pytest.mark.slow
def test_smollm2_builds(smollm2_path, tmp_path):
    out = tmp_path / "smollm2.engine"
    header = build(BuildOptions(smollm2_path, out, backend="tensorrt-rtx", dtype="float16",
                                limits=LIMITS), log=lambda _: None)
    _check_network(header, 30, 3, 64, 49152, "float16")
    # the fp16 weights (134.5M parameters) are in the plan
    assert header.lowering["plan_bytes"] > 2 * 134_000_000
