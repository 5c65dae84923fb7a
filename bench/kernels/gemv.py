"""Benchmark llmc's skinny GEMM for decode (plugins/kernels/gemv.cu) against cuBLASLt on the
decode shapes of Llama-3.1-8B, bf16, and against the HBM datasheet bandwidth.

    PYTHONPATH=<llmc checkout paths> python3 bench/kernels/gemv.py [--out results.md] [--sweep]

Both sides compute y[M, N] = x[M, K] @ w[N, K]^T with the weight stored [N, K] (the layout
the cuda backend gives its weights): cuBLASLt through torch.matmul(x, w.t()), which is the
"TN" product torch's own Linear runs. The gate-up GEMM is also timed with the SwiGLU fused
into the GEMV (it then writes [M, 14336] instead of [M, 28672]), against cuBLASLt followed
by llmc's SwiGLU kernel, which is what the backend runs without the fusion.

Timing as bench/kernels/gemm.py: a CUDA graph of >= CALLS calls cycling through >= 256 MiB of
weight copies (each call reads its weight from HBM, not from the 50 MB L2), median of REPS
replays. Bandwidth = (W + X + Y bytes) / time against 3.35 TB/s.

--sweep also times every (rows a warp R, unroll U) pair of the CUDA-core GEMV for M = 1, 2, 4
and 8, and every (warps splitting K, chunks ahead, CTAs an SM) configuration of the
tensor-core kernel for M = 4 and 8, compiled from the same source and launched the same way
(PDL on sm_90+): the figures that chose GEMV_R<M> / GEMV_U<M> and the tensor-core
configurations in gemv.cu.
"""
from __future__ import annotations

import argparse
import math
import time

import torch
from gemm import CALLS, DATASHEET_BW, REPS, ROTATE_BYTES, graph_time  # noqa: F401

from llmc.plugins import compiler
from llmc.plugins import launch_rules as lr
from llmc.plugins.launch import DevPtr, Kernels

SHAPES = (  # name, K, N (weight rows), out dtype, fused activation
    ("qkv", 4096, 6144, "bfloat16", None),
    ("o", 4096, 4096, "bfloat16", None),
    ("gate_up", 4096, 2 * 14336, "bfloat16", None),
    ("gate_up+swiglu", 4096, 2 * 14336, "bfloat16", "swiglu"),
    ("down", 14336, 4096, "bfloat16", None),
    ("lm_head", 4096, 128256, "float32", None),
)
MS = (1, 2, 4, 8, 16)   # decode batch sizes; the backend runs the GEMV up to 16 rows
SWEEP = {1: [(1, 4), (1, 8), (2, 4), (2, 8)], 2: [(1, 8), (2, 4), (2, 8), (4, 4)],
         4: [(1, 8), (2, 4), (4, 2), (4, 4)], 8: [(2, 4), (4, 2), (4, 4)]}
# tensor-core kernel (tc_gemv): M -> (warps splitting K, chunks loaded ahead, CTAs an SM the
# registers must leave room for: __launch_bounds__'s minimum, 0 for none)
TC_CONFIGS = [(4, 4, 0), (4, 1, 8), (4, 2, 8), (8, 1, 0), (8, 2, 0), (8, 4, 0), (8, 1, 4),
              (8, 1, 6), (8, 2, 3), (8, 2, 4), (16, 1, 0), (16, 2, 0), (16, 1, 3), (16, 1, 4),
              (32, 1, 0), (32, 1, 2)]
TC_SWEEP = {4: TC_CONFIGS, 8: TC_CONFIGS}
TORCH = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def tc_name(m: int, sk: int, u: int, b: int) -> str:
    return f"tc_sweep_m{m}_sk{sk}_u{u}_b{b}"


