"""The E4M3 KV pool's kernels (--kv-cache-dtype fp8) against PyTorch references on the GPU
(marked `gpu`; skipped without CUDA, and below compute capability 8.9, which the E4M3
conversions need).

- rope_*_cache_e4m3: q, k and v exactly as the 16-bit cache kernel gives them, and the pool's
  bytes exactly the E4M3 of k / s_k and v / s_v (round to nearest even, saturating at 448:
  ml_dtypes, the rounding the reference backend's QuantizeLinear has, tested in
  tests/quantization/test_kv_fp8.py) at the rows the block tables name, every other byte
  untouched; with and without RoPE, bias and the q/k norm, a thread a pair or (where the
  kernel has it) 8 elements;
- paged attention over an E4M3 pool, every kernel (decode with 3 and 2 stages, prefill w8s
  and w4 with each head packing, soft-capped, windowed) on ragged batches against SDPA on
  the pool dequantized as each kernel does, with the 16-bit tolerances: prefill as the
  graph's DequantizeLinear does (the E4M3 value times the scale, rounded to the dtype once),
  decode exactly (the E4M3 values in fp16, the scales applied in fp32: one rounding fewer,
  which in bf16 moves soft-capped outputs by up to 0.016, past the tolerance). The pool is
  only read.

Inputs are fresh random data each run, outputs are poisoned (NaN) before each launch."""
import math
import random

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ml_dtypes = pytest.importorskip("ml_dtypes")


def _why_not() -> str:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU and torch.cuda"
    if torch.cuda.get_device_capability() < (8, 9):
        return "an E4M3 pool needs compute capability 8.9 or newer"
    return ""


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(bool(_why_not()), reason=_why_not() or "-")]

from attention_ref import make_batch, ref_attention  # noqa: E402  (tests/plugins, on sys.path)

from llmc.plugins import attention_plan as ap  # noqa: E402
from llmc.plugins.launch_rules import llama3_inv_freq  # noqa: E402

E4M3 = ml_dtypes.float8_e4m3fn
DTYPES = [torch.float16, torch.bfloat16]
# (atol, rtol): test_gpu_kernels.py's attention tolerances; the kernels read the same 16-bit
# values the reference is given
TOL = {torch.float16: (2e-3, 2e-3), torch.bfloat16: (1e-2, 1e-2)}
CASES = [  # (new tokens per sequence, context after the step), as in test_gpu_kernels.py
    ([1, 1, 1, 1], [1, 17, 100, 333]),             # pure decode
    ([5, 1, 70, 1, 130], [5, 40, 70, 1000, 200]),  # prefill chunks + decode, mixed
    ([1, 1], [3000, 4500]),                        # long decode: split over the context
    ([64, 1], [64, 65]),
    ([1, 1, 1], [1, 513, 65]),                     # decode, short contexts split finely
]


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    # Every floating output allocation starts as NaN, so an element a kernel skips fails.
    real_like, real_empty = torch.empty_like, torch.empty

    def nan_like(t, *a, **k):
        out = real_like(t, *a, **k)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    def nan_empty(*a, **k):
        out = real_empty(*a, **k)
        return out.fill_(float("nan")) if out.is_floating_point() else out
    monkeypatch.setattr(torch, "empty_like", nan_like)
    monkeypatch.setattr(torch, "empty", nan_empty)


def close(out, ref):
    atol, rtol = TOL[out.dtype]
    assert not out.isnan().any(), "unwritten (poisoned) or NaN output"
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)


def rnd(*shape, dtype, scale=1.0):
    return (torch.randn(*shape, device="cuda") * scale).to(dtype)


def in_dtype(x: float, dtype) -> float:
    """x rounded to the dtype: the graph's scales are constants of the compute dtype."""
    return float(torch.tensor(x).to(dtype).float())


def quantize(x, scale: float):
    """E4M3 bytes (uint8) of x / scale: fp32 division, nearest even, saturating at 448."""
    xs = x.float().cpu().numpy() / np.float32(scale)
    q = np.clip(xs, -448.0, 448.0).astype(E4M3).view(np.uint8)
    return torch.from_numpy(q).to(x.device)


def dequantize(b, scale: float, dtype):
    """The E4M3 bytes b times scale (exact in fp32), rounded to dtype once: DequantizeLinear
    (dtype float32: not rounded, as the decode kernel reads them)."""
    f = b.cpu().numpy().view(E4M3).astype(np.float32) * np.float32(scale)
    return torch.from_numpy(f).to(device=b.device, dtype=dtype)


