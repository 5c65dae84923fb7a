"""A pass: a pattern rooted at one op type, a check (both in ``match``, which returns None to
decline) and a replacement; ``apply`` runs one to a fixed point and counts its firings."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from onnx import NodeProto

from llmc.passes.ir import Graph


@dataclass(frozen=True)
class Pass:
    name: str
    anchor: str                                         # op type the pattern is rooted at
    match: Callable[[Graph, NodeProto], Any | None]     # pattern + check; None declines
    replace: Callable[[Graph, Any], None]


def apply(g: Graph, p: Pass) -> int:
    """Run one pass to a fixed point over the anchors present now; returns its firings."""
    fired = 0
    for node in [n for n in g.nodes.values() if n.op_type == p.anchor]:
        if not g.alive(node):       # consumed by an earlier firing of this pass
            continue
        m = p.match(g, node)
        if m is not None:
            p.replace(g, m)
            fired += 1
    return fired
