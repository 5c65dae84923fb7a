"""Fixtures of the GPU kernel tests: the kernels on torch tensors, and poisoned outputs."""
import pytest


@pytest.fixture(scope="module")
def K():
    from llmc.plugins.launch import Kernels

    return Kernels()


@pytest.fixture
def poison(monkeypatch):
    """torch.empty gives NaN-filled (or, for integers, -7-filled) tensors, so an output
    element a kernel skips fails the check."""
    import torch

    real_empty = torch.empty

    def poisoned(*a, **k):
        out = real_empty(*a, **k)
        return out.fill_(float("nan") if out.is_floating_point() else -7)
    monkeypatch.setattr(torch, "empty", poisoned)
