"""A thin TensorRT execution backend: one engine step per `TensorRTSession.step`.

The plan is deserialized with the runtime of the library it was built with (`tensorrt` or
`tensorrt_rtx`), device buffers come from cuda-python's runtime API, and the int32 control
tensors of the I/O contract are copied in each step; only the logits come back.

KV pools stay on the GPU. The unfused graph returns each layer's updated pool as a new
output, `kv_cache_out_{l}`, so the session keeps two device buffers per layer and swaps them
after every step: the output of step n is the input of step n+1. That costs no copy but
twice the pool memory. An engine without `kv_cache_out_{l}` outputs (the passes make the
update in place through an aliased plugin output) gets one buffer per layer.

Buffer sizes come from the engine's own optimization profile (its max shapes), so the
session does not depend on how the engine header spells the build limits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from llmc import trt_shim
from llmc.errors import LlmcError

# Compute capabilities (major, minor) whose engines each backend runs.
# TensorRT-RTX: Ampere 8.0/8.6, Ada 8.9 and Blackwell 12.x; not Hopper 9.0 or Blackwell 10.x.
RTX_CAPABILITIES = ((8, 0), (8, 6), (8, 9))
RTX_MAJOR_ANY_MINOR = (12,)
TRT_MIN_CAPABILITY = (7, 5)

KV_INPUT_PREFIX, KV_OUTPUT_PREFIX = "kv_cache_", "kv_cache_out_"

_ITEMSIZE = {"FLOAT": 4, "HALF": 2, "BF16": 2, "INT32": 4, "INT64": 8, "INT8": 1, "FP8": 1,
             "UINT8": 1, "BOOL": 1}


class BackendUnavailableError(LlmcError):
    """This machine cannot run an engine of the requested backend; the message says why."""


def capability_text(backend: str) -> str:
    if backend == "tensorrt-rtx":
        return "8.0/8.6/8.9/12.x"
    return f"{TRT_MIN_CAPABILITY[0]}.{TRT_MIN_CAPABILITY[1]} or newer"


def supports_capability(backend: str, cc: tuple[int, int]) -> bool:
    """Whether engines of `backend` run on a GPU of compute capability `cc` = (major, minor)."""
    trt_shim.check_backend(backend)
    if backend == "tensorrt-rtx":
        return cc in RTX_CAPABILITIES or cc[0] in RTX_MAJOR_ANY_MINOR
    return cc >= TRT_MIN_CAPABILITY


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    capability: tuple[int, int]
    sm_count: int = 0


def list_gpus() -> tuple[list[Gpu], str]:
    """The NVIDIA GPUs the CUDA driver reports, or ([], why none could be listed)."""
    try:
        from cuda.bindings import driver
    except ImportError:
        return [], "cuda-python is not installed: pip install cuda-python"
    try:
        (err,) = driver.cuInit(0)
    except Exception:  # the driver library itself is missing (cuda-pathfinder raises)
        return [], "no CUDA driver"
    if err != driver.CUresult.CUDA_SUCCESS:
        return [], f"the CUDA driver did not initialise ({err.name})"
    err, count = driver.cuDeviceGetCount()
    if err != driver.CUresult.CUDA_SUCCESS or count == 0:
        return [], "no CUDA device"
    attr = driver.CUdevice_attribute
    gpus = []
    for index in range(count):
        _, dev = driver.cuDeviceGet(index)
        _, raw = driver.cuDeviceGetName(256, dev)
        _, major = driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
                                               dev)
        _, minor = driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
                                               dev)
        _, sms = driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, dev)
        name = raw.split(b"\0", 1)[0].decode(errors="replace")
        gpus.append(Gpu(index, name, (major, minor), sms))
    return gpus, ""


def pick_gpu(backend: str) -> tuple[Gpu | None, str]:
    """The first GPU that runs `backend` engines, or (None, a sentence saying why none)."""
    need = (
        f"this engine was built for {backend} and needs an NVIDIA GPU of compute capability "
        f"{capability_text(backend)}"
    )
    gpus, why = list_gpus()
    if not gpus:
        return None, f"{need}; none found ({why})"
    for gpu in gpus:
        if supports_capability(backend, gpu.capability):
            return gpu, ""
    found = ", ".join(f"{g.name} ({g.capability[0]}.{g.capability[1]})" for g in gpus)
    return None, f"{need}; this machine has {found}, which it does not support"


def available(backend: str) -> tuple[bool, str]:
    """Whether this machine can run an engine of `backend`, and if not, why (a sentence)."""
    ok, why = trt_shim.is_importable(backend)
    if not ok:
        return False, why
    gpu, why = pick_gpu(backend)
    return gpu is not None, why


# ---------------------------------------------------------------- device memory


def _cuda(result):
    """Unwrap a cuda-python (err, *values) tuple; raise on an error code."""
    from cuda.bindings import runtime as cudart

    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        _, text = cudart.cudaGetErrorString(err)
        raise RuntimeError(f"CUDA error {err.name}: {text.decode(errors='replace')}")
    return values[0] if len(values) == 1 else values


class DeviceBuffer:
    """A cudaMalloc'd allocation of `nbytes`, freed by `free()`."""

    def __init__(self, nbytes: int) -> None:
        from cuda.bindings import runtime as cudart

        self.nbytes = max(int(nbytes), 1)
        self.ptr = int(_cuda(cudart.cudaMalloc(self.nbytes)))

    def free(self) -> None:
        from cuda.bindings import runtime as cudart

        if self.ptr:
            _cuda(cudart.cudaFree(self.ptr))
            self.ptr = 0


