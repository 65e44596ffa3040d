"""Comparing backend outputs with the reference in the op-by-op backend tests."""

from __future__ import annotations

import numpy as np


def relative_error(got: np.ndarray, want: np.ndarray, floor: float = 1e-2) -> float:
    """max|got - want| / max|want| over finite values; equal infinities and NaNs count as equal.

    The scale has a ``floor``, by default 1e-2: the cases draw standard-normal inputs and weights,
    so float32 rounding is ~1e-7 in absolute terms even where a relu leaves a single output of
    3e-4 (a conv case hypothesis found: 1.8e-7 apart, which is 6e-4 of that output's own scale)."""
    same = (got == want) | (np.isnan(got) & np.isnan(want))
    with np.errstate(invalid="ignore"):  # inf - inf where both are inf
        diff = np.where(same, 0.0, np.abs(got.astype(np.float64) - want))
    scale = np.max(np.abs(want[np.isfinite(want)]), initial=0.0)
    return float(np.max(diff, initial=0.0)) / max(float(scale), floor)