def pool_of(cache, scales, dtype):
    """A 16-bit pool [2, ...] -> (its E4M3 bytes with scales (K, V), their dequantized values:
    {"prefill": rounded to dtype, "decode": exact})."""
    pool = torch.stack([quantize(cache[i], scales[i]) for i in (0, 1)])
    return pool, {kind: torch.stack([dequantize(pool[i], scales[i], dt) for i in (0, 1)])
                  for kind, dt in (("prefill", dtype), ("decode", torch.float32))}


def scales_for(cache, dtype, share=1.0):
    """(K, V) scales of the dtype: |max| / 448, times share (< 1: the largest saturate)."""
    return tuple(in_dtype(float(cache[i].float().abs().max()) / 448 * share, dtype)
                 for i in (0, 1))


# ---- the rope kernel's E4M3 cache write ------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("hq,hkv,d,rot,bias,qk_norm", [
    (8, 2, 64, 64, False, False),
    (32, 8, 128, 128, True, False),     # 6 CTAs a token
    (12, 12, 64, 0, True, False),       # GPT-2: no rotation, K/V cached as they come
    (16, 8, 128, 64, False, True),      # partial rotary after the q/k norm (Qwen3, Gemma 3)
    (14, 2, 64, 64, True, True),        # heads over 2 CTAs, a CTA's threads past its pairs
    (6, 6, 80, 24, True, False)])       # partial rotary in no whole 16-byte units: a pair a
