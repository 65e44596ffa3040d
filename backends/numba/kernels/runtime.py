"""Runtime of a generated numba model: input checks, the buffer arena, run() and load().

Needs only numpy and numba: a saved package gets a copy as ``runtime.py``. A generated module
(``model.py``) provides ``INPUTS``, ``OUTPUTS``, ``SLOTS``, ``VIEWS``, ``BATCH``, ``prepare`` and
``forward``.

The buffers and kernel calls of ``forward`` are planned for the compiled batch (axis 0 of the
inputs). Any other batch runs in chunks of it, each sample computed exactly as in a run of the
compiled batch: the last chunk is filled up with copies of its last sample, whose results are
dropped. ``BATCH`` says where each output holds the batch, so the chunks' outputs are joined
there; a graph that mixes the samples (``BATCH`` None) runs its compiled batch only.
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
    C-contiguous. The batch (axis 0) may differ from the compiled one where ``spec.BATCH`` is
    set, the same in every input. Raises :class:`InputError` saying what was expected and how to
    fix it."""
    return _check(spec, arrays)[0]


def _check(spec, arrays) -> tuple[list[np.ndarray], int | None]:
    """:func:`check_inputs`, and the batch when it is not the compiled one (else None)."""
    inputs = spec.INPUTS
    if len(arrays) != len(inputs):
        want = ", ".join(f"{n}: {d}{list(s)}" for n, s, d in inputs)
        raise InputError(
            f"model {spec.GRAPH!r} takes {len(inputs)} input(s), got {len(arrays)}. "
            f"Fix: pass one array per input, in order: {want}"
        )
    out = []
    batches, other = set(), False
    for (name, shape, dtype), array in zip(inputs, arrays):
        array = np.asarray(array)
        if tuple(array.shape) != tuple(shape):
            other = True
            if array.ndim != len(shape) or not shape or tuple(array.shape[1:]) != shape[1:]:
                free = " (the batch, axis 0, may be any size)" if spec_batch(spec) else ""
                raise InputError(
                    f"input {name!r} expects shape {tuple(shape)}, got {tuple(array.shape)}"
                    f"{free}. Fix: reshape the input, or compile again with example inputs of "
                    "the shape you run"
                )
            if not spec_batch(spec):
                why = getattr(spec, "STATIC_BATCH", "") or "it was compiled for that batch"
                raise InputError(
                    f"input {name!r} expects shape {tuple(shape)}, got {tuple(array.shape)}: "
                    f"model {spec.GRAPH!r} runs only at batch {shape[0]}: {why}. Fix: run "
                    f"batches of {shape[0]} (split or pad the input), or trace with example "
                    "inputs of the batch you will run"
                )
        batches.add(array.shape[0] if array.ndim else None)
        if array.dtype != np.dtype(dtype):
            if not np.can_cast(array.dtype, dtype, casting="same_kind"):
                raise InputError(
                    f"input {name!r} expects dtype {dtype}, got {array.dtype}. "
                    f"Fix: convert it with .astype({dtype!r})"
                )
            array = array.astype(dtype)
        out.append(np.ascontiguousarray(array))
    if other and len(batches) > 1:
        raise InputError(
            f"the inputs of model {spec.GRAPH!r} have different batches {sorted(batches)}. "
            "Fix: give every input the same size along axis 0"
        )
    return out, batches.pop() if other else None


def spec_batch(spec) -> bool:
    """Whether the model runs other batches than its compiled one (older models: no)."""
    return getattr(spec, "BATCH", None) is not None


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
        xs, batch = _check(self.spec, arrays)
        if batch is None:
            return self.spec.forward(self.w, self.b, numba.get_num_threads(), *xs)
        return self._chunks(xs, self.spec.INPUTS[0][1][0])

    __call__ = run

    def _chunks(self, xs: list, size: int) -> list[np.ndarray]:
        """Run a batch other than the compiled ``size`` in chunks of ``size`` samples."""
        n, nt = xs[0].shape[0], numba.get_num_threads()
        parts: list[list[np.ndarray]] = [[] for _ in self.spec.OUTPUTS]
        for start in range(0, n, size):
            chunk = [x[start : start + size] for x in xs]
            valid = chunk[0].shape[0]
            if valid < size:  # fill up with the last sample (real data: no kernel sees zeros)
                chunk = [np.concatenate([c] + [c[-1:]] * (size - valid)) for c in chunk]
            outs = self.spec.forward(self.w, self.b, nt, *chunk)
            for part, out, batch in zip(parts, outs, self.spec.BATCH):
                if batch is None:  # no batch in it: the same for every chunk
                    if not part:
                        part.append(out)
                    continue
                axis, outer, inner = batch
                out = out.reshape(out.shape[:axis] + (outer, size, inner) + out.shape[axis + 1 :])
                part.append(out[(slice(None),) * (axis + 1) + (slice(0, valid),)])
        results = []
        for part, batch in zip(parts, self.spec.BATCH):
            if batch is None:
                results.append(part[0])
                continue
            axis, outer, inner = batch
            joined = np.concatenate(part, axis=axis + 1)
            shape = joined.shape[:axis] + (outer * n * inner,) + joined.shape[axis + 3 :]
            results.append(joined.reshape(shape))
        return results


def _nbytes(shape, dtype) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def load(spec, path: str) -> Model:
    """The model ``spec`` (a generated module) with the weights in ``path/weights.npz``."""
    with np.load(os.path.join(path, "weights.npz")) as f:
        weights = {k: f[k] for k in f.files}
    return Model(spec, weights)
