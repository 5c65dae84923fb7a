"""Model families: shared layers (layers.py), one file per family, and the registry.

Adding a family: write model_zoo/<family>.py (its config parser, names and block, ending in
a `FAMILY`), add it to `registry.FAMILIES`, and test it (docs/architecture.md, "Adding a
model family").
"""

from llmc.model_zoo.family import Family, GGUFArch
from llmc.model_zoo.registry import (
    FAMILIES,
    Model,
    family_for,
    load_model,
    parse_config,
    supported_architectures,
)

__all__ = ["FAMILIES", "Family", "GGUFArch", "Model", "family_for", "load_model",
           "parse_config", "supported_architectures"]
