"""ONNX emitters of the quantization ops: QuantizeLinear / DequantizeLinear (QDQ format).

Per-tensor and per-axis parameters map one to one. Blocked parameters (int4 weight groups) use
``block_size`` from opset 21; below it they are expanded: reshape to ``(..., groups, block, ...)``,
subtract the zero point and multiply by the scale, reshape back. ``bits=4`` adds a Clip to the
4-bit range after QuantizeLinear (ONNX's int8 saturates at [-128, 127]).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from backends.onnx.core import OnnxBuilder, Tensor, emitter
from compiler.ops.quant import quant_range

if TYPE_CHECKING:
    from compiler.ir.graph import Node


def _axis(node: Node) -> int:
    return node.attrs["axis"] % max(len(node.inputs[0].shape), 1)


def _float(b: OnnxBuilder, t: Tensor) -> Tensor:
    """``t`` as float32 by a Cast node (never by converting a constant: it must stay int8)."""
    return b.op("Cast", t, dtype=np.float32, to=onnx.TensorProto.FLOAT)


def _scalar(b: OnnxBuilder, t: Tensor | None, value) -> Tensor | None:
    """A 0-d parameter as a 0-d ONNX constant (the backend's initializers are at least 1-D, and
    ONNX Runtime's QDQ fusion of Add wants scalar scales and zero points)."""
    if t is None or value is None or value.shape != ():
        return t
    key = ("scalar", id(t))  # one per IR constant: a quantize and its dequantize share it
    if key not in b.memo:
        b.memo[key] = gs.Constant(b.fresh(t.name), np.asarray(t.values).reshape(()))
    return b.memo[key]


@emitter("quantize_linear")
def emit_quantize_linear(b: OnnxBuilder, node: Node, x, scale, zero_point=None) -> Tensor:
    scale, zero_point = _scalars(b, node, scale, zero_point)
    a = node.attrs
    dtype = np.dtype(node.outputs[0].dtype)
    lo, hi = quant_range(str(dtype), a["bits"])
    block, axis = a["block_size"], _axis(node)
    if block and b.opset < 21:  # composed: Round is half to even, like QuantizeLinear
        s = np.repeat(scale.values, block, axis=axis)
        q = b.op("Round", b.op("Div", b.cast(x, s.dtype), b.const(s, "scale")))
        if zero_point is not None:
            z = np.repeat(zero_point.values, block, axis=axis).astype(s.dtype)
            q = b.op("Add", q, b.const(z, "zero_point"))
        q = b.op("Clip", q, b.scalar(lo, s.dtype), b.scalar(hi, s.dtype))
        return b.op("Cast", q, dtype=dtype, to=onnx.helper.np_dtype_to_tensor_dtype(dtype))
    extra = {"block_size": block} if block else {}
    q = b.op(
        "QuantizeLinear", b.cast(x, scale.dtype), scale, zero_point, dtype=dtype, axis=axis, **extra
    )
    if a["bits"] < 8:
        q = b.op("Clip", q, b.scalar(lo, dtype), b.scalar(hi, dtype))
    return q


def _scalars(b: OnnxBuilder, node: Node, scale, zero_point):
    zp = node.inputs[2] if len(node.inputs) > 2 else None
    return _scalar(b, scale, node.inputs[1]), _scalar(b, zero_point, zp)


@emitter("dequantize_linear")
def emit_dequantize_linear(b: OnnxBuilder, node: Node, x, scale, zero_point=None) -> Tensor:
    scale, zero_point = _scalars(b, node, scale, zero_point)
    if (
        isinstance(zero_point, gs.Constant)
        and node.inputs[0].dtype in ("int8", "int32")
        and not np.any(zero_point.values)
    ):
        zero_point = None  # symmetric int8 weights, int32 biases: 0 is the default, not stored
    if node.attrs["bits"] == 4 and isinstance(zero_point, gs.Constant) and b.opset >= INT4_OPSET:
        b.memo.setdefault("int4", set()).add(zero_point.name)  # the zero point has x's type
    block, axis = node.attrs["block_size"], _axis(node)
    if node.attrs["bits"] == 4 and isinstance(x, gs.Constant) and b.opset >= INT4_OPSET:
        b.memo.setdefault("int4", set()).add(x.name)  # packed two per byte by pack_int4()
    if not block or b.opset >= 21:
        extra = {"block_size": block} if block else {}
        return b.op("DequantizeLinear", x, scale, zero_point, dtype=scale.dtype, axis=axis, **extra)
    shape = node.inputs[0].shape
    split = (*shape[:axis], shape[axis] // block, block, *shape[axis + 1 :])
    params = (*shape[:axis], shape[axis] // block, 1, *shape[axis + 1 :])
    q = _float(b, b.reshape(x, split))
    if zero_point is not None:
        q = b.op("Sub", q, b.const(zero_point.values.astype(np.float32).reshape(params)))
    y = b.op("Mul", b.cast(q, scale.dtype), b.const(scale.values.reshape(params), "scale"))
    return b.reshape(y, shape)


INT4_OPSET = 21  # INT4 / UINT4 tensors and DequantizeLinear of them arrived in opset 21


def needs_int4(graph) -> bool:
    """Whether ``graph`` has a 4-bit dequantize of a constant (worth opset 21: packed INT4)."""
    return any(
        n.attrs["bits"] == 4 and n.inputs[0].is_constant for n in graph.find("dequantize_linear")
    )


def pack_int4(model: onnx.ModelProto, names: set[str]) -> None:
    """Rewrite the int8/uint8 initializers ``names`` (values in the 4-bit range) as INT4/UINT4:
    two values per byte, the first in the low nibble, as ONNX stores them."""
    for tensor in model.graph.initializer:
        if tensor.name not in names:
            continue
        values = onnx.numpy_helper.to_array(tensor)
        signed = values.dtype == np.int8
        nibbles = (values.reshape(-1).astype(np.int16) & 0x0F).astype(np.uint8)
        if nibbles.size % 2:
            nibbles = np.append(nibbles, np.uint8(0))
        packed = nibbles[0::2] | (nibbles[1::2] << 4)
        tensor.ClearField("int32_data")
        tensor.data_type = onnx.TensorProto.INT4 if signed else onnx.TensorProto.UINT4
        tensor.raw_data = packed.tobytes()


def is_integer_kernel(op_type: str) -> bool:
    """Whether an ONNX Runtime kernel type computes in integers: QLinearConv, QLinearAdd and the
    other QLinear* kernels, QGemm, and the *Integer* ones (ConvInteger, MatMulInteger,
    MatMulIntegerToFloat: the int8 matmul ORT fuses for a quantized 3-D linear)."""
    return op_type.startswith("QLinear") or op_type == "QGemm" or "Integer" in op_type


def kernel_profile(
    model: onnx.ModelProto, inputs: list[np.ndarray], runs: int = 5, threads: int = 1
) -> dict[str, float]:
    """Microseconds per kernel type (``QLinearConv``, ``Conv``...) that ONNX Runtime spends in a
    run (the median of ``runs``), read from its profile: which kernels the optimized session
    really executes."""
    import bisect
    import json
    import os
    import tempfile

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        options.profile_file_prefix = os.path.join(tmp, "profile")
        session = ort.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        feeds = {i.name: a for i, a in zip(session.get_inputs(), inputs, strict=True)}
        for _ in range(runs):
            session.run(None, feeds)
        with open(session.end_profiling()) as f:
            events = json.load(f)
    runs_at = sorted(e["ts"] for e in events if e.get("name") == "model_run")
    per_run: dict[str, list[float]] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            op = e.get("args", {}).get("op_name", "?")
            k = max(bisect.bisect_right(runs_at, e["ts"]) - 1, 0)
            per_run.setdefault(op, [0.0] * max(len(runs_at), 1))[k] += float(e.get("dur", 0))
    # the median run of each kernel type: a preempted run on a shared machine does not count
    return {op: float(np.median(times)) for op, times in per_run.items()}
