"""ONNX emitter of the shared-weight op (``codebook_lookup``, compiler/ops/codebook.py): the
codebook and the bit-packed indices stay initializers, and standard ops rebuild the weight, so the
file holds the compressed form."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from backends.onnx_emitters import OnnxBuilder, Tensor
from compiler.ir import Node
from compiler.ops.codebook import packed_size


def shared_const(b: OnnxBuilder, array: np.ndarray, hint: str) -> gs.Constant:
    """One initializer per distinct small array for the whole model (the unpacking's shifts,
    masks and byte positions are the same in every layer of a bit width)."""
    key = ("shared_const", array.dtype.str, array.shape, array.tobytes())
    if key not in b.memo:
        b.memo[key] = gs.Constant(b.fresh(hint), np.ascontiguousarray(array))
    return b.memo[key]


def unpack_indices(b: OnnxBuilder, packed: Tensor, bits: int) -> Tensor:
    """int32 indices, row-major in shape (rows, indices per row), from the dense little-endian
    packing, with standard ops only.

    1, 2 and 4 bits: each byte holds whole indices, split by BitShift and BitwiseAnd on uint8.
    3, 5, 6 and 7 bits: a group of 8 indices is ``bits`` bytes, and index j lies in bytes
    ``lo = (j bits) // 8`` and ``lo + 1`` from bit ``s = (j bits) % 8``. One MatMul of the group's
    bytes (as float) with a constant (bits, 8) matrix holding ``2**-s`` at ``lo``, ``2**(8-s)`` at
    ``lo + 1`` gives ``(byte_lo + 256 byte_hi) / 2**s`` exactly (below 2**16 with at most 7
    fractional bits: 23 bits, within float32's mantissa); Mod 2**bits and the truncating Cast
    leave the index. That is 4 nodes per layer where byte gathers and bit ops took 8 (each node
    costs ~100 bytes of file, with its value_info). (Joining a whole group into one int64 word
    lost low bits at 7 bits: ONNX Runtime's int64 arithmetic went through doubles.) 8 bits: one
    index per byte."""
    if bits == 8:
        return b.op("Cast", packed, dtype=np.int32, to=onnx.TensorProto.INT32)
    if bits in (1, 2, 4):
        shifts = shared_const(b, np.arange(0, 8, bits, dtype=np.uint8)[None, :], "shifts")
        shifted = b.op("BitShift", b.reshape(packed, (-1, 1)), shifts, direction="RIGHT")
        mask = shared_const(b, np.array((1 << bits) - 1, np.uint8), "mask")
        index = b.op("BitwiseAnd", shifted, mask)
    else:
        rows = b.op("Cast", b.reshape(packed, (-1, bits)), dtype=np.float32,
                    to=onnx.TensorProto.FLOAT)
        first_bit = np.arange(8) * bits
        low, shift = first_bit >> 3, first_bit & 7
        join = np.zeros((bits, 8), np.float32)
        join[low, np.arange(8)] = 2.0 ** -shift
        high = low + 1
        inside = high < bits  # the last index of a group may end in its last byte
        join[high[inside], np.arange(8)[inside]] = 2.0 ** (8 - shift[inside])
        shifted = b.op("MatMul", rows, shared_const(b, join, "join"))
        modulus = shared_const(b, np.array(1 << bits, np.float32), "modulus")
        index = b.op("Mod", shifted, modulus, fmod=1)  # the Cast below truncates the fraction
    return b.op("Cast", index, dtype=np.int32, to=onnx.TensorProto.INT32)


def emit_codebook_lookup(b: OnnxBuilder, node: Node, codebook: Tensor, indices: Tensor) -> Tensor:
    """Gather from the codebook (GatherElements along each group's row when there are several);
    the padding of the last group of 8 indices is sliced off first."""
    shape, bits = node.attrs["shape"], node.attrs["bits"]
    groups = node.inputs[0].shape[0]
    count = math.prod(shape)
    # Short names for the ~6-12 intermediate tensors ("cb_7/bitshift"): named after the IR node,
    # each appears three times (node output, next input, value_info), which cost ~100 bytes per
    # node, about a fifth of a 4-bit ResNet-56 file. The output keeps the IR value's name.
    b.prefix = ""
    b.prefix = b.fresh("cb")
    index = unpack_indices(b, indices, bits)
    if packed_size(count, bits) * 8 // bits != count:
        index = b.op("Slice", b.reshape(index, (-1,)), b.ints([0]), b.ints([count]), b.ints([0]))
    if groups == 1:
        weight = b.op("Gather", b.reshape(codebook, (-1,)), index, axis=0, dtype=codebook.dtype)
    else:
        index = b.reshape(index, (groups, count // groups))
        weight = b.op("GatherElements", codebook, index, axis=1, dtype=codebook.dtype)
    return b.reshape(weight, shape)
