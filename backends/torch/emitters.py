"""Torch float emitters: each IR op as the torch call that computes it, like the reference.

Each is an entry of :data:`~backends.torch.core.EMITTERS` (``fn(*tensors, **attrs)``); the
quantization ops (``quant.py``) and shared weights (``codebook.py``) register entries of their own.
Adding an op is one ``@emitter("name")`` function, or one line in :data:`DIRECT` for an op that maps
straight onto a torch function.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from backends.torch.core import EMITTERS, Emitter, emitter, torch_dtype
from compiler.ops.table import OPS

# -- elementwise -----------------------------------------------------------------------------------

# Ops without attributes map straight onto a torch function.
DIRECT: dict[str, Emitter] = {
    "relu": F.relu,
    "hardswish": F.hardswish,
    "hardsigmoid": F.hardsigmoid,
    "silu": F.silu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "neg": torch.neg,
    "exp": torch.exp,
    "sqrt": torch.sqrt,
    "rsqrt": torch.rsqrt,
    "abs": torch.abs,
    "log": torch.log,
    "add": torch.add,
    "sub": torch.sub,
    "mul": torch.mul,
    "div": torch.div,  # true division, like numpy
    "pow": torch.pow,
    "maximum": torch.maximum,
    "minimum": torch.minimum,
    "eq": torch.eq,
    "ne": torch.ne,
    "lt": torch.lt,
    "gt": torch.gt,
    "matmul": torch.matmul,
    "concat": lambda *xs, axis: torch.cat(xs, dim=axis),
    "einsum": lambda *xs, equation: torch.einsum(equation, *xs),
    "softmax": lambda x, *, axis: F.softmax(x, dim=axis),
    "log_softmax": lambda x, *, axis: F.log_softmax(x, dim=axis),
    "identity": lambda x, *, origin: x,
    "dropout": lambda x, *, p: x,  # stays the identity in training too: deterministic fine-tuning
    "permute": lambda x, *, perm: x.permute(*perm),
    "cast": lambda x, *, dtype: x.to(torch_dtype(dtype)),
    "where": lambda cond, a, b: torch.where(cond.bool(), a, b),
    "gelu": lambda x, *, approximate: F.gelu(x, approximate=approximate),
}
for _op, _fn in DIRECT.items():
    EMITTERS.add(_op, _fn)
del _op, _fn


@emitter("clip")
def _clip(x, *, min_val, max_val):
    if min_val is None and max_val is None:
        return x  # torch.clamp refuses two missing bounds; numpy returns x
    return torch.clamp(x, min_val, max_val)


# -- data movement ---------------------------------------------------------------------------------


# a batch other than the traced one comes with these attributes set for it (GraphModule.forward)
EMITTERS.add("reshape", lambda x, *, shape: x.reshape(shape))
EMITTERS.add("expand", lambda x, *, shape: x.expand(shape))


@emitter("slice")
def _slice(x, *, axis, start, end, step):
    index = [slice(None)] * x.dim()
    index[axis] = slice(start, end, step)
    return x[tuple(index)]


@emitter("split")
def _split(x, *, axis, sizes):
    return tuple(torch.split(x, list(sizes), dim=axis))


@emitter("pad")
def _pad(x, *, pads, value):
    # IR: (before, after) per axis, outermost first; F.pad wants them innermost first. Both crop
    # for negative amounts.
    flat = [amount for before, after in reversed(pads) for amount in (before, after)]
    return F.pad(x, flat, value=value)


@emitter("roll")
def _roll(x, *, shifts, axes):
    as_tuple = lambda v: tuple(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
    return torch.roll(x, as_tuple(shifts), as_tuple(axes))


@emitter("take")
def _take(x, indices, *, axis):
    # Advanced indexing is numpy.take for one index tensor: n-d indices, negative indices wrap.
    return x[(slice(None),) * (axis % x.dim()) + (indices.long(),)]


def _reduction(fn: Callable[..., torch.Tensor]) -> Emitter:
    def emit(x, *, axes, keepdims, **kwargs):
        if not axes:  # numpy reduces nothing over axes=(); torch would reduce everything
            return x
        return fn(x, dim=tuple(axes), keepdim=keepdims, **kwargs)

    return emit


EMITTERS.add("mean", _reduction(torch.mean))
EMITTERS.add("sum", _reduction(torch.sum))
EMITTERS.add("norm", _reduction(torch.linalg.vector_norm))


# -- neural-network ops ----------------------------------------------------------------------------


def _epilogue(y, residual, activation, activation_attrs):
    """The fused tail of conv2d and linear: ``act(y + residual)`` with the activation's emitter."""
    if residual is not None:
        y = y + residual
    if activation is None:
        return y
    # the activation op's general entry: a fused activation has no node of its own to match; its
    # attributes get the op table's defaults, as in the reference (a fused gelu or clip may carry
    # activation_attrs=None: the exact gelu, a clip without bounds)
    attrs = OPS[activation].complete_attrs(activation_attrs or {}, activation)
    return EMITTERS.general(activation)(y, **attrs)


