"""A small mutable view of an ONNX graph for pattern rewrites, weights kept lazy.

Passes work on ``(onnx.ModelProto, list[Weight])`` before any weight is read: weight
initializers are placeholders (EXTERNAL, no data) and each ``Weight`` loads on demand. This
view keeps producer/consumer maps up to date as nodes come and go, so a pattern walks the
graph in O(1) per step, and a replacement only has to say which nodes it removes and which
it adds. onnx-graphsurgeon would try to read the placeholder initializers as data, and its
copy-on-export costs more than the rewrites themselves on a 30-layer model, so we stay on
the protos.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import onnx
from onnx import NodeProto, TensorProto, helper, numpy_helper

from llmc.dtypes import onnx_type
from llmc.graph import Weight

LLMC_DOMAIN = "llmc"
FUSED_OPSET = 23  # RotaryEmbedding and RMSNormalization are opset-23 ops


class Graph:
    def __init__(self, model: onnx.ModelProto, weights: Sequence[Weight]):
        self.model = model
        self.weights: dict[str, Weight] = {w.name: w for w in weights}
        self.inits: dict[str, TensorProto] = {t.name: t for t in model.graph.initializer}
        self.inputs = {v.name: v for v in model.graph.input}
        self.outputs = {v.name for v in model.graph.output}
        self.functions = {(f.domain, f.name): f for f in model.functions}
        self.nodes: dict[int, NodeProto] = {}   # id -> node, insertion ordered
        self._producer: dict[str, NodeProto] = {}
        self._consumers: dict[str, list[NodeProto]] = defaultdict(list)
        self._names = {n.name for n in model.graph.node}
        self._count = 0
        self.memo: dict = {}    # values a pass shares between its firings (e.g. half cos)
        for proto in model.graph.node:   # own copies: commit() rewrites model.graph.node
            node = NodeProto()
            node.CopyFrom(proto)
            self._link(node)

    # --- queries ---------------------------------------------------------------------------

    def producer(self, value: str, op_type: str | None = None) -> NodeProto | None:
        """The node making ``value``, if it exists (and has ``op_type``, when given)."""
        node = self._producer.get(value)
        return node if node is not None and op_type in (None, node.op_type) else None

    def consumers(self, value: str) -> list[NodeProto]:
        return list(self._consumers.get(value, ()))

    def alive(self, node: NodeProto) -> bool:
        return id(node) in self.nodes

    def const(self, value: str) -> np.ndarray | None:
        """The data of a small constant (initializer with data or Constant node), else None."""
        t = self.inits.get(value)
        if t is not None:
            return None if value in self.weights else numpy_helper.to_array(t)
        node = self.producer(value, "Constant")
        if node is None or len(node.attribute) != 1 or node.attribute[0].name != "value":
            return None
        return numpy_helper.to_array(node.attribute[0].t)

    def scalar(self, value: str) -> float | None:
        c = self.const(value)
        return float(c.reshape(-1)[0]) if c is not None and c.size == 1 else None

    def ints(self, value: str) -> list[int] | None:
        c = self.const(value)
        return [int(v) for v in c.reshape(-1)] if c is not None and c.dtype.kind == "i" else None

    def is_weight(self, value: str) -> bool:
        return value in self.weights

    def input_shape(self, value: str) -> list | None:
        v = self.inputs.get(value)
        if v is None:
            return None
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    def elem_type(self, value: str) -> int | None:
        if value in self.inits:
            return self.inits[value].data_type
        if value in self.inputs:
            return self.inputs[value].type.tensor_type.elem_type
        return None

    def private(self, nodes: Iterable[NodeProto], keep: Iterable[str] = ()) -> bool:
        """True if every output of ``nodes`` except ``keep`` is used only inside ``nodes``.

        This is the check that makes a fusion safe: an intermediate with another consumer
        (or one that is a graph output) would vanish with the chain, so the pattern declines.
        """
        nodes = list(nodes)
        inside, keep = {id(n) for n in nodes}, set(keep)
        for node in nodes:
            for out in node.output:
                if out in keep or not out:
                    continue
                if out in self.outputs or any(id(c) not in inside for c in self.consumers(out)):
                    return False
        return True

    # --- edits ---------------------------------------------------------------------------

    def fresh(self, base: str) -> str:
        while True:
            self._count += 1
            name = f"{base}__{self._count}"
            if name not in self._names and name not in self._producer:
                self._names.add(name)
                return name

    def add(self, op_type: str, inputs: Sequence[str], outputs: Sequence[str] | int = 1,
            name: str | None = None, domain: str = "", **attrs) -> NodeProto:
        """Add a node; ``outputs`` is their names, or how many fresh names to make."""
        name = self.fresh(name or op_type)
        if isinstance(outputs, int):
            outputs = [f"{name}:{k}" for k in range(outputs)]
        node = helper.make_node(op_type, list(inputs), list(outputs), name=name, domain=domain,
                                **attrs)
        self._link(node)
        return node

    def add_const(self, value: np.ndarray, base: str = "const") -> str:
        name = self.fresh(base)
        t = numpy_helper.from_array(np.asarray(value), name)
        self.inits[name] = t
        return name

    def remove(self, nodes: Iterable[NodeProto]) -> None:
        for node in nodes:
            if self.nodes.pop(id(node), None) is None:
                continue
            for value in node.input:
                users = self._consumers.get(value)
                if users:
                    users[:] = [u for u in users if u is not node]
            for value in node.output:
                if self._producer.get(value) is node:
                    del self._producer[value]

    def rename_uses(self, old: str, new: str) -> None:
        """Point every consumer of ``old`` at ``new`` (graph outputs keep their names)."""
        for node in self.consumers(old):
            for k, value in enumerate(node.input):
                if value == old:
                    node.input[k] = new
            self._consumers[new].append(node)
        self._consumers.pop(old, None)

    def add_weight(self, weight: Weight, before: str | None = None) -> str:
        """Register a lazy weight (placed before ``before`` in the streaming order)."""
        t = TensorProto(name=weight.name, data_type=onnx_type(weight.dtype),
                        dims=list(weight.shape))
        t.data_location = TensorProto.EXTERNAL
        self.inits[weight.name] = t
        items = list(self.weights.items())
        at = next((k for k, (n, _) in enumerate(items) if n == before), len(items))
        items.insert(at, (weight.name, weight))
        self.weights = dict(items)
        return weight.name

    def use_function(self, make: Callable[[], onnx.FunctionProto]) -> None:
        """Add a model-local function once (``make`` builds it on first use)."""
        f = make()
        self.functions.setdefault((f.domain, f.name), f)

    # --- output ----------------------------------------------------------------------------

    def commit(self) -> tuple[onnx.ModelProto, list[Weight]]:
        """Write the nodes back in topological order, drop unused initializers and weights."""
        order = self._toposort()
        used = {v for n in order for v in n.input} | self.outputs
        g = self.model.graph
        del g.node[:]
        g.node.extend(order)
        inits = [t for name, t in self.inits.items() if name in used]
        del g.initializer[:]
        g.initializer.extend(inits)
        del self.model.functions[:]
        self.model.functions.extend(self.functions.values())
        if self.functions and not any(o.domain == LLMC_DOMAIN for o in self.model.opset_import):
            self.model.opset_import.append(helper.make_opsetid(LLMC_DOMAIN, 1))
        weights = [w for name, w in self.weights.items() if name in used]
        return self.model, weights

    def _link(self, node: NodeProto) -> None:
        self.nodes[id(node)] = node
        self._names.add(node.name)
        for value in node.input:
            if value:
                self._consumers[value].append(node)
        for value in node.output:
            self._producer[value] = node

    def _toposort(self) -> list[NodeProto]:
        """Kahn's order, stable: nodes keep their relative order where the data allows."""
        nodes = list(self.nodes.values())
        waiting = {id(n): sum(1 for v in set(n.input) if v in self._producer) for n in nodes}
        ready = [n for n in nodes if waiting[id(n)] == 0]
        rank = {id(n): k for k, n in enumerate(nodes)}
        heap = [(rank[id(n)], id(n), n) for n in ready]
        heapq.heapify(heap)
        order = []
        while heap:
            _, _, node = heapq.heappop(heap)
            order.append(node)
            for out in node.output:
                for user in {id(u): u for u in self._consumers.get(out, ())}.values():
                    waiting[id(user)] -= sum(1 for v in set(user.input) if v == out)
                    if waiting[id(user)] == 0:
                        heapq.heappush(heap, (rank[id(user)], id(user), user))
        if len(order) != len(nodes):
            raise ValueError("the rewritten graph has a cycle")
        return order


