"""Importance criteria for channel pruning: a criterion scores every removable unit of a group
(higher =
more important). Built in: l1, l2, bn_scale, fpgm, random (data-free); activation, apoz, energy, di
(calibration data; di needs labels); taylor (calibration data with labels, gradients via torch).

A user criterion is any ``fn(analysis, group, context) -> np.ndarray`` of ``len(group)`` scores,
passed as ``PruneChannels(criterion=fn)``; ``context`` gives the graph, calibration inputs and
labels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from compiler.errors import OptionError
from compiler.ir.graph import Graph, Value
from compiler.pass_manager import pass_context
from passes.pruning.coupling import Slot
from passes.pruning.groups import ChannelGroups, Group

Criterion = Callable[[ChannelGroups, Group, "Context"], np.ndarray]


@dataclass
class Context:
    """What criteria may use: the graph, calibration inputs (list of arrays per graph input) and
    labels; ``cache`` holds per-label score arrays computed once for all groups."""

    graph: Graph
    inputs: list[np.ndarray] | None = None
    labels: np.ndarray | None = None
    seed: int = 0
    cache: dict[str, np.ndarray] = field(default_factory=dict)


def _accumulate(
    analysis: ChannelGroups, scores: np.ndarray, value: Value, axis: int, per_index: np.ndarray
) -> None:
    """Add a per-position score along (value, axis) to the labels of the units it belongs to."""
    slot = Slot(id(value), axis % len(value.shape), value.shape[axis])
    for labels in analysis.component_of(slot):
        np.add.at(scores, labels, per_index)


def _per_label(name: str, fn: Callable[[ChannelGroups, Context, np.ndarray], None]) -> Criterion:
    """A criterion computed once for the whole graph as a score per component label."""

    def criterion(analysis: ChannelGroups, group: Group, ctx: Context) -> np.ndarray:
        if name not in ctx.cache:
            scores = np.zeros(analysis.n_elements)
            fn(analysis, ctx, scores)
            ctx.cache[name] = scores
        return ctx.cache[name][group.components]

    criterion.__name__ = name
    return criterion


def _weights(graph: Graph) -> list[Value]:
    """The weight constants of conv2d and linear nodes (input 1)."""
    seen: dict[int, Value] = {}
    for node in graph.nodes:
        if node.op in ("conv2d", "linear") and node.inputs[1].is_constant:
            seen.setdefault(id(node.inputs[1]), node.inputs[1])
    return list(seen.values())


def _norm_scores(power: int):
    def fill(analysis: ChannelGroups, ctx: Context, scores: np.ndarray) -> None:
        for w in _weights(ctx.graph):
            a = np.abs(w.data.astype(np.float64)) ** power
            for axis in (0, 1):
                other = tuple(i for i in range(a.ndim) if i != axis)
                _accumulate(analysis, scores, w, axis, a.sum(axis=other) / a.size)

    return fill


def _bn_scale(analysis: ChannelGroups, ctx: Context, scores: np.ndarray) -> None:
    bns = ctx.graph.find("batch_norm")
    if not bns:
        raise OptionError(
            "criterion 'bn_scale' found no batch_norm in the graph",
            hint="run prune-channels before the fuse passes (they fold batch norms)",
        )
    for node in bns:
        if node.inputs[1].is_constant:
            _accumulate(analysis, scores, node.inputs[1], 0, np.abs(node.inputs[1].data))


def _fpgm(analysis: ChannelGroups, ctx: Context, scores: np.ndarray) -> None:
    """Filters near the geometric median of their layer are redundant (He et al. 2019): a
    filter's score is its summed distance to the layer's other filters."""
    for w in _weights(ctx.graph):
        f = w.data.reshape(w.shape[0], -1).astype(np.float64)
        sq = (f * f).sum(1)
        dist = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * f @ f.T, 0))
        total = dist.sum(1)
        _accumulate(analysis, scores, w, 0, total / max(total.mean(), 1e-12))


def _random(analysis: ChannelGroups, ctx: Context, scores: np.ndarray) -> None:
    scores[:] = np.random.default_rng(ctx.seed).random(len(scores))


def _batches(ctx: Context, name: str):
    """Calibration data cut into batches of the graph's static batch size."""
    inputs = _require_inputs(ctx, name)
    batch = ctx.graph.inputs[0].shape[0]
    n = len(inputs[0])
    if n < batch:
        raise OptionError(
            f"criterion '{name}' got {n} calibration samples, the graph's batch is {batch}",
            hint="give at least one full batch",
        )
    for start in range(0, n - batch + 1, batch):
        yield start, [x[start : start + batch] for x in inputs]


