"""The `llmc` graph nodes the TensorRT plugins stand in for: the contract between passes/
and the TensorRT glue (trt_plugin.py, trt_paged_attention.py).

TensorRT's ONNX parser hands an `llmc`-domain node to the plugin registered under its op
type, with the node's attributes as plugin fields; so the names, input/output counts and
attribute names here must match what the passes emit (tested on the CPU against the pass
pipeline). Standard ONNX ops (RMSNormalization, RotaryEmbedding, Gelu) are left to
TensorRT's own layers.
"""
from __future__ import annotations

from dataclasses import dataclass

from llmc import contract


@dataclass(frozen=True)
class NodePlugin:
    inputs: int
    outputs: int
    attrs: tuple[str, ...]


GRAPH_PLUGINS = {
    "AddRMSNorm": NodePlugin(3, 2, ("epsilon",)),        # (x, residual, weight) -> (y, sum)
    "AddLayerNorm": NodePlugin(4, 2, ("epsilon",)),      # (x, residual, weight, bias) -> ...
    "FusedSwiGLU": NodePlugin(1, 1, ()),                 # gate_up [T, 2I] -> [T, I]
    "FusedGeGLU": NodePlugin(1, 1, ("approximate",)),    # the kernel has the tanh form only
    "PagedAttention": NodePlugin(8, 2, ("num_heads", "num_kv_heads", "head_dim", "block_size",
                                        "scale", "sliding_window", "softcap")),
}

# I/O of the PagedAttention node (passes/attention.py, docs/passes.md); output 1 is the
# cache, updated in place, so TensorRT aliases it to input 3.
PA_INPUTS = ("q", "k", "v", "cache", *contract.ATTENTION_INPUTS)
PA_OUTPUTS = ("out", "cache_out")
PA_ALIASES = {1: 3}  # output index -> input index
