"""L2 prefetch sizes on the loads that stream HBM: the quantized decode GEMVs' weight loads
(kernels/qgemv.cuh, QGEMV_L2), the small-M INT4 GEMM's (W4G_L2, same file), the 16-bit
GEMVs' (kernels/gemv.cu, GEMV_L2), the MoE decode GEMMs' (kernels/moe.cu, MOE_L2) and the
decode attention's cp.async copies (kernels/common.cuh, CP_ASYNC_L2), each compiled with no
hint, `.L2::128B` and `.L2::256B`, the kernels otherwise as shipped, timed in one process in
the order none, 128B, 256B, none, 256B, 128B.

    PYTHONPATH=<llmc checkout paths> python3 bench/kernels/l2_prefetch.py [--only gemv] \
        [--out results.md]

Rows: the Llama-3.1-8B decode GEMVs (INT4 RTN, group 128, and FP8 W8A8 at 1 and 8 rows; the
16-bit GEMV at 1, 2 and 8 rows, and the LM head), the small-M INT4 GEMM at 32, 64 and 128
rows (its shipped kernel: mma.sync `w4g`, or `w4gw`, wgmma, on sm_90a from 33 rows), timed as
bench/kernels/qgemv.py times them (a CUDA graph over >= 256 MiB of weight copies), the
Mixtral-8x7B expert GEMMs of a decode step of 1 and 8 tokens (bench/kernels/moe.py's shapes;
the chosen experts' bytes, 0.5-2.8 GB, are past L2 without copies), and the decode attention
at bench/kernels/bench.py's shapes (32 q / 8 kv heads x 128, bf16 pool). Each cell: % of
3.35 TB/s on the bytes read, both runs of that hint.
"""
from __future__ import annotations

import argparse
import math
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from gemm import DATASHEET_BW, ROTATE_BYTES, graph_time

from llmc.plugins import compiler
from llmc.plugins import launch_rules as lr
from llmc.plugins.launch import DevPtr, Functions, Kernels

# the GPU tests' batch maker, so the benchmark times the batches the tests check
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "plugins"))
from attention_ref import make_batch  # noqa: E402

HINTS = {"none": "", "128B": ".L2::128B", "256B": ".L2::256B"}
ORDER = ("none", "128B", "256B", "none", "256B", "128B")
SHAPES = (("qkv", 4096, 6144, None), ("o", 4096, 4096, None),
          ("gate_up+swiglu", 4096, 2 * 14336, "swiglu"), ("down", 14336, 4096, None))
DECODE = (("B=64 ctx=2048 bs=16", [2048] * 64, 16), ("B=64 ctx=2048 bs=64", [2048] * 64, 64),
          ("B=1 ctx=8192", [8192], 16), ("B=256 ctx=256", [256] * 256, 16),
          ("B=64 mixed ctx 64-4096", [64 * 2 ** (i % 7) for i in range(64)], 16))
GROUP = 128
# what each part times: its module and the macro that sets the hint
PARTS = {"qgemv": ("qgemv", "QGEMV_L2"), "w4gemm": ("qgemv", "W4G_L2"),
         "gemv": ("gemv", "GEMV_L2"), "moe": ("moe", "MOE_L2"),
         "attention": ("paged_attention", "CP_ASYNC_L2")}
GEMM_MS = (32, 64, 128)   # the small-M GEMM's rows (w4g; from 33 on sm_90a its wgmma kernel)


