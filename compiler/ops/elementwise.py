"""Elementwise ops: activations, unary math and broadcasting binary arithmetic."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from compiler.ops.table import (
    OPS,
    TypeList,
    broadcast_shapes,
    numel,
    register_op,
    result_dtype,
    same_as_input,
)

if TYPE_CHECKING:
    from compiler.ir.graph import Node

# -- activations (each may also be fused into a conv/linear epilogue by name) ----------------------

ACTIVATIONS = ("relu", "clip", "hardswish", "hardsigmoid", "silu", "gelu", "sigmoid", "tanh")


@register_op("relu", infer=same_as_input())
def relu(x):
    """max(x, 0)"""
    return np.maximum(x, x.dtype.type(0))


@register_op("clip", infer=same_as_input(), attrs={"min_val": None, "max_val": None})
def clip(x, *, min_val, max_val):
    """clamp to [min_val, max_val], either bound may be None; relu6 is clip(0, 6)"""
    return np.clip(x, min_val, max_val).astype(x.dtype)


@register_op("hardsigmoid", infer=same_as_input())
def hardsigmoid(x):
    """clip(x / 6 + 1/2, 0, 1)"""
    return np.clip(x / x.dtype.type(6) + x.dtype.type(0.5), 0, 1).astype(x.dtype)


@register_op("hardswish", infer=same_as_input())
def hardswish(x):
    """x * hardsigmoid(x)"""
    return (x * hardsigmoid(x)).astype(x.dtype)


@register_op("sigmoid", infer=same_as_input())
def sigmoid(x):
    """1 / (1 + exp(-x)), computed without overflow"""
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(x.dtype)


@register_op("silu", infer=same_as_input())
def silu(x):
    """x * sigmoid(x)"""
    return (x * sigmoid(x)).astype(x.dtype)


_erf = np.vectorize(math.erf, otypes=[np.float64])


def erf_array(x: np.ndarray) -> np.ndarray:
    """erf on arrays; numpy has none, and scipy is not a dependency."""
    # Abramowitz-Stegun 7.1.26 is only 1e-7 accurate; use the exact math.erf on float64 instead.
    return _erf(x.astype(np.float64))


@register_op("gelu", infer=same_as_input(), attrs={"approximate": "none"})
def gelu(x, *, approximate):
    """x * Phi(x) (exact) or its tanh approximation"""
    if approximate == "tanh":
        inner = math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)
        return (0.5 * x * (1 + np.tanh(inner))).astype(x.dtype)
    return (0.5 * x * (1 + erf_array(x / math.sqrt(2)))).astype(x.dtype)


@register_op("tanh", infer=same_as_input())
def tanh(x):
    """hyperbolic tangent"""
    return np.tanh(x)


def apply_activation(y: np.ndarray, name: str | None, attrs: dict | None) -> np.ndarray:
    """Apply a fused epilogue activation (by op name) with the op table's reference."""
    if name is None:
        return y
    # fill the op's defaults: a fused gelu or clip may carry activation_attrs=None
    return OPS[name].ref(y, **OPS[name].complete_attrs(attrs or {}, name))


# -- unary math ------------------------------------------------------------------------------------


@register_op("neg", infer=same_as_input())
def neg(x):
    """-x"""
    return -x


@register_op("exp", infer=same_as_input())
def exp(x):
    """e**x"""
    return np.exp(x)


@register_op("sqrt", infer=same_as_input())
def sqrt(x):
    """square root"""
    return np.sqrt(x)


@register_op("rsqrt", infer=same_as_input())
def rsqrt(x):
    """1 / sqrt(x)"""
    return (1 / np.sqrt(x)).astype(x.dtype)


@register_op("abs", infer=same_as_input())
def abs_(x):
    """|x|"""
    return np.abs(x)


@register_op("log", infer=same_as_input())
def log(x):
    """natural logarithm"""
    return np.log(x)


@register_op(
    "cast", infer=lambda n: [(n.inputs[0].shape, n.attrs["dtype"])], attrs={"dtype": "float32"}
)
def cast(x, *, dtype):
    """convert to another dtype"""
    return x.astype(dtype)


# -- binary arithmetic with numpy broadcasting ----------------------------------------------------


def _binary_infer(node: Node) -> TypeList:
    a, b = node.inputs
    return [(broadcast_shapes(a.shape, b.shape), result_dtype(a.dtype, b.dtype))]


def _compare_infer(node: Node) -> TypeList:
    a, b = node.inputs
    return [(broadcast_shapes(a.shape, b.shape), "bool")]


def _elementwise_macs(node: Node) -> int:
    return numel(node.outputs[0].shape) if node.outputs else 0


def _binary(name: str, fn, doc: str, infer=_binary_infer, macs=None):
    def ref(a, b):
        out = fn(a, b)
        return np.asarray(out, dtype=np.result_type(a, b)) if infer is _binary_infer else out

    ref.__doc__ = doc
    register_op(name, infer=infer, arity=2, macs=macs)(ref)


_binary("add", np.add, "a + b (broadcasting)")
_binary("sub", np.subtract, "a - b (broadcasting)")
_binary("mul", np.multiply, "a * b (broadcasting)", macs=_elementwise_macs)
_binary("div", np.divide, "a / b (broadcasting, true division)")
_binary("pow", np.power, "a ** b (broadcasting)")
_binary("maximum", np.maximum, "elementwise max")
_binary("minimum", np.minimum, "elementwise min")
_binary("eq", np.equal, "a == b", infer=_compare_infer)
_binary("ne", np.not_equal, "a != b", infer=_compare_infer)
_binary("lt", np.less, "a < b", infer=_compare_infer)
_binary("gt", np.greater, "a > b", infer=_compare_infer)


@register_op(
    "where",
    infer=lambda n: [
        (
            broadcast_shapes(*(v.shape for v in n.inputs)),
            result_dtype(n.inputs[1].dtype, n.inputs[2].dtype),
        )
    ],
    arity=3,
)
def where(cond, a, b):
    """cond ? a : b (broadcasting)"""
    return np.where(cond, a, b).astype(np.result_type(a, b))


__all__ = ["ACTIVATIONS", "apply_activation", "erf_array"]
