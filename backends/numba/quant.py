"""Numba emitters of the quantization ops, and the integer conv2d/linear patterns.

``conv2d(dq(x_u8), dq($w_int8), b) {relu|clip}`` and the same linear run in the integer kernels of
:mod:`backends.numba.kernels.int8` (uint8 x int8, int32 accumulation; VNNI for groups 1 and
linear, a direct kernel for depthwise and grouped convs), with a following per-tensor uint8
quantize fused as requantization. Everything else runs in float: a dequantize of constants is
evaluated once at compile time, activation quantize/dequantize lines call numpy with the
reference's float32 arithmetic (bit-exact with it).

Each of these is an entry of :data:`~backends.numba.core.EMITTERS` chosen by pattern: the integer
conv2d/linear/add, and the nodes those kernels absorb (the input dequantizes, the requantize, a
relu between add and requantize), which emit nothing.
"""

from __future__ import annotations

import numpy as np

from backends.numba.core import Codegen, emitter
from compiler.ir.graph import Node, Value
from compiler.ops.quant import expand_param, quant_range
from compiler.ops.table import get_op


def static_array(value: Value | None) -> np.ndarray | None:
    """The value's array when it is known at compile time: a constant, or a shared weight (a
    ``codebook_lookup`` of constants: quantize after share-weights makes int8 ones), decoded."""
    if value is None:
        return None
    if value.is_constant:
        return value.data
    p = value.producer
    if p is not None and p.op == "codebook_lookup" and all(v.is_constant for v in p.inputs):
        (array,) = get_op(p.op).run([v.data for v in p.inputs], p.attrs)
        return array
    return None


def _params(gen: Codegen, node: Node, dtype: str) -> tuple[str, str | None]:
    """Expressions of the scale and the zero point (as ``dtype``), broadcastable against x."""
    x, scale = node.inputs[0], node.inputs[1]
    zp = node.inputs[2] if len(node.inputs) > 2 else None
    a = node.attrs
    s = expand_param(scale.data, x.shape, a["axis"], a["block_size"])
    z = None if zp is None else expand_param(zp.data, x.shape, a["axis"], a["block_size"])
    s_expr = gen.weight(s.astype(scale.dtype), f"{node.name}.scale")
    z_expr = None if z is None else gen.weight(z.astype(dtype), f"{node.name}.zero_point")
    return s_expr, z_expr


def requantized_in_kernel(node: Node) -> bool:
    """A quantize that an integer kernel applies to its result: the epilogue of an integer
    conv2d/linear, or the integer add (after its relu, if any)."""
    p = node.inputs[0].producer
    if p is not None and integer_layer(p) and fused_quantize(node.graph, p) is node:
        return True
    if p is not None and p.op == "relu" and p.inputs[0].producer is not None:
        p = p.inputs[0].producer
    return p is not None and (integer_add(node.graph, p) or (None, None))[1] is node


@emitter("quantize_linear", when=requantized_in_kernel, priority=1)
def _requantized(gen: Codegen, node: Node) -> None:
    """Nothing: the integer kernel writes the uint8 result itself."""


@emitter("quantize_linear")
def _quantize(gen: Codegen, node: Node) -> None:
    x, y = node.inputs[0], node.outputs[0]
    s, z = _params(gen, node, x.dtype)
    lo, hi = quant_range(y.dtype, node.attrs["bits"])
    q = f"np.rint({gen.arg(x)} / {s})" + (f" + {z}" if z else "")
    gen.emit(f"np.copyto({gen.out(y)}, np.clip({q}, {lo}, {hi}), casting='unsafe')")


def static_dequantize(node: Node) -> bool:
    """A dequantize whose inputs are all known at compile time."""
    return all(v is None or static_array(v) is not None for v in node.inputs)


def read_by_integer_kernels(node: Node) -> bool:
    """A dequantize read only by integer kernels, which read its int8 weight (as a conv/linear's
    weight or bias) or its uint8 tensor (as their input) themselves."""
    y = node.outputs[0]
    constant = static_dequantize(node)
    return (
        bool(y.uses)
        and not any(v is y for v in node.graph.outputs)
        and all(
            (integer_layer(n) and (i in (1, 2) if constant else i == 0))
            or (not constant and integer_add(node.graph, n) is not None)
            for n, i in y.uses
        )
    )


@emitter("dequantize_linear", when=read_by_integer_kernels, priority=2)
def _read_by_kernels(gen: Codegen, node: Node) -> None:
    """Nothing: the integer kernels read the quantized values themselves."""


@emitter("dequantize_linear", when=static_dequantize, priority=1)
def _dequantize_now(gen: Codegen, node: Node) -> None:
    """Evaluated once at compile time: the float weight becomes a constant."""
    y = node.outputs[0]
    arrays = [static_array(v) for v in node.inputs]
    (value,) = get_op(node.op).run(arrays, node.attrs)
    gen.exprs[id(y)] = gen.weight(value, y.name)


