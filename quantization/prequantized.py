"""Pre-quantized checkpoints: NVIDIA ModelOpt's exports (config.json's `quantization_config`,
quant_method "modelopt"; also in hf_quant_config.json), as
`modelopt.torch.export.export_hf_checkpoint` writes them:

    quant_algo "FP8"
    X.weight          float8_e4m3fn [out, in]
    X.weight_scale    float32 [] or [out]       W = weight * weight_scale
    X.input_scale     float32 []                the input's amax / 448

    quant_algo "W4A16_AWQ"
    X.weight          uint8 [out / 2, in]       signed INT4, output rows 2i (low nibble) and
                                                2i + 1 (high nibble) in one byte
    X.weight_scale    float32 [out, in / B]     W = q * scale, blocks of B along in
    X.pre_quant_scale float32 [in]              AWQ's 1 / s: the GEMM reads x * it (absent
                                                where ModelOpt folded it into the norm before)

    kv_cache_quant_algo "FP8" (either quant_algo)
    model.layers.L.self_attn.k_proj.k_scale  float32 []   layer L's K scale (|max| / 448,
    model.layers.L.self_attn.v_proj.v_scale  float32 []   or 1.0: ModelOpt clamps them so)

and AutoAWQ's GEMM format (config.json `quantization_config` quant_method "awq", version
"gemm", zero_point true: the format of most AWQ models on the HF hub), asymmetric:

    X.qweight  int32 [in, out / 8]       eight unsigned 4-bit codes u a word, output columns
                                         8c + (0, 2, 4, 6, 1, 3, 5, 7) from the low nibble up
    X.qzeros   int32 [in / B, out / 8]   zero points z, packed the same way
    X.scales   fp16 [in / B, out]        W^T = (u - z) * scale, blocks of B along in

and GPTQ's (config.json `quantization_config` quant_method "gptq", as AutoGPTQ, GPTQModel
and HF transformers write it; checkpoint_format "gptq", the default, or "gptq_v2"):

    X.qweight  int32 [in / 8, out]       eight unsigned 4-bit codes u a word, input rows
                                         8r + (0 .. 7) from the low nibble up
    X.qzeros   int32 [in / B, out / 8]   zero points, output columns 8c + (0 .. 7); format
                                         "gptq" stores z - 1 (sym: 7 for z = 8)
    X.scales   fp16 [in / B, out]        W^T = (u - z) * scale
    X.g_idx    int32 [in]                each input row's block: row // B, except with act
                                         order (desc_act), whose blocks are not contiguous

and compressed-tensors' "pack-quantized" format (config.json `quantization_config` quant_method
"compressed-tensors", as llm-compressor saves a W4A16 model; its weights 4-bit ints in
groups along in or a scale a row, no activation quantization), read as GPTQ's
(llm-compressor's W4A16 recipes run GPTQ; the format does not say which algorithm chose the
codes):

    X.weight_packed      int32 [out, in / 8]     eight codes u = q + 8 a word, input columns
                                                 8c + (0 .. 7) from the low nibble up
    X.weight_scale       [out, in / B]           W = (q - zp) * scale
    X.weight_zero_point  int32 [out / 8, in / B] (asymmetric only) zp + 8, packed the same
                                                 way down the output rows
    X.weight_shape       [2]                     out, in
    X.weight_g_idx       int32 [in]              (actorder "group" only) each input row's
                                                 group

and compressed-tensors' "float-quantized" format (llm-compressor's FP8 and FP8_DYNAMIC
schemes), ModelOpt's FP8 layout under other config keys:

    X.weight             float8_e4m3fn [out, in]
    X.weight_scale       [out, 1] ("channel") or [1] ("tensor")   W = weight * weight_scale
    X.input_scale        [1]                      (static inputs only) |max| / 448

Dynamic inputs (a scale a token, computed at run time) have no input_scale: llmc's FP8 GEMMs
take a static scale a tensor, so the build calibrates those inputs, keeping the weights.

and block-wise FP8, HF transformers' fine-grained format (config.json `quantization_config`
quant_method "fp8", weight_block_size [bn, bk]: DeepSeek-V3, Qwen3's FP8 releases) and
compressed-tensors' float-quantized `strategy: block` (llm-compressor's FP8_BLOCK):

    X.weight             float8_e4m3fn [out, in]
    X.weight_scale_inv   [out / bn, in / bk]     (HF; compressed-tensors: X.weight_scale)
                                                 W = weight * the scale of its bn x bk block

Their inputs are quantized a token (a group of 128 of it) at run time by the engines they
were made for; llmc keeps the inputs 16-bit and the weights as stored (`fp8-block`, W8A16:
a scale a row and block of K, the bn rows of a block repeating theirs).

A zero point is not INT4 as ONNX and TensorRT take it (symmetric, zero points 0), so it is
split exactly: (u - z) s = (u - 8) s + (8 - z) s, symmetric codes u - 8 with the scale, and
an offset (8 - z) s per block and output that qdq.int4_pass adds as a GEMM of x's block sums
(none where every z is 8: symmetric GPTQ). The cuda backend takes z itself (its zero-point
kernels). Act-order blocks fit neither form: those weights are read dequantized only, and
`--quant int4-gptq` refuses them.

The model reads each weight dequantized (so every family and every --quant works on it; a
pre_quant_scale is folded into its weight), and the quantized form is kept: `--quant auto`
builds the checkpoint's own format from it instead of calibrating, which gives back the
checkpoint's FP8 or INT4 values.

A GGUF file's matrices in llama.cpp's 4-bit blocks of 32 (Q4_0: x = (u - 8) d; Q4_1 and
Q4_K: x = u d + m) are INT4 weights of the same kind: codes u - 8 with the scales d and,
but for Q4_0, the offset m + 8 d a block (gguf_int4). They are kept only when asked
(`--quant int4-gguf`): `auto` builds a GGUF file from its dequantized weights, as before.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np

from llmc.dtypes import np_dtype
from llmc.errors import LlmcError
from llmc.quantization.numerics import FP8_MAX, INT4_BLOCKS

Readers = dict[str, Callable[[], np.ndarray]]


@dataclass(frozen=True)
class Int4Weight:
    """One INT4 weight of a checkpoint, as the HF layout has it ([out, in])."""

    values: Callable[[], np.ndarray]    # int8 [out, in], in [-8, 7]
    scale: np.ndarray                   # float32 [out, in / block]
    pre_quant_scale: np.ndarray | None  # float32 [in]: the GEMM reads x * it
    in_features: int
    offset: np.ndarray | None = None    # float32 [out, in / block]: W = q * scale + offset
    integer_zero_points: bool = True    # offset = (8 - z) scale, z an integer (qdq.GivenInt4)

    @property
    def block(self) -> int:
        return self.in_features // self.scale.shape[1]


@dataclass(frozen=True)
class Fp8BlockWeight:
    """One block-wise FP8 weight of a checkpoint, as the HF layout has it ([out, in])."""

    values: Callable[[], np.ndarray]    # float8_e4m3fn [out, in]
    scale: np.ndarray                   # float32 [out, in / block]: each row its block's
    in_features: int

    @property
    def block(self) -> int:
        return self.in_features // self.scale.shape[1]


@dataclass(frozen=True)
class Prequantized:
    mode: str                           # the --quant mode it corresponds to: fp8, int4-awq,
                                        # int4-gptq
    producer: str                       # e.g. "modelopt 0.47.0"
    weight_scale: dict[str, np.ndarray]  # fp8: HF weight name -> its scale per output row
    input_amax: dict[str, float]        # fp8: HF weight name -> its input's |max|
    int4: dict[str, Int4Weight] = field(default_factory=dict)   # int4-*: by HF name
    kv_scales: dict[int, tuple[float, float]] = field(default_factory=dict)  # layer: K, V
    unkept: int = 0                     # INT4 weights read dequantized only (act order)
    fp8_blocks: dict[str, Fp8BlockWeight] = field(default_factory=dict)  # fp8-block: by HF name

    @property
    def calibrates_inputs(self) -> bool:
        """Whether FP8 weights come without their inputs' scales (compressed-tensors'
        dynamic, per-token scheme, or FP8 weights alone): the build calibrates those, since
        llmc's FP8 GEMMs take a static scale a tensor."""
        return any(w not in self.input_amax for w in self.weight_scale)

    def describe(self) -> str:
        n = len(self.int4) or len(self.fp8_blocks) or len(self.weight_scale)
        kv = f", FP8 KV-cache scales for {len(self.kv_scales)} layers" if self.kv_scales else ""
        if self.calibrates_inputs:
            kv = f", {'no' if not self.input_amax else 'some'} input scales{kv}"
        weights = f"{n} weights" if not self.unkept else \
            f"{n} weights, {self.unkept} in act-order blocks" if n else \
            f"{self.unkept} weights in act-order blocks"
        return f"{self.producer} {self.mode} checkpoint ({weights}{kv})"


