"""Benchmark every plugin kernel against PyTorch eager, torch.compile and the HBM roofline.

    python bench/kernels/bench.py [--out results.md] [--only decode prefill]

Each variant is captured in a CUDA graph (5 calls) and replayed; the median replay time over
`REPS` replays is reported, so host launch overhead is excluded for every variant alike.
Bandwidth figures count the fewest bytes each op must move (inputs read once, outputs written
once). The copy row measures the achievable device-to-device bandwidth on this GPU. The
memory-bound kernels are timed at decode's 1-256 rows too, where latency bounds them: those
rows say how many times the launch floor (a graph of one-element fills) they take.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from llmc.plugins.attention_plan import (
    PREFILL_VARIANT,
    PREFILL_WARPS,
    SM90_VARIANT,
    decode_plan,
    decode_schedule,
)
from llmc.plugins.launch import Kernels
from llmc.plugins.launch_rules import llama3_inv_freq

# the GPU tests' batch maker, so the benchmark times the batches the tests check
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "plugins"))
from attention_ref import make_batch  # noqa: E402

CALLS, REPS = 5, 30
DECODE_ROWS = (1, 8, 64, 256)   # the memory-bound kernels at decode steps' token counts
DATASHEET_BW = 3.35e12  # H100 SXM HBM3


def bench(fn) -> float:
    """Median seconds per call."""
    fn()
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(CALLS):
            fn()
    g.replay()
    times = []
    for _ in range(REPS):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / CALLS)
    return statistics.median(times)


def compiled(fn):
    c = torch.compile(fn)
    return c


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--only", nargs="+",
                    help="run only the rows whose name contains one of these texts")
    args = ap.parse_args()
    K = Kernels()
    dev = torch.cuda.get_device_properties(0)
    bf = torch.bfloat16
    rows = []

    buf = torch.randn(512 * 2**20, device="cuda", dtype=bf)  # 1 GiB
    dst = torch.empty_like(buf)
    t = bench(lambda: dst.copy_(buf))
    copy_bw = 2 * buf.numel() * 2 / t
    rows.append(("device copy 1 GiB", t, None, None, copy_bw, ""))
    buf = dst = None  # free 2 GiB before the kernel rows

    def wanted(name):
        return not args.only or any(o in name for o in args.only)

    def schedule_note(ctxs, mb, bs, e4m3=False):
        """How the host's schedule cuts these contexts: items (CTAs a kv head)."""
        plan = decode_plan(len(ctxs), hq, hkv, d, mb, bs, "bfloat16", K.sm_count, False,
                           max_smem=K.max_smem, e4m3=e4m3, fuse_reduce=True, schedule=True)
        items = decode_schedule(ctxs, plan)
        return f"scheduled: {(items[:, 0] >= 0).sum()} items"

    def add(name, ours, eager, comp, nbytes, note="", floor=None):
        if not wanted(name):
            return
        to = bench(ours)
        te = bench(eager) if eager else None
        tc = bench(comp) if comp else None
        if floor:
            note = f"{to / floor:.1f}x the launch floor"
        rows.append((name, to, te, tc, nbytes / to, note))

    # fused residual + RMSNorm, T=8192 tokens, hidden 4096
    T, n = 8192, 4096
    x, r = torch.randn(T, n, device="cuda", dtype=bf), torch.randn(T, n, device="cuda", dtype=bf)
    w = torch.randn(n, device="cuda", dtype=bf)

    def ref_add_rms(x, r, w):
        s = x + r
        sf = s.float()
        return w * (sf * torch.rsqrt(sf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(s.dtype), s
    crms = compiled(ref_add_rms)
    add(f"add+RMSNorm bf16 [{T},{n}]", lambda: K.rms_norm(x, w, 1e-5, residual=r),
        lambda: ref_add_rms(x, r, w), lambda: crms(x, r, w), 4 * T * n * 2 + n * 2)
    x = r = None

    # SwiGLU on gate-up [T, 2I], llama-3-8B intermediate size
    T, inter = 4096, 14336
    gu = torch.randn(T, 2 * inter, device="cuda", dtype=bf)

    def ref_swiglu(gu):
        return F.silu(gu[:, :inter]) * gu[:, inter:]
    csw = compiled(ref_swiglu)
    add(f"SwiGLU bf16 [{T},{2 * inter}]", lambda: K.gated(gu, "swiglu"), lambda: ref_swiglu(gu),
        lambda: csw(gu), 3 * T * inter * 2)
    gu = None

    # RoPE + bias on fused qkv, llama-3-8B heads
    T, hq, hkv, d = 8192, 32, 8, 128
    qkv = torch.randn(T, (hq + 2 * hkv) * d, device="cuda", dtype=bf)
    bias = torch.randn((hq + 2 * hkv) * d, device="cuda", dtype=bf)
    pos = torch.randint(0, 8192, (T,), device="cuda", dtype=torch.int32)
    inv = torch.tensor(llama3_inv_freq(d, 500000.0), device="cuda")

    def ref_rope(qkv, bias, pos):
        x = (qkv + bias).view(T, hq + 2 * hkv, d)
        ang = pos.float()[:, None] * inv[None]
        emb = torch.cat([ang, ang], -1)
        cos, sin = emb.cos().to(bf)[:, None], emb.sin().to(bf)[:, None]
        qk = x[:, : hq + hkv]
        rot = torch.cat([-qk[..., d // 2:], qk[..., : d // 2]], -1)
        qk = qk * cos + rot * sin
        return qk[:, :hq].contiguous(), qk[:, hq:].contiguous(), x[:, hq + hkv:].contiguous()
    crope = compiled(ref_rope)
    add(f"RoPE+bias bf16 T={T} 32/8x128", lambda: K.rope(qkv, pos, inv, hq, hkv, d, d, False,
                                                          bias),
        lambda: ref_rope(qkv, bias, pos), lambda: crope(qkv, bias, pos),
        2 * T * (hq + 2 * hkv) * d * 2)

    # the variant the cuda backend runs: RoPE + bias + the K/V write into the paged cache, a
    # sequence of T tokens in blocks of 16
    bs = 16
    cache = torch.empty(2, T // bs, hkv, bs, d, device="cuda", dtype=bf)
    starts = torch.tensor([0, T], device="cuda", dtype=torch.int32)
    tables = torch.arange(T // bs, device="cuda", dtype=torch.int32)[None]
    seq_pos = torch.arange(T, device="cuda", dtype=torch.int32)
    blk, row = (seq_pos // bs).long(), (seq_pos % bs).long()

    def ref_rope_cache(qkv, bias, pos):
        q, k, v = ref_rope(qkv, bias, pos)
        cache[0, blk, :, row] = k
        cache[1, blk, :, row] = v
        return q, k, v
    crope_cache = compiled(ref_rope_cache)
    add(f"RoPE+bias+cache write bf16 T={T} 32/8x128 bs={bs}",
        lambda: K.rope(qkv, seq_pos, inv, hq, hkv, d, d, False, bias, cache, starts, tables),
        lambda: ref_rope_cache(qkv, bias, seq_pos), lambda: crope_cache(qkv, bias, seq_pos),
        2 * T * (hq + 2 * hkv) * d * 2 + 2 * T * hkv * d * 2)
    qkv = cache = None

    # The same kernels at decode's rows (a token a sequence): far from the bandwidth, bound by
    # latency. The floor a kernel in a graph cannot go under: a graph of one-element fills
    # (each a launch, nothing to move), timed as every row is.
    tiny = torch.zeros(1, device="cuda")
    floor = bench(lambda: tiny.fill_(1.0))
    if wanted("launch floor") or wanted("(decode)"):
        rows.append(("launch floor: a one-element fill", floor, None, None, 0.0, "PyTorch's"))
    n, inter, hq, hkv, d, bs = 4096, 14336, 32, 8, 128, 16
    for T in DECODE_ROWS:
        x, r = (torch.randn(T, n, device="cuda", dtype=bf) for _ in range(2))
        add(f"add+RMSNorm bf16 [{T},{n}] (decode)", lambda: K.rms_norm(x, w, 1e-5, residual=r),
            lambda: ref_add_rms(x, r, w), None, 4 * T * n * 2 + n * 2, floor=floor)
        gu = torch.randn(T, 2 * inter, device="cuda", dtype=bf)
        add(f"SwiGLU bf16 [{T},{2 * inter}] (decode)", lambda: K.gated(gu, "swiglu"),
            lambda: ref_swiglu(gu), None, 3 * T * inter * 2, floor=floor)
        # T sequences of one token each, at position 7 of a block of its own
        qkv = torch.randn(T, (hq + 2 * hkv) * d, device="cuda", dtype=bf)
        cache = torch.empty(2, T, hkv, bs, d, device="cuda", dtype=bf)
        starts = torch.arange(T + 1, device="cuda", dtype=torch.int32)
        tables = torch.arange(T, device="cuda", dtype=torch.int32).view(T, 1)
        pos = torch.full((T,), 7, device="cuda", dtype=torch.int32)
        add(f"RoPE+bias+cache write bf16 T={T} 32/8x128 bs={bs} (decode)",
            lambda: K.rope(qkv, pos, inv, hq, hkv, d, d, False, bias, cache, starts, tables),
            None, None, 2 * T * (hq + 2 * hkv) * d * 2 + 2 * T * hkv * d * 2, floor=floor)
    x = r = gu = qkv = cache = None

    # decode paged attention: batch 64, context 2048, 32 q / 8 kv heads, D=128, bf16
    for bs in (16, 64):
        B, ctx = 64, 2048
        q, k, v, starts, cl, tables, cache = make_batch([1] * B, [ctx] * B, hq, hkv, d, bs, bf,
                                                        extra_blocks=0)
        mb = tables.shape[1]
        nbytes = B * 2 * ctx * hkv * d * 2

        def ref_decode(q, tables, cache):
            kv = cache[:, tables[:, : ctx // bs].long()]  # [2, B, nblk, Hkv, bs, D]
            kv = kv.permute(0, 1, 3, 2, 4, 5).reshape(2, B, hkv, ctx, d)
            return F.scaled_dot_product_attention(q.view(B, hq, 1, d), kv[0], kv[1],
                                                  enable_gqa=True)
        cdec = compiled(ref_decode)
        name16 = f"paged decode bf16 B=64 ctx=2048 bs={bs}"
        add(name16,
            lambda: K.paged_attention(q, k, v, starts, cl, tables, cache, write_kv=False),
            lambda: ref_decode(q, tables, cache), lambda: cdec(q, tables, cache), nbytes,
            schedule_note([ctx] * B, mb, bs))
        add(f"{name16}, grid splits",
            lambda: K.paged_attention(q, k, v, starts, cl, tables, cache, write_kv=False,
                                      schedule=False),
            None, None, nbytes, "ours only; splits=%d" % decode_plan(
                B, hq, hkv, d, mb, bs, "bfloat16", K.sm_count, max_smem=K.max_smem).n_split)
        if bs == 16:  # Mistral-style window: only the last W keys are read
            W = 512
            add(f"paged decode bf16 B=64 ctx=2048 bs={bs} window={W}",
                lambda: K.paged_attention(q, k, v, starts, cl, tables, cache, write_kv=False,
                                          window=W),
                None, None, B * 2 * W * hkv * d * 2, "ours only")
        # the same keys in an E4M3 pool (--kv-cache-dtype fp8): half the bytes to read
        cache8 = (cache.float() / 0.05).to(torch.float8_e4m3fn)
        name8 = f"{name16} E4M3 pool"
        if wanted(name8):
            t8 = bench(lambda: K.paged_attention(q, k, v, starts, cl, tables, cache8,
                                                 write_kv=False, kv_scales=(0.05, 0.05)))
            t16 = next((r[1] for r in rows if r[0] == name16), None)
            rows.append((name8, t8, None, None, nbytes / 2 / t8, "ours only" + (
                f"; {t16 / t8:.2f}x less time than the bf16 pool" if t16 else "")))
        cache = cache8 = None

    # decode at the shapes serving hits (ours only): one long sequence (split over KV), many
    # short ones, and batches of mixed lengths; bytes = the K/V each sequence reads. Each
    # shape as the cuda backend runs it (the host's schedule), then with the grid's splits
    # (each token's context over one split count: before the schedule, and the TensorRT
    # plugin's way, also with attn_reduce after it)
    serving = [("B=1 ctx=512", [512]), ("B=1 ctx=8192", [8192]), ("B=1 ctx=32768", [32768]),
               ("B=256 ctx=256", [256] * 256),
               ("B=64 mixed ctx 64-4096", [64 * 2 ** (i % 7) for i in range(64)]),
               ("B=8 ctx 32768 + 7 x 512", [32768] + [512] * 7),
               ("B=32 ctx 8192 + 31 x 1024", [8192] + [1024] * 31)]
    for label, ctxs in serving:
        name = f"paged decode bf16 {label} bs=16"
        if not wanted(name) and not wanted(f"{name} E4M3 pool"):
            continue
        B = len(ctxs)
        q, k, v, starts, cl, tables, cache = make_batch([1] * B, ctxs, hq, hkv, d, 16, bf,
                                                        extra_blocks=0)
        plan = decode_plan(B, hq, hkv, d, tables.shape[1], 16, "bfloat16", K.sm_count, False,
                           max_smem=K.max_smem)
        nbytes = sum(ctxs) * 2 * hkv * d * 2
        add(name, lambda: K.paged_attention(q, k, v, starts, cl, tables, cache, write_kv=False),
            None, None, nbytes, "ours only; " + schedule_note(ctxs, tables.shape[1], 16))
        add(f"{name}, grid splits",
            lambda: K.paged_attention(q, k, v, starts, cl, tables, cache, write_kv=False,
                                      schedule=False),
            None, None, nbytes, f"ours only; splits={plan.n_split}")
        if plan.n_split > 1:   # the splits combined by attn_reduce (the TensorRT plugin's way)
            add(f"{name}, attn_reduce after it",
                lambda: K.paged_attention(q, k, v, starts, cl, tables, cache, write_kv=False,
                                          fuse_reduce=False),
                None, None, sum(ctxs) * 2 * hkv * d * 2, f"ours only; splits={plan.n_split}")
        cache8 = (cache.float() / 0.05).to(torch.float8_e4m3fn)   # the E4M3 pool: half the bytes
        add(f"{name} E4M3 pool",
            lambda: K.paged_attention(q, k, v, starts, cl, tables, cache8, write_kv=False,
                                      kv_scales=(0.05, 0.05)),
            None, None, nbytes / 2,
            "ours only; " + schedule_note(ctxs, tables.shape[1], 16, e4m3=True))
        cache = cache8 = None

    # prefill: one 2048-token sequence (causal), vs SDPA flash on contiguous q/k/v
    n_tok = 2048
    q, k, v, starts, cl, tables, cache = make_batch([n_tok], [n_tok], hq, hkv, d, 16, bf)
    qh = q.transpose(0, 1).unsqueeze(0).contiguous()
    kh = k.transpose(0, 1).unsqueeze(0).repeat_interleave(hq // hkv, 1).contiguous()
    vh = v.transpose(0, 1).unsqueeze(0).repeat_interleave(hq // hkv, 1).contiguous()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def flash():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(qh, kh, vh, is_causal=True)
    flops = 4 * n_tok * n_tok * d * hq / 2
    tf = bench(flash)
    # the default variant: the TMA + wgmma kernel on sm_90a, else PREFILL_VARIANT
    sm90 = K.arch == "sm_90a"
    default = SM90_VARIANT if sm90 else PREFILL_VARIANT
    for variant in sorted(PREFILL_WARPS) + ([SM90_VARIANT] if sm90 else []):
        for pack in (1, None):
            name = f"prefill {n_tok} tok 32/8x128 bf16 {variant} pack={pack or hq // hkv}"
            if variant != default or pack is not None:
                if not args.only:  # the non-default variants are for tuning runs
                    continue
                name += " (tuning)"
            if not wanted(name):
                continue
            ours = bench(lambda: K.paged_attention(q, k, v, starts, cl, tables, cache,
                                                   write_kv=False, force="prefill",
                                                   variant=variant, pack=pack))
            rows.append((name + " (TFLOP/s)", ours, tf, None, flops / ours,
                         f"SDPA flash {flops / tf / 1e12:.0f} TFLOP/s; "
                         f"ours/flash = {ours / tf:.2f}x"))
    W = 512
    name = f"prefill {n_tok} tok 32/8x128 bf16 window={W} (TFLOP/s)"
    if wanted(name):  # FLOPs inside the window only: row p sees min(p + 1, W) keys
        wflops = 4 * d * hq * sum(min(p + 1, W) for p in range(n_tok))
        ours = bench(lambda: K.paged_attention(q, k, v, starts, cl, tables, cache,
                                               write_kv=False, window=W))
        rows.append((name, ours, None, None, wflops / ours, "ours only"))

    lines = [f"GPU: {dev.name}, {dev.multi_processor_count} SMs; torch {torch.__version__}, "
             f"CUDA {torch.version.cuda}; measured copy bandwidth {copy_bw / 1e12:.2f} TB/s",
             "",
             "| kernel | ours (us) | eager (us) | compile (us) | vs eager | vs compile "
             "| GB/s | % of 3.35 TB/s | % of copy BW | note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, to, te, tc, rate, note in rows:
        f = lambda x: f"{x * 1e6:.1f}" if x else "-"  # noqa: E731
        ratio = lambda x: f"{x / to:.2f}x" if x else "-"  # noqa: E731
        if "TFLOP" in name:
            flash = f"{f(te)} (flash)" if te else "-"
            lines.append(f"| {name} | {f(to)} | {flash} | - | {ratio(te)} | - | "
                         f"{rate / 1e12:.0f} TFLOP/s | - | - | {note} |")
            continue
        if not rate:   # the launch floor moves no bytes
            lines.append(f"| {name} | {f(to)} | - | - | - | - | - | - | - | {note} |")
            continue
        lines.append(f"| {name} | {f(to)} | {f(te)} | {f(tc)} | {ratio(te)} | {ratio(tc)} | "
                     f"{rate / 1e9:.0f} | {100 * rate / DATASHEET_BW:.0f}% | "
                     f"{100 * rate / copy_bw:.0f}% | {note} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
