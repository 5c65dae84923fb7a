"""The decode GEMVs' weight loads ask L2 for whole 128-byte lines (`.L2::128B` in
kernels/qgemv.cuh and kernels/gemv.cu: 1-4 points more of the HBM bandwidth on the H100,
bench/results/qgemv.md and gemv.md, "A 128-byte L2 prefetch on the weight loads"), and the
small-M GEMM's loads, which gained nothing from it, go without. Checked in the sm_90a SASS:
NVRTC compiles (pip wheel, no GPU), nvdisasm (the nvidia-cuda-nvdisasm wheel) disassembles."""
import re
import subprocess

import pytest

pytest.importorskip("cuda.bindings.nvrtc")
pathfinder = pytest.importorskip("cuda.pathfinder")

from llmc.plugins import compiler  # noqa: E402

NVDISASM = pathfinder.find_nvidia_binary_utility("nvdisasm")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(NVDISASM is None,
                                 reason="nvdisasm not found (pip install nvidia-cuda-nvdisasm)")]

# a 16-byte load through the non-coherent path that does not allocate in L1: the weight loads
WEIGHT_LOAD = re.compile(r"LDG\.E\.NA\.(LTC128B\.)?128\.CONSTANT")


def weight_loads(module: str, tmp_path) -> dict[str, tuple[int, int]]:
    """{entry point: (weight loads with the 128-byte prefetch, without)} of the sm_90a cubin."""
    path = tmp_path / f"{module}.cubin"
    path.write_bytes(compiler.compile_module(module, "sm_90a"))
    text = subprocess.run([NVDISASM, "-c", str(path)], check=True, capture_output=True,
                          text=True).stdout
    parts = re.split(r"\.text\.(\w+):", text)
    out = {}
    for name, body in zip(parts[1::2], parts[2::2]):
        found = WEIGHT_LOAD.findall(body)
        out[name] = (sum(1 for h in found if h), sum(1 for h in found if not h))
    return out


@pytest.mark.parametrize("module", ["qgemv", "qgemv_zp"])
def test_decode_gemv_weight_loads_fetch_whole_lines(module, tmp_path):
    loads = weight_loads(module, tmp_path)
    decode = {k: v for k, v in loads.items() if re.match(r"w(4|8|4zp|4off)_", k)}
    small_m = {k: v for k, v in loads.items() if k.startswith("w4g")}
    assert decode and small_m
    assert {k: v for k, v in decode.items() if not v[0] or v[1]} == {}
    assert {k: v for k, v in small_m.items() if v[0] or not v[1]} == {}


def test_16_bit_gemv_weight_loads_fetch_whole_lines(tmp_path):
    loads = weight_loads("gemv", tmp_path)
    assert len(loads) >= 8   # m1, m2 and m8 (tc_gemv) entries, plain and fused, per dtype
    assert {k: v for k, v in loads.items() if not v[0] or v[1]} == {}


def test_moe_decode_gemm_weight_loads_fetch_whole_lines(tmp_path):
    """The MoE decode GEMMs (moe_gemm_*_m8*, tc_gemv's loads; kernels/moe.cu: MOE_L2)."""
    loads = {k: v for k, v in weight_loads("moe", tmp_path).items() if "_m8" in k}
    assert len(loads) >= 4   # plain and SwiGLU, per dtype
    assert {k: v for k, v in loads.items() if not v[0] or v[1]} == {}
