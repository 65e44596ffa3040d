"""Runtime of a generated numba model: input checks, the buffer arena, run() and load().

Needs only numpy and numba: a saved package gets a copy as ``runtime.py``. A generated module
(``model.py``) provides ``INPUTS``, ``OUTPUTS``, ``SLOTS``, ``VIEWS``, ``prepare`` and
``forward``.
"""

from __future__ import annotations

import os

import numba
import numpy as np

ALIGN = 64  # bytes; every arena slot starts on a cache line


class InputError(ValueError):
    """Run-time inputs of the wrong count, shape or dtype."""


def check_inputs(spec, arrays) -> list[np.ndarray]:
    """Coerce ``arrays`` to the model's inputs: count, shape, dtype (same-kind casts are applied),
    C-contiguous. Raises :class:`InputError` saying what was expected and how to fix it."""
    inputs = spec.INPUTS
    if len(arrays) != len(inputs):
        want = ", ".join(f"{n}: {d}{list(s)}" for n, s, d in inputs)
        raise InputError(
            f"model {spec.GRAPH!r} takes {len(inputs)} input(s), got {len(arrays)}. "
            f"Fix: pass one array per input, in order: {want}"
        )
    out = []
    for (name, shape, dtype), array in zip(inputs, arrays):
        array = np.asarray(array)
        if tuple(array.shape) != tuple(shape):
            raise InputError(
                f"input {name!r} expects shape {tuple(shape)}, got {tuple(array.shape)}. Fix: "
                "reshape the input, or compile again with example inputs of the shape you run"
            )
        if array.dtype != np.dtype(dtype):
            if not np.can_cast(array.dtype, dtype, casting="same_kind"):
                raise InputError(
                    f"input {name!r} expects dtype {dtype}, got {array.dtype}. "
                    f"Fix: convert it with .astype({dtype!r})"
                )
            array = array.astype(dtype)
        out.append(np.ascontiguousarray(array))
    return out


def _aligned(nbytes: int) -> np.ndarray:
    raw = np.empty(nbytes + ALIGN, np.uint8)
    start = (-raw.ctypes.data) % ALIGN
    return raw[start : start + nbytes]


class Model:
    """A generated forward with its weights and preallocated buffers.

    The buffers are reused by every call, so one Model runs one call at a time (use one Model per
    thread); outputs are fresh arrays. Threads: ``numba.set_num_threads(n)``.
    """

    def __init__(self, spec, weights: dict[str, np.ndarray]) -> None:
        self.spec = spec
        self.w = {k: np.require(v, requirements=("C", "W")) for k, v in weights.items()}
        if hasattr(spec, "prepare"):  # derived tables (a conv's tap offsets), not saved
            spec.prepare(self.w)
        self.arena = [_aligned(n) for n in spec.SLOTS]
        self.b = [
            self.arena[slot][: _nbytes(shape, dtype)].view(dtype).reshape(shape)
            for slot, shape, dtype in spec.VIEWS
        ]
        if hasattr(spec, "bind"):  # tables that hold the buffers' addresses (conv chains)
            spec.bind(self.w, self.b)

    def run(self, *arrays) -> list[np.ndarray]:
        """Run on one array per input (in order); returns the outputs as new arrays."""
        xs = check_inputs(self.spec, arrays)
        return self.spec.forward(self.w, self.b, numba.get_num_threads(), *xs)

    __call__ = run


def _nbytes(shape, dtype) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def load(spec, path: str) -> Model:
    """The model ``spec`` (a generated module) with the weights in ``path/weights.npz``."""
    with np.load(os.path.join(path, "weights.npz")) as f:
        weights = {k: f[k] for k in f.files}
    return Model(spec, weights)
