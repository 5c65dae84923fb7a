"""The GEMM plans' argument rules (llmc/backends/cuda/gemm.py `check_plan`), on the CPU.

`check_plan` is what GemmPlan runs before it touches cuBLASLt, so every refusal here is the
one a plan gives on the GPU; the GPU tests (test_cuda_gemm.py) run the plans themselves.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from llmc.backends.cuda import gemm

FP8 = "float8e4m3fn"
HOPPER = (9, 0)


def fp8(n=1024, k=576, **kw):
    args = dict(dtype=FP8, out_dtype="bfloat16", transpose_b=True, capability=HOPPER)
    return gemm.check_plan(n, k, **{**args, **kw})


@pytest.mark.parametrize("name", ["float8e4m3fn", "float8_e4m3fn", "torch.float8_e4m3fn",
                                  "fp8", "E4M3"])
def test_fp8_dtype_names(name):
    assert gemm.normalize_dtype(name) == FP8


def test_sixteen_bit_plans_unchanged():
    assert gemm.check_plan(576, 576, dtype="bf16") == ("bfloat16", "bfloat16", None)
    assert gemm.check_plan(49152, 576, dtype="float16", out_dtype="fp32",
                           transpose_b=True) == ("float16", "float32", None)
    with pytest.raises(ValueError, match="writes float16 or float32, not bfloat16"):
        gemm.check_plan(576, 576, dtype="float16", out_dtype="bfloat16")
    with pytest.raises(ValueError, match="FP8 options"):
        gemm.check_plan(576, 576, dtype="bfloat16", scaling="channel")
    with pytest.raises(ValueError, match="FP8 options"):
        gemm.check_plan(576, 576, dtype="bfloat16", fast_accum=True)
    with pytest.raises(ValueError, match="must be positive"):
        gemm.check_plan(0, 576)
    with pytest.raises(ValueError, match="power of two"):
        gemm.check_plan(576, 576, alignment=48)


@pytest.mark.parametrize("out", ["bfloat16", "float16", "float32"])
def test_fp8_accepts(out):
    assert fp8(out_dtype=out) == (FP8, out, "channel")  # per-channel scaling by default
    assert fp8(out_dtype=out, scaling="tensor") == (FP8, out, "tensor")
    # N = 1000: not a power of two, but 16-byte output rows for every output dtype.
    assert fp8(1000, 576, out_dtype=out)[1] == out
    assert fp8(6144, 4096, out_dtype=out, capability=(8, 9), scaling="tensor")[1] == out


def test_fp8_refusals():
    with pytest.raises(ValueError, match=r"transpose_b=True.*TN form"):
        fp8(transpose_b=False)
    with pytest.raises(ValueError, match="needs out_dtype"):
        fp8(out_dtype=None)
    with pytest.raises(ValueError, match="writes bfloat16, float16 or float32, not "
                                         "float8e4m3fn"):
        fp8(out_dtype="fp8")
    with pytest.raises(ValueError, match="K % 16 == 0.*not K=584"):
        fp8(k=584)
    with pytest.raises(ValueError, match="writing bfloat16 needs N % 8 == 0.*not N=1004"):
        fp8(n=1004)
    with pytest.raises(ValueError, match="writing float32 needs N % 4 == 0.*not N=1001"):
        fp8(n=1001, out_dtype="float32")
    with pytest.raises(ValueError, match="'channel'.*'tensor'.*not 'row'"):
        fp8(scaling="row")
    with pytest.raises(ValueError, match="16-byte aligned pointers"):
        fp8(alignment=8)
    with pytest.raises(ValueError, match="compute capability 8.9 or newer.*this one is 8.6"):
        fp8(capability=(8, 6))


def test_imports_without_nvmath_or_gpu():
    """The module and its argument checks load with nvmath and cuda-bindings unimportable."""
    code = ("import sys; sys.modules['nvmath'] = sys.modules['cuda'] = None\n"
            "from llmc.backends.cuda import gemm\n"
            "print(gemm.check_plan(1000, 576, dtype='fp8', out_dtype='bf16', "
            "transpose_b=True))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "('float8e4m3fn', 'bfloat16', 'channel')"
