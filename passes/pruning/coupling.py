"""The vocabulary of channel-coupling rules: a rule states, per op, which tensor axes must shrink
together.

A rule is ``rule(node, c)`` where ``c`` is a :class:`Couplings` collector. It relates *slots* (one
axis of one Value, or a virtual axis) with four statements:

- ``c.same(a, b)``: element i of a is element i of b (equal sizes);
- ``c.offset(whole, piece, start)``: element i of piece is element start + i of whole;
- ``c.regroup(ins, outs)``: the same flat index space factorized two ways (a reshape group, conv
  groups);
- ``c.block(*slots)``: these elements may never be removed (reductions over the axis, unknown ops).

Axes a rule does not mention are independent (a conv's spatial axes, its input vs output channels).
Ops without a rule block every axis they touch, so an unknown op is always safe. Rules live in the
op table (``OpDef.coupling``, for an op a user registers); the built-in ones are the table
``RULES`` in ``passes/pruning/rules.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from compiler.ir.graph import Node, Value


@dataclass(frozen=True)
class Slot:
    """One axis of a Value (``value`` set) or a virtual axis of a node (``value`` None)."""

    key: Any  # id(value) or a (node name, tag) pair for virtual slots
    axis: int
    size: int


@dataclass
class Couplings:
    """Collects the statements of every node's coupling rule."""

    values: dict[Any, Value] = field(default_factory=dict)
    same_pairs: list[tuple[Slot, Slot]] = field(default_factory=list)
    offsets: list[tuple[Slot, Slot, int]] = field(default_factory=list)
    regroups: list[tuple[tuple[Slot, ...], tuple[Slot, ...]]] = field(default_factory=list)
    blocked: set[Slot] = field(default_factory=set)
    free: set[Slot] = field(default_factory=set)
    touched: set[Slot] = field(default_factory=set)  # slots the current node's rule mentioned
    node: Node | None = None

    # -- slot constructors ------------------------------------------------------------------------
    def slot(self, value: Value | None, axis: int) -> Slot | None:
        if value is None:
            return None
        axis = axis % len(value.shape) if value.shape else 0
        self.values[id(value)] = value
        return Slot(id(value), axis, value.shape[axis])

    def virtual(self, tag: str, size: int) -> Slot:
        return Slot((self.node.name if self.node else "", tag), 0, size)

    # -- statements -------------------------------------------------------------------------------
    def same(self, a: Slot | None, b: Slot | None) -> None:
        if a is None or b is None:
            return
        if a.size != b.size:
            raise ValueError(f"same() on slots of sizes {a.size} and {b.size}")
        self.touched.update((a, b))
        if a != b:
            self.same_pairs.append((a, b))

    def offset(self, whole: Slot | None, piece: Slot | None, start: int) -> None:
        if whole is None or piece is None:
            return
        if not 0 <= start <= whole.size - piece.size:
            raise ValueError(f"offset {start} of a {piece.size}-piece outside {whole.size}")
        self.touched.update((whole, piece))
        self.offsets.append((whole, piece, start))

    def regroup(self, ins: list[Slot], outs: list[Slot]) -> None:
        self.touched.update(ins + outs)
        self.regroups.append((tuple(ins), tuple(outs)))

    def block(self, *slots: Slot | None) -> None:
        slots = [s for s in slots if s is not None]
        self.touched.update(slots)
        self.blocked.update(slots)

    def generated(self, *slots: Slot | None) -> None:
        """Axes the op itself sizes from its attributes (an expand's broadcast axis): free."""
        slots = [s for s in slots if s is not None]
        self.touched.update(slots)
        self.free.update(slots)

    def block_value(self, value: Value | None) -> None:
        if value is not None:
            self.block(*(self.slot(value, a) for a in range(len(value.shape))))

    # -- common patterns --------------------------------------------------------------------------
    def same_all(self, a: Value | None, b: Value | None, skip: tuple[int, ...] = ()) -> None:
        """Relate equal-rank values axis by axis (skipping ``skip`` axes of ``a``)."""
        if a is None or b is None:
            return
        for axis in range(len(a.shape)):
            if axis not in skip and a.shape[axis] == b.shape[axis]:
                self.same(self.slot(a, axis), self.slot(b, axis))

    def broadcast(self, out: Value, operand: Value | None) -> None:
        """Relate an operand to a broadcast result, aligning axes from the right."""
        if operand is None:
            return
        shift = len(out.shape) - len(operand.shape)
        for axis, dim in enumerate(operand.shape):
            if dim == out.shape[axis + shift] and dim != 1:
                self.same(self.slot(operand, axis), self.slot(out, axis + shift))
