"""The numba backend's float emitters: each turns one IR node into a kernel call line.

Kernels take canonical views (1-D for unary ops, 4-D for broadcasting and layout ops, 3-D
``(outer, axis, inner)`` for ops along one axis), so each kernel compiles once per dtype. A shape
pattern the kernels do not cover (more than 4 axes left after merging) falls back to a numpy call
on that line. These are the general entries of :data:`~backends.numba.core.EMITTERS`; the
quantized (``quant.py``) and shared-weight (``codebook.py``) patterns add entries of their own.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from backends.numba.core import Codegen, emitter
from compiler.errors import BackendError
from compiler.ir.graph import Node, Value

ACT_CODES = {
    None: "K.NONE",
    "relu": "K.RELU",
    "clip": "K.CLIP",
    "hardswish": "K.HARDSWISH",
    "hardsigmoid": "K.HARDSIGMOID",
    "silu": "K.SILU",
    "sigmoid": "K.SIGMOID",
    "tanh": "K.TANH",
    "neg": "K.NEG",
    "exp": "K.EXP",
    "sqrt": "K.SQRT",
    "rsqrt": "K.RSQRT",
    "abs": "K.ABS",
    "log": "K.LOG",
}


def act_args(name: str | None, attrs: dict | None) -> tuple[str, float, float]:
    """(code, lo, hi) of an activation or unary op, as the kernels take them."""
    attrs = attrs or {}
    if name == "gelu":
        return ("K.GELU_TANH" if attrs.get("approximate") == "tanh" else "K.GELU"), 0.0, 0.0
    if name == "clip":
        lo, hi = attrs.get("min_val"), attrs.get("max_val")
        lo = -math.inf if lo is None else float(lo)
        return "K.CLIP", lo, math.inf if hi is None else float(hi)
    if name not in ACT_CODES:
        raise BackendError(
            f"activation '{name}' has no numba kernel",
            hint="add a code to act_inplace in backends/numba/kernels/common.py",
        )
    return ACT_CODES[name], 0.0, 0.0


def numel(shape) -> int:
    return int(np.prod(shape, dtype=np.int64))


def around(shape: tuple[int, ...], axes) -> tuple[int, int, int] | None:
    """(outer, axis block, inner) sizes of ``shape`` around the consecutive ``axes``."""
    axes = sorted({a % len(shape) for a in axes}) if shape else []
    if not axes:
        return None
    if axes != list(range(axes[0], axes[-1] + 1)):
        return None
    return (
        numel(shape[: axes[0]]),
        numel(shape[axes[0] : axes[-1] + 1]),
        numel(shape[axes[-1] + 1 :]),
    )


def broadcast4(out: tuple[int, ...], *shapes: tuple[int, ...]):
    """Merge axes that broadcast alike so every operand becomes 4-D (dims equal to out's or 1);
    None when more than 4 merged axes remain."""
    rank = len(out)
    padded = [(1,) * (rank - len(s)) + tuple(s) for s in shapes]
    groups: list[list] = []
    for d in range(rank):
        if out[d] == 1:
            continue
        pattern = tuple(p[d] != 1 for p in padded)
        if groups and groups[-1][1] == pattern:
            groups[-1][0] *= out[d]
        else:
            groups.append([out[d], pattern])
    if len(groups) > 4:
        return None
    groups = [[1, (False,) * len(shapes)]] * (4 - len(groups)) + groups
    return (
        tuple(g[0] for g in groups),
        [tuple(g[0] if g[1][k] else 1 for g in groups) for k in range(len(shapes))],
    )


# -- elementwise -----------------------------------------------------------------------------------


@emitter(*ACT_CODES.keys() - {None}, "gelu")
def _unary(gen: Codegen, node: Node) -> None:
    x, y = node.inputs[0], node.outputs[0]
    code, lo, hi = act_args(node.op, node.attrs)
    gen.call("K.unary", gen.arg(x, (x.numel,)), gen.out(y, (y.numel,)), code, lo, hi)


BINARY = {
    "add": "np.add",
    "sub": "np.subtract",
    "mul": "np.multiply",
    "div": "np.true_divide",
    "pow": "np.power",
    "maximum": "np.maximum",
    "minimum": "np.minimum",
}
COMPARE = {"eq": "np.equal", "ne": "np.not_equal", "lt": "np.less", "gt": "np.greater"}


@emitter(*BINARY, *COMPARE)
def _binary(gen: Codegen, node: Node) -> None:
    kernel = "K.binary" if node.op in BINARY else "K.compare"
    code = f"K.{node.op.upper()}"
    emit_broadcast(gen, node, kernel, {**BINARY, **COMPARE}[node.op], code)


def emit_broadcast(gen: Codegen, node: Node, kernel: str, numpy_fn: str, *extra) -> None:
    y = node.outputs[0]
    canon = broadcast4(y.shape, *(v.shape for v in node.inputs))
    if canon is None:  # more than 4 merged axes: numpy broadcasts itself
        args = [gen.arg(v) for v in node.inputs]
        gen.emit(f"{numpy_fn}({', '.join(args)}, out={gen.out(y)})")
        return
    out4, ins4 = canon
    ins = [gen.arg(v, s) for v, s in zip(node.inputs, ins4, strict=True)]
    gen.call(kernel, *ins, gen.out(y, out4), *extra)


@emitter("where")
def _where(gen: Codegen, node: Node) -> None:
    emit_broadcast(gen, node, "K.where", "np.copyto")
    if gen.lines[-1].startswith("np.copyto"):
        c, a, b = (gen.arg(v) for v in node.inputs)
        gen.lines[-1] = f"np.copyto({gen.out(node.outputs[0])}, np.where({c}, {a}, {b}))"


@emitter("cast")
def _cast(gen: Codegen, node: Node) -> None:
    x, y = node.inputs[0], node.outputs[0]
    kernel = "K.cast_to_bool" if y.dtype == "bool" else "K.cast"
    gen.call(kernel, gen.arg(x, (x.numel,)), gen.out(y, (y.numel,)))


@emitter("reshape", "identity", "dropout")
def _view(gen: Codegen, node: Node) -> None:
    gen.alias(node.outputs[0], node.inputs[0])


# -- conv2d, linear, matmul, attention -------------------------------------------------------------


def bias_arg(gen: Codegen, b: Value | None, channels: int, dtype: str) -> str | None:
    """The bias as a flat (channels,) array, an empty array if absent, None if it is not one value
    per channel (then the caller adds it separately)."""
    if b is None:
        return gen.none(1, dtype)
    if b.numel != channels or b.shape and max(b.shape) != channels and channels != 1:
        return None
    return gen.arg(b, (channels,))


def epilogue_args(gen: Codegen, node: Node, channels: int, rshape: tuple[int, ...]):
    """(bias, residual, act, lo, hi) kernel arguments of a fused conv2d/linear epilogue, or None
    when the bias or residual does not have the plain shape the kernels fuse."""
    x = node.inputs[0]
    b = node.inputs[2] if len(node.inputs) > 2 else None
    r = node.inputs[3] if len(node.inputs) > 3 else None
    bias = bias_arg(gen, b, channels, x.dtype)
    if bias is None or (r is not None and r.shape != node.outputs[0].shape):
        return None
    res = gen.none(len(rshape), x.dtype) if r is None else gen.arg(r, rshape)
    return (bias, res, *act_args(node.attrs["activation"], node.attrs["activation_attrs"]))


def unfused_epilogue(gen: Codegen, node: Node, emit_core: Callable) -> None:
    """conv2d/linear whose bias or residual only broadcasts: the core op into the output, then
    bias and residual adds and the activation as separate kernels (rare; the fusion passes only
    fuse exact shapes)."""
    x, y = node.inputs[0], node.outputs[0]
    out = gen.out(y)
    emit_core(gen.none(1, x.dtype), (out, y.shape), ("K.NONE", 0.0, 0.0))
    for extra in node.inputs[2:4]:
        if extra is not None:
            out4, (a4, e4) = broadcast4(y.shape, y.shape, extra.shape)
            gen.call("K.binary", gen.arg(y, a4), gen.arg(extra, e4), gen.out(y, out4), "K.ADD")
    code, lo, hi = act_args(node.attrs["activation"], node.attrs["activation_attrs"])
    if code != "K.NONE":
        gen.call("K.unary", gen.arg(y, (y.numel,)), gen.out(y, (y.numel,)), code, lo, hi)


@emitter("conv2d")
def _conv2d(gen: Codegen, node: Node) -> None:
    packed = None
    if uses_f32_conv(node):
        from backends.numba.kernels.f32 import pack_weight

        w = node.inputs[1]
        packed = gen.weight(pack_weight(w.data, node.attrs["groups"]), f"{w.name}_packed")
    emit_conv2d(gen, node, packed)


def emit_conv2d(gen: Codegen, node: Node, packed: str | None) -> None:
    """A conv2d's kernel call (and its unfused epilogue, if any): ``packed`` is the expression of
    the weight packed for the micro-kernel (at compile time here, at load by the shared-weight
    entry in codebook.py), None for the kernels that read the weight as it is."""
    x, w, y = node.inputs[0], node.inputs[1], node.outputs[0]
    a = node.attrs
    (sh, sw), (ph, pw), (dh, dw), groups = a["stride"], a["padding"], a["dilation"], a["groups"]
    o, _, kh, kw = w.shape
    depthwise = is_depthwise(node)
    b = node.inputs[2] if len(node.inputs) > 2 else None
    planned = packed is not None and (b is None or b.is_constant)

    def core(bias, res, act):
        # read x on the kernel's own line, after any packing lines above: its buffer must stay
        # alive through this line (the output and the padded input are born here)
        xa = gen.arg(x)
        out = gen.out(y)
        geom = (sh, sw, ph, pw, dh, dw)
        if depthwise:
            gen.call("KC.conv2d_depthwise", xa, gen.arg(w), bias, res, out, *geom, *act, "nt")
        elif planned:
            gen.call(
                "KC.conv2d_planned",
                xa,
                *conv_plan(gen, node, packed, bias),
                res,
                out,
                kh,
                kw,
                *geom,
                groups,
                *act,
                "nt",
            )
        elif packed is not None:
            args = (xa, packed, bias, res, out, kh, kw, *geom, groups, *act, "nt")
            gen.call("KC.conv2d_packed", *args)
        else:
            gen.call("KC.conv2d", xa, gen.arg(w), bias, res, out, *geom, groups, *act, "nt")

    fused = epilogue_args(gen, node, o, y.shape)
    if fused is None:
        unfused_epilogue(gen, node, lambda bias, out, act: core(bias, gen.none(4, x.dtype), act))
    else:
        core(fused[0], fused[1], fused[2:])


def conv_plan(gen: Codegen, node: Node, packed: str, bias: str) -> tuple[str, ...]:
    """(padded-input buffer, packed weight, bias, bases, offs) arguments of KC.conv2d_planned:
    the padded input is an arena buffer, reused by liveness like any other; the bias padded to
    16 lanes and the geometry tables are computed once, when the model is constructed
    (``prepare``), the tables once per distinct geometry."""
    from backends.numba.kernels.f32 import conv_geometry

    x, w = node.inputs[0], node.inputs[1]
    a = node.attrs
    o, _, kh, kw = w.shape
    base_args, offs_args, padded = conv_geometry(
        x.shape, o, kh, kw, a["stride"], a["padding"], a["dilation"], a["groups"]
    )
    xp = gen.temp((padded,), "float32") if padded else gen.none(1, "float32")
    bases = "x".join(map(str, base_args))
    offs = "x".join(map(str, offs_args))
    return (
        xp,
        packed,
        gen.derived(f"_bias16.{node.name}", f"KC.pack_bias({bias}, {o}, {a['groups']})"),
        gen.derived(f"_bases.{bases}", f"KC.pixel_bases{base_args}"),
        gen.derived(f"_offs.{offs}", f"KC.tap_offsets{offs_args}"),
    )


def uses_f32_conv(node: Node) -> bool:
    """Whether a conv2d runs on the implicit-GEMM micro-kernel (backends/numba/kernels/f32.py):
    float32 with constant weights (packed at compile time), depthwise excepted. The rule stands on
    measurements (docs/backends.md, 1 thread, medians of 50): against im2col + BLAS (KC.conv2d) the
    kernel was 3.7-4.0x faster on ResNet-56's 3x3 layers, 1.6-2.1x on resnet18's, 1.7-2.1x on 1x1
    layers, 2.2x even with 4 channels per group (groups 32, 3/4 of its 16 lanes padding) and
    10-18x on tiny layers, where KC.conv2d's BLAS call and parallel region cost ~45 us: no shape
    measured was slower. Depthwise (one input channel per group, any dtype) runs on
    KC.conv2d_depthwise instead, whose plane kernels vectorise along the output pixels: 6-9x
    faster than this kernel on MobileNetV2's depthwise layers (144 channels 56x56: 167 against
    1521 us; 96 channels 112x112 at stride 2: 240 against 1460 us), where 15 of its 16 lanes
    would be padding."""
    x, w, y = node.inputs[0], node.inputs[1], node.outputs[0]
    f32 = x.dtype == w.dtype == y.dtype == "float32"
    return w.is_constant and f32 and not is_depthwise(node)


def is_depthwise(node: Node) -> bool:
    """A conv2d with one input channel per group, a group per input channel."""
    groups, channels, cg = node.attrs["groups"], node.inputs[0].shape[1], node.inputs[1].shape[1]
    return groups == channels and cg == 1 and groups > 1


@emitter("linear")
def _linear(gen: Codegen, node: Node) -> None:
    x, w, y = node.inputs[0], node.inputs[1], node.outputs[0]
    m, k, o = numel(x.shape[:-1]), x.shape[-1], w.shape[0]
    b = node.inputs[2] if len(node.inputs) > 2 else None
    # a constant float32 weight (and bias) is packed at compile time for the conv's micro-kernel
    # (KC.linear_packed); any other runs KC.linear, which packs a float32 weight per call
    packed = None
    if (
        w.is_constant
        and x.dtype == w.dtype == y.dtype == "float32"
        and (b is None or b.is_constant)
    ):
        from backends.numba.kernels.f32 import pack_weight

        packed = gen.weight(pack_weight(w.data.reshape(o, k, 1, 1), 1), f"{w.name}_packed")

    def core(bias, res, act):
        xa = gen.arg(x, (m, k))
        if packed is not None:
            bias16 = gen.derived(f"_bias16.{node.name}", f"KC.pack_bias({bias}, {o}, 1)")
            gen.call("KC.linear_packed", xa, packed, bias16, res, gen.out(y, (m, o)), *act, "nt")
        else:
            gen.call("KC.linear", xa, gen.arg(w), bias, res, gen.out(y, (m, o)), *act, "nt")

    fused = epilogue_args(gen, node, o, (m, o))
    if fused is None:
        unfused_epilogue(gen, node, lambda bias, out, act: core(bias, gen.none(2, x.dtype), act))
    else:
        core(fused[0], fused[1], fused[2:])


def batched(gen: Codegen, value: Value, batch: tuple[int, ...], tail: tuple[int, int]) -> str:
    """``value`` as a (1 or B, *tail) view for batch dims ``batch``, expanding it into a scratch
    buffer when it broadcasts over only some of them."""
    own = value.shape[:-2]
    nb = numel(batch)
    if numel(own) == 1:
        return gen.arg(value, (1, *tail))
    if (1,) * (len(batch) - len(own)) + tuple(own) == tuple(batch):
        return gen.arg(value, (nb, *tail))
    full = (*batch, *tail)
    out4, (in4,) = broadcast4(full, value.shape)
    tmp = gen.temp(full, value.dtype)
    gen.call("K.expand", gen.arg(value, in4), f"{tmp}.reshape({out4})")
    return f"{tmp}.reshape({(nb, *tail)})"


@emitter("matmul")
def _matmul(gen: Codegen, node: Node) -> None:
    a, b, y = node.inputs[0], node.inputs[1], node.outputs[0]
    batch = y.shape[:-2]
    (m, k), n = a.shape[-2:], b.shape[-1]
    aa = batched(gen, a, batch, (m, k))
    ba = batched(gen, b, batch, (k, n))
    gen.call("KC.matmul", aa, ba, gen.out(y, (numel(batch), m, n)), "nt")


@emitter("attention")
def _attention(gen: Codegen, node: Node) -> None:
    q, k, v = node.inputs[:3]
    mask = node.inputs[3] if len(node.inputs) > 3 else None
    y = node.outputs[0]
    batch, (lq, e), lk, ev = q.shape[:-2], q.shape[-2:], k.shape[-2], v.shape[-1]
    nb = numel(batch)
    args = [batched(gen, t, batch, t.shape[-2:]) for t in (q, k, v)]
    scale = node.attrs["scale"]
    scale = 1 / math.sqrt(e) if scale is None else scale
    gen.call(
        "KC.attention",
        *args,
        mask_arg(gen, mask, batch, lq, lk, q.dtype),
        gen.out(y, (nb, lq, ev)),
        float(scale),
        bool(node.attrs["causal"]),
        "nt",
    )


def mask_arg(gen: Codegen, mask: Value | None, batch, lq: int, lk: int, dtype: str) -> str:
    """An additive (1 or B, Lq, Lk) mask: computed now for a constant, by numpy for an input."""
    if mask is None:
        return gen.none(3, dtype)
    nb = numel(batch)
    if mask.is_constant:
        data = mask.data
        add = np.where(data, 0.0, -np.inf) if data.dtype == bool else data
        add = np.broadcast_to(add, (*batch, lq, lk)).astype(dtype)
        flat = add.reshape(nb, lq, lk)
        return gen.weight(flat[:1] if (flat == flat[:1]).all() else flat, f"{mask.name}_additive")
    m = gen.arg(mask)
    if mask.dtype == "bool":
        m = f"np.where({m}, 0.0, -INF)"
    return (
        f"np.ascontiguousarray(np.broadcast_to({m}, {(*batch, lq, lk)}), "
        f"dtype={dtype!r}).reshape({(nb, lq, lk)})"
    )


@emitter("einsum")
def _einsum(gen: Codegen, node: Node) -> None:
    # numpy's einsum (outside njit) picks a contraction order and calls BLAS itself
    args = ", ".join(gen.arg(v) for v in node.inputs)
    eq = node.attrs["equation"]
    gen.emit(f"np.copyto({gen.out(node.outputs[0])}, np.einsum({eq!r}, {args}, optimize=True))")


# -- pooling and normalization --------------------------------------------------------------------


@emitter("max_pool2d")
def _max_pool(gen: Codegen, node: Node) -> None:
    a = node.attrs
    gen.call(
        "KC.max_pool2d",
        gen.arg(node.inputs[0]),
        gen.out(node.outputs[0]),
        *a["kernel"],
        *a["stride"],
        *a["padding"],
        *a["dilation"],
    )


@emitter("avg_pool2d")
def _avg_pool(gen: Codegen, node: Node) -> None:
    a = node.attrs
    gen.call(
        "KC.avg_pool2d",
        gen.arg(node.inputs[0]),
        gen.out(node.outputs[0]),
        *a["kernel"],
        *a["stride"],
        *a["padding"],
        bool(a["count_include_pad"]),
    )


@emitter("adaptive_avg_pool2d", "adaptive_max_pool2d")
def _adaptive_pool(gen: Codegen, node: Node) -> None:
    is_max = node.op == "adaptive_max_pool2d"
    gen.call("KC.adaptive_pool2d", gen.arg(node.inputs[0]), gen.out(node.outputs[0]), is_max)


@emitter("batch_norm")
def _batch_norm(gen: Codegen, node: Node) -> None:
    x, y = node.inputs[0], node.outputs[0]
    n, c = x.shape[0], x.shape[1]
    shape3 = (n, c, numel(x.shape[2:]))
    params = [gen.arg(v, (c,)) for v in node.inputs[1:]]
    gen.call(
        "K.batch_norm", gen.arg(x, shape3), *params, float(node.attrs["eps"]), gen.out(y, shape3)
    )


def trailing_param(value: Value | None, norm_shape: tuple[int, ...]) -> bool:
    """Whether a layer_norm scale/bias is one value per element of the normalised trailing dims."""
    if value is None:
        return True
    k = len(norm_shape)
    padded = (1,) * max(0, k - len(value.shape)) + tuple(value.shape)
    return all(d == 1 for d in padded[:-k]) and tuple(padded[-k:]) == tuple(norm_shape)


@emitter("layer_norm")
def _layer_norm(gen: Codegen, node: Node) -> None:
    x, y = node.inputs[0], node.outputs[0]
    scale, bias = (node.inputs[i] if len(node.inputs) > i else None for i in (1, 2))
    eps = float(node.attrs["eps"])
    split = around(x.shape, node.attrs["axes"])
    if split is None:
        raise BackendError(
            "layer_norm over non-consecutive axes has no numba kernel",
            node=node.name,
            op=node.op,
            hint="permute the axes together first",
        )
    outer, d, inner = split
    norm_shape = x.shape[len(x.shape) - len(set(a % len(x.shape) for a in node.attrs["axes"])) :]
    if inner == 1 and trailing_param(scale, norm_shape) and trailing_param(bias, norm_shape):
        s, b = (gen.none(1, x.dtype) if v is None else gen.arg(v, (d,)) for v in (scale, bias))
        gen.call("K.layer_norm", gen.arg(x, (outer, d)), s, b, eps, gen.out(y, (outer, d)))
        return
    gen.call("K.normalize_axis", gen.arg(x, split), eps, gen.out(y, split))
    for param, code in ((scale, "K.MUL"), (bias, "K.ADD")):
        if param is not None:
            out4, (a4, p4) = broadcast4(y.shape, y.shape, param.shape)
            gen.call("K.binary", gen.arg(y, a4), gen.arg(param, p4), gen.out(y, out4), code)


@emitter("group_norm")
def _group_norm(gen: Codegen, node: Node) -> None:
    x, y = node.inputs[0], node.outputs[0]
    n, c, g = x.shape[0], x.shape[1], node.attrs["groups"]
    shape4 = (n, g, c // g, numel(x.shape[2:]))
    params = []
    for i, fill in ((1, 1.0), (2, 0.0)):
        v = node.inputs[i] if len(node.inputs) > i else None
        name = f"{node.name}_{'scale' if i == 1 else 'shift'}"
        params.append(
            gen.weight(np.full(c, fill, x.dtype), name) if v is None else gen.arg(v, (c,))
        )
    gen.call(
        "K.group_norm", gen.arg(x, shape4), *params, float(node.attrs["eps"]), gen.out(y, shape4)
    )


@emitter("softmax", "log_softmax")
def _softmax(gen: Codegen, node: Node) -> None:
    x, y = node.inputs[0], node.outputs[0]
    split = around(x.shape, [node.attrs["axis"]])
    gen.call("K.softmax", gen.arg(x, split), gen.out(y, split), node.op == "log_softmax")


# -- reductions ------------------------------------------------------------------------------------

REDUCE_KINDS = {"sum": "K.SUM", "mean": "K.MEAN"}


@emitter("sum", "mean", "norm")
def _reduce(gen: Codegen, node: Node) -> None:
    x, y = node.inputs[0], node.outputs[0]
    axes = sorted({a % len(x.shape) for a in node.attrs["axes"]})
    kind, p = reduce_kind(node)
    if not axes:
        if node.op == "norm":
            gen.call("K.unary", gen.arg(x, (x.numel,)), gen.out(y, (y.numel,)), "K.ABS", 0.0, 0.0)
        else:
            gen.alias(y, x)
        return
    split = around(x.shape, axes)
    if split is not None:
        src = gen.arg(x, split)
    else:  # move the reduced axes last, then reduce them as one block
        keep = [d for d in range(len(x.shape)) if d not in axes]
        moved = tuple(x.shape[d] for d in keep + axes)
        split = (numel(moved[: len(keep)]), numel(moved[len(keep) :]), 1)
        tmp = gen.temp(moved, x.dtype)
        emit_permute(gen, x, tuple(keep + axes), tmp, moved)
        src = f"{tmp}.reshape({split})"
    gen.call("K.reduce", src, gen.out(y, (split[0], split[2])), kind, p)


def reduce_kind(node: Node) -> tuple[str, float]:
    if node.op != "norm":
        return REDUCE_KINDS[node.op], 0.0
    order = float(node.attrs["ord"])
    if order == 2.0:
        return "K.NORM2", 2.0
    if math.isinf(order):
        return ("K.NORM_MAX" if order > 0 else "K.NORM_MIN"), order
    return "K.NORM_P", order


# -- data movement ---------------------------------------------------------------------------------


def merge_permutation(shape: tuple[int, ...], perm: tuple[int, ...]):
    """(input sizes, permutation) with size-1 axes dropped and axes that stay adjacent merged."""
    keep = [d for d in range(len(shape)) if shape[d] != 1]
    rank = {d: i for i, d in enumerate(keep)}
    order = [rank[d] for d in perm if shape[d] != 1]
    runs: list[list[int]] = []
    for d in order:
        if runs and d == runs[-1][-1] + 1:
            runs[-1].append(d)
        else:
            runs.append([d])
    by_input = sorted(range(len(runs)), key=lambda i: runs[i][0])
    sizes = tuple(numel([shape[keep[d]] for d in runs[i]]) for i in by_input)
    position = {run: j for j, run in enumerate(by_input)}
    return sizes, tuple(position[i] for i in range(len(runs)))


def emit_permute(gen: Codegen, x: Value, perm, out: str, out_shape: tuple[int, ...]) -> None:
    sizes, merged = merge_permutation(x.shape, tuple(perm))
    if len(sizes) > 4:
        gen.emit(f"np.copyto({out}, np.transpose({gen.arg(x)}, {tuple(perm)}))")
        return
    lead = 4 - len(sizes)
    perm4 = tuple(range(lead)) + tuple(p + lead for p in merged)
    x4 = (1,) * lead + sizes
    out4 = tuple(x4[p] for p in perm4)
    gen.call("K.permute", gen.arg(x, x4), f"{out}.reshape({out4})", perm4)


@emitter("permute")
def _permute(gen: Codegen, node: Node) -> None:
    y = node.outputs[0]
    emit_permute(gen, node.inputs[0], node.attrs["perm"], gen.out(y), y.shape)


@emitter("slice")
def _slice(gen: Codegen, node: Node) -> None:
    x, y = node.inputs[0], node.outputs[0]
    a = node.attrs
    axis = a["axis"] % len(x.shape)
    start = range(*slice(a["start"], a["end"], a["step"]).indices(x.shape[axis])).start
    gen.call(
        "K.slice_axis",
        gen.arg(x, around(x.shape, [axis])),
        gen.out(y, around(y.shape, [axis])),
        start,
        a["step"],
    )


@emitter("split")
def _split(gen: Codegen, node: Node) -> None:
    x = node.inputs[0]
    axis = node.attrs["axis"] % len(x.shape)
    offset = 0
    for y in node.outputs:
        gen.call(
            "K.slice_axis",
            gen.arg(x, around(x.shape, [axis])),
            gen.out(y, around(y.shape, [axis])),
            offset,
            1,
        )
        offset += y.shape[axis]


@emitter("concat")
def _concat(gen: Codegen, node: Node) -> None:
    y = node.outputs[0]
    axis = node.attrs["axis"] % len(y.shape)
    offset = 0
    for x in node.inputs:
        gen.call(
            "K.place_axis",
            gen.arg(x, around(x.shape, [axis])),
            gen.out(y, around(y.shape, [axis])),
            offset,
        )
        offset += x.shape[axis]


def merge_untouched(shape, per_axis, untouched):
    """Merge adjacent axes for which ``untouched(per_axis[d])``; pad to 4 axes in front.
    Returns (shape4, per_axis4) or None when more than 4 axes remain."""
    dims: list[list] = []
    for size, item in zip(shape, per_axis):
        if dims and untouched(item) and untouched(dims[-1][1]):
            dims[-1][0] *= size
        else:
            dims.append([size, item])
    if len(dims) > 4:
        return None
    lead = 4 - len(dims)
    return (1,) * lead + tuple(d[0] for d in dims), [None] * lead + [d[1] for d in dims]


@emitter("pad")
def _pad(gen: Codegen, node: Node) -> None:
    x, y = node.inputs[0], node.outputs[0]
    pads = [tuple(p) for p in node.attrs["pads"]]
    value = float(node.attrs["value"])
    merged = merge_untouched(x.shape, pads, lambda p: p == (0, 0))
    if merged is None:
        raise BackendError("pad of more than 4 padded axes has no numba kernel", node=node.name)
    x4, pads4 = merged
    pads4 = [p or (0, 0) for p in pads4]
    y4 = tuple(s + b + a for s, (b, a) in zip(x4, pads4))
    gen.call("K.pad", gen.arg(x, x4), gen.out(y, y4), tuple(b for b, _ in pads4), value)


@emitter("expand")
def _expand(gen: Codegen, node: Node) -> None:
    x, y = node.inputs[0], node.outputs[0]
    canon = broadcast4(y.shape, x.shape)
    if canon is None:
        gen.emit(f"np.copyto({gen.out(y)}, {gen.arg(x)})")
        return
    out4, (in4,) = canon
    gen.call("K.expand", gen.arg(x, in4), gen.out(y, out4))


@emitter("roll")
def _roll(gen: Codegen, node: Node) -> None:
    x, y = node.inputs[0], node.outputs[0]
    shifts, axes = node.attrs["shifts"], node.attrs["axes"]
    shifts = shifts if isinstance(shifts, (list, tuple)) else (shifts,)
    axes = axes if isinstance(axes, (list, tuple)) else (axes,)
    per_axis = [0] * len(x.shape)
    for s, a in zip(shifts, axes):
        per_axis[a % len(x.shape)] += s
    merged = merge_untouched(x.shape, per_axis, lambda s: not s)
    if merged is None:
        gen.emit(f"np.copyto({gen.out(y)}, np.roll({gen.arg(x)}, {tuple(shifts)}, {tuple(axes)}))")
        return
    x4, shifts4 = merged
    shifts4 = tuple(int(s or 0) % max(n, 1) for s, n in zip(shifts4, x4))
    gen.call("K.roll", gen.arg(x, x4), gen.out(y, x4), shifts4)


@emitter("take")
def _take(gen: Codegen, node: Node) -> None:
    x, idx, y = node.inputs[0], node.inputs[1], node.outputs[0]
    axis = node.attrs["axis"] % len(x.shape)
    outer, d, inner = numel(x.shape[:axis]), x.shape[axis], numel(x.shape[axis + 1 :])
    if idx.is_constant:
        indices = gen.weight(idx.data.astype(np.int64).reshape(-1), f"{idx.name}_int64")
    else:
        indices = gen.arg(idx, (idx.numel,))
    gen.call(
        "K.take", gen.arg(x, (outer, d, inner)), indices, gen.out(y, (outer, idx.numel, inner))
    )
