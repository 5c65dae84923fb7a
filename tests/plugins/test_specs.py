"""CPU tests of the plugins' plain-Python rules: shapes, launch parameters, serialization."""
import dataclasses
import math
import struct

import pytest

from llmc.plugins import specs

H100 = specs.MAX_SMEM_OPTIN[(9, 0)]


def test_norm_launch_covers_every_element():
    for n in (1, 7, 8, 1000, 4095, 4096, 5120, 8192, 16384, 32768):
        ln = specs.norm_launch(3, n, "bfloat16")
        vec = 8 if n % 8 == 0 else 1
        assert ln.kernel.endswith(f"_v{vec}")
        threads = ln.block[0]
        assert threads % 32 == 0 and threads <= 1024
        assert threads * (32 // vec) * vec >= n  # register budget holds the whole row
        assert ln.grid == (3, 1, 1)
    with pytest.raises(ValueError):
        specs.norm_launch(1, 32769, "bfloat16")
    with pytest.raises(ValueError):
        specs.norm_launch(1, 64, "float32")


def test_norm_names_and_shapes():
    assert specs.norm_launch(1, 64, "float16", "layernorm", True).kernel == "add_layernorm_f16_v8"
    assert specs.norm_output_shapes((5, 64), True) == [(5, 64), (5, 64)]
    assert specs.norm_output_shapes((5, 64), False) == [(5, 64)]


def test_gated_shapes_and_launch():
    assert specs.gated_output_shape((7, 22016)) == (7, 11008)
    with pytest.raises(ValueError):
        specs.gated_output_shape((7, 11))
    ln = specs.gated_launch(7, 11008, "bfloat16", "swiglu", sm_count=132)
    assert ln.kernel == "swiglu_bf16_v8" and ln.grid[0] == 7
    assert ln.grid[1] * ln.block[0] * 8 >= 11008 > (ln.grid[1] - 1) * ln.block[0] * 8
    assert specs.gated_launch(3, 13, "float16", "geglu", 132).kernel == "geglu_f16_v1"
    assert specs.gelu_launch(10, "float16", "none", 132).kernel == "gelu_erf_f16_v1"


def test_rope_shapes_and_names():
    assert specs.rope_output_shapes((9, (32 + 16) * 128), 32, 8, 128) == [
        (9, 32, 128), (9, 8, 128), (9, 8, 128)]
    with pytest.raises(ValueError):
        specs.rope_output_shapes((9, 100), 32, 8, 128)
    ln = specs.rope_launch(9, 32, 8, 128, 64, "bfloat16", interleaved=True, bias=True,
                           write_cache=True)
    assert ln.kernel == "rope_bias_cache_interleaved_bf16" and ln.grid == (9, 1, 1)
    with pytest.raises(ValueError):
        specs.rope_launch(9, 32, 8, 128, 130, "bfloat16")


def test_llama3_inv_freq_matches_transformers():
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import _compute_llama3_parameters

    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
               "rope_theta": 500000.0}
    cfg = LlamaConfig(hidden_size=2048, num_attention_heads=32, rope_parameters=scaling)
    ref, _ = _compute_llama3_parameters(cfg)
    ours = torch.tensor(specs.llama3_inv_freq(64, 500000.0, rope_scaling=scaling))
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours.float(), ref.float(), rtol=1e-6, atol=0)
    plain = specs.llama3_inv_freq(64, 10000.0)
    assert plain[1] == pytest.approx(10000.0 ** (-2 / 64))
    assert plain != ours.tolist()


