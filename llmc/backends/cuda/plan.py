"""The cuda backend's execution plan: what the engine file stores, as plain JSON.

A plan is a list of ops over named values. Each value lives in one place:

    arena    an offset into the one activation arena, sized at build time from the limits
    weight   an offset into the weights section (copied to the GPU once, as one blob)
    input    one of the contract's control inputs (llmc/contract.py)
    const    a small float32 table stored in the plan (RoPE inverse frequencies)
    view     another value reinterpreted (Reshape, Squeeze, Unsqueeze, Split's fused input)

Shapes are lists of ints and the symbols "T" (tokens this step) and "B" (sequences this
step); every launch rule is a function of those two numbers and the ops' attributes, which
the session evaluates each step (program.py). The plan holds data only: no pickle, no code.

The ops (lower.py says which graph nodes each comes from): embedding (attr scale: times a
constant, Gemma; of position_ids: GPT-2's learned positions), rmsnorm, add_rmsnorm,
layernorm, add_layernorm (inputs x, [residual], weight, bias), gelu (attr approximate),
gemm (optional bias; the GEMV kernel or cuBLASLt by row count; with attr act, the gated
activation of its output fused in: outputs [gate-up, activated]; with attr quant int4, fp8
or fp8-block, inputs 3-4 are the weight's scales and AWQ's 1/s, and input 5 an INT4
weight's zero points [N, K / G] or null, kernels/qgemv.cu, qgemv_zp.cu and qgemv_fp8b.cu),
rope_cache (RoPE on q and k, QKV bias, optional per-head q/k RMSNorm (inputs 6-7, attr
qk_norm_eps), K/V written into the layer's pool; rot 0 and no inv_freq input: no rotation,
GPT-2), attention (paged; attr softcap, Gemma 2; rope_cache and attention with attr
kv_scale [K, V]: the pool is E4M3, written as x / scale and read back times it), swiglu,
geglu, swiglu2 (gate and up apart), gather_rows, add, cast_f32, softcap (cap * tanh(x /
cap) of the fp32 logits, Gemma 2), moe (a mixture of experts: inputs router logits, x,
gate-up [E, 2I, H], down [E, H, I], the shared expert's gate and output or null; outputs
the result and its scratch buffers: expert ids, weights, positions, the token of each
position, the tiles, the SwiGLU and down outputs by position).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from llmc.errors import LlmcError

# 2: the quantized decode GEMVs' CTA shapes changed (kernels/qgemv.cu: FP8 and 16-row INT4
# CTAs of 8 warps, INT4 _wide kernels): the launch rules of this llmc would launch a format-1
# engine's compiled kernels with the wrong block size. 3: FP8 _wide and _w16 kernels, which a
# format-2 engine's cubins lack. 4: the decode attention entries take the host's schedule as
# one more argument (attention_plan.decode_schedule), which a format-3 engine's lack. 5: a
# schedule row holds its token's sequence and position (8 ints, was 4 after a token table),
# which a format-4 engine's decode kernels would misread. 6: a MoE step of more than 32
# tokens runs the top-k over a grid (moe_topk_*, which a format-5 engine's cubins lack) and
# the routing kernel takes one more argument.
FORMAT = 6
PLAN, WEIGHTS = "plan.json", "weights"     # engine sections; cubins are "cubin.<module>"
ALIGN = 256          # every arena and weight offset: enough for 16-byte vector loads and TMA
SYMBOLS = ("T", "B")

@dataclass
class Value:
    where: str                          # arena | weight | input | const | view
    dtype: str
    shape: list                         # ints and "T"/"B"
    offset: int = 0                     # arena / weight byte offset
    base: str | None = None             # view: the value it reinterprets
    data: list[float] | None = None     # const

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class Op:
    op: str
    inputs: list[str | None]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    node: str = ""                      # the ONNX node it came from (errors, llmc inspect)


@dataclass
class Plan:
    arch: str
    dtype: str
    modules: list[str]
    values: dict[str, Value]
    ops: list[Op]
    arena_bytes: int
    weights_bytes: int
    output: str                         # the value holding the fp32 logits [B, vocab]
    num_layers: int
    format: int = FORMAT

    def storage(self, name: str) -> str:
        return storage(self.values, name)

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "arch": self.arch, "dtype": self.dtype,
                "modules": self.modules, "arena_bytes": self.arena_bytes,
                "weights_bytes": self.weights_bytes, "output": self.output,
                "num_layers": self.num_layers,
                "values": {k: v.to_dict() for k, v in self.values.items()},
                "ops": [asdict(op) for op in self.ops]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        if d.get("format") != FORMAT:
            raise LlmcError(f"the engine's cuda plan is format {d.get('format')} and this llmc "
                            f"reads format {FORMAT}: rebuild the engine with this llmc's "
                            "`llmc build --backend cuda`")
        return cls(arch=d["arch"], dtype=d["dtype"], modules=list(d["modules"]),
                   values={k: Value(**v) for k, v in d["values"].items()},
                   ops=[Op(**o) for o in d["ops"]], arena_bytes=d["arena_bytes"],
                   weights_bytes=d["weights_bytes"], output=d["output"],
                   num_layers=d["num_layers"])


def int4_block_offsets(op: Op) -> str | None:
    """The input (5) holding an INT4 gemm's per-block zero points or, with attr offsets, its
    offsets; None for symmetric codes, another op, or an engine from before zero points."""
    return op.inputs[5] if op.op == "gemm" and len(op.inputs) > 5 else None


def storage(values: dict[str, Value], name: str) -> str:
    """The value whose memory `name` uses: itself, or the base its views lead to."""
    while values[name].where == "view":
        name = values[name].base
    return name


def live_intervals(values: dict[str, Value], ops: list[Op], output: str
                   ) -> dict[str, tuple[int, int]]:
    """(first op writing it, last op touching it) of every arena value; a view keeps its
    base alive, and the output lives past the last op (it is read after the step)."""
    first, last = {}, {}
    for i, op in enumerate(ops):
        for name in op.outputs:
            first.setdefault(storage(values, name), i)
        for name in [*op.inputs, *op.outputs]:
            if name is not None:
                last[storage(values, name)] = i
    last[storage(values, output)] = len(ops)
    return {n: (first[n], last[n]) for n in first if values[n].where == "arena"}


def cubin_section(module: str) -> str:
    return f"cubin.{module}"


def itemsize(dtype: str) -> int:
    return {"float32": 4, "float16": 2, "bfloat16": 2, "int32": 4, "uint8": 1,
            "float8e4m3fn": 1}[dtype]


def numel(shape: list, tokens: int, batch: int) -> int:
    n = 1
    for d in shape:
        n *= tokens if d == "T" else batch if d == "B" else int(d)
    return n


def align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN
