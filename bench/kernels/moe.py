"""Benchmark the cuda backend's mixture-of-experts layer (plugins/kernels/moe.cu) on
Mixtral-8x7B's shapes (hidden 4096, 8 experts of width 14336, top-2), bf16, against the bytes
of the routed experts' weights at the HBM datasheet bandwidth (3.35 TB/s, H100 SXM).

    PYTHONPATH=<llmc checkout paths> python3 bench/kernels/moe.py [--out results.md]

The layer is what the backend's moe op launches, from the router's logits to the combined
output: routing + grouping (one CTA, or over a grid from launch_rules.MOE_GRID_ROUTE_ROWS
routed rows), the grouped gate-up GEMM with SwiGLU fused, the grouped down GEMM, the
weighted combine. For T = 1 .. 4096 tokens with random logits (so random routing), it
reports:
- the layer's time (a CUDA graph of CALLS layers, median of REPS replays, as
  bench/kernels/gemm.py times), and each part's on its own (where the grouping runs over a
  grid, the routing with its one-CTA walk too);
- the routed experts' weight bytes (3 H I 2 bytes for each expert the step's tokens chose,
  which is all a decode step reads) over that time, against 3.35 TB/s, and TFLOP/s;
- the same layer in PyTorch with the routing known on the host (an ideal per-expert
  cuBLAS loop: x rows gathered, gate-up, SwiGLU, down, weighted index_add; captured with
  the index lists precomputed, so none of its host work is timed), and the largest
  difference between the two outputs;
- on sm_90a, where the tiled GEMM runs (past the 8-row kernel), its two GEMMs on mma.sync
  as well as on wgmma (the shipped kernel there), and the ratio of the times.

--sweep also times the grouped GEMMs in other shapes on the same routing: where the 8-row
kernel serves (decode steps, and steps whose experts hold few rows: moe_block_m) that kernel
compiled with other warp shapes (warps over N and over K, chunks
loaded ahead) from the same source, the figures that choose MOE_GEMM's parameters in moe.cu
(launch_rules.MOE_GEMM_SHAPES); for steps past 8 tokens the tiled kernel at each tile height
(launch_rules.MOE_TC_BLOCK_M, the routing regrouped for it: the figures behind
moe_block_m's switch) in its shipped shape and in other warp layouts and pipeline depths
(TC_SWEEP, compiled from the same source: the figures behind MOE_TC_SHAPE), on sm_90a its
wgmma form in other tile widths and depths (WG_SWEEP: the figures behind MOE_WG_SHAPES and
moe_block_m's sm90 switch) and, for
comparison, the 64-row register kernel the tiled one replaced
(moe_gemm's template, 4 warps over N x 2 over K). Each wgmma shape's down output is
compared with the first one's at its tile height, a max rel diff added to its label where
they differ. --sweep-wgmma times the wgmma shapes alone.

--fp8-block times the layer over E4M3 experts (kernels/moe_fp8b.cu, a scale a block of 128
k and row, rounded to nearest from the same bf16 weights) beside the bf16 layer, the same
tokens and routing in the same run: each one's time, the FP8 layer's HBM on its own bytes
(the chosen experts' E4M3 weights and scales), and its largest difference from the bf16
layer run on the dequantized weights; on sm_90a also the FP8 layer with its GEMMs on
mma.sync where the wgmma kernel would run them, and on tiles of 128 positions where it takes
those of 256 (launch_rules.MOE_WG8_M256_ROWS). --model qwen3-30b-a3b takes that model's shapes
(hidden 2048, 128 experts of width 768, top-8) instead of Mixtral's.
"""
from __future__ import annotations

import argparse
import functools
import time

import torch
from gemm import CALLS, DATASHEET_BW, REPS, graph_time

from llmc.plugins import compiler
from llmc.plugins import launch_rules as lr
from llmc.plugins.launch import DevPtr, Kernels

MODELS = {"mixtral-8x7b": (4096, 14336, 8, 2), "qwen3-30b-a3b": (2048, 768, 128, 8)}
HIDDEN, INTER, EXPERTS, TOP_K = MODELS["mixtral-8x7b"]
FP8B_BLOCK = 128
TOKENS = (1, 8, 64, 256, 512, 1024, 4096)
# BM -> (warps over N, warps over K, chunks ahead) variants of the register kernel for
# --sweep; the shipped one is launch_rules.MOE_GEMM_SHAPES with U = 2. The 64-row one is the
# kernel the tiled GEMM replaced for T > 8, timed beside it.
SWEEP = {8: [(1, 4, 2), (1, 8, 1), (1, 8, 2), (1, 8, 4), (1, 16, 1), (1, 16, 2), (2, 4, 2)],
         64: [(4, 2, 2)]}
