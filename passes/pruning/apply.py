"""Applying a pruning plan (a set of channel-group components) to a graph: physically, by slicing
parameters and updating shape attributes, or as a mask, by zeroing the same parameters in place of
removing them. The two must compute the same outputs; :func:`prove` checks exactly that."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from compiler.errors import PassError
from compiler.ir.graph import Graph, Node
from passes.pruning.coupling import Slot
from passes.pruning.groups import ChannelGroups

AttrUpdate = Callable[[Node, Callable[[object, int], np.ndarray], dict], None]
ATTR_UPDATES: dict[str, AttrUpdate] = {}


def attr_update(*ops: str):
    """Register how an op's attributes follow when its tensors lose elements."""

    def wrap(fn: AttrUpdate) -> AttrUpdate:
        for op in ops:
            ATTR_UPDATES[op] = fn
        return fn

    return wrap


@attr_update("reshape", "expand")
def _static_shape(node, kept, new_shapes) -> None:
    node.attrs["shape"] = new_shapes[id(node.outputs[0])]


@attr_update("split")
def _split(node, kept, new_shapes) -> None:
    axis = node.attrs["axis"] % len(node.inputs[0].shape)
    node.attrs["sizes"] = tuple(new_shapes[id(o)][axis] for o in node.outputs)


@attr_update("slice")
def _slice(node, kept, new_shapes) -> None:
    x = node.inputs[0]
    axis = node.attrs["axis"] % len(x.shape)
    k = kept(x, axis)
    if len(k) == x.shape[axis]:
        return
    start = int(np.searchsorted(k, node.attrs["start"]))
    node.attrs["start"] = start
    node.attrs["end"] = start + new_shapes[id(node.outputs[0])][axis]


@attr_update("pad")
def _pad(node, kept, new_shapes) -> None:
    x, out = node.inputs[0], node.outputs[0]
    pads = list(node.attrs["pads"])
    for axis, (before, after) in enumerate(pads):
        k = kept(out, axis)
        if len(k) == out.shape[axis] or (before == after == 0):
            continue
        new_before = int(np.searchsorted(k, before))
        new_after = len(k) - int(np.searchsorted(k, before + x.shape[axis]))
        pads[axis] = (new_before, new_after)
    node.attrs["pads"] = tuple(pads)


@attr_update("conv2d")
def _conv(node, kept, new_shapes) -> None:
    x, w = node.inputs[0], node.inputs[1]
    cin = len(kept(x, 1))
    node.attrs["groups"] = cin // len(kept(w, 1))


@attr_update("attention")
def _attention(node, kept, new_shapes) -> None:
    q = node.inputs[0]
    if node.attrs["scale"] is None and len(kept(q, -1)) != q.shape[-1]:
        node.attrs["scale"] = float(1 / np.sqrt(q.shape[-1]))  # keep the original softmax scale


def _kept_fn(groups: ChannelGroups, removed: np.ndarray):
    cache: dict[Slot, np.ndarray] = {}

    def kept(value, axis: int) -> np.ndarray:
        axis = axis % len(value.shape)
        slot = Slot(id(value), axis, value.shape[axis])
        if slot not in cache:
            cache[slot] = groups.kept_indices(slot, removed)
        return cache[slot]

    return kept


def kept_indices_fn(groups: ChannelGroups, removed: np.ndarray):
    """``kept(value, axis)``: the indices along ``axis`` of ``value`` that a removal keeps."""
    return _kept_fn(groups, removed)


def removed_mask(groups: ChannelGroups, plan: Iterable[int]) -> np.ndarray:
    removed = np.zeros(groups.n_elements, bool)
    removed[list(plan)] = True
    return removed


