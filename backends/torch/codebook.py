"""Torch emitter of the shared-weight op (``codebook_lookup``, compiler/ops/codebook.py).

The codebook stays an ``nn.Parameter``: the lookup is a gather, whose backward adds each weight's
gradient into its centroid, so fine-tuning trains the shared form itself.
"""

from __future__ import annotations

import math

import torch

from backends.torch.core import emitter


def unpack_indices(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The dense little-endian bit-packing of compiler.ops.codebook, undone in torch (int64)."""
    if bits == 8:
        return packed[:count].long()
    rows = packed.reshape(-1, bits).long()  # 8 indices in ``bits`` bytes: one int64 word per row
    byte_shifts = torch.arange(bits, device=packed.device) * 8
    words = (rows << byte_shifts).sum(dim=1, keepdim=True)
    shifts = torch.arange(8, device=packed.device) * bits
    return ((words >> shifts) & ((1 << bits) - 1)).reshape(-1)[:count]


@emitter("codebook_lookup")
def _codebook_lookup(codebook, indices, *, shape, bits):
    # gather's backward adds each element's gradient into its centroid: a centroid's gradient is
    # the sum over the weights that share it, so the codebook (an nn.Parameter) trains as itself.
    groups = codebook.shape[0]
    index = unpack_indices(indices, bits, math.prod(shape)).reshape(groups, -1)
    return torch.gather(codebook, 1, index).reshape(shape)
