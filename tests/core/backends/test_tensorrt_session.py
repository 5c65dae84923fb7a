"""The TensorRT execution backend: what this machine can run, and (on a GPU it supports) a step.

On a CPU-only machine no engine can run: `available()` must say so in a clear sentence, and
the session must refuse with that sentence. The engine test runs only where a GPU that the
backend supports is present (TensorRT-RTX: 8.0/8.6/8.9/12.x, not Hopper).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from llmc import devices
from llmc.backends.tensorrt.session import BackendUnavailableError, TensorRTSession, available
from llmc.devices import list_gpus, trt_supports

HAVE_RTX = importlib.util.find_spec("tensorrt_rtx") is not None
GPUS, NO_GPU_REASON = list_gpus()
RTX_OK, RTX_REASON = available("tensorrt-rtx")


@pytest.mark.parametrize(
    "cc, rtx, trt",
    [
        ((7, 5), False, True),
        ((8, 0), True, True),
        ((8, 6), True, True),
        ((8, 7), False, True),  # Jetson Orin: not an RTX-supported compute capability
        ((8, 9), True, True),
        ((9, 0), False, True),  # Hopper (H100/H200): TensorRT-RTX engines do not run there
        ((10, 0), False, True),
        ((12, 0), True, True),
        ((12, 1), True, True),
        ((7, 0), False, False),
    ],
)
def test_supported_compute_capabilities(cc, rtx, trt):
    assert trt_supports("tensorrt-rtx", cc) is rtx
    assert trt_supports("tensorrt", cc) is trt


def test_unknown_backend_is_an_error():
    with pytest.raises(ValueError, match="unknown TensorRT backend 'onnxruntime'"):
        available("onnxruntime")
    with pytest.raises(ValueError, match="unknown TensorRT backend 'onnxruntime'"):
        trt_supports("onnxruntime", (9, 0))


@pytest.mark.skipif(bool(GPUS), reason="this machine has an NVIDIA GPU")
def test_rtx_not_available_without_a_gpu():
    if not HAVE_RTX:
        pytest.skip("tensorrt_rtx is not installed (llmc[rtx])")
    ok, reason = available("tensorrt-rtx")
    assert not ok
    assert reason.startswith(
        "tensorrt-rtx engines need an NVIDIA GPU of compute "
        "capability 8.0/8.6/8.9/12.x; none found ("
    )
    assert NO_GPU_REASON in reason


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None,
                    reason="tensorrt is installed here")
def test_full_tensorrt_not_available_names_the_extra():
    ok, reason = available("tensorrt")
    assert not ok
    assert "pip install 'llmc[trt]'" in reason


def test_session_refuses_with_the_reason_where_it_cannot_run():
    if RTX_OK:
        pytest.skip("this machine can run tensorrt-rtx engines")
    with pytest.raises(BackendUnavailableError) as info:
        TensorRTSession(b"not a plan", "tensorrt-rtx")
    assert str(info.value) == RTX_REASON


def test_rtx_reason_names_an_unsupported_gpu(monkeypatch):
    """With a Hopper GPU present, the sentence names it and its compute capability."""
    h100 = devices.Gpu(0, "NVIDIA H100 80GB HBM3", (9, 0))
    monkeypatch.setattr(devices, "list_gpus", lambda: ([h100], ""))
    gpu, reason = devices.pick_trt_gpu("tensorrt-rtx")
    assert gpu is None
    assert reason == (
        "tensorrt-rtx engines need an NVIDIA GPU of compute capability "
        "8.0/8.6/8.9/12.x; this machine has NVIDIA H100 80GB HBM3 (9.0), which it does not "
        "support"
    )
    gpu, reason = devices.pick_trt_gpu("tensorrt")
    assert gpu is not None and gpu.capability == (9, 0) and reason == ""


@pytest.mark.gpu
@pytest.mark.skipif(not RTX_OK, reason=RTX_REASON or "tensorrt-rtx engines cannot run here")
def test_rtx_engine_step_matches_onnxruntime(tmp_path):
    """Prefill then decode through the engine; logits match onnxruntime on the same graph.

    The decode step reads K/V written by the prefill step, so it also checks that the KV
    pools stay on the GPU and that the input/output pool swap is right.
    """
    import onnxruntime as ort
    from toy_graph import LIMITS, ragged_step, toy_model

    from llmc.backends.tensorrt.lower import build_plan

    model = toy_model(tmp_path)
    plan, summary = build_plan(model, LIMITS, "tensorrt-rtx", log=lambda _: None)
    ref = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    out_names = [o.name for o in ref.get_outputs()]
    prefill = ragged_step(num_blocks=8)
    decode = {
        "input_ids": np.array([7, 9], np.int32),
        "position_ids": np.array([3, 6], np.int32),
        "seq_starts": np.array([0, 1, 2], np.int32),
        "context_lens": np.array([4, 7], np.int32),
        "block_tables": prefill["block_tables"],
        "last_token_rows": np.array([0, 1], np.int32),
    }
    with TensorRTSession(plan, "tensorrt-rtx") as session:
        session.allocate_kv(8)
        logits = []
        ref_feeds = prefill
        for step in (prefill, decode):  # loose tolerance: fp32 GEMMs may run as TF32
            control = {k: v for k, v in step.items() if not k.startswith("kv_cache")}
            logits.append(session.step(control))
            ref_out = dict(zip(out_names, ref.run(None, {**ref_feeds, **control})))
            np.testing.assert_allclose(logits[-1], ref_out["logits"], rtol=1e-2, atol=1e-2)
            ref_feeds = {f"kv_cache_{i}": ref_out[f"kv_cache_out_{i}"] for i in range(2)}
