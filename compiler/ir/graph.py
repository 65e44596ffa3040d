"""The IR: Values (tensors), Nodes (ops) and Graphs, with use-lists kept right by a few rewiring
methods.

Invariants (checked by :func:`compiler.ir.verify.verify`):
- ``graph.nodes`` is in topological order; every node input is a graph input, a constant or the
  output of an earlier node.
- use-lists are symmetric: ``(node, i) in value.uses`` iff ``node.inputs[i] is value``.
- every value has a static shape (tuple of ints) and a numpy dtype name.

Constant arrays are treated as immutable: a pass that changes a weight makes a new array and assigns
``value.data = new`` (which also updates the shape), so graphs cloned with :meth:`Graph.clone` can
share arrays safely.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from compiler.errors import VerificationError

Shape = tuple[int, ...]


class Value:
    """A tensor: a graph input, a constant (``data`` set) or one output of a node."""

    def __init__(
        self,
        name: str,
        shape: Sequence[int],
        dtype: str,
        *,
        data: np.ndarray | None = None,
        producer: Node | None = None,
        index: int = 0,
    ) -> None:
        self.name = name
        self.shape: Shape = tuple(int(d) for d in shape)
        self.dtype = str(np.dtype(dtype))
        self._data = data
        self.producer = producer
        self.index = index
        self.uses: list[tuple[Node, int]] = []
        self.meta: dict[str, Any] = {}

    @property
    def data(self) -> np.ndarray | None:
        return self._data

    @data.setter
    def data(self, array: np.ndarray) -> None:
        if self.producer is not None:
            raise VerificationError(f"value '{self.name}' is a node output, not a constant")
        self._data = np.asarray(array)
        self.shape = tuple(self._data.shape)
        self.dtype = str(self._data.dtype)

    @property
    def is_constant(self) -> bool:
        return self._data is not None

    @property
    def users(self) -> list[Node]:
        """Distinct nodes that read this value, in use order."""
        seen: dict[int, Node] = {}
        for node, _ in self.uses:
            seen.setdefault(id(node), node)
        return list(seen.values())

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.numel * np.dtype(self.dtype).itemsize

    def type_str(self) -> str:
        return f"{self.dtype}[{','.join(map(str, self.shape))}]"

    def __repr__(self) -> str:
        return f"%{self.name}: {self.type_str()}"


class Node:
    """One operation. ``inputs`` are Values (``None`` for an omitted optional input)."""

    def __init__(self, op: str, name: str, attrs: dict[str, Any] | None = None) -> None:
        self.op = op
        self.name = name
        self.attrs: dict[str, Any] = dict(attrs or {})
        self.meta: dict[str, Any] = {}
        self._inputs: list[Value | None] = []
        self.outputs: list[Value] = []
        self.graph: Graph | None = None

    @property
    def inputs(self) -> tuple[Value | None, ...]:
        return tuple(self._inputs)

    @property
    def source(self) -> str | None:
        """Module path in the user's model this node came from, if known."""
        return self.meta.get("source")

    def set_input(self, index: int, value: Value | None) -> None:
        """Rewire input ``index`` to ``value``, keeping both use-lists right."""
        old = self._inputs[index]
        if old is not None:
            old.uses.remove((self, index))
        self._inputs[index] = value
        if value is not None:
            value.uses.append((self, index))

    def set_inputs(self, values: Sequence[Value | None]) -> None:
        """Replace the whole input list (the arity may change)."""
        for i, old in enumerate(self._inputs):
            if old is not None:
                old.uses.remove((self, i))
        self._inputs = []
        for i, value in enumerate(values):
            self._inputs.append(value)
            if value is not None:
                value.uses.append((self, i))

    def __repr__(self) -> str:
        return f"<Node {self.name}: {self.op}>"


