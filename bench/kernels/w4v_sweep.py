"""The INT4 GEMV at one row of x on CUDA cores (w4v_gemv, kernels/qgemv.cuh) against the
tensor-core kernel the backend runs there (w4_gemv), Llama-3.1-8B's decode shapes.

    cd bench/kernels && python3 w4v_sweep.py [--dtype fp16|bf16]

Each w4v configuration (R weight rows a CTA, U steps of 1024 k a warp in flight, warps a CTA splitting K) is
compiled from the kernel's own source and timed as qgemv.py times the shipped kernels (CUDA
graph, weights rotated over >= 256 MiB); % of 3.35 TB/s on the kernel's bytes (codes, scales,
x, y). Each output is checked against the shipped kernel's (max |diff| / max |y|).
"""
from __future__ import annotations

import argparse
import math

import torch
from gemm import CALLS, DATASHEET_BW, ROTATE_BYTES, graph_time

from llmc.plugins import compiler
from llmc.plugins import launch_rules as lr
from llmc.plugins.launch import DevPtr, Functions, Kernels

SHAPES = (("qkv", 4096, 6144, None), ("o", 4096, 4096, None),
          ("gate_up+swiglu", 4096, 28672, "swiglu"), ("down", 14336, 4096, None))
CONFIGS = ((2, 1, 4), (4, 1, 4), (8, 1, 4), (2, 2, 4), (4, 2, 4), (2, 1, 8), (4, 1, 8),
           (8, 1, 8), (16, 1, 4), (4, 1, 2), (8, 1, 2))   # (R, U, warps a CTA splitting K)
GROUP = 128


def functions(arch: str, dt: str) -> Functions:
    ty = {"fp16": "F16", "bf16": "BF16"}[dt]
    entries = ""
    for r, u, wp in CONFIGS:
        for act in (0, 1):
            if act and r % 2:
                continue
            entries += (f'extern "C" __global__ void __launch_bounds__({32 * wp}) '
                        f"w4v_{r}_{u}_{wp}_{act}(const u16* x, const u8* w, const u16* scale, "
                        "const u16* pre, const void* bias, int m, int n, int k, int gshift, "
                        f"void* y) {{ w4v_gemv<{ty}, 1, {r}, {u}, {wp}, {act}, false>(x, w, scale, "
                        "pre, bias, m, n, k, gshift, y); }\n")
    src = "#define QGEMV_VARIANTS\n" + compiler.source("qgemv") + entries
    return Functions(arch, {"w4v": compiler._compile_cached(f"w4v_sweep_{dt}", arch, False,
                                                           src)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16")
    args = ap.parse_args()
    dt = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    dname = {"fp16": "float16", "bf16": "bfloat16"}[args.dtype]
    K = Kernels()
    f = K.functions
    v = functions(K.arch, args.dtype)
    stream = lambda: torch.cuda.current_stream().cuda_stream  # noqa: E731
    print(f"{torch.cuda.get_device_name()}, {K.sm_count} SMs; torch {torch.__version__}; NVRTC "
          f"{'.'.join(map(str, compiler.nvrtc_version()))}; {args.dtype}, one row of x, "
          f"group {GROUP}; % of 3.35 TB/s\n")
    print("| GEMM | w4_gemv (shipped) | w4_gemv + AWQ 1/s | " +
          " | ".join(f"w4v R={r} U={u} W={wp}" for r, u, wp in CONFIGS) + " | w4v best + 1/s |")
    print("|---|" + "---:|" * (len(CONFIGS) + 3))
    for name, k, n, act in SHAPES:
        n_out = n // 2 if act else n
        copies = max(2, math.ceil(ROTATE_BYTES / (n * k // 2)))
        calls = copies * math.ceil(CALLS / copies)
        w4 = [torch.randint(0, 256, (n, k // 2), device="cuda", dtype=torch.uint8)
              for _ in range(copies)]
        s4 = (torch.rand(n, k // GROUP, device="cuda") * 0.02 + 0.005).to(dt)
        pre = (torch.rand(k, device="cuda") + 0.5).to(dt)
        x = torch.randn(1, k, device="cuda", dtype=dt)
        y = torch.empty(1, n_out, device="cuda", dtype=dt)
        b4 = n * k // 2 + s4.numel() * 2 + k * 2 + n_out * 2

        def args_(w, p):
            return [DevPtr(x.data_ptr()), DevPtr(w.data_ptr()), DevPtr(s4.data_ptr()),
                    DevPtr(p.data_ptr() if p is not None else 0), DevPtr(0), 1, n_out, k,
                    lr.int4_group_shift(GROUP), DevPtr(y.data_ptr())]

        shipped = lr.qgemv_launch(1, n_out, k, dname, "int4", act=act, group=GROUP,
                                  sm_count=K.sm_count)

        def run(fn, ln, p=None):
            fn.launch(ln, args_(w4[0], p), stream())
            torch.cuda.synchronize()
            out = y.clone()
            t = graph_time([(lambda i=i: fn.launch(ln, args_(w4[i % copies], p), stream()))
                            for i in range(calls)])
            return t, out

        t0, ref = run(f, shipped)
        t0p, refp = run(f, shipped, pre)
        cells = [f"{b4 / t0 / DATASHEET_BW:.0%} ({t0 * 1e6:.1f} us)",
                 f"{b4 / t0p / DATASHEET_BW:.0%}"]
        best = None
        for r, u, wp in CONFIGS:
            if act and r % 2:
                cells.append("-")
                continue
            out_w = r // 2 if act else r
            ln = lr.Launch("w4v", f"w4v_{r}_{u}_{wp}_{1 if act else 0}",
                           (math.ceil(n_out / out_w), 1, 1), (32 * wp, 1, 1), pdl=True)
            t, out = run(v, ln)
            err = ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()
            cells.append(f"{b4 / t / DATASHEET_BW:.0%} ({t * 1e6:.1f}, {err:.0e})")
            if best is None or t < best[0]:
                best = (t, ln)
        tp, outp = run(v, best[1], pre)
        errp = ((outp.double() - refp.double()).abs().max() / refp.double().abs().max()).item()
        cells.append(f"{b4 / tp / DATASHEET_BW:.0%} ({errp:.0e})")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
        del w4
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