def read_prequantized(config: dict[str, Any], readers: Readers, source: Any
                      ) -> tuple[Readers, Prequantized | None]:
    """(readers with the weights dequantized and the scales taken out, what they were) for a
    ModelOpt FP8 checkpoint; the readers unchanged and None for an unquantized one."""
    qc = config.get("quantization_config")
    if not qc:
        return readers, None
    method, algo = qc.get("quant_method"), qc.get("quant_algo")
    readers, kv_scales = _read_kv_scales(readers, source)
    if method == "awq":
        out, pq = _read_autoawq(readers, qc, source)
    elif method == "gptq":
        out, pq = _read_gptq(readers, qc, source)
    elif method == "compressed-tensors":
        out, pq = _read_compressed_tensors(readers, qc, source)
        if qc.get("kv_cache_scheme") and not kv_scales:
            raise LlmcError(f"{source}: config.json's kv_cache_scheme says FP8, but no tensor "
                            "is a model.layers.L.self_attn.k_scale or v_scale")
    elif method == "modelopt" and algo == "W4A16_AWQ":
        out, pq = _read_int4(readers, qc, source)
    elif method == "modelopt" and algo == "FP8":
        out, pq = _read_fp8(readers, source, _producer(qc))
    elif method == "fp8":
        out, pq = _read_hf_fp8(readers, qc, source)
    else:
        raise LlmcError(f"{source}: a {method} {algo} checkpoint (config.json "
                        "quantization_config) cannot be read yet; llmc reads ModelOpt FP8 "
                        "and W4A16_AWQ exports, AutoAWQ's GEMM format, 4-bit GPTQ, "
                        "compressed-tensors W4A16 and FP8, block-wise FP8 (quant_method fp8) "
                        "and unquantized checkpoints (then "
                        "--quant fp8 / int4-awq / int4-rtn quantize them)")
    int4 = {name: _in_graph_blocks(w) for name, w in pq.int4.items()}
    return out, replace(pq, int4=int4, kv_scales=kv_scales)