@emitter("conv2d")
def _conv2d(
    x, w, b=None, residual=None, *, stride, padding, dilation, groups, activation, activation_attrs
):
    bias = None if b is None else b.reshape(-1)
    y = F.conv2d(x, w, bias, tuple(stride), tuple(padding), tuple(dilation), groups)
    return _epilogue(y, residual, activation, activation_attrs)


@emitter("linear")
def _linear(x, w, b=None, residual=None, *, activation, activation_attrs):
    flat_bias = b is None or b.dim() == 1
    y = F.linear(x, w, b if flat_bias else None)
    if not flat_bias:  # the IR allows any bias that broadcasts against the output
        y = y + b
    return _epilogue(y, residual, activation, activation_attrs)


@emitter("max_pool2d")
def _max_pool2d(x, *, kernel, stride, padding, dilation, ceil_mode):
    return F.max_pool2d(
        x, tuple(kernel), tuple(stride), tuple(padding), tuple(dilation), ceil_mode=ceil_mode
    )


@emitter("avg_pool2d")
def _avg_pool2d(x, *, kernel, stride, padding, ceil_mode, count_include_pad):
    return F.avg_pool2d(
        x,
        tuple(kernel),
        tuple(stride),
        tuple(padding),
        ceil_mode=ceil_mode,
        count_include_pad=count_include_pad,
    )


EMITTERS.add(
    "adaptive_avg_pool2d", lambda x, *, output_size: F.adaptive_avg_pool2d(x, tuple(output_size))
)
EMITTERS.add(
    "adaptive_max_pool2d", lambda x, *, output_size: F.adaptive_max_pool2d(x, tuple(output_size))
)


@emitter("batch_norm")
def _batch_norm(x, scale, bias, mean, var, *, eps):
    flat = [t.reshape(-1) for t in (scale, bias, mean, var)]
    return F.batch_norm(x, flat[2], flat[3], flat[0], flat[1], training=False, eps=eps)


def batch_norm_train(x, scale, bias, mean, var, *, eps):
    """Training-mode batch norm: batch statistics, and the running ones (buffers) updated in place,
    as nn.BatchNorm does; fine-tuning a pruned network without it is unstable."""
    return F.batch_norm(
        x,
        mean.view(-1),
        var.view(-1),
        scale.reshape(-1),
        bias.reshape(-1),
        training=True,
        momentum=0.1,
        eps=eps,
    )


@emitter("layer_norm")
def _layer_norm(x, scale=None, bias=None, *, axes, eps):
    axes = sorted(a % x.dim() for a in axes)
    trailing = tuple(x.shape[x.dim() - len(axes) :])
    if axes == list(range(x.dim() - len(axes), x.dim())) and all(
        t is None or tuple(t.shape) == trailing for t in (scale, bias)
    ):
        return F.layer_norm(x, trailing, scale, bias, eps)
    # Non-trailing axes, or scale/bias that only broadcast: the reference formula, spelled out.
    mean = x.mean(dim=axes, keepdim=True)
    var = (x - mean).pow(2).mean(dim=axes, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps)
    if scale is not None:
        y = y * scale
    return y if bias is None else y + bias


@emitter("group_norm")
def _group_norm(x, scale=None, bias=None, *, groups, eps):
    flat = [None if t is None else t.reshape(-1) for t in (scale, bias)]
    return F.group_norm(x, groups, flat[0], flat[1], eps)


@emitter("attention")
def _attention(q, k, v, mask=None, *, scale, causal):
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(q.dtype)  # an additive mask; SDPA wants the query's dtype
    if causal and mask is not None:  # SDPA takes one or the other, the IR applies both
        keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        mask = mask & keep if mask.dtype == torch.bool else torch.where(keep, mask, -math.inf)
        causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)
