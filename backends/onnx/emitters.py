"""ONNX float emitters: one small function per IR op, each adding the ONNX nodes that compute it.

Each is an entry of :data:`~backends.onnx.core.EMITTERS` (``emit(b, node, *inputs)``, see
backends/onnx/core.py); the quantization ops (``quant.py``) and shared weights (``codebook.py``)
register entries of their own. Adding an op to the backend is one entry: an ``@emitter("op")``
function, or a line in the mapping at the end of this module.

The activations also have a tensor-level form in :data:`ACTIVATIONS` so conv2d and linear emit their
fused epilogue (``act(conv(x, w) + b + residual)``) with the same code as the standalone op.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx

from backends.onnx.core import EMITTERS, Emitter, OnnxBuilder, Tensor
from compiler.errors import BackendError
from compiler.ir.graph import Node
from compiler.ops.nn import adaptive_bins
from compiler.ops.table import get_op, result_dtype

INT64_MAX = np.iinfo(np.int64).max

Activation = Callable[[OnnxBuilder, Tensor, dict], Tensor]


# -- activations: tensor-level, shared by the standalone ops and the conv/linear epilogues ---------


def _clip(b: OnnxBuilder, x: Tensor, attrs: dict) -> Tensor:
    lo, hi = attrs.get("min_val"), attrs.get("max_val")
    return b.op(
        "Clip",
        x,
        None if lo is None else b.scalar(lo, x.dtype),
        None if hi is None else b.scalar(hi, x.dtype),
    )


def _gelu(b: OnnxBuilder, x: Tensor, attrs: dict) -> Tensor:
    approximate = attrs.get("approximate", "none")
    if b.opset >= 20:
        return b.op("Gelu", x, approximate=approximate)
    half = b.op("Mul", x, b.scalar(0.5, x.dtype))
    if approximate == "tanh":  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        cube = b.op("Mul", b.op("Mul", x, x), x)
        inner = b.op("Add", x, b.op("Mul", cube, b.scalar(0.044715, x.dtype)))
        phi = b.op("Tanh", b.op("Mul", inner, b.scalar(math.sqrt(2 / math.pi), x.dtype)))
    else:  # 0.5 x (1 + erf(x / sqrt(2)))
        phi = b.op("Erf", b.op("Mul", x, b.scalar(1 / math.sqrt(2), x.dtype)))
    return b.op("Mul", half, b.op("Add", phi, b.scalar(1, x.dtype)))


def _simple(op_type: str, **fixed: Any) -> Activation:
    return lambda b, x, attrs: b.op(op_type, x, **fixed)


ACTIVATIONS: dict[str, Activation] = {
    "relu": _simple("Relu"),
    "clip": _clip,
    "hardsigmoid": _simple("HardSigmoid", alpha=1 / 6, beta=0.5),
    "hardswish": _simple("HardSwish"),
    "sigmoid": _simple("Sigmoid"),
    "silu": lambda b, x, attrs: b.op("Mul", x, b.op("Sigmoid", x)),
    "gelu": _gelu,
    "tanh": _simple("Tanh"),
}


def apply_activation(b: OnnxBuilder, node: Node, y: Tensor) -> Tensor:
    """The fused epilogue activation of a conv2d/linear node (if any) applied to ``y``."""
    name = node.attrs.get("activation")
    if name is None:
        return y
    if name not in ACTIVATIONS:
        raise BackendError(
            f"fused activation '{name}' has no ONNX emitter",
            node=node.name,
            op=node.op,
            hint=f"use one of {sorted(ACTIVATIONS)} or add it to ACTIVATIONS in "
            "backends/onnx/emitters.py",
        )
    attrs = get_op(name).complete_attrs(node.attrs.get("activation_attrs") or {}, name)
    return ACTIVATIONS[name](b, y, attrs)


def _epilogue(b: OnnxBuilder, node: Node, y: Tensor, residual: Tensor | None) -> Tensor:
    if residual is not None:
        y = b.op("Add", y, b.cast(residual, y.dtype))
    return apply_activation(b, node, y)


# -- elementwise ops -----------------------------------------------------------------------------


def _activation_op(fn: Activation) -> Emitter:
    return lambda b, node, x: fn(b, x, node.attrs)


def _unary(*op_types: str) -> Emitter:
    """Apply ONNX ops in sequence: _unary("Sqrt", "Reciprocal") is 1 / sqrt(x)."""

    def emit(b: OnnxBuilder, node: Node, x: Tensor) -> Tensor:
        for op_type in op_types:
            x = b.op(op_type, x)
        return x

    return emit


def _binary(op_type: str, *, compare: bool = False, negate: bool = False) -> Emitter:
    """Broadcasting binary op; inputs are cast to numpy's result dtype first (ONNX won't mix)."""

    def emit(b: OnnxBuilder, node: Node, x: Tensor, y: Tensor) -> Tensor:
        dtype = result_dtype(node.inputs[0].dtype, node.inputs[1].dtype)
        out = b.op(op_type, b.cast(x, dtype), b.cast(y, dtype), dtype=bool if compare else dtype)
        return b.op("Not", out) if negate else out

    return emit


def emit_cast(b: OnnxBuilder, node: Node, x: Tensor) -> Tensor:
    dtype = np.dtype(node.attrs["dtype"])
    return b.op("Cast", x, dtype=dtype, to=onnx.helper.np_dtype_to_tensor_dtype(dtype))


def emit_where(b: OnnxBuilder, node: Node, cond: Tensor, x: Tensor, y: Tensor) -> Tensor:
    dtype = np.dtype(node.outputs[0].dtype)
    return b.op("Where", b.cast(cond, bool), b.cast(x, dtype), b.cast(y, dtype), dtype=dtype)


# -- conv2d, linear, matmul, attention -----------------------------------------------------------


def emit_conv2d(b: OnnxBuilder, node: Node, x, w, bias=None, residual=None) -> Tensor:
    a, dtype = node.attrs, x.dtype
    (ph, pw) = a["padding"]
    # attributes at their ONNX defaults are left out (kernel_shape is read from the weight): each
    # costs ~20 bytes of file per conv, a few percent of a compressed model's file
    attrs = {
        "strides": list(a["stride"]),
        "pads": [ph, pw, ph, pw],
        "dilations": list(a["dilation"]),
        "group": int(a["groups"]),
    }
    defaults = {"strides": [1, 1], "pads": [0, 0, 0, 0], "dilations": [1, 1], "group": 1}
    attrs = {k: v for k, v in attrs.items() if v != defaults[k]}
    y = b.op("Conv", x, b.cast(w, dtype), None if bias is None else b.cast(bias, dtype), **attrs)
    return _epilogue(b, node, y, residual)


def emit_linear(b: OnnxBuilder, node: Node, x, w, bias=None, residual=None) -> Tensor:
    dtype = x.dtype
    w = b.cast(w, dtype)
    bias = None if bias is None else b.cast(bias, dtype)
    if len(node.inputs[0].shape) == 2:  # Gemm reads w transposed in place and fuses the bias
        y = b.op("Gemm", x, w, bias, transB=1)
    else:
        y = b.op("MatMul", x, b.transpose(w, (1, 0)))
        if bias is not None:
            y = b.op("Add", y, bias)
    return _epilogue(b, node, y, residual)


def emit_matmul(b: OnnxBuilder, node: Node, x: Tensor, y: Tensor) -> Tensor:
    return b.op("MatMul", x, b.cast(y, x.dtype))


def emit_attention(b: OnnxBuilder, node: Node, q, k, v, mask=None) -> Tensor:
    """softmax(q k^T * scale [causal] [+ mask]) v, composed (ONNX Attention needs opset 23)."""
    dtype = q.dtype
    rank = len(node.inputs[1].shape)
    scale = node.attrs["scale"]
    if scale is None:
        scale = 1 / math.sqrt(node.inputs[0].shape[-1])
    perm = [*range(rank - 2), rank - 1, rank - 2]
    logits = b.op("MatMul", q, b.cast(b.transpose(k, perm), dtype))
    logits = b.op("Mul", logits, b.scalar(scale, dtype))
    minus_inf = b.scalar(-np.inf, dtype)
    if node.attrs["causal"]:
        lq, lk = node.inputs[0].shape[-2], node.inputs[1].shape[-2]
        logits = b.op(
            "Where", b.const(np.tril(np.ones((lq, lk), bool))), logits, minus_inf, dtype=dtype
        )
    if mask is not None:
        if mask.dtype == np.bool_:
            logits = b.op("Where", mask, logits, minus_inf, dtype=dtype)
        else:
            logits = b.op("Add", logits, b.cast(mask, dtype))
    return b.op("MatMul", b.op("Softmax", logits, axis=-1), b.cast(v, dtype))


# -- pooling -------------------------------------------------------------------------------------


def _pool_pads(node: Node, dilation: Sequence[int]) -> tuple[list[int], list[int]]:
    """(begin, end) pads that give torch's output size with ONNX ``ceil_mode=0``.

    ONNX shape inference and onnxruntime disagree on ceil_mode when the last window would start in
    the padding (torch drops it; the spec keeps it), so ceil mode becomes explicit end padding.
    """
    a, x = node.attrs, node.inputs[0]
    begin, end = list(a["padding"]), []
    for i in range(2):
        span = (node.outputs[0].shape[2 + i] - 1) * a["stride"][i]
        need = span + dilation[i] * (a["kernel"][i] - 1) + 1 - (x.shape[2 + i] + 2 * begin[i])
        end.append(begin[i] + max(need, 0))
    return begin, end


def _only_padding(node: Node, axis: int) -> bool:
    """Whether some dilated window along ``axis`` sees no input element, only padding (torch
    gives -inf there, onnxruntime's MaxPool the lowest finite float)."""
    a, size = node.attrs, node.inputs[0].shape[2 + axis]
    k, s, p, d = (a[key][axis] for key in ("kernel", "stride", "padding", "dilation"))
    return any(
        all(not 0 <= o * s - p + j * d < size for j in range(k))
        for o in range(node.outputs[0].shape[2 + axis])
    )


def _pool(
    b: OnnxBuilder,
    op_type: str,
    x: Tensor,
    node: Node,
    begin,
    end,
    fill,
    *,
    explicit: bool = False,
    **attrs,
):
    """``op_type`` with pads, as a Pad node when asked or when onnxruntime refuses the pads."""
    kernel = [int(k) for k in node.attrs["kernel"]]
    if explicit or any(p >= k for p, k in zip(begin + end, kernel * 2, strict=True)):
        x = b.op("Pad", x, b.ints([0, 0, *begin, 0, 0, *end]), b.scalar(fill, x.dtype))
        begin, end = [0, 0], [0, 0]
    return b.op(
        op_type,
        x,
        kernel_shape=kernel,
        strides=list(node.attrs["stride"]),
        pads=[*begin, *end],
        **attrs,
    )


def emit_max_pool2d(b: OnnxBuilder, node: Node, x: Tensor) -> Tensor:
    dilation = list(node.attrs["dilation"])
    begin, end = _pool_pads(node, dilation)
    explicit = _only_padding(node, 0) or _only_padding(node, 1)
    return _pool(b, "MaxPool", x, node, begin, end, -np.inf, explicit=explicit, dilations=dilation)


def emit_avg_pool2d(b: OnnxBuilder, node: Node, x: Tensor) -> Tensor:
    begin, end = _pool_pads(node, (1, 1))
    overhang = [e - p for p, e in zip(begin, end, strict=True)]
    if not node.attrs["count_include_pad"]:
        return _pool(b, "AveragePool", x, node, begin, end, 0.0, count_include_pad=0)
    if not any(overhang):
        return _pool(b, "AveragePool", x, node, begin, end, 0.0, count_include_pad=1)
    # torch counts the padding but not the ceil-mode overhang: pad explicitly, count only "real"
    if any(begin):
        x = b.op("Pad", x, b.ints([0, 0, *begin, 0, 0, *begin]), b.scalar(0, x.dtype))
    return _pool(b, "AveragePool", x, node, [0, 0], overhang, 0.0, count_include_pad=0)


def _adaptive(reduce_op: str, pool_op: str) -> Emitter:
    def emit(b: OnnxBuilder, node: Node, x: Tensor) -> Tensor:
        sizes, outs = node.inputs[0].shape[2:], node.attrs["output_size"]
        if tuple(outs) == (1, 1):
            return b.op(f"Global{pool_op}", x)
        if all(s % o == 0 for s, o in zip(sizes, outs, strict=True)):
            kernel = [s // o for s, o in zip(sizes, outs, strict=True)]
            return b.op(pool_op, x, kernel_shape=kernel, strides=kernel)
        # uneven bins: rectangles are products of per-axis bins, so reduce one axis at a time
        for axis, size, out in zip((2, 3), sizes, outs, strict=True):
            if size == out:
                continue
            parts = [
                b.op(
                    reduce_op,
                    b.op("Slice", x, b.ints([lo]), b.ints([hi]), b.ints([axis])),
                    b.ints([axis]),
                    keepdims=1,
                )
                for lo, hi in adaptive_bins(size, out)
            ]
            x = b.op("Concat", *parts, axis=axis)
        return x

    return emit


# -- normalization and softmax -------------------------------------------------------------------


def emit_batch_norm(b: OnnxBuilder, node: Node, x, scale, bias, mean, var) -> Tensor:
    params = [b.cast(t, x.dtype) for t in (scale, bias, mean, var)]
    return b.op("BatchNormalization", x, *params, epsilon=float(node.attrs["eps"]))


def _normalize(b: OnnxBuilder, x: Tensor, axes: Sequence[int], eps: float) -> Tensor:
    """(x - mean) / sqrt(var + eps) over ``axes``, composed from reductions."""
    centered = b.op("Sub", x, b.op("ReduceMean", x, b.ints(axes), keepdims=1))
    var = b.op("ReduceMean", b.op("Mul", centered, centered), b.ints(axes), keepdims=1)
    std = b.op("Sqrt", b.op("Add", var, b.scalar(eps, x.dtype)))
    return b.op("Div", centered, std)


def _affine(b: OnnxBuilder, y: Tensor, scale: Tensor | None, bias: Tensor | None, shape=None):
    for t, op_type in ((scale, "Mul"), (bias, "Add")):
        if t is not None:
            t = b.cast(t, y.dtype)
            y = b.op(op_type, y, t if shape is None else b.reshape(t, shape))
    return y


def emit_layer_norm(b: OnnxBuilder, node: Node, x, scale=None, bias=None) -> Tensor:
    shape = node.inputs[0].shape
    axes = sorted(a % len(shape) for a in node.attrs["axes"])
    eps = float(node.attrs["eps"])
    trailing = bool(axes) and axes == list(range(axes[0], len(shape)))
    normalized = tuple(shape[axes[0] :]) if trailing else None
    if trailing and all(t is None or tuple(t.shape) == normalized for t in (scale, bias)):
        if scale is None:  # LayerNormalization requires a scale
            scale = b.const(np.ones(normalized, x.dtype), "ones")
        bias = None if bias is None else b.cast(bias, x.dtype)
        return b.op(
            "LayerNormalization", x, b.cast(scale, x.dtype), bias, axis=axes[0], epsilon=eps
        )
    return _affine(b, _normalize(b, x, axes, eps), scale, bias)


def emit_group_norm(b: OnnxBuilder, node: Node, x, scale=None, bias=None) -> Tensor:
    """Per-group statistics, per-channel affine (torch); composed because opset-18
    GroupNormalization scales per group: InstanceNormalization over (N, groups, -1) does the
    statistics."""
    shape, groups = node.inputs[0].shape, int(node.attrs["groups"])
    batched = b.batch.batch(node.inputs[0]) is not None  # at axis 0: 0 copies the run's batch
    grouped = b.reshape(x, (0 if batched else shape[0], groups, -1))
    ones, zeros = np.ones(groups, x.dtype), np.zeros(groups, x.dtype)
    y = b.op("InstanceNormalization", grouped, ones, zeros, epsilon=float(node.attrs["eps"]))
    y = b.reshape(y, (0, *shape[1:]) if batched else shape)
    return _affine(b, y, scale, bias, (1, shape[1], *[1] * (len(shape) - 2)))


# -- data movement and reductions ----------------------------------------------------------------


def emit_slice(b: OnnxBuilder, node: Node, x: Tensor) -> Tensor:
    a = node.attrs
    batch = b.batch.batch(node.inputs[0])
    if batch is not None and a["axis"] % len(node.inputs[0].shape) == batch[0]:
        return x  # the whole batch (backends/batch.py): its traced end would cut a larger one
    start = 0 if a["start"] is None else a["start"]
    end = INT64_MAX if a["end"] is None else max(min(a["end"], INT64_MAX), -INT64_MAX)
    return b.op(
        "Slice", x, b.ints([start]), b.ints([end]), b.ints([a["axis"]]), b.ints([a["step"]])
    )


def emit_concat(b: OnnxBuilder, node: Node, *xs: Tensor) -> Tensor:
    dtype = node.outputs[0].dtype
    xs = list(xs)
    batch = b.batch.batch(node.outputs[0])
    if batch is not None:  # an unbatched input (a class token) is repeated for every sample
        ref = next(x for x, v in zip(xs, node.inputs, strict=True) if b.batch.batch(v))
        for i, v in enumerate(node.inputs):
            if b.batch.batch(v) is None:
                ones = [np.ones(k, np.int64) for k in (batch[0], len(v.shape) - batch[0] - 1)]
                pieces = [ones[0], b.batch_size(ref, batch[0]), ones[1]]
                target = b.op("Concat", *[p for p in pieces if getattr(p, "size", 1)], axis=0)
                xs[i] = b.op("Expand", xs[i], target)
    return b.op("Concat", *[b.cast(x, dtype) for x in xs], axis=int(node.attrs["axis"]))


def emit_split(b: OnnxBuilder, node: Node, x: Tensor) -> list[Tensor]:
    sizes = node.attrs["sizes"]
    out = b.op("Split", x, b.ints(sizes), axis=int(node.attrs["axis"]), outputs=len(sizes))
    return out if len(sizes) > 1 else [out]


def emit_pad(b: OnnxBuilder, node: Node, x: Tensor) -> Tensor:
    pads = node.attrs["pads"]  # negative pads crop, in ONNX as in the reference
    flat = [p[0] for p in pads] + [p[1] for p in pads]
    return b.op("Pad", x, b.ints(flat), b.scalar(node.attrs["value"], x.dtype))


def emit_roll(b: OnnxBuilder, node: Node, x: Tensor) -> Tensor:
    """np.roll as Slice + Slice + Concat per axis (ONNX has no roll)."""
    shape = node.inputs[0].shape
    total: dict[int, int] = {}
    for shift, axis in np.broadcast(node.attrs["shifts"], node.attrs["axes"]):
        axis = int(axis) % len(shape)
        total[axis] = total.get(axis, 0) + int(shift)
    for axis, shift in total.items():
        shift %= shape[axis]
        if shift:
            tail = b.op("Slice", x, b.ints([-shift]), b.ints([INT64_MAX]), b.ints([axis]))
            head = b.op("Slice", x, b.ints([0]), b.ints([-shift]), b.ints([axis]))
            x = b.op("Concat", tail, head, axis=axis)
    return x


def emit_take(b: OnnxBuilder, node: Node, x: Tensor, indices: Tensor) -> Tensor:
    return b.op("Gather", x, b.cast(indices, np.int64), axis=int(node.attrs["axis"]))


def _reduce(op_type: str) -> Emitter:
    def emit(b: OnnxBuilder, node: Node, x: Tensor) -> Tensor:
        axes = list(node.attrs["axes"])
        # an empty axes list means "no reduction" in numpy, "reduce everything" in ONNX by default
        return b.op(
            op_type,
            x,
            b.ints(axes),
            keepdims=int(bool(node.attrs["keepdims"])),
            noop_with_empty_axes=int(not axes),
        )

    return emit


def emit_norm(b: OnnxBuilder, node: Node, x: Tensor) -> Tensor:
    order = float(node.attrs["ord"])
    if math.isinf(order):  # max |x| (inf) or min |x| (-inf)
        return _reduce("ReduceMax" if order > 0 else "ReduceMin")(b, node, b.op("Abs", x))
    if order in (1.0, 2.0):
        return _reduce("ReduceL1" if order == 1.0 else "ReduceL2")(b, node, x)
    powered = b.op("Pow", b.op("Abs", x), b.scalar(order, x.dtype))
    total = _reduce("ReduceSum")(b, node, powered)
    return b.op("Pow", total, b.scalar(1 / order, x.dtype))


def emit_einsum(b: OnnxBuilder, node: Node, *xs: Tensor) -> Tensor:
    dtype = xs[0].dtype
    return b.op("Einsum", *[b.cast(x, dtype) for x in xs], equation=node.attrs["equation"])


def emit_reshape(b: OnnxBuilder, node: Node, x: Tensor) -> Tensor:
    return b.op("Reshape", x, b.ints(b.target_shape(node.inputs[0], node.outputs[0])))


def emit_expand(b: OnnxBuilder, node: Node, x: Tensor) -> Tensor:
    shape = list(node.attrs["shape"])
    batch = b.batch.batch(node.outputs[0])
    if batch is None:
        return b.op("Expand", x, b.ints(shape))
    shape[batch[0]] = 1  # where the input has the batch, 1 broadcasts to the run's batch
    if b.batch.batch(node.inputs[0]) is not None:
        return b.op("Expand", x, b.ints(shape))
    # an unbatched value expanded to the batch (a class token): the run's batch from the input
    size = b.batch_size(b.graph.inputs[0], 0)
    return b.op("Expand", x, b.op("Concat", size, b.ints(shape[1:]), axis=0))


# -- the entries: the emitters above and those the factories make ----------------------------------

for _op, _fn in {
    **{name: _activation_op(fn) for name, fn in ACTIVATIONS.items()},
    "neg": _unary("Neg"),
    "exp": _unary("Exp"),
    "sqrt": _unary("Sqrt"),
    "rsqrt": _unary("Sqrt", "Reciprocal"),
    "abs": _unary("Abs"),
    "log": _unary("Log"),
    "identity": _unary("Identity"),
    "dropout": _unary("Identity"),  # inference
    "cast": emit_cast,
    "add": _binary("Add"),
    "sub": _binary("Sub"),
    "mul": _binary("Mul"),
    "div": _binary("Div"),
    "pow": _binary("Pow"),
    "maximum": _binary("Max"),
    "minimum": _binary("Min"),
    "eq": _binary("Equal", compare=True),
    "ne": _binary("Equal", compare=True, negate=True),
    "lt": _binary("Less", compare=True),
    "gt": _binary("Greater", compare=True),
    "where": emit_where,
    "conv2d": emit_conv2d,
    "linear": emit_linear,
    "matmul": emit_matmul,
    "attention": emit_attention,
    "max_pool2d": emit_max_pool2d,
    "avg_pool2d": emit_avg_pool2d,
    "adaptive_avg_pool2d": _adaptive("ReduceMean", "AveragePool"),
    "adaptive_max_pool2d": _adaptive("ReduceMax", "MaxPool"),
    "batch_norm": emit_batch_norm,
    "layer_norm": emit_layer_norm,
    "group_norm": emit_group_norm,
    "softmax": lambda b, node, x: b.op("Softmax", x, axis=int(node.attrs["axis"])),
    "log_softmax": lambda b, node, x: b.op("LogSoftmax", x, axis=int(node.attrs["axis"])),
    "reshape": emit_reshape,
    "expand": emit_expand,
    "permute": lambda b, node, x: b.op("Transpose", x, perm=[int(p) for p in node.attrs["perm"]]),
    "slice": emit_slice,
    "concat": emit_concat,
    "split": emit_split,
    "pad": emit_pad,
    "roll": emit_roll,
    "take": emit_take,
    "mean": _reduce("ReduceMean"),
    "sum": _reduce("ReduceSum"),
    "norm": emit_norm,
    "einsum": emit_einsum,
}.items():
    EMITTERS.add(_op, _fn)
del _op, _fn
