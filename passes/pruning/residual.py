"""Residual blocks on the IR, for ``prune-blocks``: find the removable branches of
``y = x + f(x)``, remove one (``y = x``), or mask it (``f`` contributes zeros) for the proof.

A *block* is found on the IR, not by module names: a node that computes ``stream + branch`` (an
``add`` of two computed values, or a conv2d/linear whose fused residual input is the stream) where
the branch is a set of nodes that only feed that node, reads the stream (directly or through
nodes computed from it) and does some multiply-accumulates. ResNet basic and bottleneck blocks
after ``fuse``, pre-norm transformer attention and MLP blocks (and post-norm ones: ``LN(x + f(x))``
becomes ``LN(x)``) all have that shape. A projection or downsampling shortcut (``conv(x) + f(x)``,
``pad(x[::2]) + f(x)``) does not: the other operand is not the stream the branch reads, so those
blocks are kept. With a fused epilogue activation, ``act(conv(h) + x)`` becomes ``act(x)``, and
the activation is dropped where it is idempotent on ``x`` (``relu`` of a relu output).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from compiler.ir.graph import Graph, Node, Value
from compiler.ops.table import get_op

IDEMPOTENT = ("relu", "clip")  # act(act(x)) == act(x): a fused one on a stream it made is a no-op


@dataclass(frozen=True)
class Block:
    """A removable residual branch.

    Attributes:
        node: the node computing ``stream + branch`` (an add, or a conv2d/linear with the stream
            as its fused residual input).
        stream: the index of ``node``'s input that is the identity stream.
        nodes: the nodes that go with the branch, in topological order, ``node`` last.
        name: the module path the branch came from (e.g. ``layer1.0``), else ``node``.
        macs: the multiply-accumulates removed with it.
        sources: the module paths of its nodes (what ``ignore`` patterns match, with ``name``).
    """

    node: str
    stream: int
    nodes: tuple[str, ...]
    name: str
    macs: int
    sources: tuple[str, ...] = ()


# -- finding blocks --------------------------------------------------------------------------------


def find_blocks(graph: Graph) -> list[Block]:
    """Every removable residual branch of ``graph``, in topological order of its add."""
    position = {id(n): i for i, n in enumerate(graph.nodes)}
    returned = {id(v) for v in graph.outputs}
    blocks = []
    for node in graph.nodes:
        if node.op == "add" and len(node.inputs) == 2:
            if any(v is None or v.is_constant for v in node.inputs):
                continue
            streams: tuple[int, ...] = (0, 1)
        elif (
            node.op in ("conv2d", "linear") and len(node.inputs) > 3 and node.inputs[3] is not None
        ):
            streams = (3,)
        else:
            continue
        for stream in streams:
            block = _block(graph, node, stream, position, returned)
            if block is not None:
                blocks.append(block)
                break
    return blocks


def _block(graph: Graph, node: Node, stream: int, position: dict, returned: set) -> Block | None:
    s, out = node.inputs[stream], node.outputs[0]
    if s.shape != out.shape or s.dtype != out.dtype:
        return None  # the add broadcasts the stream: y = x is not the same tensor
    # the nodes that die once `node` is replaced by its stream: every output read only by dying
    # nodes (scanning back in topological order sees every reader before its producer)
    dying, members = {id(node)}, [node]
    for m in reversed(graph.nodes[: position[id(node)]]):
        if any(v is s or id(v) in returned for v in m.outputs):
            continue
        readers = [u for v in m.outputs for u, _ in v.uses]
        if readers and all(id(u) in dying for u in readers):
            dying.add(id(m))
            members.append(m)
    members.reverse()
    if node.op == "add" and len(members) == 1:
        return None
    macs = sum(int(get_op(m.op).macs(m)) for m in members)
    if macs == 0:
        return None
    inside = {id(v) for m in members for v in m.outputs}
    external = [
        v
        for m in members
        for i, v in enumerate(m.inputs)
        if v is not None and not v.is_constant and id(v) not in inside
        if not (m is node and i == stream)
    ]
    if not _reads(graph, external, s, position):
        return None  # e.g. a projection shortcut: the branch does not read the other operand
    sources = tuple(m.source for m in members if m.source)
    return Block(
        node.name,
        stream,
        tuple(m.name for m in members),
        _module(sources) or node.name,
        macs,
        sources,
    )


def _reads(graph: Graph, values: list[Value], stream: Value, position: dict) -> bool:
    """Whether any of ``values`` (read by a branch) is ``stream`` or computed from it."""
    reached = {id(stream)}
    start = 0 if stream.producer is None else position[id(stream.producer)] + 1
    stop = max((position[id(v.producer)] + 1 for v in values if v.producer is not None), default=0)
    for m in graph.nodes[start:stop]:
        if any(v is not None and id(v) in reached for v in m.inputs):
            reached.update(id(v) for v in m.outputs)
    return any(id(v) in reached for v in values)


def _module(sources: tuple[str, ...]) -> str:
    """The deepest module holding every source (``layer1.0.conv1``, ``layer1.0.conv2`` ->
    ``layer1.0``); of a single layer, the module holding it."""
    paths = [s.split(".") for s in dict.fromkeys(sources)]
    if len(paths) == 1:
        return ".".join(paths[0][:-1] or paths[0])
    common = paths[0] if paths else []
    for p in paths[1:]:
        n = 0
        while n < min(len(common), len(p)) and common[n] == p[n]:
            n += 1
        common = common[:n]
    return ".".join(common)


# -- removing and masking --------------------------------------------------------------------------


def remove_block(graph: Graph, block: Block) -> Value:
    """``node(branch, stream) -> stream`` in place (``act(stream)`` for a fused activation that is
    not idempotent on it); the branch's nodes are erased. Returns the value now read instead."""
    nodes = {n.name: n for n in graph.nodes}
    node = nodes[block.node]
    s = node.inputs[block.stream]
    act = node.attrs.get("activation") if node.op != "add" else None
    attrs = dict(node.attrs.get("activation_attrs") or {})
    new = s
    if act and not _idempotent(s, act, attrs):
        meta = {"source": node.source} if node.source else {}
        new = graph.add_node(act, [s], attrs, name=f"{node.name}_act", before=node, meta=meta)
        new = new.outputs[0]
    graph.replace_all_uses(node.outputs[0], new)
    for name in reversed(block.nodes):
        graph.erase_node(nodes[name])
    return new


def _idempotent(stream: Value, act: str, attrs: dict) -> bool:
    p = stream.producer
    if act not in IDEMPOTENT or p is None:
        return False
    full = get_op(act).complete_attrs(attrs, act)
    if p.op == act:
        return p.attrs == full
    if p.op in ("conv2d", "linear") and p.attrs.get("activation") == act:
        return get_op(act).complete_attrs(dict(p.attrs.get("activation_attrs") or {}), act) == full
    return False


def mask_block(graph: Graph, block: Block) -> None:
    """The masked original: ``block``'s branch contributes zeros (an add reads a zero constant in
    its place; a fused conv2d/linear gets a zero weight and bias); nothing is removed."""
    node = graph.node(block.node)
    if node.op == "add":
        v = node.inputs[1 - block.stream]
        node.set_input(1 - block.stream, graph.constant(np.zeros(v.shape, v.dtype), "zeros"))
        return
    for i in (1, 2):
        v = node.inputs[i] if i < len(node.inputs) else None
        if v is not None:
            node.set_input(i, graph.constant(np.zeros(v.shape, v.dtype), "zeros"))
