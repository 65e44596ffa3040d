"""Canonical text form of a graph: stable, diff-friendly, used by golden tests and
`print(graph)`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from compiler.ir.graph import Graph, Value


def format_attr(value: Any) -> str:
    if isinstance(value, float):
        return repr(round(value, 6))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_attr(v) for v in value) + "]"
    if isinstance(value, np.ndarray):
        return f"array{list(value.shape)}"
    return repr(value)


def _ref(value: Value | None) -> str:
    if value is None:
        return "_"
    if value.is_constant:
        return f"${value.name}"
    return f"%{value.name}"


def format_graph(graph: Graph, *, show_source: bool = False) -> str:
    """Print a graph as text.

    Graph inputs and node outputs are ``%name``, constants ``$name``. One line per node::

        %y: float32[1,8,4,4] = conv2d(%x, $w, $b) {stride=[1, 1], ...}
    """
    lines = [f"graph {graph.name}("]
    lines += [f"    %{v.name}: {v.type_str()}," for v in graph.inputs]
    lines.append(") {")
    for c in graph.constants():
        lines.append(f"  ${c.name}: {c.type_str()}")
    for node in graph.nodes:
        outs = ", ".join(f"%{v.name}: {v.type_str()}" for v in node.outputs)
        args = ", ".join(_ref(v) for v in node.inputs)
        attrs = ", ".join(
            f"{k}={format_attr(v)}" for k, v in sorted(node.attrs.items()) if v is not None
        )
        line = f"  {outs} = {node.op}({args})"
        if attrs:
            line += f" {{{attrs}}}"
        if show_source and node.source:
            line += f"  # {node.source}"
        lines.append(line)
    lines.append("  return " + ", ".join(_ref(v) for v in graph.outputs))
    lines.append("}")
    return "\n".join(lines)
