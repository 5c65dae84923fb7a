"""Variants of the INT4 decode GEMV tried against the shipped kernel (bench/results/qgemv.md,
"Tried and not kept: where a chunk's bytes wait"), timed as qgemv.py times its kernels (a CUDA
graph of calls over rotated weights), each variant's results checked against the shipped
kernel's (bit-equal where the sums keep their order).

    cd bench/kernels && python3 qgemv_experiments.py {ring,layout,bulk,chains,loads}

ring:   the chunks in flight in a lane-private shared-memory ring (cp.async) instead of
        registers, the loop one chunk at a time (w4_gemv_sr);
layout: the weight in 1 KB chunks, a tile contiguous (W4T_ENTRY), against row-major;
bulk:   the tile-contiguous weight copied 8 KB a round by the bulk copy engine into S stages
        on mbarriers, the scales with the first round (w4_gemv_bulk, sm_90a), with and
        without each CTA starting at another round (rot);
chains: the x-side correction's MMA chain apart from the weights' (W4_IND);
loads:  which load instructions the weights and x take (W4_WLD, W4_XLD)."""
import math
import sys

import torch
from gemm import CALLS, DATASHEET_BW, ROTATE_BYTES, graph_time

from llmc.plugins import compiler
from llmc.plugins import launch_rules as lr
from llmc.plugins.launch import DevPtr, Functions, Kernels

SHAPES = (("qkv", 4096, 6144), ("o", 4096, 4096), ("gate_up", 4096, 28672), ("down", 14336, 4096))
REG = [(8, 1, 2), (8, 1, 3), (8, 2, 2)]       # (warps, chunks in flight, CTAs an SM)
MODE = sys.argv[1] if len(sys.argv) > 1 else "layout"
bf = torch.bfloat16


def entries():
    """{module suffix: (defines, [(entry, warps, weight layout)])}"""
    reg = [(f"W4_ENTRY(reg_{s}_{d}_{b}, BF16, 1, {s}, {d}, 0, true, false, {b})",
            f"reg_{s}_{d}_{b}", s, "rows") for s, d, b in REG]
    if MODE == "ring":
        sr = [(f"W4S_ENTRY(ring_{s}_{d}_{b}, BF16, 1, {s}, {d}, 0, true, false, {b})",
               f"ring_{s}_{d}_{b}", s, "rows")
              for s, d, b in [(8, 2, 2), (8, 4, 2), (8, 2, 3), (8, 4, 3), (4, 4, 4), (16, 2, 1)]]
        return {"": ("", reg + sr)}
    if MODE == "layout":
        tl = [(f"W4T_ENTRY(tl_{s}_{d}_{b}, BF16, 1, {s}, {d}, false, {b})", f"tl_{s}_{d}_{b}", s,
               "tiles") for s, d, b in REG]
        return {"": ("", reg + tl)}
    if MODE == "bulk":
        bk = [(f"W4B_ENTRY({k}_{st}_{b}, BF16, 1, {st}, {b}, {'true' if k == 'rot' else 'false'})",
               f"{k}_{st}_{b}", 8, "bulk") for st, b in [(3, 2), (4, 2), (3, 3), (4, 3)]
              for k in ("bulk", "rot")]
        return {"": ("", reg + bk)}
    if MODE == "chains":
        return {"": ("", reg), "_ind": ("#define W4_IND\n", reg)}
    return {"": ("", reg),
            "_x_ca": ('#define W4_XASM\n#define W4_XLD "ld.global.ca"\n', reg),
            "_x_cg": ('#define W4_XASM\n#define W4_XLD "ld.global.cg"\n', reg),
            "_w_plain": ('#define W4_WLD "ld.global.L1::no_allocate"\n', reg),
            "_w_cs_x_ca": ('#define W4_WLD "ld.global.cs"\n#define W4_XASM\n'
                           '#define W4_XLD "ld.global.ca"\n', reg)}


