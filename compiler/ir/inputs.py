"""Arrays checked against a graph's inputs: example inputs and stacked calibration data."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from compiler.errors import InputError

if TYPE_CHECKING:
    from compiler.ir.graph import Graph


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def calibration_inputs(graph: Graph, data: Any) -> list[np.ndarray]:
    """Calibration data as one array per graph input, the samples stacked along the batch axis.

    ``data`` is an iterable of example inputs (each a tensor/array, or a tuple with one per graph
    input), each shaped like the graph's inputs except for the batch; or one array (a tensor)
    already stacked, or a list with one stacked array per input of a multi-input graph.

    Raises:
        InputError: no samples, a sample of the wrong rank, shape or dtype.
    """
    specs = graph.inputs
    if hasattr(data, "shape") or (
        isinstance(data, (list, tuple))
        and len(specs) > 1
        and len(data) == len(specs)
        and all(hasattr(d, "shape") and len(d.shape) == len(v.shape) for d, v in zip(data, specs))
    ):
        samples = [data if hasattr(data, "shape") else tuple(data)]
    else:
        try:
            samples = list(data)
        except TypeError:
            raise InputError(
                f"calibration data must be an iterable of example inputs, got "
                f"{type(data).__name__}",
                hint="pass a list of arrays shaped like the example input",
            ) from None
    if not samples:
        raise InputError(
            "calibration data is empty",
            hint="give at least one example input (100-1000 is typical)",
        )
    columns: list[list[np.ndarray]] = [[] for _ in specs]
    for k, sample in enumerate(samples):
        arrays = sample if isinstance(sample, (list, tuple)) else [sample]
        if len(arrays) != len(specs):
            raise InputError(
                f"calibration sample {k} has {len(arrays)} array(s), the graph takes "
                f"{len(specs)} input(s)",
                hint="give one array per graph input: " + ", ".join(v.type_str() for v in specs),
            )
        for column, value, array in zip(columns, specs, arrays, strict=True):
            array = _to_numpy(array)
            if array.ndim != len(value.shape) or array.shape[1:] != value.shape[1:]:
                raise InputError(
                    f"calibration sample {k} for input '{value.name}' has shape "
                    f"{tuple(array.shape)}, the graph's input is {value.shape} "
                    "(any batch)",
                    hint="calibrate on inputs shaped like the example input",
                )
            if array.dtype != np.dtype(value.dtype):
                if not np.can_cast(array.dtype, value.dtype, casting="same_kind"):
                    raise InputError(
                        f"calibration sample {k} for input '{value.name}' has dtype "
                        f"{array.dtype}, the graph's input is {value.dtype}",
                        hint=f"convert it with .astype('{value.dtype}')",
                    )
                array = array.astype(value.dtype)
            column.append(array)
    stacked = [np.concatenate(c) for c in columns]
    if len(stacked[0]) == 0:
        raise InputError(
            "calibration data is empty (zero rows)", hint="give at least one example input"
        )
    return stacked
