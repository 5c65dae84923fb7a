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

from typing import Any

import numpy as np

from llmc import contract
from llmc.backends.tensorrt import shim
from llmc.devices import check, pick_trt_gpu
from llmc.errors import LlmcError

_ITEMSIZE = {"FLOAT": 4, "HALF": 2, "BF16": 2, "INT32": 4, "INT64": 8, "INT8": 1, "FP8": 1,
             "UINT8": 1, "BOOL": 1}


class BackendUnavailableError(LlmcError):
    """This machine cannot run an engine of the requested backend; the message says why."""


def available(backend: str) -> tuple[bool, str]:
    """Whether this machine can run an engine of `backend`, and if not, why (a sentence)."""
    ok, why = shim.is_importable(backend)
    if not ok:
        return False, why
    gpu, why = pick_trt_gpu(backend)
    return gpu is not None, why


# ---------------------------------------------------------------- device memory


class DeviceBuffer:
    """A cudaMalloc'd allocation of `nbytes`, freed by `free()`."""

    def __init__(self, nbytes: int) -> None:
        from cuda.bindings import runtime as cudart

        self.nbytes = max(int(nbytes), 1)
        self.ptr = int(check(cudart.cudaMalloc(self.nbytes)))

    def free(self) -> None:
        from cuda.bindings import runtime as cudart

        if self.ptr:
            check(cudart.cudaFree(self.ptr))
            self.ptr = 0


# ---------------------------------------------------------------- the session


class TensorRTSession:
    """Runs one engine step at a time on the GPU; owns the KV pools (see the module doc)."""

    def __init__(self, plan: bytes, backend: str) -> None:
        ok, why = shim.is_importable(backend)
        gpu, why = pick_trt_gpu(backend) if ok else (None, why)
        if gpu is None:
            raise BackendUnavailableError(why)
        from cuda.bindings import runtime as cudart

        self.backend, self.gpu = backend, gpu
        check(cudart.cudaSetDevice(gpu.index))
        self.trt = shim.import_trt(backend)
        self.engine = self._deserialize(plan)
        self.context = self.engine.create_execution_context()
        self.stream = check(cudart.cudaStreamCreate())
        self.io = self._io_tensors()
        self.buffers: dict[str, DeviceBuffer] = {}
        for name, info in self.io.items():
            if contract.kv_layer(name) is None:  # KV pools: allocate_kv
                self.buffers[name] = DeviceBuffer(_nbytes(info["max"], info["dtype"]))
        self.kv: dict[int, list[DeviceBuffer]] = {}
        self.num_blocks = 0

    def _deserialize(self, plan: bytes):
        trt = self.trt
        if self.backend == "tensorrt":
            # PagedAttention is a class-based IPluginV3: its creator must be registered
            # before a plan that holds it can be deserialized (the ahead-of-time plugins
            # travel inside the plan and need nothing).
            from llmc.plugins.trt_paged_attention import register_paged_attention

            register_paged_attention(self.gpu.arch, self.gpu.sm_count)
        runtime = trt.Runtime(shim.get_logger(trt))
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
                f"version? this is {shim.library_version(trt)}); see the log above"
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
        if contract.is_kv_output(name):
            return io[contract.kv_cache_input(contract.kv_layer(name))]["max"]
        shape = list(self.engine.get_tensor_shape(name))
        if name == contract.LOGITS and shape[0] == -1:
            shape[0] = io[contract.CONTEXT_LENS]["max"][0]  # [batch, vocab]
        if -1 in shape:
            raise RuntimeError(f"cannot size output {name!r} of shape {shape}")
        return tuple(shape)

    @property
    def num_layers(self) -> int:
        return sum(1 for n, i in self.io.items() if i["input"] and contract.kv_layer(n) is not None)

    def allocate_kv(self, num_blocks: int) -> None:
        """Allocate (zeroed) every layer's KV pool with `num_blocks` blocks on the GPU."""
        from cuda.bindings import runtime as cudart

        pool0 = self.io[contract.kv_cache_input(0)]
        lo, hi = pool0["min"][1], pool0["max"][1]
        if not lo <= num_blocks <= hi:
            raise ValueError(f"num_blocks must be within the engine's range {lo}..{hi}")
        self.free_kv()
        for layer in range(self.num_layers):
            info = self.io[contract.kv_cache_input(layer)]
            shape = (info["max"][0], num_blocks, *info["max"][2:])
            swap = contract.kv_cache_output(layer) in self.io
            self.kv[layer] = [DeviceBuffer(_nbytes(shape, info["dtype"])) for _ in range(1 + swap)]
            for buf in self.kv[layer]:
                check(cudart.cudaMemsetAsync(buf.ptr, 0, buf.nbytes, self.stream))
        self.num_blocks = num_blocks
        check(cudart.cudaStreamSynchronize(self.stream))

    def step(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """One engine step: copy the int32 control tensors in, run, return logits [B, vocab]."""
        from cuda.bindings import runtime as cudart

        if not self.kv:
            raise RuntimeError("call allocate_kv(num_blocks) before the first step")
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        host = self._control_arrays(inputs)  # kept alive until the stream is synchronized
        for name, array in host.items():
            self.context.set_input_shape(name, array.shape)
            check(cudart.cudaMemcpyAsync(self.buffers[name].ptr, array.ctypes.data,
                                         array.nbytes, h2d, self.stream))
            self.context.set_tensor_address(name, self.buffers[name].ptr)
        self._bind_kv()
        self.context.set_tensor_address(contract.LOGITS, self.buffers[contract.LOGITS].ptr)
        if not self.context.execute_async_v3(int(self.stream)):
            raise RuntimeError(f"{self.backend} execute_async_v3 failed; see the log above")
        logits = np.empty(tuple(self.context.get_tensor_shape(contract.LOGITS)), np.float32)
        check(cudart.cudaMemcpyAsync(logits.ctypes.data, self.buffers[contract.LOGITS].ptr,
                                     logits.nbytes, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost,
                                     self.stream))
        check(cudart.cudaStreamSynchronize(self.stream))
        for pair in self.kv.values():
            pair.reverse()  # this step's output pool is the next step's input
        return logits

    def _control_arrays(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        wanted = {n for n, i in self.io.items() if i["input"] and contract.kv_layer(n) is None}
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
            name = contract.kv_cache_input(layer)
            shape = (self.io[name]["max"][0], self.num_blocks, *self.io[name]["max"][2:])
            self.context.set_input_shape(name, shape)
            self.context.set_tensor_address(name, pair[0].ptr)
            if len(pair) == 2:
                self.context.set_tensor_address(contract.kv_cache_output(layer), pair[1].ptr)

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
            check(cudart.cudaStreamDestroy(self.stream))
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