#                                         thread (rotate-half), as the q/k-norm entries
def test_rope_writes_e4m3_rows(K, dtype, interleaved, hq, hkv, d, rot, bias, qk_norm):
    lens, ctx, bs = [5, 1, 70], [5, 40, 100], 16
    _, _, _, starts, cl, tables, cache16 = make_batch(lens, ctx, hq, hkv, d, bs, dtype)
    t = sum(lens)
    qkv = rnd(t, (hq + 2 * hkv) * d, dtype=dtype, scale=3)
    b = rnd((hq + 2 * hkv) * d, dtype=dtype) if bias else None
    norm = tuple(rnd(d, dtype=dtype, scale=0.5) + 1 for _ in range(2)) if qk_norm else None
    pos = torch.cat([torch.arange(c - n, c) for n, c in zip(lens, ctx)]).int().cuda()
    inv = torch.tensor(llama3_inv_freq(d, 10000.0, rot or None)[:rot // 2], device="cuda",
                       dtype=torch.float32)
    kw = dict(interleaved=interleaved, bias=b, seq_starts=starts, block_tables=tables,
              qk_norm=norm, eps=1e-6)
    # the 16-bit kernel first: its k and v give the scales (80% of |max|: the largest
    # values saturate at 448)
    q16, k16, v16 = K.rope(qkv, pos, inv, hq, hkv, d, rot, cache=cache16, **kw)
    scales = scales_for(torch.stack([k16, v16]), dtype, share=0.8)
    pool = torch.randint(0, 256, cache16.shape, dtype=torch.uint8, device="cuda")  # garbage
    before = pool.clone()
    q, k, v = K.rope(qkv, pos, inv, hq, hkv, d, rot, cache=pool, kv_scales=scales, **kw)
    torch.cuda.synchronize()
    for a, ref in zip((q, k, v), (q16, k16, v16)):
        assert torch.equal(a, ref), "q/k/v differ from the 16-bit cache kernel's"
    rows = torch.stack([quantize(k, scales[0]), quantize(v, scales[1])])   # [2, T, Hkv, D]
    assert ((rows & 0x7F) == 0x7E).any(), "no value saturated: the test misses satfinite"
    expect = before.clone()
    for s, (n, c) in enumerate(zip(lens, ctx)):
        for i in range(n):
            p = c - n + i
            expect[:, int(tables[s, p // bs]), :, p % bs] = rows[:, int(starts[s]) + i]
    assert torch.equal(pool, expect), "E4M3 rows wrong, misplaced, or other bytes touched"


# ---- paged attention over an E4M3 pool -------------------------------------------------------

def _e4m3_batch(lens, ctx, hq, hkv, d, bs, dtype):
    """A ragged batch whose pool holds its new rows already (as the rope kernel leaves it),
    in E4M3; and the same pool dequantized, which the reference attends over."""
    q, k, v, starts, cl, tables, cache = make_batch(lens, ctx, hq, hkv, d, bs, dtype)
    _, full = ref_attention(q, k, v, starts, cl, tables, cache, 1.0)   # new rows in place
    scales = scales_for(full, dtype)
    pool, deq = pool_of(full, scales, dtype)
    return q, starts, cl, tables, pool, deq, scales


def _run(K, q, starts, cl, tables, pool, deq, scales, scale, window=0, softcap=0.0, **kw):
    before = pool.clone()
    out = K.paged_attention(q, None, None, starts, cl, tables, pool, scale, write_kv=False,
                            window=window, softcap=softcap, kv_scales=scales, **kw)
    torch.cuda.synchronize()
    plan = K.last_plan
    ref, _ = ref_attention(q, None, None, starts, cl, tables,
                           deq["decode" if plan.decode else "prefill"], scale, window, softcap,
                           write=False)
    assert plan.e4m3 and "_e4m3" in plan.main.kernel
    assert plan.main.kernel.endswith("_softcap") == bool(softcap)
    assert torch.equal(pool, before), "attention wrote into the pool"
    close(out, ref)
    return plan


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("bs", [16, 32, 64])
@pytest.mark.parametrize("hq,hkv", [(8, 2), (4, 4), (32, 8)])
@pytest.mark.parametrize("force", ["decode", "prefill"])
# none; a window inside one 64-key tile; a soft-cap that bites (scores of a few units)
@pytest.mark.parametrize("window,cap", [(0, 0.0), (37, 0.0), (0, 1.0)])
def test_paged_attention_reads_e4m3(K, dtype, d, bs, hq, hkv, force, window, cap):
    key = f"{dtype}{d}{bs}{hq}{force}{window}{cap}"
    if (bs, hq) != (16, 32) and random.Random(key).random() >= 0.5:
        pytest.skip("sampled grid: part of the secondary combinations, to bound run time")
    for lens, ctx in CASES:
        q, starts, cl, tables, pool, deq, scales = _e4m3_batch(lens, ctx, hq, hkv, d, bs,
                                                                 dtype)
        if cap:
            q = q * 4
        plan = _run(K, q, starts, cl, tables, pool, deq, scales, 1 / math.sqrt(d), window,
                    cap, force=force)
        assert plan.decode == (force == "decode")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("variant", sorted(ap.PREFILL_WARPS))
@pytest.mark.parametrize("hq,hkv,pack", [(32, 8, 1), (32, 8, 4), (12, 4, 3)])
def test_prefill_variants_read_e4m3(K, dtype, d, variant, hq, hkv, pack):
    """Every prefill kernel variant and head packing over an E4M3 pool (block size 16),
    a window on the long prefill."""
    for lens, ctx in CASES + [([300, 7, 1], [300, 900, 2])]:
        q, starts, cl, tables, pool, deq, scales = _e4m3_batch(lens, ctx, hq, hkv, d, 16,
                                                                 dtype)
        plan = _run(K, q, starts, cl, tables, pool, deq, scales, 0.1,
                    window=100 if lens[0] == 300 else 0, force="prefill", variant=variant,
                    pack=pack)
        assert plan.main.kernel.endswith(f"_{variant}_e4m3")


@pytest.mark.parametrize("d", [64, 128])
def test_e4m3_shared_memory_fallbacks(K, d):
    """The plans of GPUs with less shared memory per block: 2-stage decode for pure decode
    steps, and w4 for the mixed ones where w8s's byte tiles do not fit."""
    dtype = torch.float16
    limits = {"decode_s2_e4m3": ap.decode_smem(d, 2, e4m3=True),
              "prefill_w4_e4m3": ap.prefill_smem(d, "w8s", e4m3=True) - 1}
    for want, lim in limits.items():
        for lens, ctx in CASES:
            q, starts, cl, tables, pool, deq, scales = _e4m3_batch(lens, ctx, 32, 8, d, 16,
                                                                     dtype)
            pure = len(lens) == sum(lens)
            if pure != want.startswith("decode"):   # the steps whose fallback is under test
                continue
            plan = _run(K, q, starts, cl, tables, pool, deq, scales, 0.1, max_smem=lim)
            kind = "decode_" if plan.decode else "prefill_"
            assert kind + plan.main.kernel.split(f"_d{d}_")[1] == want, plan
            assert plan.main.smem <= lim