def sweep_functions(K: Kernels):
    """Every (M, R, U) of SWEEP compiled as kernels gemv_sweep_m<M>_r<R>_u<U> (bf16 out)."""
    entries = "".join(f"GEMV_ENTRY(gemv_sweep_m{m}_r{r}_u{u}, BF16, {m}, {r}, {u}, 0, false)\n"
                      for m, pairs in SWEEP.items() for r, u in pairs)
    entries += "".join(
        f"TC_ENTRY({tc_name(m, sk, u, b)}, BF16, {-(-m // 8)}, {sk}, {u}, {b}, 0, false)\n"
        for m, configs in TC_SWEEP.items() for sk, u, b in configs)
    src = "#define GEMV_VARIANTS\n" + compiler.source("gemv") + entries
    cubin = compiler._compile_cached("gemv_sweep", K.arch, False, src)
    from llmc.plugins.launch import Functions

    return Functions(K.arch, {"gemv_sweep": cubin})


def resources(functions, launch) -> tuple[int, int]:
    """(registers a thread, local memory bytes a thread) of a compiled kernel."""
    from cuda.bindings import driver

    fa, f = driver.CUfunction_attribute, functions.func(launch)
    return tuple(driver.cuFuncGetAttribute(a, f)[1]
                 for a in (fa.CU_FUNC_ATTRIBUTE_NUM_REGS, fa.CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="also write the markdown table to this file")
    ap.add_argument("--sweep", action="store_true", help="time every (R, U) variant too")
    args = ap.parse_args()
    t0 = time.perf_counter()
    torch.manual_seed(0)
    K = Kernels()
    sweep = sweep_functions(K) if args.sweep else None
    stream = lambda: torch.cuda.current_stream().cuda_stream  # noqa: E731  the capture's

    rows, sweep_rows = [], []
    for name, k, n, out_name, act in SHAPES:
        w_bytes = n * k * 2
        copies = max(2, math.ceil(ROTATE_BYTES / w_bytes))
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k ** -0.5
                   for _ in range(copies)]
        calls = copies * math.ceil(CALLS / copies)
        n_out = n // 2 if act else n
        od = TORCH[out_name]
        for m in sorted(set(MS) | set(SWEEP if sweep else ())):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            y = torch.full((m, n_out), float("nan"), device="cuda", dtype=od)
            gu = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            yt = torch.empty(m, n_out, device="cuda", dtype=od)
            shipped = m <= lr.GEMV_MS[-1]
            ln = (lr.gemv_launch(m, n_out, k, "bfloat16", out_name, act, K.sm_count) if shipped
                  else None)

            def ours(w, launch=None, ln=ln, f=K.functions, x=x, y=y, m=m):
                args = [DevPtr(x.data_ptr()), DevPtr(w.data_ptr()), DevPtr(0), m, n_out, k,
                        DevPtr(y.data_ptr())]
                return lambda: f.launch(launch or ln, args, stream())

            def theirs(w, x=x, yt=yt, gu=gu):
                if act:
                    gl = lr.gated_launch(x.shape[0], n_out, "bfloat16", act, K.sm_count)

                    def fn():
                        torch.matmul(x, w.t(), out=gu)
                        K.launch(gl, [gu, x.shape[0], n_out, yt])
                    return fn
                if od == torch.float32:
                    return lambda: torch.mm(x, w.t(), out_dtype=torch.float32, out=yt)
                return lambda: torch.matmul(x, w.t(), out=yt)

            blas_s = graph_time([theirs(weights[i % copies]) for i in range(calls)])
            theirs(weights[0])()
            moved = w_bytes + m * k * 2 + m * n_out * y.element_size()
            if shipped:
                ours_s = graph_time([ours(weights[i % copies]) for i in range(calls)])
                ours(weights[0])()
                torch.cuda.synchronize()
                ref = yt.double()
                diff = ((y.double() - ref).abs().max() / ref.abs().max()).item()
                # the plain tensor-core kernel where the SM count picked a variant
                plain = lr.gemv_launch(m, n_out, k, "bfloat16", out_name, act)
                plain_s = graph_time([ours(weights[i % copies], plain) for i in range(calls)]
                                     ) if plain.kernel != ln.kernel else None
                rows.append((name, f"{k}->{n}", m, w_bytes, ln.kernel, ours_s, moved / ours_s,
                             plain_s and moved / plain_s, blas_s, moved / blas_s, diff))
            else:
                rows.append((name, f"{k}->{n}", m, w_bytes, "-", None, None, None, blas_s,
                             moved / blas_s, None))
            if sweep and not act and out_name == "bfloat16":
                variants = [(f"R={r}", u, lr.Launch(
                    "gemv_sweep", f"gemv_sweep_m{m}_r{r}_u{u}",
                    (math.ceil(math.ceil(n / r) / lr.GEMV_WARPS), 1, 1),
                    (32 * lr.GEMV_WARPS, 1, 1), pdl=True)) for r, u in SWEEP.get(m, [])]
                variants += [(f"TC SK={sk}, {b or '-'}/SM", u, lr.Launch(
                    "gemv_sweep", tc_name(m, sk, u, b), (math.ceil(n / 16), 1, 1),
                    (32 * sk, 1, 1), pdl=True)) for sk, u, b in TC_SWEEP.get(m, [])]
                for label, u, sl in variants:
                    def variant(w, sl=sl, x=x, y=y, m=m):
                        a = [DevPtr(x.data_ptr()), DevPtr(w.data_ptr()), DevPtr(0), m, n, k,
                             DevPtr(y.data_ptr())]
                        return lambda: sweep.launch(sl, a, stream())
                    s = graph_time([variant(weights[i % copies]) for i in range(calls)])
                    sweep_rows.append((name, m, label, u, moved / s / DATASHEET_BW,
                                       *resources(sweep, sl)))
        weights.clear()
        torch.cuda.empty_cache()

    lines = [
        "## llmc GEMV (plugins/kernels/gemv.cu) vs cuBLASLt: Llama-3.1-8B decode shapes, bf16",
        "",
        f"{torch.cuda.get_device_name()}; torch {torch.__version__} (CUDA {torch.version.cuda})"
        f", NVRTC {'.'.join(map(str, compiler.nvrtc_version()))}",
        "",
        f"y = x @ w^T, w stored [N, K]; CUDA graph of >= {CALLS} calls, median of {REPS} "
        f"replays, weights rotated over >= {ROTATE_BYTES >> 20} MiB; bandwidth = (W + X + Y "
        f"bytes) / time, % of {DATASHEET_BW / 1e12:.2f} TB/s. gate_up+swiglu: the GEMV with "
        "SwiGLU fused vs cuBLASLt then llmc's SwiGLU kernel.",
        "",
        "| GEMM | K->N | M | W MB | llmc kernel | llmc us | llmc % peak | plain kernel % peak "
        "| cuBLASLt us | cuBLASLt % peak | cuBLASLt / llmc time | max rel diff |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, kn, m, w_bytes, kernel, ours_s, ours_bw, plain_bw, blas_s, blas_bw, diff in rows:
        ours = (f"{ours_s * 1e6:.1f} | {ours_bw / DATASHEET_BW:.0%}" if ours_s
                else "- | (cuBLASLt runs it)")
        plain = f"{plain_bw / DATASHEET_BW:.0%}" if plain_bw else "-"
        ratio = f"{blas_s / ours_s:.2f} | {diff:.1e}" if ours_s else "- | -"
        lines.append(f"| {name} | {kn} | {m} | {w_bytes / 1e6:.1f} | {kernel} | {ours} | {plain} "
                     f"| {blas_s * 1e6:.1f} | {blas_bw / DATASHEET_BW:.0%} | {ratio} |")
    if sweep_rows:
        lines += ["", "Sweep, % of peak by (rows a warp R, unroll U) for the CUDA-core GEMV "
                  "and (warps splitting K SK, CTAs an SM the registers leave room for, chunks "
                  "ahead U) for the tensor-core one; registers a thread and spilled bytes as "
                  "the driver reports them:", "",
                  "| GEMM | M | variant | U | % peak | registers | local bytes |",
                  "|---|---:|---|---:|---:|---:|---:|"]
        lines += [f"| {nm} | {m} | {r} | {u} | {p:.0%} | {rg} | {lb} |"
                  for nm, m, r, u, p, rg, lb in sweep_rows]
    lines += ["", f"Total benchmark time {time.perf_counter() - t0:.1f} s."]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
