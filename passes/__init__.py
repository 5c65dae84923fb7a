"""Fusion passes: the unfused model_zoo graph -> the fused graph TensorRT builds.

    model, weights, report = run_passes(model, weights, disable=("rope",), dump_dir=None)

See docs/passes.md for every pass, the fused nodes' contracts and what TensorRT does with them.
"""

from llmc.passes.manager import pass_names, pipeline, run_passes
from llmc.passes.pattern import Pass

__all__ = ["Pass", "pass_names", "pipeline", "run_passes"]
