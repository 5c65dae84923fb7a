"""Launch rules of the norm, activation, skinny-GEMM, RoPE, glue, sampling and mixture-of-experts
kernels: entry
point, grid, block, output shapes, and how float attributes travel as kernel arguments.

Plain shape arithmetic, so it runs (and is tested) without a GPU or TensorRT; the TensorRT
glue (trt_plugin.py) and the GPU launcher (launch.py) only call these functions. Kernel entry
points are named <op>_<dtype>[_v<vec>|_d<head_dim>] inside a kernels/<module>.cu.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass

DTYPES = {"float16": "f16", "bfloat16": "bf16"}
MAX_NORM_WIDTH = 32 * 1024  # 1024 threads x 32 register-resident elements
INT32_MAX = 2**31 - 1  # kernels index with int32 scalars; grid.x holds as many blocks


@dataclass(frozen=True)
class Launch:
    module: str
    kernel: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    smem: int = 0
    pdl: bool = False   # may start before the previous kernel ends (it waits on its own)


def dtype_tag(dtype: str) -> str:
    """The entry-point suffix of a dtype ("bfloat16" -> "bf16")."""
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; plugins take {sorted(DTYPES)}")
    return DTYPES[dtype]


def round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def float_bits(x: float) -> int:
    """fp32 attributes (eps, scale) travel to kernels as int32 bit patterns: TensorRT's
    ahead-of-time plugins pass only integer scalars."""
    return struct.unpack("<i", struct.pack("<f", x))[0]


# ---- (residual +) RMSNorm / LayerNorm -----------------------------------------------------

def norm_output_shapes(x_shape, residual: bool):
    """Outputs: normalized x, and (with a residual input) the sum x + residual."""
    shape = tuple(x_shape)
    return [shape, shape] if residual else [shape]


def norm_launch(rows: int, n: int, dtype: str, kind: str = "rmsnorm",
                residual: bool = False) -> Launch:
    if kind not in ("rmsnorm", "layernorm"):
        raise ValueError(f"norm kind {kind!r}")
    if not 0 < n <= MAX_NORM_WIDTH:
        raise ValueError(f"hidden size {n} outside 1..{MAX_NORM_WIDTH}")
    vec = 8 if n % 8 == 0 else 1
    chunks = n // vec
    per_thread = 32 // vec
    # Two chunks a thread keeps enough loads in flight; never exceed 1024 threads.
    threads = min(1024, max(32, round_up(math.ceil(chunks / 2), 32)))
    threads = max(threads, round_up(math.ceil(chunks / per_thread), 32))
    name = ("add_" if residual else "") + f"{kind}_{dtype_tag(dtype)}_v{vec}"
    return Launch("norm", name, (rows, 1, 1), (threads, 1, 1))


# ---- skinny GEMM (decode) ------------------------------------------------------------------

GEMV_MS = (1, 2, 8)               # the M a kernel is compiled for; m rows take the next one
GEMV_ROWS = {1: 1, 2: 2}          # weight rows a warp (GEMV_R<M> in kernels/gemv.cu)
GEMV_WARPS = 4                    # warps a block (__launch_bounds__(128))
GEMV_TC_MS = (8,)                 # tensor-core kernels (tc_gemv): 16 weight rows a CTA
GEMV_TC_WARPS = 16                # warps splitting K in a CTA (GEMV_TC_SK)
# Past GEMV_TC_WIDE_TILES tiles an SM, _wide (3 CTAs an SM) up to one more, where it puts the
# GEMM in one wave; past that _w32. Warps a CTA by variant, as kernels/gemv.cu compiles them
# (the sweep of bench/kernels/gemv.py on the H100: bench/results/gemv.md).
GEMV_TC_WIDE_TILES = 2
GEMV_TC_VARIANT_WARPS = {"": GEMV_TC_WARPS, "_wide": 8, "_w32": 32}
GEMV_ACTS = ("swiglu", "geglu")


def _out_tags(what: str, dtype: str, out_dtype: str | None, act: str | None
              ) -> tuple[str, str]:
    """(the dtype's entry suffix, the output's) of a GEMV or GEMM that writes dtype or fp32
    and fuses a gated activation only into a dtype output."""
    tag = dtype_tag(dtype)
    out = tag if out_dtype in (None, dtype) else "f32" if out_dtype == "float32" else None
    if out is None:
        raise ValueError(f"{what} writes {dtype} or float32, not {out_dtype}")
    if act is not None and (act not in GEMV_ACTS or out != tag):
        raise ValueError(f"{what} fuses {' or '.join(GEMV_ACTS)} with a {dtype} output only")
    return tag, out


def gemv_launch(m: int, n: int, k: int, dtype: str, out_dtype: str | None = None,
                act: str | None = None, sm_count: int = 0) -> Launch:
    """y[m, n] = x[m, k] @ w[n, k]^T (+ bias[n]) for m <= 8, w stored [N, K]; with act, w is
    the fused [2n, k] gate-up weight and y = act(gate) * up [m, n]. args (x, w, bias-or-null,
    m, n, k, y); the bias has y's dtype. out_dtype: dtype (default) or float32.
    1-2 rows: CUDA-core dot products, R weight rows a warp; 3-8 rows: tensor cores, 16
    weight rows (8 outputs with act) a CTA, the kernel by the tiles an SM of the sm_count
    (GEMV_TC_WIDE_TILES; unknown sm_count: the plain one)."""
    tag, out = _out_tags("gemv", dtype, out_dtype, act)
    if not 0 < m <= GEMV_MS[-1]:
        raise ValueError(f"gemv takes 1..{GEMV_MS[-1]} rows, not {m}")
    if k % 8 or not 0 < k <= INT32_MAX or not 0 < n * (2 if act else 1) <= INT32_MAX:
        raise ValueError(f"gemv needs K a multiple of 8 (16-byte rows): N={n}, K={k}")
    mb = next(b for b in GEMV_MS if b >= m)
    tiles, variant = math.ceil(n / (8 if act else 16)), ""
    if mb in GEMV_TC_MS and sm_count and tiles > GEMV_TC_WIDE_TILES * sm_count:
        variant = "_wide" if tiles <= (GEMV_TC_WIDE_TILES + 1) * sm_count else "_w32"
    name = f"gemv_{tag}_{out}_m{mb}{variant}" + (f"_{act}" if act else "")
    if mb in GEMV_TC_MS:
        return Launch("gemv", name, (tiles, 1, 1), (32 * GEMV_TC_VARIANT_WARPS[variant], 1, 1),
                      pdl=True)
    per_warp = max(2, GEMV_ROWS[mb]) // 2 if act else GEMV_ROWS[mb]  # gate + up rows
    warps = math.ceil(n / per_warp)
    return Launch("gemv", name, (math.ceil(warps / GEMV_WARPS), 1, 1), (32 * GEMV_WARPS, 1, 1),
                  pdl=True)


# ---- quantized skinny GEMM (decode) and the prefill helpers -----------------------------------

QGEMV_MS = (8, 16)                # x rows a kernel is compiled for (NT = 1, 2 tiles of 8)
QGEMV_WARPS = {("int4", 8): 8, ("int4", 16): 8, ("fp8", 8): 8, ("fp8", 16): 8,
               ("fp8-block", 8): 8, ("fp8-block", 16): 8}
# ^ warps splitting K in a CTA, by kind and compiled M (QGEMV_DTYPE in kernels/qgemv.cu)
QGEMV4_WIDE_TILES = 2             # INT4 up to 8 rows: the _wide kernels (3 CTAs an SM) from
#                                   more tiles an SM than this (the others run 2 an SM)
# FP8: past 2 tiles an SM, _wide (3 CTAs an SM) up to 3 tiles an SM, where it puts the GEMM in
# one wave; past 3, up to 8 rows _w16 (16 warps a CTA, 2 an SM), at 16 rows the plain kernel
# (the sweep of bench/kernels/qgemv.py on the H100: bench/results/qgemv.md)
QGEMV8_WIDE_TILES, QGEMV8_W16_WARPS = 2, 16
QUANTS = ("int4", "fp8", "fp8-block")
FP8B_MIN_GROUP = 32               # FP8 weight-only: a lane's 16 k lie in one block
FP8B_MAX_SCALE = 128.0            # its scales times 2^120 stay finite in bf16 (qgemv_fp8b.cu)
# What an INT4 kernel's last argument holds (kernels/qgemv.cuh: Int4Offsets), and the kernel
# name's infix for it: nothing (symmetric codes u - 8), zero points z [N, K / G] a byte each
# (codes u - z: AutoAWQ, GPTQ), or offsets o [N, K / G] in the compute dtype (codes u - 8, plus
# o a block: a GGUF file's Q4_1)
INT4_OFFSETS = {"none": "", "zero_points": "zp", "offsets": "off"}
INT4_K = 32                       # a lane's 16-byte load holds 32 k of an INT4 row
DQ_WORDS = 4                      # kernels/qgemv.cuh: 8-k words a dequant_int4 thread
# FP8 engines: the decode kernels need E4M3 MMA (sm_89+), the prefill GEMMs cuBLASLt's
# per-channel (outer-vector) FP8 scaling, which NVIDIA documents for Hopper only.
FP8_ARCHS = ("sm_90a",)
# An E4M3 KV pool (--kv-cache-dtype fp8; rope_launch's and attention_plan's e4m3): the E4M3
# conversions (cvt ... e4m3x2) exist from sm_89.
E4M3_ARCHS = ("sm_89", "sm_90a", "sm_100a", "sm_120")
E4M3_NEEDS = ("a GPU of compute capability 8.9 or newer (its kernels convert to and from E4M3 "
              "with instructions sm_89 introduced)")   # the reason, for error messages


INT4_MAX_GROUP = 128 * QGEMV_WARPS["int4", 8]   # a group divides the k between a warp's chunks


def fp8b_group_shift(group: int) -> int:
    """log2 of a block-wise FP8 scale block: a power of two from FP8B_MIN_GROUP."""
    if group < FP8B_MIN_GROUP or group & (group - 1):
        raise ValueError(f"block-wise FP8 takes blocks of a power of two from "
                         f"{FP8B_MIN_GROUP}, not {group}")
    return group.bit_length() - 1


def int4_group_shift(group: int) -> int:
    """log2 of an INT4 scale group: the kernels take groups of 2^s weights, 32 <= 2^s <= 1024."""
    if group < INT4_K or group > INT4_MAX_GROUP or group & (group - 1):
        raise ValueError(f"INT4 groups of {group}: the kernels take powers of two from {INT4_K} "
                         f"to {INT4_MAX_GROUP}")
    return group.bit_length() - 1


def qgemv_launch(m: int, n: int, k: int, dtype: str, quant: str, out_dtype: str | None = None,
                 act: str | None = None, group: int = 0, sm_count: int = 0,
                 offsets: str = "none") -> Launch:
    """y[m, n] = x[m, k] @ dequant(w)^T for m <= 16 on a packed weight (kernels/qgemv.cu);
    with act, w is the fused [2n, k] gate-up weight and y = act(gate) * up.
    int4 args: (x, w, scale, pre-or-null, bias-or-null, m, n, k, int4_group_shift(group), y),
    the kernel with chunk scales (_cs) when the group is a multiple of 128, y (and the bias)
    in fp32 with out_dtype float32 (_f32, without act); offsets (INT4_OFFSETS) "zero_points":
    the w4zp kernel of kernels/qgemv_zp.cu, whose args end with the zero points [N, K / G]
    (u8); "offsets": its w4off kernel, whose args end with the offsets [N, K / G] (dtype;
    codes u - 8);
    fp8 args: (x, w, x_scale * w_scale f32 [N], float_bits(x_scale), bias-or-null, m, n, k,
    y, first-or-null: int32 [m], a sequence's first token's rows nonzero, rounded with scales
    of their own: --fp8-first-token dynamic); fp8-block args (kernels/qgemv_fp8b.cu): (x, w,
    scale [N, K / G], bias-or-null, m, n, k, fp8b_group_shift(group), y), CTAs as FP8's.
    16 weight rows (8 outputs with act) a CTA of QGEMV_WARPS[quant, M] warps; for INT4 up to 8
    rows, the _wide kernel when the GEMM has more than QGEMV4_WIDE_TILES tiles an SM of the
    sm_count; for FP8, _wide or _w16 by the tiles an SM (QGEMV8_WIDE_TILES). Unknown sm_count:
    neither."""
    if quant not in QUANTS:
        raise ValueError(f"quantized gemv takes {' or '.join(QUANTS)}, not {quant!r}")
    tag, out = _out_tags(f"{quant} gemv", dtype, out_dtype, act)
    if not 0 < m <= QGEMV_MS[-1]:
        raise ValueError(f"quantized gemv takes 1..{QGEMV_MS[-1]} rows, not {m}")
    align = {"int4": INT4_K, "fp8-block": FP8B_MIN_GROUP}.get(quant, 16)
    if k % align or not 0 < k <= INT32_MAX or not 0 < n * (2 if act else 1) <= INT32_MAX:
        raise ValueError(f"{quant} gemv needs K a multiple of {align}: N={n}, K={k}")
    mb = next(b for b in QGEMV_MS if b >= m)
    tiles = math.ceil(n / (8 if act else 16))
    kind = _int4_kind(offsets)
    if kind and quant != "int4":
        raise ValueError(f"zero points and offsets are INT4's, not {quant}'s")
    if quant == "int4":
        int4_group_shift(group)
        cs = group % 128 == 0 and offsets != "offsets"   # offsets join each pair's dequantization
        # (the zero-point or offset kernel without chunk scales does not fit the wide
        # kernel's 80 registers: it would spill)
        wide = mb == 8 and sm_count and tiles > QGEMV4_WIDE_TILES * sm_count and \
            (cs or not kind)
        name = f"w4{kind}_{tag}_m{mb}" \
               f"{'_wide' if wide else ''}{'_cs' if cs else ''}{'_f32' if out == 'f32' else ''}"
        warps = QGEMV_WARPS[quant, mb]
    else:
        many = sm_count and tiles > QGEMV8_WIDE_TILES * sm_count
        variant = "" if not many else \
            "_wide" if tiles <= (QGEMV8_WIDE_TILES + 1) * sm_count else "_w16" if mb == 8 else ""
        warps = QGEMV8_W16_WARPS if variant == "_w16" else QGEMV_WARPS[quant, mb]
        if quant == "fp8-block":
            fp8b_group_shift(group)
        name = f"{'w8b' if quant == 'fp8-block' else 'w8'}_{tag}_{out}_m{mb}{variant}"
    name += f"_{act}" if act else ""
    module = "qgemv_zp" if kind else "qgemv_fp8b" if quant == "fp8-block" else "qgemv"
    return Launch(module, name, (tiles, 1, 1), (32 * warps, 1, 1), pdl=True)


def _int4_kind(offsets: str) -> str:
    """The INT4 kernels' name infix for what their last argument holds (INT4_OFFSETS)."""
    if offsets not in INT4_OFFSETS:
        raise ValueError(f"INT4 offsets are one of {', '.join(INT4_OFFSETS)}, not {offsets!r}")
    return INT4_OFFSETS[offsets]


