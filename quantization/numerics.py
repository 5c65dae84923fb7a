"""The quantizers and their numpy references, one short function each.

Weights arrive as the graph stores them, ``[in, out]`` (K rows, N columns), so that every
projection is ``x @ W``. The formats are the ones ONNX DequantizeLinear (opset 21) and
TensorRT read with zero points of zero (TensorRT refuses others):

- INT4: symmetric, block-wise along K (``block`` rows share a scale per column),
  ``W ~ q * scale``, q in [-8, 7], scale ``[K / block, N]`` in the compute dtype. With a
  zero point (``--int4-zero-point``, AutoAWQ's default form): each block's [min, max] onto
  codes u in 0..15, ``W ~ (u - z) * scale`` with an integer z a block, held as the symmetric
  q = u - 8 plus an offset ``(8 - z) * scale`` (qdq.py: the offset GEMM of zero-point
  checkpoints).
- FP8 weights: E4M3, one scale per output column, ``W ~ q * scale``, scale ``[N]``, the one
  of eight steps above |max| / 448 that rounds the column with the least error.
- FP8 activations: E4M3, one calibrated scale per tensor, saturating at +-448.
"""

from __future__ import annotations

import numpy as np

from llmc.dtypes import np_dtype

INT4_MAX = 7.0           # symmetric: amax maps to 7, so -8 is never needed (nor produced)
FP8_MAX = 448.0          # largest finite E4M3FN value
INT4_BLOCKS = (128, 64, 32)
FP8_BLOCKS = (128, 64, 32)   # FP8 weight-only, as INT4's


def int4_block(k: int, largest: int = INT4_BLOCKS[0]) -> int | None:
    """The largest INT4 block, up to ``largest``, that divides K: TensorRT builds whole blocks
    only (SmolLM2's K = 576 takes 64). None: no block fits, the GEMM stays unquantized."""
    return next((b for b in INT4_BLOCKS if b <= largest and k % b == 0), None)


def fp8_block(k: int) -> int | None:
    """The largest FP8 weight-only block that divides K (None: the GEMM stays 16-bit)."""
    return next((b for b in FP8_BLOCKS if k % b == 0), None)


def _scale(amax: np.ndarray, top: float, dtype: str) -> np.ndarray:
    """amax / top, rounded to the dtype it is stored in (so q is computed with the scale the
    graph will multiply by), never zero. The quotient is taken in float64 and rounded to
    float32 once, which is float32 division for float32 |max| and gives a checkpoint's own
    scale back from its scale x 448 (float32 division of that float32 product is an ulp off
    one scale in 17)."""
    s = (np.asarray(amax, np.float64) / top).astype(np.float32).astype(np_dtype(dtype)).astype(
        np.float32)
    tiny = np.finfo(np.float16).tiny   # an all-zero block: any positive scale gives q = 0
    return np.where(s > 0, s, np.float32(tiny).astype(np_dtype(dtype)).astype(np.float32))