def apply_plan(
    graph: Graph, groups: ChannelGroups, plan: Iterable[int], *, shapes_only: bool = False
) -> None:
    """Remove the plan's components from ``graph`` (the graph ``groups`` was computed on).

    With ``shapes_only`` the constants get uninitialised arrays of the new shapes (cheap; for
    counting MACs and params while searching for a target), not sliced copies.
    """
    removed = removed_mask(groups, plan)
    kept = _kept_fn(groups, removed)
    new_shapes: dict[int, tuple[int, ...]] = {}
    for value in list(graph.values()):
        new_shapes[id(value)] = tuple(len(kept(value, a)) for a in range(len(value.shape)))
    updates = []
    for node in graph.nodes:
        update = ATTR_UPDATES.get(node.op)
        if update is not None:
            updates.append((node, update))
    for node, update in updates:  # read old shapes before any constant changes
        update(node, kept, new_shapes)
    for const in graph.constants():
        shape = new_shapes[id(const)]
        if shape == const.shape:
            continue
        if shapes_only:
            const.data = np.empty(shape, const.dtype)
            continue
        data = const.data
        for axis in range(len(shape)):
            if shape[axis] != data.shape[axis]:
                data = np.take(data, kept(const, axis), axis=axis)
        const.data = np.ascontiguousarray(data)
    _reinfer_checked(graph, new_shapes)


def _reinfer_checked(graph: Graph, new_shapes: dict) -> None:
    planned = {id(v): new_shapes.get(id(v)) for n in graph.nodes for v in n.outputs}
    for node in graph.nodes:
        graph.reinfer(node)
        for v in node.outputs:
            if planned[id(v)] is not None and v.shape != planned[id(v)]:
                raise PassError(
                    f"pruning left '{v.name}' with shape {v.shape}, planned {planned[id(v)]}",
                    node=node.name,
                    op=node.op,
                    source=node.source,
                    hint="the op's coupling rule or attribute update is inconsistent; report it",
                )


def mask_plan(graph: Graph, groups: ChannelGroups, plan: Iterable[int]) -> None:
    """Zero, instead of removing, every parameter element in the plan's components."""
    removed = removed_mask(groups, plan)
    kept = _kept_fn(groups, removed)
    for const in graph.constants():
        data = None
        for axis in range(len(const.shape)):
            k = kept(const, axis)
            if len(k) == const.shape[axis]:
                continue
            if data is None:
                data = const.data.copy()
            drop = np.setdiff1d(np.arange(const.shape[axis]), k)
            index = [slice(None)] * len(const.shape)
            index[axis] = drop
            data[tuple(index)] = 0
        if data is not None:
            const.data = data


def prune_and_prove(
    graph: Graph,
    groups: ChannelGroups,
    plan: Iterable[int],
    *,
    prove: bool = True,
    inputs=None,
    tolerance: float = 1e-4,
) -> float | None:
    """Prune ``graph`` in place; with ``prove``, also build the masked original (same model, the
    removed channels' parameters zeroed) and check that both compute the same outputs on ``inputs``
    (seeded random inputs by default). Returns the relative deviation (None without ``prove``)."""
    from compiler.ir.interpreter import run
    from compiler.pass_manager import deviation

    plan = list(plan)
    reference = graph.clone() if prove else None
    if reference is not None:
        view = view_for_clone(groups, graph, reference)
    apply_plan(graph, groups, plan)
    if reference is None:
        return None
    mask_plan(reference, view, plan)
    if inputs is None:
        rng = np.random.default_rng(0)
        inputs = [rng.standard_normal(v.shape).astype(v.dtype) for v in reference.inputs]
    dev = deviation(run(reference, inputs), run(graph, inputs))
    if not dev <= tolerance:
        raise PassError(
            f"the pruned graph differs from the masked original by {dev:.3g} (relative)",
            hint="a coupling rule lets a removed channel influence a kept one; report it",
        )
    return dev


def view_for_clone(groups: ChannelGroups, graph: Graph, clone: Graph) -> _RemappedGroups:
    """Use the analysis of ``graph`` on ``clone`` (made by ``graph.clone()`` before any change)."""
    return _RemappedGroups(groups, {id(c): g for g, c in zip(graph.values(), clone.values())})


class _RemappedGroups:
    """A view of an analysis for a clone of its graph (``to_original`` maps clone value ids)."""

    def __init__(self, groups: ChannelGroups, to_original: dict) -> None:
        self.groups = groups
        self.n_elements = groups.n_elements
        self.to_original = to_original

    def kept_indices(self, slot: Slot, removed: np.ndarray) -> np.ndarray:
        orig = self.to_original.get(slot.key)
        if orig is None:
            return np.arange(slot.size)
        return self.groups.kept_indices(Slot(id(orig), slot.axis, slot.size), removed)
