"""ONNX backend: emit an IR graph as an ONNX model (onnx-graphsurgeon), run it with onnxruntime.

    model = compile_onnx(graph)          # emit, check with onnx.checker, wrap
    (y,) = model.run(x)                  # onnxruntime, CPU, all graph optimizations
    model.save("model.onnx")             # atomic; external data only past protobuf's 2 GB

The per-op emitters are entries of :data:`EMITTERS` (``backends/onnx/core.py``), registered by
:mod:`backends.onnx.emitters` (float ops), :mod:`backends.onnx.quant` and
:mod:`backends.onnx.codebook`, which this module imports; it walks the graph, looks each node's
emitter up, names the values, checks the result and runs it.
"""

from __future__ import annotations

import functools
import os
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

# importing the emitter modules registers their entries in EMITTERS (this entry module is what
# imports them all, so the table is complete wherever emit_onnx can be called)
from backends.batch import BatchFlow, batch_flow
from backends.onnx.codebook import attach_functions
from backends.onnx.core import EMITTERS, OnnxBuilder
from backends.onnx.emitters import ACTIVATIONS
from backends.onnx.quant import INT4_OPSET, needs_int4, pack_int4
from compiler.errors import BackendError, InputError, OptionError, SlimgraphError
from compiler.ir.graph import Graph, Node, Value

__all__ = ["ACTIVATIONS", "DEFAULT_OPSET", "EMITTERS", "OnnxModel", "compile_onnx", "emit_onnx"]

# Opset 20 is the lowest in which every op we emit has its native form (Gelu arrived in 20), so the
# files load in the most runtimes; nothing we emit changes after it. Any opset from 18 (Reduce* take
# axes as inputs, LayerNormalization exists; gelu is composed from Erf/Tanh below 20) to 26 (the
# newest onnxruntime 1.31 loads; onnx 1.23's checker knows 28) can be asked for, and the tests pass
# at both ends.
DEFAULT_OPSET = 20
MIN_OPSET = 18
MAX_OPSET = 26
PROTOBUF_LIMIT = 2**31 - 2**20  # a ModelProto must serialize below 2 GiB; keep 1 MiB for the graph
# metadata_props key of a model that keeps its traced batch, with the reason (backends/batch.py)
STATIC_BATCH_KEY = "slimgraph.static_batch"


def emit_onnx(
    graph: Graph,
    *,
    opset: int | None = None,
    name: str | None = None,
    dynamic_batch: bool = True,
) -> onnx.ModelProto:
    """Translate ``graph`` into a checked ONNX model.

    Constants become initializers; graph inputs and outputs keep their names, shapes and dtypes
    (an output that is also an input, a constant or an earlier output is copied by an Identity
    node named ``<name>_out``, since an ONNX tensor has one name).

    The batch of the example inputs is an example: where the samples flow through the graph
    without mixing (``backends/batch.py``), axis 0 of every input and the batch axis of every
    output is the symbolic dim ``batch`` and shape constants follow it, so the file runs any
    batch. Where a node mixes them, the traced batch stays and the model's ``metadata_props``
    say why under ``slimgraph.static_batch`` (as does its ``doc_string``).

    Args:
        graph: the IR graph (static shapes).
        opset: ONNX opset, ``MIN_OPSET``..``MAX_OPSET``; by default ``DEFAULT_OPSET``, or 21 when
            the graph has 4-bit weights (stored as packed INT4, which opset 21 introduced).
        name: model graph name (default: the IR graph's name).
        dynamic_batch: False keeps the traced batch everywhere (for runtimes that want static
            shapes).

    Raises:
        BackendError: an op has no emitter, an emitter failed, or onnx.checker rejected the model.
    """
    if opset is None:
        opset = max(DEFAULT_OPSET, INT4_OPSET) if needs_int4(graph) else DEFAULT_OPSET
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise OptionError(
            f"ONNX opset {opset} is not supported",
            hint=f"pass opset between {MIN_OPSET} and {MAX_OPSET} (default {DEFAULT_OPSET})",
        )
    taken = {v.name for v in graph.values()} | {n.name for n in graph.nodes}
    out = gs.Graph(name=name or graph.name, opset=opset)
    static = BatchFlow(None, reason="emitted with dynamic_batch=False")
    flow = batch_flow(graph) if dynamic_batch else static
    builder = OnnxBuilder(out, opset, taken, flow)
    tensors: dict[int, gs.Tensor] = {}
    for value in graph.inputs:
        tensors[id(value)] = gs.Variable(value.name, np.dtype(value.dtype), builder.dims(value))
    out.inputs = [tensors[id(v)] for v in graph.inputs]
    for node in graph.nodes:
        _emit_node(builder, node, tensors)
    out.outputs = _graph_outputs(builder, graph, tensors)
    model = gs.export_onnx(out, do_type_check=True)
    pack_int4(model, builder.memo.get("int4", set()))
    attach_functions(model, builder.memo.get("functions", {}))
    # graphsurgeon writes a value_info (name and element type, no shape) for every intermediate
    # tensor; checker and runtimes infer those, and they were ~5 % of a compressed model's file
    kept = [v for v in model.graph.value_info if v.type.tensor_type.HasField("shape")]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)
    model.ir_version = max(  # model-local functions came with IR version 8
        onnx.helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True),
        8 if model.functions else 0,
    )
    model.producer_name = "slimgraph"
    if not flow.dynamic and graph.inputs:
        traced = graph.inputs[0].shape[0] if graph.inputs[0].shape else "it was traced with"
        why = f"runs only at batch {traced}: {flow.why_static()}"
        model.doc_string = f"slimgraph: {why}"
        onnx.helper.set_model_props(model, {STATIC_BATCH_KEY: why})
    _check(model)
    return model