def test_decode_plan_fills_the_gpu_and_splits_long_contexts():
    big = specs.attention_plan(64, 64, 32, 8, 128, 2048 // 16, 16, "bfloat16", 132, max_smem=H100)
    assert big.decode and big.n_split == 1 and big.reduce is None
    assert big.main.grid == (64, 8, 1) and big.main.smem == specs.decode_smem(128)
    small = specs.attention_plan(2, 2, 32, 8, 128, 32768 // 16, 16, "bfloat16", 132, max_smem=H100)
    assert small.n_split > 1 and small.reduce is not None
    assert small.chunk % specs.ATTN_BN == 0
    assert small.n_split * small.chunk >= 32768 > (small.n_split - 1) * small.chunk
    assert small.main.grid[0] * small.main.grid[1] * small.main.grid[2] >= 2 * 132
    assert small.workspace_bytes == 2 * 32 * small.n_split * 129 * 4
    assert small.reduce.grid == (64, 1, 1)


def test_prefill_plan_tiles_cover_any_ragged_split():
    # tiles = ceil(T/tpt) + B bounds sum_s ceil(n_s/tpt) for every split of T into B parts
    for lens in ([1, 1, 1], [2, 1, 1], [65, 1, 130], [64] * 4, [63, 2, 1000, 5]):
        t, b = sum(lens), len(lens)
        plan = specs.attention_plan(t, b, 12, 4, 64, 64, 32, "float16", 132, max_smem=H100)
        assert plan.decode == (t == b)
        if plan.decode:
            continue
        for variant, warps in specs.PREFILL_WARPS.items():
            for pack in (1, 3):
                p = specs.prefill_plan(t, b, 12, 4, 64, 32, "float16", variant=variant,
                                       pack=pack, max_smem=H100)
                tpt = 16 * warps // pack
                assert p.main.grid[1] >= sum(math.ceil(n / tpt) for n in lens)
                assert p.main.grid[0] == 12 // pack and p.pack == pack
                assert p.main.block == (32 * warps, 1, 1)
        assert plan.pack == 3 and plan.main.kernel.endswith("_" + specs.PREFILL_VARIANT)
        assert plan.kv_write.grid == (t, 1, 1)
    with pytest.raises(ValueError, match="divide"):
        specs.prefill_plan(9, 2, 12, 4, 64, 32, "float16", pack=2, max_smem=H100)
    with pytest.raises(ValueError, match="query tiles"):
        specs.prefill_plan(10**7, 2, 32, 8, 128, 16, "float16", max_smem=H100)
    assert specs.attention_plan(5, 2, 8, 8, 64, 4, 16, "float16", 1, write_kv=False,
                                max_smem=H100).kv_write is None


@pytest.mark.parametrize("bad", [dict(head_dim=96), dict(block_size=8), dict(num_kv_heads=3),
                                 dict(num_q_heads=64, num_kv_heads=2)])
def test_attention_plan_rejects(bad):
    args = dict(tokens=4, batch=2, num_q_heads=8, num_kv_heads=2, head_dim=64, max_blocks=4,
                block_size=16, dtype="float16", sm_count=10)
    args.update(bad)
    with pytest.raises(ValueError):
        specs.attention_plan(**args, max_smem=H100)


def test_smem_fits_hopper_and_ampere():
    for d in specs.HEAD_DIMS:
        for variant in specs.PREFILL_WARPS:  # 99 KB: sm_86/89/120 opt-in limit per block
            assert specs.prefill_smem(d, variant) <= 99 * 1024
        assert specs.decode_smem(d) <= 163 * 1024  # sm_80 opt-in limit per block
        for st in specs.DECODE_STAGES:  # the warps' combine reuses the K/V stages
            assert 4 * 16 * d * 4 + 512 <= specs.decode_smem(d, st) - 16 * d * 2
    assert specs.decode_smem(128) == 100 * 1024 > 99 * 1024  # why the 2-stage entries exist


# (major, minor) -> decode entry suffix at D=128 and D=64; every arch keeps the decode kernel
PLAN_BY_ARCH = {(8, 0): ("", ""), (8, 6): ("_s2", ""), (8, 9): ("_s2", ""),
                (9, 0): ("", ""), (10, 0): ("", ""), (12, 0): ("_s2", "")}


@pytest.mark.parametrize("cap", sorted(PLAN_BY_ARCH))
def test_plan_respects_each_arch_shared_memory(cap):
    smem = specs.max_smem_for_capability(*cap)
    for d, suffix in zip((128, 64), PLAN_BY_ARCH[cap]):
        plan = specs.attention_plan(8, 8, 32, 8, d, 256, 16, "bfloat16", 132, max_smem=smem)
        assert plan.decode and plan.main.kernel == f"attn_decode_bf16_d{d}{suffix}"
        assert plan.main.smem <= smem
        mixed = specs.attention_plan(9, 2, 32, 8, d, 256, 16, "bfloat16", 132, max_smem=smem)
        assert mixed.main.kernel.endswith("_" + specs.PREFILL_VARIANT)
        assert mixed.main.smem <= smem


def test_smem_table_and_fallbacks():
    assert specs.MAX_SMEM_OPTIN == {(8, 0): 166912, (8, 6): 101376, (8, 9): 101376,
                                    (9, 0): 232448, (10, 0): 232448, (12, 0): 101376}
    with pytest.raises(ValueError, match="7.5"):
        specs.max_smem_for_capability(7, 5)
    args = (4, 4, 32, 8, 128, 256, 16, "float16", 132)
    # decode until even 2 stages do not fit, then the prefill kernel, w8s then w4, then none
    expect = [(specs.decode_smem(128, 3), "attn_decode_f16_d128"),
              (specs.decode_smem(128, 3) - 1, "attn_decode_f16_d128_s2"),
              (specs.decode_smem(128, 2), "attn_decode_f16_d128_s2"),
              (specs.decode_smem(128, 2) - 1, "attn_prefill_f16_d128_w8s"),
              (specs.prefill_smem(128, "w8s") - 1, "attn_prefill_f16_d128_w4")]
    for smem, kernel in expect:
        plan = specs.attention_plan(*args, max_smem=smem)
        assert plan.main.kernel == kernel and plan.main.smem <= smem
        assert plan.decode == ("decode" in kernel)
    with pytest.raises(ValueError, match="fits max_smem"):
        specs.attention_plan(*args, max_smem=specs.prefill_smem(128, "w4") - 1)
    with pytest.raises(ValueError, match="over max_smem"):
        specs.decode_plan(4, *args[2:], max_smem=specs.decode_smem(128, 2) - 1)
    with pytest.raises(ValueError, match="over max_smem"):
        specs.prefill_plan(9, 2, 32, 8, 128, 16, "float16", variant="w8s", max_smem=60000)


def test_window_sizes_decode_splits():
    """Splits count from a token's first visible key tile: a window bounds them."""
    args = (2, 32, 8, 128, 32768 // 16, 16, "bfloat16", 132)  # decode_plan: no batch
    full = specs.decode_plan(*args, max_smem=H100)
    win = specs.decode_plan(*args, max_smem=H100, window=1000)
    assert full.window == 0 and win.window == 1000
    # every token's keys [first tile start, p] span < window + 64: covered by the splits
    assert win.n_split * win.chunk >= 1000 + specs.ATTN_BN - 1 > (win.n_split - 1) * win.chunk
    assert 1 < win.n_split < full.n_split and win.chunk % specs.ATTN_BN == 0
    small = specs.decode_plan(*args, max_smem=H100, window=37)
    assert small.n_split == 1 and small.reduce is None and small.workspace_bytes == 0
    # a window past the context changes nothing but the kernel argument
    assert specs.decode_plan(*args, max_smem=H100, window=10**6) == dataclasses.replace(
        full, window=10**6)
    with pytest.raises(ValueError, match="window"):
        specs.decode_plan(*args, max_smem=H100, window=-1)


def test_serialize_roundtrip_and_refusals():
    attrs = dict(num_q_heads=32, num_kv_heads=8, head_dim=128, block_size=32, scale=0.125,
                 write_kv=1, sliding_window=4096)
    blob = specs.serialize("PagedAttention", attrs)
    assert specs.deserialize("PagedAttention", blob) == attrs
    assert len(blob) == 8 + struct.calcsize("<iiiifBi")
    with pytest.raises(ValueError, match="not for|plugin id"):
        specs.deserialize("RmsNorm", blob)
    with pytest.raises(ValueError, match="version"):
        specs.deserialize("PagedAttention", blob[:4] + b"\x09\x00" + blob[6:])
    with pytest.raises(ValueError, match="bytes"):
        specs.deserialize("PagedAttention", blob[:-1])
    with pytest.raises(ValueError, match="missing"):
        specs.serialize("RmsNorm", {"eps": 1e-5})
    rms = specs.deserialize("RmsNorm", specs.serialize("RmsNorm", dict(eps=1e-6, residual=1)))
    assert rms["eps"] == pytest.approx(1e-6) and rms["residual"] == 1


def test_float_bits():
    assert specs.float_bits(1.0) == 0x3F800000
    assert struct.unpack("<f", struct.pack("<i", specs.float_bits(1e-5)))[0] == \
        pytest.approx(1e-5)


def test_paged_attention_attrs_from_onnx_fields_and_record():
    import numpy as np

    onnx = {"num_heads": np.array([32], np.int32), "num_kv_heads": np.array([8], np.int32),
            "head_dim": np.array([128], np.int32), "block_size": np.array([16], np.int32),
            "sliding_window": np.array([0], np.int32)}
    attrs = specs.paged_attention_attrs(onnx)
    assert attrs == dict(num_q_heads=32, num_kv_heads=8, head_dim=128, block_size=16,
                         scale=pytest.approx(128 ** -0.5), write_kv=1, sliding_window=0)
    rec = np.frombuffer(specs.serialize("PagedAttention", attrs), np.uint8)
    assert specs.paged_attention_attrs({"record": rec}) == {**attrs, "scale": pytest.approx(
        attrs["scale"])}  # the record holds scale as fp32
    mistral = specs.paged_attention_attrs({**onnx, "sliding_window": np.array([4096])})
    assert mistral["sliding_window"] == 4096
    rec = np.frombuffer(specs.serialize("PagedAttention", mistral), np.uint8)
    assert specs.paged_attention_attrs({"record": rec})["sliding_window"] == 4096
    assert specs.paged_attention_attrs({k: v for k, v in onnx.items()
                                        if k != "sliding_window"})["sliding_window"] == 0
    with pytest.raises(ValueError, match="window"):
        specs.paged_attention_attrs({**onnx, "sliding_window": np.array([-1])})
    with pytest.raises(ValueError, match="num_heads"):
        specs.paged_attention_attrs({k: v for k, v in onnx.items() if k != "num_heads"})
    with pytest.raises(ValueError):
        specs.paged_attention_attrs({**onnx, "head_dim": np.array([96])})
    assert specs.PA_INPUTS[specs.PA_ALIASES[1]] == "kv_cache"


@pytest.mark.parametrize("window", [0, 1000])
def test_workspace_bound_covers_every_decode_step(window):
    hq, hkv, d, mb, bs, sm = 32, 8, 128, 2048, 16, 132
    lim = dict(max_smem=H100, window=window)
    bound = specs.attention_workspace_bound(512, 64, hq, hkv, d, mb, bs, sm, **lim)
    ws = [specs.decode_plan(t, hq, hkv, d, mb, bs, "bfloat16", sm, **lim).workspace_bytes
          for t in range(1, 65)]
    assert bound == max(ws) > 0
    assert specs.attention_workspace_bound(512, 64, hq, hkv, d, 8, bs, sm, **lim) == 0
    # a GPU where no decode kernel fits falls back to the prefill kernel: no workspace
    assert specs.attention_workspace_bound(512, 64, hq, hkv, d, mb, bs, sm,
                                           max_smem=64 * 1024, window=window) == 0


def test_attention_launches_argument_order():
    ptr = {n: n for n in ("q", "k", "v", "seq_starts", "context_lens", "block_tables",
                          "kv_cache", "out", "ws_o", "ws_lse")}
    dims = specs.paged_attention_dims((2, 32, 128), (2, 100, 8, 16, 128), (2, 300))
    assert dims == dict(tokens=2, batch=2, hq=32, hkv=8, d=128, max_blocks=300,
                        block_size=16, num_blocks=100)
    dec = specs.attention_plan(2, 2, 32, 8, 128, 300, 16, "bfloat16", 132, max_smem=H100)
    (kw, kwa), (main, ma), (red, ra) = specs.attention_launches(dec, dims, 0.5, ptr)
    meta = ["seq_starts", "context_lens", "block_tables"]
    assert kwa == ["k", "v", *meta, 2, 2, 8, 128, 300, 16, 100, "kv_cache"]
    sc = [2, 2, 32, 8, 300, 16, 100, specs.float_bits(0.5), 0]  # last: sliding window
    assert ma == ["q", *meta, "kv_cache", *sc, dec.n_split, dec.chunk, "out", "ws_o", "ws_lse"]
    assert ra == ["ws_o", "ws_lse", 64, 128, dec.n_split, "out"]
    assert specs.workspace_lse_offset(dec, 2, 32, 128) == 2 * 32 * dec.n_split * 128 * 4
    pre = specs.attention_plan(9, 2, 32, 8, 128, 300, 16, "bfloat16", 132, write_kv=False,
                               max_smem=H100, window=4096)
    [(ln, args)] = specs.attention_launches(pre, {**dims, "tokens": 9}, 0.5, ptr)
    assert ln == pre.main and args[-3:] == [4096, 4, "out"]
    with pytest.raises(ValueError, match="does not match"):
        specs.paged_attention_dims((2, 32, 128), (2, 100, 8, 16, 64), (2, 300))


def test_trt_glue_imports_without_tensorrt():
    from llmc.plugins import trt_paged_attention, trt_plugin

    assert trt_paged_attention.NAME == "PagedAttention" and trt_plugin.NAMESPACE == "llmc"
