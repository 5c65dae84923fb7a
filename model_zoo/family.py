"""What llmc knows of one architecture family: a config parser per HF `architectures[0]`,
how to read llama.cpp's GGUF files of it (`general.architecture`: its name table and
metadata keys), the HF tensor names a config needs, and the graph builder; and, where a
family's checkpoints store tensors in more than one way, the tensors under the names llmc
uses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

Readers = dict[str, Callable[[], np.ndarray]]   # tensor name -> its lazy reader


def unstack_experts(readers: Readers, num_experts: int) -> Readers:
    """llama.cpp stores a layer's experts stacked, one tensor a projection; its name table
    reads them as `<...>.experts.<proj>.stacked`. Each becomes `<...>.experts.<j>.<proj>.weight`
    (the HF per-expert name), read as a slice of the stacked tensor."""
    out = {}
    for name, read in readers.items():
        if not name.endswith(".stacked"):
            out[name] = read
            continue
        for j in range(num_experts):
            expert = name.replace(".experts.", f".experts.{j}.").replace(".stacked", ".weight")
            out[expert] = lambda r=read, j=j: r()[j]
    return out


@dataclass(frozen=True)
class GGUFArch:
    """How llama.cpp stores one architecture: `config(metadata, tensor_names)` returns a
    config.json-like dict; `names` maps llama.cpp tensor names ({i} = layer) to HF names;
    `fix(hf_name, array, config)` undoes a convert-time change to a tensor (or returns it);
    `accepts(metadata)` tells files of this family from another's that llama.cpp stores
    under the same architecture name (Mixtral is a `llama` file with experts)."""

    config: Callable[[dict[str, Any], set[str]], dict[str, Any]]
    names: dict[str, str]
    fix: Callable[[str, np.ndarray, Any], np.ndarray] = lambda name, w, config: w
    accepts: Callable[[dict[str, Any]], bool] = lambda metadata: True


@dataclass(frozen=True)
class Family:
    name: str
    configs: dict[str, Callable[[dict[str, Any]], Any]]   # HF architectures[0] -> parser
    weight_names: Callable[[Any], list[str]]              # config -> HF tensor names
    build_graph: Callable[..., Any]                       # (config, tensor, dtype, bs, ...)
    gguf: dict[str, GGUFArch] = field(default_factory=dict)  # general.architecture -> reading
    # (a checkpoint's tensors under HF names, config) -> the tensors under the names
    # weight_names uses: GPT-2's original files (no prefix, causal-mask buffers), the
    # mixtures of experts' GGUF experts stacked one tensor a projection (unstack_experts)
    tensors: Callable[[Readers, Any], Readers] = lambda readers, config: readers
