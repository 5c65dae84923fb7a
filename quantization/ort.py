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
