"""The reference backend: onnxruntime runs the engine's graph on the CPU.

It executes the very graph that TensorRT lowers (fused nodes through their ONNX function
bodies), so it is the numerics oracle and lets the whole runtime run on a laptop or in CI.

lower: the engine keeps the ONNX graph and its weights file as two sections.
session: the graph's initializers are pointed into the engine file itself, so onnxruntime
maps the weights instead of loading them; KV pools are numpy arrays, replaced each step by
the graph's `kv_cache_out_{l}` outputs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from llmc import contract
from llmc.backends.base import Log, Lowered
from llmc.dtypes import np_dtype
from llmc.engine_file import EngineFile
from llmc.limits import BuildLimits

GRAPH, WEIGHTS = "model.onnx", "weights.bin"


class ReferenceBackend:
    name = "reference"

    def available(self) -> tuple[bool, str]:
        return True, ""

    def can_build(self) -> tuple[bool, str]:
        return True, ""

    def can_quantize(self, mode: str) -> tuple[bool, str]:
        return True, ""   # onnxruntime runs FP8 Q/DQ and block-wise INT4 DequantizeLinear

    def compute_dtype(self, dtype: str) -> str:
        # onnxruntime has no bf16 MatMul on the CPU: bf16 models compute in fp32 on weights
        # rounded to bf16.
        return "float32" if dtype == "bfloat16" else dtype

    def lower(self, onnx_path: Path, limits: BuildLimits, log: Log) -> Lowered:
        import onnxruntime

        return Lowered({GRAPH: onnx_path, WEIGHTS: onnx_path.parent / WEIGHTS},
                       versions={"onnxruntime": onnxruntime.__version__})

    def open(self, engine: EngineFile, log: Log | None = None,
             **options) -> "ReferenceSession":
        return ReferenceSession(engine, **options)


def backend(name: str) -> ReferenceBackend:
    return ReferenceBackend()


class ReferenceSession:
    def __init__(self, engine: EngineFile, threads: int | None = None):
        import onnx
        import onnxruntime as ort

        from llmc.quantization.ort import session_options

        ort.disable_telemetry_events()   # no reporting home from a long-running session
        model = onnx.load_from_string(engine.section(GRAPH).tobytes())
        _point_weights_into(model, engine.path.name, engine.section_range(WEIGHTS)[0])
        opts = session_options(threads)   # quantized graphs computed as written
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                      str(engine.path.parent.resolve()))
        self._sess = ort.InferenceSession(model.SerializeToString(), opts,
                                          providers=["CPUExecutionProvider"])
        self.io = engine.header.io
        self._outputs = [contract.LOGITS] + [contract.kv_cache_output(i)
                                             for i in range(self.io.num_layers)]
        self.kv: list[np.ndarray] = []

    def allocate_kv(self, num_blocks: int) -> None:
        shape = self.io.kv_shape(num_blocks)
        self.kv = [np.zeros(shape, np_dtype(self.io.kv_dtype)) for _ in range(self.io.num_layers)]

    def step(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """Run one ragged step; the KV pools are replaced by their updated copies."""
        feeds = dict(inputs)
        feeds.update({contract.kv_cache_input(i): kv for i, kv in enumerate(self.kv)})
        logits, *self.kv = self._sess.run(self._outputs, feeds)
        return logits

    def close(self) -> None:
        self.kv = []


def _point_weights_into(model, location: str, shift: int) -> None:
    """Point the graph's external initializers at the engine file: same layout, moved by
    the weights section's offset."""
    for t in model.graph.initializer:
        if t.data_location != 1:  # TensorProto.EXTERNAL
            continue
        info = {e.key: e.value for e in t.external_data}
        del t.external_data[:]
        for key, value in (("location", location), ("offset", str(int(info["offset"]) + shift)),
                           ("length", info["length"])):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