def relayout(w, n, k, kind):
    """The [N, K / 2] weight as the variant reads it: row-major, or a tile's 1 KB chunks in
    order, a chunk as [lane][h][16 bytes] (tiles) or [h][lane][16 bytes] (bulk)."""
    if kind == "rows":
        return w
    v = w.view(n // 16, 2, 8, k // 128, 4, 16)               # tile, h, g, chunk, t, bytes
    order = (0, 3, 2, 4, 1, 5) if kind == "tiles" else (0, 3, 1, 2, 4, 5)
    return v.permute(*order).contiguous().view(n, k // 2)


def main() -> None:
    K = Kernels()
    variants = entries()
    mods = {}
    for suffix, (defs, ents) in variants.items():
        src = "#define QGEMV_VARIANTS\n" + defs + compiler.source("qgemv") + \
            "\n".join(e[0] for e in ents) + "\n"
        mods["m" + suffix] = compiler._compile_cached(f"qgemv_exp_{MODE}{suffix}", K.arch, False,
                                                     src)
    fn = Functions(K.arch, mods)
    stream = lambda: torch.cuda.current_stream().cuda_stream  # noqa: E731
    runs = [("m" + sfx, name, warps, lay) for sfx, (_, ents) in variants.items()
            for _, name, warps, lay in ents]

    def call(mod, name, warps, x, w, s, m, n, k, y, pre=None):
        ln = lr.Launch(mod, name, (n // 16, 1, 1), (32 * warps, 1, 1), pdl=True)
        a = [DevPtr(x.data_ptr()), DevPtr(w.data_ptr()), DevPtr(s.data_ptr()),
             DevPtr(pre.data_ptr() if pre is not None else 0), DevPtr(0), m, n, k,
             lr.int4_group_shift(128), DevPtr(y.data_ptr())]
        return lambda: fn.launch(ln, a, stream())

    torch.manual_seed(0)
    worst = {}
    for k, n in ((4096, 6144), (14336, 4096)):
        w = torch.randint(0, 256, (n, k // 2), device="cuda", dtype=torch.uint8)
        s = (torch.rand(n, k // 128, device="cuda") * 0.01).to(bf)
        pre = (torch.rand(k, device="cuda") + 0.5).to(bf)
        for m in (1, 5, 8):
            x = torch.randn(m, k, device="cuda", dtype=bf)
            for p in (None, pre):
                ref = torch.empty(m, n, device="cuda", dtype=bf)
                call("m", "reg_8_1_2", 8, x, w, s, m, n, k, ref, p)()
                for mod, name, warps, lay in runs:
                    y = torch.full((m, n), float("nan"), device="cuda", dtype=bf)
                    call(mod, name, warps, x, relayout(w, n, k, lay), s, m, n, k, y, p)()
                    torch.cuda.synchronize()
                    d = ((y.float() - ref.float()).abs() / (ref.float().abs() + 1e-2)).max().item()
                    worst[mod + name] = max(worst.get(mod + name, 0.0), d)
    print("largest relative difference from the shipped kernel (0: bit-equal): " +
          ", ".join(f"{k}: {v:.1e}" for k, v in worst.items()), flush=True)
    print(f"\n{torch.cuda.get_device_name()}, % of {DATASHEET_BW / 1e12:.2f} TB/s on the "
          "kernel's bytes\n")
    print("| GEMM | M | " + " | ".join(m[1:] + (":" if m[1:] else "") + nm
                                       for m, nm, _, _ in runs) + " |")
    print("|---|---:|" + "---:|" * len(runs))
    for name, k, n in SHAPES:
        wbytes = n * k // 2
        copies = max(2, math.ceil(ROTATE_BYTES / (wbytes // 4)))
        calls = copies * math.ceil(CALLS / copies)
        ws = [torch.randint(0, 256, (n, k // 2), device="cuda", dtype=torch.uint8)
              for _ in range(copies)]
        s = (torch.rand(n, k // 128, device="cuda") * 0.01).to(bf)
        for m in (1, 8):
            x = torch.randn(m, k, device="cuda", dtype=bf)
            y = torch.empty(m, n, device="cuda", dtype=bf)
            byt = wbytes + s.numel() * 2 + m * k * 2 + m * n * 2
            cells = []
            for mod, nm, warps, _ in runs:   # the layouts differ in order only: time any bytes
                t = graph_time([call(mod, nm, warps, x, ws[i % copies], s, m, n, k, y)
                                for i in range(calls)])
                cells.append(f"{byt / t / DATASHEET_BW * 100:.0f}%")
            print(f"| {name} | {m} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
