"""The model registry: which family reads a checkpoint, and the model it makes of it.

Families are looked up by HF `architectures[0]` or GGUF `general.architecture`.
`load_model` opens a checkpoint, asks the registry for its family and returns a `Model`:
the parsed config, tensors under HF names, the tokenizer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from llmc.checkpoint import Checkpoint, Tokenizer, open_checkpoint
from llmc.checkpoint.base import NamedTensors
from llmc.config import architecture
from llmc.errors import LlmcError
from llmc.model_zoo import (
    gemma2,
    gemma3,
    gpt2,
    llama,
    mixtral,
    phi3,
    qwen2_moe,
    qwen3,
    qwen3_moe,
)
from llmc.model_zoo.family import Family, GGUFArch
from llmc.quantization.prequantized import Prequantized, gguf_int4, read_prequantized

# Every family llmc builds; adding one is a file in model_zoo/ and a line here.
FAMILIES: tuple[Family, ...] = (llama.FAMILY, phi3.FAMILY, qwen3.FAMILY,
                                 gemma2.FAMILY, gemma3.FAMILY, gpt2.FAMILY, mixtral.FAMILY,
                                 qwen2_moe.FAMILY, qwen3_moe.FAMILY)


def family_for(hf_architecture: str) -> Family:
    for fam in FAMILIES:
        if hf_architecture in fam.configs:
            return fam
    raise LlmcError(f"unsupported architecture {hf_architecture!r}; supported: "
                    f"{', '.join(supported_architectures())}")


def gguf_family(metadata: dict[str, Any]) -> tuple[Family, GGUFArch]:
    """The family reading a GGUF file: its `general.architecture`, and where two families
    share one (llama: Llama and Mixtral), the one whose reading accepts the metadata."""
    gguf_architecture = metadata.get("general.architecture")
    for fam in FAMILIES:
        arch = fam.gguf.get(gguf_architecture)
        if arch is not None and arch.accepts(metadata):
            return fam, arch
    known = sorted({a for fam in FAMILIES for a in fam.gguf})
    raise LlmcError(f"GGUF architecture {gguf_architecture!r} is not supported "
                    f"(supported: {', '.join(known)})")


def supported_architectures() -> list[str]:
    return sorted(a for fam in FAMILIES for a in fam.configs)


def parse_config(hf: dict[str, Any]):
    """The family's frozen config for a config.json dict."""
    return family_for(architecture(hf)).configs[architecture(hf)](hf)


@dataclass
class Model(NamedTensors):
    """A checkpoint read through its family: config, tensors under HF names, tokenizer."""

    source: Path
    family: Family
    config: Any
    readers: dict[str, Callable[[], np.ndarray]]
    checkpoint: Checkpoint
    prequantized: Prequantized | None = None   # a pre-quantized checkpoint's scales
    # a GGUF file's matrices in 4-bit blocks, by HF name (their codes, scales, minimums)
    int4_blocks: dict[str, Callable[[], tuple]] = field(default_factory=dict)
    fix: Callable[[str, np.ndarray], np.ndarray] = lambda name, a: a

    def stored_int4(self) -> Prequantized:
        """The file's own 4-bit blocks as INT4 weights (--quant int4-gguf), read now."""
        return gguf_int4(self.int4_blocks, self.source, self.fix)

    def tokenizer(self) -> Tokenizer:
        return Tokenizer(self.checkpoint.tokenizer_json(), self.checkpoint.chat_template,
                         self.config.bos_token_id, self.config.eos_token_ids)

    def check_tensors(self, ignore=("rotary_emb.inv_freq",)) -> None:
        """Every tensor the config needs is there and nothing else is (name them if not)."""
        want = set(self.family.weight_names(self.config))
        have = {n for n in self.readers if not any(i in n for i in ignore)}
        if getattr(self.config, "tie_word_embeddings", False):
            have.discard("lm_head.weight")  # some tied checkpoints still store the copy
        missing, unexpected = sorted(want - have), sorted(have - want)
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing tensors: {_list(missing)}")
            if unexpected:
                parts.append(f"unexpected tensors: {_list(unexpected)}")
            raise LlmcError(
                f"{self.source} does not match {self.config.architecture} with "
                f"{self.config.num_hidden_layers} layers: " + "; ".join(parts)
            )

    def build_graph(self, dtype: str, kv_block_size: int, weights_rounded_to: str | None = None):
        """The unfused graph of one engine step: (onnx.ModelProto, lazy weights)."""
        return self.family.build_graph(self.config, self.tensor, dtype, kv_block_size,
                                       weights_rounded_to)


def _list(names: list[str], most: int = 8) -> str:
    more = f" (+{len(names) - most} more)" if len(names) > most else ""
    return ", ".join(names[:most]) + more


def load_model(path: str | os.PathLike) -> Model:
    """Open an HF model folder or a .gguf file as a model of a registered family."""
    ckpt = open_checkpoint(path)
    if ckpt.format == "hf":
        config = parse_config(ckpt.config)
        family = family_for(config.architecture)
        readers, prequantized = read_prequantized(ckpt.config, ckpt.readers, ckpt.source)
        return Model(ckpt.source, family, config, family.tensors(readers, config), ckpt,
                     prequantized)
    family, arch = gguf_family(ckpt.metadata)
    hf_names = {}
    for gguf_name in ckpt.readers:
        name = hf_name(arch.names, gguf_name)
        if name is None:
            raise LlmcError(f"{ckpt.source}: unexpected GGUF tensor {gguf_name!r}")
        hf_names[name] = gguf_name
    hf = arch.config(ckpt.metadata, set(hf_names))
    config = parse_config(hf)

    def reader(name: str, gguf_name: str):
        return lambda: arch.fix(name, ckpt.tensor(gguf_name), config)

    readers = {n: reader(n, g) for n, g in hf_names.items()}
    blocks = {n: ckpt.int4_blocks[g] for n, g in hf_names.items() if g in ckpt.int4_blocks}
    return Model(ckpt.source, family, config, family.tensors(readers, config), ckpt,
                 int4_blocks=blocks, fix=lambda name, a: arch.fix(name, a, config))


def hf_name(table: dict[str, str], gguf_name: str) -> str | None:
    """llama.cpp's name -> HF's through a family table whose keys use {i} for the layer."""
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) > 2:
        template = table.get("blk.{i}." + ".".join(parts[2:]))
        return template.format(i=parts[1]) if template else None
    return table.get(gguf_name)
