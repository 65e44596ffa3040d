"""How much removing a residual block hurts, for ``prune-blocks``: the criteria, and running
graphs (whole, or from a block on) on calibration batches.

- ``entropy``: how far the block changes the information in the stream, the mean over channels
  of ``|H(output) - H(stream)|`` in bits. EBCLE (Gowdra et al.) bounds a network's useful depth
  by the entropy of its data: past it, blocks act as identities. This measures that directly per
  block, so the near-identity ones go first.
- ``output``: the relative output error of the graph without the block, on calibration data (or,
  as ``noise``, on standard-normal inputs). The values live where a block starts are computed
  once per measurement; each candidate then runs only the rest of the graph.
- ``weight``: data-free, the branch's gain on white inputs from its weights.

Graphs run through the torch module the pass context lends (fast), else the reference
interpreter.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from compiler.ir import interpreter
from compiler.ir.graph import Graph, Node, Value
from compiler.ops.table import get_op
from compiler.pass_manager import pass_context
from passes.pruning.residual import Block, remove_block

CAPTURE_BYTES = 1 << 30  # above this, "output" scores run whole graphs instead of suffixes
HISTOGRAM_BINS = 64

# -- running graphs on calibration batches ---------------------------------------------------------

Batches = list[list[np.ndarray]]


def runner() -> Callable[[Graph, Batches], Batches]:
    """Runs a graph on batches: through the torch module the pass context lends (fast), else the
    reference interpreter."""
    build = pass_context().torch_module
    if build is None:
        return lambda graph, batches: [interpreter.run(graph, b) for b in batches]

    def run(graph: Graph, batches: Batches) -> Batches:
        import torch

        module, out = build(graph), []
        with torch.no_grad():
            for b in batches:
                y = module(*[torch.from_numpy(np.ascontiguousarray(a)) for a in b])
                out.append([t.numpy() for t in (y if isinstance(y, tuple) else (y,))])
        return out

    return run


def node_runner() -> Callable[[Node, list], list] | None:
    """``(node, args) -> outputs`` for the reconstruction engine that runs conv2d and linear nodes
    through one-node torch modules of the pass context (the numpy reference is most of the refit
    time otherwise), every other node with the op table; None when no torch module is lent."""
    build = pass_context().torch_module
    if build is None:
        return None
    modules: dict[tuple, Any] = {}

    def run_node(node: Node, args: list) -> list:
        if node.op not in ("conv2d", "linear"):
            return get_op(node.op).run(args, node.attrs)
        import torch

        key = (
            node.op,
            repr(node.attrs),
            *[None if a is None else (a.shape, a.dtype) for a in args],
        )
        if key not in modules:
            g = Graph("node")
            ins = [
                None if a is None else g.add_input(f"a{i}", a.shape, a.dtype)
                for i, a in enumerate(args)
            ]
            g.outputs = list(g.add_node(node.op, ins, node.attrs).outputs)
            modules[key] = build(g)
        with torch.no_grad():
            y = modules[key](
                *[torch.from_numpy(np.ascontiguousarray(a)) for a in args if a is not None]
            )
        return [t.numpy() for t in (y if isinstance(y, tuple) else (y,))]

    return run_node


def relative_error(reference: Batches, outputs: Batches) -> float:
    """``|outputs - reference| / |reference|`` (Frobenius, over every output of every batch)."""
    num = den = 0.0
    for ref_batch, out_batch in zip(reference, outputs, strict=True):
        for r, o in zip(ref_batch, out_batch, strict=True):
            r = np.asarray(r, np.float64)
            num += float(np.sum((np.asarray(o, np.float64) - r) ** 2))
            den += float(np.sum(r * r))
    return math.sqrt(num / max(den, 1e-30))


def _suffix(graph: Graph, block: Block, cut: bool) -> tuple[Graph, list[str]]:
    """A copy of ``graph`` without ``block``; with ``cut``, only the part from the block on, its
    inputs the values computed before it that the rest reads. Returns it and the names (in
    ``graph``) of the values its inputs stand for."""
    work = graph.clone()
    remove_block(work, block)
    if not cut:
        return work, [v.name for v in work.inputs]
    dead = set(block.nodes)
    before = {n.name for n in graph.nodes[: graph.nodes.index(graph.node(block.node))]} - dead
    prefix = [n for n in work.nodes if n.name in before]
    produced = {id(v) for n in prefix for v in n.outputs} | {id(v) for v in work.inputs}
    live: dict[int, Value] = {}
    for n in work.nodes:
        if n.name not in before:
            for v in n.inputs:
                if v is not None and id(v) in produced:
                    live.setdefault(id(v), v)
    for v in work.outputs:
        if id(v) in produced:
            live.setdefault(id(v), v)
    names, inputs = [], []
    for v in live.values():
        names.append(v.name)
        if v.producer is None:
            inputs.append(v)
        else:
            inputs.append(work.add_input(f"{v.name}_cut", v.shape, v.dtype))
            work.replace_all_uses(v, inputs[-1])
    for n in reversed(prefix):
        work.erase_node(n)
    work.inputs = inputs
    return work, names


def _capture(graph: Graph, names: list[str], batches: Batches, run) -> list[dict[str, np.ndarray]]:
    """The arrays of the values named ``names`` (graph inputs included), per batch."""
    inputs = [v.name for v in graph.inputs]
    computed = [n for n in dict.fromkeys(names) if n not in inputs]
    envs = [dict(zip(inputs, b)) for b in batches]
    if computed:
        probe = graph.clone()
        probe_values = {v.name: v for v in probe.values()}
        probe.outputs = [probe_values[n] for n in computed]
        for env, arrays in zip(envs, run(probe, batches), strict=True):
            env.update(zip(computed, arrays))
    return envs


# -- criteria --------------------------------------------------------------------------------------


def output_scores(
    graph: Graph, blocks: list[Block], batches: Batches, reference: Batches, run, bar=lambda x: x
) -> list[float]:
    """Per block, the relative output error (vs ``reference``) of ``graph`` without that block
    alone. The values live where each block starts are computed once; each candidate then runs
    only the rest of the graph (whole graphs when those values would not fit in memory)."""
    cuts = [_suffix(graph, b, cut=True) for b in blocks]
    values = {v.name: v for v in graph.values()}
    per_batch = sum(values[n].nbytes for _, names in cuts for n in set(names))
    if per_batch * len(batches) > CAPTURE_BYTES:
        cuts = [_suffix(graph, b, cut=False) for b in blocks]
    envs = _capture(graph, [n for _, names in cuts for n in names], batches, run)
    scores = []
    for sub, names in bar(cuts):
        outputs = run(sub, [[env[n] for n in names] for env in envs])
        scores.append(relative_error(reference, outputs))
    return scores


def entropy_scores(graph: Graph, blocks: list[Block], batches: Batches, run) -> list[float]:
    """Per block, how much its branch changes the stream's information: the mean over channels of
    ``|H(block output) - H(stream)|`` in bits, each H the Shannon entropy of the channel's values
    on the calibration data in a histogram shared by the two. A block near zero acts as an
    identity, the kind EBCLE finds beyond a network's useful depth."""
    nodes = {n.name: n for n in graph.nodes}
    pairs = [(nodes[b.node].inputs[b.stream].name, nodes[b.node].outputs[0].name) for b in blocks]
    envs = _capture(graph, [n for p in pairs for n in p], batches, run)
    scores = []
    for s_name, y_name in pairs:
        s = np.concatenate([env[s_name] for env in envs])
        y = np.concatenate([env[y_name] for env in envs])
        scores.append(float(np.mean(np.abs(channel_entropy(y, s) - channel_entropy(s, y)))))
    return scores


