"""Shared weights: the ``codebook_lookup`` op and the bit-packing of its index constant.

A weight shared by k-means (``passes/weight_sharing.py``) is stored as two constants and one node::

    $w.codebook: float32[G, K]      K <= 2**bits centroids per group (G groups of output channels)
    $w.indices:  uint8[L]           one ``bits``-wide index per weight element, bit-packed
    %w = codebook_lookup($w.codebook, $w.indices) {shape=(O, I, kh, kw), bits=4}

The packing is dense and little-endian: index ``i`` occupies bits ``[i*bits, (i+1)*bits)`` of the
byte stream, low bits first, so 8 indices take exactly ``bits`` bytes (two 4-bit indices per byte,
low nibble first; four 2-bit ones; 3-bit ones span byte boundaries). The index count is padded to a
multiple of 8 with zeros: ``L = ceil(n / 8) * bits`` for ``n = prod(shape)`` weights. Weight element
``e`` (row-major) belongs to group ``e // (n // G)``, which are whole output channels when ``G``
divides the weight's first dimension.

The codebook may also be int8 (G, K): ``quantize`` after ``share-weights`` quantizes the centroids
and keeps the indices, so the lookup yields an int8 weight that a ``dequantize_linear`` (one scale
per output channel) turns back into float, the QDQ form integer kernels take.

The op is not foldable: folding it would store the dense weight again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from compiler.ops.table import REQUIRED, TypeList, numel, register_op

if TYPE_CHECKING:
    from compiler.ir.graph import Node

MAX_BITS = 8


def packed_size(count: int, bits: int) -> int:
    """Bytes holding ``count`` indices of ``bits`` bits (padded to a multiple of 8 indices)."""
    return -(-count // 8) * bits


def pack_indices(indices: np.ndarray, bits: int) -> np.ndarray:
    """Flat indices (each < 2**bits) -> the dense little-endian uint8 stream described above."""
    _check_bits(bits)
    flat = np.asarray(indices).reshape(-1).astype(np.uint64)
    if flat.size and int(flat.max()) >= 1 << bits:
        raise ValueError(f"index {int(flat.max())} does not fit in {bits} bits")
    groups = np.zeros((-(-flat.size // 8), 8), np.uint64)
    groups.reshape(-1)[: flat.size] = flat
    shifts = np.arange(8, dtype=np.uint64) * np.uint64(bits)
    words = np.bitwise_or.reduce(groups << shifts, axis=1)  # 8 * bits <= 64 bits per group
    byte_shifts = np.arange(bits, dtype=np.uint64) * np.uint64(8)
    return ((words[:, None] >> byte_shifts) & np.uint64(0xFF)).astype(np.uint8).reshape(-1)


def unpack_indices(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The inverse of :func:`pack_indices`: the first ``count`` indices, as uint8."""
    _check_bits(bits)
    packed = np.asarray(packed, np.uint8).reshape(-1)
    if packed.size != packed_size(count, bits):
        raise ValueError(
            f"{packed.size} bytes cannot hold {count} indices of {bits} bits "
            f"(expected {packed_size(count, bits)})"
        )
    rows = packed.reshape(-1, bits).astype(np.uint64)
    byte_shifts = np.arange(bits, dtype=np.uint64) * np.uint64(8)
    words = np.bitwise_or.reduce(rows << byte_shifts, axis=1)
    shifts = np.arange(8, dtype=np.uint64) * np.uint64(bits)
    mask = np.uint64((1 << bits) - 1)
    return ((words[:, None] >> shifts) & mask).astype(np.uint8).reshape(-1)[:count]


def _check_bits(bits: int) -> None:
    if not (isinstance(bits, (int, np.integer)) and 1 <= bits <= MAX_BITS):
        raise ValueError(f"bits must be an integer in 1..{MAX_BITS}, got {bits!r}")


def _lookup_infer(node: Node) -> TypeList:
    codebook, indices = node.inputs
    shape, bits = tuple(node.attrs["shape"]), node.attrs["bits"]
    _check_bits(bits)
    if len(codebook.shape) != 2 or not (
        np.dtype(codebook.dtype).kind == "f" or codebook.dtype == "int8"
    ):
        raise ValueError(
            f"codebook must be a float or int8 (groups, K) array, got {codebook.type_str()}"
        )
    groups, k = codebook.shape
    if k > 1 << bits or k < 1:
        raise ValueError(f"codebook has {k} entries; {bits}-bit indices address 1..{1 << bits}")
    count = numel(shape)
    if groups < 1 or count % groups:
        raise ValueError(f"{count} weights do not split into {groups} equal groups")
    if indices.dtype != "uint8" or indices.shape != (packed_size(count, bits),):
        raise ValueError(
            f"indices must be uint8[{packed_size(count, bits)}] ({count} packed {bits}-bit "
            f"indices), got {indices.type_str()}"
        )
    return [(shape, codebook.dtype)]


@register_op(
    "codebook_lookup",
    infer=_lookup_infer,
    arity=2,
    attrs={"shape": REQUIRED, "bits": REQUIRED},
    foldable=False,
)
def codebook_lookup(codebook, indices, *, shape, bits):
    """a shared weight: codebook[group, unpacked index] per element, reshaped to ``shape``"""
    count = numel(shape)
    groups = codebook.shape[0]
    index = unpack_indices(indices, bits, count).reshape(groups, count // groups)
    return np.take_along_axis(codebook, index.astype(np.intp), axis=1).reshape(shape)
