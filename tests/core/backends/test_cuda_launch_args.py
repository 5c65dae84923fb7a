"""Every kernel launch the cuda backend makes passes what its kernel declares, checked on the
CPU: the arguments' sizes (plugins/launch.py: arg_type, arg_sizes) against the parameters of
the kernel's PTX entry, compiled by NVRTC for the plan's dtype. The driver copies as many
arguments as the kernel declares from the list it is given, so one missing argument is read
past the list's end and an int in a pointer's place is half a pointer; on a GPU,
Functions.launch raises for both (tests/plugins/test_gpu_glue.py), and this finds them before
any GPU does, over the launches of prefill, mixed and decode steps of every family and
quantized mode, each with the kernels a large and a one-SM GPU pick."""

from __future__ import annotations

import functools
import json
import re

import pytest

from llmc.backends.cuda.plan import PLAN, Plan
from llmc.build import BuildOptions, build
from llmc.engine_file import EngineFile
from llmc.limits import BuildLimits
from llmc.plugins import compiler
from llmc.plugins.attention_plan import SM90_MODULE
from llmc.plugins.launch import arg_sizes, arg_type
from llmc.quantization.quantize import QuantOptions

pytest.importorskip("cuda.bindings.nvrtc", reason="the kernels extra (NVRTC) is not installed")

LIMITS = BuildLimits(max_batch_size=4, max_num_tokens=128, max_seq_len=128, kv_block_size=16)
FAMILIES = ("llama-gqa", "qwen2-bias", "qwen3-qknorm", "gemma2-softcap", "gemma3-local-global",
            "gpt2-learned-pos", "mixtral-top2", "qwen2moe-shared")
# (kind, --quant, --kv-cache-dtype, more QuantOptions)
QUANTIZED = (("llama-gqa", "fp8", "auto", {}),
             ("llama-gqa", "fp8", "fp8", {"fp8_first_token": "static"}),
             ("llama-gqa", "int4-awq", "auto", {}),
             ("llama-gqa", "int4-rtn", "auto", {"int4_zero_point": True, "lm_head": True}),
             ("llama-gqa", "fp8-block", "auto", {}),
             ("mixtral-top2", "fp8-block", "auto", {}),
             ("llama-gqa", "none", "fp8", {}))


@functools.lru_cache(maxsize=None)
def entry_params(module: str, arch: str, dtype: str) -> dict[str, list[int]]:
    """kernel -> its parameters' sizes in bytes, from the module's PTX."""
    ptx = compiler.compile_module(module, arch, ptx=True, dtype=dtype).decode()
    out = {}
    for name, params in re.findall(r"\.entry\s+(\w+)\s*\((.*?)\)", ptx, re.S):
        sizes = []
        for p in filter(str.strip, params.split(",")):
            bits = int(re.search(r"\.[usbf](\d+)\b", p).group(1))
            count = re.search(r"\[(\d+)\]", p)
            sizes.append(bits // 8 * (int(count.group(1)) if count else 1))
        out[name] = sizes
    return out


def test_ptx_entries_are_read_as_the_driver_sees_them():
    """A pointer is 8 bytes, an int or float 4, the TMA prefill kernel's CUtensorMap 128."""
    act = entry_params("activation", "sm_90a", "bfloat16")
    assert act["swiglu_bf16_v8"] == [8, 4, 4, 8]
    sm90 = entry_params(SM90_MODULE, "sm_90a", "bfloat16")
    assert any(128 in sizes for sizes in sm90.values())


def _steps(plan: Plan):
    """The steps a session runs, as it would configure them for the plan on sm_90a (sm90:
    the Hopper kernels where the engine holds them) and without those kernels."""
    from llmc.backends.cuda.program import Step

    hopper = dict(sm90=SM90_MODULE in plan.modules, w4_sm90="qgemv" in plan.modules,
                  moe_sm90="moe" in plan.modules, moe_grid_route="moe" in plan.modules,
                  moe_fp8b_wide="moe_fp8b" in plan.modules)
    width = LIMITS.max_seq_len // LIMITS.kv_block_size
    for flags in (hopper, {}):
        for sm_count in (132, 1):
            for t, b in ((37, 3), (120, 4), (5, 4), (4, 4), (1, 1)):   # prefill .. decode
                yield Step(t, b, width, 40, sm_count=sm_count, max_smem=227 * 1024, **flags)


def _check_launches(plan: Plan) -> int:
    from llmc.backends.cuda.program import launches

    checked = 0
    for step in _steps(plan):
        for kind, ln, args in launches(plan, step, lambda name: 1 << 20):
            if kind != "kernel":
                continue
            declared = entry_params(ln.module, plan.arch, plan.dtype).get(ln.kernel)
            assert declared is not None, f"{ln.kernel} is not in {ln.module}"
            given = arg_sizes(map(arg_type, args))
            assert given == declared, (f"{ln.kernel} ({ln.module}) takes {declared}, a "
                                       f"{step} launch passes {given}")
            checked += 1
    return checked


def _plan(path) -> Plan:
    return Plan.from_dict(json.loads(EngineFile(path).section(PLAN).tobytes()))


@pytest.mark.slow
def test_every_family_launches_what_its_kernels_declare(tiny_models_d64, tmp_path):
    for kind in FAMILIES:
        out = tmp_path / f"{kind}.engine"
        build(BuildOptions(tiny_models_d64[kind][0], out, backend="cuda", dtype="bf16",
                           limits=LIMITS, gpu_arch="sm_90a"), log=lambda _: None)
        assert _check_launches(_plan(out)) > 100, kind


@pytest.mark.slow
@pytest.mark.parametrize("kind, quant, kv, more", QUANTIZED)
def test_every_quantized_mode_launches_what_its_kernels_declare(tiny_models_d64, tmp_path,
                                                                words, kind, quant, kv, more):
    out = tmp_path / "q.engine"
    q = QuantOptions(quant, kv_cache_dtype=kv, calib_data=words, eval_data=words, **more)
    build(BuildOptions(tiny_models_d64[kind][0], out, backend="cuda", dtype="fp16",
                       limits=LIMITS, gpu_arch="sm_90a", quant=q), log=lambda _: None)
    assert _check_launches(_plan(out)) > 100
