"""The numba backend's emitter table and code generator: what every numba emitter module imports.

An emitter is ``fn(codegen, node)``: it appends the lines that compute ``node`` to the
:class:`Codegen` (one kernel call each, through :meth:`Codegen.call`). Emitters register in
:data:`EMITTERS` (``@emitter("op")``, or ``@emitter("op", when=pattern, priority=n)`` for a pattern
such as an integer conv); :func:`generate` looks each node's up. This module imports no emitter
module: ``backends.numba.backend`` imports it and all of them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

from backends.emitters import EmitterTable
from compiler.errors import BackendError, SlimgraphError
from compiler.ir.graph import Graph, Node, Value

__all__ = ["EMITTERS", "Codegen", "View", "emitter", "fmt", "generate"]

#: IR op name -> entries of ``fn(codegen, node)``, chosen per node by pattern.
EMITTERS = EmitterTable(
    "numba",
    signature="a function (codegen, node) that emits kernel calls with codegen.call(...)",
    home="backends/numba/emitters.py",
    decorator="backends.numba.core.emitter",
)
emitter = EMITTERS.register

# -- code generation -------------------------------------------------------------------------------


@dataclass
class View:
    """One intermediate array ``b[i]``: its own buffer (``root`` None) or a reshape of another."""

    shape: tuple[int, ...]
    dtype: str
    root: int | None = None
    first: int = 0  # line that writes it first
    last: int = 0  # line that reads it last
    slot: int = -1

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def fmt(arg: object) -> str:
    """Python source of a kernel argument: expressions (str) verbatim, numbers and tuples as
    literals (floats always with a point, so a kernel never compiles twice for int vs float)."""
    if isinstance(arg, str):
        return arg
    if isinstance(arg, bool) or arg is None:
        return repr(arg)
    if isinstance(arg, (int, np.integer)):
        return str(int(arg))
    if isinstance(arg, (float, np.floating)):
        return "INF" if arg == math.inf else "-INF" if arg == -math.inf else repr(float(arg))
    if isinstance(arg, tuple):
        return "(" + "".join(f"{fmt(a)}, " for a in arg).rstrip(" ") + ")"
    raise TypeError(f"cannot format {arg!r}")


@dataclass
class Codegen:
    """Builds the forward's lines; emitters call :meth:`arg`, :meth:`out`, :meth:`call`."""

    graph: Graph
    lines: list[str] = field(default_factory=list)
    weights: dict[str, np.ndarray] = field(default_factory=dict)
    views: list[View] = field(default_factory=list)
    exprs: dict[int, str] = field(default_factory=dict)
    view_of: dict[int, int] = field(default_factory=dict)
    node: Node | None = None
    temps: list[int] = field(default_factory=list)
    derived_exprs: dict[str, str] = field(default_factory=dict)
    # line -> (kernel, its arguments, the node that emitted it): what chain_convs reads
    calls: dict[int, tuple[str, tuple, Node | None]] = field(default_factory=dict)
    # each conv chain's layers: (kind, kernel arguments without nt), for its table in bind()
    chains: list[list[tuple]] = field(default_factory=list)

    # -- values ----------------------------------------------------------------------------
    def arg(self, value: Value | None, shape: tuple[int, ...] | None = None) -> str:
        """Expression reading ``value`` (reshaped to ``shape`` if given); marks it live here."""
        if value is None:
            raise BackendError("a required input is missing", node=self.node.name)
        if value.is_constant and id(value) not in self.exprs:
            self.exprs[id(value)] = self.weight(value.data, value.name)
        if id(value) in self.view_of:
            self.touch(self.view_of[id(value)])
        expr = self.exprs[id(value)]
        return expr if shape is None or tuple(shape) == value.shape else f"{expr}.reshape({shape})"

    def touch(self, index: int, line: int | None = None) -> None:
        """Keep view ``index`` alive through ``line`` (default: the line being emitted)."""
        view = self.views[index]
        root = self.views[view.root] if view.root is not None else view
        root.last = max(root.last, len(self.lines) if line is None else line)

    def out(self, value: Value, shape: tuple[int, ...] | None = None) -> str:
        """Expression of the preallocated buffer for node output ``value``."""
        if id(value) not in self.exprs:
            self.exprs[id(value)] = self.new_view(value.shape, value.dtype)
            self.view_of[id(value)] = len(self.views) - 1
        return self.arg(value, shape)

    def temp(self, shape: tuple[int, ...], dtype: str) -> str:
        """A scratch buffer that lives until the current node's last line."""
        expr = self.new_view(shape, dtype)
        self.temps.append(len(self.views) - 1)
        return expr

    def new_view(self, shape, dtype, root: int | None = None) -> str:
        line = len(self.lines)
        self.views.append(View(tuple(int(d) for d in shape), str(dtype), root, line, line))
        return f"b[{len(self.views) - 1}]"

    def alias(self, value: Value, source: Value) -> None:
        """``value`` is ``source`` reshaped: no copy, no line."""
        if id(source) in self.view_of:
            root = self.views[self.view_of[id(source)]]
            index = self.view_of[id(source)] if root.root is None else root.root
            self.exprs[id(value)] = self.new_view(value.shape, value.dtype, root=index)
            self.view_of[id(value)] = len(self.views) - 1
            self.touch(self.view_of[id(value)])
        else:
            self.exprs[id(value)] = self.arg(source, value.shape)

    def weight(self, array: np.ndarray, hint: str) -> str:
        """Store ``array`` (made C-contiguous) with the weights; returns its expression."""
        name = re.sub(r"[^\w.]", "_", hint) or "w"
        base, i = name, 1
        while name in self.weights:
            name, i = f"{base}_{i}", i + 1
        self.weights[name] = np.array(array, copy=True, order="C")
        return f'w["{name}"]'

    def derived(self, key: str, expr: str) -> str:
        """A constant the generated ``prepare(w)`` computes from ``expr`` (which may read other
        weights) once, when the model is constructed: per-layer tables such as a conv's tap
        offsets, cheap to compute and not worth bytes in weights.npz. An equal (key, expr) pair
        is computed once (layers of one geometry share their tables); a key that a different
        table or a weight already holds gets a suffix."""
        base = key = re.sub(r"[^\w.]", "_", key)
        i = 1
        while key in self.weights or self.derived_exprs.get(key, expr) != expr:
            key, i = f"{base}_{i}", i + 1
        self.derived_exprs[key] = expr
        return f'w["{key}"]'

    def none(self, ndim: int, dtype: str) -> str:
        """An empty array standing for an absent optional input (one compiled signature)."""
        key = f"_none{ndim}d_{dtype}"
        if key not in self.weights:
            self.weights[key] = np.empty((0,) * ndim, dtype)
        return f'w["{key}"]'

    # -- lines -----------------------------------------------------------------------------
    def call(self, fn: str, *args: object) -> None:
        self.calls[len(self.lines)] = (fn, args, self.node)
        self.emit(f"{fn}({', '.join(fmt(a) for a in args)})")

    def emit(self, code: str) -> None:
        self.lines.append(code)


