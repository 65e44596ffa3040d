"""The one deviation metric: how far a graph's outputs moved from a reference's, relative to the
reference's scale. The pass manager checks every pass with it; reconstruction reports it."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def deviation(reference: Sequence[np.ndarray], outputs: Sequence[np.ndarray]) -> float:
    """Max abs difference over all outputs, relative to the reference outputs' largest magnitude."""
    # One scale for all outputs: float32 rounding is relative to the magnitudes flowing through
    # the graph, so an output that is numerically zero next to the others (a random CNN's head
    # summing to 2e-5 beside outputs of 4.8) must not turn reordering noise into a "deviation".
    worst, scale = 0.0, 1e-12
    for ref, out in zip(reference, outputs):
        ref = np.asarray(ref, dtype=np.float64)
        out = np.asarray(out, dtype=np.float64)
        if ref.shape != out.shape:
            return float("inf")
        if ref.size == 0:
            continue
        finite = np.isfinite(ref)
        # NaN or inf where the reference has a number (or the reverse) is the worst deviation;
        # max() would otherwise skip NaN and call a graph that computes NaN "exact"
        same = (ref == out) | (np.isnan(ref) & np.isnan(out))
        if not np.all(same | (finite & np.isfinite(out))):
            return float("inf")
        scale = max(scale, float(np.abs(ref[finite]).max(initial=0.0)))
        with np.errstate(invalid="ignore"):  # inf - inf where both are inf
            worst = max(worst, float(np.abs(np.where(same, 0.0, ref - out)).max()))
    return worst / scale
