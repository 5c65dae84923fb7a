"""The element types llmc builds in, by one name each: ONNX type, numpy dtype, aliases."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from llmc.errors import LlmcError

ONNX_TYPES = {
    "float32": TensorProto.FLOAT,
    "float16": TensorProto.FLOAT16,
    "bfloat16": TensorProto.BFLOAT16,
    "int32": TensorProto.INT32,
    "int64": TensorProto.INT64,
    # quantized weights (quantization/): stored packed, computed through DequantizeLinear
    "int4": TensorProto.INT4,
    "float8e4m3fn": TensorProto.FLOAT8E4M3FN,
}
ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16",
           "float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}
FLOAT_DTYPES = ("float32", "float16", "bfloat16")


def np_dtype(dtype: str) -> np.dtype:
    # numpy has none of these; ml_dtypes (an onnx dependency) does
    if dtype in ("bfloat16", "int4", "float8e4m3fn"):
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, {"float8e4m3fn": "float8_e4m3fn"}.get(dtype, dtype)))
    return np.dtype(dtype)


def storage_bytes(dtype: str, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor as ONNX stores it: int4 packs two values a byte."""
    n = int(np.prod(shape, dtype=np.int64))
    return (n + 1) // 2 if dtype == "int4" else n * np_dtype(dtype).itemsize


def to_storage(data: np.ndarray) -> bytes:
    """A tensor's bytes as ONNX stores them. int4 (one value a byte in ml_dtypes) is packed
    two a byte, the first value in the low nibble, as the ONNX spec says."""
    if data.dtype != np_dtype("int4"):
        return data.tobytes()
    nibbles = data.reshape(-1).astype(np.int8).view(np.uint8) & 0x0F
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return (nibbles[0::2] | (nibbles[1::2] << 4)).tobytes()


def onnx_type(dtype: str) -> int:
    return ONNX_TYPES[dtype]


def normalize(dtype: str) -> str:
    """'bf16' -> 'bfloat16'; anything else a user could mean is an error naming the choices."""
    try:
        return ALIASES[dtype.lower()]
    except KeyError:
        raise LlmcError(f"unsupported dtype {dtype!r}; choose one of fp32, fp16, bf16") from None