# (warps over M, warps over N, k steps in flight) variants of the tiled kernel, at each of
# launch_rules.MOE_TC_BLOCK_M; the shipped one is launch_rules.MOE_TC_SHAPE
TC_SWEEP = [(2, 2, 3), (2, 2, 5), (2, 4, 4), (4, 2, 4), (4, 2, 3)]
# (weight rows a tile, k steps in flight) of the wgmma kernel (sm_90a) at each tile height;
# the shipped ones are launch_rules.MOE_WG_SHAPES
WG_SWEEP = [(128, 3), (128, 4), (128, 5), (256, 3), (256, 4)]


def sweep_functions(K: Kernels):
    """Every SWEEP shape as moe_sweep_m<BM>_wn<WN>_sk<SK>_u<U>[_swiglu], every TC_SWEEP
    one as moe_sweep_tc_m<BM>_w<WM>x<WN>_s<ST>[_swiglu] and every WG_SWEEP one as
    moe_sweep_wg_m<BM>_n<BN>_s<ST>[_swiglu] (sm_90a), bf16."""
    acts = (("", "false"), ("_swiglu", "true"))
    entries = "".join(
        f"MOE_GEMM_ENTRY(moe_sweep_m{bm}_wn{wn}_sk{sk}_u{u}{suffix}, BF16, {bm // 8}, {wn}, "
        f"{sk}, {u}, {act})\n"
        for bm, shapes in SWEEP.items() for wn, sk, u in shapes for suffix, act in acts)
    entries += "".join(
        f"MOE_GEMM_TC_ENTRY(moe_sweep_tc_m{bm}_w{wm}x{wn}_s{st}{suffix}, BF16, {bm}, {wm}, "
        f"{wn}, {st}, {act})\n"
        for bm in lr.MOE_TC_BLOCK_M for wm, wn, st in TC_SWEEP for suffix, act in acts)
    if K.arch == "sm_90a":
        entries += "".join(
            f"MOE_GEMM_WG_ENTRY(moe_sweep_wg_m{bm}_n{bn}_s{st}{suffix}, BF16, {bm}, {bn}, {st}, "
            f"{act})\n"
            for bm in lr.MOE_TC_BLOCK_M for bn, st in WG_SWEEP for suffix, act in acts)
    src = "#define MOE_VARIANTS\n" + compiler.source("moe") + entries
    cubin = compiler._compile_cached("moe_sweep", K.arch, False, src)
    from llmc.plugins.launch import Functions

    return Functions(K.arch, {"moe_sweep": cubin})


