"""Quantization of the fused graph: FP8 W8A8, INT4 weight-only (RTN, AWQ), and the accuracy
each quantized build measures (docs/quantization.md).

    quantize.py  the build's step: options, calibration, the rewrite, the accuracy report
    qdq.py       the rewrites: Q/DQ around each weight GEMM (passes/pattern.py passes)
    numerics.py  the quantizers and their numpy references; AWQ's scale search
    measure.py   onnxruntime over a saved graph: calibration statistics, perplexity
    ort.py       the onnxruntime options that run a Q/DQ graph as written (the reference
                 backend's too, so this package imports no build-time code here)
"""
