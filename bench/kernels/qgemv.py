"""Benchmark llmc's quantized decode GEMMs (plugins/kernels/qgemv.cu) on the decode shapes of
Llama-3.1-8B against the 16-bit GEMM the same step runs unquantized, and against the HBM
datasheet bandwidth on the bytes each one reads.

    PYTHONPATH=<llmc checkout paths> python3 bench/kernels/qgemv.py [--out results.md]
        [--sweep [dequant|fp8]] [--prefill-only | --decode-only] [--gguf] [--fp8-block]

For M = 1..16 rows: bf16 = what the cuda backend runs unquantized (llmc's GEMV up to 8 rows,
cuBLASLt through torch.matmul above); int4 = w4 (group 128, AWQ's 1 / s applied to x as an
int4-awq engine runs it, and without, as int4-rtn runs it; and w4zp, the kernel of
kernels/qgemv_zp.cu with a zero point per row and group, as an AutoAWQ or asymmetric GPTQ
checkpoint's engine runs it); fp8 = w8 (x quantized as it is loaded); --fp8-block: also
w8b (kernels/qgemv_fp8b.cu, E4M3 weights with a scale a row and block of 128 k, x 16-bit)
and its prefill dequantization. The gate-up GEMM has
its SwiGLU fused in every column (bf16 beyond 8 rows: cuBLASLt, then llmc's SwiGLU kernel).
For M = 24..2048 (GEMM_MS), INT4 RTN four ways: bf16 cuBLASLt; the weight dequantized
(dequant_int4) then cuBLASLt, what the backend runs past launch_rules.W4_GEMM_MAX_M rows; the
small-M GEMM (w4g, kernels/qgemv.cuh), with its K splits for this GPU's SM count; on sm_90a
also its wgmma kernel (w4gw); and the dequantization alone (--prefill-only: these two tables
only).

Timing as bench/kernels/gemm.py: a CUDA graph of >= CALLS calls cycling through >= 256 MiB of
weight copies, median of REPS replays. % peak = bytes read (packed weights + scales + x) and
written, over the time, against 3.35 TB/s. --sweep times variants of both kernels compiled
from the same source (warps splitting K, chunks in flight a warp, CTAs an SM; for the
small-M GEMM warps a CTA, x rows a CTA, x stages, chunks in flight a warp, CTAs an SM and the
warps an SM its K splits aim for, for its wgmma kernel the same; for the dequantization words
a thread): the figures behind the configurations in kernels/qgemv.cuh. --sweep w4gw: the
wgmma kernel's alone. Each small-M GEMM variant's output is checked against the shipped
kernel's before it is timed; one that disagrees is listed as wrong, not with its speed.
"""
from __future__ import annotations

import argparse
import math
import time

import torch
from gemm import CALLS, DATASHEET_BW, REPS, ROTATE_BYTES, graph_time  # noqa: F401

from llmc.plugins import compiler
from llmc.plugins import launch_rules as lr
from llmc.plugins.launch import DevPtr, Functions, Kernels

SHAPES = (  # name, K, N (weight rows), fused activation
    ("qkv", 4096, 6144, None),
    ("o", 4096, 4096, None),
    ("gate_up+swiglu", 4096, 2 * 14336, "swiglu"),
    ("down", 14336, 4096, None),
)
MS = (1, 2, 4, 8, 16)
# the INT4 small-M GEMM's steps (launch_rules.W4_GEMM_MAX_M) and prefill's
GEMM_MS = (24, 32, 64, 128, 256, 512, 2048)
GROUP = 128
# (warps splitting K, chunks in flight a warp, CTAs an SM) of each kernel
SWEEP4 = [(8, 2, 2), (8, 1, 2), (8, 3, 2), (8, 1, 3), (4, 2, 4), (4, 1, 6), (16, 1, 1)]
SWEEP8 = [(8, 2, 2), (8, 1, 2), (8, 3, 2), (8, 1, 3), (8, 2, 3), (8, 3, 3), (8, 2, 4),
          (16, 2, 2), (16, 2, 1), (4, 2, 6)]


# (warps a CTA, x tiles of 8 rows a CTA, x stages, weight chunks in flight a warp, CTAs an SM)
# of the INT4 small-M GEMM
SWEEP4G = [(8, 4, 3, 2, 2), (4, 4, 3, 2, 4), (4, 8, 3, 2, 3), (16, 4, 3, 1, 1), (8, 2, 3, 2, 2),
           (8, 4, 4, 2, 2), (8, 4, 3, 1, 2)]
