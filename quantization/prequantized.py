"""Pre-quantized checkpoints: NVIDIA ModelOpt's FP8 export (config.json's
`quantization_config`, quant_method "modelopt", quant_algo "FP8"; also in
hf_quant_config.json), as `modelopt.torch.export.export_hf_checkpoint` writes it:

    X.weight        float8_e4m3fn [out, in]
    X.weight_scale  float32 [] or [out]        W = weight * weight_scale
    X.input_scale   float32 []                 the input's amax / 448

The model reads each weight dequantized (so every family and every --quant works on it),
and the scales are kept: `--quant fp8` (or `auto`) then quantizes with the checkpoint's own
scales instead of calibrating, which gives back the checkpoint's FP8 values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from llmc.errors import LlmcError
from llmc.quantization.numerics import FP8_MAX

Readers = dict[str, Callable[[], np.ndarray]]


@dataclass(frozen=True)
class Prequantized:
    mode: str                           # the --quant mode it corresponds to: "fp8"
    producer: str                       # e.g. "modelopt 0.47.0"
    weight_scale: dict[str, np.ndarray]  # HF weight name -> its scale per output row [out]
    input_amax: dict[str, float]        # HF weight name -> its input's calibrated |max|

    def describe(self) -> str:
        return f"{self.producer} {self.mode} checkpoint ({len(self.weight_scale)} weights)"


def read_prequantized(config: dict[str, Any], readers: Readers, source: Any
                      ) -> tuple[Readers, Prequantized | None]:
    """(readers with the weights dequantized and the scales taken out, what they were) for a
    ModelOpt FP8 checkpoint; the readers unchanged and None for an unquantized one."""
    qc = config.get("quantization_config")
    if not qc:
        return readers, None
    method, algo = qc.get("quant_method"), qc.get("quant_algo")
    if method != "modelopt" or algo != "FP8":
        raise LlmcError(f"{source}: a {method} {algo} checkpoint (config.json "
                        "quantization_config) cannot be read yet; llmc reads ModelOpt FP8 "
                        "exports, and unquantized checkpoints (then --quant fp8 / int4-awq / "
                        "int4-rtn quantize them)")
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
    producer = qc.get("producer") or {}
    return out, Prequantized("fp8", f"{producer.get('name', method)} "
                                    f"{producer.get('version', '')}".strip(), scales, amax)


def _dequantized(read: Callable[[], np.ndarray], scale: np.ndarray):
    return lambda: read().astype(np.float32) * scale[:, None]
