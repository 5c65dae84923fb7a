"""The pass manager: a flat list of named rewrite stages run over one graph.

Each pass (passes/pattern.py) is a pattern, a check and a replacement. Every firing counts;
the counts are the pass report that ``llmc build`` prints and stores in the engine header.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import onnx

from llmc.graph import Weight
from llmc.passes import activations, attention, gemm, norms, rope
from llmc.passes.ir import FUSED_OPSET, Graph, remove_dead_nodes
from llmc.passes.pattern import Pass, apply


def pipeline() -> list[Pass]:
    """The stages in order. Norms and activations first so that the GEMM fusion and the
    attention pattern see the canonical, already-fused neighbours."""
    return [
        norms.RMS_NORM,
        norms.ADD_RMS_NORM,
        norms.LAYER_NORM,
        norms.ADD_LAYER_NORM,
        activations.GELU,
        activations.SWIGLU,
        activations.GEGLU,
        rope.ROPE,
        gemm.QKV_GEMM,
        gemm.GATE_UP_GEMM,
        activations.GATED_SPLIT,
        attention.PAGED_ATTENTION,
    ]


def pass_names() -> list[str]:
    return [p.name for p in pipeline()]


def run_passes(model: onnx.ModelProto, weights: Sequence[Weight], *,
               disable: Iterable[str] = (), dump_dir: Path | None = None,
               passes: Sequence[Pass] | None = None,
               log: Callable[[str], None] | None = None,
               ) -> tuple[onnx.ModelProto, list[Weight], dict]:
    """Rewrite ``model`` (weights still lazy); returns (new model, new weights, report).

    The input model is not modified. ``disable`` names stages to skip (unknown names are an
    error, so a typo cannot silently keep a pass on). ``dump_dir`` receives every stage as
    ``NN-name.onnx`` (graph only: weights stay placeholders), viewable in Netron.
    """
    stages = list(passes) if passes is not None else pipeline()
    disable = set(disable)
    unknown = disable - {p.name for p in pipeline()} - {p.name for p in stages}
    if unknown:
        raise ValueError(f"unknown pass {sorted(unknown)}; passes: {pass_names()}")
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    _set_opset(copy, FUSED_OPSET)
    g = Graph(copy, weights)
    report = {"opset": FUSED_OPSET, "nodes_before": len(model.graph.node), "stages": []}
    if dump_dir is not None:
        Path(dump_dir).mkdir(parents=True, exist_ok=True)
        _dump(g, Path(dump_dir) / "00-input.onnx")
    for k, p in enumerate(stages, start=1):
        if p.name in disable:
            report["stages"].append({"name": p.name, "fired": 0, "disabled": True})
        else:
            t0 = time.perf_counter()
            fired = apply(g, p)
            dead = remove_dead_nodes(g) if fired else 0
            report["stages"].append({"name": p.name, "fired": fired, "removed_dead": dead,
                                     "seconds": round(time.perf_counter() - t0, 4)})
        if log:
            log(f"pass {p.name}: " + ("disabled" if p.name in disable else f"fused {fired}"))
        if dump_dir is not None:   # every stage, so NN matches the pipeline position
            _dump(g, Path(dump_dir) / f"{k:02d}-{p.name}.onnx")
    out, new_weights = g.commit()
    report["nodes_after"] = len(out.graph.node)
    report["fired"] = {s["name"]: s["fired"] for s in report["stages"]}
    return out, new_weights, report


def _set_opset(model: onnx.ModelProto, version: int) -> None:
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            op.version = max(op.version, version)


def _dump(g: Graph, path: Path) -> None:
    model, _ = g.commit()
    onnx.save_model(model, path)
