"""The weights file save_onnx writes: tensors of 64 KiB or more on 64 KiB boundaries (so that
onnxruntime maps them), smaller ones unpadded on 64-byte ones; its size as weights_file_size
predicts (the build's free-space check); and onnxruntime runs the graph from it exactly."""
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto

from llmc.graph import SMALL_ALIGN, WEIGHT_ALIGN, GraphBuilder, save_onnx, weights_file_size


def test_large_tensors_page_aligned_small_ones_packed(tmp_path):
    rng = np.random.default_rng(0)
    # fp32 weights of 2 KiB, 64 KiB exactly, a row (512 bytes) past it, and 4 bytes
    shapes = [(16, 32), (128, 128), (128, 128), (1, 1)]
    data = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    data[2] = np.concatenate([data[2], rng.standard_normal((1, 128)).astype(np.float32)])
    g = GraphBuilder("weights")
    x = g.input("x", TensorProto.FLOAT, [1, 16])
    y = g.MatMul(x, g.weight("a", "float32", data[0].shape, lambda: data[0]))     # [1, 32]
    y = g.MatMul(g.Tile(y, g.const([1, 4])), g.weight("b", "float32", data[1].shape,
                                                      lambda: data[1]))          # [1, 128]
    y = g.MatMul(g.Concat(y, g.const(np.ones((1, 1)), np.float32), axis=1),
                 g.weight("c", "float32", data[2].shape, lambda: data[2]))       # [1, 128]
    y = g.Mul(y, g.weight("d", "float32", data[3].shape, lambda: data[3]))
    g.output(y, "y", TensorProto.FLOAT, [1, 128])
    path = save_onnx(g.model(), g.weights, tmp_path)

    offsets = {}
    model = onnx.load(str(path), load_external_data=False)
    for t in model.graph.initializer:
        info = {e.key: e.value for e in t.external_data}
        if info:
            offsets[t.name] = (int(info["offset"]), int(info["length"]))
    for name, arr in zip("abcd", data):
        offset, length = offsets[name]
        assert length == arr.nbytes
        assert offset % (WEIGHT_ALIGN if arr.nbytes >= WEIGHT_ALIGN else SMALL_ALIGN) == 0
    assert offsets["b"][0] == WEIGHT_ALIGN          # a, 2 KiB, did not take a whole page
    assert offsets["d"][0] < offsets["c"][0] + offsets["c"][1] + SMALL_ALIGN   # packed after c
    assert (tmp_path / "weights.bin").stat().st_size == weights_file_size(g.weights)

    xv = rng.standard_normal((1, 16)).astype(np.float32)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x": xv})[0]
    h = np.tile(xv @ data[0], (1, 4)) @ data[1]
    ref = np.concatenate([h, np.ones((1, 1), np.float32)], axis=1) @ data[2] * data[3]
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()   # fp32 summation order
