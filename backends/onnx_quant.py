"""ONNX emitters of the quantization ops: QuantizeLinear / DequantizeLinear (QDQ format).

Per-tensor and per-axis parameters map one to one. Blocked parameters (int4 weight groups) use
``block_size`` from opset 21; below it they are expanded: reshape to ``(..., groups, block, ...)``,
subtract the zero point and multiply by the scale, reshape back. ``bits=4`` adds a Clip to the
4-bit range after QuantizeLinear (ONNX's int8 saturates at [-128, 127]).
"""

from __future__ import annotations

import numpy as np
import onnx

from backends.onnx_emitters import OnnxBuilder, Tensor
from compiler.ir import Node
from compiler.ops.quant import quant_range


def _axis(node: Node) -> int:
    return node.attrs["axis"] % max(len(node.inputs[0].shape), 1)


def _float(b: OnnxBuilder, t: Tensor) -> Tensor:
    """``t`` as float32 by a Cast node (never by converting a constant: it must stay int8)."""
    return b.op("Cast", t, dtype=np.float32, to=onnx.TensorProto.FLOAT)


def emit_quantize_linear(b: OnnxBuilder, node: Node, x, scale, zero_point=None) -> Tensor:
    a = node.attrs
    dtype = np.dtype(node.outputs[0].dtype)
    lo, hi = quant_range(str(dtype), a["bits"])
    block, axis = a["block_size"], _axis(node)
    if block and b.opset < 21:  # composed: Round is half to even, like QuantizeLinear
        s = np.repeat(scale.values, block, axis=axis)
        q = b.op("Round", b.op("Div", b.cast(x, s.dtype), b.const(s, "scale")))
        if zero_point is not None:
            z = np.repeat(zero_point.values, block, axis=axis).astype(s.dtype)
            q = b.op("Add", q, b.const(z, "zero_point"))
        q = b.op("Clip", q, b.scalar(lo, s.dtype), b.scalar(hi, s.dtype))
        return b.op("Cast", q, dtype=dtype, to=onnx.helper.np_dtype_to_tensor_dtype(dtype))
    extra = {"block_size": block} if block else {}
    q = b.op("QuantizeLinear", b.cast(x, scale.dtype), scale, zero_point, dtype=dtype,
             axis=axis, **extra)
    if a["bits"] < 8:
        q = b.op("Clip", q, b.scalar(lo, dtype), b.scalar(hi, dtype))
    return q


def emit_dequantize_linear(b: OnnxBuilder, node: Node, x, scale, zero_point=None) -> Tensor:
    block, axis = node.attrs["block_size"], _axis(node)
    if not block or b.opset >= 21:
        extra = {"block_size": block} if block else {}
        return b.op("DequantizeLinear", x, scale, zero_point, dtype=scale.dtype, axis=axis,
                    **extra)
    shape = node.inputs[0].shape
    split = (*shape[:axis], shape[axis] // block, block, *shape[axis + 1 :])
    params = (*shape[:axis], shape[axis] // block, 1, *shape[axis + 1 :])
    q = _float(b, b.reshape(x, split))
    if zero_point is not None:
        q = b.op("Sub", q, b.const(zero_point.values.astype(np.float32).reshape(params)))
    y = b.op("Mul", b.cast(q, scale.dtype), b.const(scale.values.reshape(params), "scale"))
    return b.reshape(y, shape)


QUANT_EMITTERS = {
    "quantize_linear": emit_quantize_linear,
    "dequantize_linear": emit_dequantize_linear,
}