class Graph:
    """A dataflow graph with ordered inputs, outputs and topologically ordered nodes."""

    def __init__(self, name: str = "graph") -> None:
        self.name = name
        self.inputs: list[Value] = []
        self.outputs: list[Value] = []
        self.nodes: list[Node] = []
        self.meta: dict[str, Any] = {}
        self._names: set[str] = set()  # value names
        self._node_names: set[str] = set()
        self._counter = itertools.count()

    # -- naming -------------------------------------------------------------------------------
    def unique_name(self, hint: str, *, node: bool = False) -> str:
        """A fresh value name (or node name with ``node=True``) based on ``hint``."""
        taken = self._node_names if node else self._names
        hint = hint or "v"
        name = hint
        while name in taken:
            name = f"{hint}_{next(self._counter)}"
        taken.add(name)
        return name

    # -- building -----------------------------------------------------------------------------
    def add_input(self, name: str, shape: Sequence[int], dtype: str = "float32") -> Value:
        value = Value(self.unique_name(name), shape, dtype)
        self.inputs.append(value)
        return value

    def constant(self, data: Any, name: str = "const") -> Value:
        """A new constant value holding ``data`` (converted to a numpy array)."""
        array = np.asarray(data)
        return Value(self.unique_name(name), array.shape, str(array.dtype), data=array)

    def add_node(
        self,
        op: str,
        inputs: Sequence[Value | None],
        attrs: dict[str, Any] | None = None,
        *,
        name: str | None = None,
        before: Node | None = None,
        after: Node | None = None,
        meta: dict[str, Any] | None = None,
    ) -> Node:
        """Create a node, infer its output types from the op table and insert it.

        Without ``before``/``after`` the node is appended. Output values are named after the node.
        """
        from compiler.ops.table import get_op

        opdef = get_op(op)
        node = Node(
            op, self.unique_name(name or op, node=True), opdef.complete_attrs(attrs or {}, op)
        )
        node.meta.update(meta or {})
        node.set_inputs(inputs)
        types = opdef.infer(node)
        node.outputs = [
            Value(
                self.unique_name(node.name if len(types) == 1 else f"{node.name}.{i}"),
                shape,
                dtype,
                producer=node,
                index=i,
            )
            for i, (shape, dtype) in enumerate(types)
        ]
        node.graph = self
        if before is not None:
            self.nodes.insert(self.nodes.index(before), node)
        elif after is not None:
            self.nodes.insert(self.nodes.index(after) + 1, node)
        else:
            self.nodes.append(node)
        return node

    def reinfer(self, node: Node) -> None:
        """Recompute ``node``'s output types after its inputs or attributes changed."""
        from compiler.ops.table import get_op

        for value, (shape, dtype) in zip(node.outputs, get_op(node.op).infer(node)):
            value.shape, value.dtype = tuple(int(d) for d in shape), str(np.dtype(dtype))

    def reinfer_all(self) -> None:
        for node in self.nodes:
            self.reinfer(node)

    # -- rewiring -----------------------------------------------------------------------------
    def replace_all_uses(self, old: Value, new: Value) -> None:
        """Make every reader of ``old`` (nodes and graph outputs) read ``new`` instead."""
        if old is new:
            return
        for node, index in list(old.uses):
            node.set_input(index, new)
        self.outputs = [new if v is old else v for v in self.outputs]

    def erase_node(self, node: Node) -> None:
        """Remove a node whose outputs nobody reads."""
        for value in node.outputs:
            if value.uses or any(v is value for v in self.outputs):
                readers = ", ".join(n.name for n in value.users) or "graph output"
                raise VerificationError(
                    f"cannot erase node '{node.name}': its output '{value.name}' is still read "
                    f"by {readers}",
                    node=node.name,
                    op=node.op,
                    hint="replace_all_uses() of its outputs first",
                )
        node.set_inputs([])
        self.nodes.remove(node)
        node.graph = None

    def replace_node(self, node: Node, new_outputs: Sequence[Value]) -> None:
        """Redirect the readers of ``node``'s outputs to ``new_outputs``, then erase ``node``."""
        for old, new in zip(node.outputs, new_outputs):
            self.replace_all_uses(old, new)
        self.erase_node(node)

    # -- queries ------------------------------------------------------------------------------
    def constants(self) -> list[Value]:
        """Distinct constant values read by nodes, in first-use order."""
        seen: dict[int, Value] = {}
        for node in self.nodes:
            for value in node.inputs:
                if value is not None and value.is_constant:
                    seen.setdefault(id(value), value)
        for value in self.outputs:
            if value.is_constant:
                seen.setdefault(id(value), value)
        return list(seen.values())

    def values(self) -> Iterable[Value]:
        yield from self.inputs
        yield from self.constants()
        for node in self.nodes:
            yield from node.outputs

    def find(self, op: str) -> list[Node]:
        return [n for n in self.nodes if n.op == op]

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    # -- whole-graph operations ---------------------------------------------------------------
    def clone(self) -> Graph:
        """A structural copy; constant arrays are shared (they are never mutated in place)."""
        new = Graph(self.name)
        new.meta = dict(self.meta)
        new._names = set(self._names)
        new._node_names = set(self._node_names)
        new._counter = copy.copy(self._counter)  # same next name, without advancing ours
        vmap: dict[int, Value] = {}

        def copy_value(v: Value, producer: Node | None = None) -> Value:
            c = Value(v.name, v.shape, v.dtype, data=v.data, producer=producer, index=v.index)
            c.meta = dict(v.meta)
            vmap[id(v)] = c
            return c

        new.inputs = [copy_value(v) for v in self.inputs]
        for v in self.constants():
            copy_value(v)
        for node in self.nodes:
            n = Node(node.op, node.name, dict(node.attrs))
            n.meta = dict(node.meta)
            n.graph = new
            n.set_inputs([None if v is None else vmap[id(v)] for v in node.inputs])
            n.outputs = [copy_value(v, producer=n) for v in node.outputs]
            new.nodes.append(n)
        new.outputs = [vmap[id(v)] for v in self.outputs]
        return new

    def verify(self) -> None:
        from compiler.ir.verify import verify

        verify(self)

    def to_networkx(self):  # -> networkx.MultiDiGraph
        """Nodes as networkx nodes (keyed by name, attribute ``node``), values as edges."""
        import networkx as nx

        g = nx.MultiDiGraph()
        for node in self.nodes:
            g.add_node(node.name, node=node, op=node.op)
        for node in self.nodes:
            for i, value in enumerate(node.inputs):
                if value is not None and value.producer is not None:
                    g.add_edge(value.producer.name, node.name, value=value.name, index=i)
        return g

    def __str__(self) -> str:
        from compiler.ir.printer import format_graph

        return format_graph(self)
