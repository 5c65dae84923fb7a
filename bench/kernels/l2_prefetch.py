"""L2 prefetch sizes on the loads that stream HBM: the quantized decode GEMVs' weight loads
(kernels/qgemv.cuh, QGEMV_L2) and the decode attention's cp.async copies (kernels/common.cuh,
CP_ASYNC_L2), each compiled with no hint, `.L2::128B` and `.L2::256B`, the kernels otherwise as
shipped, timed in one process in the order none, 128B, 256B, none, 256B, 128B.

    PYTHONPATH=<llmc checkout paths> python3 bench/kernels/l2_prefetch.py [--out results.md]

Rows: the Llama-3.1-8B decode GEMVs at 1 and 8 rows (INT4 RTN, group 128; FP8 W8A8), timed as
bench/kernels/qgemv.py times them (a CUDA graph over >= 256 MiB of weight copies), and the
decode attention at bench/kernels/bench.py's shapes (32 q / 8 kv heads x 128, bf16 pool).
Each cell: % of 3.35 TB/s on the bytes read, both runs of that hint.
"""
from __future__ import annotations

import argparse
import math
import sys
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


def variants(arch: str) -> dict[str, Functions]:
    """Each hint's qgemv and paged_attention modules."""
    out = {}
    for hint, text in HINTS.items():
        cubins = {mod: compiler._compile_cached(
            mod, arch, False, f'#define {macro} "{text}"\n' + compiler.source(mod))
            for mod, macro in (("qgemv", "QGEMV_L2"), ("paged_attention", "CP_ASYNC_L2"))}
        out[hint] = Functions(arch, cubins)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="also write the markdown table to this file")
    args = ap.parse_args()
    torch.manual_seed(0)
    K = Kernels()
    fns = variants(K.arch)
    stream = lambda: torch.cuda.current_stream().cuda_stream  # noqa: E731
    bf = torch.bfloat16
    fp8 = torch.cuda.get_device_capability() >= (8, 9)
    res: dict[tuple, dict[str, list[float]]] = {}

    def record(key, hint, nbytes, seconds):
        res.setdefault(key, {}).setdefault(hint, []).append(nbytes / seconds / DATASHEET_BW)

    for name, k, n, act in SHAPES:
        n_out = n // 2 if act else n
        copies = max(2, math.ceil(ROTATE_BYTES / (n * k // 2)))
        calls = copies * math.ceil(24 / copies)
        w4 = [torch.randint(0, 256, (n, k // 2), device="cuda", dtype=torch.uint8)
              for _ in range(copies)]
        s4 = torch.rand(n, k // GROUP, device="cuda").to(bf) * 0.01
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
                      lr.float_bits(0.05), DevPtr(0), m, n_out, k, DevPtr(y.data_ptr())]
                     for w in w8]
            for hint in ORDER:
                f = fns[hint]

                def call(ln, a, f=f):
                    return lambda: f.launch(ln, a, stream())
                t = graph_time([call(l4, args4[i % len(w4)]) for i in range(calls)])
                record((name, m, "int4 RTN"), hint, n * k // 2 + s4.numel() * 2 + io, t)
                if fp8:
                    t = graph_time([call(l8, args8[i % len(w8)]) for i in range(calls)])
                    record((name, m, "fp8"), hint, n * k + n * 4 + io, t)
        w4 = w8 = None

    hq, hkv, d = 32, 8, 128
    for label, ctxs, bs in DECODE:
        q, k, v, starts, cl, tables, cache = make_batch([1] * len(ctxs), ctxs, hq, hkv, d, bs,
                                                        bf, extra_blocks=0)
        nbytes = sum(ctxs) * 2 * hkv * d * 2
        for hint in ORDER:
            K.functions = fns[hint]
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
