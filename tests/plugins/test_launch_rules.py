"""CPU tests of the norm, activation, RoPE, glue and sampling launch rules: entry names, grids,
shapes."""
import math
import struct

import pytest

from llmc.plugins import launch_rules as lr


def test_norm_launch_covers_every_element():
    for n in (1, 7, 8, 1000, 4095, 4096, 5120, 8192, 16384, 32768):
        ln = lr.norm_launch(3, n, "bfloat16")
        vec = 8 if n % 8 == 0 else 1
        assert ln.kernel.endswith(f"_v{vec}")
        threads = ln.block[0]
        assert threads % 32 == 0 and threads <= 1024
        assert threads * (32 // vec) * vec >= n  # register budget holds the whole row
        assert ln.grid == (3, 1, 1)
    with pytest.raises(ValueError):
        lr.norm_launch(1, 32769, "bfloat16")
    with pytest.raises(ValueError):
        lr.norm_launch(1, 64, "float32")


def test_norm_names_and_shapes():
    assert lr.norm_launch(1, 64, "float16", "layernorm", True).kernel == "add_layernorm_f16_v8"
    assert lr.norm_output_shapes((5, 64), True) == [(5, 64), (5, 64)]
    assert lr.norm_output_shapes((5, 64), False) == [(5, 64)]


def test_gated_shapes_and_launch():
    assert lr.gated_output_shape((7, 22016)) == (7, 11008)
    with pytest.raises(ValueError):
        lr.gated_output_shape((7, 11))
    ln = lr.gated_launch(7, 11008, "bfloat16", "swiglu", sm_count=132)
    assert ln.kernel == "swiglu_bf16_v8" and ln.grid[0] == 7
    assert ln.grid[1] * ln.block[0] * 8 >= 11008 > (ln.grid[1] - 1) * ln.block[0] * 8
    assert lr.gated_launch(3, 13, "float16", "geglu", 132).kernel == "geglu_f16_v1"
    assert lr.gelu_launch(10, "float16", "none", 132).kernel == "gelu_erf_f16_v1"


def test_rope_shapes_and_names():
    assert lr.rope_output_shapes((9, (32 + 16) * 128), 32, 8, 128) == [
        (9, 32, 128), (9, 8, 128), (9, 8, 128)]
    with pytest.raises(ValueError):
        lr.rope_output_shapes((9, 100), 32, 8, 128)
    ln = lr.rope_launch(9, 32, 8, 128, 64, "bfloat16", interleaved=True, bias=True,
                           write_cache=True)
    # 48 heads of 64 pairs: 6 CTAs of 8 heads a token, a thread 8 elements (16 a head)
    assert ln.kernel == "rope_bias_cache_interleaved_bf16" and ln.grid == (9, 6, 1)
    assert ln.block == (128, 1, 1)
    # heads that do not divide evenly: the kernel's ceil split, no idle CTA
    odd = lr.rope_launch(1, 14, 2, 64, 64, "float16")    # 18 heads of 32 pairs, 16 a CTA
    assert odd.grid == (1, 2, 1) and odd.block == (64, 1, 1)   # 9 heads x 4 units
    # without whole 16-byte units, a thread a pair
    assert lr.rope_launch(1, 14, 2, 64, 24, "float16").block == (288, 1, 1)
    assert lr.rope_vector_units(64, 24, interleaved=True) == 8
    assert lr.rope_vector_units(36, 36, interleaved=False) == 0
    with pytest.raises(ValueError):
        lr.rope_launch(9, 32, 8, 128, 130, "bfloat16")
    # rotary_dim 0 (GPT-2's learned positions): the same kernel splits q/k/v, rotating nothing
    none = lr.rope_launch(3, 12, 12, 64, 0, "float16", bias=True, write_cache=True)
    assert none.kernel == "rope_bias_cache_half_f16" and none.grid == (3, 3, 1)
    with pytest.raises(ValueError):
        lr.rope_launch(3, 12, 12, 64, -2, "float16")
    # an E4M3 pool (--kv-cache-dtype fp8): the cache-writing entries with _e4m3, same grid
    e4m3 = lr.rope_launch(9, 32, 8, 128, 64, "bfloat16", interleaved=True, bias=True,
                          write_cache=True, e4m3=True)
    assert e4m3.kernel == "rope_bias_cache_e4m3_interleaved_bf16"
    assert (e4m3.grid, e4m3.block) == (ln.grid, ln.block)
    assert lr.rope_launch(1, 4, 2, 64, 64, "float16", write_cache=True, qk_norm=True,
                          e4m3=True).kernel == "rope_qknorm_cache_e4m3_half_f16"
    with pytest.raises(ValueError, match="write the cache"):
        lr.rope_launch(9, 32, 8, 128, 64, "float16", e4m3=True)


@pytest.mark.parametrize("hq,hkv,d", [(32, 8, 128), (14, 2, 64), (4, 2, 64), (64, 8, 256)])
def test_rope_qk_norm_gives_each_pair_a_thread(hq, hkv, d):
    """The q/k-norm entries run one pass (a head's sum of squares is a block reduction): the
    CTA's heads times D/2 pairs fit its threads, and a head is whole warps."""
    ln = lr.rope_launch(5, hq, hkv, d, d, "float16", bias=True, write_cache=True,
                        qk_norm=True)
    assert ln.kernel == "rope_bias_qknorm_cache_half_f16"
    per_cta = -(-(hq + 2 * hkv) // ln.grid[1])
    assert per_cta * d // 2 <= ln.block[0] <= 512 and (d // 2) % 32 == 0
    assert lr.rope_launch(1, hq, hkv, d, d // 2, "bfloat16", write_cache=True,
                          qk_norm=True).kernel == "rope_qknorm_cache_half_bf16"


@pytest.mark.parametrize("kw", [dict(head_dim=96), dict(write_cache=False)])
def test_rope_qk_norm_refuses(kw):
    args = dict(head_dim=128, write_cache=True) | kw
    with pytest.raises(ValueError, match="q/k-norm RoPE kernel writes the cache and takes "
                       "head_dim a multiple of 64"):
        lr.rope_launch(1, 8, 2, args["head_dim"], 32, "float16",
                       write_cache=args["write_cache"], qk_norm=True)


def test_llama3_inv_freq_matches_transformers():
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import _compute_llama3_parameters

    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
               "rope_theta": 500000.0}
    cfg = LlamaConfig(hidden_size=2048, num_attention_heads=32, rope_parameters=scaling)
    ref, _ = _compute_llama3_parameters(cfg)
    ours = torch.tensor(lr.llama3_inv_freq(64, 500000.0, rope_scaling=scaling))
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours.float(), ref.float(), rtol=1e-6, atol=0)
    plain = lr.llama3_inv_freq(64, 10000.0)
    assert plain[1] == pytest.approx(10000.0 ** (-2 / 64))
    assert plain != ours.tolist()


