"""The verifier: topological order, use-list symmetry, arity, attributes, shapes and dtypes."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from compiler.errors import VerificationError

if TYPE_CHECKING:
    from compiler.ir.graph import Graph, Node


def _fail(message: str, node: Node | None = None, hint: str | None = None) -> None:
    raise VerificationError(
        message,
        node=node.name if node else None,
        op=node.op if node else None,
        source=node.source if node else None,
        hint=hint,
    )


def verify(graph: Graph) -> None:
    """Raise :class:`VerificationError` on the first broken invariant."""
    from compiler.ops.table import get_op

    defined: set[int] = {id(v) for v in graph.inputs}
    names: set[str] = set()
    for node in graph.nodes:
        if node.name in names:
            _fail(f"duplicate node name '{node.name}'", node)
        names.add(node.name)
        if node.graph is not graph:
            _fail("node does not belong to this graph", node)
        opdef = get_op(node.op)
        lo, hi = opdef.arity
        if not lo <= len(node.inputs) <= hi:
            _fail(f"takes {lo}..{hi} inputs, has {len(node.inputs)}", node)
        for i, value in enumerate(node.inputs):
            if value is None:
                continue
            if (node, i) not in value.uses:
                _fail(f"input {i} '{value.name}' lacks the matching use-list entry", node)
            if not value.is_constant and id(value) not in defined:
                _fail(
                    f"input {i} '{value.name}' is used before it is defined",
                    node,
                    "keep graph.nodes in topological order (insert with before=/after=)",
                )
            if value.is_constant and tuple(value.data.shape) != value.shape:
                _fail(f"constant '{value.name}' shape {value.shape} != data {value.data.shape}")
        for key in opdef.required_attrs():
            if key not in node.attrs:
                _fail(f"missing attribute '{key}'", node)
        try:
            expected = opdef.infer(node)
        except Exception as e:  # noqa: BLE001 - any failure of inference is a verification failure
            _fail(f"shape inference failed: {e}", node)
        if len(expected) != len(node.outputs):
            _fail(f"has {len(node.outputs)} outputs, op defines {len(expected)}", node)
        for value, (shape, dtype) in zip(node.outputs, expected):
            if value.producer is not node:
                _fail(f"output '{value.name}' does not name this node as producer", node)
            if value.shape != tuple(shape) or value.dtype != str(np.dtype(dtype)):
                _fail(
                    f"output '{value.name}' is {value.type_str()} but inference gives "
                    f"{np.dtype(dtype)}[{','.join(map(str, shape))}]",
                    node,
                    "call graph.reinfer(node) after changing its inputs or attributes",
                )
            for user, index in value.uses:
                if user.graph is not graph or user.inputs[index] is not value:
                    _fail(f"stale use of '{value.name}' by '{user.name}'", node)
            defined.add(id(value))
    for value in graph.outputs:
        if not value.is_constant and id(value) not in defined:
            _fail(f"graph output '{value.name}' is not produced by any node or input")
