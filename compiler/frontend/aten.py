"""ATen -> IR converters: one small function per ATen overload, registered in ``CONVERTERS``.

A converter receives a :class:`Ctx` and the ATen call's arguments with tensors replaced by IR
Values, emits IR nodes through ``ctx.emit`` and returns the Value(s) standing for the ATen result.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from compiler.ir.graph import Graph, Value

aten = torch.ops.aten
Converter = Callable[..., Any]
CONVERTERS: dict[Any, Converter] = {}


def register_aten(*targets: Any) -> Callable[[Converter], Converter]:
    """Decorator registering a converter for one or more ATen overloads (or packets)."""

    def wrap(fn: Converter) -> Converter:
        for target in targets:
            overloads = (
                [getattr(target, o) for o in target.overloads()]
                if isinstance(target, torch._ops.OpOverloadPacket)
                else [target]
            )
            for overload in overloads:
                CONVERTERS[overload] = fn
        return fn

    return wrap


def is_value(x: Any) -> bool:
    return isinstance(x, Value)


def torch_dtype_name(dtype: torch.dtype) -> str:
    return str(torch.empty((), dtype=dtype).numpy().dtype)


class Ctx:
    """What a converter needs: the graph being built, and where the ATen call came from."""

    def __init__(self, graph: Graph, fx_node: torch.fx.Node, source: str | None) -> None:
        self.graph, self.fx_node, self.source = graph, fx_node, source

    def emit(self, op: str, inputs: list[Value | None], **attrs: Any) -> Value:
        """Add one node (named after the ATen node) and return its single output."""
        return self.emit_multi(op, inputs, **attrs)[0]

    def emit_multi(self, op: str, inputs: list[Value | None], **attrs: Any) -> list[Value]:
        meta = {"source": self.source, "aten": str(self.fx_node.target)}
        stack = self.fx_node.meta.get("stack_trace")
        if stack:
            meta["stack"] = stack.strip().splitlines()[-2:][0].strip()
        node = self.graph.add_node(op, inputs, attrs, name=self.fx_node.name, meta=meta)
        return node.outputs

    def const(self, x: Any, like: Value | None = None) -> Value:
        """A constant for a Python scalar (in ``like``'s dtype when it is a float tensor)."""
        if is_value(x):
            return x
        array = np.asarray(x)
        if like is not None and np.issubdtype(np.dtype(like.dtype), np.floating):
            array = array.astype(like.dtype)
        elif array.dtype == np.float64:
            array = array.astype(np.float32)
        return self.graph.constant(array, f"{self.fx_node.name}_const")

    @property
    def out_shape(self) -> tuple[int, ...]:
        """torch's static shape for this ATen call's (first) result."""
        val = self.fx_node.meta["val"]
        val = val[0] if isinstance(val, (list, tuple)) else val
        return tuple(int(d) for d in val.shape)


def pair(x: Any) -> tuple[int, int]:
    if isinstance(x, (list, tuple)):
        return (int(x[0]), int(x[-1])) if len(x) else (1, 1)
    return (int(x), int(x))


def norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


# -- neural network layers --------------------------------------------------------------------


@register_aten(aten.conv2d.default)
def conv2d(ctx, x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
    if isinstance(padding, str):
        if padding == "valid":
            padding = 0
        else:  # 'same' with odd effective kernels is symmetric
            k = [dilation_i * (k_i - 1) for k_i, dilation_i in zip(w.shape[2:], pair(dilation))]
            if any(v % 2 for v in k):
                raise ValueError("padding='same' with an even kernel is not supported")
            padding = [v // 2 for v in k]
    return ctx.emit(
        "conv2d",
        [x, w, b],
        stride=pair(stride),
        padding=pair(padding),
        dilation=pair(dilation),
        groups=int(groups),
    )


@register_aten(aten.linear.default)
def linear(ctx, x, w, b=None):
    return ctx.emit("linear", [x, w, b])


def _ones_zeros(ctx, x: Value, weight, bias):
    c = x.shape[1]
    if weight is None:
        weight = ctx.graph.constant(np.ones(c, x.dtype), f"{ctx.fx_node.name}_scale")
    if bias is None:
        bias = ctx.graph.constant(np.zeros(c, x.dtype), f"{ctx.fx_node.name}_bias")
    return weight, bias


@register_aten(aten._native_batch_norm_legit_no_training.default)
def native_batch_norm(ctx, x, weight, bias, mean, var, momentum, eps):
    weight, bias = _ones_zeros(ctx, x, weight, bias)
    return [ctx.emit("batch_norm", [x, weight, bias, mean, var], eps=float(eps)), None, None]


@register_aten(aten.batch_norm.default)
def batch_norm(ctx, x, weight, bias, mean, var, training, momentum, eps, cudnn=False):
    weight, bias = _ones_zeros(ctx, x, weight, bias)
    return ctx.emit("batch_norm", [x, weight, bias, mean, var], eps=float(eps))


@register_aten(aten.layer_norm.default)
def layer_norm(ctx, x, normalized_shape, weight=None, bias=None, eps=1e-5, cudnn=True):
    axes = tuple(range(-len(normalized_shape), 0))
    return ctx.emit("layer_norm", [x, weight, bias], axes=axes, eps=float(eps))


@register_aten(aten.group_norm.default)
def group_norm(ctx, x, groups, weight=None, bias=None, eps=1e-5, cudnn=True):
    return ctx.emit("group_norm", [x, weight, bias], groups=int(groups), eps=float(eps))


@register_aten(aten.max_pool2d.default)
def max_pool2d(ctx, x, kernel, stride=(), padding=0, dilation=1, ceil_mode=False):
    return ctx.emit(
        "max_pool2d",
        [x],
        kernel=pair(kernel),
        stride=pair(stride or kernel),
        padding=pair(padding),
        dilation=pair(dilation),
        ceil_mode=bool(ceil_mode),
    )


@register_aten(aten.avg_pool2d.default)
def avg_pool2d(
    ctx,
    x,
    kernel,
    stride=(),
    padding=0,
    ceil_mode=False,
    count_include_pad=True,
    divisor_override=None,
):
    if divisor_override is not None:
        raise ValueError("avg_pool2d with divisor_override is not supported")
    return ctx.emit(
        "avg_pool2d",
        [x],
        kernel=pair(kernel),
        stride=pair(stride or kernel),
        padding=pair(padding),
        ceil_mode=bool(ceil_mode),
        count_include_pad=bool(count_include_pad),
    )


@register_aten(aten.adaptive_avg_pool2d.default, aten._adaptive_avg_pool2d.default)
def adaptive_avg_pool2d(ctx, x, output_size):
    return ctx.emit("adaptive_avg_pool2d", [x], output_size=ctx.out_shape[-2:])


@register_aten(aten.adaptive_max_pool2d.default)
def adaptive_max_pool2d(ctx, x, output_size):
    return [ctx.emit("adaptive_max_pool2d", [x], output_size=ctx.out_shape[-2:]), None]


@register_aten(aten.scaled_dot_product_attention.default)
def sdpa(
    ctx, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
):
    if enable_gqa:
        raise ValueError("grouped-query attention (enable_gqa) is not supported")
    return ctx.emit(
        "attention",
        [q, k, v, attn_mask],
        scale=None if scale is None else float(scale),
        causal=bool(is_causal),
    )


@register_aten(aten.softmax.int, aten._softmax.default)
def softmax(ctx, x, dim, half_to_float=False):
    return ctx.emit("softmax", [x], axis=norm_axis(dim, len(x.shape)))


@register_aten(aten.log_softmax.int, aten._log_softmax.default)
def log_softmax(ctx, x, dim, half_to_float=False):
    return ctx.emit("log_softmax", [x], axis=norm_axis(dim, len(x.shape)))


@register_aten(aten.matmul.default, aten.bmm.default, aten.mm.default)
def matmul(ctx, a, b):
    return ctx.emit("matmul", [a, b])


@register_aten(aten.einsum.default)
def einsum(ctx, equation, operands, path=None):
    return ctx.emit("einsum", list(operands), equation=equation.replace(" ", ""))


@register_aten(aten.dropout.default, aten.feature_dropout.default)
def dropout(ctx, x, p=0.5, train=False):
    return ctx.emit("dropout", [x], p=float(p))


# -- activations and elementwise math ---------------------------------------------------------


def _unary(op: str) -> Converter:
    def convert(ctx, x, *args, **kwargs):
        return ctx.emit(op, [x])

    return convert


for _op, _targets in {
    "relu": [aten.relu],
    "sigmoid": [aten.sigmoid],
    "tanh": [aten.tanh],
    "silu": [aten.silu],
    "hardswish": [aten.hardswish],
    "hardsigmoid": [aten.hardsigmoid],
    "exp": [aten.exp],
    "sqrt": [aten.sqrt],
    "rsqrt": [aten.rsqrt],
    "neg": [aten.neg],
    "abs": [aten.abs],
    "log": [aten.log],
}.items():
    register_aten(*_targets)(_unary(_op))


@register_aten(aten.gelu.default)
def gelu(ctx, x, approximate="none"):
    return ctx.emit("gelu", [x], approximate=approximate)


@register_aten(aten.hardtanh.default)
def hardtanh(ctx, x, min_val=-1.0, max_val=1.0):
    return ctx.emit("clip", [x], min_val=float(min_val), max_val=float(max_val))


@register_aten(aten.relu6.default)
def relu6(ctx, x):
    return ctx.emit("clip", [x], min_val=0.0, max_val=6.0)


@register_aten(aten.clamp.default, aten.clamp_min.default, aten.clamp_max.default)
def clamp(ctx, x, min=None, max=None):
    if ctx.fx_node.target == aten.clamp_max.default:
        min, max = None, min
    return ctx.emit(
        "clip",
        [x],
        min_val=None if min is None else float(min),
        max_val=None if max is None else float(max),
    )


def _binary(op: str) -> Converter:
    def convert(ctx, a, b, alpha=1, rounding_mode=None):
        if rounding_mode is not None:
            raise ValueError(f"division with rounding_mode={rounding_mode!r} is not supported")
        like = a if is_value(a) else b
        a, b = ctx.const(a, like), ctx.const(b, like)
        if alpha != 1:
            b = ctx.emit("mul", [b, ctx.const(alpha, like)])
        return ctx.emit(op, [a, b])

    return convert


for _op, _targets in {
    "add": [aten.add.Tensor, aten.add.Scalar],
    "sub": [aten.sub.Tensor, aten.sub.Scalar],
    "mul": [aten.mul.Tensor, aten.mul.Scalar],
    "div": [aten.div.Tensor, aten.div.Scalar, aten.div.Tensor_mode],
    "pow": [aten.pow.Tensor_Scalar, aten.pow.Tensor_Tensor],
    "maximum": [aten.maximum.default],
    "minimum": [aten.minimum.default],
    "eq": [aten.eq.Scalar, aten.eq.Tensor],
    "ne": [aten.ne.Scalar, aten.ne.Tensor],
    "lt": [aten.lt.Scalar, aten.lt.Tensor],
    "gt": [aten.gt.Scalar, aten.gt.Tensor],
}.items():
    register_aten(*_targets)(_binary(_op))


@register_aten(aten.rsub.Scalar, aten.rsub.Tensor)
def rsub(ctx, a, b, alpha=1):
    return _binary("sub")(ctx, b, a if alpha == 1 else ctx.emit("mul", [a, ctx.const(alpha, a)]))


@register_aten(aten.masked_fill.Scalar, aten.masked_fill.Tensor)
def masked_fill(ctx, x, mask, value):
    return ctx.emit("where", [mask, ctx.const(value, x), x])


@register_aten(aten.where.self)
def where(ctx, cond, a, b):
    like = a if is_value(a) else b
    return ctx.emit("where", [cond, ctx.const(a, like), ctx.const(b, like)])


@register_aten(aten._to_copy.default, aten.to.dtype)
def to_copy(ctx, x, dtype=None, **kwargs):
    name = torch_dtype_name(dtype) if dtype is not None else x.dtype
    return ctx.emit("cast", [x], dtype=name)


# -- data movement ----------------------------------------------------------------------------


@register_aten(
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.flatten.using_ints,
    aten.unflatten.int,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.squeeze.default,
    aten.unsqueeze.default,
)
def reshape(ctx, x, *args):
    return ctx.emit("reshape", [x], shape=ctx.out_shape)


@register_aten(aten.permute.default)
def permute(ctx, x, dims):
    return ctx.emit("permute", [x], perm=tuple(norm_axis(d, len(x.shape)) for d in dims))


@register_aten(aten.transpose.int, aten.swapaxes.default)
def transpose(ctx, x, d0, d1):
    perm = list(range(len(x.shape)))
    d0, d1 = norm_axis(d0, len(perm)), norm_axis(d1, len(perm))
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return ctx.emit("permute", [x], perm=tuple(perm))


@register_aten(aten.t.default, aten.numpy_T.default)
def t(ctx, x):
    return ctx.emit("permute", [x], perm=tuple(reversed(range(len(x.shape)))))


@register_aten(
    aten.clone.default,
    aten.alias.default,
    aten.contiguous.default,
    aten.lift_fresh_copy.default,
    aten.detach.default,
)
def identity(ctx, x, *args, **kwargs):
    return ctx.emit("identity", [x], origin=ctx.fx_node.target.__name__.split(".")[0])


@register_aten(aten.copy.default)
def copy(ctx, dst, src, non_blocking=False):
    # functional copy_: the result is src broadcast to dst's shape, in dst's dtype
    if src.dtype != dst.dtype:
        src = ctx.emit("cast", [src], dtype=dst.dtype)
    if src.shape != dst.shape:
        src = ctx.emit("expand", [src], shape=dst.shape)
    return ctx.emit("identity", [src], origin="copy")


@register_aten(aten.cat.default, aten.concat.default)
def cat(ctx, tensors, dim=0):
    tensors = [t for t in tensors if not (len(t.shape) == 1 and t.shape[0] == 0)]
    return ctx.emit("concat", tensors, axis=norm_axis(dim, len(tensors[0].shape)))


def _split(ctx, x, sizes, dim):
    axis = norm_axis(dim, len(x.shape))
    return ctx.emit_multi("split", [x], axis=axis, sizes=tuple(int(s) for s in sizes))


@register_aten(aten.split_with_sizes.default)
def split_with_sizes(ctx, x, sizes, dim=0):
    return _split(ctx, x, sizes, dim)


@register_aten(aten.split.Tensor)
def split_tensor(ctx, x, size, dim=0):
    total = x.shape[norm_axis(dim, len(x.shape))]
    return _split(ctx, x, [min(size, total - i) for i in range(0, total, size)], dim)


@register_aten(aten.chunk.default)
def chunk(ctx, x, chunks, dim=0):
    total = x.shape[norm_axis(dim, len(x.shape))]
    size = -(-total // chunks)
    return _split(ctx, x, [min(size, total - i) for i in range(0, total, size)], dim)


@register_aten(aten.unbind.int)
def unbind(ctx, x, dim=0):
    axis = norm_axis(dim, len(x.shape))
    parts = _split(ctx, x, [1] * x.shape[axis], axis)
    shape = tuple(d for i, d in enumerate(x.shape) if i != axis)
    return [ctx.emit("reshape", [p], shape=shape) for p in parts]


@register_aten(aten.slice.Tensor)
def slice_(ctx, x, dim=0, start=None, end=None, step=1):
    axis = norm_axis(dim, len(x.shape))
    size = x.shape[axis]
    start, end, _ = slice(start, None if end is None or end >= sys.maxsize else end).indices(size)
    return ctx.emit("slice", [x], axis=axis, start=start, end=end, step=int(step))


@register_aten(aten.select.int)
def select(ctx, x, dim, index):
    axis = norm_axis(dim, len(x.shape))
    index = index + x.shape[axis] if index < 0 else index
    part = ctx.emit("slice", [x], axis=axis, start=index, end=index + 1, step=1)
    return ctx.emit("reshape", [part], shape=ctx.out_shape)


@register_aten(aten.expand.default, aten.expand_as.default, aten.broadcast_to.default)
def expand(ctx, x, *args):
    shape = ctx.out_shape
    if len(x.shape) < len(shape):  # numpy broadcasting needs no reshape; keep the rank explicit
        x = ctx.emit("reshape", [x], shape=(1,) * (len(shape) - len(x.shape)) + x.shape)
    return ctx.emit("expand", [x], shape=shape)


@register_aten(aten.pad.default, aten.constant_pad_nd.default)
def pad(ctx, x, pad, mode="constant", value=None):
    if mode != "constant":
        raise ValueError(f"pad mode {mode!r} is not supported (only 'constant')")
    pads = [(0, 0)] * len(x.shape)
    for i in range(len(pad) // 2):  # torch lists (before, after) from the last axis backwards
        pads[len(x.shape) - 1 - i] = (int(pad[2 * i]), int(pad[2 * i + 1]))
    return ctx.emit("pad", [x], pads=tuple(pads), value=float(value or 0.0))


@register_aten(aten.roll.default)
def roll(ctx, x, shifts, dims=()):
    if not dims:
        raise ValueError("roll without dims (flattened roll) is not supported")
    return ctx.emit(
        "roll",
        [x],
        shifts=tuple(int(s) for s in shifts),
        axes=tuple(norm_axis(d, len(x.shape)) for d in dims),
    )


@register_aten(aten.index.Tensor)
def index(ctx, x, indices):
    used = [(i, v) for i, v in enumerate(indices) if v is not None]
    if len(used) != 1:
        raise ValueError("indexing with several index tensors needs constant inputs")
    axis, idx = used[0]
    return ctx.emit("take", [x, idx], axis=axis)


# -- reductions -------------------------------------------------------------------------------


def _axes(dims, rank):
    if dims is None or (isinstance(dims, (list, tuple)) and not dims):
        return tuple(range(rank))
    dims = dims if isinstance(dims, (list, tuple)) else [dims]
    return tuple(norm_axis(d, rank) for d in dims)


@register_aten(aten.mean.dim)
def mean(ctx, x, dim, keepdim=False, dtype=None):
    return ctx.emit("mean", [x], axes=_axes(dim, len(x.shape)), keepdims=bool(keepdim))


@register_aten(aten.mean.default)
def mean_all(ctx, x, dtype=None):
    return ctx.emit("mean", [x], axes=_axes(None, len(x.shape)), keepdims=False)


@register_aten(aten.sum.dim_IntList)
def sum_(ctx, x, dim, keepdim=False, dtype=None):
    return ctx.emit("sum", [x], axes=_axes(dim, len(x.shape)), keepdims=bool(keepdim))


@register_aten(aten.linalg_vector_norm.default)
def vector_norm(ctx, x, ord=2, dim=None, keepdim=False, dtype=None):
    return ctx.emit(
        "norm", [x], axes=_axes(dim, len(x.shape)), keepdims=bool(keepdim), ord=float(ord)
    )


# -- ops whose result depends only on shapes (static here, so constants) ------------------------


@register_aten(
    aten.full_like.default,
    aten.zeros_like.default,
    aten.ones_like.default,
    aten.new_zeros.default,
    aten.new_ones.default,
    aten.new_full.default,
    aten.empty_like.default,
    aten.new_empty.default,
)
def shape_only(ctx, x, *args, **kwargs):
    fake = ctx.fx_node.meta["val"]
    target = ctx.fx_node.target
    fill = {
        aten.full_like.default: args[0] if args else kwargs.get("fill_value"),
        aten.new_full.default: args[1] if len(args) > 1 else kwargs.get("fill_value"),
        aten.ones_like.default: 1,
        aten.new_ones.default: 1,
    }.get(target, 0)
    array = np.full(tuple(fake.shape), fill, dtype=torch_dtype_name(fake.dtype))
    return ctx.graph.constant(array, ctx.fx_node.name)


@register_aten(aten.slice_scatter.default)
def slice_scatter(ctx, x, src, dim=0, start=None, end=None, step=1):
    axis = norm_axis(dim, len(x.shape))
    size = x.shape[axis]
    start, end, _ = slice(start, None if end is None or end >= sys.maxsize else end).indices(size)
    if step != 1:
        raise ValueError("slice_scatter with step != 1 needs constant inputs")
    parts = []
    if start > 0:
        parts.append(ctx.emit("slice", [x], axis=axis, start=0, end=start, step=1))
    parts.append(src)
    if end < size:
        parts.append(ctx.emit("slice", [x], axis=axis, start=end, end=size, step=1))
    return ctx.emit("concat", parts, axis=axis) if len(parts) > 1 else src
