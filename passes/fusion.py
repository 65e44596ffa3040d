"""Fusion passes (all exact): fold batch norms into conv/linear weights, and fuse residual adds and
activations into the conv/linear epilogue ``act(conv(x, w) + b + residual)``; plus the ``fuse``
preset."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from compiler.ir.graph import Graph, Node, Value
from compiler.ops.elementwise import ACTIVATIONS
from compiler.pass_manager import Pass, register_pass, register_preset

FUSABLE = ("conv2d", "linear")


# -- helpers shared by the fusion passes ---------------------------------------------------------


def is_graph_output(graph: Graph, value: Value) -> bool:
    return any(v is value for v in graph.outputs)


def sole_producer(graph: Graph, value: Value | None, ops: tuple[str, ...] = FUSABLE) -> Node | None:
    """The node of kind ``ops`` producing ``value`` when ``value`` has exactly one reader (one use,
    not a graph output), so the producer may absorb that reader; else None."""
    if value is None or value.producer is None or value.producer.op not in ops:
        return None
    if len(value.uses) != 1 or is_graph_output(graph, value):
        return None
    return value.producer


def has_epilogue(node: Node) -> bool:
    """Whether a conv2d/linear already carries a fused residual or activation."""
    has_residual = len(node.inputs) > 3 and node.inputs[3] is not None
    return has_residual or node.attrs.get("activation") is not None


def absorb(survivor: Node, fused: Node) -> None:
    """Record on ``survivor.meta["fused"]`` the op and source of a node it absorbed.

    A new tuple each time: ``Graph.clone`` copies ``meta`` shallowly, so it must not be mutated.
    """
    entry = (fused.op, fused.source or fused.name)
    survivor.meta["fused"] = (*survivor.meta.get("fused", ()), entry)


def set_constant(graph: Graph, node: Node, index: int, array: np.ndarray, hint: str) -> None:
    """Make input ``index`` of ``node`` the constant ``array``.

    The constant Value is updated in place when ``node`` is its only reader; a shared (or absent)
    one is left alone and a new constant is wired in. Arrays are never written in place.
    """
    old = node.inputs[index] if index < len(node.inputs) else None
    if old is not None and old.is_constant and old.uses == [(node, index)]:
        if not is_graph_output(graph, old):
            old.data = array
            return
    new = graph.constant(array, name=hint)
    if old is not None:
        new.meta.update(old.meta)
    if index < len(node.inputs):
        node.set_input(index, new)
    else:
        node.set_inputs([*node.inputs, *[None] * (index - len(node.inputs)), new])


# -- fold-batch-norm -----------------------------------------------------------------------------


@register_pass
@dataclass
class FoldBatchNorm(Pass):
    """Fold an inference batch norm into the conv2d or linear that feeds it.

    ``batch_norm(conv2d(x, $w, $b), $scale, $shift, $mean, $var) -> conv2d(x, $w', $b')`` with
    ``k = scale / sqrt(var + eps)``, ``w' = w * k`` per output channel and
    ``b' = (b - mean) * k + shift`` (``b = 0`` when the conv has no bias: one is created).
    The same for ``linear``.

    Preconditions: the conv/linear output has no other reader and is not a graph output; it has no
    fused residual or activation yet; its weight, bias and the batch norm's parameters are
    constants of a floating dtype, one value per output channel. For linear the batch norm's
    channel axis (1) must be linear's feature axis, i.e. the output is 2-D ``(N, C)``.
    """

    name = "fold-batch-norm"
    exact = True

    def run(self, graph: Graph) -> bool:
        changed = False
        for bn in graph.find("batch_norm"):
            producer = _foldable_producer(graph, bn)
            if producer is not None:
                _fold(graph, bn, producer)
                changed = True
        return changed


def _foldable_producer(graph: Graph, bn: Node) -> Node | None:
    producer = sole_producer(graph, bn.inputs[0])
    if producer is None or has_epilogue(producer):
        return None
    out = producer.outputs[0]
    if producer.op == "linear" and len(out.shape) != 2:
        return None  # batch_norm normalizes axis 1, linear's features are the last axis
    channels = out.shape[1]
    w, b = producer.inputs[1], producer.inputs[2] if len(producer.inputs) > 2 else None
    params = [w, *bn.inputs[1:]] + ([b] if b is not None else [])
    if not all(v is not None and v.is_constant for v in params):
        return None
    if not all(np.issubdtype(np.dtype(v.dtype), np.floating) for v in params):
        return None
    if w.shape[0] != channels or any(v.shape != (channels,) for v in params[1:]):
        return None
    return producer


def _fold(graph: Graph, bn: Node, producer: Node) -> None:
    w = producer.inputs[1]
    b = producer.inputs[2] if len(producer.inputs) > 2 else None
    scale, shift, mean, var = (v.data.astype(np.float64) for v in bn.inputs[1:])
    k = scale / np.sqrt(var + bn.attrs["eps"])
    new_w = w.data.astype(np.float64) * k.reshape((-1,) + (1,) * (len(w.shape) - 1))
    old_b = np.zeros_like(k) if b is None else b.data.astype(np.float64)
    new_b = (old_b - mean) * k + shift
    set_constant(graph, producer, 1, new_w.astype(w.dtype), f"{w.name}_bn")
    bias_dtype = w.dtype if b is None else b.dtype
    set_constant(graph, producer, 2, new_b.astype(bias_dtype), f"{producer.name}_bias")
    absorb(producer, bn)
    graph.replace_node(bn, producer.outputs[:1])


# -- fuse-residual-add ---------------------------------------------------------------------------


@register_pass
@dataclass
class FuseResidualAdd(Pass):
    """Fuse an add into the conv2d/linear that produces one of its operands.

    ``add(conv2d(x, $w, $b), r) -> conv2d(x, $w, $b, r)`` (``_`` is passed for an absent bias),
    and likewise for ``add(r, conv2d(...))`` and ``linear``.

    Preconditions: the conv output has no other reader and is not a graph output; the conv has no
    residual and no activation yet (the epilogue adds the residual before the activation); ``r``
    has exactly the conv output's shape and dtype (no broadcasting). When ``r`` is computed after
    the conv, the conv is moved to just before the add, which is always safe: its inputs are
    defined before its old position and its only reader is the add.
    """

    name = "fuse-residual-add"
    exact = True

    def run(self, graph: Graph) -> bool:
        changed = False
        for add in graph.find("add"):
            match = _residual_match(graph, add)
            if match is None:
                continue
            producer, residual = match
            if not _defined_before(graph, residual, producer):
                _move_before(graph, producer, add)
            inputs = list(producer.inputs) + [None] * (4 - len(producer.inputs))
            inputs[3] = residual
            producer.set_inputs(inputs)
            absorb(producer, add)
            graph.replace_node(add, producer.outputs[:1])
            changed = True
        return changed


def _residual_match(graph: Graph, add: Node) -> tuple[Node, Value] | None:
    """(conv, residual) for the best operand of ``add`` to fuse into, preferring a conv that
    need not move (the later one when both operands are conv outputs)."""
    candidates = []
    for i in (0, 1):
        operand, other = add.inputs[i], add.inputs[1 - i]
        producer = sole_producer(graph, operand)
        if producer is None or has_epilogue(producer):
            continue
        if other.shape != operand.shape or other.dtype != operand.dtype:
            continue
        candidates.append((not _defined_before(graph, other, producer), producer, other))
    if not candidates:
        return None
    _, producer, other = min(candidates, key=lambda c: c[0])
    return producer, other


def _defined_before(graph: Graph, value: Value, node: Node) -> bool:
    if value.producer is None:  # graph input or constant
        return True
    return graph.nodes.index(value.producer) < graph.nodes.index(node)


def _move_before(graph: Graph, node: Node, anchor: Node) -> None:
    """Move ``node`` later, to just before ``anchor``. Only a reorder: use-lists are untouched, so
    the caller must know every reader of ``node`` comes after ``anchor`` (or is ``anchor``)."""
    graph.nodes.remove(node)
    graph.nodes.insert(graph.nodes.index(anchor), node)


# -- fuse-activations ----------------------------------------------------------------------------


@register_pass
@dataclass
class FuseActivations(Pass):
    """Fuse an activation into the epilogue of the conv2d/linear that feeds it.

    ``relu(conv2d(x, $w, $b, r)) -> conv2d(x, $w, $b, r) {activation='relu'}``; for any op in
    ``ACTIVATIONS`` (relu, clip, hardswish, hardsigmoid, silu, gelu, sigmoid, tanh), whose
    attributes become ``activation_attrs`` (None when it has none).

    Preconditions: the conv output has no other reader and is not a graph output (else the
    pre-activation value would be lost); the conv has no activation yet.
    """

    name = "fuse-activations"
    exact = True

    def run(self, graph: Graph) -> bool:
        changed = False
        for act in [n for n in graph.nodes if n.op in ACTIVATIONS]:
            producer = sole_producer(graph, act.inputs[0])
            if producer is None or producer.attrs.get("activation") is not None:
                continue
            producer.attrs["activation"] = act.op
            producer.attrs["activation_attrs"] = dict(act.attrs) or None
            absorb(producer, act)
            graph.replace_node(act, producer.outputs[:1])
            changed = True
        return changed


# Order matters, and one sweep reaches a fixpoint:
# - remove-noops first: an identity or dropout between a conv and its batch norm or activation
#   would block the fusions;
# - fold-constants next: weights computed from constants (transposes, reshapes) become the plain
#   constants that fold-batch-norm needs;
# - eliminate-dead-code before the fusions, not after: a dead reader of a conv output makes it look
#   shared and blocks every fusion; no pass after it leaves dead nodes (each erases what it
#   replaces);
# - fold-batch-norm before both epilogue fusions: it only folds into a conv without an epilogue;
# - fuse-residual-add before fuse-activations: the epilogue computes act(conv + b + r), so in
#   relu(conv + r) the conv must take the residual before it can take the relu.
register_preset(
    "fuse",
    [
        "remove-noops",
        "fold-constants",
        "eliminate-dead-code",
        "fold-batch-norm",
        "fuse-residual-add",
        "fuse-activations",
    ],
)
