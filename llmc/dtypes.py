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
}
ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16",
           "float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}
FLOAT_DTYPES = ("float32", "float16", "bfloat16")


def np_dtype(dtype: str) -> np.dtype:
    if dtype == "bfloat16":  # numpy has none; ml_dtypes (an onnx dependency) does
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(dtype)


def onnx_type(dtype: str) -> int:
    return ONNX_TYPES[dtype]


def normalize(dtype: str) -> str:
    """'bf16' -> 'bfloat16'; anything else a user could mean is an error naming the choices."""
    try:
        return ALIASES[dtype.lower()]
    except KeyError:
        raise LlmcError(f"unsupported dtype {dtype!r}; choose one of fp32, fp16, bf16") from None