def variants(arch: str, parts) -> dict[str, dict[str, Functions]]:
    """{part: {hint: its module compiled with that hint}} (NVRTC in parallel threads)."""
    def compile_(job):
        (mod, macro), text = PARTS[job[0]], HINTS[job[1]]
        return compiler._compile_cached(mod, arch, False,
                                        f'#define {macro} "{text}"\n' + compiler.source(mod))

    jobs = [(part, hint) for part in parts for hint in HINTS]
    with ThreadPoolExecutor(len(jobs)) as pool:
        cubins = dict(zip(jobs, pool.map(compile_, jobs)))
    return {part: {hint: Functions(arch, {PARTS[part][0]: cubins[part, hint]})
                   for hint in HINTS} for part in parts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="also write the markdown table to this file")
    ap.add_argument("--only", nargs="+", choices=list(PARTS), default=list(PARTS),
                    help="which kernels to time")
    args = ap.parse_args()
    torch.manual_seed(0)
    K = Kernels()
    fns = variants(K.arch, args.only)
    stream = lambda: torch.cuda.current_stream().cuda_stream  # noqa: E731
    bf = torch.bfloat16
    fp8 = torch.cuda.get_device_capability() >= (8, 9)
    res: dict[tuple, dict[str, list[float]]] = {}

    def record(key, hint, nbytes, seconds):
        res.setdefault(key, {}).setdefault(hint, []).append(nbytes / seconds / DATASHEET_BW)

    def int4_weights(n, k):
        """Packed INT4 copies over >= ROTATE_BYTES, their scales, and the calls a graph makes."""
        copies = max(2, math.ceil(ROTATE_BYTES / (n * k // 2)))
        w4 = [torch.randint(0, 256, (n, k // 2), device="cuda", dtype=torch.uint8)
              for _ in range(copies)]
        return w4, torch.rand(n, k // GROUP, device="cuda").to(bf) * 0.01, \
            copies * math.ceil(24 / copies)

    def time_hints(part, key, ln, argv, calls, nbytes):
        """`ln` over the argument lists in turn, each hint of `part` in ORDER."""
        for hint in ORDER:
            f = fns[part][hint]
            t = graph_time([lambda a=argv[i % len(argv)], f=f: f.launch(ln, a, stream())
                            for i in range(calls)])
            record(key, hint, nbytes, t)

    for name, k, n, act in SHAPES if "qgemv" in args.only else ():
        n_out = n // 2 if act else n
        w4, s4, calls = int4_weights(n, k)
        copies = len(w4)
        w8 = [torch.randint(0, 256, (n, k), device="cuda", dtype=torch.uint8) & 0x77
              for _ in range(copies // 2 + 1)]   # finite E4M3 codes
        s8 = torch.rand(n, device="cuda") * 1e-3
        for m in (1, 8):
            x = torch.randn(m, k, device="cuda", dtype=bf)
            y = torch.empty(m, n_out, device="cuda", dtype=bf)
            io = m * n_out * 2 + m * k * 2
            l4 = lr.qgemv_launch(m, n_out, k, "bfloat16", "int4", None, act, GROUP, K.sm_count)
            args4 = [[DevPtr(x.data_ptr()), DevPtr(w.data_ptr()), DevPtr(s4.data_ptr()),
                      DevPtr(0), DevPtr(0), m, n_out, k, lr.int4_group_shift(GROUP),
                      DevPtr(y.data_ptr())] for w in w4]
            l8 = lr.qgemv_launch(m, n_out, k, "bfloat16", "fp8", None, act,
                                 sm_count=K.sm_count) if fp8 else None
            args8 = [[DevPtr(x.data_ptr()), DevPtr(w.data_ptr()), DevPtr(s8.data_ptr()),
                      lr.float_bits(0.05), DevPtr(0), m, n_out, k, DevPtr(y.data_ptr()),
                      DevPtr(0)] for w in w8]   # no first-token rows
            for hint in ORDER:
                f = fns["qgemv"][hint]

                def call(ln, a, f=f):
                    return lambda: f.launch(ln, a, stream())
                t = graph_time([call(l4, args4[i % len(w4)]) for i in range(calls)])
                record((name, m, "int4 RTN"), hint, n * k // 2 + s4.numel() * 2 + io, t)
                if fp8:
                    t = graph_time([call(l8, args8[i % len(w8)]) for i in range(calls)])
                    record((name, m, "fp8"), hint, n * k + n * 4 + io, t)
        w4 = w8 = None

    for name, k, n, act in (*SHAPES, ("lm_head", 4096, 128256, None)) \
            if "gemv" in args.only else ():
        n_out = n // 2 if act else n
        copies = max(2, math.ceil(ROTATE_BYTES / (n * k * 2)))
        w16 = [torch.randn(n, k, device="cuda", dtype=bf) * 0.02 for _ in range(copies)]
        for m in (1, 2, 8):
            x = torch.randn(m, k, device="cuda", dtype=bf)
            y = torch.empty(m, n_out, device="cuda", dtype=bf)
            ln = lr.gemv_launch(m, n_out, k, "bfloat16", None, act, K.sm_count)
            argv = [[DevPtr(x.data_ptr()), DevPtr(w.data_ptr()), DevPtr(0), m, n_out, k,
                     DevPtr(y.data_ptr())] for w in w16]
            time_hints("gemv", (name, m, "16-bit"), ln, argv, copies * math.ceil(24 / copies),
                       n * k * 2 + m * (n_out + k) * 2)
        w16 = None

    arrived = torch.zeros(1 << 16, device="cuda", dtype=torch.int32)
    for name, k, n, act in SHAPES if "w4gemm" in args.only else ():
        n_out = n // 2 if act else n
        w4, s4, calls = int4_weights(n, k)
        for m in GEMM_MS:
            x = torch.randn(m, k, device="cuda", dtype=bf)
            y = torch.empty(m, n_out, device="cuda", dtype=bf)
            part = torch.empty(lr.W4G_MAX_SPLITS * m * n, device="cuda")
            ln = lr.w4_gemm_launch(m, n_out, k, "bfloat16", None, act, GROUP,
                                   sm_count=K.sm_count, sm90=K.arch == "sm_90a")
            argv = [[DevPtr(x.data_ptr()), DevPtr(w.data_ptr()), DevPtr(s4.data_ptr()),
                     DevPtr(0), DevPtr(0), m, n_out, k, lr.int4_group_shift(GROUP),
                     DevPtr(y.data_ptr()), DevPtr(part.data_ptr()),
                     DevPtr(arrived.data_ptr())] for w in w4]
            time_hints("w4gemm", (name, m, f"int4 RTN {ln.kernel.split('_')[0]}"), ln, argv,
                       calls, n * k // 2 + s4.numel() * 2 + m * (n_out + k) * 2)
        w4 = None

    if "moe" in args.only:
        from moe import EXPERTS, HIDDEN, INTER, TOP_K

        gate_up = torch.randn(EXPERTS, 2 * INTER, HIDDEN, device="cuda", dtype=bf) * 0.02
        down = torch.randn(EXPERTS, HIDDEN, INTER, device="cuda", dtype=bf) * 0.01
        for t in (1, 8):
            x = torch.randn(t, HIDDEN, device="cuda", dtype=bf)
            logits = torch.randn(t, EXPERTS, device="cuda", dtype=bf)
            _, p = K.moe(x, logits, gate_up, down, TOP_K, True)
            chosen = len(p["ids"].unique())
            for name, w, xin, perm, n, k, act in (
                    ("gate_up+swiglu", gate_up, x, p["perm"], INTER, HIDDEN, True),
                    ("down", down, p["act"], DevPtr(0), HIDDEN, INTER, False)):
                ln = lr.moe_gemm_launch(t, EXPERTS, TOP_K, n, k, "bfloat16", act)
                out = torch.empty(t * TOP_K, n, device="cuda", dtype=bf)
                argv = [[xin, w, perm, p["meta"], EXPERTS, n, k, out]]
                time_hints("moe", (f"Mixtral expert {name}", t, f"MoE {ln.kernel}"), ln, argv,
                           24, chosen * w[0].numel() * 2)
        gate_up = down = None

    hq, hkv, d = 32, 8, 128
    for label, ctxs, bs in DECODE if "attention" in args.only else ():
        q, k, v, starts, cl, tables, cache = make_batch([1] * len(ctxs), ctxs, hq, hkv, d, bs,
                                                        bf, extra_blocks=0)
        nbytes = sum(ctxs) * 2 * hkv * d * 2
        for hint in ORDER:
            K.functions = fns["attention"][hint]
            t = graph_time([lambda: K.paged_attention(q, k, v, starts, cl, tables, cache,
                                                      write_kv=False)] * 5)
            record((f"paged decode {label}", len(ctxs), "attention"), hint, nbytes, t)
        cache = None

    lines = [f"{torch.cuda.get_device_name()}; torch {torch.__version__}; % of "
             f"{DATASHEET_BW / 1e12:.2f} TB/s, the two runs of each hint", "",
             "| kernel | rows | " + " | ".join(HINTS) + " |",
             "|---|---:|" + "---:|" * len(HINTS)]
    for (name, m, kind), by in res.items():
        lines.append(f"| {kind} {name} | {m} | " + " | ".join(
            ", ".join(f"{100 * p:.1f}%" for p in by[h]) for h in HINTS) + " |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
