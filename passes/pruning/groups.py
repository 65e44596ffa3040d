"""Channel-group analysis: which elements of which tensor axes must be removed together.

Every op's coupling rule (passes/pruning/coupling.py) relates axes. The analysis then
1. factorizes each axis into *atoms* so that reshapes, channel shuffles, head splits and grouped
   convs become plain axis-to-axis relations (a 768 axis feeding a (12, 64) reshape gets atoms
   (12, 64));
2. unites elements (axis, atom, index) across relations and finds connected components: each
   component is one removable unit (one channel of a residual stream across all its blocks, one
   head, one hidden unit), removable only as a whole;
3. drops components that touch a blocked element (graph inputs and outputs, normalized axes, ops
   without a rule) or hold no parameter;
4. collects components that span the same axes into *groups* (a layer's channels, a stage's stream).

A pruning *plan* is a set of component ids; :func:`apply_plan` removes them from a graph and
:func:`mask_plan` zeroes their parameters instead, which is the reference the pruned graph must
match.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from compiler.ir.graph import Graph, Value
from compiler.ops.table import get_op
from passes.pruning.coupling import Couplings, Slot
from passes.pruning.rules import RULES

Fac = tuple[int, ...]  # atom sizes, outer to inner


# -- factorizations -----------------------------------------------------------------------------


def boundaries(fac: Fac) -> set[int]:
    """Suffix products of a factorization (1 and the total included)."""
    out, p = {1}, 1
    for atom in reversed(fac):
        p *= atom
        out.add(p)
    return out


def from_boundaries(bounds: set[int]) -> Fac | None:
    """Atoms from a set of suffix products, or None when they do not form a divisibility chain."""
    chain = sorted(bounds)
    if any(b % a for a, b in zip(chain, chain[1:])):
        return None
    return tuple(b // a for a, b in reversed(list(zip(chain, chain[1:]))))


def refine(*facs: Fac) -> Fac | None:
    """The coarsest factorization refining all of ``facs`` (same total), or None."""
    return from_boundaries(set().union(*(boundaries(f) for f in facs)))


def split_fac(fac: Fac, sizes: list[int]) -> list[Fac] | None:
    """Cut a flat factorization into consecutive pieces with the given products."""
    out, k = [], 0
    for size in sizes:
        piece, p = [], 1
        while p < size and k < len(fac):
            piece.append(fac[k])
            p *= fac[k]
            k += 1
        if p != size:
            return None
        out.append(tuple(piece))
    return out


@dataclass
class Component:
    """One removable unit: the (slot, atom, index) elements that go together."""

    id: int
    members: list[tuple[Slot, int, int]] = field(default_factory=list)


@dataclass
class Group:
    """Components spanning the same axes (e.g. all output channels of one conv)."""

    id: int
    components: list[int]
    slots: list[tuple[Slot, int]]
    name: str = ""

    def __len__(self) -> int:
        return len(self.components)


class ChannelGroups:
    """The analysis result for one graph. Build with ``ChannelGroups(graph)``."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.c = collect_couplings(graph)
        self.fac: dict[Slot, Fac] = {}
        self._factorize()
        self._components()
        self._groups()

    # -- phase 1: atoms -------------------------------------------------------------------------
    def _slots(self) -> set[Slot]:
        c = self.c
        slots = set(c.blocked)
        for a, b in c.same_pairs:
            slots.update((a, b))
        for w, p, _ in c.offsets:
            slots.update((w, p))
        for ins, outs in c.regroups:
            slots.update(ins + outs)
        return slots

    def _factorize(self) -> None:
        self.fac = {s: (s.size,) if s.size > 1 else () for s in self._slots()}
        self.bad: set[tuple[str, int]] = set()  # indices of relations dropped (their slots blocked)
        changed = True
        while changed:
            changed = False
            for k, (a, b) in enumerate(self.c.same_pairs):
                if ("same", k) not in self.bad:
                    changed |= self._settle(("same", k), [a, b], refine(self.fac[a], self.fac[b]))
            for k, (ins, outs) in enumerate(self.c.regroups):
                if ("regroup", k) not in self.bad:
                    changed |= self._settle_regroup(k, ins, outs)
            for k, (whole, piece, start) in enumerate(self.c.offsets):
                if ("offset", k) not in self.bad:
                    changed |= self._settle_offset(k, whole, piece, start)

    def _settle(self, key, slots: list[Slot], fac: Fac | None) -> bool:
        if fac is None:
            self.bad.add(key)
            self.c.block(*slots)
            return False
        changed = False
        for s in slots:
            if self.fac[s] != fac:
                self.fac[s] = fac
                changed = True
        return changed

    def _settle_regroup(self, k: int, ins, outs) -> bool:
        flat_in = sum((self.fac[s] for s in ins), ())
        flat_out = sum((self.fac[s] for s in outs), ())
        common = refine(flat_in, flat_out)
        pieces_in = split_fac(common, [s.size for s in ins]) if common is not None else None
        pieces_out = split_fac(common, [s.size for s in outs]) if common is not None else None
        if pieces_in is None or pieces_out is None:
            self.bad.add(("regroup", k))
            self.c.block(*ins, *outs)
            return False
        changed = False
        for s, f in zip(ins + outs, pieces_in + pieces_out):
            f = tuple(a for a in f if a > 1)
            if self.fac[s] != f:
                self.fac[s] = f
                changed = True
        return changed

    def _inner(self, whole: Slot, piece: Slot, start: int) -> int | None:
        """The block size m of the atoms shared by whole and piece (whole = (outer, *inner),
        piece = (outer', *inner), prod(inner) = m, start % m == 0); the smallest that works."""
        cw, cp = boundaries(self.fac[whole]), boundaries(self.fac[piece])
        lo = max(max(cw - {whole.size}, default=1), max(cp - {piece.size}, default=1))
        for m in sorted(b for b in cw | cp if b >= lo):
            if whole.size % m or piece.size % m or start % m:
                continue
            if from_boundaries({b for b in cw | cp if b <= m}) is not None:
                return m
        return None

    def _settle_offset(self, k: int, whole: Slot, piece: Slot, start: int) -> bool:
        m = self._inner(whole, piece, start)
        if m is None:
            self.bad.add(("offset", k))
            self.c.block(whole, piece)
            return False
        inner = from_boundaries(
            {b for b in boundaries(self.fac[whole]) | boundaries(self.fac[piece]) if b <= m}
        )
        changed = False
        for s in (whole, piece):
            f = tuple(a for a in (s.size // m, *inner) if a > 1)
            if self.fac[s] != f:
                self.fac[s] = f
                changed = True
        return changed

    # -- phase 2: components --------------------------------------------------------------------
    def _components(self) -> None:
        self.base: dict[tuple[Slot, int], int] = {}
        n = 0
        for s in sorted(self.fac, key=lambda s: (str(s.key), s.axis)):
            for j, atom in enumerate(self.fac[s]):
                self.base[(s, j)] = n
                n += atom
        self.n_elements = n
        us, vs = [], []
        blocked = np.zeros(n, bool)
        self._edges(us, vs, blocked)
        u = np.concatenate(us) if us else np.zeros(0, np.int64)
        v = np.concatenate(vs) if vs else np.zeros(0, np.int64)
        self.labels = connected_labels(n, u, v)
        for s in self.c.blocked:
            for j in range(len(self.fac.get(s, ()))):
                b = self.base[(s, j)]
                blocked[b : b + self.fac[s][j]] = True
        bad_label = np.zeros(n, bool)
        bad_label[self.labels[blocked]] = True
        has_param = np.zeros(n, bool)
        for (s, j), b in self.base.items():
            value = self.c.values.get(s.key)
            if value is not None and value.is_constant:
                has_param[self.labels[b : b + self.fac[s][j]]] = True
        self.prunable = has_param & ~bad_label  # indexed by label

    def _edges(self, us: list, vs: list, blocked: np.ndarray) -> None:
        def tie(a: Slot, ja: int, b: Slot, jb: int, size: int, shift: int = 0) -> None:
            ba, bb = self.base[(a, ja)], self.base[(b, jb)]
            idx = np.arange(size)
            us.append(ba + idx)
            vs.append(bb + idx + shift)

        for k, (a, b) in enumerate(self.c.same_pairs):
            if ("same", k) not in self.bad:
                for j, atom in enumerate(self.fac[a]):
                    tie(a, j, b, j, atom)
        for k, (ins, outs) in enumerate(self.c.regroups):
            if ("regroup", k) not in self.bad:
                left = [(s, j) for s in ins for j in range(len(self.fac[s]))]
                right = [(s, j) for s in outs for j in range(len(self.fac[s]))]
                for (a, ja), (b, jb) in zip(left, right):
                    tie(a, ja, b, jb, self.fac[a][ja])
        for k, (whole, piece, start) in enumerate(self.c.offsets):
            if ("offset", k) not in self.bad:
                self._offset_edges(whole, piece, start, tie, blocked)

    def _offset_edges(self, whole, piece, start, tie, blocked) -> None:
        m = self._inner(whole, piece, start)
        outer_w, outer_p = whole.size // m, piece.size // m
        jw, jp = int(outer_w > 1), int(outer_p > 1)
        for k in range(len(self.fac[whole]) - jw):
            tie(whole, jw + k, piece, jp + k, self.fac[whole][jw + k])
        if outer_p > 1:
            tie(piece, 0, whole, 0, outer_p, shift=start // m)
        elif outer_w > 1:  # a one-row piece: that row of the whole cannot go
            blocked[self.base[(whole, 0)] + start // m] = True

    # -- phase 3: groups ------------------------------------------------------------------------
    def _groups(self) -> None:
        members: dict[int, list[tuple[Slot, int, int]]] = defaultdict(list)
        for (s, j), b in self.base.items():
            labs = self.labels[b : b + self.fac[s][j]]
            for i in np.flatnonzero(self.prunable[labs]):
                members[int(labs[i])].append((s, j, int(i)))
        self.components = {lab: Component(lab, m) for lab, m in members.items()}
        by_sig: dict[tuple, list[int]] = defaultdict(list)
        for lab, comp in self.components.items():
            sig = tuple(sorted({(str(s.key), s.axis, j) for s, j, _ in comp.members}))
            by_sig[sig].append(lab)
        self.groups: list[Group] = []
        for gid, labs in enumerate(sorted(by_sig.values(), key=lambda ls: min(ls))):
            first = self.components[labs[0]]
            slots = sorted({(s, j) for s, j, _ in first.members}, key=lambda t: self.base[t])
            self.groups.append(Group(gid, sorted(labs), slots, self._group_name(slots)))

    def _group_name(self, slots) -> str:
        names = []
        for s, _ in slots:
            value = self.c.values.get(s.key)
            if value is not None and value.is_constant and s.axis == 0 and value.producer is None:
                names.append(value.name)
        return ", ".join(dict.fromkeys(names)) or "?"

    # -- queries --------------------------------------------------------------------------------
    def flat_indices(self, slot: Slot, j: int, index: int) -> np.ndarray:
        """Flat positions along ``slot``'s axis whose atom ``j`` coordinate is ``index``."""
        fac = self.fac[slot]
        stride = math.prod(fac[j + 1 :])
        f = np.arange(slot.size)
        return f[(f // stride) % fac[j] == index]

    def component_of(self, slot: Slot) -> list[np.ndarray]:
        """Per atom j, the component label of each flat position along the slot's axis."""
        fac = self.fac.get(slot, ())
        f = np.arange(slot.size)
        out = []
        for j, atom in enumerate(fac):
            stride = math.prod(fac[j + 1 :])
            out.append(self.labels[self.base[(slot, j)] + (f // stride) % atom])
        return out

    def kept_indices(self, slot: Slot, removed: np.ndarray) -> np.ndarray:
        """Flat positions along ``slot``'s axis that survive removing the ``removed`` labels."""
        keep = np.ones(slot.size, bool)
        for labs in self.component_of(slot):
            keep &= ~removed[labs]
        return np.flatnonzero(keep)

    def sources(self, group: Group) -> list[str]:
        """Module paths of the nodes whose parameters the group's channels live in."""
        owner: dict[int, set[str]] = {}
        for node in self.graph.nodes:
            for v in node.inputs:
                if v is not None and v.is_constant and node.source:
                    owner.setdefault(id(v), set()).add(node.source)
        found: set[str] = set()
        for slot, _ in group.slots:
            found |= owner.get(slot.key, set())
        return sorted(found)

    def describe(self) -> str:
        """A readable listing: one line per group with its size and the layers it spans."""
        lines = [f"{len(self.groups)} prunable groups, {len(self.components)} removable units"]
        for g in self.groups:
            srcs = self.sources(g)
            shown = ", ".join(srcs[:6]) + (f", ... ({len(srcs)} layers)" if len(srcs) > 6 else "")
            lines.append(f"  group {g.id:3d}: {len(g):5d} units  {shown}")
        return "\n".join(lines)


def collect_couplings(graph: Graph) -> Couplings:
    """Run every node's coupling rule; graph inputs/outputs and axes a rule leaves unmentioned are
    blocked (an op without a rule blocks all its axes), so an incomplete rule is never unsafe."""
    c = Couplings()
    for node in graph.nodes:
        rule = get_op(node.op).coupling or RULES.get(node.op)
        c.node = node
        c.touched = set()
        if rule is not None:
            rule(node, c)
        for v in [*node.inputs, *node.outputs]:
            if v is None:
                continue
            for axis in range(len(v.shape)):
                slot = c.slot(v, axis)
                if slot not in c.touched:
                    c.block(slot)
    for v in [*graph.inputs, *graph.outputs]:
        c.block_value(v)
    return c


def connected_labels(n: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Connected components of n elements under edges (u, v): label = smallest member id."""
    labels = np.arange(n)
    if not len(u):
        return labels
    while True:
        lu, lv = labels[u], labels[v]
        if np.array_equal(lu, lv):
            return labels
        m = np.minimum(lu, lv)
        np.minimum.at(labels, u, m)
        np.minimum.at(labels, v, m)
        while True:  # pointer jumping: every element points straight at its current root
            jumped = labels[labels]
            if np.array_equal(jumped, labels):
                break
            labels = jumped


__all__ = ["ChannelGroups", "Component", "Group", "Value", "collect_couplings", "refine"]