# The INT4 small-M GEMM (kernels/qgemv.cuh: w4_gemm) runs steps of QGEMV_MS[-1] + 1 to
# W4_GEMM_MAX_M rows; larger ones dequantize the weight for cuBLASLt (a layer's four GEMMs
# tie at 128 rows on the H100, qkv and o alone cross at about 64: bench/results/qgemv.md).
# A CTA: W4G_WARPS warps of 16 weight rows, W4G_TILES tiles of 8 x rows, W4G_STAGES x stages
# (kernels/qgemv.cuh: W4G_CONFIG). A GEMM whose tiles give fewer than W4G_AIM warps an SM
# splits K over more CTAs (at most W4G_MAX_SPLITS, each at least 2 chunks of 128).
W4_GEMM_MAX_M = 128
W4G_WARPS, W4G_TILES, W4G_STAGES = 8, 4, 3
W4G_AIM = 32
W4G_MAX_SPLITS = 8
# On sm_90a, steps of more than 32 rows run the same CTA with its MMAs as wgmma (the w4gw
# entries, kernels/qgemv.cuh: W4GW_CONFIG): it takes the fewer of W4GW_ROWS x rows that hold
# the step (the last past them), with W4GW_STAGES of them in shared memory. At 17-32 rows the
# mma.sync kernel is as fast or faster (bench/results/qgemv.md). Its K splits aim for
# W4GW_AIM warps an SM, half the mma.sync kernel's: fewer splits of its larger tiles (Llama's
# qkv 6, not 8; the gate-up 1, not 2) ran 1.15-1.24x faster at 128 rows on the H100.
W4GW_MIN_M = 33
W4GW_ROWS = (64, 128)
W4GW_STAGES = {64: 4, 128: 3}
W4GW_AIM = 16