_ACT_OPS = ("relu", "clip", "hardswish", "silu", "gelu", "sigmoid", "tanh", "hardsigmoid")


def _activation_stats(kind: str):
    """Per-channel statistics of conv/linear/activation outputs on calibration data."""

    def fill(analysis: ChannelGroups, ctx: Context, scores: np.ndarray) -> None:
        from compiler.ir.interpreter import run

        values = [
            n.outputs[0]
            for n in ctx.graph.nodes
            if n.op in ("conv2d", "linear") or n.op in _ACT_OPS
        ]
        sums: dict[tuple[int, int], list] = {}
        for _, chunk in _batches(ctx, kind):
            arrays = run(ctx.graph, chunk, keep=values)[len(ctx.graph.outputs) :]
            for vi, act in enumerate(arrays):
                for axis in range(1, act.ndim):
                    other = tuple(i for i in range(act.ndim) if i != axis)
                    if kind == "activation":
                        part = np.abs(act).mean(axis=other)
                    elif kind == "apoz":  # many zeros = unimportant
                        part = 1.0 - (act == 0).mean(axis=other)
                    else:  # per-sample pooled responses, for discriminant information
                        part = act.mean(axis=tuple(i for i in other if i != 0))
                    sums.setdefault((vi, axis), []).append(part)
        for (vi, axis), parts in sums.items():
            if kind == "di":
                stat = _discriminant(np.concatenate(parts), _require_labels(ctx, "di"))
            else:
                stat = np.mean(parts, axis=0)
            _accumulate(analysis, scores, values[vi], axis, stat)

    return fill


def _output_energy(analysis: ChannelGroups, ctx: Context, scores: np.ndarray) -> None:
    """What removing an input channel costs the layers that read it, on calibration data: for a
    conv2d/linear reading channel ``c``, ``E[x_c^2] * |W[:, c]|^2``, the energy channel ``c``
    contributes to the layer's output (channels taken as uncorrelated), summed over readers
    (a data-aware weight-times-activation saliency, as in ThiNet's and Wanda's). Depthwise
    convs count on their output axis; other grouped convs are not counted."""
    from compiler.ir.interpreter import run

    readers = [
        n
        for n in ctx.graph.nodes
        if n.op in ("conv2d", "linear")
        and n.inputs[1].is_constant
        and not n.inputs[0].is_constant
        and (n.op == "linear" or n.attrs.get("groups", 1) in (1, n.inputs[0].shape[1]))
    ]
    values = list({id(n.inputs[0]): n.inputs[0] for n in readers}.values())
    sums: dict[int, np.ndarray] = {}
    count = 0
    for _, chunk in _batches(ctx, "energy"):
        arrays = run(ctx.graph, chunk, keep=values)[len(ctx.graph.outputs) :]
        for v, act in zip(values, arrays):
            axis = 1 if any(r.op == "conv2d" for r in v.users) else act.ndim - 1
            other = tuple(i for i in range(act.ndim) if i != axis)
            part = (act.astype(np.float64) ** 2).mean(axis=other)
            sums[id(v)] = sums.get(id(v), 0) + part
        count += 1
    for n in readers:
        x, w = n.inputs[0], n.inputs[1]
        energy = sums[id(x)] / count
        a = w.data.astype(np.float64) ** 2
        if n.op == "conv2d" and n.attrs.get("groups", 1) > 1:  # depthwise: channel c is row c
            _accumulate(analysis, scores, w, 0, energy * a.reshape(len(a), -1).sum(1))
        else:
            column = a.sum(axis=tuple(i for i in range(a.ndim) if i != 1))
            _accumulate(analysis, scores, w, 1, energy * column)


