"""The op table: one entry per op, the single source of truth for its arity, attributes, shape and
dtype inference, reference numpy implementation, MAC count and (for pruning) channel-coupling rule.

Ops are registered with :func:`register_op` on their reference implementation::

    @register_op("relu", infer=same_as_input(0))
    def relu(x):
        return np.maximum(x, 0)

The reference function takes the input arrays positionally (``None`` for an omitted optional input)
and the node's attributes as keyword arguments; it returns an array or a tuple of arrays. Backends
keep their own emitter tables keyed by the same names (see ``backends/``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from compiler.errors import OptionError, UnsupportedOpError

if TYPE_CHECKING:  # the graph is built on this table; the table sees nodes only as types
    from compiler.ir.graph import Node

Shape = tuple[int, ...]

REQUIRED = object()  # marks an attribute without a default
TypeList = list[tuple[Shape, str]]


@dataclass
class OpDef:
    """Everything the compiler knows about one op.

    Attributes:
        name: snake_case op name.
        ref: reference numpy implementation ``ref(*arrays, **attrs)``.
        infer: ``infer(node) -> [(shape, dtype), ...]`` for the node's outputs.
        attrs: attribute names with defaults (``REQUIRED`` for none).
        arity: (min, max) number of inputs, counting omitted optional inputs.
        macs: ``macs(node) -> int`` multiply-accumulates (0 for data movement).
        coupling: channel-coupling rule used by the pruning analysis (None: not yet described).
        foldable: whether fold-constants may evaluate the op when all its inputs are constants.
            False for ops that decode compact weights (a codebook lookup, a dequantize): folding
            them would store the dense weight again and undo the compression.
        doc: one line on what the op computes.
    """

    name: str
    ref: Callable[..., Any]
    infer: Callable[[Node], TypeList]
    attrs: dict[str, Any] = field(default_factory=dict)
    arity: tuple[int, int] = (1, 1)
    macs: Callable[[Node], int] = lambda node: 0
    coupling: Any = None
    foldable: bool = True
    doc: str = ""

    def required_attrs(self) -> list[str]:
        return [k for k, v in self.attrs.items() if v is REQUIRED]

    def complete_attrs(self, attrs: dict[str, Any], op: str) -> dict[str, Any]:
        """Fill defaults, and reject unknown or missing attributes."""
        unknown = set(attrs) - set(self.attrs)
        if unknown:
            raise OptionError(
                f"unknown attribute(s) {sorted(unknown)} for op '{op}'",
                op=op,
                hint=f"valid attributes are {sorted(self.attrs)}",
            )
        out = {k: attrs.get(k, v) for k, v in self.attrs.items()}
        missing = [k for k, v in out.items() if v is REQUIRED]
        if missing:
            raise OptionError(f"missing attribute(s) {missing} for op '{op}'", op=op)
        return out

    def run(self, arrays: list[np.ndarray | None], attrs: dict[str, Any]) -> list[np.ndarray]:
        result = self.ref(*arrays, **attrs)
        return list(result) if isinstance(result, (tuple, list)) else [result]


OPS: dict[str, OpDef] = {}


def register_op(
    name: str,
    *,
    infer: Callable[[Node], TypeList],
    attrs: dict[str, Any] | None = None,
    arity: tuple[int, int] | int = 1,
    macs: Callable[[Node], int] | None = None,
    coupling: Any = None,
    foldable: bool = True,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering ``fn`` as the reference implementation of op ``name``."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        OPS[name] = OpDef(
            name=name,
            ref=fn,
            infer=infer,
            attrs=dict(attrs or {}),
            arity=(arity, arity) if isinstance(arity, int) else arity,
            macs=macs or (lambda node: 0),
            coupling=coupling,
            foldable=foldable,
            doc=(fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else "",
        )
        return fn

    return wrap


def get_op(name: str) -> OpDef:
    try:
        return OPS[name]
    except KeyError:
        raise UnsupportedOpError(
            f"op '{name}' is not in the op table",
            op=name,
            hint="register it with compiler.ops.table.register_op (see docs/architecture.md)",
        ) from None


# -- inference helpers shared by op definitions ----------------------------------------------------


def same_as_input(index: int = 0) -> Callable[[Node], TypeList]:
    def infer(node: Node) -> TypeList:
        v = node.inputs[index]
        return [(v.shape, v.dtype)]

    return infer


def broadcast_shapes(*shapes: Shape) -> Shape:
    return tuple(np.broadcast_shapes(*shapes))


def result_dtype(*dtypes: str) -> str:
    return str(np.result_type(*[np.dtype(d) for d in dtypes]))


def numel(shape: Shape) -> int:
    return int(np.prod(shape, dtype=np.int64))
