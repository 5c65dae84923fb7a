"""CPU tests of paged attention's plans: kernel choice, splits, tiles, shared memory under each
compute capability, workspace, kernel arguments and the plugin's attributes."""
import dataclasses
import math

import numpy as np
import pytest

from llmc.devices import MAX_SMEM_OPTIN, max_smem_for_capability
from llmc.plugins import attention_plan as ap
from llmc.plugins.launch_rules import float_bits
from llmc.plugins.nodes import PA_ALIASES, PA_INPUTS
from llmc.plugins.records import serialize

H100 = MAX_SMEM_OPTIN[(9, 0)]


def test_decode_plan_fills_the_gpu_and_splits_long_contexts():
    big = ap.attention_plan(64, 64, 32, 8, 128, 2048 // 16, 16, "bfloat16", 132, max_smem=H100)
    assert big.decode and big.n_split == 1 and big.reduce is None
    assert big.main.grid == (64, 8, 1) and big.main.smem == ap.decode_smem(128)
    small = ap.attention_plan(2, 2, 32, 8, 128, 32768 // 16, 16, "bfloat16", 132, max_smem=H100)
    assert small.n_split > 1 and small.reduce is not None
    assert small.chunk == ap.ATTN_BN   # the least a split takes; the kernel spreads the rest
    assert small.main.grid[0] * small.main.grid[1] * small.main.grid[2] >= 2 * 132
    assert small.workspace_bytes == 2 * 32 * small.n_split * 129 * 4
    assert small.reduce.grid == (64, 1, 1)


def test_decode_splits_short_contexts_at_small_batches():
    """The split count comes from the grid, not from a minimum chunk: batch 1 over a
    2k-token limit runs 33 splits a kv head (the kernel gives a 512-key context 8 of them)."""
    one = ap.attention_plan(1, 1, 32, 8, 128, 2112 // 16, 16, "bfloat16", 132, max_smem=H100)
    assert one.n_split == math.ceil(2 * 132 / 8) and one.chunk == ap.ATTN_BN
    tiny = ap.attention_plan(1, 1, 32, 8, 128, 4, 16, "bfloat16", 132, max_smem=H100)
    assert tiny.n_split == 1 and tiny.reduce is None   # 64 keys: one tile, nothing to split


def test_prefill_plan_tiles_cover_any_ragged_split():
    # tiles = ceil(T/tpt) + B bounds sum_s ceil(n_s/tpt) for every split of T into B parts
    for lens in ([1, 1, 1], [2, 1, 1], [65, 1, 130], [64] * 4, [63, 2, 1000, 5]):
        t, b = sum(lens), len(lens)
        plan = ap.attention_plan(t, b, 12, 4, 64, 64, 32, "float16", 132, max_smem=H100)
        assert plan.decode == (t == b)
        if plan.decode:
            continue
        for variant, warps in ap.PREFILL_WARPS.items():
            for pack in (1, 3):
                p = ap.prefill_plan(t, b, 12, 4, 64, 32, "float16", variant=variant,
                                       pack=pack, max_smem=H100)
                tpt = 16 * warps // pack
                assert p.main.grid[1] >= sum(math.ceil(n / tpt) for n in lens)
                assert p.main.grid[0] == 12 // pack and p.pack == pack
                assert p.main.block == (32 * warps, 1, 1)
        assert plan.pack == 3 and plan.main.kernel.endswith("_" + ap.PREFILL_VARIANT)
        assert plan.kv_write.grid == (t, 1, 1)
    with pytest.raises(ValueError, match="divide"):
        ap.prefill_plan(9, 2, 12, 4, 64, 32, "float16", pack=2, max_smem=H100)
    with pytest.raises(ValueError, match="query tiles"):
        ap.prefill_plan(10**7, 2, 32, 8, 128, 16, "float16", max_smem=H100)
    assert ap.attention_plan(5, 2, 8, 8, 64, 4, 16, "float16", 1, write_kv=False,
                                max_smem=H100).kv_write is None


@pytest.mark.parametrize("bad", [dict(head_dim=96), dict(block_size=8), dict(num_kv_heads=3),
                                 dict(num_q_heads=64, num_kv_heads=2)])
def test_attention_plan_rejects(bad):
    args = dict(tokens=4, batch=2, num_q_heads=8, num_kv_heads=2, head_dim=64, max_blocks=4,
                block_size=16, dtype="float16", sm_count=10)
    args.update(bad)
    with pytest.raises(ValueError):
        ap.attention_plan(**args, max_smem=H100)


def test_smem_fits_hopper_and_ampere():
    for d in ap.HEAD_DIMS:
        for variant in ap.PREFILL_WARPS:  # 99 KB: sm_86/89/120 opt-in limit per block
            assert ap.prefill_smem(d, variant) <= 99 * 1024
        assert ap.decode_smem(d) <= 163 * 1024  # sm_80 opt-in limit per block
        for st in ap.DECODE_STAGES:  # the warps' combine reuses the K/V stages
            assert 4 * 16 * d * 4 + 512 <= ap.decode_smem(d, st) - 16 * d * 2
    assert ap.decode_smem(128) == 100 * 1024 > 99 * 1024  # why the 2-stage entries exist


# (major, minor) -> decode entry suffix at D=128 and D=64; every arch keeps the decode kernel
PLAN_BY_ARCH = {(8, 0): ("", ""), (8, 6): ("_s2", ""), (8, 9): ("_s2", ""),
                (9, 0): ("", ""), (10, 0): ("", ""), (12, 0): ("_s2", "")}


@pytest.mark.parametrize("cap", sorted(PLAN_BY_ARCH))
def test_plan_respects_each_arch_shared_memory(cap):
    smem = max_smem_for_capability(*cap)
    for d, suffix in zip((128, 64), PLAN_BY_ARCH[cap]):
        plan = ap.attention_plan(8, 8, 32, 8, d, 256, 16, "bfloat16", 132, max_smem=smem)
        assert plan.decode and plan.main.kernel == f"attn_decode_bf16_d{d}{suffix}"
        assert plan.main.smem <= smem
        mixed = ap.attention_plan(9, 2, 32, 8, d, 256, 16, "bfloat16", 132, max_smem=smem)
        assert mixed.main.kernel.endswith("_" + ap.PREFILL_VARIANT)
        assert mixed.main.smem <= smem


def test_smem_fallbacks():
    args = (4, 4, 32, 8, 128, 256, 16, "float16", 132)
    # decode until even 2 stages do not fit, then the prefill kernel, w8s then w4, then none
    expect = [(ap.decode_smem(128, 3), "attn_decode_f16_d128"),
              (ap.decode_smem(128, 3) - 1, "attn_decode_f16_d128_s2"),
              (ap.decode_smem(128, 2), "attn_decode_f16_d128_s2"),
              (ap.decode_smem(128, 2) - 1, "attn_prefill_f16_d128_w8s"),
              (ap.prefill_smem(128, "w8s") - 1, "attn_prefill_f16_d128_w4")]
    for smem, kernel in expect:
        plan = ap.attention_plan(*args, max_smem=smem)
        assert plan.main.kernel == kernel and plan.main.smem <= smem
        assert plan.decode == ("decode" in kernel)
    with pytest.raises(ValueError, match="fits max_smem"):
        ap.attention_plan(*args, max_smem=ap.prefill_smem(128, "w4") - 1)
    with pytest.raises(ValueError, match="over max_smem"):
        ap.decode_plan(4, *args[2:], max_smem=ap.decode_smem(128, 2) - 1)
    with pytest.raises(ValueError, match="over max_smem"):
        ap.prefill_plan(9, 2, 32, 8, 128, 16, "float16", variant="w8s", max_smem=60000)


def test_window_sizes_decode_splits():
    """Splits count from a token's first visible key tile: a window bounds them."""
    args = (1, 32, 8, 128, 32768 // 16, 16, "bfloat16", 132)  # decode_plan: no batch
    full = ap.decode_plan(*args, max_smem=H100)
    win = ap.decode_plan(*args, max_smem=H100, window=1000)
    assert full.window == 0 and win.window == 1000
    # every token's keys [first tile start, p] span < window + 64: no more splits than the
    # key tiles of that span
    assert win.n_split == math.ceil((1000 + ap.ATTN_BN - 1) / ap.ATTN_BN) < full.n_split
    small = ap.decode_plan(*args, max_smem=H100, window=37)
    assert small.n_split == 2 and small.reduce is not None   # 37 keys can straddle two tiles
    assert ap.decode_plan(*args, max_smem=H100, window=1).n_split == 1
    # a window past the context changes nothing but the kernel argument
    assert ap.decode_plan(*args, max_smem=H100, window=10**6) == dataclasses.replace(
        full, window=10**6)
    with pytest.raises(ValueError, match="window"):
        ap.decode_plan(*args, max_smem=H100, window=-1)


def test_paged_attention_attrs_from_onnx_fields_and_record():
    import numpy as np

    onnx = {"num_heads": np.array([32], np.int32), "num_kv_heads": np.array([8], np.int32),
            "head_dim": np.array([128], np.int32), "block_size": np.array([16], np.int32),
            "sliding_window": np.array([0], np.int32)}
    attrs = ap.paged_attention_attrs(onnx)
    assert attrs == dict(num_q_heads=32, num_kv_heads=8, head_dim=128, block_size=16,
                         scale=pytest.approx(128 ** -0.5), write_kv=1, sliding_window=0)
    rec = np.frombuffer(serialize("PagedAttention", attrs), np.uint8)
    assert ap.paged_attention_attrs({"record": rec}) == {**attrs, "scale": pytest.approx(
        attrs["scale"])}  # the record holds scale as fp32
    mistral = ap.paged_attention_attrs({**onnx, "sliding_window": np.array([4096])})
    assert mistral["sliding_window"] == 4096
    rec = np.frombuffer(serialize("PagedAttention", mistral), np.uint8)
    assert ap.paged_attention_attrs({"record": rec})["sliding_window"] == 4096
    assert ap.paged_attention_attrs({k: v for k, v in onnx.items()
                                        if k != "sliding_window"})["sliding_window"] == 0
    with pytest.raises(ValueError, match="window"):
        ap.paged_attention_attrs({**onnx, "sliding_window": np.array([-1])})
    with pytest.raises(ValueError, match="num_heads"):
        ap.paged_attention_attrs({k: v for k, v in onnx.items() if k != "num_heads"})
    with pytest.raises(ValueError):
        ap.paged_attention_attrs({**onnx, "head_dim": np.array([96])})
    assert PA_INPUTS[PA_ALIASES[1]] == "cache"


@pytest.mark.parametrize("window", [0, 1000])
def test_workspace_bound_covers_every_decode_step(window):
    hq, hkv, d, mb, bs, sm = 32, 8, 128, 2048, 16, 132
    lim = dict(max_smem=H100, window=window)
    bound = ap.attention_workspace_bound(512, 64, hq, hkv, d, mb, bs, sm, **lim)
    ws = [ap.decode_plan(t, hq, hkv, d, mb, bs, "bfloat16", sm, **lim).workspace_bytes
          for t in range(1, 65)]
    assert bound == max(ws) > 0
    assert ap.attention_workspace_bound(512, 64, hq, hkv, d, 4, bs, sm, **lim) == 0
    # a GPU where no decode kernel fits falls back to the prefill kernel: no workspace
    assert ap.attention_workspace_bound(512, 64, hq, hkv, d, mb, bs, sm,
                                           max_smem=64 * 1024, window=window) == 0


def test_attention_launches_argument_order():
    ptr = {n: n for n in ("q", "k", "v", "seq_starts", "context_lens", "block_tables",
                          "cache", "out", "ws_o", "ws_lse", "arrived", "sched")}
    dims = ap.paged_attention_dims((2, 32, 128), (2, 100, 8, 16, 128), (2, 300))
    assert dims == dict(tokens=2, batch=2, hq=32, hkv=8, d=128, max_blocks=300,
                        block_size=16, num_blocks=100)
    dec = ap.attention_plan(2, 2, 32, 8, 128, 300, 16, "bfloat16", 132, max_smem=H100)
    (kw, kwa), (main, ma), (red, ra) = ap.attention_launches(dec, dims, 0.5, ptr)
    meta = ["seq_starts", "context_lens", "block_tables"]
    assert kwa == ["k", "v", *meta, 2, 2, 8, 128, 300, 16, 100, "cache"]
    sc = [2, 2, 32, 8, 300, 16, 100, float_bits(0.5), 0]  # last: sliding window
    assert ma == ["q", *meta, "cache", *sc, dec.n_split, dec.chunk, "out", "ws_o", "ws_lse",
                  "arrived", "sched"]
    assert ra == ["ws_o", "ws_lse", 64, 128, dec.n_split, "out"]
    # fused: the decode kernel's last CTA combines, counting on a (token, kv head) counter
    fused = ap.attention_plan(2, 2, 32, 8, 128, 300, 16, "bfloat16", 132, max_smem=H100,
                              fuse_reduce=True)
    assert fused.reduce is None and fused.counters == 2 * 8 and fused.n_split == dec.n_split
    assert fused.workspace_bytes == dec.workspace_bytes
    (_, _), (main2, ma2) = ap.attention_launches(fused, dims, 0.5, ptr)
    assert main2 == dec.main and ma2 == ma
    one = ap.attention_plan(64, 64, 32, 8, 128, 300, 16, "bfloat16", 132, max_smem=H100,
                            fuse_reduce=True)   # 512 CTAs fill two waves: no split
    assert one.n_split == 1 and one.counters == 0 and one.reduce is None
    assert ap.workspace_lse_offset(dec, 2, 32, 128) == 2 * 32 * dec.n_split * 128 * 4
    pre = ap.attention_plan(9, 2, 32, 8, 128, 300, 16, "bfloat16", 132, write_kv=False,
                               max_smem=H100, window=4096)
    [(ln, args)] = ap.attention_launches(pre, {**dims, "tokens": 9}, 0.5, ptr)
    assert ln == pre.main and args[-3:] == [4096, 4, "out"]
    with pytest.raises(ValueError, match="does not match"):
        ap.paged_attention_dims((2, 32, 128), (2, 100, 8, 16, 64), (2, 300))


def test_sm90_prefill_plan_and_its_pool_map():
    """On sm_90a a prefill step takes the TMA + wgmma kernel: its own module, 3 warpgroups,
    128-row tiles, and the pool's tensor map as its last argument (the soft-capped entry:
    the cap's bits after the window, as elsewhere). Decode steps, E4M3 pools, devices without
    sm_90a and too little shared memory keep the others."""
    ptr = {n: n for n in ("q", "k", "v", "seq_starts", "context_lens", "block_tables",
                          "cache", "out", "ws_o", "ws_lse", "arrived", "sched")}
    dims = ap.paged_attention_dims((9, 32, 128), (2, 100, 8, 16, 128), (2, 300))
    pre = ap.attention_plan(9, 2, 32, 8, 128, 300, 16, "bfloat16", 132, write_kv=False,
                            max_smem=H100, window=64, sm90=True)
    assert (pre.main.module, pre.main.kernel) == (ap.SM90_MODULE, "attn_prefill_bf16_d128_sm90")
    assert pre.main.block == (384, 1, 1) and pre.pack == 4
    assert pre.main.grid == (8, math.ceil(9 / (128 // 4)) + 2, 1)
    assert pre.main.smem == ap.prefill_smem(128, "sm90") <= H100
    # Q for 128 rows, two stages of a 128-key K and V tile, 8 barriers, 1 KB alignment slack
    assert ap.prefill_smem(128, "sm90") == (128 + 2 * 2 * 128) * 128 * 2 + 8 * 8 + 1024
    [(ln, args)] = ap.attention_launches(pre, dims, 0.5, ptr)
    assert args[:-1] == ["q", "seq_starts", "context_lens", "block_tables", "cache", 9, 2, 32,
                         8, 300, 16, 100, float_bits(0.5), 64, 4, "out"]
    def pre_map(plan):
        return ap.PoolMap("cache", 2 * 100 * 8 * 16, 128, 16, plan.pool_map)
    assert args[-1] == pre_map(pre) and pre.pool_map == "bfloat16"
    capped = ap.attention_plan(9, 2, 32, 8, 128, 300, 16, "bfloat16", 132, write_kv=False,
                               max_smem=H100, sm90=True, softcap=30.0)
    assert capped.main.kernel == "attn_prefill_bf16_d128_sm90_softcap"
    [(_, args)] = ap.attention_launches(capped, dims, 0.5, ptr)
    assert args[-5:-1] == [0, float_bits(30.0), 4, "out"] and args[-1] == pre_map(pre)
    others = [ap.attention_plan(2, 2, 32, 8, 128, 300, 16, "bfloat16", 132, max_smem=H100,
                                sm90=True),                                   # decode
              ap.attention_plan(9, 2, 32, 8, 128, 300, 16, "bfloat16", 132, write_kv=False,
                                max_smem=H100, sm90=True, e4m3=True),
              ap.attention_plan(9, 2, 32, 8, 128, 300, 16, "bfloat16", 132, max_smem=H100),
              ap.attention_plan(9, 2, 32, 8, 128, 300, 16, "bfloat16", 132, sm90=True,
                                max_smem=ap.prefill_smem(128, "sm90") - 1)]
    for plan in others:
        assert plan.main.module != ap.SM90_MODULE and not plan.pool_map, plan.main
    with pytest.raises(ValueError, match="16-bit pools, not E4M3"):
        ap.prefill_plan(9, 2, 32, 8, 128, 16, "bfloat16", False, variant="sm90",
                        max_smem=H100, e4m3=True)


def test_softcap_takes_its_own_entries_and_one_more_argument():
    """Gemma 2: the soft-capped kernels are their own entries (the uncapped ones are
    unchanged), the cap's bits follow the window in both kernels' arguments, and the split
    plan does not depend on it."""
    ptr = {n: n for n in ("q", "k", "v", "seq_starts", "context_lens", "block_tables",
                          "cache", "out", "ws_o", "ws_lse", "arrived", "sched")}
    dims = ap.paged_attention_dims((2, 32, 128), (2, 100, 8, 16, 128), (2, 300))
    dec = ap.attention_plan(2, 2, 32, 8, 128, 300, 16, "float16", 132, max_smem=H100,
                            window=64, softcap=50.0)
    plain = ap.attention_plan(2, 2, 32, 8, 128, 300, 16, "float16", 132, max_smem=H100,
                              window=64)
    assert dec.main.kernel == plain.main.kernel + "_softcap" == "attn_decode_f16_d128_softcap"
    # a module of their own (compiled for the models that have a soft-cap); the reduce and
    # the K/V write are the uncapped module's
    assert (dec.main.module, plain.main.module) == ("paged_attention_softcap", "paged_attention")
    assert dec.reduce == plain.reduce and dec.kv_write == plain.kv_write
    assert (dec.n_split, dec.main.grid, dec.main.smem) == (plain.n_split, plain.main.grid,
                                                           plain.main.smem)
    _, (_, ma), _ = ap.attention_launches(dec, dims, 0.5, ptr)
    sc = [2, 2, 32, 8, 300, 16, 100, float_bits(0.5), 64, float_bits(50.0)]
    assert ma == ["q", "seq_starts", "context_lens", "block_tables", "cache", *sc,
                  dec.n_split, dec.chunk, "out", "ws_o", "ws_lse", "arrived", "sched"]
    pre = ap.attention_plan(9, 2, 32, 8, 128, 300, 16, "bfloat16", 132, write_kv=False,
                            max_smem=H100, softcap=30.0)
    assert pre.main.kernel == "attn_prefill_bf16_d128_w8s_softcap"
    [(_, args)] = ap.attention_launches(pre, {**dims, "tokens": 9}, 0.5, ptr)
    assert args[-4:] == [0, float_bits(30.0), 4, "out"]
    small = ap.attention_plan(1, 1, 8, 2, 128, 4, 16, "float16", 132,
                              max_smem=ap.decode_smem(128, 2), softcap=1.0)
    assert small.main.kernel == "attn_decode_f16_d128_s2_softcap"
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="soft-cap"):
            ap.attention_plan(2, 2, 8, 2, 64, 4, 16, "float16", 132, max_smem=H100,
                              softcap=bad)


def test_e4m3_pool_takes_its_own_entries_and_its_scales():
    """--kv-cache-dtype fp8: the E4M3-pool kernels are their own entries and modules (soft-
    capped ones too), the K and V scales' bits follow the window (before a cap's), the pool is
    written by the rope kernel (no kv_write), and a plan and its scales come together."""
    ptr = {n: n for n in ("q", "k", "v", "seq_starts", "context_lens", "block_tables",
                          "cache", "out", "ws_o", "ws_lse", "arrived", "sched")}
    dims = ap.paged_attention_dims((2, 32, 128), (2, 100, 8, 16, 128), (2, 300))
    kw = dict(write_kv=False, max_smem=H100, window=64)
    dec = ap.attention_plan(2, 2, 32, 8, 128, 300, 16, "float16", 132, e4m3=True, **kw)
    plain = ap.attention_plan(2, 2, 32, 8, 128, 300, 16, "float16", 132, **kw)
    assert dec.e4m3 and dec.main.kernel == "attn_decode_f16_d128_e4m3"
    assert dec.main.module == "paged_attention_e4m3" and dec.reduce == plain.reduce
    assert (dec.n_split, dec.main.grid) == (plain.n_split, plain.main.grid)
    assert dec.main.smem == ap.decode_smem(128, 3, e4m3=True) < plain.main.smem
    scales = (0.25, 0.0625)
    (_, ma), _ = ap.attention_launches(dec, dims, 0.5, ptr, scales)   # no kv_write
    sc = [2, 2, 32, 8, 300, 16, 100, float_bits(0.5), 64, float_bits(0.25), float_bits(0.0625)]
    assert ma == ["q", "seq_starts", "context_lens", "block_tables", "cache", *sc,
                  dec.n_split, dec.chunk, "out", "ws_o", "ws_lse", "arrived", "sched"]
    cap = ap.attention_plan(9, 2, 32, 8, 128, 300, 16, "bfloat16", 132, e4m3=True,
                            softcap=30.0, **kw)
    assert cap.main.kernel == "attn_prefill_bf16_d128_w8s_e4m3_softcap"
    assert cap.main.module == "paged_attention_softcap_e4m3" in ap.E4M3_MODULES
    assert cap.main.smem == ap.prefill_smem(128, "w8s", e4m3=True)
    [(_, args)] = ap.attention_launches(cap, {**dims, "tokens": 9}, 0.5, ptr, scales)
    assert args[-6:] == [64, float_bits(0.25), float_bits(0.0625), float_bits(30.0), 4, "out"]
    with pytest.raises(ValueError, match="scales"):
        ap.attention_launches(dec, dims, 0.5, ptr)
    with pytest.raises(ValueError, match="scales"):
        ap.attention_launches(plain, dims, 0.5, ptr, scales)
    with pytest.raises(ValueError, match="rope kernel"):
        ap.attention_plan(2, 2, 32, 8, 128, 300, 16, "float16", 132, max_smem=H100, e4m3=True)
    assert {ap.attention_module(c, e) for c in (0.0, 1.0) for e in (False, True)} == {
        "paged_attention", ap.SOFTCAP_MODULE, *ap.E4M3_MODULES}


def test_e4m3_pool_shared_memory():
    """Byte stages, which the decode MMAs read as they are: the decode kernel's 3 stages fit
    where the 16-bit pool's do not (99 KB, sm_89/120), the combine still fits in the reused
    stages, and any device that holds a prefill kernel holds the 2-stage decode (so a pure
    decode step never falls back to prefill)."""
    for d in ap.HEAD_DIMS:
        for st in ap.DECODE_STAGES:
            e4m3 = ap.decode_smem(d, st, e4m3=True)
            assert e4m3 - 16 * d * 2 == max(st * 2 * 64 * d, 4 * 16 * d * 4 + 512)
            assert e4m3 <= ap.decode_smem(d, st)
        for variant in ap.PREFILL_WARPS:
            assert ap.decode_smem(d, 2, e4m3=True) < \
                ap.prefill_smem(d, variant, e4m3=True) == \
                ap.prefill_smem(d, variant) + 2 * 64 * d <= 99 * 1024
    assert ap.decode_smem(128, 3, e4m3=True) <= 99 * 1024 < ap.decode_smem(128, 3)
    args = (4, 4, 32, 8, 128, 256, 16, "float16", 132)
    kw = dict(write_kv=False, e4m3=True)
    for smem, kernel in [(ap.decode_smem(128, 3, True), "attn_decode_f16_d128_e4m3"),
                         (ap.decode_smem(128, 3, True) - 1, "attn_decode_f16_d128_s2_e4m3")]:
        plan = ap.attention_plan(*args, max_smem=smem, **kw)
        assert plan.main.kernel == kernel and plan.main.smem <= smem
    with pytest.raises(ValueError, match="shared memory"):
        ap.attention_plan(*args, max_smem=ap.decode_smem(128, 2, True) - 1, **kw)
    assert ap.attention_workspace_bound(4, 4, 32, 8, 128, 256, 16, 132, max_smem=H100,
                                        e4m3=True) == ap.attention_workspace_bound(
        4, 4, 32, 8, 128, 256, 16, 132, max_smem=H100)


def _scheduled(tokens, window=0, e4m3=False, sm_count=132, hkv=8):
    return ap.decode_plan(tokens, 32, hkv, 128, 2048, 16, "bfloat16", sm_count, False,
                          max_smem=H100, window=window, e4m3=e4m3, fuse_reduce=True,
                          schedule=True)


def _items(sched):
    return sched[sched[:, 0] >= 0]


@pytest.mark.parametrize("window", [0, 100, 4096])
@pytest.mark.parametrize("ctx", [[1], [8192], [32768], [2048] * 64, [256] * 256,
                                 [64 * 2 ** (i % 7) for i in range(64)],
                                 [32768] + [512] * 7, [1, 2, 63, 64, 65, 129, 3000]])
def test_decode_schedule_covers_each_tokens_keys_once_longest_first(ctx, window):
    """Each token's keys (from its window's first key tile to its position) are cut into
    items of whole key tiles, no longer than the balanced share of a CTA slot; a token's
    items take consecutive slots from the first its rows name, and each row carries the
    token's sequence, position and item count; items are listed longest first; they fit the
    plan's grid rows, and the rows past them are marked empty."""
    plan = _scheduled(len(ctx), window)
    sched = ap.decode_schedule(ctx, plan)
    assert sched.dtype == np.int32 and sched.shape == (plan.items, ap.SCHEDULE_ROW)
    items = _items(sched)
    assert (sched[len(items):, 0] == -1).all() and len(items) <= plan.items
    lengths = items[:, 2] - items[:, 1]
    assert (lengths > 0).all() and (np.diff(lengths) <= 0).all()
    first = [max(0, c - window) // 64 * 64 if window else 0 for c in ctx]
    keys = [c - f for c, f in zip(ctx, first)]
    share = -(-sum(keys) * 8 // plan.slots)
    assert lengths.max() <= max(64, -(-share // 64) * 64)
    bases = []   # (first slot, items) of each token: consecutive, from 0
    for tok, c in enumerate(ctx):
        mine = items[items[:, 0] == tok]
        mine = mine[np.argsort(mine[:, 1])]
        seq, pos, base, n = mine[0, 4:]
        assert (mine[:, 4:] == mine[0, 4:]).all() and seq == tok and pos == c - 1
        assert len(mine) == n and list(mine[:, 3]) == list(range(base, base + n))
        assert mine[0, 1] == first[tok] and mine[-1, 2] == c
        assert (mine[1:, 1] == mine[:-1, 2]).all() and (mine[:, 1] % 64 == 0).all()
        bases.append((base, n))
    bases.sort()
    assert [b for b, _ in bases] == list(np.cumsum([n for _, n in bases]) - [n for _, n in bases])


def test_decode_schedule_of_a_ragged_batch_names_each_tokens_sequence_and_position():
    """Tokens of one sequence (a ragged step through the decode kernel) attend to their own
    positions; each row says which sequence's block table its keys are in."""
    plan = _scheduled(5)
    sched = ap.decode_schedule([10, 3, 7], plan, seq_starts=[0, 1, 4, 5])
    items = _items(sched)
    by_token = {int(r[0]): r for r in items}
    assert sorted(by_token) == list(range(5))
    assert [(by_token[t][4], by_token[t][5], by_token[t][2]) for t in range(5)] == [
        (0, 9, 10), (1, 0, 1), (1, 1, 2), (1, 2, 3), (2, 6, 7)]
    flat = ap.decode_schedule([10, 1, 2, 3, 7], plan)   # the same keys, a sequence a token
    cols = [0, 1, 2, 3, 5, 6, 7]
    assert (sched[:, cols] == flat[:, cols]).all()


def test_decode_schedule_splits_what_the_grid_splits_and_balances_what_it_cannot():
    """A uniform batch that fills the GPU keeps one item a token (as the grid's plan does);
    one long context takes about a slot's share of items a kv head; a long context among
    short ones is split where the grid's plan, sized for the batch, would give each token the
    same split count and leave the long one's CTAs to finish alone."""
    uniform = ap.decode_schedule([2048] * 64, _scheduled(64))
    assert len(_items(uniform)) == 64
    long = _scheduled(1)
    items = _items(ap.decode_schedule([32768], long))
    assert len(items) == 32768 // (items[0, 2] - items[0, 1])
    assert long.slots / 8 - 2 <= len(items) <= long.slots / 8
    mixed = _items(ap.decode_schedule([32768] + [512] * 7, _scheduled(8)))
    grid = ap.decode_plan(8, 32, 8, 128, 2048, 16, "bfloat16", 132, False, max_smem=H100,
                          fuse_reduce=True)
    longest = (mixed[:, 2] - mixed[:, 1]).max()
    assert longest * 4 < 32768 / grid.n_split     # the grid's longest split: 4x longer
    assert mixed[0, 0] == 0 and (mixed[:, 0] == 0).sum() > 16


def test_scheduled_decode_plan_grid_workspace_and_errors():
    plan = _scheduled(4)
    slots = ap.DECODE_WAVES * 132    # the grid plan's target, whatever the CTAs an SM
    assert plan.slots == _scheduled(4, e4m3=True).slots == slots
    assert plan.items == math.ceil(slots / 8) + 4
    assert plan.main.grid == (8, plan.items, 1) and plan.reduce is None
    assert plan.counters == 4 * 8 and plan.workspace_bytes == plan.items * 32 * 129 * 4
    assert ap.workspace_lse_offset(plan, 4, 32, 128) == plan.items * 32 * 128 * 4
    assert plan.main.kernel == _scheduled(4).main.kernel == "attn_decode_bf16_d128"
    with pytest.raises(ValueError, match="fuse_reduce"):
        ap.decode_plan(4, 32, 8, 128, 64, 16, "bfloat16", 132, max_smem=H100, schedule=True)
    ptr = {n: n for n in ("q", "seq_starts", "context_lens", "block_tables", "cache", "out",
                          "ws_o", "ws_lse", "arrived", "sched")}
    dims = ap.paged_attention_dims((4, 32, 128), (2, 100, 8, 16, 128), (4, 2048))
    [(ln, args)] = ap.attention_launches(plan, dims, 0.5, ptr)
    assert ln == plan.main and args[-7:] == [0, 64, "out", "ws_o", "ws_lse", "arrived", "sched"]
    bound = ap.attention_workspace_bound(512, 64, 32, 8, 128, 2048, 16, 132, max_smem=H100,
                                         schedule=True)
    assert bound == _scheduled(64).workspace_bytes   # items grow with the tokens


def test_token_keys_of_a_ragged_batch():
    """A token's own context: its sequence's context less the tokens after it in the step."""
    keys, seq = ap.token_keys([0, 1, 4, 5], [10, 3, 7])
    assert list(keys) == [10, 1, 2, 3, 7] and list(seq) == [0, 1, 1, 1, 2]
    keys, seq = ap.token_keys([0, 1, 2], [5, 9])
    assert list(keys) == [5, 9] and list(seq) == [0, 1]
