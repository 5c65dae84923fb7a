"""The quantized build (docs/quantization.md): FP8 W8A8 or INT4 weight-only (RTN or AWQ),
and/or an FP8 KV cache, measured against the unquantized graph on every build.

    base    = save_onnx(fused graph)                    the unquantized graph, for onnxruntime
    calib   = measure.calibrate(base, calibration text)  GEMM input |max| and rows (fp8, awq),
                                                         each layer's K and V |max| (fp8 KV)
    graph   = qdq.quantize_graph(graph, pass)            Q/DQ around every weight GEMM
    graph   = kv.fp8_kv(graph, scales)                   --kv-cache-dtype fp8: E4M3 pools
    ... the build saves and lowers the quantized graph ...
    report  = measure.measure(base, quantized, eval text) perplexity and top-1 agreement
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import onnx

from llmc.arrays import transposed
from llmc.contract import EngineIO
from llmc.dtypes import storage_bytes
from llmc.errors import LlmcError
from llmc.graph import Weight, file_size, save_onnx, weights_file_size
from llmc.header import QuantInfo
from llmc.quantization.kv import KV_DTYPES
from llmc.quantization.numerics import FP8_MAX, INT4_BLOCKS, fp8_block
from llmc.quantization.prequantized import Prequantized

# auto: a pre-quantized checkpoint's own format, else none; int4-gptq: a GPTQ checkpoint's own
# INT4 (llmc does not run GPTQ's calibration); int4-gguf: a GGUF file's own 4-bit blocks;
# fp8-block: E4M3 weights in blocks, 16-bit inputs (a block-wise FP8 checkpoint's own, or
# rounded to nearest from a 16-bit one)
MODES = ("auto", "none", "fp8", "fp8-block", "int4-awq", "int4-rtn", "int4-gptq", "int4-gguf")
KEPT_INT4 = ("int4-awq", "int4-gptq", "int4-gguf")   # modes a checkpoint's own INT4 may be
FP8_FIRST_TOKEN = ("auto", "dynamic", "static")
AWQ_ROWS = 128      # calibration rows a GEMM keeps for AWQ's search (its cost grows with them)


@dataclass(frozen=True)
class QuantOptions:
    mode: str = "none"
    calib_data: Path | None = None     # calibration text (default: the bundled calib.txt)
    calib_size: int = 512              # calibration tokens
    eval_data: Path | None = None      # accuracy text (default: the bundled eval.txt)
    eval_size: int = 1024              # tokens scored for the accuracy report
    max_ppl_increase: float = 5.0      # percent; a build past it warns
    kv_cache_dtype: str = "auto"       # auto: the compute dtype; fp8: E4M3, scales per layer
    lm_head: bool = False              # quantize the LM head too (a tied one: a copy of it)
    int4_block_size: int | None = None  # INT4 blocks: the largest up to it that divides K
    int4_zero_point: bool = False      # INT4 with a zero point a block (asymmetric)
    exclude: tuple[str, ...] = ()      # globs over weight names: those GEMMs stay 16-bit
    # fp8: a sequence's first token's GEMM inputs take a scale of their own (dynamic), or the
    # calibrated one (static: TensorRT's Q/DQ); auto: dynamic where the backend runs it
    fp8_first_token: str = "auto"
    # Off only for speed benchmarks on random weights, where perplexity means nothing and
    # running an 8B graph twice on onnxruntime would dominate the build (no CLI flag).
    measure: bool = True

    def keeps_reference(self, prequantized: Prequantized | None) -> bool:
        """Whether the build saves the unquantized graph and runs it on onnxruntime: for the
        accuracy report, or to calibrate (FP8 and AWQ without a checkpoint's own scales, an
        FP8 KV cache)."""
        own = prequantized is not None and prequantized.mode == self.mode and \
            not prequantized.calibrates_inputs
        return self.measure or self.kv_cache_dtype == "fp8" or (
            self.mode in ("fp8", "int4-awq") and not own)

    @property
    def largest_int4_block(self) -> int:
        return self.int4_block_size or INT4_BLOCKS[0]

    @property
    def quantizes(self) -> bool:
        """Whether the build quantizes anything (and so measures its accuracy)."""
        return self.mode != "none" or self.kv_cache_dtype != "auto"

    def resolve(self, prequantized: Prequantized | None,
                log: Callable[[str], None]) -> "QuantOptions":
        """``auto`` made concrete for this checkpoint."""
        if self.mode == "int4-gguf" and (prequantized is None or
                                         prequantized.mode != "int4-gguf"):
            raise LlmcError("--quant int4-gguf keeps a GGUF file's own 4-bit blocks, and the "
                            "model is not a GGUF file: use --quant int4-awq or int4-rtn")
        if self.mode == "int4-gptq" and (prequantized is None or
                                         prequantized.mode != "int4-gptq"):
            what = prequantized.describe() if prequantized else "an unquantized checkpoint"
            raise LlmcError(f"--quant int4-gptq builds a GPTQ checkpoint's own INT4 weights, "
                            f"and the model is {what}; llmc does not run GPTQ's calibration: "
                            "use --quant int4-awq or int4-rtn")
        if self.mode in ("int4-gptq", "auto") and prequantized is not None and \
                prequantized.unkept:
            raise LlmcError(
                f"the model is a {prequantized.describe()}: act order (desc_act) puts the rows "
                "of a scale block anywhere in the weight, which neither the INT4 graph "
                "(TensorRT's blocks) nor the kernels hold; build with --quant int4-awq, "
                "int4-rtn or fp8 (its dequantized weights quantized again) or --quant none")
        out = self
        if self.mode == "auto":
            if prequantized is not None:
                log(f"the checkpoint is a {prequantized.describe()}: building --quant "
                    f"{prequantized.mode} with its scales"
                    + (" (calibrating the input scales it does not give)"
                       if prequantized.calibrates_inputs else ""))
            out = replace(self, mode=prequantized.mode if prequantized else "none")
        if prequantized is not None and out.mode == prequantized.mode and not out.lm_head and \
                ("lm_head.weight" in prequantized.int4 or
                 "lm_head.weight" in prequantized.fp8_blocks):
            log(f"the checkpoint's LM head is {out.mode} too: building it so "
                "(--quant-lm-head)")
            out = replace(out, lm_head=True)
        if out.lm_head and out.mode == "none":
            raise LlmcError("--quant-lm-head quantizes the LM head the way --quant does, and "
                            "nothing is quantized here: name a --quant mode (fp8, int4-awq, "
                            "int4-rtn)")
        if out.lm_head and out.mode == "fp8" and prequantized is not None and \
                prequantized.mode == "fp8":
            raise LlmcError(f"--quant-lm-head: the model is a {prequantized.describe()}, "
                            "whose scales do not cover the LM head's input; build it without "
                            "--quant-lm-head, or requantize it with --quant int4-awq")
        own = prequantized is not None and prequantized.mode == out.mode
        if self.exclude and (out.mode == "none" or own):
            what = f"the {prequantized.describe()}'s own weights, which are kept as stored" \
                if own else "nothing is quantized here"
            raise LlmcError(f"--quant-exclude leaves GEMMs that llmc quantizes 16-bit, and "
                            f"{what}: drop it, or name a --quant mode (fp8, int4-awq, int4-rtn)")
        out._check_first_token(out.mode)
        if out.mode not in ("int4-awq", "int4-rtn") or own:   # no INT4 that llmc rounds
            what = f"the {prequantized.describe()}'s own weights" if own else \
                f"--quant {out.mode}"
            if self.int4_block_size is not None:
                raise LlmcError(f"--int4-block-size sets the blocks of the INT4 weights llmc "
                                f"quantizes (--quant int4-awq or int4-rtn), not of {what}: "
                                "drop it")
            if self.int4_zero_point:
                raise LlmcError(f"--int4-zero-point quantizes the INT4 weights llmc quantizes "
                                f"(--quant int4-awq or int4-rtn) with a zero point, not "
                                f"{what}: drop it")
        return out

    def _check_first_token(self, mode: str) -> None:
        if self.fp8_first_token != "auto" and mode != "fp8":
            raise LlmcError(f"--fp8-first-token sets how FP8 W8A8 (--quant fp8) scales a "
                            f"sequence's first token, and the build is --quant {mode}: "
                            "drop it")

    def validate(self) -> "QuantOptions":
        if self.mode not in MODES:
            raise LlmcError(f"unknown --quant {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.kv_cache_dtype not in KV_DTYPES:
            raise LlmcError(f"unknown --kv-cache-dtype {self.kv_cache_dtype!r}; choose one of "
                            f"{', '.join(KV_DTYPES)}")
        if self.fp8_first_token not in FP8_FIRST_TOKEN:
            raise LlmcError(f"unknown --fp8-first-token {self.fp8_first_token!r}; choose one "
                            f"of {', '.join(FP8_FIRST_TOKEN)}")
        if self.mode != "auto":   # auto: once the checkpoint's own mode is known (resolve)
            self._check_first_token(self.mode)
        if self.int4_block_size not in (None, *INT4_BLOCKS):
            raise LlmcError(f"--int4-block-size {self.int4_block_size}: choose one of "
                            f"{', '.join(map(str, sorted(INT4_BLOCKS)))}")
        if self.calib_size < 16 or self.eval_size < 16:
            raise LlmcError("--calib-size and --eval-size must be at least 16 tokens")
        if not self.max_ppl_increase >= 0:
            raise LlmcError("--max-ppl-increase must be a percentage >= 0")
        from llmc.quantization.measure import read_text

        for path in (self.calib_data, self.eval_data):   # before the model loads
            if path is not None:
                read_text(path, "")
        return self


@dataclass
class Quantized:
    """A quantized graph waiting to be saved; ``report`` measures the saved graph."""

    model: onnx.ModelProto
    weights: list[Weight]
    report: Callable[[Path], QuantInfo]
    io: EngineIO     # the quantized graph's (an FP8 KV cache changes the pools and outputs)


def packed_size(weights: list[Weight], sites, mode: str) -> int:
    """About the quantized graph's weights file before quantizing: each site's weight packed
    with what the pass adds beside it (FP8: a 32-bit scale a channel and x's scale; FP8 in
    blocks: of 32 at the smallest, a scale a block up to 32-bit (a checkpoint's, or an fp32
    build's), none where no block divides K; INT4: in blocks of 32 at the smallest, a 16-bit
    scale and a 16-bit offset or 8-bit zero point, and AWQ's 1/s), every other weight as it
    is, each tensor aligned as save_onnx aligns it.
    A site the pass then leaves 16-bit makes it low; the exact figure is checked again once
    the graph is rewritten (quantize's ``reserve``)."""
    packed = {s.weight for s in sites}

    def sizes(w: Weight) -> list[int]:
        n = math.prod(w.shape)
        if w.name not in packed:
            return [storage_bytes(w.dtype, w.shape)]
        if mode == "fp8":
            return [n, 4 * max(w.shape), 4]
        if mode == "fp8-block":   # a K no block divides stays 16-bit (fp8_block_pass)
            return [n, n // 32 * 4] if fp8_block(w.shape[-2]) else \
                [storage_bytes(w.dtype, w.shape)]
        return [n // 2, n // 32 * 2, n // 32 * 2, 2 * w.shape[0]]

    return file_size(b for w in weights for b in sizes(w))


def quantize(model: onnx.ModelProto, weights: list[Weight], opts: QuantOptions, io: EngineIO,
             tokenizer_json: str, tmp: Path, log: Callable[[str], None],
             prequantized: Prequantized | None = None,
             reserve: Callable[[int, int], None] = lambda reference, quantized: None
             ) -> Quantized:
    """Calibrate (where the mode needs it) and rewrite the fused graph; the unquantized graph
    is saved to ``tmp / "reference"`` for calibration and for the accuracy report. A
    pre-quantized FP8 checkpoint built as fp8 takes its own scales instead of calibration
    (its "unquantized" reference is its weights dequantized).

    ``reserve(reference bytes, quantized weights bytes)`` is asked before anything is
    written, with the quantized weights estimated (packed_size), and again with their exact
    size once the graph is rewritten (reference 0: already written); it raises if the disk
    cannot hold them and what the build writes after (build.check_space)."""
    from llmc.quantization import kv, measure, qdq

    experts = [w.name for w in weights if len(w.shape) == 3]
    if experts and opts.mode not in ("fp8-block", "none"):
        # the 2-D GEMMs alone would leave the bulk of the weights 16-bit
        raise LlmcError(f"--quant {opts.mode} does not quantize a mixture of experts yet (the "
                        f"experts' stacked weights, e.g. {experts[0]!r}); build with --quant "
                        "fp8-block (FP8 weights in blocks, the experts' too) or --quant none")
    needs_ort = opts.keeps_reference(prequantized)
    if needs_ort and io.kv_dtype == "bfloat16":
        raise LlmcError(f"--quant {opts.mode} with --dtype bf16: calibration and the accuracy "
                        "report run the graph on onnxruntime, which has no bf16 MatMul on the "
                        "CPU; build with --dtype fp16 (the same speed on the GPU)")
    if opts.lm_head:   # before the reference is saved: calibration observes the head's x
        model, weights, _ = qdq.quantize_graph(model, weights, qdq.untie_lm_head())
    head = opts.lm_head
    sites = qdq.sites(model, weights, head, experts=opts.mode == "fp8-block")
    skip = _excluded(sites, opts.exclude, {w.name: w.stacked for w in weights if w.stacked})
    sites = [s for s in sites if s.weight not in skip]
    calib_text, calib_name = measure.read_text(opts.calib_data, "calib")
    eval_seqs, eval_name = [], ""
    if opts.measure:   # tokenized before the long work, so a text it cannot score fails first
        eval_text, eval_name = measure.read_text(opts.eval_data, "eval")
        eval_seqs = measure.token_sequences(tokenizer_json, eval_text, opts.eval_size,
                                            "evaluation", "--eval-data")
    # no site counted packed without a weight mode, nor for a GGUF file's own blocks
    # (int4-gguf: its other matrices stay 16-bit); packed_size is then weights_file_size
    packed = [] if opts.mode in ("none", "int4-gguf") else sites
    reserve(weights_file_size(weights) if needs_ort else 0,
            packed_size(weights, packed, opts.mode))
    base = save_onnx(model, weights, tmp / "reference") if needs_ort else None
    details: dict = {"excluded": len(skip)} if skip else {}
    p = None
    gemm_inputs, given_fp8 = {}, None
    zero_point = opts.int4_zero_point
    if zero_point:
        details["int4_zero_points"] = True
    first = opts.mode == "fp8" and opts.fp8_first_token == "dynamic"
    if first:
        details["fp8_first_token"] = "dynamic"
    if opts.mode == "int4-rtn":
        p = qdq.int4_pass(with_lm_head=head, largest_block=opts.largest_int4_block,
                          zero_point=zero_point, skip=skip)
    elif opts.mode in KEPT_INT4 and prequantized is not None and \
            prequantized.mode == opts.mode:
        given = _checkpoint_int4(sites, prequantized, {w.name: w.shape for w in weights})
        details["scales"] = f"from the {prequantized.describe()}"
        # a GEMM not given: RTN, except in a GGUF file, whose other matrices (Q6_K, Q8_0,
        # fp16) were stored above 4 bits on purpose and stay 16-bit
        p = qdq.int4_pass(given=given, with_lm_head=head, only_given=opts.mode == "int4-gguf",
                          largest_block=opts.largest_int4_block)
    elif opts.mode == "fp8-block":   # weight-only: nothing to calibrate
        given = {}
        if prequantized is not None and prequantized.mode == "fp8-block":
            given = _checkpoint_fp8_blocks(sites, prequantized, {w.name: w for w in weights})
            details["scales"] = f"from the {prequantized.describe()}"
        p = qdq.fp8_block_pass(given, with_lm_head=head, skip=skip)
    elif opts.mode == "fp8" and prequantized is not None and prequantized.mode == "fp8":
        given_fp8 = _checkpoint_scales(sites, prequantized)
        details["scales"] = f"from the {prequantized.describe()}"
        # weights given without their input's scale (dynamic or weight-only FP8): calibrated
        gemm_inputs = {s.weight: s.x for s in sites
                       if s.weight in given_fp8[1] and s.weight not in given_fp8[0]}
        if not gemm_inputs:
            p = qdq.fp8_pass(*given_fp8, first_token=first)
    elif opts.mode != "none":
        gemm_inputs = {s.weight: s.x for s in sites}
    kv_sites = kv.kv_sites(model, weights) if opts.kv_cache_dtype == "fp8" else []
    given_kv = _checkpoint_kv_scales(kv_sites, prequantized)
    observed = [] if given_kv is not None else kv_sites
    calib = None
    if gemm_inputs or observed:
        seqs = measure.token_sequences(tokenizer_json, calib_text, opts.calib_size,
                                       "calibration", "--calib-data")
        calib = measure.calibrate(base, io, gemm_inputs, seqs,
                                  keep_rows=AWQ_ROWS if opts.mode == "int4-awq" else 0,
                                  values=[v for site in observed for v in site.observed],
                                  fp8_scale_dtype=io.kv_dtype if opts.mode == "fp8" else None)
        what = " and ".join(x for x, on in ((f"{len(gemm_inputs)} GEMM inputs", gemm_inputs),
                                           (f"{len(observed)} layers' K/V", observed)) if on)
        log(f"calibrated {what} on {calib.tokens} tokens of {calib_name}")
        details["calibration"] = f"{calib.tokens} tokens of {calib_name}"
    if gemm_inputs and opts.mode == "int4-awq":
        p = qdq.int4_pass(calib.rows, with_lm_head=head, largest_block=opts.largest_int4_block,
                          zero_point=zero_point, skip=skip)
    elif gemm_inputs:
        p = qdq.fp8_pass(calib.amax, with_lm_head=head, first_token=first) \
            if given_fp8 is None else \
            qdq.fp8_pass({**given_fp8[0], **calib.amax}, given_fp8[1], first_token=first)
    qmodel, qweights, gemms = model, weights, 0
    if p is not None:
        qmodel, qweights, report = qdq.quantize_graph(model, weights, p)
        gemms = report["fired"][p.name]
        if not gemms and opts.mode == "int4-gguf":
            raise LlmcError(f"--quant int4-gguf: none of the {prequantized.describe()}'s 4-bit "
                            "matrices is a GEMM weight llmc can keep as it is stored (GPT-2 "
                            "files store theirs transposed); build it with --quant int4-awq "
                            "or int4-rtn")
        blocks = {a.i for n in qmodel.graph.node if n.op_type == "DequantizeLinear"
                  for a in n.attribute if a.name == "block_size"}
        if blocks:
            details[f"{'fp8' if opts.mode == 'fp8-block' else 'int4'}_block_sizes"] = \
                sorted(blocks)
        head = head and qdq.lm_head_quantized(qmodel, qweights)
        if head:
            details["lm_head"] = opts.mode
        elif opts.lm_head:   # e.g. an INT4 block that does not divide its K
            log(f"warning: --quant-lm-head: {opts.mode} does not fit the LM head; it stays "
                "16-bit")
        log(f"quantized {gemms} GEMMs to {opts.mode} (the LM head "
            f"{'among them' if head else 'stays unquantized'}"
            + (f"; {len(skip)} left 16-bit by --quant-exclude" if skip else "") + ")")
    qio, kv_scales = io, []
    if kv_sites:
        amax = given_kv if given_kv is not None else \
            [kv.kv_amax(site, calib.values, io.kv_dtype) for site in kv_sites]
        if given_kv is not None:
            details["kv_scales"] = f"from the {prequantized.describe()}"
        scales = kv.kv_scales(amax, io.kv_dtype)
        qmodel, qweights = kv.fp8_kv(qmodel, qweights, scales, io.kv_dtype)
        qio = replace(io, kv_dtype=kv.FP8, kv_outputs=False, kv_rows=True)
        kv_scales = [[float(k), float(v)] for k, v in scales.astype("float32")]
        log(f"KV cache: FP8 (E4M3) pools in {len(kv_sites)} layers, K scales "
            f"{scales[:, 0].min():.3g}..{scales[:, 0].max():.3g}, V scales "
            f"{scales[:, 1].min():.3g}..{scales[:, 1].max():.3g}")

    if prequantized is not None and prequantized.kv_scales and not kv_sites:
        log("the checkpoint carries FP8 KV-cache scales; --kv-cache-dtype fp8 builds an FP8 "
            "KV cache with them")
    reserve(0, weights_file_size(qweights))

    def finish(quantized_onnx: Path) -> QuantInfo:
        acc = measure.measure(base, quantized_onnx, io, eval_seqs, eval_name,
                              opts.max_ppl_increase, qio) if opts.measure else None
        return QuantInfo(opts.mode, opts.kv_cache_dtype, gemms, details, acc, kv_scales)

    return Quantized(qmodel, qweights, finish, qio)


def _excluded(sites, patterns: tuple[str, ...],
              stacked: dict[str, tuple[tuple[str, ...], ...]] | None = None) -> set[str]:
    """The GEMM weights that --quant-exclude's globs leave 16-bit: a fused GEMM (q/k/v,
    gate/up) is one weight, left out when any of its parts' names matches; a stack of
    experts (``stacked``: its experts' checkpoint names) likewise, when its own name
    (model.layers.0.mlp.experts.down.weight) or any expert's tensor's
    (model.layers.0.mlp.experts.3.down_proj.weight) matches, so that '*.down_proj.*' takes
    the experts' downs too. A glob that matches no GEMM is an error (a typo would otherwise
    quantize everything, silently)."""
    from fnmatch import fnmatchcase

    from llmc.passes.gemm import fused_parts

    stacked = stacked or {}

    def parts(weight: str) -> list[str]:
        return fused_parts(weight) + [n for e in stacked.get(weight, ()) for n in e]

    skip = set()
    for pattern in patterns:
        hit = {s.weight for s in sites
               if any(fnmatchcase(part, pattern) for part in parts(s.weight))}
        if not hit:
            names = f", such as {fused_parts(sites[0].weight)[0]!r}" if sites else ""
            raise LlmcError(f"--quant-exclude {pattern!r} matches none of the GEMMs this build "
                            f"quantizes; it is a glob over their weight names{names} (e.g. "
                            "'*.mlp.gate_proj.*')")
        if any(s.is_lm_head for s in sites if s.weight in hit):
            raise LlmcError(f"--quant-exclude {pattern!r} names the LM head, which "
                            "--quant-lm-head quantizes: drop one of them")
        skip |= hit
    return skip


def _checkpoint_scales(sites, pre: Prequantized) -> tuple[dict[str, float], dict]:
    """A pre-quantized checkpoint's scales under the fused graph's weight names: a fused
    GEMM's input |max| is its parts' largest, its per-column weight scale the parts' scales
    side by side (per-tensor scales of q, k and v become one per-column vector). A GEMM whose
    parts were not all quantized in the checkpoint is left out (and stays unquantized); one
    whose inputs the checkpoint gives no static scale has a weight scale and no |max|."""
    import numpy as np

    from llmc.passes.gemm import fused_parts

    amax, scales = {}, {}
    for site in sites:
        parts = fused_parts(site.weight)
        if all(p in pre.weight_scale for p in parts):
            scales[site.weight] = np.concatenate([pre.weight_scale[p] for p in parts])
            if all(p in pre.input_amax for p in parts):
                amax[site.weight] = max(pre.input_amax[p] for p in parts)
    return amax, scales


def _checkpoint_kv_scales(sites, prequantized: Prequantized | None
                          ) -> list[tuple[float, float]] | None:
    """Each layer's (K, V) |max| from an FP8-KV export's scales (scale x 448), or None when
    the checkpoint has none: calibration finds them. A checkpoint with some layers' scales
    and not others' is an error, not a silent mix."""
    if not sites or prequantized is None or not prequantized.kv_scales:
        return None
    have = prequantized.kv_scales
    missing = [s.layer for s in sites if s.layer not in have]
    if missing:
        raise LlmcError(f"the checkpoint's FP8 KV-cache scales miss layers {missing}; "
                        "build with --kv-cache-dtype auto")
    return [(have[s.layer][0] * FP8_MAX, have[s.layer][1] * FP8_MAX) for s in sites]


def _given_parts(table: dict, names: list[str], shape) -> list | None:
    """A checkpoint's parts (Int4Weight or Fp8BlockWeight, [out_j, in] each) of one graph
    matrix [in, out], a fused GEMM's side by side along out: when the checkpoint gives every
    one, in one block size, and together they make that shape."""
    parts = [table.get(p) for p in names]
    if any(p is None for p in parts) or len({p.block for p in parts}) != 1 or \
            tuple(shape) != (parts[0].in_features, sum(p.scale.shape[0] for p in parts)):
        return None
    return parts


def _side_by_side(arrays: list):
    """The parts' [out_j, g] scales (or offsets) as the graph's [g, out]."""
    import numpy as np

    return np.ascontiguousarray(np.concatenate(arrays).T)


def _checkpoint_fp8_blocks(sites, pre: Prequantized, weights: dict[str, Weight]) -> dict:
    """A block-wise FP8 checkpoint's weights under the fused graph's names, in its [in, out]
    layout: a fused GEMM's parts side by side (a stack of experts: each expert's so, stacked),
    when they share one block and make the graph's [in, out] shape. Any other GEMM is left
    to round-to-nearest."""
    import numpy as np

    from llmc.passes.gemm import fused_parts
    from llmc.quantization.qdq import GivenFp8Blocks

    def matrix(parts) -> np.ndarray:
        return transposed(np.concatenate([p.values() for p in parts], axis=0))

    def scale(parts) -> np.ndarray:
        return _side_by_side([p.scale for p in parts])

    given = {}
    for site in sites:
        w = weights[site.weight]
        if w.stacked:   # [E, in, out]: every expert given, in one block size
            experts = [_given_parts(pre.fp8_blocks, names, w.shape[1:]) for names in w.stacked]
            if any(e is None for e in experts) or len({e[0].block for e in experts}) != 1:
                continue

            def values(experts=experts) -> np.ndarray:
                return np.stack([matrix(parts) for parts in experts])

            given[site.weight] = GivenFp8Blocks(values, np.stack([scale(e) for e in experts]))
        elif (parts := _given_parts(pre.fp8_blocks, fused_parts(site.weight),
                                    w.shape)) is not None:
            given[site.weight] = GivenFp8Blocks(lambda parts=parts: matrix(parts), scale(parts))
    return given


def _checkpoint_int4(sites, pre: Prequantized, shapes: dict[str, tuple]) -> dict:
    """A pre-quantized checkpoint's INT4 weights under the fused graph's names, in its
    [in, out] layout: a fused GEMM's parts side by side, when they share one block size,
    none has its own input scale (ModelOpt folds q/k/v's and gate/up's into the norm
    before) and they make the graph's [in, out] ``shapes``. Any other GEMM is left out."""
    import numpy as np

    from llmc.dtypes import np_dtype
    from llmc.passes.gemm import fused_parts
    from llmc.quantization.qdq import GivenInt4

    given = {}
    for site in sites:
        parts = _given_parts(pre.int4, fused_parts(site.weight), shapes[site.weight])
        if parts is None or (len(parts) > 1 and
                             any(p.pre_quant_scale is not None for p in parts)):
            continue

        def values(parts=parts) -> np.ndarray:
            q = np.concatenate([p.values() for p in parts], axis=0)        # [N, K]
            return transposed(q).astype(np_dtype("int4"))                  # [K, N]

        offset = None if all(p.offset is None for p in parts) else _side_by_side(
            [np.zeros_like(p.scale) if p.offset is None else p.offset for p in parts])
        given[site.weight] = GivenInt4(
            values, _side_by_side([p.scale for p in parts]), parts[0].pre_quant_scale, offset,
            all(p.integer_zero_points for p in parts))
    return given
