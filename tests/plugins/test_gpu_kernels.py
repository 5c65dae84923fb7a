"""Each kernel against a PyTorch reference on the GPU (marked `gpu`; skipped without CUDA).

Inputs are fresh random data each run, outputs are poisoned (NaN) before each launch, and the
comparison is max |out - ref| against the tolerance table below, per dtype."""
import math
import random

import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU and torch.cuda"),
]

from attention_ref import make_batch, ref_attention  # noqa: E402  (tests/plugins, on sys.path)

from llmc.plugins import attention_plan as ap  # noqa: E402
from llmc.plugins.launch_rules import llama3_inv_freq  # noqa: E402

DTYPES = [torch.float16, torch.bfloat16]
# (atol, rtol) on the output; references follow HF's rounding so only a few ulps remain.
TOL = {
    ("norm", torch.float16): (2e-3, 2e-3), ("norm", torch.bfloat16): (1.6e-2, 1.6e-2),
    ("act", torch.float16): (2e-3, 2e-3), ("act", torch.bfloat16): (1.6e-2, 1.6e-2),
    ("rope", torch.float16): (2e-3, 2e-3), ("rope", torch.bfloat16): (1.6e-2, 1.6e-2),
    ("attn", torch.float16): (2e-3, 2e-3), ("attn", torch.bfloat16): (1e-2, 1e-2),
}


def close(out, ref, kind):
    atol, rtol = TOL[(kind, out.dtype)]
    assert not out.isnan().any(), "unwritten (poisoned) or NaN output"
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)


def rnd(*shape, dtype, scale=1.0):
    return (torch.randn(*shape, device="cuda") * scale).to(dtype)


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    # Every output allocation starts as NaN, so an element the kernel skips fails the check.
    real = torch.empty_like

    def nan_like(t, *a, **k):
        return real(t, *a, **k).fill_(float("nan"))
    monkeypatch.setattr(torch, "empty_like", nan_like)
    real_empty = torch.empty

    def nan_empty(*a, **k):
        out = real_empty(*a, **k)
        return out.fill_(float("nan")) if out.is_floating_point() else out
    monkeypatch.setattr(torch, "empty", nan_empty)


def ref_rms(x, w, eps):
    xf = x.float()
    xn = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xn.to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n", [(1, 64), (7, 4096), (33, 5120), (5, 4095), (3, 1000),
                                    (2, 13), (4, 32768), (3, 8200)])
def test_rmsnorm(K, dtype, rows, n):
    x, r = rnd(rows, n, dtype=dtype), rnd(rows, n, dtype=dtype)
    w = rnd(n, dtype=dtype, scale=0.5) + 1
    close(K.rms_norm(x, w, 1e-5), ref_rms(x, w, 1e-5), "norm")
    out, s = K.rms_norm(x, w, 1e-6, residual=r)
    assert torch.equal(s, x + r)  # the sum is computed and rounded exactly like torch
    close(out, ref_rms(x + r, w, 1e-6), "norm")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n", [(3, 768), (5, 1023), (2, 4096)])
def test_layernorm(K, dtype, rows, n):
    x, r = rnd(rows, n, dtype=dtype, scale=3) + 1, rnd(rows, n, dtype=dtype)
    w, b = rnd(n, dtype=dtype), rnd(n, dtype=dtype)
    ln = torch.nn.functional.layer_norm
    close(K.layer_norm(x, w, b, 1e-5), ln(x, (n,), w, b, 1e-5), "norm")
    out, s = K.layer_norm(x, w, b, 1e-5, residual=r)
    assert torch.equal(s, x + r)
    close(out, ln(x + r, (n,), w, b, 1e-5), "norm")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,inter", [(1, 8), (9, 11008), (4, 13), (17, 1000)])
def test_gated(K, dtype, rows, inter):
    gu = rnd(rows, 2 * inter, dtype=dtype, scale=2)
    g, u = gu[:, :inter], gu[:, inter:]
    F = torch.nn.functional
    close(K.gated(gu, "swiglu"), F.silu(g) * u, "act")
    close(K.gated(gu, "geglu"), F.gelu(g, approximate="tanh") * u, "act")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [8, 4096 * 3, 1001])
