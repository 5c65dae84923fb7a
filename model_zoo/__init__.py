"""Model families: shared layers (layers.py), one file per family, and the registry.

Adding a family: write model_zoo/<family>.py (its config parser, names and block, ending in
a `FAMILY`), list it here, and test it (docs/architecture.md, "Adding a model family").
"""

from llmc.model_zoo import llama
from llmc.model_zoo.registry import (
    Family,
    Model,
    family_for,
    load_model,
    parse_config,
    supported_architectures,
)

FAMILIES = (llama.FAMILY,)

__all__ = ["FAMILIES", "Family", "Model", "family_for", "load_model", "parse_config",
           "supported_architectures"]