def _signature(node: Node) -> str:
    ins = ", ".join(
        "_" if v is None else ("$" if v.is_constant else "%") + v.name for v in node.inputs
    )
    outs = ", ".join("%" + v.name for v in node.outputs)
    return f"{outs} = {node.op}({ins})"


def generate(graph: Graph) -> Codegen:
    """Emit every node; returns the code generator holding lines, weights and views."""
    gen = Codegen(graph)
    for i, value in enumerate(graph.inputs):
        gen.exprs[id(value)] = f"x{i}"
    for node in graph.nodes:
        gen.node = node
        start = len(gen.lines)
        try:
            # inside the try: a pattern that fails on an odd node reads as this node's error
            EMITTERS.lookup(node)(gen, node)
        except SlimgraphError:
            raise
        except Exception as e:
            raise BackendError(
                f"numba emitter failed: {e}", node=node.name, op=node.op, source=node.source
            ) from e
        # scratch buffers, and the node's inputs, live through all of the node's lines (an
        # emitter may read an input before emitting a preparatory line, such as packing)
        for index in gen.temps:
            gen.views[index].last = len(gen.lines) - 1
        gen.temps = []
        for value in node.inputs:
            if value is not None and id(value) in gen.view_of:
                gen.touch(gen.view_of[id(value)], len(gen.lines) - 1)
        comment = f"  # {_signature(node)}"
        if len(gen.lines) == start:
            gen.emit(f"#{comment[3:]} (a view, no copy)")
        else:
            gen.lines[start] += comment
    gen.node = None
    outputs = [gen.arg(v) + ".copy()" for v in graph.outputs]
    gen.emit(f"return [{', '.join(outputs)}]")
    return gen
