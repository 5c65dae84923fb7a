"""The reference backend: onnxruntime runs the engine's graph on the CPU.

It executes the very graph that TensorRT lowers (fused nodes through their ONNX function
bodies), so it is the numerics oracle and lets the whole runtime run on a laptop or in CI.

lower: the engine keeps the ONNX graph and its weights file as two sections.
session: the graph's initializers are pointed into the engine file itself, so onnxruntime
maps the weights instead of loading them. KV pools are numpy arrays, allocated once. The
graph writes a step's K/V rows with ScatterND, which copies its whole input pool: fed the
whole pool, a step's cost would grow with the pool (issue #8 measured batch-8 decode at
82-101 ms with 104 blocks and 249-600 ms with 1024). So a step feeds the graph only the
blocks its block tables name, renumbered 0..U-1 (the pool's `num_blocks` dim is dynamic in
the contract), and copies back into the pools, in place, the blocks it wrote. The graph is
the one the other backends lower, unchanged, and computes exactly what it would on the whole
pool: it never reads a block outside the tables.

An FP8 KV cache (`--kv-cache-dtype fp8`, quantization/kv.py) cannot be written by the graph
(ScatterND takes no float8): the graph returns the step's new rows, already quantized, and
the session writes them into its E4M3 pools, in place, where the block tables put them.
onnxruntime takes and returns float8 tensors as OrtValues of raw bytes (quantization/ort.py).
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

    def scales_fp8_first_token(self) -> tuple[bool, str]:
        return True, ""   # onnxruntime runs the graph as it is written

    def can_store_kv(self, dtype: str) -> tuple[bool, str]:
        return True, ""   # an FP8 pool: the graph returns the quantized rows, the session
                          # writes them (quantization/kv.py)

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

        from llmc.quantization.ort import feed, session_options

        ort.disable_telemetry_events()   # no reporting home from a long-running session
        model = onnx.load_from_string(engine.section(GRAPH).tobytes())
        _point_weights_into(model, engine.path.name, engine.section_range(WEIGHTS)[0])
        opts = session_options(threads)   # quantized graphs computed as written
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                      str(engine.path.parent.resolve()))
        self._sess = ort.InferenceSession(model.SerializeToString(), opts,
                                          providers=["CPUExecutionProvider"])
        self.io = engine.header.io
        self._limits = engine.header.build.limits
        write = contract.kv_rows_output if self.io.kv_rows else contract.kv_cache_output
        self._outputs = [contract.LOGITS] + [write(i) for i in range(self.io.num_layers)]
        self.kv: list[np.ndarray] = []
        self._feed = feed

    def allocate_kv(self, num_blocks: int) -> None:
        """The pools, and beside each a buffer for the blocks one step names (at most every
        row's whole table plus block 0, which pads the tables): all of it allocated here,
        none a step."""
        dtype, layers = np_dtype(self.io.kv_dtype), range(self.io.num_layers)
        self.kv = [np.zeros(self.io.kv_shape(num_blocks), dtype) for _ in layers]
        most = min(num_blocks, self._limits.max_batch_size * self._limits.max_blocks_per_seq + 1)
        self._named = [np.empty(int(np.prod(self.io.kv_shape(most))), dtype) for _ in layers]

    def step(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """Run one ragged step over the blocks it names (see the module doc); the blocks it
        wrote are copied back into the pools in place."""
        if not self.kv:
            raise RuntimeError("call allocate_kv(num_blocks) before the first step")
        tables = np.asarray(inputs[contract.BLOCK_TABLES])
        used, local = np.unique(tables, return_inverse=True)     # used[local] == tables
        local = local.reshape(tables.shape).astype(np.int32)
        feeds = {**inputs, contract.BLOCK_TABLES: local}
        shape = self.io.kv_shape(used.size)
        size = int(np.prod(shape))
        for i, (kv, buf) in enumerate(zip(self.kv, self._named)):
            # (a step beyond the build limits, which onnxruntime does not enforce, gets a
            # fresh array)
            named = buf[:size].reshape(shape) if size <= buf.size else None
            feeds[contract.kv_cache_input(i)] = self._feed(np.take(kv, used, axis=1, out=named),
                                                           self.io.kv_dtype)
        logits, *step_pools = self._sess.run(self._outputs, feeds)
        if self.io.kv_rows:
            self._write_rows(inputs, step_pools)
            return logits
        written = self._written(inputs, local)
        for kv, step_pool in zip(self.kv, step_pools):
            kv[:, used[written]] = step_pool[:, written]
        return logits

    def _write_rows(self, inputs: dict[str, np.ndarray], rows: list[np.ndarray]) -> None:
        """Each layer's new rows [2, T, Hkv, D] into its pool: token t of sequence s at
        position p goes to row p % block_size of block tables[s, p // block_size]."""
        starts = np.asarray(inputs[contract.SEQ_STARTS])
        seq = np.repeat(np.arange(len(starts) - 1), np.diff(starts))
        pos = np.asarray(inputs[contract.POSITION_IDS])
        block = np.asarray(inputs[contract.BLOCK_TABLES])[seq, pos // self.io.block_size]
        row = pos % self.io.block_size
        for kv, new in zip(self.kv, rows):
            # advanced indices around a slice put T first: kv[:, block, :, row] is [T, 2, Hkv, D]
            kv[:, block, :, row] = new.view(kv.dtype).transpose(1, 0, 2, 3)

    def _written(self, inputs: dict[str, np.ndarray], local: np.ndarray) -> np.ndarray:
        """The (renumbered) blocks this step's new tokens were written into: token t of
        sequence s at position p goes to block local[s, p // block_size]."""
        starts = np.asarray(inputs[contract.SEQ_STARTS])
        seq = np.repeat(np.arange(len(starts) - 1), np.diff(starts))
        column = np.asarray(inputs[contract.POSITION_IDS]) // self.io.block_size
        return np.unique(local[seq, column])

    def close(self) -> None:
        self.kv, self._named = [], []


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
