"""The TensorRT backends, `tensorrt` and `tensorrt-rtx`: one package, both halves.

    lower.py    fused ONNX graph -> OnnxParser -> strongly typed network -> profile -> plan
    session.py  plan -> execution context; one step per call, KV pools on the GPU
    builder.py  the parse and build in a child process, so that Ctrl-C stops a build
    shim.py     the one door to the `tensorrt` / `tensorrt_rtx` module and its logger

The two libraries share their API; the backend name picks the module.
"""

from __future__ import annotations

from pathlib import Path

from llmc.backends.base import Log, Lowered
from llmc.engine_file import EngineFile
from llmc.errors import LlmcError
from llmc.limits import BuildLimits

PLAN = "plan"


class TensorRTBackend:
    def __init__(self, name: str):
        self.name = name

    def available(self) -> tuple[bool, str]:
        from llmc.backends.tensorrt.session import available

        return available(self.name)

    def can_build(self) -> tuple[bool, str]:
        from llmc.backends.tensorrt import shim

        return shim.is_importable(self.name)

    def compute_dtype(self, dtype: str) -> str:
        return dtype

    def can_quantize(self, mode: str) -> tuple[bool, str]:
        return True, ""   # TensorRT builds Q/DQ graphs into FP8 and INT4-weight GEMMs

    def scales_fp8_first_token(self) -> tuple[bool, str]:
        # TensorRT's FP8 GEMMs come from Q -> DQ -> MatMul chains with constant scales; a
        # first token's own scale puts a Where between the DQ and the MatMul.
        return False, (f"{self.name} fuses an FP8 GEMM from Q/DQ nodes with one constant "
                       "scale for every token; build with --fp8-first-token static (or auto)")

    def can_store_kv(self, dtype: str) -> tuple[bool, str]:
        # The FP8-KV graph builds (FP8 pools in, quantized rows out, compute capability 8.9
        # and newer); its session does not write the rows yet and refuses such an engine.
        return True, ""

    def lower(self, onnx_path: Path, limits: BuildLimits, log: Log) -> Lowered:
        from llmc.backends.tensorrt import shim
        from llmc.backends.tensorrt.lower import build_plan

        targets = ()
        if self.name == "tensorrt-rtx" and _has_fp8(onnx_path):
            # TensorRT-RTX builds FP8 GEMMs only for Ada and Blackwell, not its default 8.0/8.6
            targets = FP8_RTX_TARGETS
            log(f"FP8 graph: building for compute capabilities {', '.join(targets)} only")
        plan, summary = build_plan(onnx_path, limits, self.name, log=log, rtx_targets=targets)
        return Lowered({PLAN: plan}, summary, shim.versions(self.name))

    def open(self, engine: EngineFile, log: Log | None = None, **options):
        from llmc.backends.tensorrt import shim
        from llmc.backends.tensorrt.session import TensorRTSession, available

        if engine.header.io.kv_rows:
            raise LlmcError(
                f"{engine.path} keeps an FP8 KV cache (--kv-cache-dtype fp8), whose new K/V "
                f"rows the session must write into its pools; the {self.name} session does "
                "not write them yet. Rebuild with --kv-cache-dtype auto, or with --backend "
                "cuda (sm_89 and newer: its kernels keep an E4M3 pool) or --backend reference "
                "(the CPU)")
        if shim.is_importable(self.name)[0]:
            # A plan loads only in the library version that built it: say so up front.
            built_with = engine.header.versions.get("library_version")
            here = shim.versions(self.name)["library_version"]
            if built_with != here:
                raise LlmcError(
                    f"{engine.path} was built with {self.name} {built_with}, but this machine "
                    f"has {self.name} {here}; TensorRT plans load only in the version that "
                    "built them. Rebuild the engine here with `llmc build`")
        ok, why = available(self.name)
        if not ok:
            raise LlmcError(f"cannot run {engine.path} here: {why}. Run it on such a machine, "
                            "or build a CPU engine with `llmc build --backend reference`")
        return TensorRTSession(engine.section(PLAN).tobytes(), self.name, **options)


FP8_RTX_TARGETS = ("8.9", "12.0")


def _has_fp8(onnx_path: Path) -> bool:
    """Whether the graph holds FP8 tensors (quantization/qdq.py's weights or zero points)."""
    import onnx

    fp8 = onnx.TensorProto.FLOAT8E4M3FN
    model = onnx.load(onnx_path, load_external_data=False)
    return any(t.data_type == fp8 for t in model.graph.initializer)


def backend(name: str) -> TensorRTBackend:
    return TensorRTBackend(name)