def remove_dead_nodes(g: Graph) -> int:
    """Drop nodes none of whose outputs is used (fusions leave per-step index math behind)."""
    removed = 0
    changed = True
    while changed:
        changed = False
        for node in list(g.nodes.values()):
            if all(not g.consumers(o) and o not in g.outputs for o in node.output):
                g.remove([node])
                removed += 1
                changed = True
    return removed


# --- small pattern helpers ------------------------------------------------------------------


def attr(node: NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def const_and_other(g: Graph, node: NodeProto) -> tuple[float | None, str | None]:
    """For a binary op with one scalar-constant operand: (that scalar, the other input)."""
    if len(node.input) != 2:
        return None, None
    for k in (0, 1):
        value = g.scalar(node.input[k])
        if value is not None:
            return value, node.input[1 - k]
    return None, None


def close(value: float | None, target: float, rtol: float = 1e-3) -> bool:
    return value is not None and abs(value - target) <= rtol * abs(target)


def make_function(name: str, inputs: list[str], outputs: list[str], nodes: list[NodeProto],
                  attributes: Sequence[str] = (), doc: str = "") -> onnx.FunctionProto:
    """An ``llmc``-domain model-local function; body nodes get names for readable dumps."""
    for k, node in enumerate(nodes):
        node.name = node.name or f"{name}/{node.op_type}_{k}"
    return helper.make_function(LLMC_DOMAIN, name, inputs, outputs, nodes,
                                [helper.make_opsetid("", FUSED_OPSET)],
                                attributes=list(attributes), doc_string=doc)


def ref(node: NodeProto, name: str, attr_type: int, as_name: str | None = None) -> NodeProto:
    """Make ``node``'s attribute ``as_name`` (default ``name``) read the function's ``name``."""
    a = node.attribute.add()
    a.name, a.ref_attr_name, a.type = as_name or name, name, attr_type
    return node
