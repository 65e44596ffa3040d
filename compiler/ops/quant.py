"""Quantization ops: ``quantize_linear`` and ``dequantize_linear``, with ONNX's semantics.

    %q = quantize_linear(%x, $scale, $zero_point) {axis=1, block_size=0, bits=8}
    %y = dequantize_linear(%q, $scale, $zero_point) {axis=1, block_size=0, bits=8}

``q = saturate(round_half_even(x / scale) + zero_point)`` and ``y = (q - zero_point) * scale``.
The scale and zero point are per tensor (scalars), per axis (1-D, one per index of ``axis``) or
per block (same rank as ``x``, ``x.shape[axis] / block_size`` along ``axis``: each group of
``block_size`` consecutive indices shares one). The quantized dtype is the zero point's (uint8
when it is absent, as in ONNX); ``bits=4`` saturates to the 4-bit range ([-8, 7] or [0, 15]) while
storing int8/uint8, which is how int4 weights are held in the IR; a dequantize with ``bits=4`` says
its input holds 4-bit values (checked for constants), so the ONNX backend stores such a constant
as packed INT4 (opset 21). int32 (biases) is dequantize-only.

dequantize_linear is not foldable: fold-constants would turn an int8 weight back into float32.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from compiler.ops.table import TypeList, register_op

if TYPE_CHECKING:
    from compiler.ir.graph import Node, Value

QUANT_DTYPES = ("uint8", "int8")
DEQUANT_DTYPES = ("uint8", "int8", "int32")
BITS = (4, 8)


def quant_range(dtype: str, bits: int = 8) -> tuple[int, int]:
    """(lowest, highest) integer of a ``bits``-wide quantized ``dtype``."""
    if np.dtype(dtype) == np.int32:
        return -(2**31), 2**31 - 1
    if bits not in BITS or str(np.dtype(dtype)) not in QUANT_DTYPES:
        raise ValueError(f"no {bits}-bit quantized type {dtype}; use uint8/int8 with bits 4 or 8")
    if np.dtype(dtype).kind == "u":
        return 0, 2**bits - 1
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def param_shape(x_shape: tuple[int, ...], p_shape: tuple[int, ...], axis: int, block: int):
    """The shape ``p`` broadcasts to against ``x`` (raises ValueError if it does not fit)."""
    rank = len(x_shape)
    if not p_shape or p_shape == (1,):
        return (1,) * rank
    if not -rank <= axis < rank:
        raise ValueError(f"axis {axis} is outside a rank-{rank} input")
    axis %= rank
    if block == 0:
        if p_shape != (x_shape[axis],):
            raise ValueError(
                f"per-axis parameters need shape ({x_shape[axis]},) along axis {axis}, "
                f"got {p_shape}"
            )
        return tuple(x_shape[axis] if d == axis else 1 for d in range(rank))
    if x_shape[axis] % block:
        raise ValueError(f"axis {axis} of size {x_shape[axis]} is not a multiple of {block}")
    want = tuple(x_shape[axis] // block if d == axis else x_shape[d] for d in range(rank))
    if p_shape != want:
        raise ValueError(f"blocked parameters need shape {want}, got {p_shape}")
    return want


def expand_param(p: np.ndarray, x_shape, axis: int, block: int) -> np.ndarray:
    """``p`` broadcastable against ``x`` (blocks repeated along ``axis``)."""
    shape = param_shape(tuple(x_shape), tuple(p.shape), axis, block)
    p = p.reshape(shape)
    if block and len(p.shape) > 0 and p.ndim == len(x_shape) and p.size > 1:
        p = np.repeat(p, block, axis=axis % len(x_shape))
    return p


def _check_params(node: Node, zero_dtypes: tuple[str, ...]) -> None:
    x, scale = node.inputs[0], node.inputs[1]
    zp = node.inputs[2] if len(node.inputs) > 2 else None
    a = node.attrs
    if np.dtype(scale.dtype).kind != "f":
        raise ValueError(f"scale must be a float tensor, got {scale.type_str()}")
    param_shape(x.shape, scale.shape, a["axis"], a["block_size"])
    if zp is not None:
        if zp.dtype not in zero_dtypes:
            raise ValueError(f"zero point must be one of {zero_dtypes}, got {zp.dtype}")
        if zp.shape != scale.shape and zp.numel != 1:
            raise ValueError(f"zero point {zp.shape} and scale {scale.shape} differ in shape")


def _zero_dtype(zp: Value | None) -> str:
    return "uint8" if zp is None else zp.dtype


def _quantize_infer(node: Node) -> TypeList:
    x = node.inputs[0]
    if np.dtype(x.dtype).kind != "f":
        raise ValueError(f"quantize_linear takes a float input, got {x.type_str()}")
    _check_params(node, QUANT_DTYPES)
    zp = node.inputs[2] if len(node.inputs) > 2 else None
    quant_range(_zero_dtype(zp), node.attrs["bits"])
    return [(x.shape, _zero_dtype(zp))]


def _dequantize_infer(node: Node) -> TypeList:
    x, scale = node.inputs[0], node.inputs[1]
    if x.dtype not in DEQUANT_DTYPES:
        raise ValueError(f"dequantize_linear takes {DEQUANT_DTYPES}, got {x.type_str()}")
    _check_params(node, (x.dtype,))
    bits = node.attrs["bits"]
    if bits != 8:
        lo, hi = quant_range(x.dtype, bits)
        if x.is_constant and x.numel and not (lo <= int(x.data.min()) and int(x.data.max()) <= hi):
            raise ValueError(f"a {bits}-bit dequantize holds values outside [{lo}, {hi}]")
    return [(x.shape, scale.dtype)]


@register_op(
    "quantize_linear",
    infer=_quantize_infer,
    arity=(2, 3),
    attrs={"axis": 1, "block_size": 0, "bits": 8},
)
def quantize_linear(x, scale, zero_point=None, *, axis, block_size, bits):
    """saturate(round_half_even(x / scale) + zero_point), per tensor, axis or block"""
    dtype = "uint8" if zero_point is None else zero_point.dtype
    lo, hi = quant_range(dtype, bits)
    s = expand_param(scale, x.shape, axis, block_size)
    q = np.rint(x / s)  # x / s in x's precision (float32), as ONNX specifies; rint ties to even
    if zero_point is not None:
        q = q + expand_param(zero_point, x.shape, axis, block_size).astype(q.dtype)
    return np.clip(q, lo, hi).astype(dtype)


@register_op(
    "dequantize_linear",
    infer=_dequantize_infer,
    arity=(2, 3),
    attrs={"axis": 1, "block_size": 0, "bits": 8},
    foldable=False,
)
def dequantize_linear(x, scale, zero_point=None, *, axis, block_size, bits):
    """(x - zero_point) * scale, per tensor, axis or block"""
    q = x.astype(np.int64)
    if zero_point is not None:
        q = q - expand_param(zero_point, x.shape, axis, block_size).astype(np.int64)
    s = expand_param(scale, x.shape, axis, block_size)
    return (q.astype(scale.dtype) * s).astype(scale.dtype)