def _discriminant(pooled: np.ndarray, labels: np.ndarray, rho: float = 1e-4) -> np.ndarray:
    """Discriminant information of each column (Hou & Kung 2020), per channel: S_B / (S_W + rho)."""
    labels = labels[: len(pooled)]
    mu = pooled.mean(0)
    between = np.zeros(pooled.shape[1])
    within = np.zeros(pooled.shape[1])
    for k in np.unique(labels):
        part = pooled[labels == k]
        between += len(part) * (part.mean(0) - mu) ** 2
        within += ((part - part.mean(0)) ** 2).sum(0)
    return between / (within + rho * len(pooled))


def _taylor(analysis: ChannelGroups, ctx: Context, scores: np.ndarray) -> None:
    """First-order Taylor importance |sum(w * dL/dw)| per unit (Molchanov et al. 2019)."""
    import torch

    inputs = _require_inputs(ctx, "taylor")
    labels = torch.as_tensor(_require_labels(ctx, "taylor"))
    module = pass_context().require_torch_module("criterion 'taylor'")(ctx.graph)
    out = module(*[torch.as_tensor(x) for x in inputs])
    torch.nn.functional.cross_entropy(out, labels).backward()
    params = dict(module.named_parameters())
    for value, attr in zip(ctx.graph.constants(), module._const_attrs, strict=True):
        p = params.get(attr)
        if p is None or p.grad is None:
            continue
        prod = (p.detach() * p.grad).double().numpy()
        for axis in range(prod.ndim):
            other = tuple(i for i in range(prod.ndim) if i != axis)
            _accumulate(analysis, scores, value, axis, np.abs(prod.sum(axis=other)))


def _require_inputs(ctx: Context, name: str) -> list[np.ndarray]:
    if ctx.inputs is None:
        raise OptionError(
            f"criterion '{name}' needs calibration data",
            hint="pass PruneChannels(calibration_data=...) with example inputs",
        )
    return ctx.inputs


def _require_labels(ctx: Context, name: str) -> np.ndarray:
    if ctx.labels is None:
        raise OptionError(
            f"criterion '{name}' needs labels",
            hint="pass PruneChannels(labels=...) matching the calibration data",
        )
    return np.asarray(ctx.labels)


CRITERIA: dict[str, Criterion] = {
    "l1": _per_label("l1", _norm_scores(1)),
    "l2": _per_label("l2", _norm_scores(2)),
    "bn_scale": _per_label("bn_scale", _bn_scale),
    "fpgm": _per_label("fpgm", _fpgm),
    "random": _per_label("random", _random),
    "activation": _per_label("activation", _activation_stats("activation")),
    "apoz": _per_label("apoz", _activation_stats("apoz")),
    "di": _per_label("di", _activation_stats("di")),
    "taylor": _per_label("taylor", _taylor),
    "energy": _per_label("energy", _output_energy),
}
NEEDS_DATA = {"activation", "apoz", "di", "taylor", "energy"}
NEEDS_LABELS = {"di", "taylor"}


def get_criterion(criterion: str | Criterion) -> Criterion:
    if callable(criterion):
        return criterion
    if criterion not in CRITERIA:
        raise OptionError(
            f"unknown criterion {criterion!r}",
            hint=f"use one of {sorted(CRITERIA)} or a function "
            "(analysis, group, context) -> scores",
        )
    return CRITERIA[criterion]


__all__ = ["CRITERIA", "Context", "Criterion", "get_criterion"]
