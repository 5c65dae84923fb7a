"""The cuda backend: the model graph run as plain CUDA launches (cuBLASLt GEMMs and llmc's own
kernels) on one stream, with decode steps captured in CUDA graphs.

    gemm.py    Y = X @ W (and X @ E^T) through cuBLASLt: planned descriptors, one call per GEMM
"""