@emitter("dequantize_linear")
def _dequantize(gen: Codegen, node: Node) -> None:
    x, y = node.inputs[0], node.outputs[0]
    s, z = _params(gen, node, "int32")
    q = f"{gen.arg(x)}.astype(np.int32)" + (f" - {z}" if z else "")
    gen.emit(f"np.multiply(({q}).astype({s}.dtype), {s}, out={gen.out(y)})")


# -- integer conv2d / linear -------------------------------------------------------------------
# ``conv2d(dq(x_u8), dq($w_i8), b)`` runs in KQ.conv2d_u8s8 (KQ.conv2d_grouped_u8s8 when grouped)
# on the uint8 tensor itself; the input dequantize is then not emitted, and a following per-tensor
# uint8 quantize is fused into the kernel's epilogue (requantization). Anything else takes the
# float path.

ACT = {None: "KQ.NONE", "relu": "KQ.RELU", "clip": "KQ.CLIP"}
# ``relu(add(dq(a_u8), dq(b_u8)))`` followed by a uint8 quantize is one KQ.add_u8 (QLinearAdd).


def _uint8_input(value: Value | None):
    """(x_u8, scale, zero point) when ``value`` is a per-tensor dequantize of a runtime uint8."""
    p = value.producer if value is not None else None
    if p is None or p.op != "dequantize_linear":
        return None
    q, s = p.inputs[0], p.inputs[1]
    z = p.inputs[2] if len(p.inputs) > 2 else None
    if q.is_constant or q.dtype != "uint8" or not s.is_constant or s.numel != 1:
        return None
    if z is not None and (not z.is_constant or z.numel != 1):
        return None
    return q, float(s.data), 0 if z is None else int(z.data)


def _int8_weight(value: Value):
    """(q int8, per-channel scale) when ``value`` dequantizes a constant symmetric int8 weight."""
    p = value.producer
    if p is None or p.op != "dequantize_linear" or p.attrs["block_size"]:
        return None
    q, s = p.inputs[0], p.inputs[1]
    z = p.inputs[2] if len(p.inputs) > 2 else None
    data = static_array(q)
    if data is None or not s.is_constant or q.dtype != "int8" or p.attrs["axis"] % 2:
        return None
    if z is not None and (not z.is_constant or np.any(z.data != 0)):
        return None
    scale = np.broadcast_to(s.data.astype(np.float32).reshape(-1), (q.shape[0],))
    return data, scale


def _const_bias(value: Value | None):
    """The bias as float32 (empty for none), or None when it is not computable now."""
    if value is None:
        return np.empty(0, np.float32)
    if value.is_constant:
        return value.data.astype(np.float32).reshape(-1)
    p = value.producer
    if p.op == "dequantize_linear" and all(v is None or v.is_constant for v in p.inputs):
        (array,) = get_op(p.op).run([None if v is None else v.data for v in p.inputs], p.attrs)
        return array.astype(np.float32).reshape(-1)
    return None


def integer_layer(node: Node) -> bool:
    """Whether the int8 kernels take this conv2d/linear."""
    if node.op == "linear" and len(node.inputs[0].shape) != 2:
        return False
    if node.op not in ("conv2d", "linear") or node.attrs["activation"] not in ACT:
        return False
    r = node.inputs[3] if len(node.inputs) > 3 else None
    if r is not None and (r.shape != node.outputs[0].shape or r.dtype != "float32"):
        return False
    b = node.inputs[2] if len(node.inputs) > 2 else None
    return (
        _uint8_input(node.inputs[0]) is not None
        and _int8_weight(node.inputs[1]) is not None
        and _const_bias(b) is not None
    )


def fused_quantize(graph, node: Node) -> Node | None:
    """The per-tensor uint8 quantize that is the sole reader of ``node``'s output, if any."""
    y = node.outputs[0]
    if len(y.uses) != 1 or any(v is y for v in graph.outputs):
        return None
    q = y.uses[0][0]
    if q.op != "quantize_linear" or q.attrs["bits"] != 8 or q.outputs[0].dtype != "uint8":
        return None
    s, z = q.inputs[1], q.inputs[2] if len(q.inputs) > 2 else None
    if not s.is_constant or s.numel != 1 or (z is not None and (not z.is_constant or z.numel != 1)):
        return None
    return q


