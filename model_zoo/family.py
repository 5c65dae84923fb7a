"""What llmc knows of one architecture family: a config parser per HF `architectures[0]`,
how to read llama.cpp's GGUF files of it (`general.architecture`: its name table and
metadata keys), the HF tensor names a config needs, and the graph builder; and, where a
family's HF checkpoints name tensors in more than one way, the one name llmc uses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np


@dataclass(frozen=True)
class GGUFArch:
    """How llama.cpp stores one architecture: `config(metadata, tensor_names)` returns a
    config.json-like dict; `names` maps llama.cpp tensor names ({i} = layer) to HF names;
    `fix(hf_name, array, config)` undoes a convert-time change to a tensor (or returns it)."""

    config: Callable[[dict[str, Any], set[str]], dict[str, Any]]
    names: dict[str, str]
    fix: Callable[[str, np.ndarray, Any], np.ndarray] = lambda name, w, config: w


@dataclass(frozen=True)
class Family:
    name: str
    configs: dict[str, Callable[[dict[str, Any]], Any]]   # HF architectures[0] -> parser
    weight_names: Callable[[Any], list[str]]              # config -> HF tensor names
    build_graph: Callable[..., Any]                       # (config, tensor, dtype, bs, ...)
    gguf: dict[str, GGUFArch] = field(default_factory=dict)  # general.architecture -> reading
    # an HF checkpoint's tensor name -> the name weight_names uses, None for a stored buffer
    # that is no weight (GPT-2's original checkpoints: no prefix, causal-mask buffers)
    checkpoint_name: Callable[[str], str | None] = lambda name: name