def channel_entropy(x: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Shannon entropy (bits) of each channel of ``x`` (axis 1 of a 4-D map, else the last axis)
    in ``HISTOGRAM_BINS`` bins spanning the channel's range in ``x`` and ``other`` together."""
    axis = 1 if x.ndim == 4 else x.ndim - 1
    a = np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1).astype(np.float64)
    b = np.moveaxis(other, axis, 0).reshape(x.shape[axis], -1)
    lo = np.minimum(a.min(1), b.min(1))[:, None]
    width = np.maximum(np.maximum(a.max(1), b.max(1))[:, None] - lo, 1e-12)
    idx = np.clip(((a - lo) / width * HISTOGRAM_BINS).astype(np.int64), 0, HISTOGRAM_BINS - 1)
    idx += np.arange(len(a))[:, None] * HISTOGRAM_BINS
    counts = np.bincount(idx.ravel(), minlength=len(a) * HISTOGRAM_BINS).reshape(len(a), -1)
    p = counts / counts.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.nansum(np.where(p > 0, p * np.log2(p), 0.0), axis=1)


def weight_scores(graph: Graph, blocks: list[Block]) -> list[float]:
    """Data-free: the branch's gain on white inputs, the product over its conv2d/linear layers of
    ``|W|_F / sqrt(outputs)`` (the RMS output of a layer fed unit-RMS uncorrelated inputs) and
    over its batch norms of the RMS of ``scale / sqrt(var + eps)``."""
    nodes = {n.name: n for n in graph.nodes}
    scores = []
    for b in blocks:
        gain = 1.0
        for node in (nodes[name] for name in b.nodes):
            args = node.inputs
            if node.op in ("conv2d", "linear") and args[1].is_constant:
                gain *= float(np.linalg.norm(args[1].data)) / math.sqrt(args[1].shape[0])
            elif node.op == "batch_norm" and all(v.is_constant for v in args[1:]):
                inv = args[1].data / np.sqrt(args[4].data + node.attrs["eps"])
                gain *= float(np.sqrt(np.mean(np.square(inv, dtype=np.float64))))
        scores.append(gain)
    return scores
