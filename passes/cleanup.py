"""Cleanup passes (all exact): remove no-op nodes, fold constant subgraphs, eliminate dead code."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from compiler.errors import OptionError, PassError
from compiler.ir.graph import Graph, Node, Value
from compiler.ops.table import get_op
from compiler.pass_manager import Pass, register_pass


def noop_input(node: Node) -> Value | None:
    """The value ``node`` passes through unchanged, or None when the node does real work."""
    if node.op in ("identity", "dropout"):
        return node.inputs[0]
    if node.op not in ("reshape", "permute", "slice", "pad", "expand", "cast"):
        return None
    x, out = node.inputs[0], node.outputs[0]
    if x.shape != out.shape or x.dtype != out.dtype:
        return None
    attrs = node.attrs
    if node.op == "permute" and list(attrs["perm"]) != list(range(len(x.shape))):
        return None
    # pads like (1, -1) keep the shape but shift the data, so only all-zero pads are no-ops
    if node.op == "pad" and any(b != 0 or a != 0 for b, a in attrs["pads"]):
        return None
    # slice with step > 0 and an unchanged length takes every element in order; reshape, expand
    # and cast with an unchanged shape and dtype are the identity
    return x


@register_pass
@dataclass
class RemoveNoops(Pass):
    """Delete nodes that return their input unchanged.

    ``identity(x) -> x``, ``dropout(x) -> x`` (inference), and when the output has the input's
    shape and dtype: ``reshape(x) -> x``, ``expand(x) -> x``, ``cast(x) -> x``, ``slice(x) -> x``
    (the slice covers the whole axis), ``permute(x, perm=identity) -> x``,
    ``pad(x, pads=all zero) -> x``.
    """

    name = "remove-noops"
    exact = True

    def run(self, graph: Graph) -> bool:
        changed = False
        for node in list(graph.nodes):
            x = noop_input(node)
            if x is not None:
                graph.replace_node(node, [x])
                changed = True
        return changed


@register_pass
@dataclass
class FoldConstants(Pass):
    """Evaluate nodes whose inputs are all constants with the op table's reference (except ops
    marked ``foldable=False`` in the op table, which decode compact weights).

    ``op($a, $b) -> $op_result``: the node's outputs become constants (keeping their names, and the
    node's ``meta["source"]`` on the constant's ``meta``), then the node is erased. One sweep in
    topological order folds whole constant subgraphs.

    Attributes:
        max_elements: size guard. When set, a node whose result has more than ``max_elements``
            elements AND more elements than its largest input is left alone: folding ``expand`` or a
            broadcasting op would multiply the bytes stored as weights. None (default) folds all.
    """

    name = "fold-constants"
    exact = True
    max_elements: int | None = None

    def __post_init__(self) -> None:
        if self.max_elements is not None and self.max_elements < 0:
            raise OptionError(
                f"fold-constants: max_elements must be >= 0 or None, got {self.max_elements}",
                hint="use None to fold every constant subgraph",
            )

    def run(self, graph: Graph) -> bool:
        changed = False
        for node in list(graph.nodes):
            present = [v for v in node.inputs if v is not None]
            if not present or not all(v.is_constant for v in present):
                continue
            if not get_op(node.op).foldable:  # decodes compact weights: keep them compact
                continue
            if self._too_big(node, present):
                continue
            arrays = _evaluate(node)
            folded = [_as_constant(o, a, node) for o, a in zip(node.outputs, arrays, strict=True)]
            graph.replace_node(node, folded)
            changed = True
        return changed

    def _too_big(self, node: Node, inputs: list[Value]) -> bool:
        if self.max_elements is None:
            return False
        largest_in = max(v.numel for v in inputs)
        return any(o.numel > self.max_elements and o.numel > largest_in for o in node.outputs)


def _evaluate(node: Node) -> list[np.ndarray]:
    arrays = [None if v is None else v.data for v in node.inputs]
    try:
        return get_op(node.op).run(arrays, node.attrs)
    except Exception as e:
        raise PassError(
            f"fold-constants: the reference implementation failed: {type(e).__name__}: {e}",
            node=node.name,
            op=node.op,
            source=node.source,
            hint="check the node's constant inputs and attributes",
        ) from e


def _as_constant(out: Value, array: np.ndarray, node: Node) -> Value:
    """A constant replacing node output ``out``, with the same name, shape and dtype."""
    array = np.asarray(array)
    if tuple(array.shape) != out.shape:
        raise PassError(
            f"fold-constants: reference gives shape {tuple(array.shape)} for output "
            f"'{out.name}', shape inference gives {out.shape}",
            node=node.name,
            op=node.op,
            source=node.source,
            hint="the op table entry's infer and reference disagree; fix the op's entry",
        )
    # the old output disappears with the node, so its (unique) name can be reused
    value = Value(out.name, out.shape, out.dtype, data=array.astype(out.dtype, copy=False))
    value.meta.update(out.meta)
    if node.source is not None:
        value.meta.setdefault("source", node.source)
    return value


@register_pass
@dataclass
class EliminateDeadCode(Pass):
    """Erase nodes none of whose outputs reaches a graph output.

    ``y = op(x)`` with ``y`` unread (directly or through other dead nodes) ``-> (nothing)``.
    """

    name = "eliminate-dead-code"
    exact = True

    def run(self, graph: Graph) -> bool:
        live = {id(v) for v in graph.outputs}
        dead: list[Node] = []
        for node in reversed(graph.nodes):
            if any(id(v) in live for v in node.outputs):
                live.update(id(v) for v in node.inputs if v is not None)
            else:
                dead.append(node)
        # ``dead`` is in reverse topological order: readers are erased before their producers
        for node in dead:
            graph.erase_node(node)
        return bool(dead)
