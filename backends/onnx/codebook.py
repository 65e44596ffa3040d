"""ONNX emitter of the shared-weight op (``codebook_lookup``, compiler/ops/codebook.py): the
codebook and the bit-packed indices stay initializers, and standard ops rebuild the weight, so the
file holds the compressed form.

The rebuild is the same in every layer of a bit width, so it is written once, as a model-local ONNX
function (``slimgraph.CodebookDecode<bits>``, standard ops only; ONNX Runtime inlines it at load and
folds it into the constant weight), and each shared layer is one call node. Spelled out per layer it
took 8-10 nodes, ~80 bytes each with their value_info: about a quarter of a pruned 3-bit ResNet-56
file."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper, numpy_helper

from backends.onnx.core import OnnxBuilder, Tensor, emitter

if TYPE_CHECKING:
    from compiler.ir.graph import Node

DOMAIN = "slimgraph"  # the model-local functions' domain (declared in the model's opset imports)
DOMAIN_VERSION = 1


def shared_const(b: OnnxBuilder, array: np.ndarray, hint: str) -> gs.Constant:
    """One initializer per distinct small array for the whole model (the shapes and lengths that
    layers of the same size pass to the decode function)."""
    key = ("shared_const", array.dtype.str, array.shape, array.tobytes())
    if key not in b.memo:
        b.memo[key] = gs.Constant(b.fresh(hint), np.ascontiguousarray(array))
    return b.memo[key]


def _const(name: str, array: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array, name))


def _unpack_nodes(bits: int) -> list[onnx.NodeProto]:
    """Nodes taking ``packed`` (uint8, the dense little-endian packing) to ``index`` (int32, one
    per packed slot, row-major).

    1, 2 and 4 bits: each byte holds whole indices, split by BitShift and BitwiseAnd on uint8.
    3, 5, 6 and 7 bits: a group of 8 indices is ``bits`` bytes, and index j lies in bytes
    ``lo = (j bits) // 8`` and ``lo + 1`` from bit ``s = (j bits) % 8``. One MatMul of the group's
    bytes (as float) with a constant (bits, 8) matrix holding ``2**-s`` at ``lo``, ``2**(8-s)`` at
    ``lo + 1`` gives ``(byte_lo + 256 byte_hi) / 2**s`` exactly (below 2**16 with at most 7
    fractional bits: 23 bits, within float32's mantissa); Mod 2**bits and the truncating Cast
    leave the index. (Joining a whole group into one int64 word lost low bits at 7 bits: ONNX
    Runtime's int64 arithmetic went through doubles.) 8 bits: one index per byte."""
    to_int = TensorProto.INT32
    if bits == 8:
        return [helper.make_node("Cast", ["packed"], ["index"], to=to_int)]
    if bits in (1, 2, 4):
        return [
            _const("column", np.array([-1, 1], np.int64)),
            helper.make_node("Reshape", ["packed", "column"], ["bytes"]),
            _const("shifts", np.arange(0, 8, bits, dtype=np.uint8)[None, :]),
            helper.make_node("BitShift", ["bytes", "shifts"], ["shifted"], direction="RIGHT"),
            _const("mask", np.array((1 << bits) - 1, np.uint8)),
            helper.make_node("BitwiseAnd", ["shifted", "mask"], ["masked"]),
            helper.make_node("Cast", ["masked"], ["index"], to=to_int),
        ]
    first_bit = np.arange(8) * bits
    low, shift = first_bit >> 3, first_bit & 7
    join = np.zeros((bits, 8), np.float32)
    join[low, np.arange(8)] = 2.0**-shift
    high = low + 1
    inside = high < bits  # the last index of a group may end in its last byte
    join[high[inside], np.arange(8)[inside]] = 2.0 ** (8 - shift[inside])
    return [
        _const("rows", np.array([-1, bits], np.int64)),
        helper.make_node("Reshape", ["packed", "rows"], ["bytes"]),
        helper.make_node("Cast", ["bytes"], ["real"], to=TensorProto.FLOAT),
        _const("join", join),
        helper.make_node("MatMul", ["real", "join"], ["shifted"]),
        _const("modulus", np.array(1 << bits, np.float32)),
        helper.make_node("Mod", ["shifted", "modulus"], ["fraction"], fmod=1),
        helper.make_node("Cast", ["fraction"], ["index"], to=to_int),  # truncates the fraction
    ]


def decode_function(bits: int, opset: int) -> onnx.FunctionProto:
    """``CodebookDecode<bits>(packed, codebook, count, shape) -> weight``: unpack the indices,
    drop the padding of the last group of 8 (``count`` is the number of weights, int64[1]), look
    each up in its group's row of ``codebook`` (groups, 2**bits) and reshape to ``shape``."""
    nodes = _unpack_nodes(bits) + [
        _const("flat", np.array([-1], np.int64)),
        helper.make_node("Reshape", ["index", "flat"], ["line"]),
        _const("zero", np.array([0], np.int64)),
        helper.make_node("Slice", ["line", "zero", "count", "zero"], ["used"]),
        helper.make_node("Shape", ["codebook"], ["groups"], end=1),
        helper.make_node("Concat", ["groups", "flat"], ["by_group"], axis=0),
        helper.make_node("Reshape", ["used", "by_group"], ["grouped"]),
        helper.make_node("GatherElements", ["codebook", "grouped"], ["values"], axis=1),
        helper.make_node("Reshape", ["values", "shape"], ["weight"]),
    ]
    return helper.make_function(
        DOMAIN,
        f"CodebookDecode{bits}",
        ["packed", "codebook", "count", "shape"],
        ["weight"],
        nodes,
        [helper.make_opsetid("", opset)],
        doc_string=f"slimgraph shared weight, {bits}-bit packed indices into per-group codebooks",
    )


@emitter("codebook_lookup")
def emit_codebook_lookup(b: OnnxBuilder, node: Node, codebook: Tensor, indices: Tensor) -> Tensor:
    """One call of the bit width's decode function (added to ``b.memo['functions']``, which
    emit_onnx attaches to the model)."""
    shape, bits = node.attrs["shape"], node.attrs["bits"]
    count = math.prod(shape)
    functions = b.memo.setdefault("functions", {})
    name = f"CodebookDecode{bits}"
    if name not in functions:
        functions[name] = decode_function(bits, b.opset)
    b.prefix = ""
    out = gs.Variable(b.fresh("cb"), dtype=codebook.dtype)
    inputs = [
        indices,
        codebook,
        shared_const(b, np.array([count], np.int64), "n"),
        shared_const(b, np.array(shape, np.int64), "s"),
    ]
    b.made.add(id(out))
    b.graph.nodes.append(gs.Node(name, b.fresh("cb"), inputs=inputs, outputs=[out], domain=DOMAIN))
    return out


def attach_functions(model: onnx.ModelProto, functions: dict[str, onnx.FunctionProto]) -> None:
    """Add the decode functions the emitters used to ``model`` and declare their domain."""
    if not functions:
        return
    model.functions.extend(functions[name] for name in sorted(functions))
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
