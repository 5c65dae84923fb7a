"""The cuda backend: llmc's own execution plan for any NVIDIA GPU, no TensorRT needed.

    lower.py    fused ONNX graph -> plan (plan.py): every node a kernel, a view or nothing;
                one activation arena; the weights section as save_onnx wrote it; cubins for
                the target architecture compiled by NVRTC (a CPU-only machine is enough)
    session.py  torch-free run time (cuda-bindings): one copy of the weights to the GPU, the
                KV pool sized from a memory budget, each step a list of launches (decode
                steps captured in CUDA graphs per batch-size bucket)
    gemm.py     cuBLASLt GEMMs (fp16/bf16, FP8 E4M3) through nvmath-python's bindings
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from llmc.backends.base import Log, Lowered
from llmc.engine_file import EngineFile
from llmc.errors import LlmcError
from llmc.limits import BuildLimits

TARGET_ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90a", "sm_100a", "sm_120")


class CudaBackend:
    name = "cuda"

    def __init__(self, gpu_arch: str | None = None):
        self.gpu_arch = gpu_arch

    def available(self) -> tuple[bool, str]:
        from llmc.backends.cuda.session import runtime_missing
        from llmc.devices import list_gpus

        missing = runtime_missing()
        if missing:
            return False, missing
        gpus, why = list_gpus()
        return (True, "") if gpus else (False, f"no NVIDIA GPU ({why})")

    def can_build(self) -> tuple[bool, str]:
        try:
            from cuda.bindings import nvrtc  # noqa: F401
        except ImportError:
            return False, "the cuda backend compiles its kernels with NVRTC: pip install " \
                          "'llmc[kernels]'"
        try:
            self.target_arch()
        except LlmcError as e:
            return False, str(e)
        return True, ""

    def compute_dtype(self, dtype: str) -> str:
        if dtype not in ("float16", "bfloat16"):
            raise LlmcError(f"the cuda backend computes in fp16 or bf16, not {dtype}; build "
                            "with --dtype fp16 or --dtype bf16")
        return dtype

    def can_quantize(self, mode: str) -> tuple[bool, str]:
        from llmc.plugins.launch_rules import FP8_ARCHS

        if mode != "fp8":
            return True, ""     # INT4 weight-only: every architecture
        return self._target_in(FP8_ARCHS, lambda arch: (
            f"FP8 engines are built for Hopper (sm_90a), and the target is {arch}: the "
            "prefill GEMMs use cuBLASLt's per-channel FP8 scaling, which NVIDIA documents for "
            "Hopper only; build with --quant int4-awq"))

    def scales_fp8_first_token(self) -> tuple[bool, str]:
        return True, ""   # the FP8 GEMMs' kernels scale those rows on their own (lower.py)

    def can_store_kv(self, dtype: str) -> tuple[bool, str]:
        """fp8: an E4M3 pool, written and read by kernels that need sm_89+."""
        from llmc.plugins.launch_rules import E4M3_ARCHS, E4M3_NEEDS

        return self._target_in(E4M3_ARCHS, lambda arch: (
            f"the cuda backend's FP8 KV cache needs {E4M3_NEEDS}, and the target is {arch}; "
            f"build with --kv-cache-dtype auto, or for --gpu-arch {', '.join(E4M3_ARCHS)}"))

    def _target_in(self, archs, why) -> tuple[bool, str]:
        """(True, "") when the target architecture is one of archs, else (False, why(arch)),
        or the reason there is no target."""
        try:
            arch = self.target_arch()
        except LlmcError as e:
            return False, str(e)
        return (True, "") if arch in archs else (False, why(arch))

    def target_arch(self) -> str:
        """--gpu-arch, else the GPU present, else a clear error asking for --gpu-arch."""
        if self.gpu_arch:
            if self.gpu_arch not in TARGET_ARCHS:
                raise LlmcError(f"unknown --gpu-arch {self.gpu_arch!r}; choose one of "
                                f"{', '.join(TARGET_ARCHS)}")
            return self.gpu_arch
        from llmc.devices import list_gpus

        gpus, why = list_gpus()
        if not gpus:
            raise LlmcError(f"the cuda backend compiles kernels for one GPU architecture and "
                            f"this machine has no GPU to ask ({why}); pass --gpu-arch, one of "
                            f"{', '.join(TARGET_ARCHS)} (sm_90a for H100/H200)")
        return gpus[0].arch

    def lower(self, onnx_path: Path, limits: BuildLimits, log: Log) -> Lowered:
        from llmc.backends.cuda.lower import lower, rewrite_weights
        from llmc.backends.cuda.plan import PLAN, WEIGHTS, cubin_section
        from llmc.plugins.compiler import compile_all, nvrtc_version

        arch = self.target_arch()
        plan = lower(onnx_path, limits, arch)
        log(f"cuda plan for {arch}: {len(plan.ops)} launches a step, arena "
            f"{plan.arena_bytes / 2**20:.1f} MiB, weights {plan.weights_bytes / 2**20:.1f} MiB")
        # weights.bin is the build's own temporary copy: rewritten in place, once
        moved = rewrite_weights(onnx_path.parent / "weights.bin", plan)
        log(f"GEMM weights stored [out, in]: {moved / 2**20:.1f} MiB rewritten")
        major, minor = nvrtc_version()
        log(f"compiling {len(plan.modules)} kernel modules for {arch}, {plan.dtype} entry points "
            f"(NVRTC {major}.{minor})")
        start = time.perf_counter()
        cubins = compile_all(archs=(arch,), modules=plan.modules, dtype=plan.dtype)
        log(f"kernels compiled in {time.perf_counter() - start:.1f} s")
        sections: dict[str, Path | bytes] = {
            PLAN: json.dumps(plan.to_dict()).encode(),
            WEIGHTS: onnx_path.parent / "weights.bin",
        }
        sections.update({cubin_section(m): cubins[(m, arch)] for m in plan.modules})
        return Lowered(sections, summary=plan_summary(plan),
                       versions={"nvrtc": f"{major}.{minor}", "gpu_arch": arch})

    def open(self, engine: EngineFile, log: Log | None = None, **options):
        from llmc.backends.cuda.session import CudaSession

        return CudaSession(engine, log=log, **options)


def plan_summary(plan) -> dict:
    """What `llmc inspect` shows of a plan: launches per kind and per layer, memory."""
    from collections import Counter

    kinds = Counter(op.op for op in plan.ops)
    return {"gpu_arch": plan.arch, "launches": len(plan.ops), "ops": dict(sorted(kinds.items())),
            "arena_bytes": plan.arena_bytes, "weights_bytes": plan.weights_bytes}


def backend(name: str, gpu_arch: str | None = None) -> CudaBackend:
    return CudaBackend(gpu_arch)
