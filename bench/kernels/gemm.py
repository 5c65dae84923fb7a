"""Benchmark llmc's cuBLASLt GEMM (llmc/backends/cuda/gemm.py) against torch.matmul on the
decode shapes of Llama-3.1-8B, bf16, and against the HBM datasheet bandwidth.

    PYTHONPATH=<llmc checkout paths> python3 bench/kernels/gemm.py [--out results.md]

Decode GEMMs are memory-bound (M = 1..64 rows against a weight of K x N), so the figure of
merit is achieved bandwidth: (weight bytes + X bytes + Y bytes) / time, against 3.35 TB/s (H100
SXM datasheet). Each variant is captured in a CUDA graph of CALLS calls and replayed; the
median replay time over REPS replays, divided by CALLS, is reported, so host launch overhead is
excluded alike for both (the cuda backend replays decode steps as graphs too). The host cost
of one eager call is printed separately.

The L2 cache (50 MB on H100) would hold a small weight between back-to-back calls and report
L2 bandwidth instead of HBM: each graph cycles through enough distinct copies of the weight
(ROTATE_BYTES of them in all, several times L2) that every call reads its weight from HBM, as
in a real decode step where ~200 different weights pass between two uses of the same one.
The activations stay hot in L2, as they are in a decode step.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import math
import statistics
import time

import torch

from llmc.backends.cuda import gemm

# Llama-3.1-8B: hidden 4096, 32 q heads + 8 kv heads of 128, intermediate 14336, vocab 128256
SHAPES = (  # name, K, N, transposed weight (E[N, K] as stored), output dtype
    ("qkv", 4096, 6144, False, "bfloat16"),
    ("o", 4096, 4096, False, "bfloat16"),
    ("gate_up", 4096, 2 * 14336, False, "bfloat16"),
    ("down", 14336, 4096, False, "bfloat16"),
    ("lm_head", 4096, 128256, True, "float32"),  # E^T, fp32 logits as the backend writes them
)
MS = (1, 8, 16, 64)
DATASHEET_BW = 3.35e12  # H100 SXM5 HBM3
ROTATE_BYTES = 256 << 20  # > 5x the 50 MB L2: a weight is evicted before it comes round again
CALLS, REPS = 24, 15
WORKSPACE = 32 << 20
TORCH = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def graph_time(calls) -> float:
    """Median seconds per call of `calls` (a list of thunks) captured in one CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture, as torch.cuda.graph advises
        for fn in calls:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for fn in calls:
            fn()
    g.replay()
    start = [torch.cuda.Event(enable_timing=True) for _ in range(REPS)]
    end = [torch.cuda.Event(enable_timing=True) for _ in range(REPS)]
    for s, e in zip(start, end):
        s.record()
        g.replay()
        e.record()
    torch.cuda.synchronize()
    ms = statistics.median(s.elapsed_time(e) for s, e in zip(start, end))
    del g
    return ms / 1e3 / len(calls)


def torch_matmul(transposed: bool, out_dtype: torch.dtype):
    """torch's GEMM for the same product into a preallocated Y, and what it writes."""
    def plain(x, w, y):
        torch.matmul(x, w.t() if transposed else w, out=y)
    if out_dtype == torch.float32:  # bf16 x bf16 -> fp32 needs torch.mm(out_dtype=)
        try:
            a = torch.zeros(8, 8, dtype=torch.bfloat16, device="cuda")
            torch.mm(a, a.t(), out_dtype=torch.float32,
                     out=torch.empty(8, 8, device="cuda"))

            def mixed(x, w, y):
                torch.mm(x, w.t() if transposed else w, out_dtype=torch.float32, out=y)
            return mixed, "float32"
        except (TypeError, RuntimeError):
            return plain, "bfloat16"
    return plain, "bfloat16"


