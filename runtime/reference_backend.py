"""The reference backend: onnxruntime runs one engine step on the CPU.

It executes the very graph that TensorRT lowers (fused nodes through their ONNX function
bodies), so it is the numerics oracle and lets the whole runtime run on a laptop or in CI.
The weights stay in the engine file: the graph's initializers point into it and onnxruntime
maps them.
"""

from __future__ import annotations

import numpy as np

from llmc.engine_file import EngineFile
from llmc.graph import np_dtype


class ReferenceSession:
    name = "reference"

    def __init__(self, engine: EngineFile, threads: int | None = None):
        import onnx
        import onnxruntime as ort

        from llmc.graph import relocate_weights

        model = onnx.load_from_string(engine.section("model.onnx").tobytes())
        relocate_weights(model, engine.path.name, engine.section_range("weights.bin")[0])
        opts = ort.SessionOptions()
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                      str(engine.path.parent.resolve()))
        if threads:
            opts.intra_op_num_threads = threads
        self._sess = ort.InferenceSession(model.SerializeToString(), opts,
                                          providers=["CPUExecutionProvider"])
        io = engine.header["io"]
        self.num_layers = io["num_layers"]
        self.kv_dtype = np_dtype(io["kv_dtype"])
        self.kv_block_shape = tuple(io["kv_block_shape"])   # [kv_heads, block_size, head_dim]
        self._outputs = ["logits"] + [f"kv_cache_out_{i}" for i in range(self.num_layers)]
        self.kv: list[np.ndarray] = []

    def allocate_kv(self, num_blocks: int) -> None:
        shape = (2, num_blocks, *self.kv_block_shape)
        self.kv = [np.zeros(shape, self.kv_dtype) for _ in range(self.num_layers)]

    def step(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """Run one ragged step; the KV pools are replaced by their updated copies."""
        feeds = dict(inputs)
        feeds.update({f"kv_cache_{i}": kv for i, kv in enumerate(self.kv)})
        logits, *self.kv = self._sess.run(self._outputs, feeds)
        return logits
