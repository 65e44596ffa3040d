"""Torch emitters of the quantization ops (``compiler/ops/quant.py``): simulated quantization in
float, bit-exact with the reference (``torch.round`` rounds half to even, like numpy)."""

from __future__ import annotations

import torch

from backends.torch.core import emitter
from compiler.ops.quant import param_shape, quant_range


def _expand(p: torch.Tensor, x: torch.Tensor, axis: int, block: int) -> torch.Tensor:
    shape = param_shape(tuple(x.shape), tuple(p.shape), axis, block)
    p = p.reshape(shape)
    if block and p.numel() > 1:
        p = torch.repeat_interleave(p, block, dim=axis % x.dim())
    return p


@emitter("quantize_linear")
def _quantize_linear(x, scale, zero_point=None, *, axis, block_size, bits):
    dtype = torch.uint8 if zero_point is None else zero_point.dtype
    lo, hi = quant_range(str(dtype).removeprefix("torch."), bits)
    q = torch.round(x / _expand(scale.to(x.dtype), x, axis, block_size))
    if zero_point is not None:
        q = q + _expand(zero_point, x, axis, block_size).to(q.dtype)
    return q.clamp(lo, hi).to(dtype)


@emitter("dequantize_linear")
def _dequantize_linear(x, scale, zero_point=None, *, axis, block_size, bits):
    q = x.to(torch.int64)
    if zero_point is not None:
        q = q - _expand(zero_point, x, axis, block_size).to(torch.int64)
    return q.to(scale.dtype) * _expand(scale, x, axis, block_size)