def host_cost(blas) -> tuple[float, float]:
    """Host microseconds per eager call, llmc run() vs torch.matmul (576 x 576, M=1)."""
    plan = blas.plan(576, 576, dtype="bfloat16", max_m=1)
    x = torch.randn(1, 576, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(576, 576, device="cuda", dtype=torch.bfloat16)
    y = torch.empty(1, 576, device="cuda", dtype=torch.bfloat16)
    stream = torch.cuda.current_stream().cuda_stream
    xp, wp, yp, n = x.data_ptr(), w.data_ptr(), y.data_ptr(), 2000
    out = []
    for fn in (lambda: plan.run(xp, wp, yp, 1, stream), lambda: torch.matmul(x, w, out=y)):
        fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        out.append((time.perf_counter() - t) / n * 1e6)
        torch.cuda.synchronize()
    return out[0], out[1]


def versions(blas) -> str:
    def dist(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "-"
    from cuda.bindings import driver

    _, drv = driver.cuDriverGetVersion()
    return (f"torch {torch.__version__} (CUDA {torch.version.cuda}), cuBLASLt {blas.version}, "
            f"nvmath-python {dist('nvmath-python')}, cuda-bindings {dist('cuda-bindings')}, "
            f"driver CUDA {drv // 1000}.{drv % 1000 // 10}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="also write the markdown table to this file")
    args = ap.parse_args()
    t0 = time.perf_counter()
    torch.manual_seed(0)
    workspace = torch.empty(WORKSPACE, dtype=torch.uint8, device="cuda")
    blas = gemm.Blas(workspace.data_ptr(), workspace.numel())
    stream_of = torch.cuda.current_stream  # inside a capture this is the capture stream

    rows = []
    for name, k, n, transposed, out_name in SHAPES:
        w_bytes = n * k * 2
        copies = max(2, math.ceil(ROTATE_BYTES / w_bytes))
        shape = (n, k) if transposed else (k, n)
        weights = [torch.randn(*shape, device="cuda", dtype=torch.bfloat16) * k ** -0.5
                   for _ in range(copies)]
        plan = blas.plan(n, k, dtype="bfloat16", out_dtype=out_name, transpose_b=transposed,
                         max_m=max(MS))
        t_fn, t_out = torch_matmul(transposed, TORCH[out_name])
        calls = copies * math.ceil(CALLS / copies)
        for m in MS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            y = torch.empty(m, n, device="cuda", dtype=TORCH[out_name])
            yt = torch.empty(m, n, device="cuda", dtype=TORCH[t_out])
            xp, yp = x.data_ptr(), y.data_ptr()

            def ours(w):
                wp = w.data_ptr()
                return lambda: plan.run(xp, wp, yp, m, stream_of().cuda_stream)

            def theirs(w):
                return lambda: t_fn(x, w, yt)
            ours_s = graph_time([ours(weights[i % copies]) for i in range(calls)])
            torch_s = graph_time([theirs(weights[i % copies]) for i in range(calls)])
            ours(weights[0])()
            theirs(weights[0])()
            torch.cuda.synchronize()
            diff = ((y.double() - yt.double()).abs().max() / yt.double().abs().max()).item()
            moved = w_bytes + m * k * 2 + m * n * y.element_size()
            rows.append((name, f"{k}->{n}" + (" (E^T)" if transposed else ""), m, out_name,
                         t_out, w_bytes, ours_s, moved / ours_s, torch_s, moved / torch_s,
                         diff))
        plan.close()
        weights.clear()
        torch.cuda.empty_cache()
    ours_host, torch_host = host_cost(blas)
    ver = versions(blas)
    torch.cuda.synchronize()
    blas.close()

    lines = [
        "## cuBLASLt GEMM (llmc) vs torch.matmul: Llama-3.1-8B decode shapes, bf16",
        "",
        f"{torch.cuda.get_device_name()}; {ver}",
        "",
        f"CUDA graph of >= {CALLS} calls, median of {REPS} replays; weights rotated over "
        f">= {ROTATE_BYTES >> 20} MiB to defeat the L2; bandwidth = (W + X + Y bytes) / time, "
        f"% of the {DATASHEET_BW / 1e12:.2f} TB/s datasheet.",
        "",
        "| GEMM | K->N | M | out llmc / torch | W MB | llmc us | llmc TB/s | % peak "
        "| torch us | torch TB/s | torch/llmc time | max rel diff |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (name, kn, m, out, t_out, w_bytes, ours_s, ours_bw, torch_s, torch_bw,
         diff) in rows:
        lines.append(
            f"| {name} | {kn} | {m} | {out} / {t_out} | {w_bytes / 1e6:.1f} "
            f"| {ours_s * 1e6:.1f} | {ours_bw / 1e12:.2f} | {ours_bw / DATASHEET_BW:.0%} "
            f"| {torch_s * 1e6:.1f} | {torch_bw / 1e12:.2f} | {torch_s / ours_s:.2f} "
            f"| {diff:.1e} |")
    lines += [
        "",
        f"Host cost of one eager call (576x576, M=1): llmc run() {ours_host:.1f} us, "
        f"torch.matmul(out=) {torch_host:.1f} us.",
        f"Total benchmark time {time.perf_counter() - t0:.1f} s.",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
