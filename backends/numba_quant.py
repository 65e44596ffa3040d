"""Numba emitters of the quantization ops.

A dequantize of a constant (an int8 weight, an int32 bias) is evaluated once at compile time:
the generated forward reads the float weight (the numba integer kernels, which read the int8
weight itself, replace the conv/linear patterns around it). Activation quantize/dequantize lines
call numpy with the same float32 arithmetic as the reference, so they are bit-exact with it.
"""

from __future__ import annotations

from backends.numba_backend import Codegen, emitter
from compiler.ir import Node
from compiler.op_table import get_op
from compiler.ops.quant import expand_param, quant_range


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


@emitter("quantize_linear")
def _quantize(gen: Codegen, node: Node) -> None:
    x, y = node.inputs[0], node.outputs[0]
    s, z = _params(gen, node, x.dtype)
    lo, hi = quant_range(y.dtype, node.attrs["bits"])
    q = f"np.rint({gen.arg(x)} / {s})" + (f" + {z}" if z else "")
    gen.emit(f"np.copyto({gen.out(y)}, np.clip({q}, {lo}, {hi}), casting='unsafe')")


@emitter("dequantize_linear")
def _dequantize(gen: Codegen, node: Node) -> None:
    x, y = node.inputs[0], node.outputs[0]
    if all(v is None or v.is_constant for v in node.inputs):
        arrays = [None if v is None else v.data for v in node.inputs]
        (value,) = get_op(node.op).run(arrays, node.attrs)
        gen.exprs[id(y)] = gen.weight(value, y.name)
        return
    s, z = _params(gen, node, "int32")
    q = f"{gen.arg(x)}.astype(np.int32)" + (f" - {z}" if z else "")
    gen.emit(f"np.multiply(({q}).astype({s}.dtype), {s}, out={gen.out(y)})")
