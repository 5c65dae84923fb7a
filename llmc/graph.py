"""A small ONNX graph builder, and saving a graph with its weights streamed to disk.

Model files call ops by their ONNX names (``g.MatMul(x, w)``) inside named scopes, so node
names in a dumped graph read like the model (``layers.3.attn/MatMul_2``). Weights are
registered as lazy loaders and only materialised, one at a time, when the graph is saved:
the whole model never sits in memory twice.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from llmc.dtypes import np_dtype, onnx_type, storage_bytes, to_storage
from llmc.errors import LlmcError

OPSET = 21
# A tensor of at least WEIGHT_ALIGN bytes starts on such a boundary, which lets onnxruntime map
# it instead of copying it; a smaller one (a scale, AWQ's 1/s, a norm) on a SMALL_ALIGN one:
# onnxruntime copies it either way, and 64 KiB of padding each would be a tenth of a small
# INT4 engine (bench/results/quantization.md). 256 bytes: the cuda backend reads its weights
# where this file holds them, and cuBLASLt takes matrices (a small one too, such as
# Qwen2-MoE's [H, 1] shared-expert gate) on 256-byte boundaries (backends/cuda/plan.py ALIGN).
WEIGHT_ALIGN, SMALL_ALIGN = 1 << 16, 256


@dataclass
class Weight:
    """A named initializer whose data is produced on demand, already in its final dtype."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    load: Callable[[], np.ndarray]
    # a stack of experts [E, in, out]: each expert's checkpoint tensors, joined along out (so
    # a quantizer can take a pre-quantized checkpoint's own parts)
    stacked: tuple[tuple[str, ...], ...] = ()

    def read(self) -> np.ndarray:
        """The loaded array, checked against the config's shape and dtype (before anything,
        a fused weight's concatenation included, combines it with others)."""
        data = np.ascontiguousarray(self.load())
        if data.shape != self.shape or data.dtype != np_dtype(self.dtype):
            raise LlmcError(f"tensor {self.name} does not fit the model's config: as the "
                            f"engine stores it, it is {data.dtype}{data.shape}, the config "
                            f"needs {self.dtype}{self.shape}; is the checkpoint for this "
                            "config.json?")
        return data


@dataclass
class GraphBuilder:
    name: str
    nodes: list = field(default_factory=list)
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    consts: list = field(default_factory=list)
    weights: list[Weight] = field(default_factory=list)
    _scope: list[str] = field(default_factory=list)
    _count: int = 0

    @contextlib.contextmanager
    def scope(self, name: str) -> Iterator[None]:
        self._scope.append(name)
        try:
            yield
        finally:
            self._scope.pop()

    def _fresh(self, base: str) -> str:
        self._count += 1
        prefix = ".".join(self._scope)
        return f"{prefix}/{base}_{self._count}" if prefix else f"{base}_{self._count}"

    def input(self, name: str, elem_type: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def output(self, value: str, name: str, elem_type: int, shape: list) -> None:
        self.Identity(value, out=name)
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))

    def const(self, value, dtype=np.int64) -> str:
        name = self._fresh("const")
        self.consts.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def weight(self, name: str, dtype: str, shape: tuple[int, ...],
               load: Callable[[], np.ndarray], stacked: tuple[tuple[str, ...], ...] = ()
               ) -> str:
        self.weights.append(Weight(name, dtype, tuple(shape), load, stacked))
        return name

    def op(self, op_type: str, *inputs: str, outputs: int = 1, out: str | None = None,
           domain: str = "", **attrs):
        name = self._fresh(op_type)
        outs = [out] if out else [f"{name}:{k}" for k in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=name,
                                           domain=domain, **attrs))
        return outs[0] if outputs == 1 else outs

    def __getattr__(self, op_type: str):
        if not op_type[:1].isupper():
            raise AttributeError(op_type)
        return lambda *inputs, **attrs: self.op(op_type, *inputs, **attrs)

    def model(self) -> onnx.ModelProto:
        """The graph with weights as declared-but-empty initializers (see ``save_onnx``)."""
        placeholders = []
        for w in self.weights:
            t = TensorProto(name=w.name, data_type=onnx_type(w.dtype), dims=list(w.shape))
            t.data_location = TensorProto.EXTERNAL
            placeholders.append(t)
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs,
                                  initializer=self.consts + placeholders)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="llmc")
        model.ir_version = 10
        return model


def _set_external(t: TensorProto, location: str, offset: int, length: int) -> None:
    del t.external_data[:]
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = k, v


def _align(nbytes: int) -> int:
    return WEIGHT_ALIGN if nbytes >= WEIGHT_ALIGN else SMALL_ALIGN


def weights_file_size(weights: list[Weight]) -> int:
    """The size of the weights.bin `save_onnx` writes for `weights` (each tensor aligned)."""
    return file_size(storage_bytes(w.dtype, w.shape) for w in weights)


def file_size(tensor_bytes: Iterable[int]) -> int:
    """The size of a weights.bin of tensors of these sizes, in this order, each aligned."""
    end = 0
    for nbytes in tensor_bytes:
        end += -end % _align(nbytes) + nbytes
    return end


def save_onnx(model: onnx.ModelProto, weights: list[Weight], folder: Path,
              progress: Callable[[int, int], None] | None = None) -> Path:
    """Write folder/model.onnx and folder/weights.bin, streaming one weight at a time."""
    folder.mkdir(parents=True, exist_ok=True)
    by_name = {t.name: t for t in model.graph.initializer}
    with open(folder / "weights.bin", "wb") as f:
        for k, w in enumerate(weights):
            data = w.read()
            raw = to_storage(data)
            f.seek(-f.tell() % _align(len(raw)), os.SEEK_CUR)
            _set_external(by_name[w.name], "weights.bin", f.tell(), len(raw))
            f.write(raw)
            del data, raw
            if progress:
                progress(k + 1, len(weights))
    path = folder / "model.onnx"
    onnx.save_model(model, path)
    return path
