"""Post-training quantization: the ``quantize`` pass (calibrated int8 QDQ, int4 weights, bias
correction, per-layer bits) and ``quantize-mixed`` (bits chosen per layer under a size budget).

The quantized IR is explicit QDQ, the form ONNX Runtime fuses into integer kernels::

    %x_q = quantize_linear(%x, $s_x, $z_x)                    uint8, per tensor (calibrated)
    %x_dq = dequantize_linear(%x_q, $s_x, $z_x)
    %w_dq = dequantize_linear($w.q, $w.scale, $w.zero) {axis=0}   int8, per output channel
    %b_dq = dequantize_linear($b.q, $b.scale, $b.zero) {axis=0}   int32, scale s_x * s_w
    %y = conv2d(%x_dq, %w_dq, %b_dq) {activation='relu'}
    %y_q = quantize_linear(%y, $s_y, $z_y) ...

Run it after ``fuse``. Residual adds and activations other than relu/clip fused into a conv are
split off again, because an integer conv ends in a requantization: ``conv2d(x, w, b, r)
{activation='relu'}`` becomes ``relu(add(conv2d(x, w, b), r))`` with the conv's and the relu's
outputs quantized (ONNX Runtime then runs QLinearConv and QLinearAdd; the relu folds into the
quantization of a range starting at 0).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from compiler.analysis import allocate as shared
from compiler.analysis.reconstruct import reconstruct as refit_layers
from compiler.errors import OptionError
from compiler.ir.graph import Graph, Node, Value
from compiler.ir.inputs import calibration_inputs
from compiler.pass_manager import Pass, pass_context, register_pass
from passes.quantization.calibration import CALIBRATORS, calibrate, run_calibration, uint8_params
from passes.quantization.rounding import BIAS_LIMIT, AdaRoundSolver

LAYERS = ("conv2d", "linear")
#: activations a quantized output absorbs: with a range starting at 0 they only clip
CLIPPING = ("relu", "clip")
WEIGHT_BITS = (4, 8)


# -- weights -----------------------------------------------------------------------------------


def quantize_weight(
    w: np.ndarray,
    bits: int,
    group_size: int = 0,
    clip: str = "max",
    min_scale: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel (or per group of ``group_size`` input channels) quantization.

    Returns ``(q, scale)``: ``q`` int8 of ``w``'s shape in ``[-(2**(bits-1) - 1), 2**(bits-1) -
    1]``; ``scale`` float32 ``(O,)``, or ``(O, I / group_size)`` for groups. ``clip="mse"`` shrinks
    each scale to the one with the least squared error (worth it at 4 bits). ``min_scale`` (per
    output channel) is a floor on the scales (see ``_min_weight_scale``).
    """
    if bits not in WEIGHT_BITS:
        raise OptionError(f"{bits}-bit weights are not supported", hint=f"use {WEIGHT_BITS}")
    qmax = 2 ** (bits - 1) - 1
    o = w.shape[0]
    rows = w.astype(np.float64).reshape(o, -1)
    if group_size:
        per_input = rows.shape[1] // w.shape[1]
        rows = rows.reshape(o, w.shape[1] // group_size, group_size * per_input)
    amax = np.abs(rows).max(axis=-1)
    scale = np.where(amax > 0, amax / qmax, 1.0)
    if clip == "mse":
        best, best_err = scale, np.full(scale.shape, np.inf)
        for ratio in np.linspace(0.5, 1.0, 26):
            s = scale * ratio
            q = np.clip(np.rint(rows / s[..., None]), -qmax, qmax)
            err = ((q * s[..., None] - rows) ** 2).sum(axis=-1)
            better = err < best_err
            best, best_err = np.where(better, s, best), np.where(better, err, best_err)
        scale = best
    if min_scale is not None:
        floor = np.asarray(min_scale, np.float64).reshape((o,) + (1,) * (scale.ndim - 1))
        scale = np.maximum(scale, floor)
    q = np.clip(np.rint(rows / scale[..., None]), -qmax, qmax).astype(np.int8)
    return q.reshape(w.shape), scale.astype(np.float32)


# -- the pass ----------------------------------------------------------------------------------


@register_pass
@dataclass
class Quantize(Pass):
    """Quantize conv2d / linear layers and residual adds to QDQ form, calibrated on data (lossy).

    ``conv2d(x, $w, $b) -> conv2d(dq(q(x)), dq($w_int8), dq($b_int32))`` with ``q``/``dq`` the
    quantize_linear/dequantize_linear pair; outputs (after a fused relu/clip) are quantized too.
    Activations are uint8 affine per tensor with a range from ``calibrator``; weights are int8
    symmetric per output channel (``weight_bits=4``: int4 held in int8, per channel or per group
    of ``group_size`` input channels). Graph outputs stay float unless ``quantize_outputs``.

    Attributes:
        weight_bits: 8 or 4.
        group_size: with 4-bit weights, input channels per scale (0: one scale per channel).
        calibrator: minmax, percentile, mse or entropy (see passes/quantization/calibration.py).
        percentile: for the percentile calibrator.
        skip: fnmatch patterns of node names or module paths to leave in float (listed in the
            report).
        layer_bits: pattern -> 8, 4 or None (float) per layer; overrides ``weight_bits``.
        bias_correction: add ``E[W x] - E[W_q x]`` (over the calibration data) to each bias.
        quantize_outputs: also quantize graph outputs (ONNX Runtime then runs the last layer in
            integers too).
        calibration_data: one array per graph input (N rows each) or a single array; compile()
            fills it from its ``calibration_data``.
        calibration_batch: rows per interpreter run during calibration.
        seed: seeds the sampling of activations that the histogram calibrators keep.
        reconstruct: after quantizing, choose each weight's rounding (down or up) so that the
            layer's output on the calibration data matches the float model's (AdaRound, layer by
            layer, each layer seeing the quantized graph's activations; see
            passes/quantization/rounding.py); the bias takes its least-squares value. None
            (default): on, since quantize always has calibration data; False: nearest rounding.
        rounding_iterations: optimisation steps per layer (fewer for very large layers).
        progress: show a progress bar while reconstructing.
    """

    name = "quantize"
    exact = False
    weight_bits: int = 8
    group_size: int = 0
    calibrator: str = "minmax"
    percentile: float = 99.99
    skip: tuple[str, ...] = ()
    layer_bits: dict[str, int | None] | None = field(default=None, repr=False)
    bias_correction: bool = False
    quantize_outputs: bool = False
    calibration_data: Any = field(default=None, repr=False)
    calibration_batch: int = 64
    seed: int = 0
    reconstruct: bool | None = None
    rounding_iterations: int = 1000
    progress: bool = False

    def __post_init__(self) -> None:
        if self.rounding_iterations < 1:
            raise OptionError(
                f"quantize: rounding_iterations={self.rounding_iterations} must be >= 1",
                hint="e.g. 1000 (or reconstruct=False for nearest rounding)",
            )
        if self.weight_bits not in WEIGHT_BITS:
            raise OptionError(
                f"quantize: weight_bits={self.weight_bits} is not supported",
                hint=f"use one of {WEIGHT_BITS} (activations are uint8)",
            )
        for pattern, bits in (self.layer_bits or {}).items():
            if bits is not None and bits not in WEIGHT_BITS:
                raise OptionError(
                    f"quantize: layer_bits[{pattern!r}] = {bits} is not supported",
                    hint=f"use one of {WEIGHT_BITS} or None (float)",
                )
        if self.calibrator not in CALIBRATORS:
            raise OptionError(
                f"quantize: unknown calibrator {self.calibrator!r}", hint=f"use {CALIBRATORS}"
            )
        if self.group_size < 0 or (self.group_size and self.weight_bits == 8):
            raise OptionError(
                f"quantize: group_size={self.group_size} needs weight_bits=4",
                hint="groups of input channels are for int4 weights; use group_size=0 for int8",
            )
        if not 50 < self.percentile <= 100:
            raise OptionError(f"quantize: percentile {self.percentile} is outside (50, 100]")

    # -- planning ------------------------------------------------------------------------------
    def _bits(self, node: Node) -> tuple[int | None, str]:
        """(weight bits or None for float, reason) of one conv/linear."""
        names = [node.name] + ([node.source] if node.source else [])
        for pattern in self.skip:
            if any(fnmatch.fnmatchcase(n, pattern) for n in names):
                return None, f"skip pattern {pattern!r}"
        w = node.inputs[1]
        if (not w.is_constant or np.dtype(w.dtype).kind != "f") and shared_weight(w) is None:
            return None, "its weight is neither a float constant nor a shared (codebook) weight"
        if node.op == "linear" and len(node.inputs[0].shape) < 2:
            return None, "a 1-D linear input"
        for pattern, bits in (self.layer_bits or {}).items():
            if any(fnmatch.fnmatchcase(n, pattern) for n in names):
                return bits, "layer_bits" if bits is None else ""
        return self.weight_bits, ""

    def missing_data(self) -> str | None:
        if self.calibration_data is None:
            return f"{self.name} needs calibration data (example inputs to measure ranges on)"
        return None

    def run(self, graph: Graph) -> bool:
        data = calibration_arrays(graph, self.calibration_data, "quantize")
        plan: dict[int, int] = {}
        left_float: list[tuple[str, str]] = []
        for node in [n for n in graph.nodes if n.op in LAYERS]:
            bits, reason = self._bits(node)
            if bits is None:
                left_float.append((node.source or node.name, reason))
            else:
                plan[id(node)] = bits
        layers = [n for n in graph.nodes if id(n) in plan]
        if not layers:
            _record(graph, [], left_float, {})
            return False
        original = graph.clone() if self.reconstruct is not False else None
        floats = {n.name: n.inputs[1].data for n in layers if n.inputs[1].is_constant}
        adds = [_split_epilogue(graph, n) for n in layers]
        adds += [n for n in graph.nodes if n.op == "add" and _is_activation_add(n, adds)]
        adds = [a for a in dict.fromkeys(adds) if a is not None]
        activations = self._activations(graph, layers, adds)
        means = [n.inputs[0] for n in layers] if self.bias_correction else []
        input_names = [n.inputs[0].name for n in layers]
        stats = run_calibration(
            graph,
            data,
            activations + [v for v in means if v not in activations],
            batch_size=self.calibration_batch,
            seed=self.seed,
            means=means,
        )
        ranges = {
            v.name: calibrate(stats[v.name], self.calibrator, self.percentile) for v in activations
        }
        for value in activations:
            _insert_qdq(graph, value, *uint8_params(*ranges[value.name]))
        for node, x_name in zip(layers, input_names, strict=True):
            mean = stats[x_name].mean if self.bias_correction else None
            _quantize_layer(graph, node, plan[id(node)], self.group_size, mean)
        _record(graph, layers, left_float, {n.name: plan[id(n)] for n in layers})
        if original is not None:
            self._reconstruct(original, graph, data, floats)
        return True

    def _reconstruct(self, original: Graph, graph: Graph, data, floats: dict) -> None:
        """Learned rounding of every quantized layer on the calibration data."""
        solver = AdaRoundSolver(weights=floats, iterations=self.rounding_iterations)
        result = refit_layers(
            original,
            graph,
            data,
            [name for name in floats if name in {n.name for n in graph.nodes}],
            solver=solver,
            progress=self.progress or pass_context().progress,
        )
        graph.meta["quantization"]["reconstruction"] = {"method": "adaround", **result.summary()}
        note = result.note(
            f"quantize: learned rounding (AdaRound) of {len(result.layers)} layer(s)"
        )
        graph.meta["notes"] = [*graph.meta.get("notes", ()), note]

    def _activations(self, graph: Graph, layers: list[Node], adds: list[Node]) -> list[Value]:
        """Float values to quantize: layer inputs, add operands, and their outputs (after an
        absorbed relu/clip); graph outputs only with ``quantize_outputs``."""
        wanted: dict[int, Value] = {}
        for node in layers:
            wanted.setdefault(id(node.inputs[0]), node.inputs[0])
            out = _absorbing_output(graph, node.outputs[0])
            wanted.setdefault(id(out), out)
        for add in adds:
            for v in add.inputs:
                wanted.setdefault(id(v), v)
            out = _absorbing_output(graph, add.outputs[0])
            wanted.setdefault(id(out), out)
        outputs = {id(v) for v in graph.outputs}
        return [
            v
            for v in wanted.values()
            if not v.is_constant
            and np.dtype(v.dtype).kind == "f"
            and (self.quantize_outputs or id(v) not in outputs)
        ]


def _record(graph: Graph, layers, left_float, bits) -> None:
    graph.meta["quantization"] = {
        "layers": [n.source or n.name for n in layers],
        "bits": bits,
        "float": left_float,
    }
    notes = [f"quantize: {len(layers)} layer(s) quantized"]
    notes += [f"quantize: left in float: {name} ({why})" for name, why in left_float]
    graph.meta["notes"] = [*graph.meta.get("notes", ()), *notes]


# -- rewrites ----------------------------------------------------------------------------------


def _split_epilogue(graph: Graph, node: Node) -> Node | None:
    """Split a residual add and a non-clipping activation off a conv/linear so its output can be
    requantized: ``conv2d(x, w, b, r) {act} -> act(add(conv2d(x, w, b), r))``. Returns the add
    (or None). A relu/clip without a residual stays fused: the output quantization absorbs it."""
    residual = node.inputs[3] if len(node.inputs) > 3 else None
    act, act_attrs = node.attrs.get("activation"), node.attrs.get("activation_attrs")
    if residual is None and (act is None or act in CLIPPING):
        return None
    out = node.outputs[0]
    readers = list(out.uses)
    is_output = [i for i, v in enumerate(graph.outputs) if v is out]
    node.set_inputs(list(node.inputs[:3]))
    node.attrs["activation"] = node.attrs["activation_attrs"] = None
    meta = {"source": node.source} if node.source else {}
    last, add = node, None
    if residual is not None:
        add = graph.add_node("add", [out, residual], after=last, meta=meta)
        last = add
    if act is not None:
        last = graph.add_node(act, [last.outputs[0]], act_attrs or {}, after=last, meta=meta)
    for reader, index in readers:
        reader.set_input(index, last.outputs[0])
    for i in is_output:
        graph.outputs[i] = last.outputs[0]
    return add


def _is_activation_add(node: Node, known: list) -> bool:
    """A standalone add of two float activations of the same shape (a residual not fused)."""
    a, b = node.inputs
    return (
        node not in known
        and not a.is_constant
        and not b.is_constant
        and a.shape == b.shape
        and np.dtype(a.dtype).kind == "f"
    )


def _absorbing_output(graph: Graph, value: Value) -> Value:
    """The value to quantize for an op's output: after a sole relu reader (which the output
    quantization absorbs: ONNX Runtime drops Relu before a Q with zero point 0)."""
    users = value.users
    is_output = any(v is value for v in graph.outputs)
    if len(value.uses) == 1 and not is_output and users[0].op == "relu":
        return users[0].outputs[0]
    return value


def _insert_qdq(graph: Graph, value: Value, scale: np.float32, zero: np.uint8) -> Node:
    """``v -> dq(q(v))`` for every reader of ``v`` (and graph outputs that are ``v``)."""
    readers = list(value.uses)
    where = {"after": value.producer} if value.producer else {"before": graph.nodes[0]}
    s = graph.constant(np.array(scale, np.float32), f"{value.name}.scale")
    z = graph.constant(np.array(zero, np.uint8), f"{value.name}.zero")
    q = graph.add_node("quantize_linear", [value, s, z], name=f"{value.name}.q", **where)
    dq = graph.add_node("dequantize_linear", [q.outputs[0], s, z], name=f"{value.name}.dq", after=q)
    for reader, index in readers:
        reader.set_input(index, dq.outputs[0])
    graph.outputs = [dq.outputs[0] if v is value else v for v in graph.outputs]
    return dq


def _input_scale(node: Node) -> float | None:
    """The per-tensor scale of a layer's input when it is a dequantize_linear output."""
    x = node.inputs[0]
    if x.producer is None or x.producer.op != "dequantize_linear":
        return None
    s = x.producer.inputs[1]
    return float(s.data) if s.is_constant and s.numel == 1 else None


def shared_weight(value: Value) -> Node | None:
    """The ``codebook_lookup`` of a float codebook and indices (constants) producing ``value``."""
    p = value.producer
    if p is None or p.op != "codebook_lookup":
        return None
    codebook, indices = p.inputs
    if not (codebook.is_constant and indices.is_constant) or np.dtype(codebook.dtype).kind != "f":
        return None
    return p


def _quantize_codebook(
    graph: Graph,
    lookup: Node,
    bits: int,
    clip: str,
    meta: dict,
    min_scale: np.ndarray | None = None,
):
    """Quantize a shared weight without decoding it: each codebook group gets a symmetric scale
    (chosen on the decoded weights, so each centroid counts as often as it is used) and int8
    centroids; the indices are kept. Returns ``(int8 weight value, per-output-channel scale,
    dequantized weight as float64, the float weight)``."""
    from compiler.ops.table import get_op

    codebook, indices = lookup.inputs
    shape = tuple(lookup.attrs["shape"])
    (dense,) = get_op("codebook_lookup").run([codebook.data, indices.data], lookup.attrs)
    groups, o = codebook.shape[0], shape[0]
    rows = groups if o % groups == 0 else 1  # whole output channels per group, else one scale
    floor = None if min_scale is None else np.asarray(min_scale).reshape(rows, -1).max(axis=1)
    _, group_scale = quantize_weight(dense.reshape(rows, -1), bits, 0, clip, floor)
    qmax = 2 ** (bits - 1) - 1
    cb_scale = np.repeat(group_scale, groups // rows)[:, None]
    q_codebook = np.clip(np.rint(codebook.data / cb_scale), -qmax, qmax).astype(np.int8)
    channel_scale = np.repeat(group_scale, o // rows).astype(np.float32)
    name = codebook.name.removesuffix(".codebook")
    weight = graph.add_node(
        "codebook_lookup",
        [graph.constant(q_codebook, f"{name}.codebook.q"), indices],
        dict(lookup.attrs),
        name=f"{name}.lookup.q",
        after=lookup,
        meta=meta,
    ).outputs[0]
    (q_weight,) = get_op("codebook_lookup").run([q_codebook, indices.data], lookup.attrs)
    deq = q_weight.astype(np.float64).reshape(o, -1) * channel_scale.astype(np.float64)[:, None]
    return weight, channel_scale, deq.reshape(shape), dense


def _quantize_layer(
    graph: Graph, node: Node, bits: int, group_size: int, input_mean: np.ndarray | None
) -> None:
    w = node.inputs[1]
    b = node.inputs[2] if len(node.inputs) > 2 else None
    meta = {"source": node.source} if node.source else {}
    lookup = None if w.is_constant else shared_weight(w)
    clip = "mse" if bits < 8 else "max"
    s_x = _input_scale(node)
    bias = None if b is None else b.data.astype(np.float64)
    groups = group_size if lookup is None and bits == 4 and _groupable(node, group_size) else 0
    floor = None if groups else _min_weight_scale(bias, s_x)
    if lookup is not None:  # shared: int8 centroids, same indices, per-channel scales
        q_value, scale, wq_float, dense = _quantize_codebook(graph, lookup, bits, clip, meta, floor)
    else:
        q, scale = quantize_weight(w.data, bits, groups, clip=clip, min_scale=floor)
        wq_float = _dequantized(q, scale, groups)
        dense = w.data
    if input_mean is not None:
        shift = _output_mean(node, input_mean, dense.astype(np.float64) - wq_float)
        bias = shift if bias is None else bias + shift
    if lookup is not None:
        dq = graph.add_node(
            "dequantize_linear",
            [
                q_value,
                graph.constant(scale, f"{w.name}.scale"),
                graph.constant(np.zeros(scale.shape, np.int8), f"{w.name}.zero"),
            ],
            {"axis": 0, "bits": bits},
            name=f"{w.name}.dq",
            before=node,
            meta=meta,
        )
    elif groups:
        flat = q.reshape(q.shape[0], -1)
        block = flat.shape[1] // scale.shape[1]
        dq = graph.add_node(
            "dequantize_linear",
            [
                graph.constant(flat, f"{w.name}.q"),
                graph.constant(scale, f"{w.name}.scale"),
                graph.constant(np.zeros(scale.shape, np.int8), f"{w.name}.zero"),
            ],
            {"axis": 1, "block_size": block, "bits": bits},
            name=f"{w.name}.dq",
            before=node,
            meta=meta,
        )
        dq = graph.add_node(
            "reshape",
            [dq.outputs[0]],
            {"shape": w.shape},
            name=f"{w.name}.reshape",
            before=node,
            meta=meta,
        )
    else:
        dq = graph.add_node(
            "dequantize_linear",
            [
                graph.constant(q, f"{w.name}.q"),
                graph.constant(scale, f"{w.name}.scale"),
                graph.constant(np.zeros(scale.shape, np.int8), f"{w.name}.zero"),
            ],
            {"axis": 0, "bits": bits},
            name=f"{w.name}.dq",
            before=node,
            meta=meta,
        )
    node.set_input(1, dq.outputs[0])
    if lookup is not None and not lookup.outputs[0].uses:
        graph.erase_node(lookup)  # the float codebook goes with it
    if bias is not None:
        if s_x is not None and not groups:  # int32 with scale s_x * s_w: what QLinearConv takes
            bs = (np.float32(s_x) * scale).astype(np.float32)
            bq = np.clip(np.rint(bias / bs), -(2**31), 2**31 - 1).astype(np.int32)
            bdq = graph.add_node(
                "dequantize_linear",
                [
                    graph.constant(bq, f"{node.name}.bias.q"),
                    graph.constant(bs, f"{node.name}.bias.scale"),
                    graph.constant(np.zeros(bs.shape, np.int32), f"{node.name}.bias.zero"),
                ],
                {"axis": 0},
                name=f"{node.name}.bias.dq",
                before=node,
                meta=meta,
            )
            node.set_input(2, bdq.outputs[0])
        else:
            node.set_input(2, graph.constant(bias.astype(w.dtype), f"{node.name}.bias"))
    node.meta["quantized"] = {"weight_bits": bits, "group_size": groups}


def _min_weight_scale(bias: np.ndarray | None, s_x: float | None) -> np.ndarray | None:
    """Per-output-channel floor on the weight scale so that the int32 bias (scale ``s_x * s_w``)
    fits in ``BIAS_LIMIT``: a bias large next to ``x * w`` (a random net whose activations decay
    to 1e-7 under a linear whose bias is 0.02) would otherwise saturate, silently. Coarser
    weights cost little there: the bias dominates the output. None when no floor is needed."""
    if bias is None or s_x is None or s_x <= 0:
        return None
    floor = np.abs(bias) / (np.float64(s_x) * BIAS_LIMIT)
    return floor if np.any(floor > 0) else None


def _groupable(node: Node, group_size: int) -> bool:
    channels = node.inputs[1].shape[1]
    return group_size > 0 and channels % group_size == 0 and channels > group_size


def _dequantized(q: np.ndarray, scale: np.ndarray, groups: int) -> np.ndarray:
    rows = q.reshape(q.shape[0], scale.shape[1] if groups else 1, -1).astype(np.float64)
    s = scale.reshape(q.shape[0], -1, 1).astype(np.float64)
    return (rows * s).reshape(q.shape)


def _output_mean(node: Node, x_mean: np.ndarray, dw: np.ndarray) -> np.ndarray:
    """Per-output-channel mean of ``layer(x, dw)`` over the calibration data, from the mean
    input (exact: the layer is linear in x)."""
    from compiler.ops.table import get_op

    attrs = {**node.attrs, "activation": None, "activation_attrs": None}
    x = x_mean[None].astype(np.float64)
    (y,) = get_op(node.op).run([x, dw, None, None], attrs)
    axes = tuple(i for i in range(y.ndim) if i != (1 if node.op == "conv2d" else y.ndim - 1))
    return y.mean(axis=axes)


# -- calibration data --------------------------------------------------------------------------


def calibration_arrays(graph: Graph, data: Any, who: str) -> list[np.ndarray]:
    """Calibration data as one array per graph input, N rows each (checked, see compiler.api)."""
    if data is None:
        raise OptionError(
            f"{who} needs calibration data",
            hint="pass compile(..., calibration_data=[x1, x2, ...]) or the pass's "
            "calibration_data=",
        )
    return calibration_inputs(graph, data)


# -- mixed precision ---------------------------------------------------------------------------


@register_pass
@dataclass
class QuantizeMixed(Quantize):
    """Quantize with bits chosen per layer from ``choices`` (8, 4 or float) under a budget (lossy).

    ``conv2d(x, $w) -> conv2d(dq(q(x)), dq($w_b))`` with ``b`` per layer: each layer's sensitivity
    ``e[l, b]`` is the relative mean squared change of the logits on calibration data when only
    its weights are quantized to ``b`` bits; assuming the errors add up, a knapsack (Fei et al.'s
    bit-width assignment, 2022; compiler/analysis/allocate.py) minimises
    ``sum e[l, b_l]`` subject to ``sum n_l b_l <= average_bits * sum n_l`` (``n_l`` weights in
    layer ``l``, float counting 32 bits), or with ``max_error`` the smallest model whose summed
    sensitivity stays within it. Then it quantizes like ``quantize``, with those ``layer_bits``.

    Attributes:
        average_bits: size budget, mean bits per weight of the quantizable layers.
        max_error: accuracy budget, the largest summed sensitivity allowed.
        choices: the bits a layer may get (None: float).
        sensitivity_samples: calibration rows the sensitivities are measured on.
    """

    name = "quantize-mixed"
    average_bits: float | None = None
    max_error: float | None = None
    choices: tuple[int | None, ...] = (8, 4, None)
    sensitivity_samples: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.average_bits is None) == (self.max_error is None):
            raise OptionError(
                "quantize-mixed needs exactly one of average_bits= or max_error=",
                hint="e.g. quantize-mixed(average_bits=6)",
            )
        bad = [c for c in self.choices if c is not None and c not in WEIGHT_BITS]
        if bad or not self.choices:
            raise OptionError(
                f"quantize-mixed: unsupported choices {bad or self.choices}",
                hint=f"choose among {WEIGHT_BITS} and None (float)",
            )
        low = min(32 if c is None else c for c in self.choices)
        if self.average_bits is not None and self.average_bits < low:
            raise OptionError(
                f"quantize-mixed: average_bits={self.average_bits} is below the smallest choice "
                f"({low} bits)",
                hint="raise average_bits or add a smaller choice",
            )

    def run(self, graph: Graph) -> bool:
        data = calibration_arrays(graph, self.calibration_data, "quantize-mixed")
        base = Quantize(**{f: getattr(self, f) for f in Quantize.__dataclass_fields__})
        layers = [n for n in graph.nodes if n.op in LAYERS and base._bits(n)[0] is not None]
        if not layers:
            return base.run(graph)
        rows = [a[: max(self.sensitivity_samples, graph.inputs[0].shape[0])] for a in data]
        errors = layer_sensitivity(graph, layers, rows, self.choices, self.group_size)
        sizes = [n.inputs[1].numel for n in layers]
        pick = allocate(
            sizes, errors, self.choices, average_bits=self.average_bits, max_error=self.max_error
        )
        chosen = {n.name: self.choices[k] for n, k in zip(layers, pick, strict=True)}
        base.layer_bits = {**chosen, **(self.layer_bits or {})}
        changed = base.run(graph)
        bits = [32 if b is None else b for b in chosen.values()]
        graph.meta["mixed_precision"] = {
            "bits": chosen,
            "average_bits": float(np.dot(bits, sizes) / sum(sizes)),
            "predicted_error": float(sum(errors[i][k] for i, k in enumerate(pick))),
        }
        return changed


def layer_sensitivity(
    graph: Graph, layers: list[Node], rows: list[np.ndarray], choices, group_size: int
) -> list[list[float]]:
    """``e[l][k]``: relative MSE of the outputs when only layer ``l``'s weights take
    ``choices[k]`` bits (0 for float), measured with the torch backend on ``rows``."""
    import torch

    module = pass_context().require_torch_module("layer sensitivity")(graph)
    attr = dict(zip([v.name for v in graph.constants()], module._const_attrs, strict=True))
    inputs = [torch.from_numpy(np.ascontiguousarray(a)) for a in rows]

    def outputs():
        with torch.no_grad():
            out = module(*inputs)
        return out if isinstance(out, tuple) else (out,)

    reference = outputs()
    power = sum(float((r.double() ** 2).mean()) for r in reference) or 1.0
    errors = []
    for node in layers:
        w = node.inputs[1]
        param = getattr(module, attr[w.name])
        original = param.data.clone()
        row = []
        for bits in choices:
            if bits is None:
                row.append(0.0)
                continue
            groups = group_size if bits == 4 and _groupable(node, group_size) else 0
            q, scale = quantize_weight(w.data, bits, groups, clip="mse" if bits < 8 else "max")
            param.data = torch.from_numpy(_dequantized(q, scale, groups).astype(w.dtype))
            err = sum(
                float(((o.double() - r.double()) ** 2).mean())
                for o, r in zip(outputs(), reference, strict=True)
            )
            row.append(err / power)
        param.data = original
        errors.append(row)
    return errors


def allocate(
    sizes: list[int],
    errors: list[list[float]],
    choices,
    *,
    average_bits: float | None = None,
    max_error: float | None = None,
    steps: int = 400_000,
) -> list[int]:
    """The index of each layer's choice minimising the summed error within ``average_bits`` per
    weight, or the smallest size whose summed error is within ``max_error``: a knapsack by the
    shared allocator (:func:`compiler.analysis.allocate.allocate`), exact while the sizes' gcd
    needs at most ``steps`` units of the size axis.

    With ``max_error`` below every assignment's error, the least-error assignment (the smallest
    of those) is returned.
    """
    bits = [32 if c is None else c for c in choices]
    layers = [
        [shared.Option(n * b, e) for b, e in zip(bits, row, strict=True)]
        for n, row in zip(sizes, errors, strict=True)
    ]
    if average_bits is not None:
        try:
            return list(shared.allocate(layers, average_bits * sum(sizes), steps=steps).picks)
        except shared.BudgetError as e:
            raise OptionError(
                f"quantize-mixed: no assignment fits average_bits={average_bits}",
                hint=f"use average_bits >= {e.least / sum(sizes):.3g} or add a smaller choice",
            ) from None
    try:
        return list(shared.allocate(layers, max_error=max_error, steps=steps).picks)
    except shared.BudgetError as e:  # unreachable: the most accurate model, as before
        return list(shared.allocate(layers, max_error=e.least, steps=steps).picks)