SWEEP4G_AIM = (8, 16, 32, 64)   # warps an SM the K splits aim for (launch_rules.W4G_AIM)
# (x rows a CTA, x stages, weight chunks in flight a warp, CTAs an SM) of its wgmma kernel
SWEEP4GW = [(64, 4, 2, 1), (64, 4, 2, 2), (64, 3, 1, 2), (128, 3, 2, 1), (128, 2, 2, 1),
            (128, 4, 2, 1), (128, 3, 1, 1)]
SWEEP_DQ = (1, 2, 8)          # words a dequant_int4 thread (launch_rules.DQ_WORDS)


def sweep_functions(arch: str) -> Functions:
    entries = "".join(
        [f"W4_ENTRY(w4_sweep_nt{nt}_sk{sk}_d{d}_mb{mb}, BF16, {nt}, {sk}, {d}, 0, true, false, "
         f"{mb})\n"
         for nt in (1, 2) for sk, d, mb in SWEEP4]
        + [f"W8_ENTRY(w8_sweep_nt{nt}_sk{sk}_d{d}_mb{mb}, BF16, {nt}, {sk}, {d}, 0, false, "
           f"{mb})\n" for nt in (1, 2) for sk, d, mb in SWEEP8]
        + [f"W4G_ENTRY(w4g_sweep_{'_'.join(map(str, v))}, BF16, {', '.join(map(str, v))}, 0, "
           "false, false)\n" for v in SWEEP4G]
        + [f"W4G_ENTRY(w4gw_sweep_{mt}_{st}_{d}_{mb}, BF16, 8, {mt // 8}, {st}, {d}, {mb}, 0, "
           "false, true)\n" for mt, st, d, mb in (SWEEP4GW if arch == "sm_90a" else ())]
        + [f'extern "C" __global__ void dq_sweep_u{u}(const u8* w, const u16* s, const u16* p, '
           f"int n, int k, int g, u16* out) {{ dequant_int4<BF16, {u}>(w, s, p, n, k, g, out); "
           "}\n" for u in SWEEP_DQ])
    src = "#define QGEMV_VARIANTS\n" + compiler.source("qgemv") + entries
    return Functions(arch, {"qgemv_sweep": compiler._compile_cached("qgemv_sweep", arch,
                                                                     False, src)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="also write the markdown table to this file")
    ap.add_argument("--sweep", nargs="?", const="all", choices=("all", "dequant", "fp8", "w4gw"),
                    help="time the kernels' variants too (dequant, fp8, w4gw: that kernel's "
                    "only)")
    ap.add_argument("--fp8-block", action="store_true",
                    help="also time the block-wise FP8 kernels (w8b, dequant_fp8b)")
    ap.add_argument("--prefill-only", action="store_true",
                    help="only the 24-256-row GEMMs and the dequantized weight")
    ap.add_argument("--decode-only", action="store_true",
                    help="skip the 24-2048-row GEMMs")
    ap.add_argument("--gguf", action="store_true",
                    help="also INT4 in blocks of 32 as --quant int4-gguf keeps a GGUF file's: "
                    "Q4_0 (symmetric) and Q4_1 (an offset a block, the w4off kernels)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    torch.manual_seed(0)
    K = Kernels()
    f = K.functions
    sweep = sweep_functions(K.arch) if args.sweep else None
    fp8 = torch.cuda.get_device_capability() >= (8, 9)
    wgmma = K.arch == "sm_90a"   # the small-M GEMM's wgmma kernel too
    stream = lambda: torch.cuda.current_stream().cuda_stream  # noqa: E731  the capture's
    bf = torch.bfloat16

    rows, sweep_rows, gemm_rows, dq_rows, gguf_rows, fp8b_rows = [], [], [], [], [], []
    for name, k, n, act in SHAPES:
        n_out = n // 2 if act else n
        w16_bytes = n * k * 2
        copies = max(2, math.ceil(ROTATE_BYTES / (w16_bytes // 4)))
        calls = copies * math.ceil(CALLS / copies)
        w16 = [torch.randn(n, k, device="cuda", dtype=bf) * k ** -0.5
               for _ in range(max(2, math.ceil(ROTATE_BYTES / w16_bytes)))]
        w4 = [torch.randint(0, 256, (n, k // 2), device="cuda", dtype=torch.uint8)
              for _ in range(copies)]
        s4 = torch.rand(n, k // GROUP, device="cuda").to(bf) * 0.01
        z4 = torch.randint(0, 16, (n, k // GROUP), device="cuda", dtype=torch.uint8)
        pre = (torch.rand(k, device="cuda") + 0.5).to(bf)
        w8 = [torch.randint(0, 256, (n, k), device="cuda", dtype=torch.uint8) & 0x77
              for _ in range(copies // 2 + 1)]   # finite E4M3 codes
        s8 = torch.rand(n, device="cuda") * 1e-3
        s8b = (torch.rand(n, k // GROUP, device="cuda") * 1e-3).to(bf)   # block-wise FP8's
        s32 = torch.rand(n, k // 32, device="cuda").to(bf) * 0.01   # GGUF's blocks of 32
        o32 = (torch.rand(n, k // 32, device="cuda") * 0.1 - 0.05).to(bf)

        def bf16_call(w, x, y, gu, m):   # the unquantized step: GEMV, or cuBLASLt [+ gate]
            if m <= lr.GEMV_MS[-1]:
                ln = lr.gemv_launch(m, n_out, k, "bfloat16", None, act, K.sm_count)
                a = [DevPtr(x.data_ptr()), DevPtr(w.data_ptr()), DevPtr(0), m, n_out, k,
                     DevPtr(y.data_ptr())]
                return lambda: f.launch(ln, a, stream())
            if act:
                gl = lr.gated_launch(m, n_out, "bfloat16", act, K.sm_count)

                def fn():
                    torch.matmul(x, w.t(), out=gu)
                    K.launch(gl, [gu, m, n_out, y])
                return fn
            return lambda: torch.matmul(x, w.t(), out=y)

        for m in () if args.prefill_only else MS:
            x = torch.randn(m, k, device="cuda", dtype=bf)
            y = torch.empty(m, n_out, device="cuda", dtype=bf)
            gu = torch.empty(m, n, device="cuda", dtype=bf)
            out_bytes = m * n_out * 2 + m * k * 2

            def int4(w, x=x, y=y, m=m, ln=None, fn=f, awq=True, zp=False, rows=n_out):
                ln = ln or lr.qgemv_launch(m, n_out, k, "bfloat16", "int4", None, act, GROUP,
                                           K.sm_count, offsets="zero_points" if zp else "none")
                a = [DevPtr(x.data_ptr()), DevPtr(w.data_ptr()), DevPtr(s4.data_ptr()),
                     DevPtr(pre.data_ptr() if awq else 0), DevPtr(0), m, rows, k,
                     lr.int4_group_shift(GROUP), DevPtr(y.data_ptr()),
                     *([DevPtr(z4.data_ptr())] if zp else [])]
                return lambda: fn.launch(ln, a, stream())

            def e4m3(w, x=x, y=y, m=m, ln=None, fn=f, rows=n_out):
                ln = ln or lr.qgemv_launch(m, n_out, k, "bfloat16", "fp8", None, act,
                                           sm_count=K.sm_count)
                a = [DevPtr(x.data_ptr()), DevPtr(w.data_ptr()), DevPtr(s8.data_ptr()),
                     lr.float_bits(0.05), DevPtr(0), m, rows, k, DevPtr(y.data_ptr()),
                     DevPtr(0)]   # no first-token rows
                return lambda: fn.launch(ln, a, stream())

            def q4(w, offsets, x=x, y=y, m=m):   # a GGUF Q4_0 / Q4_1 matrix
                ln = lr.qgemv_launch(m, n_out, k, "bfloat16", "int4", None, act, 32,
                                     K.sm_count, offsets="offsets" if offsets else "none")
                a = [DevPtr(x.data_ptr()), DevPtr(w.data_ptr()), DevPtr(s32.data_ptr()),
                     DevPtr(0), DevPtr(0), m, n_out, k, lr.int4_group_shift(32),
                     DevPtr(y.data_ptr()), *([DevPtr(o32.data_ptr())] if offsets else [])]
                return lambda: f.launch(ln, a, stream())

            def e4m3b(w, x=x, y=y, m=m):   # block-wise FP8, x 16-bit
                ln = lr.qgemv_launch(m, n_out, k, "bfloat16", "fp8-block", None, act, GROUP,
                                     K.sm_count)
                a = [DevPtr(x.data_ptr()), DevPtr(w.data_ptr()), DevPtr(s8b.data_ptr()),
                     DevPtr(0), m, n_out, k, lr.fp8b_group_shift(GROUP), DevPtr(y.data_ptr())]
                return lambda: f.launch(ln, a, stream())

            t16 = graph_time([bf16_call(w16[i % len(w16)], x, y, gu, m) for i in range(calls)])
            if args.fp8_block:
                t8b = graph_time([e4m3b(w8[i % len(w8)]) for i in range(calls)])
                fp8b_rows.append((name, f"{k}->{n}", m, t16, t8b,
                                  (n * k + s8b.numel() * 2 + out_bytes) / t8b))
            if args.gguf:
                t40, t41 = (graph_time([q4(w4[i % len(w4)], o) for i in range(calls)])
                            for o in (False, True))
                b40 = n * k // 2 + s32.numel() * 2 + out_bytes
                gguf_rows.append((name, f"{k}->{n}", m, t16, t40, b40 / t40, t41,
                                  (b40 + o32.numel() * 2) / t41))
            t4 = graph_time([int4(w4[i % len(w4)]) for i in range(calls)])
            t4r = graph_time([int4(w4[i % len(w4)], awq=False) for i in range(calls)])
            b4 = n * k // 2 + s4.numel() * 2 + k * 2 + out_bytes
            t4z = graph_time([int4(w4[i % len(w4)], awq=False, zp=True) for i in range(calls)])
            b4z = b4 - k * 2 + z4.numel()
            t8 = graph_time([e4m3(w8[i % len(w8)]) for i in range(calls)]) if fp8 else None
            b8 = n * k + n * 4 + out_bytes
            rows.append((name, f"{k}->{n}", m, t16, (w16_bytes + out_bytes) / t16, t4, b4 / t4,
                         t4r, (b4 - k * 2) / t4r, t4z, b4z / t4z, t8,
                         b8 / t8 if t8 else None))
            if args.sweep in ("all", "fp8") and m in (1, 8, 16):
                # the variants have no fused gate: gate-up runs as a GEMM of its 2 x 14336
                # rows, the same 16-row tiles as its gated kernel's 8-output ones
                nt = 1 if m <= 8 else 2
                grid = (math.ceil(n / 16), 1, 1)
                yn = torch.empty(m, n, device="cuda", dtype=bf)
                for sk, d, mb in SWEEP4 if args.sweep == "all" else ():
                    l4 = lr.Launch("qgemv_sweep", f"w4_sweep_nt{nt}_sk{sk}_d{d}_mb{mb}",
                                   grid, (32 * sk, 1, 1), pdl=True)
                    s = graph_time([int4(w4[i % len(w4)], y=yn, ln=l4, fn=sweep, rows=n)
                                    for i in range(calls)])
                    sweep_rows.append((name, m, "int4", sk, f"D={d}, {mb} CTAs an SM",
                                       b4 / s / DATASHEET_BW))
                for sk, d, mb in SWEEP8 if fp8 else ():
                    l8 = lr.Launch("qgemv_sweep", f"w8_sweep_nt{nt}_sk{sk}_d{d}_mb{mb}", grid,
                                   (32 * sk, 1, 1), pdl=True)
                    s = graph_time([e4m3(w8[i % len(w8)], y=yn, ln=l8, fn=sweep, rows=n)
                                    for i in range(calls)])
                    sweep_rows.append((name, m, "fp8", sk, f"D={d}, {mb} CTAs an SM",
                                       b8 / s / DATASHEET_BW))
        ws = torch.empty(n, k, device="cuda", dtype=bf)   # the dequantized weight (prefill)
        bdq = n * k // 2 + s4.numel() * 2 + n * k * 2

        def dq(w, ln=None, fn=f, ws=ws):   # the weight alone, dequantized
            ln = ln or lr.dequant_int4_launch(n, k, "bfloat16")
            a = [DevPtr(w.data_ptr()), DevPtr(s4.data_ptr()), DevPtr(0), n, k,
                 lr.int4_group_shift(GROUP), DevPtr(ws.data_ptr())]
            return lambda: fn.launch(ln, a, stream())

        dq_rows.append((name, f"{k}->{n}", lr.DQ_WORDS,
                        graph_time([dq(w4[i % len(w4)]) for i in range(calls)]), bdq))
        if args.fp8_block:   # block-wise FP8's prefill dequantization (E4M3 bytes in)
            lb = lr.dequant_fp8b_launch(n, k, "bfloat16")
            dq_rows.append((name, f"{k}->{n}", "fp8-block", graph_time([
                (lambda a: lambda: f.launch(lb, a, stream()))(
                    [DevPtr(w8[i % len(w8)].data_ptr()), DevPtr(s8b.data_ptr()), n, k,
                     lr.fp8b_group_shift(GROUP), DevPtr(ws.data_ptr())])
                for i in range(calls)]), n * k + s8b.numel() * 2 + n * k * 2))
        for u in SWEEP_DQ if sweep else ():
            ln = lr.Launch("qgemv_sweep", f"dq_sweep_u{u}",
                           (math.ceil(n * k // 8 / (256 * u)), 1, 1), (256, 1, 1))
            dq_rows.append((name, f"{k}->{n}", u,
                            graph_time([dq(w4[i % len(w4)], ln, sweep) for i in range(calls)]),
                            bdq))
        arrived = torch.zeros(1 << 16, device="cuda", dtype=torch.int32)
        for m in () if args.decode_only else GEMM_MS:
            # split-K partials: the most any launch of this m takes
            part = torch.empty(lr.W4G_MAX_SPLITS * m * n, device="cuda")
            x = torch.randn(m, k, device="cuda", dtype=bf)
            y = torch.empty(m, n_out, device="cuda", dtype=bf)
            gu = torch.empty(m, n, device="cuda", dtype=bf)
            io = m * n_out * 2 + m * k * 2

            def deq(w, x=x, y=y, gu=gu, m=m, ws=ws):   # what steps past W4_GEMM_MAX_M run
                dl = lr.dequant_int4_launch(n, k, "bfloat16")
                gemm = bf16_call(ws, x, y, gu, m)
                a = [DevPtr(w.data_ptr()), DevPtr(s4.data_ptr()), DevPtr(0), n, k,
                     lr.int4_group_shift(GROUP), DevPtr(ws.data_ptr())]

                def fn():
                    f.launch(dl, a, stream())
                    gemm()
                return fn

            def w4g(w, x=x, y=y, m=m, ln=None, fn=f, part=part, sm90=False):
                ln = ln or lr.w4_gemm_launch(m, n_out, k, "bfloat16", None, act, GROUP,
                                             sm_count=K.sm_count, sm90=sm90)
                a = [DevPtr(x.data_ptr()), DevPtr(w.data_ptr()), DevPtr(s4.data_ptr()),
                     DevPtr(0), DevPtr(0), m, n_out, k, lr.int4_group_shift(GROUP),
                     DevPtr(y.data_ptr()), DevPtr(part.data_ptr()),
                     DevPtr(arrived.data_ptr())]
                return lambda: fn.launch(ln, a, stream())

            t16 = graph_time([bf16_call(w16[i % len(w16)], x, y, gu, m) for i in range(calls)])
            td = graph_time([deq(w4[i % len(w4)]) for i in range(calls)])
            tg = graph_time([w4g(w4[i % len(w4)]) for i in range(calls)])
            tw = graph_time([w4g(w4[i % len(w4)], sm90=True) for i in range(calls)]) \
                if wgmma and m >= lr.W4GW_MIN_M else None
            b4 = n * k // 2 + s4.numel() * 2 + io
            gemm_rows.append((name, f"{k}->{n}", m, t16, (w16_bytes + io) / t16, td, tg,
                              b4 / tg, 2 * m * n * k / tg, tw))

            def agrees(call, ref, y=y) -> bool:
                """A variant's y against the shipped kernel's: a launch that is fast and wrong
                (a race, a hazard) is marked, not ranked."""
                y.fill_(float("nan"))
                call()
                torch.cuda.synchronize()
                return torch.allclose(y.float(), ref, rtol=2e-2,
                                      atol=2e-2 * ref.abs().max().item())

            if args.sweep in ("all", "w4gw") and not act:
                w4g(w4[0])()
                ref = y.float()
            if args.sweep in ("all", "w4gw") and wgmma and m >= lr.W4GW_MIN_M and not act:
                mt = lr.w4gw_rows(m)
                for xr, st, d, mb in SWEEP4GW:
                    for aim in SWEEP4G_AIM if xr == mt else ():
                        grid = (math.ceil(m / xr), math.ceil(n / 16 / 8))
                        sp = lr.w4g_splits(grid[0] * grid[1] * 8, k, K.sm_count, aim)
                        lg = lr.Launch("qgemv_sweep", f"w4gw_sweep_{xr}_{st}_{d}_{mb}",
                                       (*grid, sp), (256, 1, 1),
                                       smem=lr.w4gw_smem(xr, st), pdl=True)
                        ok = agrees(w4g(w4[0], ln=lg, fn=sweep), ref)
                        t = graph_time([w4g(w4[i % len(w4)], ln=lg, fn=sweep)
                                        for i in range(calls)])
                        sweep_rows.append((name, m, "int4 GEMM, wgmma", 8,
                                           f"{xr} x rows a CTA, {st} stages, D={d}, "
                                           f"{mb} CTAs an SM, {sp} splits (aim {aim})",
                                           b4 / t / DATASHEET_BW if ok else None))
            if args.sweep == "all" and not act:
                for v in SWEEP4G:
                    for aim in SWEEP4G_AIM:
                        nw, nt, st, d, mb = v
                        grid = (math.ceil(m / (8 * nt)), math.ceil(n / 16 / nw))
                        sp = lr.w4g_splits(grid[0] * grid[1] * nw, k, K.sm_count, aim)
                        lg = lr.Launch("qgemv_sweep", f"w4g_sweep_{'_'.join(map(str, v))}",
                                       (*grid, sp), (32 * nw, 1, 1),
                                       smem=lr.w4g_smem(nt, st), pdl=True)
                        ok = agrees(w4g(w4[0], ln=lg, fn=sweep), ref)
                        t = graph_time([w4g(w4[i % len(w4)], ln=lg, fn=sweep)
                                        for i in range(calls)])
                        sweep_rows.append((name, m, "int4 GEMM", nw,
                                           f"{nt * 8} x rows a CTA, {st} stages, D={d}, "
                                           f"{mb} CTAs an SM, {sp} splits (aim {aim})",
                                           b4 / t / DATASHEET_BW if ok else None))
        del w16, w4, w8, ws
        torch.cuda.empty_cache()

    lines = [
        "## llmc quantized decode GEMMs (plugins/kernels/qgemv.cu): Llama-3.1-8B shapes",
        "",
        f"{torch.cuda.get_device_name()}; torch {torch.__version__} (CUDA {torch.version.cuda})"
        f", NVRTC {'.'.join(map(str, compiler.nvrtc_version()))}",
        "",
        f"CUDA graph of >= {CALLS} calls, median of {REPS} replays, weights rotated over "
        f">= {ROTATE_BYTES >> 20} MiB; % peak = bytes moved / time against "
        f"{DATASHEET_BW / 1e12:.2f} TB/s. bf16: llmc's GEMV (M <= 8) or cuBLASLt; int4: group "
        f"{GROUP}: AWQ (x times 1 / s in the kernel), RTN (no 1 / s) and ZP (zero points, no "
        "1 / s); speedup = bf16 time / quantized time.",
        "",
        "| GEMM | K->N | M | bf16 us | bf16 % peak | int4 AWQ us | % peak | speedup "
        "| int4 RTN us | % peak | speedup | int4 ZP us | % peak | fp8 us | fp8 % peak "
        "| fp8 speedup |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, kn, m, t16, bw16, t4, bw4, t4r, bw4r, t4z, bw4z, t8, bw8 in rows:
        f8 = (f"{t8 * 1e6:.1f} | {bw8 / DATASHEET_BW:.0%} | {t16 / t8:.2f}x" if t8
              else "- | - | -")
        lines.append(f"| {name} | {kn} | {m} | {t16 * 1e6:.1f} | {bw16 / DATASHEET_BW:.0%} "
                     f"| {t4 * 1e6:.1f} | {bw4 / DATASHEET_BW:.0%} | {t16 / t4:.2f}x "
                     f"| {t4r * 1e6:.1f} | {bw4r / DATASHEET_BW:.0%} | {t16 / t4r:.2f}x "
                     f"| {t4z * 1e6:.1f} | {bw4z / DATASHEET_BW:.0%} | {f8} |")
    if fp8b_rows:
        lines += ["", f"Block-wise FP8 (--quant fp8-block: w8b, a scale a row and block of "
                  f"{GROUP} k, x 16-bit); % peak on its bytes (E4M3 weights, scales, x, y).",
                  "", "| GEMM | K->N | M | bf16 us | fp8-block us | % peak | vs bf16 |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {nm} | {kn} | {m} | {t16 * 1e6:.1f} | {t * 1e6:.1f} | "
                  f"{b / DATASHEET_BW:.0%} | {t16 / t:.2f}x |"
                  for nm, kn, m, t16, t, b in fp8b_rows]
    if gguf_rows:
        lines += ["", "INT4 in blocks of 32 as a GGUF file's (--quant int4-gguf): Q4_0 = the "
                  "symmetric kernel (no chunk scales at 32), Q4_1 = the w4off kernel (an offset "
                  "a row and block); % peak on each one's bytes (codes, scales, offsets, x, y).",
                  "", "| GEMM | K->N | M | bf16 us | Q4_0 us | % peak | vs bf16 | Q4_1 us "
                  "| % peak | vs bf16 |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {nm} | {kn} | {m} | {t16 * 1e6:.1f} | {t0 * 1e6:.1f} | "
                  f"{b0 / DATASHEET_BW:.0%} | {t16 / t0:.2f}x | {t1 * 1e6:.1f} | "
                  f"{b1 / DATASHEET_BW:.0%} | {t16 / t1:.2f}x |"
                  for nm, kn, m, t16, t0, b0, t1, b1 in gguf_rows]
    lines += [
        "", f"INT4, {GEMM_MS[0]}-{GEMM_MS[-1]} rows (RTN, group {GROUP}): bf16 = cuBLASLt; "
        "dequant = the weight dequantized (dequant_int4) then cuBLASLt, what the backend ran "
        "past 16 rows before the small-M GEMM; GEMM = the small-M GEMM (w4_gemm, mma.sync); "
        "wgmma = its sm_90a kernel (w4gw); % peak on its bytes (packed weights, scales, x, y).",
        "", "| GEMM | K->N | M | bf16 us | bf16 % peak | dequant us | GEMM us | % peak "
        "| TFLOP/s | vs bf16 | vs dequant | wgmma us | % peak | TFLOP/s | vs bf16 "
        "| vs dequant | vs GEMM |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, kn, m, t16, bw16, td, tg, bwg, fl, tw in gemm_rows:
        wg = (f"{tw * 1e6:.1f} | {bwg * tg / tw / DATASHEET_BW:.0%} | {fl * tg / tw / 1e12:.0f} "
              f"| {t16 / tw:.2f}x | {td / tw:.2f}x | {tg / tw:.2f}x" if tw
              else "- | - | - | - | - | -")
        lines.append(f"| {name} | {kn} | {m} | {t16 * 1e6:.1f} | {bw16 / DATASHEET_BW:.0%} "
                     f"| {td * 1e6:.1f} | {tg * 1e6:.1f} | {bwg / DATASHEET_BW:.0%} "
                     f"| {fl / 1e12:.0f} | {t16 / tg:.2f}x | {td / tg:.2f}x | {wg} |")
    lines += ["", f"INT4 dequantized alone (dequant_int4, group {GROUP}, bf16 out): bytes = "
              "packed weight + scales read, 16-bit weight written; words = 8-k words a thread "
              f"(the kernel's default: {lr.DQ_WORDS}; fp8-block: dequant_fp8b, E4M3 bytes "
              "read).", "",
              "| GEMM | K->N | words | us | GB/s | % peak |", "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {nm} | {kn} | {u} | {t * 1e6:.1f} | {b / t / 1e9:.0f} | "
              f"{b / t / DATASHEET_BW:.0%} |" for nm, kn, u, t, b in dq_rows]
    if sweep_rows:
        lines += ["", "Sweep, % of peak by warps splitting K (SK; for the int4 GEMM, warps a "
                  "CTA), chunks in flight a warp (D) and CTAs an SM (the register cap):", "",
                  "| GEMM | M | kernel | SK | depth | % peak |", "|---|---:|---|---:|---|---:|"]
        lines += [f"| {nm} | {m} | {q} | {sk} | {u} | {'wrong' if p is None else f'{p:.0%}'} |"
                  for nm, m, q, sk, u, p in sweep_rows]
    lines += ["", f"Total benchmark time {time.perf_counter() - t0:.1f} s."]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