# ---------------------------------------------------------------- the session


class TensorRTSession:
    """Runs one engine step at a time on the GPU; owns the KV pools (see the module doc)."""

    def __init__(self, plan: bytes, backend: str, header: dict[str, Any]) -> None:
        ok, why = trt_shim.is_importable(backend)
        gpu, why = pick_gpu(backend) if ok else (None, why)
        if gpu is None:
            raise BackendUnavailableError(why)
        from cuda.bindings import runtime as cudart

        self.backend, self.header, self.gpu = backend, header, gpu
        _cuda(cudart.cudaSetDevice(gpu.index))
        self.trt = trt_shim.import_trt(backend)
        self.engine = self._deserialize(plan)
        self.context = self.engine.create_execution_context()
        self.stream = _cuda(cudart.cudaStreamCreate())
        self.io = self._io_tensors()
        self.buffers: dict[str, DeviceBuffer] = {}
        for name, info in self.io.items():
            if not name.startswith(KV_INPUT_PREFIX):  # KV pools: allocate_kv
                self.buffers[name] = DeviceBuffer(_nbytes(info["max"], info["dtype"]))
        self.kv: dict[int, list[DeviceBuffer]] = {}
        self.num_blocks = 0

    def _deserialize(self, plan: bytes):
        trt = self.trt
        runtime = trt.Runtime(trt_shim.get_logger(trt))
        self._runtime = runtime  # the engine must not outlive its runtime
        if hasattr(runtime, "get_engine_validity"):  # tensorrt_rtx: says *why* a plan won't load
            validity, diagnostics = runtime.get_engine_validity(plan)
            if validity == trt.EngineValidity.INVALID:
                raise BackendUnavailableError(
                    f"the {self.backend} plan cannot run on {self.gpu.name}: "
                    f"{_diagnostics_text(trt, diagnostics)}"
                )
        engine = runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise RuntimeError(
                f"{self.backend} could not deserialize the plan (built by another library "
                f"version? this is {trt_shim.library_version(trt)}); see the log above"
            )
        return engine

    def _io_tensors(self) -> dict[str, dict[str, Any]]:
        engine, trt = self.engine, self.trt
        io = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            info = {"input": is_input, "dtype": engine.get_tensor_dtype(name).name}
            if is_input:
                lo, _, hi = engine.get_tensor_profile_shape(name, 0)
                info.update(min=tuple(lo), max=tuple(hi))
            io[name] = info
        for name, info in io.items():  # outputs: the max shape follows the inputs' max
            if not info["input"]:
                info["max"] = self._max_output_shape(name, io)
        return io

    def _max_output_shape(self, name: str, io: dict) -> tuple[int, ...]:
        if name.startswith(KV_OUTPUT_PREFIX):
            return io[KV_INPUT_PREFIX + name[len(KV_OUTPUT_PREFIX):]]["max"]
        shape = list(self.engine.get_tensor_shape(name))
        if name == "logits" and shape[0] == -1:
            shape[0] = io["context_lens"]["max"][0]  # [batch, vocab]
        if -1 in shape:
            raise RuntimeError(f"cannot size output {name!r} of shape {shape}")
        return tuple(shape)

    @property
    def num_layers(self) -> int:
        return sum(1 for n, i in self.io.items() if i["input"] and n.startswith(KV_INPUT_PREFIX))

    def allocate_kv(self, num_blocks: int) -> None:
        """Allocate (zeroed) every layer's KV pool with `num_blocks` blocks on the GPU."""
        from cuda.bindings import runtime as cudart

        lo, hi = self.io[f"{KV_INPUT_PREFIX}0"]["min"][1], self.io[f"{KV_INPUT_PREFIX}0"]["max"][1]
        if not lo <= num_blocks <= hi:
            raise ValueError(f"num_blocks must be within the engine's range {lo}..{hi}")
        self.free_kv()
        for layer in range(self.num_layers):
            info = self.io[f"{KV_INPUT_PREFIX}{layer}"]
            shape = (info["max"][0], num_blocks, *info["max"][2:])
            swap = f"{KV_OUTPUT_PREFIX}{layer}" in self.io
            self.kv[layer] = [DeviceBuffer(_nbytes(shape, info["dtype"])) for _ in range(1 + swap)]
            for buf in self.kv[layer]:
                _cuda(cudart.cudaMemsetAsync(buf.ptr, 0, buf.nbytes, self.stream))
        self.num_blocks = num_blocks
        _cuda(cudart.cudaStreamSynchronize(self.stream))

    def step(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """One engine step: copy the int32 control tensors in, run, return logits [B, vocab]."""
        from cuda.bindings import runtime as cudart

        if not self.kv:
            raise RuntimeError("call allocate_kv(num_blocks) before the first step")
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        host = self._control_arrays(inputs)  # kept alive until the stream is synchronized
        for name, array in host.items():
            self.context.set_input_shape(name, array.shape)
            _cuda(cudart.cudaMemcpyAsync(self.buffers[name].ptr, array.ctypes.data,
                                         array.nbytes, h2d, self.stream))
            self.context.set_tensor_address(name, self.buffers[name].ptr)
        self._bind_kv()
        self.context.set_tensor_address("logits", self.buffers["logits"].ptr)
        if not self.context.execute_async_v3(int(self.stream)):
            raise RuntimeError(f"{self.backend} execute_async_v3 failed; see the log above")
        logits = np.empty(tuple(self.context.get_tensor_shape("logits")), np.float32)
        _cuda(cudart.cudaMemcpyAsync(logits.ctypes.data, self.buffers["logits"].ptr,
                                     logits.nbytes, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost,
                                     self.stream))
        _cuda(cudart.cudaStreamSynchronize(self.stream))
        for pair in self.kv.values():
            pair.reverse()  # this step's output pool is the next step's input
        return logits

    def _control_arrays(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        wanted = {n for n, i in self.io.items() if i["input"] and not n.startswith("kv_cache")}
        if set(inputs) != wanted:
            raise ValueError(
                f"step inputs must be exactly {sorted(wanted)}; missing "
                f"{sorted(wanted - set(inputs))}, unexpected {sorted(set(inputs) - wanted)}"
            )
        arrays = {}
        for name, value in inputs.items():
            array = np.ascontiguousarray(value, dtype=np.int32)
            lo, hi = self.io[name]["min"], self.io[name]["max"]
            inside = all(a <= s <= b for a, s, b in zip(lo, array.shape, hi))
            if array.ndim != len(lo) or not inside:
                raise ValueError(
                    f"input {name!r} of shape {array.shape} is outside the engine's "
                    f"limits {lo}..{hi}"
                )
            arrays[name] = array
        return arrays

    def _bind_kv(self) -> None:
        for layer, pair in self.kv.items():
            name = f"{KV_INPUT_PREFIX}{layer}"
            shape = (self.io[name]["max"][0], self.num_blocks, *self.io[name]["max"][2:])
            self.context.set_input_shape(name, shape)
            self.context.set_tensor_address(name, pair[0].ptr)
            if len(pair) == 2:
                self.context.set_tensor_address(f"{KV_OUTPUT_PREFIX}{layer}", pair[1].ptr)

    def free_kv(self) -> None:
        for pair in self.kv.values():
            for buf in pair:
                buf.free()
        self.kv, self.num_blocks = {}, 0

    def close(self) -> None:
        """Free every device buffer and the stream."""
        from cuda.bindings import runtime as cudart

        self.free_kv()
        for buf in self.buffers.values():
            buf.free()
        self.buffers = {}
        if self.stream is not None:
            _cuda(cudart.cudaStreamDestroy(self.stream))
            self.stream = None

    def __enter__(self) -> "TensorRTSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _nbytes(shape, dtype_name: str) -> int:
    if dtype_name not in _ITEMSIZE:
        raise ValueError(f"no element size known for TensorRT dtype {dtype_name}")
    return int(np.prod(shape, dtype=np.int64)) * _ITEMSIZE[dtype_name]


def _diagnostics_text(trt, diagnostics: int) -> str:
    flags = [f.name for f in trt.EngineInvalidityDiagnostics.__members__.values()
             if int(diagnostics) & int(f)]
    return ", ".join(flags) or "no diagnostic given"