def _in_graph_blocks(w: Int4Weight) -> Int4Weight:
    """A checkpoint's INT4 groups larger than the graph's blocks (GPTQ's group_size -1, one
    group a row, or 256 and more) as blocks of 128 (or of 64 or 32, the largest that divides
    the group), its scale and offset repeated along them: the same weight, exactly, in blocks
    that every backend's INT4 takes. A group no block divides is left as it is."""
    b = next((b for b in INT4_BLOCKS if w.block % b == 0), None)
    if b is None or w.block <= INT4_BLOCKS[0]:
        return w
    r = w.block // b
    return replace(w, scale=np.repeat(w.scale, r, axis=1),
                   offset=None if w.offset is None else np.repeat(w.offset, r, axis=1))


def _read_fp8(readers: Readers, source: Any, producer: str) -> tuple[Readers, Prequantized]:
    """X.weight (E4M3) with X.weight_scale (one or a row) and, where the inputs have a static
    scale, X.input_scale: ModelOpt's FP8 and compressed-tensors' float-quantized layout."""
    out = dict(readers)
    scales, amax = {}, {}
    for name in [n for n in readers if n.endswith(".weight_scale")]:
        weight = name.removesuffix("_scale")
        if weight not in readers:
            raise LlmcError(f"{source}: {name} has no {weight}")
        q = readers[weight]()
        scale = np.broadcast_to(np.asarray(out.pop(name)(), np.float32).reshape(-1),
                                (q.shape[0],)).copy()
        scales[weight] = scale
        out[weight] = _dequantized(readers[weight], scale)
        inp = weight.removesuffix("weight") + "input_scale"
        if inp in out:
            amax[weight] = float(np.asarray(out.pop(inp)()).reshape(-1).max()) * FP8_MAX
    if not scales:
        raise LlmcError(f"{source}: config.json says FP8, but no tensor is an X.weight_scale")
    return out, Prequantized("fp8", producer, scales, amax)


def _read_hf_fp8(readers: Readers, qc: dict[str, Any], source: Any
                 ) -> tuple[Readers, Prequantized]:
    """HF transformers' fine-grained FP8 (quant_method "fp8")."""
    size = qc.get("weight_block_size")
    if qc.get("fmt", "e4m3") != "e4m3" or not (
            isinstance(size, list) and len(size) == 2 and
            all(isinstance(b, int) and b > 0 for b in size)):
        raise LlmcError(f"{source}: an fp8 checkpoint of fmt {qc.get('fmt')!r} and "
                        f"weight_block_size {size!r} cannot be read yet; llmc reads E4M3 "
                        "weights in blocks (weight_block_size [rows, columns], e.g. [128, "
                        "128])")
    return _read_fp8_blocks(readers, "weight_scale_inv", size, source, "transformers")


