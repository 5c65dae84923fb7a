"""llmc.arrays: the tiled transpose the build moves every GEMM weight with."""
import numpy as np
import pytest

from llmc.arrays import TILE, transposed


@pytest.mark.parametrize("shape", [(1, 1), (3, 700), (TILE, TILE), (TILE + 1, 2 * TILE - 1),
                                   (1000, 64), (576, 1536)])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.uint8, np.uint16])
def test_transposed_is_numpys_transpose_contiguous(shape, dtype):
    a = (np.arange(np.prod(shape)) % 251).astype(dtype).reshape(shape)
    t = transposed(a)
    assert t.flags.c_contiguous and t.dtype == a.dtype
    np.testing.assert_array_equal(t, a.T)
    out = np.full(shape[::-1], 7, dtype)
    assert transposed(a, out) is out
    np.testing.assert_array_equal(out, a.T)
