"""A graph as plain data (dicts, lists, tuples, strings, numbers), and back.

The plain form holds everything but the constants' arrays: each constant is named, and the caller
stores the arrays where it likes (the torch backend's ``.pt`` file keeps them in a state dict that
``torch.load(weights_only=True)`` reads, so loading a model runs no pickled code). Node attributes
must be plain already; numpy scalars become Python numbers. ``meta`` entries that are not plain
are left out (they are analysis notes, not semantics).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from compiler.errors import BackendError
from compiler.ir.graph import Graph, Value

__all__ = ["FORMAT", "graph_from_plain", "graph_to_plain"]

FORMAT = "slimgraph.graph/1"

_SCALARS = (type(None), bool, int, float, str)


class _NotPlain(Exception):
    pass


def _plain(x: Any) -> Any:
    """``x`` with numpy scalars made Python numbers; raises :class:`_NotPlain` for anything else
    that is not None, a bool, number, string, or a tuple, list or str-keyed dict of those."""
    if isinstance(x, _SCALARS):
        return x
    if isinstance(x, np.generic) and x.dtype.kind in "biuf":
        return x.item()
    if isinstance(x, (tuple, list)):
        return type(x)(_plain(v) for v in x)
    if isinstance(x, dict) and all(isinstance(k, str) for k in x):
        return {k: _plain(v) for k, v in x.items()}
    raise _NotPlain(type(x).__name__)


def _plain_meta(meta: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in meta.items():
        try:
            out[key] = _plain(value)
        except _NotPlain:
            continue
    return out


def graph_to_plain(graph: Graph) -> dict[str, Any]:
    """``graph`` as plain data, its constants by name (without their arrays).

    Raises:
        BackendError: a node attribute that is not plain data (named in the message).
    """
    index: dict[int, int] = {}
    values: list[dict[str, Any]] = []

    def add(value: Value, kind: str) -> int:
        index[id(value)] = len(values)
        values.append(
            {
                "name": value.name,
                "shape": tuple(value.shape),
                "dtype": value.dtype,
                "kind": kind,
                "meta": _plain_meta(value.meta),
            }
        )
        return index[id(value)]

    for value in graph.inputs:
        add(value, "input")
    for value in graph.constants():
        add(value, "constant")
    nodes = []
    for node in graph.nodes:
        try:
            attrs = _plain(node.attrs)
        except _NotPlain as e:
            raise BackendError(
                f"node attribute of type {e} cannot be saved",
                node=node.name,
                op=node.op,
                hint="give the op plain attributes (numbers, strings, tuples, dicts of those)",
            ) from None
        nodes.append(
            {
                "op": node.op,
                "name": node.name,
                "attrs": attrs,
                "meta": _plain_meta(node.meta),
                "inputs": tuple(None if v is None else index[id(v)] for v in node.inputs),
                "outputs": tuple(add(v, "output") for v in node.outputs),
            }
        )
    return {
        "format": FORMAT,
        "name": graph.name,
        "meta": _plain_meta(graph.meta),
        "values": values,
        "nodes": nodes,
        "inputs": tuple(index[id(v)] for v in graph.inputs),
        "outputs": tuple(index[id(v)] for v in graph.outputs),
    }


def graph_from_plain(plain: dict[str, Any], constant: Callable[[str], np.ndarray]) -> Graph:
    """The graph ``plain`` describes; ``constant(name)`` gives each constant's array.

    Each node's output types are inferred again from the op table and must equal the saved ones
    (an op registered by a user must be registered before loading).

    Raises:
        BackendError: not a plain graph of this format, or the saved types disagree.
    """
    if not isinstance(plain, dict) or plain.get("format") != FORMAT:
        raise BackendError(
            "not a saved slimgraph graph",
            hint=f"expected a dict with format {FORMAT!r}, as graph_to_plain writes",
        )
    graph = Graph(plain["name"])
    graph.meta = dict(plain["meta"])
    specs = plain["values"]
    made: dict[int, Value] = {}

    def restore(i: int, value: Value) -> Value:
        spec = specs[i]
        value.meta = dict(spec["meta"])
        graph._names.add(spec["name"])
        made[i] = value
        return value

    for i, spec in enumerate(specs):
        if spec["kind"] == "input":
            restore(i, graph.add_input(spec["name"], spec["shape"], spec["dtype"]))
        elif spec["kind"] == "constant":
            data = np.asarray(constant(spec["name"]))
            if tuple(data.shape) != tuple(spec["shape"]) or str(data.dtype) != spec["dtype"]:
                raise BackendError(
                    f"constant '{spec['name']}' is {data.dtype}{list(data.shape)}, the graph "
                    f"says {spec['dtype']}{list(spec['shape'])}",
                    hint="load the weights saved with this graph",
                )
            value = Value(spec["name"], spec["shape"], spec["dtype"], data=data)
            restore(i, value)
    for entry in plain["nodes"]:
        inputs = [None if i is None else made[i] for i in entry["inputs"]]
        node = graph.add_node(entry["op"], inputs, entry["attrs"], name=entry["name"])
        node.meta = dict(entry["meta"])
        for value, i in zip(node.outputs, entry["outputs"], strict=True):
            spec = specs[i]
            if value.shape != tuple(spec["shape"]) or value.dtype != spec["dtype"]:
                raise BackendError(
                    f"node '{node.name}' ({node.op}) infers {value.type_str()} for output "
                    f"'{spec['name']}', saved as {spec['dtype']}{list(spec['shape'])}",
                    node=node.name,
                    op=node.op,
                    hint="load with the slimgraph version (and registered ops) that saved it",
                )
            value.name = spec["name"]
            restore(i, value)
    graph.outputs = [made[i] for i in plain["outputs"]]
    return graph