def w4_gemm_launch(m: int, n: int, k: int, dtype: str, out_dtype: str | None = None,
                   act: str | None = None, group: int = 0, sm_count: int = 0,
                   offsets: str = "none", sm90: bool = False) -> Launch:
    """y[m, n] = x[m, k] @ dequant(w)^T on the packed INT4 weight for any m (the backend runs it
    for QGEMV_MS[-1] < m <= W4_GEMM_MAX_M). args: qgemv_launch's int4 ones, then the split-K
    partials and the tile counters (w4_gemm_scratch says how big; the counters zero before
    the first launch, each launch leaves them zero), then the zero points or offsets as
    qgemv_launch's (kernels/qgemv_zp.cu). Grid: (x tiles, weight tiles, K
    splits), the splits from sm_count (unknown: none). sm90: the wgmma kernel (sm_90a) for
    m >= W4GW_MIN_M."""
    tag, out = _out_tags("int4 gemm", dtype, out_dtype, act)
    if k % INT4_K or not 0 < k <= INT32_MAX or not 0 < n * (2 if act else 1) <= INT32_MAX \
            or m <= 0:
        raise ValueError(f"int4 gemm needs K a multiple of {INT4_K}: M={m}, N={n}, K={k}")
    int4_group_shift(group)
    kind = _int4_kind(offsets)
    suffix = f"{'_f32' if out == 'f32' else ''}{f'_{act}' if act else ''}"
    wgmma = sm90 and m >= W4GW_MIN_M
    if wgmma:
        rows = w4gw_rows(m)
        name, smem = f"w4gw{kind}_{tag}_x{rows}{suffix}", w4gw_smem(rows, W4GW_STAGES[rows])
    else:
        rows = 8 * W4G_TILES
        name, smem = f"w4g{kind}_{tag}{suffix}", w4g_smem(W4G_TILES, W4G_STAGES)
    grid = (math.ceil(m / rows), math.ceil(math.ceil(n / (8 if act else 16)) / W4G_WARPS))
    splits = w4g_splits(grid[0] * grid[1] * W4G_WARPS, k, sm_count, W4GW_AIM if wgmma else 0)
    return Launch("qgemv_zp" if kind else "qgemv", name, (*grid, splits),
                  (32 * W4G_WARPS, 1, 1), smem=smem, pdl=True)