def sweep_step(K, sweep, t, x, logits, gate_up, down, chosen, stream, wgmma_only=False):
    """--sweep rows (T, label, gate-up s, down s, chosen) of step t: each GEMM shape on the
    routing regrouped into tiles of its height (a meta buffer of its own); wgmma_only
    (--sweep-wgmma): only the wgmma shapes."""
    dt, rows = "bfloat16", []
    wm0, wn0, st0 = lr.MOE_TC_SHAPE
    # the 8-row kernel where it serves (moe_block_m), the tiled ones past decode steps
    shapes = ([(8, f"m8 register {wn} x {sk} U{u}", wn, sk, u) for wn, sk, u in SWEEP[8]]
              if lr.moe_block_m(t, EXPERTS, TOP_K) == 8 else []) + (
              [] if t <= 8 else
              [(bm, f"m{bm} tiled {wm} x {wn} S{st}" + (" (shipped)" if sh else ""), wm, wn, st)
               for bm in lr.MOE_TC_BLOCK_M
               for (wm, wn, st), sh in [(lr.MOE_TC_SHAPE, True)]
               + [(v, False) for v in TC_SWEEP if v != (wm0, wn0, st0)]]
              + [(64, f"m64 register {wn} x {sk} U{u}", wn, sk, u) for wn, sk, u in SWEEP[64]]
              + ([(bm, f"m{bm} wgmma n{bn} S{st}"
                   + (" (shipped)" if (bn, st) == lr.MOE_WG_SHAPES[bm] else ""), 0, bn, st)
                  for bm in lr.MOE_TC_BLOCK_M for bn, st in WG_SWEEP]
                 if K.arch == "sm_90a" else []))
    if wgmma_only:
        shapes = [sh for sh in shapes if "wgmma" in sh[1]]
    refs = {}
    for bm, label, wn, sk, u in shapes:   # tiled: (wn, sk, u) are (WM, WN, ST)
        i32 = dict(device="cuda", dtype=torch.int32)
        ids, pos_of = torch.empty(t, TOP_K, **i32), torch.empty(t, TOP_K, **i32)
        wts = torch.empty(t, TOP_K, device="cuda", dtype=torch.float32)
        perm = torch.empty(t * TOP_K, **i32)
        meta = torch.empty(t * lr.moe_meta_ints(EXPERTS, TOP_K), **i32)
        for launch, args in lr.moe_route_launches(t, EXPERTS, TOP_K, dt, True, logits, ids, wts,
                                                  pos_of, perm, meta, bm):
            K.functions.launch(launch, args, stream())
        act = torch.empty(t * TOP_K, INTER, device="cuda", dtype=x.dtype)
        y = torch.empty(t * TOP_K, HIDDEN, device="cuda", dtype=x.dtype)
        tiles = lr.moe_max_tiles(t, EXPERTS, TOP_K, bm)
        times = []
        for fused, n, k, xin, w, p, out_buf in ((True, INTER, HIDDEN, x, gate_up, perm, act),
                                                (False, HIDDEN, INTER, act, down, None, y)):
            suffix = "_swiglu" if fused else ""
            if "wgmma" in label:   # grid and shared memory as moe_gemm_launch's
                bn, st = sk, u
                blocks = -(-n // (bn // 2 if fused else bn))
                fns = sweep
                ln = lr.Launch("moe_sweep", f"moe_sweep_wg_m{bm}_n{bn}_s{st}{suffix}",
                               (tiles, blocks, 1), (2 * bm, 1, 1),
                               smem=lr.moe_wg_smem(bm, bn, st))
            elif "tiled" in label:
                wm, wn_, st = wn, sk, u
                blocks = -(-n // (lr.MOE_TC_BN // 2 if fused else lr.MOE_TC_BN))
                shipped = (wm, wn_, st) == lr.MOE_TC_SHAPE
                fns = K.functions if shipped else sweep
                name = (f"moe_gemm_bf16_m{bm}{suffix}" if shipped else
                        f"moe_sweep_tc_m{bm}_w{wm}x{wn_}_s{st}{suffix}")
                ln = lr.Launch("moe" if shipped else "moe_sweep", name, (tiles, blocks, 1),
                               (32 * wm * wn_, 1, 1), smem=lr.moe_gemm_smem(bm, st))
            else:
                fns = sweep
                ln = lr.Launch("moe_sweep", f"moe_sweep_m{bm}_wn{wn}_sk{sk}_u{u}{suffix}",
                               (-(-n // (wn * (8 if fused else 16))), tiles, 1),
                               (32 * wn * sk, 1, 1))
            a = [xin, w, p if p is not None else DevPtr(0), meta, EXPERTS, n, k, out_buf]
            times.append(graph_time([lambda ln=ln, a=a, f=fns: f.launch(ln, a, stream())]
                                    * CALLS))
        if "wgmma" in label:   # each wgmma shape's down output against the first one's
            ref = refs.setdefault(bm, y.clone())
            diff = ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
            label += f" (max rel diff {diff:.0e})" if diff else ""
        rows.append((t, label, *times, chosen))
    return rows


def fp8_blocks(w):
    """w [E, N, K] bf16 -> (E4M3 bytes [E, N, K], scales [E, K / B, N] bf16, the weight
    dequantized as the graph's DequantizeLinear gives it), |max| / 448 a block."""
    e, n, k = w.shape
    g = w.float().reshape(e, n, k // FP8B_BLOCK, FP8B_BLOCK)
    scale = (g.abs().amax(-1) / 448).clamp_min(2.0 ** -14).to(w.dtype)
    s = scale.float()[..., None]
    q = (g / s).clamp(-448, 448).to(torch.float8_e4m3fn)
    dq = (q.float() * s).reshape(e, n, k).to(w.dtype)
    return q.reshape(e, n, k).view(torch.uint8), scale.transpose(1, 2).contiguous(), dq


def fp8_block_rows(K: Kernels, gate_up, down, tokens) -> list[str]:
    """--fp8-block: the layer over E4M3 experts against the bf16 one, per T."""
    (gq, gs, gdq), (dq8, ds, ddq) = fp8_blocks(gate_up), fp8_blocks(down)
    del gate_up, down
    lines = ["", f"E4M3 experts, a scale a block of {FP8B_BLOCK} k and row (kernels/moe_fp8b.cu)"
             ", against the bf16 layer on the same tokens and routing in the same run; FP8 "
             "bytes: the chosen experts' E4M3 weights and their scales", "",
             "| T | experts read | bf16 us | fp8-block us | bf16 / fp8 | FP8 MB | HBM (FP8) "
             "| max rel diff vs bf16 on the dequantized weights | fp8-block on mma.sync us "
             "(x) | fp8-block on 128-position tiles us (x) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for t in tokens:
        x = torch.randn(t, HIDDEN, device="cuda", dtype=torch.bfloat16)
        logits = torch.randn(t, EXPERTS, device="cuda", dtype=torch.bfloat16)

        def bf16(x=x, logits=logits):
            return K.moe(x, logits, gdq, ddq, TOP_K, True)[0]

        def fp8(x=x, logits=logits, sm90=None):
            return K.moe(x, logits, gq, dq8, TOP_K, True, scales=(gs, ds), sm90=sm90)[0]

        out8, parts = K.moe(x, logits, gq, dq8, TOP_K, True, scales=(gs, ds))
        ref = bf16()
        torch.cuda.synchronize()
        diff = ((out8.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
        chosen = len(parts["ids"].unique())
        w_bytes = chosen * 3 * HIDDEN * INTER * (1 + 2 / FP8B_BLOCK)
        bf_s, fp_s = graph_time([bf16] * CALLS), graph_time([fp8] * CALLS)
        # sm_90a past the 8-row kernel: the same FP8 layer with its GEMMs on mma.sync
        wg = K.arch == "sm_90a" and lr.moe_gemm_launch(
            t, EXPERTS, TOP_K, HIDDEN, INTER, "bfloat16", False, FP8B_BLOCK, sm90=True
        ).kernel != lr.moe_gemm_launch(
            t, EXPERTS, TOP_K, HIDDEN, INTER, "bfloat16", False, FP8B_BLOCK).kernel
        mma = narrow = ""
        if wg:
            mma_s = graph_time([functools.partial(fp8, sm90=False)] * CALLS)
            mma = f" {mma_s * 1e6:.1f} ({mma_s / fp_s:.2f}x)"
        # where the layer takes the FP8 kernel's 256-position tiles: the same on 128
        if K.arch == "sm_90a" and lr.moe_block_m(t, EXPERTS, TOP_K, True, True) == 256:
            rows, lr.MOE_WG8_M256_ROWS = lr.MOE_WG8_M256_ROWS, 1 << 62
            try:
                n_s = graph_time([fp8] * CALLS)
            finally:
                lr.MOE_WG8_M256_ROWS = rows
            narrow = f" {n_s * 1e6:.1f} ({n_s / fp_s:.2f}x)"
        lines.append(f"| {t} | {chosen} | {bf_s * 1e6:.1f} | {fp_s * 1e6:.1f} | "
                     f"{bf_s / fp_s:.2f}x | {w_bytes / 1e6:.0f} | "
                     f"{w_bytes / fp_s / DATASHEET_BW:.0%} | {diff:.1e} |{mma or ' -'} |"
                     f"{narrow or ' -'} |")
        print(lines[-1], flush=True)
    return lines


def torch_layer(x, gate_up, down, ids, wts):
    """The routed layer with host-side grouping: one thunk, its index lists precomputed."""
    rows = [(e, (ids == e).any(-1).nonzero().flatten()) for e in range(EXPERTS)]
    rows = [(e, r, (wts * (ids == e)).sum(-1)[r].float()) for e, r in rows if len(r)]
    out = torch.empty_like(x)

    def fn():
        acc = torch.zeros(x.shape, device="cuda", dtype=torch.float32)
        for e, r, w in rows:
            gu = x[r] @ gate_up[e].t()
            act = torch.nn.functional.silu(gu[:, :INTER]) * gu[:, INTER:]
            acc.index_add_(0, r, (act @ down[e].t()).float() * w[:, None])
        out.copy_(acc)
    return fn, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="also write the markdown table to this file")
    ap.add_argument("--sweep", action="store_true", help="time other GEMM shapes too")
    ap.add_argument("--sweep-wgmma", action="store_true",
                    help="time other shapes of the wgmma GEMM only (sm_90a)")
    ap.add_argument("--fp8-block", action="store_true",
                    help="also time the layer over E4M3 experts in blocks of 128")
    ap.add_argument("--model", choices=MODELS, default="mixtral-8x7b",
                    help="the shapes (default: Mixtral-8x7B's)")
    ap.add_argument("--tokens", type=int, nargs="+", default=TOKENS,
                    help=f"the step sizes T (default: {' '.join(map(str, TOKENS))})")
    args = ap.parse_args()
    global HIDDEN, INTER, EXPERTS, TOP_K
    HIDDEN, INTER, EXPERTS, TOP_K = MODELS[args.model]
    t0 = time.perf_counter()
    torch.manual_seed(0)
    K = Kernels()
    bf = torch.bfloat16
    gate_up = torch.randn(EXPERTS, 2 * INTER, HIDDEN, device="cuda", dtype=bf) * HIDDEN ** -0.5
    down = torch.randn(EXPERTS, HIDDEN, INTER, device="cuda", dtype=bf) * INTER ** -0.5
    stream = lambda: torch.cuda.current_stream().cuda_stream  # noqa: E731  the capture's
    sweep = sweep_functions(K) if args.sweep or args.sweep_wgmma else None
    rows, sweep_rows = [], []
    for t in args.tokens:
        x = torch.randn(t, HIDDEN, device="cuda", dtype=bf)
        logits = torch.randn(t, EXPERTS, device="cuda", dtype=bf)
        out, parts = K.moe(x, logits, gate_up, down, TOP_K, True)
        ids, wts, perm, meta = parts["ids"], parts["wts"], parts["perm"], parts["meta"]
        act, y = parts["act"], parts["y"]
        chosen = len(ids.unique())
        w_bytes = chosen * 3 * HIDDEN * INTER * 2
        flops = 2 * t * TOP_K * 3 * HIDDEN * INTER
        dt, wg = "bfloat16", K.arch == "sm_90a"
        # the two GEMMs' (Launch, args) pairs on wgmma or not, each over its own tiles (the
        # mma.sync kernel's grouped by a routing run of its own, outside the timing)
        metas = {wg: meta}
        if wg:
            metas[False] = K.moe_route(logits, TOP_K, True, sm90=False)[4]
        gemms = {sm90: {
            "gate_up": [(lr.moe_gemm_launch(t, EXPERTS, TOP_K, INTER, HIDDEN, dt, True,
                                            sm90=sm90),
                         [x, gate_up, perm, metas[sm90], EXPERTS, INTER, HIDDEN, act])],
            "down": [(lr.moe_gemm_launch(t, EXPERTS, TOP_K, HIDDEN, INTER, dt, False,
                                         sm90=sm90),
                      [act, down, DevPtr(0), metas[sm90], EXPERTS, HIDDEN, INTER, y])]}
            for sm90 in metas}
        launches = {   # each part's (Launch, args) pairs
            "route": lr.moe_route_launches(t, EXPERTS, TOP_K, dt, True, logits, ids, wts,
                                           parts["pos_of"], perm, meta, sm90=wg),
            **gemms[wg],
            "combine": [(lr.moe_combine_launch(t, HIDDEN, TOP_K, dt),
                         [y, parts["pos_of"], wts, DevPtr(0), DevPtr(0), t, HIDDEN, TOP_K,
                          out])],
        }

        def thunk(name, launches=launches):
            def run():
                for ln, a in launches[name]:
                    K.functions.launch(ln, a, stream())
            return run

        steps = [thunk(name) for name in launches]

        def layer(steps=steps):
            for f in steps:
                f()

        parts_s = {name: graph_time([thunk(name)] * CALLS) for name in launches}
        # many routed rows: the grouping over a grid; its one-CTA walk timed beside
        one_cta = lr.moe_route_launches(t, EXPERTS, TOP_K, dt, True, logits, ids, wts,
                                        parts["pos_of"], perm, meta, sm90=wg, grid=False)
        if len(one_cta) != len(launches["route"]):
            parts_s["route_one_cta"] = graph_time([thunk("route", {"route": one_cta})] * CALLS)
        # sm_90a, past the 8-row kernel: both GEMMs on mma.sync too (the tiled kernel)
        mma_s = None
        if wg and gemms[True]["down"][0][0].kernel != gemms[False]["down"][0][0].kernel:
            def mma(g=gemms[False]):
                for ln, a in g["gate_up"] + g["down"]:
                    K.functions.launch(ln, a, stream())
            mma_s = graph_time([mma] * CALLS)
        layer_s = graph_time([layer] * CALLS)
        ref_fn, ref_out = torch_layer(x, gate_up, down, ids, wts)
        torch_s = graph_time([ref_fn] * CALLS)
        out_now, _ = K.moe(x, logits, gate_up, down, TOP_K, True)
        ref_fn()
        torch.cuda.synchronize()
        diff = ((out_now.float() - ref_out.float()).abs().max()
                / ref_out.float().abs().max()).item()
        rows.append((t, chosen, w_bytes, layer_s, parts_s, torch_s, flops, diff, mma_s))
        if sweep:
            sweep_rows += sweep_step(K, sweep, t, x, logits, gate_up, down, chosen, stream,
                                     args.sweep_wgmma)
        print(f"T={t}: {layer_s * 1e6:.1f} us, {w_bytes / layer_s / DATASHEET_BW:.0%} of HBM",
              flush=True)

    lines = [
        f"## The cuda backend's MoE layer (plugins/kernels/moe.cu): {args.model} shapes, bf16",
        "",
        f"{torch.cuda.get_device_name()}; torch {torch.__version__} (CUDA {torch.version.cuda})"
        f", NVRTC {'.'.join(map(str, compiler.nvrtc_version()))}",
        "",
        f"hidden {HIDDEN}, {EXPERTS} experts of width {INTER}, top-{TOP_K} renormalised; "
        f"random logits; CUDA graph of {CALLS} layers, median of {REPS} replays. Weight "
        "bytes: the chosen experts' gate, up and down (3 H I x 2 bytes each); HBM = those "
        f"bytes / time against {DATASHEET_BW / 1e12:.2f} TB/s. torch: per-expert cuBLAS with "
        "the routing grouped on the host beforehand (not timed).",
        "",
        "| T | experts read | weight MB | layer us | HBM | TFLOP/s | route us | gate-up us "
        "| down us | combine us | torch us | max rel diff | GEMMs on mma.sync us (x) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t, chosen, w_bytes, layer_s, p, torch_s, flops, diff, mma_s in rows:
        both = p["gate_up"] + p["down"]
        lines.append(
            f"| {t} | {chosen} | {w_bytes / 1e6:.0f} | {layer_s * 1e6:.1f} | "
            f"{w_bytes / layer_s / DATASHEET_BW:.0%} | {flops / layer_s / 1e12:.1f} | "
            f"{p['route'] * 1e6:.1f}"
            + (f" ({p['route_one_cta'] * 1e6:.1f} on one CTA)" if "route_one_cta" in p else "")
            + f" | {p['gate_up'] * 1e6:.1f} | {p['down'] * 1e6:.1f} | "
            f"{p['combine'] * 1e6:.1f} | {torch_s * 1e6:.1f} | {diff:.1e} | "
            + (f"{mma_s * 1e6:.1f} ({mma_s / both:.2f}x) |" if mma_s else "- |"))
    if sweep_rows:
        tiled = (f"wgmma m64 for T k <= {lr.MOE_WG_M64_ROWS} E, wgmma m128 past that"
                 if K.arch == "sm_90a" else
                 f"tiled m64 for T < {lr.MOE_M128_FROM}, tiled m128 from there")
        lines += ["", "Grouped-GEMM shapes (--sweep; shipped: m8 register 1 x 8 U2 for T <= 8 "
                  f"or T k <= {lr.MOE_M8_ROWS} E, else {tiled}): HBM = the "
                  "chosen experts' gate-up or down bytes / time, TFLOP/s of both GEMMs", "",
                  "| T | kernel | gate-up us | HBM | down us | HBM | TFLOP/s |",
                  "|---|---|---|---|---|---|---|"]
        for t, label, gu_s, down_s, chosen in sweep_rows:
            gu_b, down_b = chosen * 2 * INTER * HIDDEN * 2, chosen * INTER * HIDDEN * 2
            flops = 2 * t * TOP_K * 3 * HIDDEN * INTER
            lines.append(f"| {t} | {label} | {gu_s * 1e6:.1f} | "
                         f"{gu_b / gu_s / DATASHEET_BW:.0%} | {down_s * 1e6:.1f} | "
                         f"{down_b / down_s / DATASHEET_BW:.0%} | "
                         f"{flops / (gu_s + down_s) / 1e12:.0f} |")
    if args.fp8_block:
        lines += fp8_block_rows(K, gate_up, down, args.tokens)
    lines += ["", f"({time.perf_counter() - t0:.0f} s)"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
