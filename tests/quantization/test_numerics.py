"""The quantizers against their definitions: block choice, rounding bounds, ONNX's int4
packing, FP8 saturation, and AWQ's search never losing to plain rounding."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import numpy_helper

from llmc.dtypes import np_dtype, storage_bytes, to_storage
from llmc.quantization import numerics as nq


@pytest.mark.parametrize("k, block", [(576, 64), (1536, 128), (96, 32), (64, 64), (100, None)])
def test_int4_block_is_the_largest_that_divides_k(k, block):
    assert nq.int4_block(k) == block


@pytest.mark.parametrize("k, largest, block", [(1536, 32, 32), (1536, 64, 64), (576, 128, 64),
                                               (96, 64, 32), (100, 32, None)])
def test_int4_block_up_to_a_largest(k, largest, block):
    assert nq.int4_block(k, largest) == block


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_int4_round_to_nearest_is_within_half_a_step(dtype):
    w = np.random.default_rng(0).standard_normal((128, 24)).astype(np.float32)
    w[:, 3] = 0   # an all-zero column: scale stays positive, values stay 0
    q, scale = nq.quantize_int4(w, 32, dtype)
    assert q.dtype == np_dtype("int4") and scale.dtype == np_dtype(dtype)
    assert scale.shape == (4, 24) and (scale.astype(np.float32) > 0).all()
    qi = q.astype(np.int8)
    assert qi.min() >= -8 and qi.max() <= 7 and (qi[:, 3] == 0).all()
    step = np.repeat(scale.astype(np.float32), 32, axis=0)
    err = np.abs(nq.dequantize_int4(q, scale, 32) - w)
    assert (err <= step / 2 + 1e-6 + 1e-2 * step).all()   # + the scale's own rounding


def test_int4_storage_is_onnx_packing():
    """Two values a byte, first in the low nibble: the bytes onnx itself writes."""
    q = np.random.default_rng(1).integers(-8, 8, (7, 5)).astype(np_dtype("int4"))
    assert to_storage(q) == numpy_helper.from_array(q).raw_data
    assert storage_bytes("int4", q.shape) == len(to_storage(q)) == 18


def test_fp8_weight_per_column_and_saturating_activations():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((64, 8)).astype(np.float32) * np.arange(1, 9, dtype=np.float32)
    q, scale = nq.quantize_fp8_weight(w, "float16")
    assert q.dtype == np_dtype("float8e4m3fn") and scale.shape == (8,)
    assert np.abs(q.astype(np.float32)).max() <= nq.FP8_MAX
    rel = np.abs(nq.dequantize_fp8(q, scale) - w) / np.abs(w).max(axis=0)
    assert rel.max() < 2 ** -4    # E4M3: 3 mantissa bits
    s = nq.fp8_activation_scale(10.0, "float32")
    x = np.array([0.0, 1.0, -10.0, 1e6], np.float32)
    y = nq.fake_quant_fp8(x, s)
    assert y[0] == 0 and abs(y[1] - 1) < 1 / 16 and y[2] == pytest.approx(-10, rel=1e-6)
    assert y[3] == pytest.approx(10, rel=1e-6)   # saturates at the calibrated |max|


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_fp8_weight_scale_is_the_step_with_the_least_error(dtype):
    """Each column's scale is one of FP8_SCALE_STEPS over |max| / 448 (never below it: no
    weight saturates), the one whose E4M3 rounding of the column has the least squared error;
    so no column rounds worse than with |max| / 448 alone, and over many the error falls."""
    rng = np.random.default_rng(4)
    w = (rng.standard_normal((256, 96)) * rng.lognormal(0, 1, 96)).astype(np.float32)
    q, scale = nq.quantize_fp8_weight(w, dtype)
    s = scale.astype(np.float32)
    steps = [nq._scale(np.abs(w).max(axis=0) * c, nq.FP8_MAX, dtype) for c in nq.FP8_SCALE_STEPS]
    errs = np.stack([((np.clip(w / t, -448, 448).astype(np_dtype("float8e4m3fn"))
                       .astype(np.float32) * t - w).astype(np.float64) ** 2).sum(axis=0)
                     for t in steps])
    assert all(s[j] in [t[j] for t in steps] for j in range(w.shape[1]))
    np.testing.assert_array_equal(((nq.dequantize_fp8(q, scale) - w).astype(np.float64) ** 2)
                                  .sum(axis=0), errs.min(axis=0))
    assert np.abs(q.astype(np.float32)).max() <= nq.FP8_MAX
    assert errs.min(axis=0).sum() < 0.95 * errs[0].sum()
    assert len(set(errs.argmin(axis=0))) > 4   # the steps are all used, not one


def test_fp8_weight_scale_of_a_large_weight_is_chosen_on_its_largest_values():
    """Past FP8_SCALE_ALL weights the step is chosen on each column's FP8_SCALE_ROWS largest
    magnitudes (the cost of an 8B model's build), which carry most of the squared error, and
    the whole weight quantized with it: on heavy-tailed columns nearly the gain of all rows."""
    rng = np.random.default_rng(6)
    k, n = 4100, 1100
    assert k * n > nq.FP8_SCALE_ALL
    w = (rng.standard_t(3, (k, n)) * rng.lognormal(0, 1, n)).astype(np.float32)
    q, scale = nq.quantize_fp8_weight(w, "float32")
    top = np.sort(np.abs(w), axis=0)[-nq.FP8_SCALE_ROWS:]
    steps = np.stack([nq._scale(np.abs(w).max(axis=0) * c, nq.FP8_MAX, "float32")
                      for c in nq.FP8_SCALE_STEPS])

    def errors(x):
        return np.stack([nq._fp8_squared_error(x, t, axis=0) for t in steps])
    np.testing.assert_array_equal(scale, steps[errors(top).argmin(axis=0), np.arange(n)])
    np.testing.assert_array_equal(q.view(np.uint8), np.clip(w / scale, -448, 448).astype(
        np_dtype("float8e4m3fn")).view(np.uint8))
    full = errors(w)
    gain = 1 - nq._fp8_squared_error(w, scale, axis=0).sum() / full[0].sum()
    best = 1 - full.min(axis=0).sum() / full[0].sum()   # every row's choice
    assert 0.8 * best < gain <= best
    # past FP8_SCALE_ALL with fewer rows than the sample: every value decides, as for a small
    # weight (the columns repeat, so their steps must too)
    short = np.tile(w[:100, :10], (1, 4200))
    assert short.size > nq.FP8_SCALE_ALL
    picked = nq.quantize_fp8_weight(short, "float32")[1].reshape(4200, 10)
    np.testing.assert_array_equal(picked, np.tile(nq.quantize_fp8_weight(w[:100, :10],
                                                                          "float32")[1], (4200, 1)))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_fp8_activation_amax_is_the_step_with_the_least_error(dtype):
    """An activation's |max| for its scale is the calibrated |max| times the step of
    FP8_SCALE_STEPS whose scale rounds the calibration values with the least squared error:
    never below the |max| (no calibration value saturates), never worse than it."""
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((300, 64)) * rng.lognormal(0, 1.5, 64)).astype(np.float32)
    x[7, 3] = 40 * np.abs(x).max()   # an outlier token
    amax = float(np.abs(x).max())

    def err(a):
        return float(((nq.fake_quant_fp8(x, nq.fp8_activation_scale(a, dtype)) - x)
                      .astype(np.float64) ** 2).sum())
    chosen = nq.fp8_activation_amax(x, dtype)
    assert any(chosen == pytest.approx(amax * s, rel=1e-12) for s in nq.FP8_SCALE_STEPS)
    assert err(chosen) == min(err(amax * s) for s in nq.FP8_SCALE_STEPS) <= err(amax)


def test_fp8_activation_scale_gives_a_checkpoints_scale_back():
    """A pre-quantized checkpoint's input and KV scales s come in as |max| = s x 448, and its
    weight scales are used through the same |max|; the scale made from it is s bit for bit
    (float32 division was an ulp off for about one s in 17), and a calibrated float32 |max|
    gets what float32 division gives."""
    rng = np.random.default_rng(3)
    s = (rng.random(4000) * 0.05).astype(np.float32)
    back = np.array([nq.fp8_activation_scale(float(v) * nq.FP8_MAX, "float32") for v in s])
    np.testing.assert_array_equal(back, s)
    w = rng.standard_normal((8, s.size)).astype(np.float32) * s   # and a weight's given scales
    np.testing.assert_array_equal(nq.quantize_fp8_weight(w, "float32", s)[1], s)
    amax = (rng.random(4000) * 30).astype(np.float32)
    for dtype in ("float32", "float16", "bfloat16"):
        made = np.array([nq.fp8_activation_scale(float(a), dtype) for a in amax])
        np.testing.assert_array_equal(made, (amax / np.float32(nq.FP8_MAX)).astype(
            np_dtype(dtype)))


def test_awq_search_beats_round_to_nearest_on_outlier_channels():
    """Inputs with a few large channels (what AWQ is for): the searched scales cut the GEMM
    output error well below RTN's; s = 1 (RTN itself) is a candidate, so it never loses."""
    rng = np.random.default_rng(3)
    k, n, block = 128, 64, 64
    x = rng.standard_normal((256, k)).astype(np.float32)
    x[:, :4] *= 30
    w = rng.standard_normal((k, n)).astype(np.float32)
    s, _ = nq.awq_scales(w, x, block, "float32")
    q, scale = nq.quantize_int4(w * s[:, None], block, "float32")
    awq = np.mean((x @ w - (x / s) @ nq.dequantize_int4(q, scale, block)) ** 2)
    q, scale = nq.quantize_int4(w, block, "float32")
    rtn = np.mean((x @ w - x @ nq.dequantize_int4(q, scale, block)) ** 2)
    assert not np.allclose(s, 1) and awq < 0.7 * rtn


def test_awq_clip_never_loses_to_the_full_range():
    """Clipping is chosen per block and column among ratios that include 1 (no clipping), so
    the GEMM output error of each block can only go down; with heavy-tailed weights it does."""
    rng = np.random.default_rng(4)
    k, n, block = 128, 32, 32
    x = rng.standard_normal((128, k)).astype(np.float32)
    w = rng.standard_t(2, (k, n)).astype(np.float32)
    clip = nq.awq_clip(w, x, block, "float32")
    assert clip.shape == (4, 32) and clip.min() >= 0.5 and clip.max() <= 1 and clip.min() < 1

    def err(c):
        q, scale = nq.quantize_int4(w, block, "float32", c)
        return np.mean((x @ w - x @ nq.dequantize_int4(q, scale, block)) ** 2)

    assert err(clip) < 0.9 * err(None)


def test_awq_scales_keep_fp16_activations_finite():
    """A channel far larger than the others pulls s apart; x / s must still fit fp16."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((64, 64)).astype(np.float32) * 1e-3
    x[:, 0] = 2e4
    w = rng.standard_normal((64, 16)).astype(np.float32)
    s, _ = nq.awq_scales(w, x, 32, "float16")
    assert np.abs(x / s).max() < np.finfo(np.float16).max / 2