def test_gelu(K, dtype, n):
    x = rnd(n, dtype=dtype, scale=3)
    F = torch.nn.functional
    close(K.gelu(x, "tanh"), F.gelu(x, approximate="tanh"), "act")
    close(K.gelu(x, "none"), F.gelu(x), "act")


def ref_rope(x, pos, inv_freq, rot, interleaved):
    # x [T, H, D] in fp32; HF rotate_half or GPT-J interleaved on the first rot dims
    ang = pos.float()[:, None] * inv_freq[None, :]  # [T, rot/2]
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
    xr, xp = x[..., :rot], x[..., rot:]
    if interleaved:
        a, b = xr[..., 0::2], xr[..., 1::2]
        out = torch.stack([a * cos - b * sin, b * cos + a * sin], -1).flatten(-2)
    else:
        a, b = xr[..., : rot // 2], xr[..., rot // 2:]
        out = torch.cat([a * cos - b * sin, b * cos + a * sin], -1)
    return torch.cat([out, xp], -1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("t,hq,hkv,d,rot,bias", [
    (5, 4, 2, 64, 64, False), (37, 32, 8, 128, 128, True), (3, 6, 6, 80, 32, True),
    (9, 2, 1, 64, 16, False),
    (7, 12, 12, 64, 0, True),   # rot 0, GPT-2: q/k/v split and the bias added, no rotation
    # a pair a thread in 2-byte accesses (launch_rules.rope_vector_units gives 0): D not a
    # multiple of 8; rotate-half's halves not whole 8-element units (interleaved: 16-byte)
    (4, 2, 2, 36, 36, True), (3, 2, 2, 64, 24, False)])
def test_rope(K, dtype, interleaved, t, hq, hkv, d, rot, bias):
    qkv = rnd(t, (hq + 2 * hkv) * d, dtype=dtype)
    b = rnd((hq + 2 * hkv) * d, dtype=dtype) if bias else None
    pos = torch.randint(0, 100000, (t,), device="cuda", dtype=torch.int32)
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    # rot // 2 frequencies (none for rot 0: llama3_inv_freq reads 0 as "all of head_dim")
    inv = torch.tensor(llama3_inv_freq(d, 500000.0, rot, scaling), device="cuda")[:rot // 2]
    q, k, v = K.rope(qkv, pos, inv, hq, hkv, d, rot, interleaved, b)
    x = (qkv + b if bias else qkv).view(t, hq + 2 * hkv, d).float()
    close(q, ref_rope(x[:, :hq], pos, inv, rot, interleaved), "rope")
    close(k, ref_rope(x[:, hq:hq + hkv], pos, inv, rot, interleaved), "rope")
    close(v, x[:, hq + hkv:], "rope")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rot", [64, 0, 24])  # 0: GPT-2, K/V cached as they come; 24: 2-byte path
def test_rope_cache_write(K, dtype, rot):
    lens, ctx, hq, hkv, d, bs = [5, 1, 70], [5, 40, 100], 8, 2, 64, 16
    q0, _, _, starts, cl, tables, cache = make_batch(lens, ctx, hq, hkv, d, bs, dtype)
    qkv = rnd(q0.shape[0], (hq + 2 * hkv) * d, dtype=dtype)
    pos = torch.cat([torch.arange(c - n, c) for n, c in zip(lens, ctx)]).int().cuda()
    inv = torch.tensor(llama3_inv_freq(d, 10000.0), device="cuda")
    before = cache.clone()
    q, k, v = K.rope(qkv, pos, inv, hq, hkv, d, rot, cache=cache, seq_starts=starts,
                     block_tables=tables)
    for a, b in zip((q, k, v), K.rope(qkv, pos, inv, hq, hkv, d, rot)):
        assert torch.equal(a, b)
    if rot == 0:
        assert torch.equal(torch.cat([q, k, v], 1), qkv.view(q.shape[0], -1, d))
    _, expect = ref_attention(q, k, v, starts, cl, tables, before, 1.0)
    assert torch.equal(cache, expect), "rope cache write missing or misplaced"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("hq,hkv,d,rot,bias", [
    (8, 2, 64, 64, False),      # one CTA, a head a warp
    (14, 2, 64, 64, True),      # 18 heads over 2 CTAs of 9: a CTA's threads past its pairs
    (32, 8, 128, 128, True),    # a head two warps, 6 CTAs a token
    (16, 8, 128, 64, False)])   # partial rotary: the norm spans all D dims, RoPE the first 64
def test_rope_qk_norm(K, dtype, interleaved, hq, hkv, d, rot, bias):
    """Qwen3 / Gemma 3: a per-head RMSNorm of q and k (HF's rounding: weight * (x * rstd)
    in the dtype) before RoPE, v untouched, the normed and rotated K and V in the cache."""
    lens, ctx, bs, eps = [5, 1, 70], [5, 40, 100], 16, 1e-6
    _, _, _, starts, cl, tables, cache = make_batch(lens, ctx, hq, hkv, d, bs, dtype)
    t = sum(lens)
    qkv = rnd(t, (hq + 2 * hkv) * d, dtype=dtype, scale=3)
    b = rnd((hq + 2 * hkv) * d, dtype=dtype) if bias else None
    wq, wk = (rnd(d, dtype=dtype, scale=0.5) + 1 for _ in range(2))
    pos = torch.cat([torch.arange(c - n, c) for n, c in zip(lens, ctx)]).int().cuda()
    inv = torch.tensor(llama3_inv_freq(d, 10000.0, rot), device="cuda")
    before = cache.clone()
    q, k, v = K.rope(qkv, pos, inv, hq, hkv, d, rot, interleaved, b, cache=cache,
                     seq_starts=starts, block_tables=tables, qk_norm=(wq, wk), eps=eps)
    x = (qkv + b if bias else qkv).view(t, hq + 2 * hkv, d)   # the kernel rounds the sum too
    qn, kn = ref_rms(x[:, :hq], wq, eps).float(), ref_rms(x[:, hq:hq + hkv], wk, eps).float()
    close(q, ref_rope(qn, pos, inv, rot, interleaved), "rope")
    close(k, ref_rope(kn, pos, inv, rot, interleaved), "rope")
    assert torch.equal(v, x[:, hq + hkv:])
    _, expect = ref_attention(q, k, v, starts, cl, tables, before, 1.0)
    assert torch.equal(cache, expect), "rope cache write missing or misplaced"


CASES = [  # (new tokens per sequence, context after the step)
    ([1, 1, 1, 1], [1, 17, 100, 333]),             # pure decode
    ([5, 1, 70, 1, 130], [5, 40, 70, 1000, 200]),  # prefill chunks + decode, mixed
    ([1, 1], [3000, 4500]),                        # long decode: split over the context
    ([64, 1], [64, 65]),
    ([1, 1, 1], [1, 513, 65]),                     # decode, short contexts split finely
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("bs", [16, 32, 64])
@pytest.mark.parametrize("hq,hkv", [(8, 2), (4, 4), (32, 8)])
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("force", ["decode", "prefill"])
# Windows: none; inside one 64-key tile; several tiles and, on the long decode, split too.
@pytest.mark.parametrize("window", [0, 37, 1000])
def test_paged_attention(K, dtype, d, bs, hq, hkv, case, force, window):
    lens, ctx = CASES[case]
    key = f"{dtype}{d}{bs}{hq}{case}{force}{window}"
    keep = 0.5 if window == 0 else 0.25
    if (bs, hq) != (16, 32) and random.Random(key).random() >= keep:
        pytest.skip("sampled grid: part of the secondary combinations, to bound run time")
    q, k, v, starts, cl, tables, cache = make_batch(lens, ctx, hq, hkv, d, bs, dtype)
    scale = 1 / math.sqrt(d)
    ref, ref_cache = ref_attention(q, k, v, starts, cl, tables, cache, scale, window)
    out = K.paged_attention(q, k, v, starts, cl, tables, cache, scale, force=force,
                            window=window)
    torch.cuda.synchronize()
    assert torch.equal(cache, ref_cache), "in-place K/V write missing or misplaced"
    close(out, ref, "attn")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("hq,hkv", [(32, 8), (16, 1)])
@pytest.mark.parametrize("window", [0, 1000])
@pytest.mark.parametrize("mode", ["schedule", "grid", "reduce"])
def test_decode_split_combine(K, dtype, d, hq, hkv, window, mode):
    """A split decode's partials combined by its last CTA or by attn_reduce (reduce: the
    TensorRT plugin), into a poisoned output, the splits from the host's schedule (schedule:
    the cuda backend) or from the grid: against the reference on batches whose tokens run out
    of keys at different splits, from 1 live split of 9 to 157 of 264 (G up to 16 q heads a
    kv head), and (scheduled) a long context split into many items among short ones of one.
    Each launch must leave the counters zeroed (launch.py checks), so the calls after the
    first also test the reset."""
    fuse = mode != "reduce"
    for lens, ctx in (([1, 1], [3000, 4500]), ([1, 1, 1], [1, 513, 65]), ([1], [20000]),
                      ([1] * 6, [9000, 1, 64, 65, 700, 3])):
        q, k, v, starts, cl, tables, cache = make_batch(lens, ctx, hq, hkv, d, 16, dtype)
        ref, _ = ref_attention(q, k, v, starts, cl, tables, cache, 0.1, window)
        for _ in range(2):
            out = K.paged_attention(q, k, v, starts, cl, tables, cache, 0.1, force="decode",
                                    window=window, fuse_reduce=fuse,
                                    schedule=mode == "schedule",
                                    out=torch.full_like(q, float("nan")))
            torch.cuda.synchronize()
            plan = K.last_plan
            if mode == "schedule":
                items = ap.decode_schedule(ctx, plan)[:, 0]
                assert plan.reduce is None and (items >= 0).sum() > len(ctx), plan
            else:
                assert plan.n_split > 1 and (plan.reduce is None) == fuse, plan
            close(out, ref, "attn")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("variant", sorted(ap.PREFILL_WARPS) + [ap.SM90_VARIANT])
@pytest.mark.parametrize("hq,hkv,pack", [(32, 8, 1), (32, 8, 4), (8, 2, 2), (12, 4, 3)])
@pytest.mark.parametrize("window", [0, 100])
def test_prefill_variants(K, dtype, d, variant, hq, hkv, pack, window):
    """Every prefill kernel variant and head packing on every batch shape (block size 16)."""
    if variant == ap.SM90_VARIANT and K.arch != "sm_90a":
        pytest.skip(f"the sm90 prefill kernel needs an sm_90a device, not {K.arch}")
    for case, (lens, ctx) in enumerate(CASES + [([300, 7, 1], [300, 900, 2])]):
        q, k, v, starts, cl, tables, cache = make_batch(lens, ctx, hq, hkv, d, 16, dtype)
        ref, ref_cache = ref_attention(q, k, v, starts, cl, tables, cache, 0.1, window)
        out = K.paged_attention(q, k, v, starts, cl, tables, cache, 0.1, force="prefill",
                                variant=variant, pack=pack, window=window)
        torch.cuda.synchronize()
        assert torch.equal(cache, ref_cache), case
        close(out, ref, "attn")


@pytest.mark.parametrize("variant", ["w8s", ap.SM90_VARIANT])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("bs", [16, 64])
def test_prefill_ignores_nan_past_the_context(K, variant, d, bs):
    """Pool rows that no sequence's context covers (the rest of its last block, and blocks
    no table names) hold NaN: no prefill kernel may let them reach the output (0 * NaN in
    P V), whichever key tile they fall in."""
    if variant == ap.SM90_VARIANT and K.arch != "sm_90a":
        pytest.skip(f"the sm90 prefill kernel needs an sm_90a device, not {K.arch}")
    lens, ctx = [5, 1, 70, 1, 130, 3], [5, 40, 70, 1000, 200, 129]
    q, k, v, starts, cl, tables, cache = make_batch(lens, ctx, 8, 2, d, bs, torch.bfloat16)
    used, tab = torch.zeros(cache.shape[1], bs, dtype=torch.bool), tables.cpu()
    for s, c in enumerate(ctx):
        for p in range(c):
            used[tab[s, p // bs], p % bs] = True
    cache.permute(0, 1, 3, 2, 4)[:, ~used.to(cache.device)] = float("nan")
    ref, ref_cache = ref_attention(q, k, v, starts, cl, tables, cache, 0.1)
    out = K.paged_attention(q, k, v, starts, cl, tables, cache, 0.1, force="prefill",
                            variant=variant)
    torch.cuda.synchronize()
    assert K.last_plan.main.kernel.endswith(variant)
    assert not out.isnan().any()
    close(out, ref, "attn")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("force", ["decode", "prefill", "prefill_mma"])
@pytest.mark.parametrize("window", [0, 37])
@pytest.mark.parametrize("cap", [50.0, 1.0])
def test_paged_attention_softcap(K, dtype, d, force, window, cap):
    """Gemma 2's logit soft-cap in every kernel (the _softcap entries), on every batch shape:
    against the capped eager reference, and a cap that bites changes the result (so the
    entries do apply it). prefill: the device's default (sm90 on sm_90a); prefill_mma: the
    mma.sync kernel."""
    for lens, ctx in CASES:
        q, k, v, starts, cl, tables, cache = make_batch(lens, ctx, 8, 2, d, 16, dtype)
        q = q * 4   # scores of a few units: a cap of 1 bites, 50 barely
        scale = 1 / math.sqrt(d)
        ref, ref_cache = ref_attention(q, k, v, starts, cl, tables, cache, scale, window, cap)
        out = K.paged_attention(q, k, v, starts, cl, tables, cache, scale,
                                force=force.removesuffix("_mma"), window=window, softcap=cap,
                                **({"sm90": False} if force == "prefill_mma" else {}))
        torch.cuda.synchronize()
        assert K.last_plan.main.kernel.endswith("_softcap")
        assert torch.equal(cache, ref_cache)
        close(out, ref, "attn")
        if cap == 1.0:
            plain, _ = ref_attention(q, k, v, starts, cl, tables, cache, scale, window)
            assert (plain.float() - ref.float()).abs().max() > 0.05


def test_paged_attention_default_dispatch(K):
    dtype, d = torch.bfloat16, 128
    for lens, ctx in CASES:
        q, k, v, starts, cl, tables, cache = make_batch(lens, ctx, 32, 8, d, 16, dtype)
        ref, _ = ref_attention(q, k, v, starts, cl, tables, cache, 0.1)
        close(K.paged_attention(q, k, v, starts, cl, tables, cache, 0.1), ref, "attn")


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("window", [0, 300])
def test_shared_memory_fallbacks(K, d, window):
    """The plans a GPU with less shared memory per block gets, run here by passing a smaller
    max_smem: 2-stage decode (what sm_86/89/120 take at D=128), then the prefill kernel for a
    pure decode step, then its 4-warp variant."""
    dtype = torch.bfloat16
    limits = {"decode_s2": ap.decode_smem(d, 2), "prefill_w8s": ap.prefill_smem(d, "w8s"),
              "prefill_w4": ap.prefill_smem(d, "w4")}
    for want, lim in limits.items():
        for lens, ctx in CASES:
            q, k, v, starts, cl, tables, cache = make_batch(lens, ctx, 32, 8, d, 16, dtype)
            ref, ref_cache = ref_attention(q, k, v, starts, cl, tables, cache, 0.1, window)
            out = K.paged_attention(q, k, v, starts, cl, tables, cache, 0.1, window=window,
                                    max_smem=lim)
            torch.cuda.synchronize()
            plan = K.last_plan
            if len(lens) == sum(lens):  # pure decode: the fallback under test
                kind = ("decode_" if plan.decode else "prefill_") + plan.main.kernel.rsplit(
                    "_", 1)[1]
                assert kind == want, plan
            assert plan.main.smem <= lim
            assert torch.equal(cache, ref_cache)
            close(out, ref, "attn")
