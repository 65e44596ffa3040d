"""Data-movement and reduction ops: reshape, permute, slice, concat, split, pad, expand, roll, take,
reductions, einsum, and the inference no-ops (identity, dropout) that the frontend keeps for the
remove-noops pass to delete."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from compiler.ops.table import REQUIRED, TypeList, numel, register_op, same_as_input

if TYPE_CHECKING:
    from compiler.ir.graph import Node


@register_op("identity", infer=same_as_input(), attrs={"origin": "identity"})
def identity(x, *, origin):
    """returns its input (clone, alias, contiguous, copy in the source model)"""
    return x


@register_op("dropout", infer=same_as_input(), attrs={"p": 0.5})
def dropout(x, *, p):
    """identity at inference"""
    return x


@register_op(
    "reshape",
    infer=lambda n: [(tuple(n.attrs["shape"]), n.inputs[0].dtype)],
    attrs={"shape": REQUIRED},
)
def reshape(x, *, shape):
    """view with a new static shape (same number of elements)"""
    return x.reshape(shape)


def _permute_infer(node: Node) -> TypeList:
    x = node.inputs[0]
    perm = node.attrs["perm"]
    if sorted(perm) != list(range(len(x.shape))):
        raise ValueError(f"perm {perm} is not a permutation of {len(x.shape)} axes")
    return [(tuple(x.shape[p] for p in perm), x.dtype)]


@register_op("permute", infer=_permute_infer, attrs={"perm": REQUIRED})
def permute(x, *, perm):
    """transpose axes"""
    return np.ascontiguousarray(np.transpose(x, perm))


def slice_len(size: int, start: int, end: int, step: int) -> int:
    return len(range(*slice(start, end, step).indices(size)))


def _slice_infer(node: Node) -> TypeList:
    x = node.inputs[0]
    a = node.attrs
    shape = list(x.shape)
    axis = a["axis"] % len(shape)
    shape[axis] = slice_len(shape[axis], a["start"], a["end"], a["step"])
    return [(tuple(shape), x.dtype)]


@register_op(
    "slice", infer=_slice_infer, attrs={"axis": REQUIRED, "start": 0, "end": REQUIRED, "step": 1}
)
def slice_(x, *, axis, start, end, step):
    """x[start:end:step] along one axis (step > 0)"""
    index = [slice(None)] * x.ndim
    index[axis] = slice(start, end, step)
    return np.ascontiguousarray(x[tuple(index)])


def _concat_infer(node: Node) -> TypeList:
    first = node.inputs[0]
    axis = node.attrs["axis"] % len(first.shape)
    shape = list(first.shape)
    for v in node.inputs[1:]:
        if len(v.shape) != len(shape) or any(
            d != e for i, (d, e) in enumerate(zip(v.shape, shape)) if i != axis
        ):
            raise ValueError(f"cannot concat {v.shape} with {tuple(shape)} on axis {axis}")
    shape[axis] = sum(v.shape[axis] for v in node.inputs)
    return [(tuple(shape), first.dtype)]


@register_op("concat", infer=_concat_infer, arity=(1, 1 << 16), attrs={"axis": REQUIRED})
def concat(*xs, axis):
    """join along an axis"""
    return np.concatenate(xs, axis=axis)


def _split_infer(node: Node) -> TypeList:
    x = node.inputs[0]
    axis = node.attrs["axis"] % len(x.shape)
    sizes = node.attrs["sizes"]
    if sum(sizes) != x.shape[axis]:
        raise ValueError(f"split sizes {sizes} do not sum to {x.shape[axis]}")
    return [(tuple(s if i == axis else d for i, d in enumerate(x.shape)), x.dtype) for s in sizes]


@register_op("split", infer=_split_infer, attrs={"axis": REQUIRED, "sizes": REQUIRED})
def split(x, *, axis, sizes):
    """cut along an axis into pieces of the given sizes (one output each)"""
    return tuple(np.ascontiguousarray(p) for p in np.split(x, np.cumsum(sizes)[:-1], axis=axis))


def _pad_infer(node: Node) -> TypeList:
    x = node.inputs[0]
    pads = node.attrs["pads"]  # per axis (before, after), outermost first; may be negative
    if len(pads) != len(x.shape):
        raise ValueError(f"pads {pads} must give (before, after) for each of {len(x.shape)} axes")
    return [(tuple(d + b + a for d, (b, a) in zip(x.shape, pads)), x.dtype)]


@register_op("pad", infer=_pad_infer, attrs={"pads": REQUIRED, "value": 0.0})
def pad(x, *, pads, value):
    """constant padding; negative pads crop"""
    crop = tuple(slice(max(-b, 0), d - max(-a, 0)) for d, (b, a) in zip(x.shape, pads))
    x = x[crop]
    return np.pad(x, [(max(b, 0), max(a, 0)) for b, a in pads], constant_values=value)


@register_op(
    "expand",
    infer=lambda n: [(tuple(n.attrs["shape"]), n.inputs[0].dtype)],
    attrs={"shape": REQUIRED},
)
def expand(x, *, shape):
    """broadcast to a larger shape"""
    return np.ascontiguousarray(np.broadcast_to(x, shape))


@register_op("roll", infer=same_as_input(), attrs={"shifts": REQUIRED, "axes": REQUIRED})
def roll(x, *, shifts, axes):
    """cyclic shift along axes"""
    return np.roll(x, shifts, axis=axes)


def _take_infer(node: Node) -> TypeList:
    x, idx = node.inputs
    axis = node.attrs["axis"] % len(x.shape)
    return [((*x.shape[:axis], *idx.shape, *x.shape[axis + 1 :]), x.dtype)]


@register_op("take", infer=_take_infer, arity=2, attrs={"axis": 0})
def take(x, indices, *, axis):
    """gather whole slices along ``axis`` by an int64 index tensor (numpy.take)"""
    return np.take(x, indices, axis=axis)


# -- reductions ----------------------------------------------------------------------------------


def _reduce_infer(node: Node) -> TypeList:
    x = node.inputs[0]
    axes = {a % len(x.shape) for a in node.attrs["axes"]}
    if node.attrs["keepdims"]:
        shape = tuple(1 if i in axes else d for i, d in enumerate(x.shape))
    else:
        shape = tuple(d for i, d in enumerate(x.shape) if i not in axes)
    return [(shape, x.dtype)]


REDUCE_ATTRS = {"axes": REQUIRED, "keepdims": False}


@register_op(
    "mean", infer=_reduce_infer, attrs=REDUCE_ATTRS, macs=lambda n: numel(n.inputs[0].shape)
)
def mean(x, *, axes, keepdims):
    """arithmetic mean over axes"""
    return x.mean(axis=tuple(axes), keepdims=keepdims).astype(x.dtype)


@register_op(
    "sum", infer=_reduce_infer, attrs=REDUCE_ATTRS, macs=lambda n: numel(n.inputs[0].shape)
)
def sum_(x, *, axes, keepdims):
    """sum over axes"""
    return x.sum(axis=tuple(axes), keepdims=keepdims).astype(x.dtype)


@register_op(
    "norm",
    infer=_reduce_infer,
    attrs={**REDUCE_ATTRS, "ord": 2.0},
    macs=lambda n: numel(n.inputs[0].shape),
)
def norm(x, *, axes, keepdims, ord):
    """vector p-norm over axes"""
    if np.isinf(ord):
        reduce = np.max if ord > 0 else np.min
        return reduce(np.abs(x), axis=tuple(axes), keepdims=keepdims).astype(x.dtype)
    if ord == 2.0:
        return np.sqrt((x * x).sum(axis=tuple(axes), keepdims=keepdims)).astype(x.dtype)
    s = (np.abs(x) ** ord).sum(axis=tuple(axes), keepdims=keepdims)
    return (s ** (1.0 / ord)).astype(x.dtype)


# -- einsum --------------------------------------------------------------------------------------


def _einsum_parse(equation: str) -> tuple[list[str], str]:
    lhs, rhs = equation.replace(" ", "").split("->")
    return lhs.split(","), rhs


def _einsum_sizes(node: Node) -> dict[str, int]:
    terms, _ = _einsum_parse(node.attrs["equation"])
    sizes: dict[str, int] = {}
    for term, value in zip(terms, node.inputs):
        if "." in term or len(term) != len(value.shape):
            raise ValueError(f"einsum term '{term}' does not match shape {value.shape}")
        for ch, d in zip(term, value.shape):
            if sizes.setdefault(ch, d) != d and d != 1:
                raise ValueError(f"einsum index '{ch}' has sizes {sizes[ch]} and {d}")
    return sizes


def _einsum_infer(node: Node) -> TypeList:
    sizes = _einsum_sizes(node)
    _, rhs = _einsum_parse(node.attrs["equation"])
    return [(tuple(sizes[ch] for ch in rhs), node.inputs[0].dtype)]


def _einsum_macs(node: Node) -> int:
    return numel(tuple(_einsum_sizes(node).values()))


@register_op(
    "einsum", infer=_einsum_infer, arity=(1, 8), attrs={"equation": REQUIRED}, macs=_einsum_macs
)
def einsum(*xs, equation):
    """Einstein summation with an explicit '->' (no ellipsis)"""
    return np.einsum(equation, *xs, optimize=True).astype(xs[0].dtype)
