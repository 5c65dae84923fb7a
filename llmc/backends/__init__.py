"""Backends by name. Each is one place with both halves (llmc/backends/base.py):

    reference      onnxruntime on the CPU, the numerics oracle      backends/reference.py
    tensorrt       TensorRT plans (data-centre GPUs)                 backends/tensorrt/
    tensorrt-rtx   TensorRT-RTX plans (builds without a GPU)         backends/tensorrt/
    cuda           llmc's own plan: NVRTC kernels + cuBLASLt         backends/cuda/

`get` imports a backend's module only when asked, so `import llmc.backends` is cheap.
"""

from __future__ import annotations

import importlib

from llmc.backends.base import Backend, Log, Lowered, Session
from llmc.errors import LlmcError

_MODULES = {
    "reference": "llmc.backends.reference",
    "tensorrt": "llmc.backends.tensorrt",
    "tensorrt-rtx": "llmc.backends.tensorrt",
    "cuda": "llmc.backends.cuda",
}
NAMES = tuple(_MODULES)
# `auto` tries these in order and takes the first that can run here.
AUTO_ORDER = ("tensorrt", "tensorrt-rtx", "cuda", "reference")


def get(name: str, **options) -> Backend:
    """options: build-time settings of that backend (cuda: gpu_arch)."""
    if name not in _MODULES:
        raise LlmcError(f"unknown backend {name!r}; choose auto or one of {', '.join(NAMES)}")
    return importlib.import_module(_MODULES[name]).backend(name, **options)


def pick(requested: str, log: Log) -> str:
    """`auto` -> the first of AUTO_ORDER that this machine can run, said with the reason."""
    if requested != "auto":
        get(requested)  # an unknown name is an error here, not after the build
        return requested
    skipped = []
    for name in AUTO_ORDER:
        ok, why = get(name).available()
        if ok:
            note = f" ({'; '.join(skipped)})" if skipped else ""
            log(f"backend auto -> {name}{note}")
            return name
        skipped.append(f"not {name}: {why}")
    raise LlmcError("no backend can run on this machine: " + "; ".join(skipped))


__all__ = ["AUTO_ORDER", "Backend", "Lowered", "NAMES", "Session", "get", "pick"]
