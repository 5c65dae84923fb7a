"""Run-time compilation of plugins/kernels/*.cu with NVRTC from the nvidia-cuda-nvrtc wheel.

No nvcc, no CUDA toolkit headers and no GPU are needed: the kernels include only the
``kernels/*.cuh`` beside them (``common.cuh``; ``paged_attention.cuh``, the attention
kernels four modules instantiate), handed to NVRTC as in-memory headers. ``compile_all``
gives the cubins the build stores in the engine, keyed by (module, arch).
"""
from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

KERNEL_DIR = Path(__file__).parent / "kernels"
MODULES = ("norm", "activation", "gemv", "qgemv", "rope", "paged_attention",
           "paged_attention_softcap", "paged_attention_e4m3", "paged_attention_softcap_e4m3",
           "glue", "sampling", "moe", "paged_attention_sm90", "qgemv_zp", "qgemv_fp8b",
           "moe_fp8b")
DEFAULT_ARCHS = ("sm_80", "sm_89", "sm_90a", "sm_100a", "sm_120")


class NvrtcError(RuntimeError):
    pass


def _check(result, what: str, prog=None):
    err = result[0] if isinstance(result, tuple) else result
    from cuda.bindings import nvrtc

    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        log = _log(prog) if prog is not None else ""
        raise NvrtcError(f"{what} failed: {err.name}\n{log}")
    if isinstance(result, tuple) and len(result) == 2:
        return result[1]
    return None


def _log(prog) -> str:
    from cuda.bindings import nvrtc

    _, n = nvrtc.nvrtcGetProgramLogSize(prog)
    buf = b" " * n
    nvrtc.nvrtcGetProgramLog(prog, buf)
    return buf.decode(errors="replace").rstrip("\x00")


def source(module: str) -> str:
    return (KERNEL_DIR / f"{module}.cu").read_text()


DTYPE_MACROS = {"float16": "LLMC_DTYPE_F16", "bfloat16": "LLMC_DTYPE_BF16"}


def compile_module(module: str, arch: str, ptx: bool = False, dtype: str | None = None
                   ) -> bytes:
    """Compile one kernels/<module>.cu for `arch` (e.g. 'sm_90a'); cubin bytes, or PTX text
    bytes when ptx=True (TensorRT's ahead-of-time plugin API accepts either). ``dtype``
    ("float16" or "bfloat16"): only that compute dtype's entry points (common.cuh: LLMC_F16,
    LLMC_BF16), as an engine of that dtype runs; None: both."""
    src = source(module)
    if dtype is not None:
        if dtype not in DTYPE_MACROS:
            raise ValueError(f"kernels compile for float16 or bfloat16, not {dtype!r}")
        src = f"#define {DTYPE_MACROS[dtype]}\n{src}"
    return _compile_cached(module, arch, ptx, src, _headers())


def _headers() -> tuple[tuple[bytes, bytes], ...]:
    """(name, text) of every kernels/*.cuh, the headers a module may include."""
    return tuple((p.name.encode(), p.read_bytes()) for p in sorted(KERNEL_DIR.glob("*.cuh")))


@functools.lru_cache(maxsize=None)
def _compile_cached(module: str, arch: str, ptx: bool, src: str,
                    headers: tuple[tuple[bytes, bytes], ...] | None = None) -> bytes:
    """headers: as _headers() gives them (part of the cache key); None reads them now."""
    from cuda.bindings import nvrtc

    headers = _headers() if headers is None else headers
    prog = _check(nvrtc.nvrtcCreateProgram(src.encode(), f"{module}.cu".encode(), len(headers),
                                           [text for _, text in headers],
                                           [name for name, _ in headers]),
                  "nvrtcCreateProgram")
    target = arch.replace("sm_", "compute_") if ptx else arch
    opts = [f"--gpu-architecture={target}".encode(), b"-std=c++17", b"-lineinfo"]
    try:
        _check(nvrtc.nvrtcCompileProgram(prog, len(opts), opts), f"compile {module} {arch}", prog)
        if ptx:
            n = _check(nvrtc.nvrtcGetPTXSize(prog), "nvrtcGetPTXSize")
            buf = b" " * n
            _check(nvrtc.nvrtcGetPTX(prog, buf), "nvrtcGetPTX")
        else:
            n = _check(nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
            buf = b" " * n
            _check(nvrtc.nvrtcGetCUBIN(prog, buf), "nvrtcGetCUBIN")
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
    return bytes(buf)


def compile_all(archs=DEFAULT_ARCHS, modules=MODULES, dtype: str | None = None
                ) -> dict[tuple[str, str], bytes]:
    """Cubins for every kernel module and arch, keyed by (module, arch); ``dtype``: that
    compute dtype's entry points alone (compile_module).

    NVRTC releases the GIL and may compile distinct programs from several threads at once,
    so the (module, arch) pairs compile in parallel: the build's wait shrinks with its cores.
    The largest sources start first, so no long compile is left to run alone at the end."""
    jobs = sorted(((m, a) for a in archs for m in modules), key=lambda j: -len(source(j[0])))
    with ThreadPoolExecutor(max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        return dict(zip(jobs, pool.map(lambda job: compile_module(*job, dtype=dtype), jobs)))


def nvrtc_version() -> tuple[int, int]:
    from cuda.bindings import nvrtc

    _, major, minor = nvrtc.nvrtcVersion()
    return major, minor
