"""Array helpers of the build's weight handling, where gigabytes pass through numpy."""

from __future__ import annotations

import numpy as np

TILE = 256   # a tile's rows and columns: its source and destination lines stay in cache


def transposed(a: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """a.T [C, R] of a 2-D array [R, C], C-contiguous (into ``out`` if given), copied a tile at
    a time. numpy's own copy of a transposed view walks the source a column at a time, and on
    a weight of hundreds of megabytes nearly every element misses the cache: tiles moved an
    fp16 14336 x 4096 weight 2.8x faster on a 2-core VM (the build transposes every GEMM
    weight twice; bench/results/build.md)."""
    rows, cols = a.shape
    out = np.empty((cols, rows), a.dtype) if out is None else out
    for i in range(0, rows, TILE):
        for j in range(0, cols, TILE):
            out[j:j + TILE, i:i + TILE] = a[i:i + TILE, j:j + TILE].T
    return out
