"""GPUs: discovery through the CUDA driver, capability tables, and the one CUDA error check.

Everything that asks "which GPU is here and what can it do" lives here, so backends, the
kernel launcher and the TensorRT glue share one answer. Nothing is imported until a function
is called: `import llmc.devices` works on a machine without CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass

# Shared memory one block may opt into (cuFuncSetAttribute), by compute capability: CUDA C++
# Programming Guide, "Memory Information per Compute Capability", row "Maximum amount of
# shared memory per thread block". For planning without a device; with one, read
# device_max_smem().
MAX_SMEM_OPTIN = {(8, 0): 163 * 1024, (8, 6): 99 * 1024, (8, 9): 99 * 1024,
                  (9, 0): 227 * 1024, (10, 0): 227 * 1024, (12, 0): 99 * 1024}

# Compute capabilities (major, minor) whose engines each TensorRT library runs.
# TensorRT-RTX: Ampere 8.0/8.6, Ada 8.9 and Blackwell 12.x; not Hopper 9.0 or Blackwell 10.x.
RTX_CAPABILITIES = ((8, 0), (8, 6), (8, 9))
RTX_MAJOR_ANY_MINOR = (12,)
TRT_MIN_CAPABILITY = (7, 5)


class CudaError(RuntimeError):
    """A CUDA driver or runtime call failed; the message names the call's error code."""


def check(result):
    """Unwrap a cuda-python result tuple ``(err, *values)`` from the driver or runtime API.

    Raises CudaError on a failure code; returns None, the one value, or the list of values.
    """
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:  # CUDA_SUCCESS and cudaSuccess are both 0
        raise CudaError(f"CUDA error {getattr(err, 'name', err)}{_error_text(err)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def _error_text(err) -> str:
    try:
        from cuda.bindings import driver, runtime

        if isinstance(err, driver.CUresult):
            _, text = driver.cuGetErrorString(err)
        else:
            _, text = runtime.cudaGetErrorString(err)
        return f": {text.decode(errors='replace')}" if text else ""
    except Exception:  # the message is a courtesy: never mask the error itself
        return ""


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    capability: tuple[int, int]
    sm_count: int = 0

    @property
    def arch(self) -> str:
        return arch_for_capability(*self.capability)


def arch_for_capability(major: int, minor: int) -> str:
    """The NVRTC target for a GPU: the arch-specific 'a' variant where it unlocks features."""
    base = f"sm_{major}{minor}"
    return base + "a" if (major, minor) in ((9, 0), (10, 0)) else base


def max_smem_for_capability(major: int, minor: int) -> int:
    """Per-block opt-in shared memory of a compute capability (MAX_SMEM_OPTIN)."""
    if (major, minor) not in MAX_SMEM_OPTIN:
        known = ", ".join(f"{a}.{b}" for a, b in MAX_SMEM_OPTIN)
        raise ValueError(f"no shared-memory limit known for compute capability "
                         f"{major}.{minor} (known: {known}); read it from the device")
    return MAX_SMEM_OPTIN[(major, minor)]


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
        dev = check(driver.cuDeviceGet(index))
        raw = check(driver.cuDeviceGetName(256, dev))
        major = check(driver.cuDeviceGetAttribute(
            attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev))
        minor = check(driver.cuDeviceGetAttribute(
            attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev))
        sms = check(driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
                                                dev))
        name = raw.split(b"\0", 1)[0].decode(errors="replace")
        gpus.append(Gpu(index, name, (major, minor), sms))
    return gpus, ""


def _device(ordinal: int | None):
    """A CUdevice: `ordinal`, or with None the device of the current CUDA context, else 0."""
    from cuda.bindings import driver

    check(driver.cuInit(0))
    if ordinal is None:
        err, dev = driver.cuCtxGetDevice()
        if err == driver.CUresult.CUDA_SUCCESS:
            return dev
        ordinal = 0
    return check(driver.cuDeviceGet(ordinal))


def device_max_smem(ordinal: int | None = None) -> int:
    """Shared memory one block may opt into on a device (attention plans respect it).
    ordinal None: the device of the current CUDA context, else device 0."""
    from cuda.bindings import driver

    attr = driver.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
    return check(driver.cuDeviceGetAttribute(attr, _device(ordinal)))


def device_capability(ordinal: int | None = None) -> tuple[int, int]:
    """(major, minor) compute capability of a device; ordinal as in device_max_smem."""
    from cuda.bindings import driver

    dev = _device(ordinal)
    attr = driver.CUdevice_attribute
    return (check(driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
                                              dev)),
            check(driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
                                              dev)))


# ---------------------------------------------------------------- which backend runs where


def capability_text(backend: str) -> str:
    if backend == "tensorrt-rtx":
        return "8.0/8.6/8.9/12.x"
    return f"{TRT_MIN_CAPABILITY[0]}.{TRT_MIN_CAPABILITY[1]} or newer"


def trt_supports(backend: str, cc: tuple[int, int]) -> bool:
    """Whether engines of a TensorRT `backend` run on a GPU of compute capability `cc`."""
    if backend == "tensorrt-rtx":
        return cc in RTX_CAPABILITIES or cc[0] in RTX_MAJOR_ANY_MINOR
    if backend == "tensorrt":
        return cc >= TRT_MIN_CAPABILITY
    raise ValueError(f"unknown TensorRT backend {backend!r}")


def pick_trt_gpu(backend: str) -> tuple[Gpu | None, str]:
    """The first GPU that runs `backend` engines, or (None, a sentence saying why none)."""
    need = (
        f"{backend} engines need an NVIDIA GPU of compute capability "
        f"{capability_text(backend)}"
    )
    gpus, why = list_gpus()
    if not gpus:
        return None, f"{need}; none found ({why})"
    for gpu in gpus:
        if trt_supports(backend, gpu.capability):
            return gpu, ""
    found = ", ".join(f"{g.name} ({g.capability[0]}.{g.capability[1]})" for g in gpus)
    return None, f"{need}; this machine has {found}, which it does not support"