def _int4_grid(w: np.ndarray, block: int, scale_dtype: str, clip: np.ndarray | None
               ) -> tuple[np.ndarray, np.ndarray]:
    """(q as float32 [K / block, block, N], scale as float32 [K / block, N])."""
    k, n = w.shape
    g = w.astype(np.float32).reshape(k // block, block, n)
    amax = np.abs(g).max(axis=1)
    scale = _scale(amax if clip is None else amax * clip, INT4_MAX, scale_dtype)
    return np.clip(np.rint(g / scale[:, None, :]), -8, 7), scale


def quantize_int4(w: np.ndarray, block: int, scale_dtype: str, clip: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Round-to-nearest INT4: (q int4 [K, N], scale [K / block, N] in ``scale_dtype``).
    ``clip`` [K / block, N]: each block's range as a share of its |max| (AWQ's clipping)."""
    q, scale = _int4_grid(w, block, scale_dtype, clip)
    return q.reshape(w.shape).astype(np_dtype("int4")), scale.astype(np_dtype(scale_dtype))


def fake_quant_int4(w: np.ndarray, block: int, scale_dtype: str,
                    clip: np.ndarray | None = None) -> np.ndarray:
    """dequantize_int4(quantize_int4(w)) in float32, without the int4 round trip (the
    searches below call it dozens of times a weight)."""
    q, scale = _int4_grid(w, block, scale_dtype, clip)
    return (q * scale[:, None, :]).reshape(w.shape)


def _int4_grid_zp(w: np.ndarray, block: int, scale_dtype: str, clip: np.ndarray | None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(u - 8 as float32 [K / block, block, N], scale and zero point z as float32
    [K / block, N]): AutoAWQ's asymmetric grid, scale = (max - min) / 15 rounded to its dtype,
    z = round(-min / scale) in 0..15, u = round(w / scale) + z in 0..15, where the block's
    range is widened to hold 0 (AutoAWQ clamps z to 0..15 instead, which breaks a block whose
    weights all lie far to one side of 0). ``clip``: the range that of the block clamped to
    +-clip |max|, as AutoAWQ's clipping with zero points takes it (the longer side is cut
    first); the weights past it take the end codes."""
    k, n = w.shape
    g = w.astype(np.float32).reshape(k // block, block, n)
    hi, lo = np.maximum(g.max(axis=1), 0), np.minimum(g.min(axis=1), 0)
    if clip is not None:
        amax = np.maximum(hi, -lo) * clip
        hi, lo = np.minimum(hi, amax), np.maximum(lo, -amax)
    scale = _scale(hi - lo, 15.0, scale_dtype)
    z = np.clip(np.rint(-lo / scale), 0, 15)
    u = np.clip(np.rint(g / scale[:, None, :]) + z[:, None, :], 0, 15)
    return u - 8, scale, z


def quantize_int4_zp(w: np.ndarray, block: int, scale_dtype: str,
                     clip: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Round-to-nearest INT4 with a zero point a block: (q = u - 8 int4 [K, N], scale
    [K / block, N] in ``scale_dtype``, offset (8 - z) * scale float32 [K / block, N]), so
    W ~ q * scale + offset = (u - z) * scale."""
    q, scale, z = _int4_grid_zp(w, block, scale_dtype, clip)
    return (q.reshape(w.shape).astype(np_dtype("int4")), scale.astype(np_dtype(scale_dtype)),
            (8 - z) * scale)


def fake_quant_int4_zp(w: np.ndarray, block: int, scale_dtype: str,
                       clip: np.ndarray | None = None) -> np.ndarray:
    """(u - z) * scale of quantize_int4_zp, in float32."""
    q, scale, z = _int4_grid_zp(w, block, scale_dtype, clip)
    return ((q + 8 - z[:, None, :]) * scale[:, None, :]).reshape(w.shape)


def dequantize_int4(q: np.ndarray, scale: np.ndarray, block: int) -> np.ndarray:
    """DequantizeLinear(q, scale, axis=0, block_size=block), in float32."""
    k, n = q.shape
    s = scale.astype(np.float32)
    return (q.astype(np.float32).reshape(k // block, block, n) * s[:, None, :]).reshape(k, n)


# The per-channel E4M3 scales llmc picks (FP8_SCALE_STEPS): |max| / 448 times 2^(j / 8) for j
# = 0..7, the one with the least squared error in its column. E4M3's grid is relative, so a
# scale and twice it give the same grid to every value but the column's smallest; the eight
# steps try eight offsets of it against the column's values. None clips (|max| stays <= 448).
# On SmolLM2 the weights' error fell by 11% against |max| / 448 alone, each step chosen by 7-17%
# of the columns (bench/results/quantization.md, "FP8 scales chosen by their rounding error").
# The error is taken over every value of a weight of up to FP8_SCALE_ALL weights (SmolLM2's
# all), and over each column's FP8_SCALE_ROWS largest magnitudes in a larger one: an 8B
# model's weights eight times over would add about 15 minutes to its build on two CPU cores,
# and the largest values carry the most squared error (on a heavy-tailed [4096, 1024] weight
# they give 6.6% less error where all rows give 6.9%; evenly strided rows gave 5.7% more).
FP8_SCALE_STEPS = 2.0 ** (np.arange(8) / 8)
FP8_SCALE_ALL, FP8_SCALE_ROWS = 1 << 22, 512


def quantize_fp8_weight(w: np.ndarray, scale_dtype: str, scale: np.ndarray | None = None
                        ) -> tuple[np.ndarray, np.ndarray]:
    """E4M3 with one scale per output column: (q [K, N], scale [N]). The scale of each column
    is the one of FP8_SCALE_STEPS that rounds it (a large weight: its FP8_SCALE_ROWS largest
    magnitudes) with the least squared error. ``scale``: use this one (a pre-quantized
    checkpoint's) instead."""
    w = w.astype(np.float32)
    if scale is None:
        amax = np.abs(w).max(axis=0).astype(np.float64)
        top = len(w) - FP8_SCALE_ROWS   # E4M3 rounds +-x alike: magnitudes will do
        sample = w if w.size <= FP8_SCALE_ALL or top <= 0 else \
            np.partition(np.abs(w).T, top, axis=1)[:, top:].T
        steps = np.stack([_scale(amax * step, FP8_MAX, scale_dtype) for step in FP8_SCALE_STEPS])
        errs = np.stack([_fp8_squared_error(sample, s, axis=0) for s in steps])
        scale = np.take_along_axis(steps, errs.argmin(axis=0)[None], axis=0)[0]
    else:
        scale = _scale(np.asarray(scale, np.float64) * FP8_MAX, FP8_MAX, scale_dtype)
    q = np.clip(w / scale, -FP8_MAX, FP8_MAX).astype(np_dtype("float8e4m3fn"))
    return q, scale.astype(np_dtype(scale_dtype))


def quantize_fp8_blocks(w: np.ndarray, block: int, scale_dtype: str
                        ) -> tuple[np.ndarray, np.ndarray]:
    """E4M3 weight-only, a scale per block of ``block`` k and output column, |max| / 448:
    (q [..., K, N], scale [..., K / block, N] in ``scale_dtype``; a stack of experts
    [E, K, N] each on its own)."""
    *stack, k, n = w.shape
    g = w.astype(np.float32).reshape(*stack, k // block, block, n)
    scale = _scale(np.abs(g).max(axis=-2), FP8_MAX, scale_dtype)
    q = np.clip(g / scale[..., None, :], -FP8_MAX, FP8_MAX).astype(np_dtype("float8e4m3fn"))
    return q.reshape(w.shape), scale.astype(np_dtype(scale_dtype))


def dequantize_fp8_blocks(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """DequantizeLinear(q [..., K, N], scale [..., K / B, N], axis=-2, block_size=B), in
    float32."""
    block = q.shape[-2] // scale.shape[-2]
    return q.astype(np.float32) * np.repeat(scale.astype(np.float32), block, axis=-2)


def dequantize_fp8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """DequantizeLinear(q, scale) with a per-tensor scale or one per last-axis column."""
    return q.astype(np.float32) * scale.astype(np.float32)


def fp8_activation_scale(amax: float, dtype: str) -> np.ndarray:
    """The per-tensor scale of an activation whose calibrated |max| is ``amax``."""
    return _scale(np.float64(amax), FP8_MAX, dtype).astype(np_dtype(dtype))


def fp8_activation_amax(x: np.ndarray, dtype: str) -> float:
    """The |max| an activation's per-tensor scale is made from (fp8_activation_scale): the
    calibrated |max| times the step of FP8_SCALE_STEPS whose scale rounds the calibration
    values ``x`` with the least squared error, as quantize_fp8_weight picks a column's."""
    x = x.astype(np.float32)
    amax = float(np.abs(x).max())
    errs = [_fp8_squared_error(x, fp8_activation_scale(amax * step, dtype))
            for step in FP8_SCALE_STEPS]
    return amax * float(FP8_SCALE_STEPS[int(np.argmin(errs))])


def _fp8_squared_error(x: np.ndarray, scale, axis: int | None = None):
    """The squared error of x (float32) rounded to E4M3 with ``scale`` (a scalar, or one per
    last-axis column), summed in float64 over ``axis``."""
    return ((fake_quant_fp8(x, scale) - x).astype(np.float64) ** 2).sum(axis=axis)


def fake_quant_fp8(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """QuantizeLinear (saturating) then DequantizeLinear to float8e4m3fn, in float32."""
    s = np.float32(scale)
    q = np.clip(x.astype(np.float32) / s, -FP8_MAX, FP8_MAX).astype(np_dtype("float8e4m3fn"))
    return q.astype(np.float32) * s


# --- AWQ: activation-aware scales for INT4 --------------------------------------------------

AWQ_GRID = 20


def awq_scales(w: np.ndarray, x: np.ndarray, block: int, scale_dtype: str,
               grid: int = AWQ_GRID, zero_point: bool = False) -> tuple[np.ndarray, float]:
    """AWQ's search (Lin et al. 2023, section 3.2) for per-input-channel scales s: W' =
    diag(s) W is quantized and x / s feeds it. Two families of s, each on a grid of alpha in
    [0, 1): the paper's mean|x|^alpha, and AutoAWQ's default ("duo scaling")
    mean|x|^alpha / mean|w'|^(1 - alpha), w' each weight over its block's |max| (channels
    whose weights sit low in their blocks are scaled up). The s whose INT4 GEMM output is
    closest to the full-precision one on calibration rows ``x`` [M, K] wins; the first
    family's alpha 0 is plain RTN (s = 1), so the search never does worse than RTN on them
    (bench/results/quantization.md measures both families). Returns (s [K] float32, the
    chosen alpha). ``zero_point``: the INT4 grid with a zero point a block."""
    fake = fake_quant_int4_zp if zero_point else fake_quant_int4
    w = w.astype(np.float32)
    x = x.astype(np.float32)
    # Errors in float64: ranked in float32, the BLAS's summation order (its threads, the
    # CPU's kernels) picked other winners, so the same build gave other engines on other
    # machines (bench/results/quantization.md, "AWQ's search in float64").
    ref = x.astype(np.float64) @ w
    k, n = w.shape
    x_mean = np.maximum(np.abs(x).mean(axis=0), 1e-8)
    wb = np.abs(w).reshape(k // block, block, n)
    w_mean = (wb / (wb.max(axis=1, keepdims=True) + 1e-6)).reshape(k, n).mean(axis=1)
    best = (np.inf, np.ones(k, np.float32), 0.0)
    top = np.finfo(np_dtype(scale_dtype)).max / 2   # x / s must fit the GEMM's dtype (fp16)
    for duo in (False, True):
        for alpha in np.arange(grid) / grid:
            s = np.maximum(x_mean ** alpha / (w_mean ** (1 - alpha) + 1e-4), 1e-4) if duo \
                else x_mean ** alpha
            s = (s / np.sqrt(s.max() * s.min())).astype(np.float32)   # AWQ's normalisation
            xs, ws = x / s, w * s[:, None]
            if (alpha or duo) and (np.abs(xs).max() > top or np.abs(ws).max() > top):
                continue
            out = xs.astype(np.float64) @ fake(ws, block, scale_dtype)
            err = float(np.mean((ref - out) ** 2))
            if err < best[0]:
                best = (err, s, float(alpha))
    return best[1], best[2]


AWQ_CLIPS = np.arange(20, 9, -1) / 20     # 1.0, 0.95, ..., 0.5


def awq_clip(w: np.ndarray, x: np.ndarray, block: int, scale_dtype: str,
             zero_point: bool = False) -> np.ndarray:
    """AWQ's second step (its `auto_clip`): for each block of each output column, the share
    of the block's |max| to keep, the one whose INT4 block gives the smallest output error on
    calibration rows ``x`` [M, K] (clipping a few large weights buys a finer step for the
    rest). ``w`` is already scaled (diag(s) W), ``x`` divided by s. Returns [K / block, N].
    ``zero_point``: the grid with a zero point a block, the block clamped to +-share |max|."""
    fake = fake_quant_int4_zp if zero_point else fake_quant_int4
    k, n = w.shape
    # float64, as in awq_scales: the same winners whatever the BLAS's summation order
    xg = x.astype(np.float64).reshape(len(x), k // block, block).transpose(1, 0, 2)  # [G,M,B]
    wg = w.astype(np.float32).reshape(k // block, block, n)                          # [G,B,N]
    ref = xg @ wg                                                 # each block's share [G,M,N]
    best_err = np.full((k // block, n), np.inf)
    best = np.ones((k // block, n), np.float32)
    for r in AWQ_CLIPS:
        clip = np.full((k // block, n), r, np.float32)
        deq = fake(w, block, scale_dtype, clip).reshape(k // block, block, n)
        err = ((xg @ deq - ref) ** 2).mean(axis=1)
        better = err < best_err                                   # [G, N]
        best_err, best = np.where(better, err, best_err), np.where(better, r, best)
    return best