def integer_add(graph, node: Node) -> tuple[Node | None, Node] | None:
    """(relu or None, quantize) when ``node`` is an add of two per-tensor uint8 dequantizes whose
    result is requantized (after an optional relu) to per-tensor uint8: one integer kernel."""
    if node.op != "add" or any(_uint8_input(v) is None for v in node.inputs):
        return None
    if any(v.shape != node.outputs[0].shape for v in node.inputs):
        return None
    relu = None
    y = node.outputs[0]
    if len(y.uses) == 1 and y.uses[0][0].op == "relu" and not any(v is y for v in graph.outputs):
        relu = y.uses[0][0]
    q = fused_quantize(graph, relu or node)
    return None if q is None else (relu, q)


def _f32(value: float) -> str:
    return f"np.float32({float(np.float32(value))!r})"


# above the conv2d of a shared float weight (codebook.py, priority 1) and the float emitters
@emitter("conv2d", "linear", when=integer_layer, priority=2)
def _integer_layer(gen: Codegen, node: Node) -> None:
    from backends.numba.kernels.int8 import pack_grouped_weight, pack_weight

    xq, sx, zx = _uint8_input(node.inputs[0])
    wq, sw = _int8_weight(node.inputs[1])
    bias = _const_bias(node.inputs[2] if len(node.inputs) > 2 else None)
    r = node.inputs[3] if len(node.inputs) > 3 else None
    y = node.outputs[0]
    name = node.name
    groups = node.attrs["groups"] if node.op == "conv2d" else 1
    if groups == 1:
        packed, wsum, k4, o16 = pack_weight(wq)
        consts = [
            gen.weight(packed, f"{name}.packed"),
            gen.weight(wsum, f"{name}.wsum"),
            k4,
            o16,
            wq.shape[0],
        ]
    else:
        taps, wsum = pack_grouped_weight(wq)
        consts = [gen.weight(taps, f"{name}.taps"), gen.weight(wsum, f"{name}.wsum"), groups]
    scale = gen.weight((np.float32(sx) * sw).astype(np.float32), f"{name}.scale")
    act = node.attrs["activation"]
    attrs = node.attrs["activation_attrs"] or {}
    lo = attrs.get("min_val") if act == "clip" else None
    hi = attrs.get("max_val") if act == "clip" else None
    lo, hi = -np.inf if lo is None else float(lo), np.inf if hi is None else float(hi)
    q = fused_quantize(gen.graph, node)
    rank = len(y.shape)
    if q is not None:
        sy, zy = float(q.inputs[1].data), float(q.inputs[2].data) if len(q.inputs) > 2 else 0.0
        outs = [gen.none(rank, "float32"), gen.out(q.outputs[0])]
    else:
        sy, zy = 1.0, 0.0
        outs = [gen.out(y), gen.none(rank, "uint8")]
    res = gen.none(rank, "float32") if r is None else gen.arg(r)
    tail = [
        scale,
        gen.weight(bias, f"{name}.bias"),
        res,
        ACT[act],
        lo,
        hi,
        _f32(sy),
        _f32(zy),
        q is not None,
        *outs,
        "nt",
    ]
    if node.op == "conv2d":
        a = node.attrs
        kh, kw = wq.shape[2:]
        geometry = [kh, kw, *a["stride"], *a["padding"], *a["dilation"]]
        kernel = "KQ.conv2d_u8s8" if groups == 1 else "KQ.conv2d_grouped_u8s8"
        gen.call(kernel, gen.arg(xq), zx, *consts, *geometry, *tail)
    else:
        gen.call("KQ.linear_u8s8", gen.arg(xq), zx, *consts, *tail)


def is_integer_add(node: Node) -> bool:
    """An add that runs as one KQ.add_u8 (see :func:`integer_add`)."""
    return integer_add(node.graph, node) is not None


@emitter("add", when=is_integer_add, priority=1)
def _integer_add(gen: Codegen, node: Node) -> None:
    relu, q = integer_add(gen.graph, node)
    (a, sa, za), (b, sb, zb) = (_uint8_input(v) for v in node.inputs)
    out = q.outputs[0]
    sy, zy = float(q.inputs[1].data), float(q.inputs[2].data) if len(q.inputs) > 2 else 0.0
    gen.call(
        "KQ.add_u8",
        gen.arg(a, (a.numel,)),
        za,
        _f32(sa),
        gen.arg(b, (b.numel,)),
        zb,
        _f32(sb),
        relu is not None,
        _f32(sy),
        _f32(zy),
        gen.out(out, (out.numel,)),
    )


def relu_in_integer_add(node: Node) -> bool:
    """The relu between an integer add and its requantize, which KQ.add_u8 applies."""
    p = node.inputs[0].producer
    return p is not None and (integer_add(node.graph, p) or (None,))[0] is node


@emitter("relu", when=relu_in_integer_add, priority=1)
def _relu_in_add(gen: Codegen, node: Node) -> None:
    """Nothing: applied inside the integer add."""
