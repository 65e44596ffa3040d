"""Neural-network ops: convolution, linear and matmul, pooling, normalization, softmax, attention.

conv2d and linear carry an optional fused epilogue: ``y = act(conv(x, w) + b + residual)`` where the
activation is named by ``activation`` (an elementwise op name) with ``activation_attrs``; the fusion
passes set these, the reference and every backend honour them.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from compiler.ops.elementwise import apply_activation
from compiler.ops.table import TypeList, numel, register_op, same_as_input

if TYPE_CHECKING:
    from compiler.ir.graph import Node

EPILOGUE = {"activation": None, "activation_attrs": None}


def conv_out_size(size: int, k: int, s: int, p: int, d: int, ceil: bool = False) -> int:
    span = size + 2 * p - d * (k - 1) - 1
    out = (-(-span // s) if ceil else span // s) + 1
    if (
        ceil and (out - 1) * s >= size + p
    ):  # the last window must start inside the input (torch rule)
        out -= 1
    return out


# -- conv2d ------------------------------------------------------------------------------------


def _conv2d_infer(node: Node) -> TypeList:
    x, w = node.inputs[0], node.inputs[1]
    a = node.attrs
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    if c != cg * a["groups"]:
        raise ValueError(f"input has {c} channels, weight expects {cg} x {a['groups']} groups")
    oh = conv_out_size(h, kh, a["stride"][0], a["padding"][0], a["dilation"][0])
    ow = conv_out_size(wd, kw, a["stride"][1], a["padding"][1], a["dilation"][1])
    return [((n, o, oh, ow), x.dtype)]


def _conv2d_macs(node: Node) -> int:
    w = node.inputs[1]
    return numel(node.outputs[0].shape) * numel(w.shape[1:])


def im2col(x: np.ndarray, kh: int, kw: int, stride, padding, dilation, pad_value=0.0):
    """(N, C, H, W) -> (N, C, kh*kw, OH, OW) patches, a view-free copy."""
    n, c, h, w = x.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=pad_value)
    oh = conv_out_size(h, kh, sh, ph, dh)
    ow = conv_out_size(w, kw, sw, pw, dw)
    cols = np.empty((n, c, kh * kw, oh, ow), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i * kw + j] = xp[
                :,
                :,
                i * dh : i * dh + sh * (oh - 1) + 1 : sh,
                j * dw : j * dw + sw * (ow - 1) + 1 : sw,
            ]
    return cols


@register_op(
    "conv2d",
    infer=_conv2d_infer,
    arity=(2, 4),
    macs=_conv2d_macs,
    attrs={"stride": (1, 1), "padding": (0, 0), "dilation": (1, 1), "groups": 1, **EPILOGUE},
)
def conv2d(
    x, w, b=None, residual=None, *, stride, padding, dilation, groups, activation, activation_attrs
):
    """2-D cross-correlation (NCHW, OIHW) with bias, residual add and activation epilogue"""
    n, c, _, _ = x.shape
    o, cg, kh, kw = w.shape
    cols = im2col(x, kh, kw, stride, padding, dilation)
    oh, ow = cols.shape[-2:]
    cols = cols.reshape(n, groups, cg * kh * kw, oh * ow)
    wg = w.reshape(groups, o // groups, cg * kh * kw)
    y = np.matmul(wg[None], cols).reshape(n, o, oh, ow)
    if b is not None:
        y += b.reshape(1, o, 1, 1)
    if residual is not None:
        y = y + residual
    return apply_activation(y.astype(x.dtype), activation, activation_attrs)


# -- linear / matmul ---------------------------------------------------------------------------


def _linear_infer(node: Node) -> TypeList:
    x, w = node.inputs[0], node.inputs[1]
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"input features {x.shape[-1]} != weight in-features {w.shape[1]}")
    return [((*x.shape[:-1], w.shape[0]), x.dtype)]


@register_op(
    "linear",
    infer=_linear_infer,
    arity=(2, 4),
    macs=lambda n: numel(n.outputs[0].shape) * n.inputs[1].shape[1],
    attrs=dict(EPILOGUE),
)
def linear(x, w, b=None, residual=None, *, activation, activation_attrs):
    """x @ w.T + b (+ residual), then activation"""
    y = np.matmul(x, w.T)
    if b is not None:
        y = y + b
    if residual is not None:
        y = y + residual
    return apply_activation(y.astype(x.dtype), activation, activation_attrs)


def _matmul_infer(node: Node) -> TypeList:
    a, b = node.inputs
    sa, sb = a.shape, b.shape
    if len(sa) == 1 or len(sb) == 1:
        raise ValueError("matmul needs operands of rank >= 2")
    if sa[-1] != sb[-2]:
        raise ValueError(f"inner dimensions differ: {sa} @ {sb}")
    batch = np.broadcast_shapes(sa[:-2], sb[:-2])
    return [((*batch, sa[-2], sb[-1]), a.dtype)]


@register_op(
    "matmul",
    infer=_matmul_infer,
    arity=2,
    macs=lambda n: numel(n.outputs[0].shape) * n.inputs[0].shape[-1],
)
def matmul(a, b):
    """batched matrix product with broadcasting batch dims"""
    return np.matmul(a, b)


# -- pooling -----------------------------------------------------------------------------------


def _pool_infer(node: Node) -> TypeList:
    x = node.inputs[0]
    a = node.attrs
    k, s, p, d = a["kernel"], a["stride"], a["padding"], a.get("dilation", (1, 1))
    n, c, h, w = x.shape
    oh = conv_out_size(h, k[0], s[0], p[0], d[0], a["ceil_mode"])
    ow = conv_out_size(w, k[1], s[1], p[1], d[1], a["ceil_mode"])
    return [((n, c, oh, ow), x.dtype)]


def _pool_windows(x, kernel, stride, padding, dilation, ceil_mode, pad_value):
    """Patches (N, C, k*k, OH, OW); ceil_mode handled by extra right/bottom padding."""
    n, c, h, w = x.shape
    oh = conv_out_size(h, kernel[0], stride[0], padding[0], dilation[0], ceil_mode)
    ow = conv_out_size(w, kernel[1], stride[1], padding[1], dilation[1], ceil_mode)
    need_h = (oh - 1) * stride[0] + dilation[0] * (kernel[0] - 1) + 1 - (h + 2 * padding[0])
    need_w = (ow - 1) * stride[1] + dilation[1] * (kernel[1] - 1) + 1 - (w + 2 * padding[1])
    xp = np.pad(
        x,
        (
            (0, 0),
            (0, 0),
            (padding[0], padding[0] + max(need_h, 0)),
            (padding[1], padding[1] + max(need_w, 0)),
        ),
        constant_values=pad_value,
    )
    cols = im2col(xp, kernel[0], kernel[1], stride, (0, 0), dilation, pad_value)
    return cols[..., :oh, :ow]


POOL_ATTRS = {"kernel": (1, 1), "stride": (1, 1), "padding": (0, 0), "ceil_mode": False}


@register_op("max_pool2d", infer=_pool_infer, attrs={**POOL_ATTRS, "dilation": (1, 1)})
def max_pool2d(x, *, kernel, stride, padding, dilation, ceil_mode):
    """max over each window (padding is -inf)"""
    cols = _pool_windows(x, kernel, stride, padding, dilation, ceil_mode, -np.inf)
    return cols.max(axis=2)


@register_op(
    "avg_pool2d",
    infer=_pool_infer,
    attrs={**POOL_ATTRS, "count_include_pad": True},
    macs=lambda n: numel(n.outputs[0].shape) * n.attrs["kernel"][0] * n.attrs["kernel"][1],
)
def avg_pool2d(x, *, kernel, stride, padding, ceil_mode, count_include_pad):
    """mean over each window"""
    cols = _pool_windows(x, kernel, stride, padding, (1, 1), ceil_mode, 0.0)
    total = cols.sum(axis=2)
    ones = np.ones((1, 1) + x.shape[2:], dtype=x.dtype)
    if count_include_pad:
        # padding counts, but the extra ceil-mode overhang does not (torch semantics)
        ones = np.pad(
            ones, ((0, 0), (0, 0), (padding[0],) * 2, (padding[1],) * 2), constant_values=1
        )
        counts = _pool_windows(ones, kernel, stride, (0, 0), (1, 1), ceil_mode, 0.0).sum(axis=2)
        counts = counts[..., : total.shape[2], : total.shape[3]]
    else:
        counts = _pool_windows(ones, kernel, stride, padding, (1, 1), ceil_mode, 0.0).sum(axis=2)
    return (total / counts).astype(x.dtype)


def _adaptive_infer(node: Node) -> TypeList:
    x = node.inputs[0]
    return [((*x.shape[:2], *node.attrs["output_size"]), x.dtype)]


def adaptive_bins(size: int, out: int) -> list[tuple[int, int]]:
    """torch's adaptive pooling bins: [floor(i*size/out), ceil((i+1)*size/out))"""
    return [(i * size // out, -(-(i + 1) * size // out)) for i in range(out)]


@register_op(
    "adaptive_avg_pool2d",
    infer=_adaptive_infer,
    attrs={"output_size": (1, 1)},
    macs=lambda n: numel(n.inputs[0].shape),
)
def adaptive_avg_pool2d(x, *, output_size):
    """mean over adaptive bins"""
    oh, ow = output_size
    out = np.empty((*x.shape[:2], oh, ow), dtype=x.dtype)
    for i, (h0, h1) in enumerate(adaptive_bins(x.shape[2], oh)):
        for j, (w0, w1) in enumerate(adaptive_bins(x.shape[3], ow)):
            out[:, :, i, j] = x[:, :, h0:h1, w0:w1].mean(axis=(2, 3))
    return out


@register_op("adaptive_max_pool2d", infer=_adaptive_infer, attrs={"output_size": (1, 1)})
def adaptive_max_pool2d(x, *, output_size):
    """max over adaptive bins"""
    oh, ow = output_size
    out = np.empty((*x.shape[:2], oh, ow), dtype=x.dtype)
    for i, (h0, h1) in enumerate(adaptive_bins(x.shape[2], oh)):
        for j, (w0, w1) in enumerate(adaptive_bins(x.shape[3], ow)):
            out[:, :, i, j] = x[:, :, h0:h1, w0:w1].max(axis=(2, 3))
    return out


# -- normalization -----------------------------------------------------------------------------


@register_op(
    "batch_norm",
    infer=same_as_input(),
    arity=5,
    attrs={"eps": 1e-5},
    macs=lambda n: numel(n.outputs[0].shape),
)
def batch_norm(x, scale, bias, mean, var, *, eps):
    """inference batch norm over axis 1: (x - mean) / sqrt(var + eps) * scale + bias"""
    shape = (1, -1) + (1,) * (x.ndim - 2)
    inv = (scale / np.sqrt(var + eps)).reshape(shape)
    return ((x - mean.reshape(shape)) * inv + bias.reshape(shape)).astype(x.dtype)


@register_op(
    "layer_norm",
    infer=same_as_input(),
    arity=(1, 3),
    attrs={"axes": (-1,), "eps": 1e-5},
    macs=lambda n: 2 * numel(n.outputs[0].shape),
)
def layer_norm(x, scale=None, bias=None, *, axes, eps):
    """normalize over the trailing ``axes``, then scale and shift"""
    axes = tuple(a % x.ndim for a in axes)
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    y = (x - mean) / np.sqrt(var + eps)
    if scale is not None:
        y = y * scale
    if bias is not None:
        y = y + bias
    return y.astype(x.dtype)


@register_op(
    "group_norm",
    infer=same_as_input(),
    arity=(1, 3),
    attrs={"groups": 1, "eps": 1e-5},
    macs=lambda n: 2 * numel(n.outputs[0].shape),
)
def group_norm(x, scale=None, bias=None, *, groups, eps):
    """normalize over channel groups and spatial dims, then per-channel scale and shift"""
    n, c = x.shape[:2]
    g = x.reshape(n, groups, -1)
    mean = g.mean(axis=2, keepdims=True)
    var = ((g - mean) ** 2).mean(axis=2, keepdims=True)
    y = ((g - mean) / np.sqrt(var + eps)).reshape(x.shape)
    shape = (1, c) + (1,) * (x.ndim - 2)
    if scale is not None:
        y = y * scale.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y.astype(x.dtype)


@register_op(
    "softmax", infer=same_as_input(), attrs={"axis": -1}, macs=lambda n: numel(n.outputs[0].shape)
)
def softmax(x, *, axis):
    """exp(x - max) / sum(exp(x - max)) along ``axis``"""
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return (e / e.sum(axis=axis, keepdims=True)).astype(x.dtype)


@register_op("log_softmax", infer=same_as_input(), attrs={"axis": -1})
def log_softmax(x, *, axis):
    """log(softmax(x)) along ``axis``"""
    m = x - x.max(axis=axis, keepdims=True)
    return (m - np.log(np.exp(m).sum(axis=axis, keepdims=True))).astype(x.dtype)


# -- attention ---------------------------------------------------------------------------------


def _sdpa_infer(node: Node) -> TypeList:
    q, _, v = node.inputs[:3]
    return [((*q.shape[:-1], v.shape[-1]), q.dtype)]


def _sdpa_macs(node: Node) -> int:
    q, k, v = node.inputs[:3]
    lq, lk = q.shape[-2], k.shape[-2]
    batch = numel(q.shape[:-2])
    return batch * lq * lk * (q.shape[-1] + v.shape[-1])


@register_op(
    "attention",
    infer=_sdpa_infer,
    arity=(3, 4),
    attrs={"scale": None, "causal": False},
    macs=_sdpa_macs,
)
def attention(q, k, v, mask=None, *, scale, causal):
    """softmax(q @ k^T * scale + mask) @ v over (..., L, E) tensors (scaled dot-product
    attention)"""
    s = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = np.matmul(q, np.swapaxes(k, -1, -2)) * q.dtype.type(s)
    if causal:
        lq, lk = logits.shape[-2:]
        logits = np.where(np.tril(np.ones((lq, lk), bool)), logits, -np.inf)
    if mask is not None:
        logits = np.where(mask, logits, -np.inf) if mask.dtype == bool else logits + mask
    return np.matmul(softmax(logits.astype(q.dtype), axis=-1), v)