def _read_fp8_blocks(readers: Readers, suffix: str, size: list[int], source: Any,
                     producer: str) -> tuple[Readers, Prequantized]:
    """X.weight (E4M3 [out, in]) with X.<suffix>, a scale a [bn, bk] block of it."""
    bn, bk = size
    out = dict(readers)
    weights = {}
    for name in [n for n in readers if n.endswith("." + suffix)]:
        weight = name.removesuffix(suffix) + "weight"
        if weight not in readers:
            raise LlmcError(f"{source}: {name} has no {weight}")
        q = readers[weight]()
        blocks = np.asarray(out.pop(name)(), np.float32)
        rows, cols = q.shape if q.ndim == 2 else (0, 0)
        if q.dtype != np_dtype("float8e4m3fn") or blocks.shape != (-(-rows // bn),
                                                                   -(-cols // bk)):
            raise LlmcError(f"{source}: {weight} ({q.dtype}{list(q.shape)}) and {name} "
                            f"{list(blocks.shape)} are not E4M3 weights with a scale a "
                            f"{bn} x {bk} block")
        if cols % bk:
            raise LlmcError(f"{source}: {weight} has {cols} inputs, not whole blocks of {bk}; "
                            "llmc keeps block-wise FP8 weights whose blocks divide their "
                            "inputs (build with --quant none for its dequantized weights)")
        w = Fp8BlockWeight(readers[weight], np.repeat(blocks, bn, axis=0)[:rows], cols)
        weights[weight] = w
        out[weight] = lambda w=w: w.values().astype(np.float32) * np.repeat(
            w.scale, w.block, axis=1)
    for name in [n for n in out if n.endswith(".input_scale")]:   # W8A16: not used
        out.pop(name)
    if not weights:
        raise LlmcError(f"{source}: config.json says block-wise FP8, but no tensor is an "
                        f"X.{suffix}")
    return out, Prequantized("fp8-block", producer, {}, {}, fp8_blocks=weights)


# ModelOpt's self_attn.k_proj.k_scale, compressed-tensors' self_attn.k_scale (and v)
_KV_SCALE = re.compile(r"model\.layers\.(\d+)\.self_attn\.(?:(?P<p>[kv])_proj\.(?P=p)|[kv])_scale$")


def _read_kv_scales(readers: Readers, source: Any
                    ) -> tuple[Readers, dict[int, tuple[float, float]]]:
    """An FP8-KV export's per-layer K and V scales, taken out of the readers."""
    found: dict[int, dict[str, float]] = {}
    out = dict(readers)
    for name in list(readers):
        m = _KV_SCALE.match(name)
        if m:
            found.setdefault(int(m[1]), {})[name.rsplit(".", 1)[1][0]] = float(
                np.asarray(out.pop(name)(), np.float32).reshape(-1).max())
    pairs = {}
    for layer, kv in sorted(found.items()):
        if set(kv) != {"k", "v"} or not all(np.isfinite(x) and x > 0 for x in kv.values()):
            raise LlmcError(f"{source}: layer {layer}'s KV-cache scales are not one positive "
                            f"K and one V scale ({kv})")
        pairs[layer] = (kv["k"], kv["v"])
    return out, pairs


def _producer(qc: dict[str, Any]) -> str:
    p = qc.get("producer") or {}
    return f"{p.get('name', qc.get('quant_method'))} {p.get('version', '')}".strip()


def unpack_int4_rows(packed: np.ndarray) -> np.ndarray:
    """uint8 [out / 2, in] -> int8 [out, in]: ModelOpt's `pack_int4_in_uint8` undone (signed
    nibbles, row 2i in the low one)."""
    nibbles = np.stack([packed & 0x0F, packed >> 4], axis=1).astype(np.int8)   # [out/2,2,in]
    nibbles = np.where(nibbles > 7, nibbles - 16, nibbles).astype(np.int8)
    return nibbles.reshape(-1, packed.shape[1])


def _read_int4(readers: Readers, qc: dict[str, Any], source: Any
               ) -> tuple[Readers, Prequantized]:
    out = dict(readers)
    weights = {}
    for name in [n for n in readers if n.endswith(".weight_scale")]:
        weight = name.removesuffix("_scale")
        if weight not in readers:
            raise LlmcError(f"{source}: {name} has no {weight}")
        scale = np.asarray(out.pop(name)(), np.float32)
        pre = weight.removesuffix("weight") + "pre_quant_scale"
        pqs = np.asarray(out.pop(pre)(), np.float32) if pre in out else None
        packed = readers[weight]()
        if packed.dtype != np.uint8 or scale.ndim != 2 or 2 * packed.shape[0] != scale.shape[0] \
                or packed.shape[1] % scale.shape[1]:
            raise LlmcError(f"{source}: {weight} ({packed.dtype}{list(packed.shape)}) and its "
                            f"scale {list(scale.shape)} are not a ModelOpt INT4 pair")
        w = Int4Weight(lambda r=readers[weight]: unpack_int4_rows(r()), scale, pqs,
                       packed.shape[1])
        weights[weight] = w
        out[weight] = _int4_dequantized(w)
    return out, Prequantized("int4-awq", _producer(qc), {}, {}, weights)


AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)   # AutoAWQ: nibble i of a word holds column 8c + this
GPTQ_ORDER = tuple(range(8))           # GPTQ's zero points: in order


def unpack_awq(packed: np.ndarray, order: tuple[int, ...] = AWQ_ORDER) -> np.ndarray:
    """int32 [rows, cols / 8] -> uint8 [rows, cols]: AutoAWQ's packing undone (with order
    0 .. 7, GPTQ's of its zero points)."""
    words = packed.view(np.uint32)
    out = np.empty((packed.shape[0], packed.shape[1], 8), np.uint8)
    for i, col in enumerate(order):
        out[:, :, col] = (words >> (4 * i)) & 0xF
    return out.reshape(packed.shape[0], -1)


def unpack_gptq_rows(packed: np.ndarray) -> np.ndarray:
    """int32 [rows / 8, cols] -> uint8 [rows, cols]: GPTQ's qweight packing undone."""
    words = packed.view(np.uint32)
    out = np.empty((packed.shape[0], 8, packed.shape[1]), np.uint8)
    for i in range(8):
        out[:, i] = (words >> (4 * i)) & 0xF
    return out.reshape(-1, packed.shape[1])


def _packed_linears(readers: Readers, out: Readers, source: Any, extra: str = ""):
    """Each X.qweight with its X.qzeros and X.scales (and X.<extra> or None), read, and
    all of them taken out of `out`: (name, base "X.", qweight, qzeros, scales float32,
    extra)."""
    for name in [n for n in readers if n.endswith(".qweight")]:
        base = name.removesuffix("qweight")
        if base + "qzeros" not in readers or base + "scales" not in readers:
            raise LlmcError(f"{source}: {name} has no {base}qzeros and {base}scales")
        qweight, qzeros = readers[name](), out.pop(base + "qzeros")()
        scales = np.asarray(out.pop(base + "scales")(), np.float32)
        more = np.asarray(out.pop(base + extra)()) if extra and base + extra in out else None
        out.pop(name)
        yield name, base, qweight, qzeros, scales, more


def _packed_shapes_fit(qweight, qzeros, scales, k: int, n: int) -> bool:
    """int32 codes and zero points, scales [K / B, N], zero points [K / B, N / 8]."""
    return qweight.dtype == np.int32 and qzeros.dtype == np.int32 and scales.ndim == 2 and \
        scales.shape[1] == n and scales.shape[0] > 0 and k % scales.shape[0] == 0 and \
        qzeros.shape == (scales.shape[0], n // 8)


def _check_packed(ok: bool, source: Any, name: str, qweight, qzeros, scales, what: str):
    if not ok:
        raise LlmcError(f"{source}: {name} ({qweight.dtype}{list(qweight.shape)}), its qzeros "
                        f"{list(qzeros.shape)} and scales {list(scales.shape)} are not "
                        f"{what}")


def _read_autoawq(readers: Readers, qc: dict[str, Any], source: Any
                  ) -> tuple[Readers, Prequantized]:
    version = str(qc.get("version", "gemm")).lower()
    if qc.get("bits", 4) != 4 or version != "gemm" or qc.get("zero_point", True) is not True:
        raise LlmcError(f"{source}: an AWQ checkpoint of bits {qc.get('bits')}, version "
                        f"{qc.get('version')!r}, zero_point {qc.get('zero_point')}: llmc reads "
                        "AutoAWQ's 4-bit GEMM format with zero points (the default)")
    out = dict(readers)
    weights = {}
    for name, base, qweight, qzeros, scales, _ in _packed_linears(readers, out, source):
        k, n = qweight.shape[0], 8 * qweight.shape[1] if qweight.ndim == 2 else 0
        _check_packed(_packed_shapes_fit(qweight, qzeros, scales, k, n), source, name,
                      qweight, qzeros, scales, "an AutoAWQ GEMM triple")
        zeros = unpack_awq(qzeros).astype(np.float32)                       # [in / B, out]
        w = Int4Weight(lambda r=readers[name]: (unpack_awq(r()).T.astype(np.int8) - 8),
                       np.ascontiguousarray(scales.T), None, k,
                       np.ascontiguousarray(((8 - zeros) * scales).T))
        weights[base + "weight"] = w
        out[base + "weight"] = _int4_dequantized(w)
    if not weights:
        raise LlmcError(f"{source}: config.json says AWQ, but no tensor is an X.qweight")
    return out, Prequantized("int4-awq", f"autoawq {qc.get('version', 'gemm')}", {}, {},
                             weights)


def _read_gptq(readers: Readers, qc: dict[str, Any], source: Any
               ) -> tuple[Readers, Prequantized]:
    fmt = str(qc.get("checkpoint_format", "gptq")).lower()
    if qc.get("bits", 4) != 4 or fmt not in ("gptq", "gptq_v2"):
        raise LlmcError(f"{source}: a GPTQ checkpoint of bits {qc.get('bits')}, "
                        f"checkpoint_format {fmt!r}: llmc reads 4-bit GPTQ checkpoints (formats "
                        "gptq and gptq_v2)")
    out = dict(readers)
    weights, act_order = {}, 0
    for name, base, qweight, qzeros, scales, g_idx in _packed_linears(readers, out, source,
                                                                      "g_idx"):
        k, n = 8 * qweight.shape[0], qweight.shape[1] if qweight.ndim == 2 else 0
        _check_packed(_packed_shapes_fit(qweight, qzeros, scales, k, n) and (
            g_idx is None or g_idx.shape == (k,)), source, name, qweight, qzeros, scales,
            "a GPTQ triple")
        zeros = unpack_awq(qzeros, GPTQ_ORDER).astype(np.float32) + (fmt == "gptq")
        block = k // scales.shape[0]

        def codes(r=readers[name]) -> np.ndarray:    # int8 [out, in]: u - 8
            return unpack_gptq_rows(r()).T.astype(np.int8) - 8

        if g_idx is not None and not np.array_equal(g_idx, np.arange(k) // block):
            act_order += 1     # blocks of scattered rows: the weight read dequantized only
            out[base + "weight"] = lambda c=codes, z=zeros, s=scales, g=g_idx: (
                (c() + 8 - z[g].T) * s[g].T)
            continue
        w = Int4Weight(codes, np.ascontiguousarray(scales.T), None, k,
                       None if (zeros == 8).all() else
                       np.ascontiguousarray(((8 - zeros) * scales).T))
        weights[base + "weight"] = w
        out[base + "weight"] = _int4_dequantized(w)
    if not weights and not act_order:
        raise LlmcError(f"{source}: config.json says GPTQ, but no tensor is an X.qweight")
    meta = qc.get("meta") or {}
    quantizer = meta.get("quantizer") or qc.get("quantizer") or "gptq"
    producer = (quantizer[0] if isinstance(quantizer, list) and quantizer else str(quantizer)) + \
        (" (gptq_v2)" if fmt == "gptq_v2" else "")
    return out, Prequantized("int4-gptq", producer, {}, {}, weights, unkept=act_order)


def _ct_scheme_fits(group: dict[str, Any], fmt: Any) -> bool:
    """A compressed-tensors config group of 4-bit int weights a channel or in groups of a
    multiple of 32 (_in_graph_blocks makes larger ones blocks of 128, 64 or 32), nothing else
    quantized, packed."""
    w = group.get("weights") or {}
    size = w.get("group_size")
    return (group.get("format") or fmt) == "pack-quantized" and w.get("num_bits") == 4 and \
        w.get("type", "int") == "int" and not w.get("dynamic") and (
            w.get("strategy") == "channel" or w.get("strategy") == "group" and
            isinstance(size, int) and size > 0 and size % 32 == 0) and \
        not group.get("input_activations") and not group.get("output_activations")


def _ct_scheme(group: dict[str, Any]) -> str:
    """A config group as an error names it: "8-bit float channel + activations"."""
    w = group.get("weights") or {}
    return f"{w.get('num_bits')}-bit {w.get('type')} {w.get('strategy')}" + \
        (" + activations" if group.get("input_activations") else "")


def _ct_fp8_fits(group: dict[str, Any], fmt: Any) -> bool:
    """A compressed-tensors config group of E4M3 weights with a scale a row or a tensor, the
    inputs FP8 with a static scale a tensor, dynamic a token, or not quantized; nothing else."""
    w, x = group.get("weights") or {}, group.get("input_activations")
    return (group.get("format") or fmt) == "float-quantized" and w.get("num_bits") == 8 and \
        w.get("type") == "float" and w.get("strategy") in ("channel", "tensor") and \
        not w.get("dynamic") and not group.get("output_activations") and (
            not x or x.get("num_bits") == 8 and x.get("type") == "float" and
            (x.get("strategy"), bool(x.get("dynamic"))) in (("tensor", False), ("token", True)))


def _ct_fp8_block(group: dict[str, Any], fmt: Any) -> list[int] | None:
    """A compressed-tensors config group of E4M3 weights in [bn, bk] blocks (strategy block,
    llm-compressor's FP8_BLOCK), the inputs FP8 at run time or not quantized: its block."""
    w, x = group.get("weights") or {}, group.get("input_activations")
    size = w.get("block_structure")
    fits = (group.get("format") or fmt) == "float-quantized" and w.get("num_bits") == 8 and \
        w.get("type") == "float" and w.get("strategy") == "block" and \
        not w.get("dynamic") and not group.get("output_activations") and \
        isinstance(size, list) and len(size) == 2 and \
        all(isinstance(b, int) and b > 0 for b in size) and (
            not x or x.get("num_bits") == 8 and x.get("type") == "float" and x.get("dynamic"))
    return size if fits else None


def _ct_kv_fits(kv: dict[str, Any] | None) -> bool:
    """No KV-cache scheme, or E4M3 with a static scale a tensor (self_attn.k_scale, v_scale)."""
    return not kv or (kv.get("num_bits") == 8 and kv.get("type") == "float" and
                      kv.get("strategy") == "tensor" and not kv.get("dynamic"))


def _read_compressed_tensors(readers: Readers, qc: dict[str, Any], source: Any
                             ) -> tuple[Readers, Prequantized]:
    groups = qc.get("config_groups") or {}
    fmt = qc.get("format")
    producer = f"compressed-tensors {qc.get('version') or ''}".strip()
    plain = qc.get("quantization_status", "compressed") == "compressed" and \
        _ct_kv_fits(qc.get("kv_cache_scheme")) and \
        (qc.get("sparsity_config") or {}).get("format", "dense") == "dense"
    if groups and plain and all(_ct_fp8_fits(g, fmt) for g in groups.values()):
        return _read_fp8(readers, source, producer)
    sizes = [_ct_fp8_block(g, fmt) for g in groups.values()]
    if groups and plain and None not in sizes and all(b == sizes[0] for b in sizes):
        return _read_fp8_blocks(readers, "weight_scale", sizes[0], source, producer)
    if not groups or not plain or not all(_ct_scheme_fits(g, fmt) for g in groups.values()):
        schemes = ", ".join(map(_ct_scheme, groups.values())) or "no config groups"
        kv = "" if _ct_kv_fits(qc.get("kv_cache_scheme")) else \
            ", a KV-cache scheme other than FP8 a tensor"
        raise LlmcError(f"{source}: a compressed-tensors checkpoint of format {fmt!r} "
                        f"({schemes}; status {qc.get('quantization_status')!r}"
                        f"{kv}): llmc "
                        "reads compressed-tensors' W4A16 checkpoints (format pack-quantized, "
                        "4-bit int weights a channel or in groups of a multiple of 32, nothing "
                        "else quantized) "
                        "and FP8 ones (format float-quantized, 8-bit float weights a channel, "
                        "a tensor or in blocks, inputs a tensor or a token), without sparsity, "
                        "the KV cache FP8 a tensor or not quantized; "
                        "requantize the unquantized model with --quant fp8, int4-awq or "
                        "int4-rtn")
    out = dict(readers)
    weights, act_order = {}, 0
    for name in [n for n in readers if n.endswith(".weight_packed")]:
        base = name.removesuffix("weight_packed")
        if base + "weight_scale" not in readers or base + "weight_shape" not in readers:
            raise LlmcError(f"{source}: {name} has no {base}weight_scale and "
                            f"{base}weight_shape")
        packed = readers[name]()
        scale = np.asarray(out.pop(base + "weight_scale")(), np.float32)
        shape = tuple(int(d) for d in np.asarray(out.pop(base + "weight_shape")()).reshape(-1))
        zp = np.asarray(out.pop(base + "weight_zero_point")()) \
            if base + "weight_zero_point" in out else None
        g_idx = np.asarray(out.pop(base + "weight_g_idx")()) \
            if base + "weight_g_idx" in out else None
        out.pop(name)
        n, k = shape if len(shape) == 2 else (0, 0)
        if packed.dtype != np.int32 or packed.shape != (n, k // 8) or k % 8 or \
                scale.ndim != 2 or scale.shape[0] != n or not scale.shape[1] or \
                k % scale.shape[1] or (zp is not None and (
                    zp.dtype != np.int32 or n % 8 or zp.shape != (n // 8, scale.shape[1]))) or \
                (g_idx is not None and g_idx.shape != (k,)):
            raise LlmcError(f"{source}: {name} ({packed.dtype}{list(packed.shape)}), its "
                            f"weight_scale {list(scale.shape)} and weight_shape {list(shape)} "
                            "are not a compressed-tensors pack-quantized weight")
        block = k // scale.shape[1]
        zeros = None if zp is None else \
            unpack_awq(np.ascontiguousarray(zp.T), GPTQ_ORDER).T.astype(np.float32)  # zp + 8

        def codes(r=readers[name]) -> np.ndarray:    # int8 [out, in]: q = u - 8
            return unpack_awq(r(), GPTQ_ORDER).astype(np.int8) - 8

        if g_idx is not None and not np.array_equal(g_idx, np.arange(k) // block):
            act_order += 1     # groups of scattered rows: the weight read dequantized only
            out[base + "weight"] = lambda c=codes, z=zeros, s=scale, g=g_idx: (
                (c() + (0 if z is None else 8 - z[:, g])) * s[:, g])
            continue
        w = Int4Weight(codes, scale, None, k, None if zeros is None or (zeros == 8).all()
                       else (8 - zeros) * scale)
        weights[base + "weight"] = w
        out[base + "weight"] = _int4_dequantized(w)
    if not weights and not act_order:
        raise LlmcError(f"{source}: config.json says compressed-tensors, but no tensor is an "
                        "X.weight_packed")
    return out, Prequantized("int4-gptq", producer, {}, {}, weights, unkept=act_order)


def _int4_dequantized(w: Int4Weight):
    def read() -> np.ndarray:
        q = w.values().astype(np.float32)
        deq = q * np.repeat(w.scale, w.block, axis=1)
        if w.offset is not None:
            deq += np.repeat(w.offset, w.block, axis=1)
        return deq if w.pre_quant_scale is None else deq * w.pre_quant_scale[None, :]
    return read


def _dequantized(read: Callable[[], np.ndarray], scale: np.ndarray):
    return lambda: read().astype(np.float32) * scale[:, None]


def gguf_int4(blocks: dict[str, Callable[[], tuple]], source: Any,
              fix: Callable[[str, np.ndarray], np.ndarray]) -> Prequantized:
    """The INT4 weights of a GGUF file's Q4_0 / Q4_1 / Q4_K matrices (``blocks``: HF name -> the
    reader of its codes, scales and minimums, llmc.checkpoint.gguf), each passed through
    ``fix`` (the family's row permutation of the file's layout, the same for every part)."""
    from llmc.checkpoint.gguf import INT4_BLOCK

    if not blocks:
        raise LlmcError(f"--quant int4-gguf keeps a GGUF file's own 4-bit blocks (Q4_0, "
                        f"Q4_1, Q4_K), and {source} has none: use --quant int4-awq or int4-rtn")
    int4, kinds = {}, set()
    for name, read in blocks.items():
        _, d, m, kind = read(False)   # the scales now, the codes when the weight is saved
        kinds.add(kind)

        def codes(name=name, read=read) -> np.ndarray:
            return fix(name, read()[0].astype(np.int8) - 8)

        scale = fix(name, d)
        if scale.shape != d.shape:   # the family transposes this matrix: its blocks run down
            continue                 # the graph's columns, which no INT4 form here holds
        int4[name] = Int4Weight(codes, scale, None, INT4_BLOCK * d.shape[1],
                                None if m is None else fix(name, m + 8 * d), m is None)
    return Prequantized("int4-gguf", f"GGUF {'/'.join(sorted(kinds))}", {}, {}, int4)
