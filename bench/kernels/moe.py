"""Benchmark the cuda backend's mixture-of-experts layer (plugins/kernels/moe.cu) on
Mixtral-8x7B's shapes (hidden 4096, 8 experts of width 14336, top-2), bf16, against the bytes
of the routed experts' weights at the HBM datasheet bandwidth (3.35 TB/s, H100 SXM).

    PYTHONPATH=<llmc checkout paths> python3 bench/kernels/moe.py [--out results.md]

The layer is what the backend's moe op launches, from the router's logits to the combined
output: routing + grouping (one CTA), the grouped gate-up GEMM with SwiGLU fused, the
grouped down GEMM, the weighted combine. For T = 1, 8, 64 and 512 tokens with random
logits (so random routing), it reports:
- the layer's time (a CUDA graph of CALLS layers, median of REPS replays, as
  bench/kernels/gemm.py times), and each kernel's on its own;
- the routed experts' weight bytes (3 H I 2 bytes for each expert the step's tokens chose,
  which is all a decode step reads) over that time, against 3.35 TB/s, and TFLOP/s;
- the same layer in PyTorch with the routing known on the host (an ideal per-expert
  cuBLAS loop: x rows gathered, gate-up, SwiGLU, down, weighted index_add; captured with
  the index lists precomputed, so none of its host work is timed), and the largest
  difference between the two outputs.
"""
from __future__ import annotations

import argparse
import time

import torch
from gemm import CALLS, DATASHEET_BW, REPS, graph_time

from llmc.plugins import compiler
from llmc.plugins import launch_rules as lr
from llmc.plugins.launch import DevPtr, Kernels

HIDDEN, INTER, EXPERTS, TOP_K = 4096, 14336, 8, 2
TOKENS = (1, 8, 64, 512)


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
    args = ap.parse_args()
    t0 = time.perf_counter()
    torch.manual_seed(0)
    K = Kernels()
    bf = torch.bfloat16
    gate_up = torch.randn(EXPERTS, 2 * INTER, HIDDEN, device="cuda", dtype=bf) * HIDDEN ** -0.5
    down = torch.randn(EXPERTS, HIDDEN, INTER, device="cuda", dtype=bf) * INTER ** -0.5
    stream = lambda: torch.cuda.current_stream().cuda_stream  # noqa: E731  the capture's
    rows = []
    for t in TOKENS:
        x = torch.randn(t, HIDDEN, device="cuda", dtype=bf)
        logits = torch.randn(t, EXPERTS, device="cuda", dtype=bf)
        out, parts = K.moe(x, logits, gate_up, down, TOP_K, True)
        ids, wts, perm, meta = parts["ids"], parts["wts"], parts["perm"], parts["meta"]
        act, y = parts["act"], parts["y"]
        chosen = len(ids.unique())
        w_bytes = chosen * 3 * HIDDEN * INTER * 2
        flops = 2 * t * TOP_K * 3 * HIDDEN * INTER
        dt = "bfloat16"
        launches = {
            "route": (lr.moe_route_launch(t, EXPERTS, TOP_K, dt),
                      [logits, t, EXPERTS, TOP_K, 1, lr.moe_block_m(t), ids, wts,
                       parts["pos_of"], perm, meta]),
            "gate_up": (lr.moe_gemm_launch(t, EXPERTS, TOP_K, INTER, HIDDEN, dt, True),
                        [x, gate_up, perm, meta, EXPERTS, INTER, HIDDEN, act]),
            "down": (lr.moe_gemm_launch(t, EXPERTS, TOP_K, HIDDEN, INTER, dt, False),
                     [act, down, DevPtr(0), meta, EXPERTS, HIDDEN, INTER, y]),
            "combine": (lr.moe_combine_launch(t, HIDDEN, TOP_K, dt),
                        [y, parts["pos_of"], wts, DevPtr(0), DevPtr(0), t, HIDDEN, TOP_K,
                         out]),
        }

        def thunk(name, launches=launches):
            ln, a = launches[name]
            return lambda: K.functions.launch(ln, a, stream())

        steps = [thunk(name) for name in launches]

        def layer(steps=steps):
            for f in steps:
                f()

        parts_s = {name: graph_time([thunk(name)] * CALLS) for name in launches}
        layer_s = graph_time([layer] * CALLS)
        ref_fn, ref_out = torch_layer(x, gate_up, down, ids, wts)
        torch_s = graph_time([ref_fn] * CALLS)
        out_now, _ = K.moe(x, logits, gate_up, down, TOP_K, True)
        ref_fn()
        torch.cuda.synchronize()
        diff = ((out_now.float() - ref_out.float()).abs().max()
                / ref_out.float().abs().max()).item()
        rows.append((t, chosen, w_bytes, layer_s, parts_s, torch_s, flops, diff))
        print(f"T={t}: {layer_s * 1e6:.1f} us, {w_bytes / layer_s / DATASHEET_BW:.0%} of HBM",
              flush=True)

    lines = [
        "## The cuda backend's MoE layer (plugins/kernels/moe.cu): Mixtral-8x7B shapes, bf16",
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
        "| down us | combine us | torch us | max rel diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t, chosen, w_bytes, layer_s, p, torch_s, flops, diff in rows:
        lines.append(
            f"| {t} | {chosen} | {w_bytes / 1e6:.0f} | {layer_s * 1e6:.1f} | "
            f"{w_bytes / layer_s / DATASHEET_BW:.0%} | {flops / layer_s / 1e12:.1f} | "
            f"{p['route'] * 1e6:.1f} | {p['gate_up'] * 1e6:.1f} | {p['down'] * 1e6:.1f} | "
            f"{p['combine'] * 1e6:.1f} | {torch_s * 1e6:.1f} | {diff:.1e} |")
    lines += ["", f"({time.perf_counter() - t0:.0f} s)"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