def test_float_bits():
    assert lr.float_bits(1.0) == 0x3F800000
    assert struct.unpack("<f", struct.pack("<i", lr.float_bits(1e-5)))[0] == \
        pytest.approx(1e-5)


@pytest.mark.parametrize("rule,op", [
    (lr.embedding_launch, "embedding"), (lr.gather_rows_launch, "gather_rows"),
    (lambda *a: lr.embedding_launch(*a, scaled=True), "embedding_scale")])
def test_row_copy_launches(rule, op):
    """One row a block (Gemma's scaled embedding too: the same grid, its own entry)."""
    for rows in (1, 65535, 70000, 2**31 - 1):  # rows on grid.x: past 65535 too
        for h, vec in ((576, 8), (4096, 8), (100, 1), (64, 8), (1, 1)):
            ln = rule(rows, h, "bfloat16")
            assert ln.module == "glue" and ln.kernel == f"{op}_bf16_v{vec}"
            assert ln.grid == (rows, 1, 1)
            threads = ln.block[0]
            assert threads % 32 == 0 and 32 <= threads <= 256
            assert threads <= max(32, h // vec + 31)  # no block mostly idle on a narrow row
    assert rule(3, 4096, "float16").kernel == f"{op}_f16_v8"
    for bad in ((0, 64), (2**31, 64), (4, 0)):
        with pytest.raises(ValueError):
            rule(*bad, "float16")
    with pytest.raises(ValueError):
        rule(4, 64, "float32")


def test_softcap_launch():
    ln = lr.softcap_launch(4 * 256000, 132)
    assert (ln.module, ln.kernel, ln.block) == ("glue", "softcap_f32", (256, 1, 1))
    assert ln.grid[0] == 132 * 8     # grid-stride, ~8 blocks an SM
    assert lr.softcap_launch(100, 132).grid == (1, 1, 1)
    for bad in (0, 2**31):
        with pytest.raises(ValueError):
            lr.softcap_launch(bad, 132)


def test_cast_launch():
    ln = lr.cast_launch(64 * 128256, "bfloat16", sm_count=132)
    assert ln.module == "glue" and ln.kernel == "cast_f32_bf16_v8" and ln.block == (256, 1, 1)
    assert ln.grid[0] <= 132 * 8  # grid-stride loop beyond that
    assert lr.cast_launch(1001, "float16", 132).kernel == "cast_f32_f16_v1"
    assert lr.cast_launch(8, "float16", 132).grid == (1, 1, 1)
    with pytest.raises(ValueError):
        lr.cast_launch(0, "float16", 132)
    with pytest.raises(ValueError):
        lr.cast_launch(2**31, "float16", 132)


def test_sample_launch():
    ln = lr.sample_launch(64, 128256)
    assert (ln.module, ln.kernel) == ("sampling", "sample_f32")
    assert ln.grid == (64, 1, 1) and ln.block == (lr.MAX_SAMPLE_THREADS, 1, 1)
    assert lr.sample_launch(1 << 20, 50).block == (64, 1, 1)  # small vocab: a small block
    assert lr.sample_launch(3, 1).block == (32, 1, 1)
    for bad in ((0, 50), (1, 0), (1, (1 << 24) + 1)):
        with pytest.raises(ValueError):
            lr.sample_launch(*bad)


def test_ban_launch():
    ln = lr.ban_launch(32, 128256)   # 4008 words a row: 16 CTAs of 256 threads
    assert (ln.module, ln.kernel) == ("sampling", "ban_tokens_f32")
    assert ln.grid == (16, 32, 1) and ln.block == (256, 1, 1)
    assert lr.ban_launch(1, 37).grid == (1, 1, 1) and lr.ban_launch(1, 37).block == (32, 1, 1)
    for bad in ((0, 50), (1, 0), (65536, 50)):
        with pytest.raises(ValueError):
            lr.ban_launch(*bad)


# ---- skinny GEMM ---------------------------------------------------------------------------

@pytest.mark.parametrize("m,mb", [(1, 1), (2, 2), (3, 8), (8, 8)])
def test_gemv_launch_rounds_m_up_to_a_compiled_kernel(m, mb):
    ln = lr.gemv_launch(m, 4096, 4096, "bfloat16")
    assert ln.kernel == f"gemv_bf16_bf16_m{mb}"
    if mb in lr.GEMV_TC_MS:   # 16 weight rows a CTA
        assert ln.grid[0] == 4096 // 16 and ln.block == (32 * lr.GEMV_TC_WARPS, 1, 1)
        # the fused gate: 8 outputs (gate and up rows) a CTA
        assert lr.gemv_launch(m, 4001, 64, "bfloat16", act="geglu").grid[0] == -(-4001 // 8)
        return
    per_block = lr.GEMV_ROWS[mb] * lr.GEMV_WARPS
    assert ln.grid[0] == -(-4096 // per_block) and ln.block == (32 * lr.GEMV_WARPS, 1, 1)


@pytest.mark.parametrize("n,act,m,kernel", [
    (6144, None, 8, "gemv_bf16_bf16_m8_wide"),          # qkv: 384 tiles, 2.9 an SM
    (4096, None, 4, "gemv_bf16_bf16_m8"),               # o, down: 256 tiles, 1.9 an SM
    (14336, "swiglu", 8, "gemv_bf16_bf16_m8_w32_swiglu"),  # gate-up: 1792 tiles
    (128256, None, 3, "gemv_bf16_bf16_m8_w32"),         # a LM head
    (6144, None, 2, "gemv_bf16_bf16_m2"),               # the CUDA-core GEMV has no variants
])
def test_gemv_launch_picks_the_tensor_core_kernel_by_tiles_an_sm(n, act, m, kernel):
    """On an H100's 132 SMs; without an SM count, the plain kernel."""
    ln = lr.gemv_launch(m, n, 4096, "bfloat16", act=act, sm_count=132)
    assert ln.kernel == kernel
    variant = next((v for v in lr.GEMV_TC_VARIANT_WARPS if v and v in kernel), "")
    if next(b for b in lr.GEMV_MS if b >= m) in lr.GEMV_TC_MS:
        assert ln.block == (32 * lr.GEMV_TC_VARIANT_WARPS[variant], 1, 1)
        assert ln.grid[0] == -(-n // (8 if act else 16))
    assert lr.gemv_launch(m, n, 4096, "bfloat16", act=act).kernel == kernel.replace(variant, "")


def test_gemv_launch_names_fp32_out_and_fused_gate():
    assert lr.gemv_launch(1, 128256, 4096, "float16", "float32").kernel == "gemv_f16_f32_m1"
    ln = lr.gemv_launch(2, 14336, 4096, "bfloat16", act="swiglu")
    assert ln.kernel == "gemv_bf16_bf16_m2_swiglu" and ln.pdl
    # half the rows of a warp are gate rows: twice the blocks for the same output width
    assert ln.grid[0] == 2 * lr.gemv_launch(2, 14336, 4096, "bfloat16").grid[0]
    # one row a warp at M = 1: the fused gate still takes a gate and an up row
    assert lr.gemv_launch(1, 14336, 4096, "bfloat16", act="swiglu").grid[0] == 14336 // 4


@pytest.mark.parametrize("kw,match", [
    (dict(m=9), "1..8 rows"), (dict(m=0), "1..8 rows"), (dict(k=100), "multiple of 8"),
    (dict(out_dtype="float16"), "writes bfloat16 or float32"),
    (dict(act="relu"), "fuses"), (dict(act="swiglu", out_dtype="float32"), "fuses")])
def test_gemv_launch_refuses(kw, match):
    args = dict(m=1, n=64, k=64, dtype="bfloat16") | kw
    with pytest.raises(ValueError, match=match):
        lr.gemv_launch(**args)


def test_gemv_rows_agree_with_the_kernel_source():
    """The rows a warp the launch rule assumes are the source's GEMV_R<M> (test_compile.py
    checks that every entry point gemv_launch names is in the cubins)."""
    import re

    from llmc.plugins import compiler

    src = compiler.source("gemv")
    for m, r in lr.GEMV_ROWS.items():
        assert re.search(rf"#define GEMV_R{m} {r}\b", src)
    for m in lr.GEMV_MS:
        if m in lr.GEMV_TC_MS:
            assert re.search(rf"TC_M\(DT, TY, {m}, {m // 8}, GEMV_TC_SK, GEMV_TC_U, 0\)", src)
            for variant, warps in lr.GEMV_TC_VARIANT_WARPS.items():
                if variant:
                    assert re.search(rf"TC_M\(DT, TY, {m}{variant}, {m // 8}, {warps}, ", src)
        else:
            assert re.search(rf"GEMV_M\(DT, TY, {m}, GEMV_R{m}, GEMV_U{m}\)", src)
    assert re.search(rf"#define GEMV_TC_SK {lr.GEMV_TC_WARPS}\b", src)


# ---- mixture of experts (kernels/moe.cu) ---------------------------------------------------

def _tiles(counts, bm):
    return sum(-(-c // bm) for c in counts)


def test_moe_tile_bound_holds_for_every_routing():
    """moe_max_tiles is the GEMMs' tile grid: no routing of T tokens to k distinct experts each
    may make more tiles (the worst cases: many experts with a row past a tile boundary), and
    a decode step's grid is no larger than its experts."""
    import random

    r = random.Random(0)
    for experts, k in ((8, 2), (60, 4), (128, 8), (4, 4)):
        for t in (1, 2, 3, 7, 8, 9, 17, 64, 65, 128, 129, 300, 1000):
            bound = lr.moe_max_tiles(t, experts, k)
            bm = lr.moe_block_m(t, experts, k)
            # 2 + E + 3 tiles fit the meta buffer's ints
            assert 2 + experts + 3 * bound <= t * lr.moe_meta_ints(experts, k)
            for _ in range(200):
                counts = [0] * experts
                for _tok in range(t):
                    for e in r.sample(range(experts), k):
                        counts[e] += 1
                assert _tiles(counts, bm) <= bound
            # adversarial: as many experts as possible one row past a multiple of bm
            rows, counts = t * k, [0] * experts
            for e in range(experts):
                take = min(t, rows, (bm + 1) if rows - (bm + 1) >= 0 else rows)
                counts[e], rows = take, rows - take
            assert _tiles(counts, bm) <= bound
    assert lr.moe_max_tiles(1, 8, 2) == 2 and lr.moe_max_tiles(4, 8, 2) == 8
    assert lr.moe_max_tiles(1, 128, 8) == 8


def test_moe_launches():
    route = lr.moe_route_launch(7, 8, 2, "bfloat16")   # one CTA, a warp a token
    assert (route.kernel, route.grid, route.block) == ("moe_route_bf16", (1, 1, 1), (224, 1, 1))
    assert lr.moe_route_launch(1, 8, 2, "float16").block == (128, 1, 1)
    assert lr.moe_route_launch(5000, 128, 8, "float16").block == (1024, 1, 1)
    # up to 32 tokens one launch picks and groups; past that the top-k over a grid first,
    # a warp a token, and the one CTA told so (its last argument)
    for t, want in ((1, ["moe_route_bf16"]), (32, ["moe_route_bf16"]),
                    (33, ["moe_topk_bf16", "moe_route_bf16"])):
        steps = lr.moe_route_launches(t, 128, 8, "bfloat16", True, "logits", "ids", "wts",
                                      "pos_of", "perm", "meta")
        assert [ln.kernel for ln, _ in steps] == want
        assert steps[-1][1] == ["logits", t, 128, 8, 1, lr.moe_block_m(t, 128, 8), "ids", "wts",
                                "pos_of", "perm", "meta", int(t > 32)]
    topk = lr.moe_topk_launch(4096, 128, 8, "float16")
    assert topk.grid == (1024, 1, 1) and topk.block == (128, 1, 1)
    assert lr.moe_topk_launch(33, 8, 2, "float16").grid == (9, 1, 1)
    # decode: 8-row tiles, 8 warps over K, 16 weight rows a CTA (8 outputs fused)
    gu = lr.moe_gemm_launch(1, 8, 2, 14336, 4096, "float16", act=True)
    assert gu.kernel == "moe_gemm_f16_m8_swiglu" and gu.grid == (14336 // 8, 2, 1)
    assert gu.block == (256, 1, 1)
    down = lr.moe_gemm_launch(1, 8, 2, 4096, 14336, "float16", act=False)
    assert down.kernel == "moe_gemm_f16_m8" and down.grid == (4096 // 16, 2, 1)
    # larger steps: the tiled GEMM, grid (tiles, N blocks of 128 weight rows = 64 fused
    # outputs or 128 down outputs), 4 warps, 4 k steps of shared memory
    gu = lr.moe_gemm_launch(512, 8, 2, 14336, 4096, "bfloat16", act=True)
    assert gu.kernel == "moe_gemm_bf16_m128_swiglu" and gu.block == (128, 1, 1)
    assert gu.grid == (lr.moe_max_tiles(512, 8, 2), 14336 // 64, 1)
    assert gu.smem == 4 * (128 + 128) * 32 * 2 == 64 * 1024
    down = lr.moe_gemm_launch(64, 8, 2, 4096, 14336, "float16", act=False)
    assert down.kernel == "moe_gemm_f16_m64" and down.grid == (lr.moe_max_tiles(64, 8, 2),
                                                               4096 // 128, 1)
    assert down.smem == 48 * 1024
    # sm_90a: wgmma, a warpgroup per 64 positions, 4 k steps of 64 in 128-byte-swizzled
    # shared memory (1 KiB more to align it), 256 weight rows a 128-row tile (128 fused
    # outputs); decode keeps the 8-row kernel
    gw = lr.moe_gemm_launch(512, 8, 2, 14336, 4096, "bfloat16", act=True, sm90=True)
    assert gw.kernel == "moe_gemm_bf16_m128w_swiglu" and gw.block == (256, 1, 1)
    assert gw.grid == (lr.moe_max_tiles(512, 8, 2, 128), 14336 // 128, 1)
    assert gw.smem == 4 * (128 + 256) * 64 * 2 + 1024
    dw = lr.moe_gemm_launch(64, 8, 2, 4096, 14336, "float16", act=False, sm90=True)
    assert dw.kernel == "moe_gemm_f16_m64w" and dw.block == (128, 1, 1)
    assert dw.grid == down.grid and dw.smem == 4 * (64 + 128) * 64 * 2 + 1024
    assert lr.moe_gemm_launch(1, 8, 2, 4096, 14336, "float16", False, sm90=True).kernel == \
        "moe_gemm_f16_m8"
    # block-wise FP8 experts: the same tiles, the weights' bytes in place of the halfs
    fw = lr.moe_gemm_launch(512, 8, 2, 4096, 14336, "float16", False, fp8b_group=128,
                            sm90=True)
    assert (fw.module, fw.kernel) == ("moe_fp8b", "moe_gemm_fp8b_f16_m128w")
    assert fw.smem == 4 * (128 * 2 + 256) * 64 + 1024 and fw.block == (256, 1, 1)
    # partial N blocks round up: 100 down outputs, 100 fused outputs (200 weight rows)
    assert lr.moe_gemm_launch(512, 8, 2, 100, 64, "bfloat16", False).grid[1] == 1
    assert lr.moe_gemm_launch(512, 8, 2, 100, 64, "bfloat16", True).grid[1] == 2
    # a tile list of more than 65535 tiles rides grid.x (the decode kernel's grid.y)
    big = lr.moe_gemm_launch(1_100_000, 8, 8, 64, 64, "float16", act=False)
    assert big.grid[0] == lr.moe_max_tiles(1_100_000, 8, 8) > lr.MAX_GRID_Y
    with pytest.raises(ValueError, match="grid"):
        lr.moe_gemm_launch(512, 8, 2, 128 * 65536, 64, "float16", act=False)


def test_moe_grouping_over_a_grid_from_many_rows():
    """From MOE_GRID_ROUTE_ROWS routed rows the grouping counts and places over a grid of
    chunks of MOE_ROUTE_THREADS rows around the one CTA (told so by its last argument, 2);
    an engine whose module lacks those kernels (grid=False) keeps the CTA's own walk. The
    chunks' counts fit the meta buffer past the most tiles any routing makes."""
    t = -(-lr.MOE_GRID_ROUTE_ROWS // 8)   # 256 tokens, top 8: 2048 rows, two chunks
    args = ("logits", "ids", "wts", "pos_of", "perm", "meta")
    steps = lr.moe_route_launches(t, 128, 8, "bfloat16", True, *args)
    assert [ln.kernel for ln, _ in steps] == ["moe_topk_bf16", "moe_count", "moe_route_bf16",
                                              "moe_place"]
    chunks = -(-t * 8 // lr.MOE_ROUTE_THREADS)
    for ln, a in (steps[1], steps[3]):
        assert ln.grid == (chunks, 1, 1) == (2, 1, 1)
        assert ln.block == (lr.MOE_ROUTE_THREADS, 1, 1) and ln.module == "moe"
    assert steps[1][1] == ["ids", t, 128, 8, "meta"]
    assert steps[3][1] == ["ids", t, 128, 8, "pos_of", "perm", "meta"]
    assert steps[2][1][-1] == 2
    less = lr.moe_route_launches(t - 1, 128, 8, "bfloat16", True, *args)
    assert [ln.kernel for ln, _ in less] == ["moe_topk_bf16", "moe_route_bf16"]
    old = lr.moe_route_launches(t, 128, 8, "bfloat16", True, *args, grid=False)
    assert [ln.kernel for ln, _ in old] == ["moe_topk_bf16", "moe_route_bf16"]
    assert old[-1][1][-1] == 1
    for experts, k in ((8, 2), (60, 4), (128, 8), (256, 8), (4, 4)):
        for t in (2, 3, 33, 255, 256, 1000, 1024, 4096, 65536):
            chunks = -(-t * k // lr.MOE_ROUTE_THREADS)
            assert 2 + experts + 3 * (t * k + experts) + chunks * experts <= \
                t * lr.moe_meta_ints(experts, k), (experts, k, t)


def test_moe_launches_over_block_wise_fp8_experts():
    """E4M3 experts (kernels/moe_fp8b.cu): the 16-bit GEMMs' grids and blocks under their own
    names and module; the tiled kernel's shared memory (x's stages, the bytes' stages, two
    16-bit weight tiles) is the 16-bit kernel's at 4 stages; blocks of a power of two from 32
    that divide K."""
    for t, bm in ((1, 8), (64, 64), (512, 128)):
        for act in (False, True):
            want = lr.moe_gemm_launch(t, 8, 2, 4096, 14336, "bfloat16", act)
            got = lr.moe_gemm_launch(t, 8, 2, 4096, 14336, "bfloat16", act, fp8b_group=128)
            assert got.module == "moe_fp8b" and want.module == "moe"
            assert got.kernel == want.kernel.replace("moe_gemm_", "moe_gemm_fp8b_")
            assert (got.grid, got.block, got.smem) == (want.grid, want.block, want.smem)
    assert lr.moe_gemm_smem(64, fp8b=True) == 48 * 1024
    assert lr.moe_gemm_smem(128, fp8b=True) == 64 * 1024
    assert lr.moe_gemm_smem(128, 2, fp8b=True) == (2 * 128 * 2 + 2 * 128 + 2 * 128 * 2) * 32
    for group, k in ((48, 4096), (16, 4096), (128, 4160)):
        with pytest.raises(ValueError, match="block"):
            lr.moe_gemm_launch(1, 8, 2, 4096, k, "float16", False, fp8b_group=group)


def test_moe_tile_height_by_step_size():
    """Decode steps (<= 8 tokens) and steps whose experts hold at most 4 routed rows on
    average keep the 8-row kernel; then 64-row tiles up to 128 tokens and 128-row tiles from
    MOE_M128_FROM (the wgmma kernel: 128 once the experts average more than 64 rows); the
    routing's tiles and the GEMM's BM agree."""
    tokens = (1, 8, 9, 16, 17, 64, 65, 128, 129, 4096)
    # Mixtral (8 experts, top 2): 4 rows an expert at 16 tokens
    assert [lr.moe_block_m(t, 8, 2) for t in tokens] == [
        8, 8, 8, 8, 64, 64, 64, 64, 128, 128]
    # Qwen3-30B-A3B (128, top 8): up to 64 tokens
    assert [lr.moe_block_m(t, 128, 8) for t in tokens] == [
        8, 8, 8, 8, 8, 8, 64, 64, 128, 128]
    assert lr.moe_block_m(lr.MOE_M128_FROM, 8, 2) == 128 and lr.MOE_TC_BLOCK_M == (64, 128)
    # the wgmma kernel (sm_90a): 128-row tiles once the experts average more than 64 rows
    assert [lr.moe_block_m(t, 8, 2, sm90=True) for t in tokens] == [
        8, 8, 8, 8, 64, 64, 64, 64, 64, 128]
    assert [lr.moe_block_m(t, 8, 2, sm90=True) for t in (256, 257)] == [64, 128]
    assert [lr.moe_block_m(t, 128, 8, sm90=True) for t in (64, 65, 1024, 1025, 4096)] == [
        8, 64, 64, 128, 128]
    for experts, k in ((8, 2), (128, 8)):
        for t in (1, 9, 64, 128, 129, 4096):
            bm = lr.moe_block_m(t, experts, k)
            for act in (False, True):
                ln = lr.moe_gemm_launch(t, experts, k, 256, 128, "float16", act)
                assert ln.kernel.split("_")[3] == f"m{bm}"
                assert ln.smem == (0 if bm == 8 else lr.moe_gemm_smem(bm))
                # the 8-row kernel's grid (N blocks, tiles): its tile bound
                tiles = lr.moe_max_tiles(t, experts, k, bm)
                assert (ln.grid[1] if bm == 8 else ln.grid[0]) == tiles
                bw = lr.moe_block_m(t, experts, k, sm90=True)
                wg = lr.moe_gemm_launch(t, experts, k, 256, 128, "float16", act, sm90=True)
                assert wg.kernel.split("_")[3] == (f"m{bw}" if bw == 8 else f"m{bw}w")
                assert (wg.grid[1] if bw == 8 else wg.grid[0]) == lr.moe_max_tiles(
                    t, experts, k, bw)
                routing = lr.moe_route_launches(t, experts, k, "float16", True, *"lipqrm",
                                                sm90=True)
                route = [a for ln, a in routing if ln.kernel.startswith("moe_route")]
                assert route[0][5] == bw
    # both GEMMs over FP8 experts on wgmma: 256-position tiles past MOE_WG8_M256_ROWS an
    # expert (Mixtral's shapes from 1537 tokens), two warpgroups of 64 weight rows
    assert [lr.moe_block_m(t, 8, 2, True, True) for t in (1, 64, 257, 1536, 1537, 4096)] == [
        8, 64, 128, 128, 256, 256]
    assert lr.moe_block_m(4096, 8, 2, False, True) == 128   # the mma.sync kernel: 128 at most
    for act in (False, True):
        ln = lr.moe_gemm_launch(4096, 8, 2, 4096, 14336, "bfloat16", act, 128, sm90=True,
                                fp8b_layer=True)
        assert ln.kernel == "moe_gemm_fp8b_bf16_m256w" + ("_swiglu" if act else "")
        assert ln.block == (256, 1, 1) and ln.smem == lr.moe_wg_smem(256, 128, 4, True)
        assert ln.grid == (lr.moe_max_tiles(4096, 8, 2, 256), 4096 // (64 if act else 128), 1)
        assert lr.moe_gemm_launch(4096, 8, 2, 4096, 14336, "bfloat16", act, 128,
                                  sm90=True).kernel.split("_")[4] == "m128w"
    routing = lr.moe_route_launches(4096, 8, 2, "bfloat16", True, *"lipqrm", sm90=True,
                                    fp8b=True)
    assert [a for ln, a in routing if ln.kernel.startswith("moe_route")][0][5] == 256
    with pytest.raises(ValueError, match="16-bit"):
        lr.moe_gemm_launch(4096, 8, 2, 64, 128, "bfloat16", True, sm90=True, fp8b_layer=True)


    comb = lr.moe_combine_launch(5, 4096, 2, "bfloat16", shared=True)
    assert comb.kernel == "moe_combine_shared_bf16_v8" and comb.grid == (5, 1, 1)
    assert lr.moe_combine_launch(5, 20, 2, "float16").kernel == "moe_combine_f16_v1"
    assert lr.swiglu2_launch(3, 80, "float16").kernel == "swiglu2_f16_v8"


def test_moe_tiled_shape_agrees_with_the_kernel_source():
    """The warps, pipeline depth and tile sizes the launch rule assumes (block, shared
    memory, N blocks) are the ones moe.cu and moe_fp8b.cu instantiate (test_compile.py
    checks that every entry point moe_gemm_launch names is in the cubins)."""
    import re

    from llmc.plugins import compiler

    src = compiler.source("moe") + (compiler.KERNEL_DIR / "moe.cuh").read_text()
    fp8b = compiler.source("moe_fp8b")
    wm, wn, st = lr.MOE_TC_SHAPE
    for suffix, act in (("", "false"), ("##_swiglu", "true")):
        assert re.search(rf"MOE_GEMM_TC_ENTRY\(moe_gemm_##DT##_m##BM{suffix}, TY, BM, {wm}, "
                         rf"{wn}, {st}, {act}\)", src)
        assert re.search(rf"moe_gemm_fp8b_##DT##_m##BM{suffix}, TY, {lr.MOE_TC_THREADS},[\s\\]*"
                         rf"\(moe_gemm_tc<TY, BM, {wm}, {wn}, {st}, {act}, true>\)", fp8b)
    for bm in lr.MOE_TC_BLOCK_M:
        assert re.search(rf"MOE_GEMM_TC\(DT, TY, {bm}\)", src)
        assert re.search(rf"MOE_FP8B_GEMM_TC\(DT, TY, {bm}\)", fp8b)
    assert re.search(rf"#define MOE_TC_BN {lr.MOE_TC_BN}\b", src)
    assert re.search(rf"#define MOE_TC_BK {lr.MOE_TC_BK}\b", src)
    # the wgmma kernel: a warpgroup per 64 rows, the (BN, stages) of each tile height
    for bm, (bn, stages) in lr.MOE_WG_SHAPES.items():
        assert re.search(rf"MOE_GEMM_WG\(DT, TY, {bm}, {bn}, {stages}\)", src)
        assert re.search(rf"MOE_FP8B_GEMM_WG\(DT, TY, {bm}, {bn}, {stages}\)", fp8b)
    assert re.search(r"moe_gemm_wg8<TY, BM, BN, ST, (false|true)>", fp8b)   # its FP8 form
    for bm, (bn, stages) in lr.MOE_WG8_SHAPES.items():   # ... and its wider tiles
        assert re.search(rf"MOE_FP8B_GEMM_WG\(DT, TY, {bm}, {bn}, {stages}\)", fp8b)
    assert re.search(r"moe_wg8_threads\(int bm\) \{ return bm == 64 \? 128 : 256; \}", src)
    assert [lr.moe_wg8_threads(bm) for bm in (64, 128, 256)] == [128, 256, 256]
    assert sorted(lr.MOE_WG_SHAPES) == list(lr.MOE_TC_BLOCK_M)
    assert re.search(rf"#define MOE_WG_BK {lr.MOE_WG_BK}\b", src)
    # the routing CTA's bound, and the grid grouping's chunk: its launches' blocks
    assert re.search(rf"#define MOE_ROUTE_THREADS {lr.MOE_ROUTE_THREADS}\b", src)
    assert re.search(r"__launch_bounds__\(2 \* BM\) NAME", src)
    for wm, wn, _ in [lr.MOE_TC_SHAPE]:   # whole fragments a warp, copies spread evenly
        for bm in lr.MOE_TC_BLOCK_M:
            assert bm // wm % 16 == 0 and lr.MOE_TC_BN // wn % 16 == 0
            assert bm * 4 % lr.MOE_TC_THREADS == 0 and lr.MOE_TC_BN * 4 % lr.MOE_TC_THREADS == 0


@pytest.mark.parametrize("experts,k,hidden,inter,match", [
    (8, 9, 64, 64, "top_k <= 8"), (300, 2, 64, 64, "at most 256 experts"),
    (4, 5, 64, 64, "not top 5 of 4"), (8, 2, 60, 64, "multiples of 8"),
    (8, 2, 64, 44, "multiples of 8")])
def test_moe_refuses_what_the_kernels_cannot_take(experts, k, hidden, inter, match):
    with pytest.raises(ValueError, match=match):
        lr.moe_check(experts, k, hidden, inter)
    with pytest.raises(ValueError):
        lr.moe_gemm_launch(1, 8, 2, 64, 44, "float16", act=False)


def test_w4_gemm_launch_tiles_and_splits():
    """The INT4 small-M GEMM: x tiles of W4G_TILES x 8 rows on grid x, weight tiles of
    W4G_WARPS x 16 rows (x 8 outputs with a gate) on y, and K split over z while the tiles
    give fewer than W4G_AIM warps an SM, each split at least two 128-k chunks."""
    ln = lr.w4_gemm_launch(100, 6144, 4096, "bfloat16", group=128, sm_count=132)
    rows, outs = 8 * lr.W4G_TILES, 16 * lr.W4G_WARPS
    assert ln.kernel == "w4g_bf16" and ln.module == "qgemv" and ln.pdl
    assert ln.grid[:2] == (-(-100 // rows), 6144 // outs)
    assert ln.grid[0] * ln.grid[1] * ln.grid[2] * lr.W4G_WARPS >= lr.W4G_AIM * 132 or \
        ln.grid[2] == lr.W4G_MAX_SPLITS
    assert ln.block == (32 * lr.W4G_WARPS, 1, 1)
    assert ln.smem == lr.W4G_STAGES * (rows + 1) * 128 * 2
    gate = lr.w4_gemm_launch(20, 14336, 4096, "float16", act="swiglu", group=64,
                             offsets="zero_points", sm_count=132)
    assert (gate.module, gate.kernel) == ("qgemv_zp", "w4gzp_f16_swiglu")
    assert gate.grid[1] == 14336 // (8 * lr.W4G_WARPS)
    assert lr.w4_gemm_launch(20, 4096, 256, "bfloat16", group=128, sm_count=132).grid[2] == 1
    assert lr.w4_gemm_launch(20, 64, 4096, "bfloat16", group=128, sm_count=0).grid[2] == 1
    head = lr.w4_gemm_launch(64, 128256, 4096, "bfloat16", "float32", group=128, sm_count=132)
    assert head.kernel == "w4g_bf16_f32" and head.grid[2] == 1   # tiles fill the GPU
    assert lr.w4_gemm_scratch(head, 64, 128256, None) == (0, 0)
    small = lr.w4_gemm_launch(64, 4096, 14336, "bfloat16", group=128, sm_count=132)
    assert lr.w4_gemm_scratch(small, 64, 4096, None) == (
        small.grid[2] * 64 * 4096 * 4, small.grid[0] * small.grid[1])


@pytest.mark.parametrize("m,rows", [(33, 64), (64, 64), (65, 128), (128, 128), (300, 128)])
def test_w4_gemm_launch_sm90(m, rows):
    """sm_90a's wgmma kernel from W4GW_MIN_M rows: the fewer of 64 or 128 x rows a CTA that hold
    the step, the same weight tiles, K splits aimed at W4GW_AIM warps an SM (qkv: 6 at 64
    rows, not the mma.sync kernel's 8), its x stages from a 1024-byte boundary."""
    ln = lr.w4_gemm_launch(m, 6144, 4096, "bfloat16", group=128, sm_count=132, sm90=True)
    assert ln.kernel == f"w4gw_bf16_x{rows}" and ln.module == "qgemv"
    assert ln.grid[:2] == (-(-m // rows), 6144 // (16 * lr.W4G_WARPS))
    assert ln.smem == lr.W4GW_STAGES[rows] * rows * 128 * 2 + 1024 <= 227 * 1024
    assert ln.grid[2] == lr.w4g_splits(ln.grid[0] * ln.grid[1] * lr.W4G_WARPS, 4096, 132,
                                       lr.W4GW_AIM)
    assert ln.grid[2] == (2 if m > 128 else 6)   # 3 CTA rows at 300: 2 splits fill the SMs
    gate = lr.w4_gemm_launch(m, 14336, 4096, "float16", act="swiglu", group=128,
                             offsets="offsets", sm_count=132, sm90=True)
    assert (gate.module, gate.kernel) == ("qgemv_zp", f"w4gwoff_f16_x{rows}_swiglu")


def test_w4_gemm_launch_sm90_keeps_mma_sync_below_its_rows():
    ln = lr.w4_gemm_launch(lr.W4GW_MIN_M - 1, 6144, 4096, "bfloat16", group=128,
                           sm_count=132, sm90=True)
    assert ln == lr.w4_gemm_launch(lr.W4GW_MIN_M - 1, 6144, 4096, "bfloat16", group=128,
                                   sm_count=132)


def test_int4_offsets_take_their_own_kernels():
    """Offsets (a GGUF file's Q4_1) in the zero-point module, as w4off / w4goff /
    dequant_int4_off: never chunk scales or the _wide kernel, whatever the group and tiles;
    INT4's only, and one of the kinds launch_rules.INT4_OFFSETS names."""
    kw = dict(group=128, sm_count=1)     # 6144 rows are tiles enough for _wide
    assert lr.qgemv_launch(1, 6144, 4096, "bfloat16", "int4", **kw).kernel == \
        "w4_bf16_m8_wide_cs"
    off = lr.qgemv_launch(1, 6144, 4096, "bfloat16", "int4", offsets="offsets", **kw)
    assert (off.module, off.kernel) == ("qgemv_zp", "w4off_bf16_m8")
    assert lr.qgemv_launch(12, 64, 256, "float16", "int4", act="swiglu", group=32,
                           offsets="offsets").kernel == "w4off_f16_m16_swiglu"
    assert lr.w4_gemm_launch(40, 64, 256, "float16", "float32", group=64,
                             offsets="offsets").kernel == "w4goff_f16_f32"
    assert lr.dequant_int4_launch(64, 256, "bfloat16", offsets="offsets").kernel == \
        "dequant_int4_off_bf16"
    assert lr.dequant_int4_launch(64, 256, "bfloat16", offsets="zero_points").kernel == \
        "dequant_int4_zp_bf16"
    for bad in (True, "zp", "both"):
        with pytest.raises(ValueError, match="INT4 offsets are one of none, zero_points"):
            lr.qgemv_launch(1, 64, 256, "float16", "int4", group=32, offsets=bad)
    with pytest.raises(ValueError, match="INT4's, not fp8's"):
        lr.qgemv_launch(1, 64, 256, "float16", "fp8", offsets="offsets")


@pytest.mark.parametrize("m,n,k,act,out,kernel,warps", [
    (1, 6144, 4096, None, None, "w8_bf16_bf16_m8_wide", 8),           # qkv: 384 tiles
    (16, 6144, 4096, None, None, "w8_bf16_bf16_m16_wide", 8),
    (1, 4096, 4096, None, None, "w8_bf16_bf16_m8", 8),                # o: 256 tiles
    (8, 14336, 4096, "swiglu", None, "w8_bf16_bf16_m8_w16_swiglu", 16),  # gate-up: 1792
    (16, 14336, 4096, "swiglu", None, "w8_bf16_bf16_m16_swiglu", 8),
    (1, 128256, 4096, None, "float32", "w8_bf16_f32_m8_w16", 16),     # an LM head
])
def test_fp8_gemv_kernel_by_tiles_an_sm(m, n, k, act, out, kernel, warps):
    """FP8 decode GEMVs on 132 SMs (Llama-3.1-8B's shapes): up to 2 tiles an SM the plain
    kernel, up to 3 _wide, past that _w16 (16 warps) up to 8 rows; no SM count, the plain."""
    ln = lr.qgemv_launch(m, n, k, "bfloat16", "fp8", out, act, sm_count=132)
    assert (ln.module, ln.kernel, ln.block) == ("qgemv", kernel, (32 * warps, 1, 1))
    assert ln.grid == (math.ceil(n / (8 if act else 16)), 1, 1)
    plain = lr.qgemv_launch(m, n, k, "bfloat16", "fp8", out, act)
    assert plain.kernel == kernel.replace("_wide", "").replace("_w16", "")
    assert plain.block == (256, 1, 1)


def test_fp8_block_gemv_and_dequant_launches():
    """Block-wise FP8 (qgemv_fp8b.cu): FP8's CTA shapes by tiles an SM, its own names and
    module; blocks of a power of two from 32."""
    for m, n, act, out in ((1, 6144, None, None), (8, 14336, "swiglu", None),
                           (16, 4096, None, None), (1, 128256, None, "float32")):
        fp8 = lr.qgemv_launch(m, n, 4096, "bfloat16", "fp8", out, act, sm_count=132)
        ln = lr.qgemv_launch(m, n, 4096, "bfloat16", "fp8-block", out, act, group=128,
                             sm_count=132)
        assert ln.module == "qgemv_fp8b" and ln.kernel == "w8b" + fp8.kernel[2:]
        assert (ln.grid, ln.block, ln.pdl) == (fp8.grid, fp8.block, True)
    assert [lr.fp8b_group_shift(g) for g in (32, 128, 1024)] == [5, 7, 10]
    for bad in (16, 96, 0):
        with pytest.raises(ValueError, match="blocks of a power of two from 32"):
            lr.qgemv_launch(1, 64, 256, "float16", "fp8-block", group=bad)
    ln = lr.dequant_fp8b_launch(4096, 14336, "float16")
    assert (ln.module, ln.kernel) == ("qgemv_fp8b", "dequant_fp8b_f16")
    assert ln.grid[0] * ln.block[0] * 16 >= 4096 * 14336
    with pytest.raises(ValueError, match="multiple of 32"):
        lr.dequant_fp8b_launch(64, 80, "float16")


@pytest.mark.parametrize("kw,match", [
    (dict(k=100), "multiple of 32"),
    (dict(out_dtype="float16"), "writes bfloat16 or float32"),
    (dict(act="relu"), "fuses"),
    (dict(group=48), "INT4 groups of 48"),
])
def test_w4_gemm_launch_refuses(kw, match):
    args = dict(m=40, n=64, k=128, dtype="bfloat16", group=128) | kw
    with pytest.raises(ValueError, match=match):
        lr.w4_gemm_launch(**args)

