"""The ONNX backend's emitter table and graph builder: what every ONNX emitter module imports.

An emitter is ``emit(b, node, *inputs) -> tensor | [tensors]``: ``b`` is the :class:`OnnxBuilder`,
``node`` the IR node (for its attributes and the static shapes and dtypes of its values) and
``inputs`` the onnx-graphsurgeon tensors of its inputs (``None`` for an omitted optional input), in
the order of the op's reference implementation. Emitters register in :data:`EMITTERS`
(``@emitter("op")``, or with ``when=pattern, priority=n`` for a pattern); this module imports no
emitter module: ``backends.onnx.backend`` imports it and all of them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from backends.batch import BatchFlow
from backends.emitters import EmitterTable
from compiler.ir.graph import Value

__all__ = ["EMITTERS", "Emitter", "OnnxBuilder", "Tensor", "emitter"]

Tensor = gs.Tensor
Emitter = Callable[..., Any]

#: IR op name -> entries of ``emit(b, node, *inputs)``, chosen per node by pattern.
EMITTERS = EmitterTable(
    "ONNX",
    signature="a function fn(builder, node, *inputs) that adds ONNX nodes with builder.op(...) "
    "and returns the output tensor(s)",
    home="backends/onnx/emitters.py",
    decorator="backends.onnx.core.emitter",
)
emitter = EMITTERS.register


class OnnxBuilder:
    """What an emitter sees: the graph being built and helpers that add ONNX nodes and constants.

    Every tensor it makes carries a numpy dtype, so emitters can insert casts where numpy would
    promote and ONNX would refuse mixed types.
    """

    def __init__(
        self, graph: gs.Graph, opset: int, taken: set[str], batch: BatchFlow | None = None
    ) -> None:
        self.graph = graph
        self.opset = opset
        # where the batch flows (backends/batch.py): shape constants that name the batch size
        # are written to follow it (Reshape 0 / -1, Expand 1)
        self.batch = batch if batch is not None else BatchFlow(None)
        self.prefix = ""  # name of the IR node being emitted; intermediate names start with it
        self.made: set[int] = set()  # ids of the tensors made for the current node
        self.memo: dict[Any, Any] = {}  # constants emitters derive once per model (see users)
        self._taken = taken

    def fresh(self, hint: str) -> str:
        """A tensor or node name not used anywhere in the model."""
        base = f"{self.prefix}/{hint}" if self.prefix else hint
        name, k = base, 0
        while name in self._taken:
            k += 1
            name = f"{base}_{k}"
        self._taken.add(name)
        return name

    def op(
        self,
        op_type: str,
        *inputs: Tensor | np.ndarray | None,
        dtype: Any = None,
        outputs: int = 1,
        **attrs: Any,
    ) -> Any:
        """Add one ONNX node; returns its output (or a list when ``outputs > 1``).

        ``None`` inputs are omitted optional inputs, numpy arrays become constants and the outputs
        have ``dtype`` (by default that of the first input).
        """
        args = list(inputs)
        while args and args[-1] is None:
            args.pop()
        args = [
            gs.Variable.empty() if a is None else self.const(a) if isinstance(a, np.ndarray) else a
            for a in args
        ]
        if dtype is None:
            dtype = next(a.dtype for a in args if a.name)
        hint = op_type.lower()
        outs = [gs.Variable(self.fresh(hint), dtype=np.dtype(dtype)) for _ in range(outputs)]
        self.made.update(id(t) for t in outs)
        self.graph.nodes.append(
            gs.Node(op_type, self.fresh(op_type), attrs=attrs, inputs=args, outputs=outs)
        )
        return outs[0] if outputs == 1 else outs

    def const(self, array: Any, hint: str = "const") -> gs.Constant:
        return gs.Constant(self.fresh(hint), np.ascontiguousarray(array))

    def ints(self, values: Sequence[int]) -> gs.Constant:
        """A 1-D int64 constant (shapes, axes, pads, starts...)."""
        return self.const(np.array([int(v) for v in values], dtype=np.int64), "ints")

    def scalar(self, value: Any, dtype: Any) -> gs.Constant:
        return self.const(np.array(value, dtype=dtype), "scalar")

    def cast(self, t: Tensor, dtype: Any) -> Tensor:
        """``t`` as ``dtype``: constants are converted now, variables by a Cast node."""
        dtype = np.dtype(dtype)
        if t.dtype == dtype:
            return t
        if isinstance(t, gs.Constant):
            return self.const(t.values.astype(dtype), "cast")
        return self.op("Cast", t, dtype=dtype, to=onnx.helper.np_dtype_to_tensor_dtype(dtype))

    def transpose(self, t: Tensor, perm: Sequence[int]) -> Tensor:
        if isinstance(t, gs.Constant):
            return self.const(np.transpose(t.values, perm), "transposed")
        return self.op("Transpose", t, perm=list(perm))

    def reshape(self, t: Tensor, shape: Sequence[int]) -> Tensor:
        if isinstance(t, gs.Constant):
            return self.const(t.values.reshape(shape), "reshaped")
        return self.op("Reshape", t, self.ints(shape))

    # -- the batch ---------------------------------------------------------------------------
    def dims(self, value: Value) -> list[int | str]:
        """``value``'s shape with its batch dim symbolic: ``batch`` (or ``batch*64`` where 64
        entries of the axis belong to each sample)."""
        shape: list[int | str] = list(value.shape)
        batch = self.batch.batch(value)
        if batch is not None:
            per_sample = batch[1] * batch[2]
            shape[batch[0]] = "batch" if per_sample == 1 else f"batch*{per_sample}"
        return shape

    def target_shape(self, source: Value, target: Value) -> list[int]:
        """The Reshape shape from ``source`` to ``target``: static, except the batch dim: 0
        (copied from the input) where it keeps its index and size, else -1."""
        shape = list(target.shape)
        out = self.batch.batch(target)
        if out is not None:
            into = self.batch.batch(source)
            same = into is not None and into[0] == out[0] and into[1] * into[2] == out[1] * out[2]
            shape[out[0]] = 0 if same else -1
        return shape

    def batch_size(self, t: Tensor, axis: int) -> Tensor:
        """A 1-D int64 tensor holding ``t``'s size along ``axis`` at run time."""
        return self.op("Shape", t, dtype=np.int64, start=axis, end=axis + 1)