def _tensor(value: Value | None, tensors: dict[int, gs.Tensor]) -> gs.Tensor | None:
    """The ONNX tensor of an IR value; constants become initializers on first use."""
    if value is None:
        return None
    if id(value) not in tensors:
        tensors[id(value)] = gs.Constant(value.name, np.ascontiguousarray(value.data))
    return tensors[id(value)]


def _emit_node(builder: OnnxBuilder, node: Node, tensors: dict[int, gs.Tensor]) -> None:
    builder.prefix, builder.made = node.name, set()
    try:
        emit = EMITTERS.lookup(node)  # a BackendError saying how to register one when none fits
        result = emit(builder, node, *[_tensor(v, tensors) for v in node.inputs])
    except SlimgraphError:
        raise
    except Exception as e:
        raise BackendError(
            f"ONNX emitter failed: {e}",
            node=node.name,
            op=node.op,
            source=node.source,
            hint="the node's attributes or input types may be outside what the emitter handles",
        ) from e
    results = list(result) if isinstance(result, (list, tuple)) else [result]
    for value, tensor in zip(node.outputs, results, strict=True):
        if id(tensor) not in builder.made:  # returned an input unchanged: give it its own name
            tensor = builder.op("Identity", tensor)
        tensor.name, tensor.dtype = value.name, np.dtype(value.dtype)
        tensor.shape = builder.dims(value)
        builder.made.discard(id(tensor))  # the same tensor for a second output gets a copy
        tensors[id(value)] = tensor


def _graph_outputs(builder: OnnxBuilder, graph: Graph, tensors: dict[int, gs.Tensor]) -> list:
    builder.prefix, builder.made = "", set()
    outputs, seen = [], {id(t) for t in builder.graph.inputs}
    for value in graph.outputs:
        tensor = _tensor(value, tensors)
        if isinstance(tensor, gs.Constant) or id(tensor) in seen:
            tensor = builder.op("Identity", tensor)
            tensor.name = builder.fresh(f"{value.name}_out")
            tensor.shape = builder.dims(value)
        seen.add(id(tensor))
        outputs.append(tensor)
    return outputs


def _initializer_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer)


def _check(model: onnx.ModelProto) -> None:
    """onnx.checker with full shape inference; from a file when the model is past 2 GB."""
    try:
        if _initializer_bytes(model) < PROTOBUF_LIMIT:
            onnx.checker.check_model(model, full_check=True)
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.onnx"
            _save_external(model, path)
            onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise BackendError(
            f"onnx.checker rejected the emitted model: {e}",
            hint="an emitter produced an invalid node; the node names in the message start "
            "with the IR node's name",
        ) from e


