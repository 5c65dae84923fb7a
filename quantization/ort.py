"""onnxruntime session options under which a quantized graph computes what it says."""

from __future__ import annotations


def session_options(threads: int | None = None):
    """onnxruntime fuses DequantizeLinear(int4) + MatMul into MatMulNBits, which by default
    quantizes the activations to int8 as well; accuracy level 0 keeps them in the graph's
    float type, so the reference backend stays the numerics oracle."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    if threads:
        opts.intra_op_num_threads = threads
    return opts


def feed(array, dtype: str):
    """A graph input onnxruntime takes: its Python binding refuses float8 numpy arrays
    ("Numpy_type 260 can't be converted"), so an FP8 array goes in as an OrtValue typed
    float8e4m3fn over the same bytes (its outputs of that type come back as uint8)."""
    if dtype != "float8e4m3fn":
        return array
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto

    return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
        np.ascontiguousarray(array).view(np.uint8), TensorProto.FLOAT8E4M3FN)
