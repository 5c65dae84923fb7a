"""TensorRT glue for the llmc plugins, written against TensorRT's Python plugin API
(`tensorrt.plugin`, ahead-of-time implementations: TensorRT stores the compiled kernel and its
launch expressions in the engine, so the engine runs without Python).

Kept deliberately thin: every decision (kernel name, grid, block, argument order) comes from
launch_rules.py, and the code comes from compiler.py; both are tested on the CPU and the GPU.
This module itself has never run under a real TensorRT (the CPU tests register it against a
stand-in of the API).

Ahead-of-time plugins: the llmc nodes the passes emit (nodes.GRAPH_PLUGINS: AddRMSNorm,
AddLayerNorm, FusedSwiGLU, FusedGeGLU). RoPE needs none: the graph's RotaryEmbedding (opset 23) is a
TensorRT layer. PagedAttention needs two or three launches, a workspace and an output aliased
to the cache, which the ahead-of-time API (one kernel per plugin) does not express: it is a
class-based IPluginV3 (trt_paged_attention.py), whose enqueue runs in Python.
"""
from __future__ import annotations

from typing import Tuple

from . import compiler
from . import launch_rules as lr

NAMESPACE = "llmc"


def register(arch: str, sm_count: int, max_smem: int | None = None) -> None:
    """Register the ahead-of-time plugins for one target GPU (call before parsing the ONNX
    graph). `arch` like 'sm_90a'; kernels are embedded as cubins for that arch. max_smem: its
    per-block opt-in shared memory (PagedAttention's plan); None reads the current device's."""
    import numpy as np  # noqa: F401  (tensorrt.plugin attribute typing)
    import tensorrt as trt
    import tensorrt.plugin as trtp

    dtypes = {trt.float16: "float16", trt.bfloat16: "bfloat16"}

    def kernel(launch: lr.Launch):
        return launch.kernel, compiler.compile_module(launch.module, arch)

    def params(launch: lr.Launch, grid_x=None):
        p = trtp.KernelLaunchParams()
        p.grid_x = grid_x if grid_x is not None else launch.grid[0]
        p.grid_y, p.grid_z = launch.grid[1], launch.grid[2]
        p.block_x = launch.block[0]
        p.shared_mem = launch.smem
        return p

    def ints(*values):
        out = trtp.SymIntExprs(len(values))
        for i, v in enumerate(values):
            out[i] = trtp.SymInt32(v)
        return out

    # The token count is dynamic: grids over tokens use its symbolic expression, everything
    # else (hidden size, heads) is fixed at build time and read as a constant.
    # AddRMSNorm(x, residual, weight; epsilon) -> (normed, sum), as passes/norms.py emits it
    # (nodes.GRAPH_PLUGINS). Plain RMSNormalization is a standard op: TensorRT's own layers.
    def add_rms_norm_desc(x, residual, weight, epsilon):
        return x.like(), x.like()

    def add_norm_launch(kind, x, epsilon):
        """A residual-add norm's kernel, grid over the tokens and scalars (rows, n, eps)."""
        n = x.shape_expr[-1].constant_value()
        ln = lr.norm_launch(1, n, dtypes[x.dtype], kind, residual=True)
        rows = x.shape_expr[0]
        return (*kernel(ln), params(ln, rows), ints(rows, n, lr.float_bits(epsilon)))

    def add_rms_norm_aot(x, residual, weight, epsilon, outputs, tactic=None):
        return add_norm_launch("rmsnorm", x, epsilon)
    _define(trtp, f"{NAMESPACE}::AddRMSNorm", 3, {"epsilon": float}, add_rms_norm_desc,
            add_rms_norm_aot)

    # AddLayerNorm(x, residual, weight, bias; epsilon) -> (normed, sum) (GPT-2); the same
    # kernel family, the bias after the weight (kernels/norm.cu add_layernorm_*).
    def add_layer_norm_desc(x, residual, weight, bias, epsilon):
        return x.like(), x.like()

    def add_layer_norm_aot(x, residual, weight, bias, epsilon, outputs, tactic=None):
        return add_norm_launch("layernorm", x, epsilon)
    _define(trtp, f"{NAMESPACE}::AddLayerNorm", 4, {"epsilon": float}, add_layer_norm_desc,
            add_layer_norm_aot)

    # FusedSwiGLU / FusedGeGLU on the fused gate-up GEMM output [T, 2I] (passes/activations).
    def gated_desc(gu, *attrs):
        out = gu.like()
        out.shape_expr[-1] = gu.shape_expr[-1] // 2
        return out

    def gated_aot(activation):
        def aot(gu, *attrs, outputs, tactic=None):
            if attrs and attrs[0] != "tanh":
                raise ValueError(f"FusedGeGLU: the kernel computes the tanh form of GELU, the "
                                 f"node asks for approximate={attrs[0]!r}")
            inter = gu.shape_expr[-1].constant_value() // 2
            ln = lr.gated_launch(1, inter, dtypes[gu.dtype], activation, sm_count)
            rows = gu.shape_expr[0]
            return (*kernel(ln), params(ln, rows), ints(rows, inter))
        return aot
    _define(trtp, f"{NAMESPACE}::FusedSwiGLU", 1, {}, gated_desc, gated_aot("swiglu"))
    _define(trtp, f"{NAMESPACE}::FusedGeGLU", 1, {"approximate": str}, gated_desc,
            gated_aot("geglu"))

    from .trt_paged_attention import register_paged_attention
    register_paged_attention(arch, sm_count, max_smem)


def _define(trtp, pid: str, n_inputs: int, attrs: dict, desc, aot) -> None:
    """tensorrt.plugin reads the callables' inspect.signature, so give the generic callables
    one with named, typed tensor inputs followed by the attributes."""
    import inspect

    P = inspect.Parameter
    params = [P(f"in{i}", P.POSITIONAL_OR_KEYWORD, annotation=trtp.TensorDesc)
              for i in range(n_inputs)]
    params += [P(k, P.POSITIONAL_OR_KEYWORD, annotation=t) for k, t in attrs.items()]
    outs = P("outputs", P.KEYWORD_ONLY, annotation=Tuple[trtp.TensorDesc])
    tactic = P("tactic", P.KEYWORD_ONLY, annotation=int, default=None)

    def desc_fn(*args):
        return desc(*args)

    def aot_fn(*args, outputs, tactic=None):
        return aot(*args, outputs=outputs, tactic=tactic)

    desc_fn.__signature__ = inspect.Signature(params, return_annotation=Tuple[trtp.TensorDesc])
    aot_fn.__signature__ = inspect.Signature(
        params + [outs, tactic],
        return_annotation=Tuple[bytes, bytes, trtp.KernelLaunchParams, trtp.SymExprs])
    trtp.register(pid)(desc_fn)
    trtp.aot_impl(pid)(aot_fn)
