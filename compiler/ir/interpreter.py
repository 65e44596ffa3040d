"""The reference interpreter: runs a graph with the op table's numpy implementations.

It is the oracle that every pass and backend is tested against, so it favours clarity over speed,
but it frees each value after its last use so that large zoo models fit in memory.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from compiler.errors import InputError, SlimgraphError
from compiler.ir.graph import Graph, Value
from compiler.ops.table import get_op


def check_inputs(graph: Graph, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Coerce and check run-time inputs against the graph's inputs (count, shape, dtype)."""
    if len(arrays) != len(graph.inputs):
        raise InputError(
            f"graph '{graph.name}' takes {len(graph.inputs)} input(s), got {len(arrays)}",
            hint="pass one array per graph input, in order: "
            + ", ".join(v.type_str() for v in graph.inputs),
        )
    out = []
    for value, array in zip(graph.inputs, arrays):
        array = np.asarray(array)
        if tuple(array.shape) != value.shape:
            raise InputError(
                f"input '{value.name}' expects shape {value.shape}, got {tuple(array.shape)}",
                hint="compile again with example inputs of the shape you will run, "
                "or reshape the input",
            )
        if array.dtype != np.dtype(value.dtype):
            if np.can_cast(array.dtype, value.dtype, casting="same_kind"):
                array = array.astype(value.dtype)
            else:
                raise InputError(
                    f"input '{value.name}' expects dtype {value.dtype}, got {array.dtype}",
                    hint=f"convert it with .astype('{value.dtype}')",
                )
        out.append(array)
    return out


def run(
    graph: Graph, inputs: Sequence[np.ndarray], *, keep: Sequence[Value] = ()
) -> list[np.ndarray]:
    """Run ``graph`` on numpy ``inputs`` and return its outputs.

    Args:
        graph: the graph to run.
        inputs: one array per graph input.
        keep: extra values whose arrays to return after the outputs (e.g. for calibration).
    """
    env: dict[int, np.ndarray] = {
        id(v): a for v, a in zip(graph.inputs, check_inputs(graph, inputs))
    }
    wanted = {id(v) for v in graph.outputs} | {id(v) for v in keep}
    last_use: dict[int, int] = {}
    for i, node in enumerate(graph.nodes):
        for v in node.inputs:
            if v is not None:
                last_use[id(v)] = i
    for i, node in enumerate(graph.nodes):
        args = []
        for v in node.inputs:
            if v is None:
                args.append(None)
            elif v.is_constant:
                args.append(v.data)
            else:
                args.append(env[id(v)])
        try:
            results = get_op(node.op).run(args, node.attrs)
        except SlimgraphError:
            raise
        except Exception as e:
            raise SlimgraphError(
                f"reference implementation failed: {e}",
                node=node.name,
                op=node.op,
                source=node.source,
            ) from e
        for value, array in zip(node.outputs, results):
            env[id(value)] = np.asarray(array)
        for v in node.inputs:
            if v is not None and last_use.get(id(v)) == i and id(v) not in wanted:
                env.pop(id(v), None)
    result = []
    for v in [*graph.outputs, *keep]:
        result.append(v.data if v.is_constant else env[id(v)])
    return result
