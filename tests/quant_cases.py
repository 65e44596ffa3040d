"""Op-by-op cases of the quantization ops, in the backend conformance suite's op table
(tests/backends/cases.py).

``QDQ_CASES``: op -> list of (attrs, input shapes, constants, inputs or None); inputs of None are
drawn standard-normal in the given shapes.
"""

from __future__ import annotations

import numpy as np

_rng = np.random.default_rng(7)
f32, i8, u8, i32 = np.float32, np.int8, np.uint8, np.int32


def _ints(dtype, *shape, low=-128, high=128):
    return _rng.integers(low, high, size=shape).astype(dtype)


TIES = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 200.0, -200.0], f32)
QDQ_CASES: dict[str, list] = {
    "quantize_linear": [
        # per tensor, uint8 with a zero point; |x| / 0.02 saturates at both ends
        ({}, [(2, 3, 4)], (np.array(0.02, f32), np.array(128, u8)), None),
        # per axis int8 (symmetric), and 4-bit saturation to [-8, 7]
        ({"axis": 1}, [(2, 3, 4)], (np.array([0.01, 0.02, 0.05], f32), np.zeros(3, i8)), None),
        ({"axis": 0, "bits": 4}, [(3, 8)], (np.array([0.1, 0.2, 0.3], f32), np.zeros(3, i8)), None),
        # blocks of 4 along axis 1, with zero points
        (
            {"axis": 1, "block_size": 4},
            [(3, 8)],
            (
                np.abs(_rng.standard_normal((3, 2))).astype(f32) / 50 + 0.01,
                _ints(i8, 3, 2, low=-5, high=5),
            ),
            None,
        ),
        # halves round to even; 200 saturates to 127
        ({}, [(9,)], (np.array(1.0, f32), np.array(0, i8)), [TIES]),
    ],
    "dequantize_linear": [
        (
            {},
            [],
            (_ints(u8, 2, 3, 4, low=0, high=256), np.array(0.05, f32), np.array(100, u8)),
            None,
        ),
        (
            {"axis": 0},
            [],
            (_ints(i8, 4, 3, 3, 3), np.linspace(0.01, 0.04, 4, dtype=f32), np.zeros(4, i8)),
            None,
        ),
        (
            {"axis": 0},
            [],
            (_ints(i32, 5, low=-(10**6), high=10**6), np.full(5, 1e-4, f32), np.zeros(5, i32)),
            None,
        ),
        (
            {"axis": 1, "block_size": 4},
            [],
            (
                _ints(i8, 3, 8, low=-8, high=8),
                np.linspace(0.1, 0.6, 6, dtype=f32).reshape(3, 2),
                _ints(i8, 3, 2, low=-2, high=2),
            ),
            None,
        ),
    ],
}
