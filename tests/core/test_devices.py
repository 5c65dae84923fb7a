"""llmc.devices without a GPU: capability tables and the CUDA error check."""
import pytest

from llmc import devices


def test_arch_for_capability():
    assert devices.arch_for_capability(9, 0) == "sm_90a"
    assert devices.arch_for_capability(10, 0) == "sm_100a"
    assert devices.arch_for_capability(8, 9) == "sm_89"
    assert devices.Gpu(0, "H100", (9, 0)).arch == "sm_90a"


def test_max_smem_for_capability_refuses_unknown():
    assert devices.max_smem_for_capability(8, 6) == 99 * 1024
    with pytest.raises(ValueError, match="7.5"):
        devices.max_smem_for_capability(7, 5)


def test_check_unwraps_or_raises():
    assert devices.check((0,)) is None
    assert devices.check((0, 7)) == 7
    assert devices.check((0, 7, 8)) == [7, 8]
    with pytest.raises(devices.CudaError, match="CUDA error 2"):
        devices.check((2, None))