def _save_external(model: onnx.ModelProto, path: Path) -> None:
    """Save with the initializers in ``<name>.data`` beside ``path``; ``model`` is not changed."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save_model(
        copy,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=f"{path.name}.data",
        size_threshold=1024,
    )


def _write_bytes(data: bytes, path: Path) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class OnnxModel:
    """An emitted ONNX model and an onnxruntime session for it (made on the first run).

    Args:
        model: the ONNX model.
        threads: onnxruntime intra-op threads (None: onnxruntime's default, one per core).
    """

    def __init__(self, model: onnx.ModelProto, *, threads: int | None = None) -> None:
        self.model = model
        self.threads = threads
        self._tmp: tempfile.TemporaryDirectory | None = None

    @classmethod
    def load(cls, path: str | os.PathLike, *, threads: int | None = None) -> OnnxModel:
        """Read a model written by :meth:`save` (external data included)."""
        return cls(onnx.load(str(path)), threads=threads)

    @functools.cached_property
    def session(self):  # -> onnxruntime.InferenceSession
        import onnxruntime as ort  # an optional dependency: only running needs it

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = self.threads or 0
        options.log_severity_level = 3
        source: Any = self.model.SerializeToString() if self._fits() else self._spill()
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])

    def _fits(self) -> bool:
        return _initializer_bytes(self.model) < PROTOBUF_LIMIT

    def _spill(self) -> str:
        """Past 2 GB onnxruntime must read the model from a file with external data."""
        self._tmp = tempfile.TemporaryDirectory()
        path = Path(self._tmp.name) / "model.onnx"
        _save_external(self.model, path)
        return str(path)

    def run(self, *arrays: np.ndarray) -> list[np.ndarray]:
        """Run on one array per graph input (in order); returns the outputs as numpy arrays.

        Inputs are checked (count, shape, dtype; safe casts applied): a symbolic dim (the batch)
        takes any size, the same in every input that has it."""
        arrays = self.check_inputs(arrays)
        feeds = {i.name: a for i, a in zip(self.model.graph.input, arrays, strict=True)}
        return self.session.run(None, feeds)

    @functools.cached_property
    def _specs(self) -> list[tuple[str, list[int | str], np.dtype]]:
        """Each input's name, dims (a symbolic dim by its name) and dtype."""
        specs = []
        for spec in self.model.graph.input:
            tensor_type = spec.type.tensor_type
            # a dim without a value is symbolic (any size); unnamed ones get a name of their own
            dims = [
                d.dim_value if d.HasField("dim_value") else d.dim_param or f"?{k}"
                for k, d in enumerate(tensor_type.shape.dim)
            ]
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
            specs.append((spec.name, dims, np.dtype(dtype)))
        return specs

    def check_inputs(self, arrays) -> list[np.ndarray]:
        """``arrays`` checked against the model's inputs and cast where safe.

        Raises:
            InputError: a wrong count, shape or dtype; a batch other than the traced one for a
                model that keeps it (the message names the node that mixes the samples).
        """
        specs = self._specs
        if len(arrays) != len(specs):
            raise InputError(
                f"model '{self.model.graph.name}' takes {len(specs)} input(s), got {len(arrays)}",
                hint="pass one array per graph input, in order: "
                + ", ".join(f"{n}: {d}{dims}" for n, dims, d in specs),
            )
        sizes: dict[str, int] = {}
        out = []
        for (name, dims, dtype), array in zip(specs, arrays, strict=True):
            array = np.asarray(array)
            ok = array.ndim == len(dims)
            for d, n in zip(dims, array.shape):
                if isinstance(d, str):
                    ok = ok and sizes.setdefault(d, n) == n
                else:
                    ok = ok and d == n
            if not ok:
                raise self._shape_error(name, dims, array.shape)
            if array.dtype != dtype:
                if not np.can_cast(array.dtype, dtype, casting="same_kind"):
                    raise InputError(
                        f"input '{name}' expects dtype {dtype}, got {array.dtype}",
                        hint=f"convert it with .astype('{dtype}')",
                    )
                array = array.astype(dtype)
            out.append(array)
        return out

    def _shape_error(self, name: str, dims: list, shape: tuple) -> InputError:
        static = {p.key: p.value for p in self.model.metadata_props}.get(STATIC_BATCH_KEY)
        want = "(" + ", ".join(map(str, dims)) + ("," if len(dims) == 1 else "") + ")"
        if static and len(shape) == len(dims) and tuple(shape[1:]) == tuple(dims[1:]):
            return InputError(
                f"input '{name}' expects shape {want}, got {tuple(shape)}: the model {static}",
                hint=f"run batches of {dims[0]} (split or pad the input), or trace with "
                "example inputs of the batch you will run",
            )
        free = any(isinstance(d, str) for d in dims)
        return InputError(
            f"input '{name}' expects shape {want}{' (any batch)' if free else ''}, got "
            f"{tuple(shape)}",
            hint="compile again with example inputs of the shape you will run, or reshape the "
            "input",
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model to ``path`` atomically: staged in a temporary directory beside it, then
        renamed, so ``path`` is either the old file or the complete new one. A model past 2 GB
        keeps its initializers in ``<path>.data`` (written and renamed first)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
            staged = Path(tmp) / path.name
            if self._fits():
                _write_bytes(self.model.SerializeToString(), staged)
            else:
                _save_external(self.model, staged)
                data = Path(tmp) / f"{path.name}.data"
                if data.exists():  # tensors under 1 KiB stay inline; there may be none past it
                    os.replace(data, path.parent / data.name)
            os.replace(staged, path)
        return path


@dataclass(frozen=True)
class OnnxOptions:
    """Options of :func:`compile_onnx`."""

    opset: int | None = None  # DEFAULT_OPSET, or 21 for packed INT4 weights (emit_onnx)
    name: str | None = None
    threads: int | None = None
    dynamic_batch: bool = True  # a symbolic batch dim where the graph allows it (emit_onnx)


def compile_onnx(graph: Graph, **options: Any) -> OnnxModel:
    """Emit ``graph`` as ONNX and wrap it for running with onnxruntime.

    Args:
        graph: the IR graph.
        **options: ``opset`` (default :data:`DEFAULT_OPSET`), ``name`` (model graph name),
            ``threads`` (onnxruntime intra-op threads), ``dynamic_batch`` (default True: any
            batch where the graph allows it; see :func:`emit_onnx`).
    """
    valid = [f.name for f in fields(OnnxOptions)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise OptionError(
            f"unknown ONNX backend option(s) {unknown}", hint=f"valid options: {valid}"
        )
    opts = OnnxOptions(**options)
    model = emit_onnx(graph, opset=opts.opset, name=opts.name, dynamic_batch=opts.dynamic_batch)
    return OnnxModel(model, threads=opts.threads)