def w4g_smem(tiles: int, stages: int) -> int:
    """A w4_gemm CTA's shared memory: each stage holds x's rows and AWQ's pre for 128 k."""
    return stages * (8 * tiles + 1) * 128 * 2


def w4gw_rows(m: int) -> int:
    """The wgmma kernel's x rows a CTA for a step of m rows: the fewest that hold it."""
    return next((r for r in W4GW_ROWS if r >= m), W4GW_ROWS[-1])


def w4gw_smem(rows: int, stages: int) -> int:
    """The wgmma kernel's: each stage holds x's rows for 128 k, from a 1024-byte boundary."""
    return stages * rows * 128 * 2 + 1024


def w4g_splits(warps: int, k: int, sm_count: int, aim: int = 0) -> int:
    """K splits of a w4_gemm grid of `warps` warps: up to W4G_AIM (aim) an SM."""
    return max(1, min(math.ceil((aim or W4G_AIM) * sm_count / warps), W4G_MAX_SPLITS,
                      math.ceil(k / 128) // 2))


def w4_gemm_scratch(launch: Launch, m: int, n: int, act: str | None) -> tuple[int, int]:
    """(bytes of split-K partials, tile counters) a w4_gemm launch needs: none unsplit."""
    if launch.grid[2] == 1:
        return 0, 0
    return launch.grid[2] * m * n * (2 if act else 1) * 4, launch.grid[0] * launch.grid[1]


def dequant_int4_launch(n: int, k: int, dtype: str, offsets: str = "none") -> Launch:
    """The packed INT4 weight [n, k] back to dtype, for a prefill GEMM. args (w, scale,
    pre-or-null, n, k, int4_group_shift(group), out [n, k]), then the zero points or offsets
    as qgemv_launch's (kernels/qgemv_zp.cu)."""
    if k % INT4_K or n * k >= INT32_MAX:
        raise ValueError(f"dequant_int4 needs K a multiple of {INT4_K}: N={n}, K={k}")
    kind = _int4_kind(offsets)
    return Launch("qgemv_zp" if kind else "qgemv",
                  f"dequant_int4{'_' + kind if kind else ''}_{dtype_tag(dtype)}",
                  (math.ceil(n * k // 8 / (256 * DQ_WORDS)), 1, 1), (256, 1, 1))


def dequant_fp8b_launch(n: int, k: int, dtype: str) -> Launch:
    """A block-wise FP8 weight [n, k] back to dtype, for a prefill GEMM
    (kernels/qgemv_fp8b.cu). args (w, scale [n, k / G], n, k, fp8b_group_shift(group), out
    [n, k]); 16 weights a thread."""
    if k % FP8B_MIN_GROUP or not 0 < n * k < INT32_MAX:   # a thread's 16 k in one row
        raise ValueError(f"dequant_fp8b needs K a multiple of {FP8B_MIN_GROUP}: N={n}, K={k}")
    return Launch("qgemv_fp8b", f"dequant_fp8b_{dtype_tag(dtype)}",
                  (math.ceil(n * k // 16 / 256), 1, 1), (256, 1, 1))


def quantize_fp8_launch(count: int, dtype: str) -> Launch:
    """x (count values, 16-byte aligned) -> e4m3, for a prefill FP8 GEMM. args (x,
    float_bits(x_scale), count, out)."""
    if count % 8 or not 0 < count <= INT32_MAX:
        raise ValueError(f"quantize_fp8 takes a multiple of 8 values, not {count}")
    return Launch("qgemv", f"quantize_fp8_{dtype_tag(dtype)}",
                  (math.ceil(count // 8 / 256), 1, 1), (256, 1, 1))


def quantize_fp8_rows_launch(rows: int, k: int, dtype: str) -> Launch:
    """x [rows, k] -> e4m3 a CTA a row, the rows flagged in `first` (int32 [rows]: a
    sequence's first tokens) with scales of their own, and row_scale (fp32 [rows]) their scale
    over x_scale (1 for the others): cuBLASLt's per-row x scales. args (x,
    float_bits(x_scale), k, first, out, row_scale)."""
    if k % 8 or not 0 < k <= INT32_MAX or not 0 < rows <= INT32_MAX:
        raise ValueError(f"quantize_fp8_rows takes rows of a multiple of 8 values, not {k}")
    return Launch("qgemv", f"quantize_fp8_rows_{dtype_tag(dtype)}", (rows, 1, 1),
                  (min(256, round_up(k // 8, 32)), 1, 1))


# ---- gated activations and GELU ----------------------------------------------------------

def gated_output_shape(gu_shape):
    *lead, two_i = gu_shape
    if two_i % 2:
        raise ValueError(f"gate-up width {two_i} is odd")
    return (*lead, two_i // 2)


def _stream_grid(chunks: int, sm_count: int, threads: int = 256) -> int:
    # Enough blocks for ~8 resident per SM; the grid-stride loop covers the rest.
    return max(1, min(math.ceil(chunks / threads), sm_count * 8))


def gated_launch(rows: int, inter: int, dtype: str, act: str, sm_count: int) -> Launch:
    if act not in ("swiglu", "geglu"):
        raise ValueError(f"gated activation {act!r}")
    vec = 8 if inter % 8 == 0 else 1
    threads = min(256, round_up(inter // vec, 32))
    grid = (rows, math.ceil(inter // vec / threads), 1)
    return Launch("activation", f"{act}_{dtype_tag(dtype)}_v{vec}", grid, (threads, 1, 1))


def swiglu2_launch(rows: int, inter: int, dtype: str) -> Launch:
    """SwiGLU of a gate and an up GEMM output held apart ([rows, inter] each); args (gate, up,
    rows, inter, out)."""
    g = gated_launch(rows, inter, dtype, "swiglu", 1)
    return Launch("activation", g.kernel.replace("swiglu_", "swiglu2_"), g.grid, g.block)


def gelu_launch(n: int, dtype: str, approximate: str, sm_count: int) -> Launch:
    if approximate not in ("tanh", "none"):
        raise ValueError(f"gelu approximate {approximate!r}")
    vec = 8 if n % 8 == 0 else 1
    form = "tanh" if approximate == "tanh" else "erf"
    grid = _stream_grid(n // vec, sm_count)
    return Launch("activation", f"gelu_{form}_{dtype_tag(dtype)}_v{vec}", (grid, 1, 1),
                  (256, 1, 1))


# ---- RoPE (+ QKV bias, + paged cache write) ----------------------------------------------

def rope_output_shapes(qkv_shape, num_q_heads: int, num_kv_heads: int, head_dim: int):
    t, width = qkv_shape
    if width != (num_q_heads + 2 * num_kv_heads) * head_dim:
        raise ValueError(f"qkv width {width} != (Hq + 2*Hkv) * D")
    return [(t, num_q_heads, head_dim), (t, num_kv_heads, head_dim),
            (t, num_kv_heads, head_dim)]


ROPE_PAIRS_PER_CTA = 512


def rope_vector_units(head_dim: int, rotary_dim: int, interleaved: bool) -> int:
    """A thread's share of a head in the RoPE kernels' 16-byte path (kernels/rope.cu:
    rope_vec, rope_units): the head's 8-element units, 0 where the path does not apply and
    a thread takes a pair. Rotate-half needs each half in whole units (rotary_dim % 16)."""
    if head_dim % 8 or rotary_dim % (8 if interleaved else 16):
        return 0
    return head_dim // 8 if interleaved else rotary_dim // 16 + (head_dim - rotary_dim) // 8


def rope_launch(tokens: int, num_q_heads: int, num_kv_heads: int, head_dim: int,
                rotary_dim: int, dtype: str, interleaved: bool = False, bias: bool = False,
                write_cache: bool = False, qk_norm: bool = False, e4m3: bool = False) -> Launch:
    """rotary_dim 0: no rotation (GPT-2's learned positions), the kernel splits q/k/v (and
    writes the cache); its inv_freq argument is not read and may be null.
    qk_norm (Qwen3, Gemma 3): a per-head RMSNorm of q and k before the rotation, in the
    entries that write the cache; each head is whole warps of one pass (head_dim % 64 == 0).
    e4m3: the cache is an E4M3 pool (bytes of x / scale; sm_89+), the K and V scales'
    float_bits after the cache scalars (and the q/k norm's eps)."""
    if e4m3 and not write_cache:
        raise ValueError("the E4M3 rope entries are those that write the cache")
    if head_dim % 2 or rotary_dim % 2 or not 0 <= rotary_dim <= head_dim:
        raise ValueError(f"rotary_dim {rotary_dim} / head_dim {head_dim}")
    if rotary_dim // 2 > 256:
        raise ValueError("rotary_dim > 512")
    if qk_norm and (not write_cache or head_dim % 64 or head_dim // 2 > ROPE_PAIRS_PER_CTA):
        raise ValueError(f"the q/k-norm RoPE kernel writes the cache and takes head_dim a "
                         f"multiple of 64 up to {2 * ROPE_PAIRS_PER_CTA}, not {head_dim}")
    heads = num_q_heads + 2 * num_kv_heads
    # A CTA a token and group of heads, a thread a rotated pair: at batch 1 the 48 heads of
    # Llama-3-8B run as 6 CTAs of 8 heads (one CTA took 7 us on an H100; the cos/sin table
    # is recomputed by each CTA, 64 sincos).
    per_cta = max(1, ROPE_PAIRS_PER_CTA // (head_dim // 2))
    groups = -(-heads // per_cta)
    per_cta = -(-heads // groups)   # the kernel's own split: ceil(heads / gridDim.y)
    # (with qk_norm, per_cta * head_dim / 2 <= ROPE_PAIRS_PER_CTA: a thread for every pair)
    units = (rope_vector_units(head_dim, rotary_dim, interleaved) if not qk_norm else 0
             ) or head_dim // 2
    threads = min(ROPE_PAIRS_PER_CTA, round_up(per_cta * units, 32))
    name = ("rope" + ("_bias" if bias else "") + ("_qknorm" if qk_norm else "")
            + ("_cache" if write_cache else "") + ("_e4m3" if e4m3 else "")
            + ("_interleaved_" if interleaved else "_half_") + dtype_tag(dtype))
    return Launch("rope", name, (tokens, groups, 1), (threads, 1, 1))


def llama3_inv_freq(head_dim: int, rope_theta: float, rotary_dim: int | None = None,
                    rope_scaling: dict | None = None) -> list[float]:
    """inv_freq [rotary_dim/2] for the RoPE kernels, from an HF-style rope_scaling dict: the
    same table the graph uses (llmc.config.rope_inv_freq), llama3 scaling folded in."""
    from llmc.config import rope_inv_freq, rope_settings

    _, scaling = rope_settings({"rope_theta": rope_theta, "rope_scaling": rope_scaling})
    return rope_inv_freq(rotary_dim or head_dim, rope_theta, scaling).tolist()


# ---- glue: embedding, row gather, logits cast -------------------------------------------

def _row_copy_launch(op: str, rows: int, width: int, dtype: str) -> Launch:
    # One row a block on grid.x (up to 2^31 - 1 rows); the block loops over the row's chunks.
    if not 0 < rows <= INT32_MAX or not 0 < width <= INT32_MAX:
        raise ValueError(f"{op}: {rows} rows of width {width}")
    vec = 8 if width % 8 == 0 else 1
    threads = min(256, round_up(width // vec, 32))
    return Launch("glue", f"{op}_{dtype_tag(dtype)}_v{vec}", (rows, 1, 1), (threads, 1, 1))


def embedding_launch(tokens: int, hidden: int, dtype: str, scaled: bool = False) -> Launch:
    """out[t] = table[ids[t]]; args (ids, table, T, H, V, out); ids outside [0, V) give zeros.
    scaled (Gemma's sqrt(hidden)): out[t] = table[ids[t]] * scale, rounded to the dtype;
    args (ids, table, T, H, V, float_bits(scale), out)."""
    return _row_copy_launch("embedding_scale" if scaled else "embedding", tokens, hidden, dtype)


def gather_rows_launch(rows: int, hidden: int, dtype: str) -> Launch:
    """out[b] = x[rows[b]]; args (x, rows, B, H, N, out), N = rows of x."""
    return _row_copy_launch("gather_rows", rows, hidden, dtype)


def cast_launch(n: int, dtype: str, sm_count: int) -> Launch:
    """fp16/bf16 -> fp32 over n elements; args (x, n, out)."""
    if not 0 < n <= INT32_MAX:
        raise ValueError(f"cast of {n} elements")
    vec = 8 if n % 8 == 0 else 1
    grid = _stream_grid(math.ceil(n / vec), sm_count)
    return Launch("glue", f"cast_f32_{dtype_tag(dtype)}_v{vec}", (grid, 1, 1), (256, 1, 1))


def softcap_launch(n: int, sm_count: int) -> Launch:
    """out = cap * tanh(x / cap) over n fp32 logits (Gemma 2's final soft-cap); args (x, n,
    float_bits(cap), out)."""
    if not 0 < n <= INT32_MAX:
        raise ValueError(f"soft-cap of {n} logits")
    return Launch("glue", "softcap_f32", (_stream_grid(n, sm_count), 1, 1), (256, 1, 1))


def add_launch(n: int, dtype: str, sm_count: int) -> Launch:
    """out = a + b over n elements (a residual sum no norm is fused into); args (a, b, n,
    out)."""
    if not 0 < n <= INT32_MAX:
        raise ValueError(f"add of {n} elements")
    vec = 8 if n % 8 == 0 else 1
    grid = _stream_grid(math.ceil(n / vec), sm_count)
    return Launch("glue", f"add_{dtype_tag(dtype)}_v{vec}", (grid, 1, 1), (256, 1, 1))


# ---- sampling ----------------------------------------------------------------------------

MAX_SAMPLE_THREADS = 1024  # SAMPLE_MAX_THREADS in kernels/sampling.cu (its shared scan tile)


def sample_launch(batch: int, vocab: int) -> Launch:
    """One CTA a row of fp32 logits [batch, vocab]; args (logits, temperature, top_k, top_p,
    seed, counter, B, V, token, logprob-or-null), see kernels/sampling.cu."""
    # Token counts are fp32 sums in the kernel: exact up to 2^24.
    if not 0 < batch <= INT32_MAX or not 0 < vocab <= 1 << 24:
        raise ValueError(f"sampling {batch} rows of {vocab} logits")
    # Every pass re-reads the row; a full block keeps enough loads in flight per SM.
    threads = min(MAX_SAMPLE_THREADS, round_up(vocab, 32))
    return Launch("sampling", "sample_f32", (batch, 1, 1), (threads, 1, 1))


def ban_launch(batch: int, vocab: int) -> Launch:
    """A thread a 32-token word of each row's allowed-token bitmask; args (logits, allowed,
    B, V), see kernels/sampling.cu."""
    if not 0 < batch <= 65535 or not 0 < vocab <= INT32_MAX - 31:
        raise ValueError(f"banning tokens of {batch} rows of {vocab} logits")
    words = (vocab + 31) // 32
    threads = min(256, round_up(words, 32))
    return Launch("sampling", "ban_tokens_f32", (math.ceil(words / threads), batch, 1),
                  (threads, 1, 1))


# ---- mixture of experts: routing, grouped GEMMs, combine (kernels/moe.cu) -------------------

MOE_MAX_EXPERTS = 256      # MOE_MAX_EXPERTS in kernels/moe.cu: 8 router logits a lane
MOE_MAX_TOPK = 8           # MOE_MAX_TOPK: a token's picks sorted in registers
MOE_ROUTE_THREADS = 1024   # MOE_ROUTE_THREADS: the routing kernel is one CTA
MOE_TOPK_THREADS = 128     # MOE_TOPK_THREADS: the top-k kernel's CTAs, a warp a token
# positions a GEMM tile (moe_gemm_*_m<BM>) of the decode kernel -> (warps over N, over K)
MOE_GEMM_SHAPES = {8: (1, 8)}
# the tiled kernel (moe_gemm_tc) of larger steps: BM in MOE_TC_BLOCK_M positions x
# MOE_TC_BN weight rows (gate-up: half gate, half up), k steps of MOE_TC_BK; MOE_TC_SHAPE
# (warps over M, warps over N, k steps in flight) as MOE_GEMM_TC instantiates it in moe.cu
MOE_TC_BLOCK_M = (64, 128)
MOE_TC_BN, MOE_TC_BK = 128, 32
MOE_TC_SHAPE = (2, 2, 4)
MOE_TC_THREADS = 32 * MOE_TC_SHAPE[0] * MOE_TC_SHAPE[1]
# the same tiles on sm_90a's warpgroup MMAs (moe_gemm_wg; over FP8 experts moe_gemm_wg8):
# BM / 64 warpgroups, k steps of MOE_WG_BK (a 128-byte line a row); MOE_WG_SHAPES: BM ->
# (weight rows a tile, k steps in shared memory) as MOE_GEMM_WG and MOE_FP8B_GEMM_WG
# instantiate them; MOE_WG8_SHAPES the FP8 kernel's, which also has tiles of 256 positions
# (two warpgroups of 64 weight rows: moe_wg8_threads)
MOE_WG_BK = 64
MOE_WG_SHAPES = {64: (128, 4), 128: (256, 4)}
MOE_WG8_SHAPES = {**MOE_WG_SHAPES, 256: (128, 4)}
MOE_M128_FROM = 129        # tokens from which tiles hold 128 positions (mma.sync)
MOE_WG_M64_ROWS = 64       # routed rows an expert (on average) up to which wgmma tiles hold 64
MOE_WG8_M256_ROWS = 384    # past it, and both GEMMs FP8 on wgmma: tiles of 256 positions
MOE_M8_ROWS = 4            # routed rows an expert (on average) up to which tiles hold 8
MOE_GRID_ROUTE_ROWS = 2048  # routed rows from which the grouping runs over a grid of chunks
MAX_GRID_Y = 65535


def moe_check(experts: int, top_k: int, hidden: int, inter: int) -> None:
    """The shapes the MoE kernels take; a ValueError names the one they do not."""
    if not 1 <= top_k <= min(experts, MOE_MAX_TOPK) or experts > MOE_MAX_EXPERTS:
        raise ValueError(f"the MoE kernels route to top_k <= {MOE_MAX_TOPK} of at most "
                         f"{MOE_MAX_EXPERTS} experts, not top {top_k} of {experts}")
    if hidden % 8 or inter % 8 or hidden <= 0 or inter <= 0:
        raise ValueError(f"the MoE GEMMs need hidden and intermediate sizes that are "
                         f"multiples of 8 (16-byte rows), not {hidden} and {inter}")


def moe_block_m(tokens: int, experts: int, top_k: int, sm90: bool = False,
                fp8b: bool = False) -> int:
    """Positions a grouped-GEMM tile. The 8-row kernel while the experts hold few rows: an
    expert holds at most T, so every step of up to 8 tokens, and any step whose T k routed
    rows average at most MOE_M8_ROWS an expert (Qwen3-30B-A3B's 128 experts, top 8: up to 64
    tokens), where it streams each chosen expert's weights about once at the decode
    kernel's speed and a 64-row tile would multiply mostly empty rows. Larger steps take the
    tiled one, 64 positions a tile while experts hold few rows (little MMA work wasted on a
    tile's empty rows), then 128 (each weight tile read once for twice the rows). sm90 (the
    wgmma kernel): 64 while the routed rows average at most MOE_WG_M64_ROWS an expert, a
    tile's worth, where 128-row tiles would be half empty (bench/results/moe.md). fp8b
    (both of the layer's GEMMs over FP8 experts, on wgmma): 256 past MOE_WG8_M256_ROWS an
    expert, where each weight the FP8 kernel converts feeds twice the positions."""
    if tokens <= 8 or tokens * top_k <= MOE_M8_ROWS * experts:
        return 8
    if sm90:
        if fp8b and tokens * top_k > MOE_WG8_M256_ROWS * experts:
            return 256
        return 64 if tokens * top_k <= MOE_WG_M64_ROWS * experts else 128
    return 64 if tokens < MOE_M128_FROM else 128


def moe_gemm_smem(bm: int, stages: int = MOE_TC_SHAPE[2], fp8b: bool = False) -> int:
    """Dynamic shared memory of the tiled GEMM: `stages` k steps of BM x rows and
    MOE_TC_BN weight rows, MOE_TC_BK halfs each (48 KiB at BM 64, 64 KiB at 128); fp8b:
    the x rows' stages, `stages` of the weights' bytes and two staged 16-bit weight tiles
    (as much at 4 stages)."""
    if fp8b:
        return (stages * bm * 2 + stages * MOE_TC_BN + 2 * MOE_TC_BN * 2) * MOE_TC_BK
    return stages * (bm + MOE_TC_BN) * MOE_TC_BK * 2


def moe_wg8_threads(bm: int) -> int:
    """Threads of the FP8 wgmma GEMM's tiles of bm positions (moe.cuh: moe_wg8_threads): one
    warpgroup at 64, two from 128."""
    return 128 if bm == 64 else 256


def moe_wg_smem(bm: int, bn: int, stages: int, fp8b: bool = False) -> int:
    """Dynamic shared memory of the wgmma GEMM: `stages` k steps of BM x rows and BN weight
    rows, MOE_WG_BK halfs each, and 1 KiB to align them to the swizzle's atoms; fp8b
    (moe.cuh's moe_gemm_wg8): the weights' E4M3 bytes in place of the halfs (129 KiB at
    128 x 256, 161 KiB at 256 x 128, four stages)."""
    return stages * (bm * 2 + bn * (1 if fp8b else 2)) * MOE_WG_BK + 1024


def moe_max_tiles(tokens: int, experts: int, top_k: int, bm: int | None = None) -> int:
    """The most tiles the routing can make for T tokens: with A <= min(E, T k) experts
    chosen, sum over them of ceil(rows_e / BM) <= (T k + A (BM - 1)) / BM, and an expert has
    at most T rows. The GEMMs' tile grid; CTAs past the step's real count leave at once.
    bm: the tile height, moe_block_m unless given (bench/kernels/moe.py --sweep)."""
    bm, rows = bm or moe_block_m(tokens, experts, top_k), tokens * top_k
    active = min(experts, rows)
    return max(1, min((rows + active * (bm - 1)) // bm, active * -(-tokens // bm)))


def moe_meta_ints(experts: int, top_k: int) -> int:
    """int32s a token of the routing's meta buffer (number of tiles, E + 1 offsets, 3 ints a
    tile): 2 + E + 3 (T k + E) <= T (3 k + 4 E + 2) for any T >= 1; the grid grouping's
    counts, E a chunk of MOE_ROUTE_THREADS rows, follow (kernels/moe.cuh: moe_chunk_counts),
    2 + 4 E + 3 T k + E (T k / MOE_ROUTE_THREADS + 1) <= T (3 k + 4 E + 2) for T >= 2."""
    return 3 * top_k + 4 * experts + 2


def moe_route_launch(tokens: int, experts: int, top_k: int, dtype: str) -> Launch:
    """Softmax (fp32) and top-k of the router logits [T, E], the routed rows grouped by
    expert. args (logits, T, E, k, renormalise 0/1, moe_block_m, ids [T, k] i32,
    wts [T, k] f32, pos_of [T, k] i32, perm [T k] i32, meta [T, moe_meta_ints] i32,
    picked 0/1: ids and wts already written by moe_topk_launch's kernel)."""
    moe_check(experts, top_k, 8, 8)
    if not 0 < tokens * moe_meta_ints(experts, top_k) <= INT32_MAX:
        raise ValueError(f"MoE routing of {tokens} tokens")
    # a warp a token for the softmax and top-k; a decode step's CTA stays small
    threads = min(MOE_ROUTE_THREADS, max(128, 32 * tokens))
    return Launch("moe", f"moe_route_{dtype_tag(dtype)}", (1, 1, 1), (threads, 1, 1))


def moe_topk_launch(tokens: int, experts: int, top_k: int, dtype: str) -> Launch:
    """The routing's softmax and top-k alone, a warp a token over a grid. args (logits, T, E,
    k, renormalise 0/1, ids [T, k] i32, wts [T, k] f32)."""
    moe_check(experts, top_k, 8, 8)
    per_cta = MOE_TOPK_THREADS // 32
    return Launch("moe", f"moe_topk_{dtype_tag(dtype)}", (-(-tokens // per_cta), 1, 1),
                  (MOE_TOPK_THREADS, 1, 1))


def moe_route_launches(tokens: int, experts: int, top_k: int, dtype: str, renormalise: bool,
                       logits, ids, wts, pos_of, perm, meta, bm: int | None = None,
                       sm90: bool = False, grid: bool = True,
                       fp8b: bool = False) -> list[tuple]:
    """The routing of a step as (Launch, args) pairs, its tiles of bm positions (moe_block_m
    with sm90 and fp8b, the GEMMs' flags, unless given: bench/kernels/moe.py --sweep). Up to
    MOE_ROUTE_THREADS / 32 tokens one CTA picks and groups (a decode step: one launch); past
    that the top-k runs over a grid first, since one CTA's warps would walk the tokens
    several times over (it was half of a 4096-token Qwen3-30B-A3B layer,
    bench/results/moe.md), and the CTA only groups. From MOE_GRID_ROUTE_ROWS routed rows
    (and with grid: the module holds moe_count and moe_place) grids of chunks count the rows
    before the CTA and place them after it; the CTA sums the counts, scans and writes the
    tiles."""
    split = tokens > MOE_ROUTE_THREADS // 32
    grid = grid and tokens * top_k >= MOE_GRID_ROUTE_ROWS
    bm = bm or moe_block_m(tokens, experts, top_k, sm90, fp8b)
    route = (moe_route_launch(tokens, experts, top_k, dtype),
             [logits, tokens, experts, top_k, int(renormalise), bm, ids, wts, pos_of, perm,
              meta, 2 if grid else int(split)])
    if not split:
        return [route]
    topk = (moe_topk_launch(tokens, experts, top_k, dtype),
            [logits, tokens, experts, top_k, int(renormalise), ids, wts])
    if not grid:
        return [topk, route]
    chunks, block = -(-tokens * top_k // MOE_ROUTE_THREADS), (MOE_ROUTE_THREADS, 1, 1)
    return [topk,
            (Launch("moe", "moe_count", (chunks, 1, 1), block),
             [ids, tokens, experts, top_k, meta]),
            route,
            (Launch("moe", "moe_place", (chunks, 1, 1), block),
             [ids, tokens, experts, top_k, pos_of, perm, meta])]


def moe_gemm_launch(tokens: int, experts: int, top_k: int, n: int, k: int, dtype: str,
                    act: bool, fp8b_group: int = 0, sm90: bool = False,
                    fp8b_layer: bool = False) -> Launch:
    """The grouped GEMM over the routed rows, weights [E, N, K] (each expert's [out, in]).
    act: gate-up with SwiGLU fused, weights [E, 2n, K], x the tokens [T, K] read through
    perm, out [T k, n]; else down, x the activations [T k, K] by position, perm null.
    args (x, w, perm-or-null, meta, E, n, K, out). fp8b_group: the weights are E4M3 bytes
    with a scale a block of that many k (kernels/moe_fp8b.cu), args then + (scale
    [E, K / group, N], fp8b_group_shift(group)). sm90: steps past the 8-row kernel's take
    the tiled GEMM on wgmma (sm_90a), its tile heights (moe_block_m: the routing must be
    given the same flag). fp8b_layer: both of the layer's GEMMs are over FP8 experts (the
    routing's fp8b: with sm90, tiles of 256 positions past MOE_WG8_M256_ROWS an expert)."""
    if k % 8 or not 0 < k <= INT32_MAX or not 0 < n <= INT32_MAX:
        raise ValueError(f"the MoE GEMMs need K a multiple of 8 (16-byte rows): N={n}, K={k}")
    if fp8b_group:
        fp8b_group_shift(fp8b_group)   # a power of two from FP8B_MIN_GROUP, or ValueError
        if k % fp8b_group:
            raise ValueError(f"block-wise FP8 experts of K={k} in blocks of {fp8b_group}")
    if fp8b_layer and not fp8b_group:
        raise ValueError("fp8b_layer: this GEMM's weights are 16-bit")
    bm = moe_block_m(tokens, experts, top_k, sm90, fp8b_layer)
    tiles = moe_max_tiles(tokens, experts, top_k, bm)
    name = f"moe_gemm_{'fp8b_' if fp8b_group else ''}{dtype_tag(dtype)}_m{bm}" + \
        ("_swiglu" if act else "")
    module = "moe_fp8b" if fp8b_group else "moe"
    if bm in MOE_GEMM_SHAPES:   # decode: grid (N blocks, tiles)
        if tiles > MAX_GRID_Y:
            raise ValueError(f"{tokens} tokens make up to {tiles} MoE tiles, over the grid's "
                             f"{MAX_GRID_Y}; lower --max-num-tokens")
        wn, sk = MOE_GEMM_SHAPES[bm]
        outs = wn * (8 if act else 16)
        return Launch(module, name, (math.ceil(n / outs), tiles, 1), (32 * wn * sk, 1, 1))
    # tiled: grid (tiles, N blocks), so consecutive CTAs share an N block's weights in L2
    bn, stages = ((MOE_WG8_SHAPES if fp8b_group else MOE_WG_SHAPES)[bm] if sm90
                  else (MOE_TC_BN, 0))
    blocks = math.ceil(n / (bn // 2 if act else bn))
    if blocks > MAX_GRID_Y or tiles > INT32_MAX:
        raise ValueError(f"MoE GEMM of N={n} over {tiles} tiles: over the grid's bounds")
    if sm90:
        threads = moe_wg8_threads(bm) if fp8b_group else 2 * bm
        return Launch(module, name.replace(f"_m{bm}", f"_m{bm}w"), (tiles, blocks, 1),
                      (threads, 1, 1), smem=moe_wg_smem(bm, bn, stages, bool(fp8b_group)))
    return Launch(module, name, (tiles, blocks, 1), (MOE_TC_THREADS, 1, 1),
                  smem=moe_gemm_smem(bm, fp8b=bool(fp8b_group)))


def moe_combine_launch(tokens: int, hidden: int, top_k: int, dtype: str,
                       shared: bool = False) -> Launch:
    """out [T, H] = the weighted sum of each token's k expert rows (fp32, then rounded);
    shared (Qwen2-MoE): + sigmoid(gate [T, 1]) * shared [T, H]. args (y [T k, H], pos_of,
    wts, gate-or-null, shared-or-null, T, H, k, out)."""
    if not 0 < tokens <= INT32_MAX or not 0 < hidden or not 1 <= top_k <= MOE_MAX_TOPK:
        raise ValueError(f"MoE combine of {tokens} tokens x {hidden}, top {top_k}")
    vec = 8 if hidden % 8 == 0 else 1
    threads = min(256, round_up(hidden // vec, 32))
    name = "moe_combine" + ("_shared" if shared else "") + f"_{dtype_tag(dtype)}_v{vec}"
    return Launch("moe", name, (tokens, 1, 1), (threads, 1, 1))
