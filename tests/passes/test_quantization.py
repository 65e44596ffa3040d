"""Post-training quantization: the quantize/dequantize reference, calibrators, the quantize pass
(golden IR, deviation bounds, int4, bias correction, skip patterns), ONNX Runtime's integer
kernels, compile(calibration_data=...) and its errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from backends.numba.backend import compile_numba
from backends.numba.kernels.common import CPU_FEATURES
from backends.onnx.backend import compile_onnx
from backends.onnx.quant import kernel_profile
from backends.torch.backend import compile_torch
from compiler.api import compile
from compiler.errors import InputError, OptionError
from compiler.ir.graph import Graph
from compiler.ir.interpreter import run
from compiler.ops.quant import dequantize_linear, quantize_linear
from compiler.pass_manager import PassManager, deviation
from passes.quantization.calibration import TensorStats, calibrate, run_calibration, uint8_params
from passes.quantization.quantize import Quantize, quantize_weight

RNG = np.random.default_rng(0)

# ONNX Runtime's uint8 x int8 kernels on x86 CPUs without VNNI (AVX-512 VNNI or AVX-VNNI) add
# pairs of products in 16 bits (vpmaddubsw), which saturates (2 x 255 x 127 > 32767): the reason
# for its quantizer's ``reduce_range``. There ORT differs from the exact integer reference by
# more than a requantization step: 0.020-0.027 of the output scale on the tiny net (an AMD Zen 3),
# and 0.0 with the same weights halved to 7 bits
# (test_onnx_runtime_is_exact_where_its_16_bit_pair_sums_cannot_saturate). Elsewhere it is
# within a step or two.
ORT_SATURATES = not ({"avx512vnni", "avxvnni"} & CPU_FEATURES)
ORT_INT8_BOUND = 0.05 if ORT_SATURATES else 0.01


def randn(*shape) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


class TinyNet(nn.Module):
    """conv-bn-relu, a residual block, global pooling and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        z = torch.relu(self.conv3(torch.relu(self.conv2(y))) + y)
        return self.fc(z.mean(dim=(2, 3)))


def tiny_graph() -> Graph:
    torch.manual_seed(0)
    model = TinyNet().eval()
    with torch.no_grad():
        model.bn1.running_mean.uniform_(-0.2, 0.2)
        model.bn1.running_var.uniform_(0.5, 2.0)
    return compile(model, torch.zeros(1, 3, 8, 8), passes=["fuse"], check=False).graph


@pytest.fixture(scope="module")
def tiny() -> Graph:
    return tiny_graph()


@pytest.fixture(scope="module")
def calib() -> np.ndarray:
    return np.random.default_rng(1).random((32, 3, 8, 8), dtype=np.float32)


def quantized(graph: Graph, calib: np.ndarray, **options) -> Graph:
    return compile(graph, passes=[Quantize(**options)], calibration_data=calib, check=False).graph


# -- the reference ops -------------------------------------------------------------------------


def test_quantize_rounds_half_to_even_and_saturates():
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, 200.0, -200.0], np.float32)
    q = quantize_linear(
        x, np.array(1.0, np.float32), np.array(0, np.int8), axis=1, block_size=0, bits=8
    )
    assert q.dtype == np.int8
    assert q.tolist() == [0, 2, 2, 0, -2, -2, 126, 127, -128]
    u = quantize_linear(
        x, np.array(0.5, np.float32), np.array(10, np.uint8), axis=1, block_size=0, bits=8
    )
    assert u.tolist() == [11, 13, 15, 9, 7, 5, 255, 255, 0]
    four = quantize_linear(
        x, np.array(1.0, np.float32), np.array(0, np.int8), axis=1, block_size=0, bits=4
    )
    assert four.tolist() == [0, 2, 2, 0, -2, -2, 7, 7, -8]


def test_dequantize_per_axis_and_per_block():
    q = np.array([[1, -2, 3, -4], [5, 6, -7, 8]], np.int8)
    per_axis = dequantize_linear(
        q, np.array([0.5, 2.0], np.float32), np.array([1, 0], np.int8), axis=0, block_size=0, bits=8
    )
    np.testing.assert_array_equal(per_axis, [[0, -1.5, 1, -2.5], [10, 12, -14, 16]])
    blocks = dequantize_linear(
        q, np.array([[1.0, 0.5], [2.0, 0.25]], np.float32), None, axis=1, block_size=2, bits=8
    )
    np.testing.assert_array_equal(blocks, [[1, -2, 1.5, -2], [10, 12, -1.75, 2]])


def test_dequantize_of_a_runtime_input_matches_in_every_backend():
    g = Graph("dq")
    q = g.add_input("q", (2, 3, 4), "uint8")
    s = g.constant(np.array([0.1, 0.2, 0.3], np.float32), "s")
    z = g.constant(np.array([0, 128, 255], np.uint8), "z")
    g.outputs = list(g.add_node("dequantize_linear", [q, s, z], {"axis": 1}).outputs)
    x = np.random.default_rng(2).integers(0, 256, (2, 3, 4)).astype(np.uint8)
    (want,) = run(g, [x])
    (onnx_out,) = compile_onnx(g).run(x)
    (numba_out,) = compile_numba(g).run(x)
    with torch.no_grad():
        torch_out = compile_torch(g)(torch.from_numpy(x)).numpy()
    for got in (onnx_out, numba_out, torch_out):
        np.testing.assert_allclose(got, want, rtol=1e-6)


# -- calibrators -------------------------------------------------------------------------------


def test_minmax_is_the_exact_range_and_uint8_params_represent_zero():
    x = np.random.default_rng(3).uniform(-1.0, 3.0, 10_000).astype(np.float32)
    stats = TensorStats(float(x.min()), float(x.max()), x)
    lo, hi = calibrate(stats, "minmax")
    assert (lo, hi) == (float(x.min()), float(x.max()))
    scale, zero = uint8_params(lo, hi)
    assert scale == pytest.approx((hi - lo) / 255)
    assert zero == round(-lo / scale)
    relu_scale, relu_zero = uint8_params(0.0, 6.0)
    assert relu_zero == 0 and relu_scale == pytest.approx(6 / 255)


def test_percentile_picks_the_percentiles_of_a_known_distribution():
    x = np.random.default_rng(4).uniform(0.0, 1.0, 200_000).astype(np.float32)
    lo, hi = calibrate(TensorStats(0.0, float(x.max()), x), "percentile", percentile=99.0)
    assert lo == 0.0 and hi == pytest.approx(0.99, abs=0.005)


@pytest.mark.parametrize("method", ["mse", "entropy", "percentile"])
def test_heavy_tails_are_clipped_inside_the_minmax_range(method):
    rng = np.random.default_rng(5)
    x = np.abs(rng.standard_t(3, 100_000)).astype(np.float32)  # a relu output, heavy tail
    stats = TensorStats(0.0, float(x.max()), x)
    lo, hi = calibrate(stats, method)
    assert lo == 0.0 and 0 < hi < 0.9 * stats.hi
    signed = rng.standard_t(3, 100_000).astype(np.float32)
    lo, hi = calibrate(TensorStats(float(signed.min()), float(signed.max()), signed), method)
    assert signed.min() < lo < 0 < hi < signed.max()


def test_mse_calibration_has_less_error_than_minmax_on_heavy_tails():
    x = np.random.default_rng(6).standard_t(3, 50_000).astype(np.float32)
    stats = TensorStats(float(x.min()), float(x.max()), x)

    def error(lo, hi):
        s, z = uint8_params(lo, hi)
        q = np.clip(np.rint(x / s) + float(z), 0, 255)
        return float(np.mean(((q - float(z)) * s - x) ** 2))

    assert error(*calibrate(stats, "mse")) < error(*calibrate(stats, "minmax"))


def test_calibration_on_a_rebatched_copy_matches_batch_by_batch(tiny, calib):
    values = [n.outputs[0] for n in tiny.nodes if n.op == "conv2d"]
    fast = run_calibration(tiny, [calib], values, batch_size=16)
    slow = run_calibration(tiny, [calib], values, batch_size=1)
    for v in values:
        assert fast[v.name].lo == pytest.approx(slow[v.name].lo, abs=1e-5)
        assert fast[v.name].hi == pytest.approx(slow[v.name].hi, rel=1e-5)


# -- weights -----------------------------------------------------------------------------------


def test_weights_are_symmetric_per_channel_and_per_group():
    w = randn(4, 8, 3, 3)
    q, s = quantize_weight(w, 8)
    assert q.dtype == np.int8 and s.shape == (4,)
    assert np.abs(q).max() == 127 and q.min() >= -127
    np.testing.assert_allclose(s, np.abs(w).reshape(4, -1).max(1) / 127, rtol=1e-6)
    err = np.abs(q * s[:, None, None, None] - w).max(axis=(1, 2, 3))
    assert np.all(err <= s / 2 + 1e-7)
    q4, s4 = quantize_weight(w, 4, group_size=2)
    assert s4.shape == (4, 4) and q4.min() >= -7 and q4.max() <= 7
    with pytest.raises(OptionError, match="3-bit"):
        quantize_weight(w, 3)


# -- the pass ----------------------------------------------------------------------------------

GOLDEN = """\
graph TinyNet(
    %x: float32[1,3,8,8],
) {
  $x.scale: float32[]
  $x.zero: uint8[]
  $conv1.weight.q: int8[8,3,3,3]
  $conv1.weight.scale: float32[8]
  $conv1.weight.zero: int8[8]
  $conv2d.bias.q: int32[8]
  $conv2d.bias.scale: float32[8]
  $conv2d.bias.zero: int32[8]
  $conv2d.scale: float32[]
  $conv2d.zero: uint8[]
  $conv2.weight.q: int8[8,8,3,3]
  $conv2.weight.scale: float32[8]
  $conv2.weight.zero: int8[8]
  $conv2d_1.bias.q: int32[8]
  $conv2d_1.bias.scale: float32[8]
  $conv2d_1.bias.zero: int32[8]
  $conv2d_1.scale: float32[]
  $conv2d_1.zero: uint8[]
  $conv3.weight.q: int8[8,8,3,3]
  $conv3.weight.scale: float32[8]
  $conv3.weight.zero: int8[8]
  $conv2d_2.bias.q: int32[8]
  $conv2d_2.bias.scale: float32[8]
  $conv2d_2.bias.zero: int32[8]
  $conv2d_2.scale: float32[]
  $conv2d_2.zero: uint8[]
  $relu_3.scale: float32[]
  $relu_3.zero: uint8[]
  $mean.scale: float32[]
  $mean.zero: uint8[]
  $fc.weight.q: int8[4,8]
  $fc.weight.scale: float32[4]
  $fc.weight.zero: int8[4]
  $linear.bias.q: int32[4]
  $linear.bias.scale: float32[4]
  $linear.bias.zero: int32[4]
  %x.q: uint8[1,3,8,8] = quantize_linear(%x, $x.scale, $x.zero) {axis=1, bits=8, block_size=0}
  %x.dq: float32[1,3,8,8] = dequantize_linear(%x.q, $x.scale, $x.zero) {axis=1, bits=8, block_size=0}
  %conv1.weight.dq: float32[8,3,3,3] = dequantize_linear($conv1.weight.q, $conv1.weight.scale, $conv1.weight.zero) {axis=0, bits=8, block_size=0}
  %conv2d.bias.dq: float32[8] = dequantize_linear($conv2d.bias.q, $conv2d.bias.scale, $conv2d.bias.zero) {axis=0, bits=8, block_size=0}
  %conv2d: float32[1,8,8,8] = conv2d(%x.dq, %conv1.weight.dq, %conv2d.bias.dq) {activation='relu', dilation=[1, 1], groups=1, padding=[1, 1], stride=[1, 1]}
  %conv2d.q: uint8[1,8,8,8] = quantize_linear(%conv2d, $conv2d.scale, $conv2d.zero) {axis=1, bits=8, block_size=0}
  %conv2d.dq: float32[1,8,8,8] = dequantize_linear(%conv2d.q, $conv2d.scale, $conv2d.zero) {axis=1, bits=8, block_size=0}
  %conv2.weight.dq: float32[8,8,3,3] = dequantize_linear($conv2.weight.q, $conv2.weight.scale, $conv2.weight.zero) {axis=0, bits=8, block_size=0}
  %conv2d_1.bias.dq: float32[8] = dequantize_linear($conv2d_1.bias.q, $conv2d_1.bias.scale, $conv2d_1.bias.zero) {axis=0, bits=8, block_size=0}
  %conv2d_1: float32[1,8,8,8] = conv2d(%conv2d.dq, %conv2.weight.dq, %conv2d_1.bias.dq) {activation='relu', dilation=[1, 1], groups=1, padding=[1, 1], stride=[1, 1]}
  %conv2d_1.q: uint8[1,8,8,8] = quantize_linear(%conv2d_1, $conv2d_1.scale, $conv2d_1.zero) {axis=1, bits=8, block_size=0}
  %conv2d_1.dq: float32[1,8,8,8] = dequantize_linear(%conv2d_1.q, $conv2d_1.scale, $conv2d_1.zero) {axis=1, bits=8, block_size=0}
  %conv3.weight.dq: float32[8,8,3,3] = dequantize_linear($conv3.weight.q, $conv3.weight.scale, $conv3.weight.zero) {axis=0, bits=8, block_size=0}
  %conv2d_2.bias.dq: float32[8] = dequantize_linear($conv2d_2.bias.q, $conv2d_2.bias.scale, $conv2d_2.bias.zero) {axis=0, bits=8, block_size=0}
  %conv2d_2: float32[1,8,8,8] = conv2d(%conv2d_1.dq, %conv3.weight.dq, %conv2d_2.bias.dq) {dilation=[1, 1], groups=1, padding=[1, 1], stride=[1, 1]}
  %conv2d_2.q: uint8[1,8,8,8] = quantize_linear(%conv2d_2, $conv2d_2.scale, $conv2d_2.zero) {axis=1, bits=8, block_size=0}
  %conv2d_2.dq: float32[1,8,8,8] = dequantize_linear(%conv2d_2.q, $conv2d_2.scale, $conv2d_2.zero) {axis=1, bits=8, block_size=0}
  %add_0: float32[1,8,8,8] = add(%conv2d_2.dq, %conv2d.dq)
  %relu_3: float32[1,8,8,8] = relu(%add_0)
  %relu_3.q: uint8[1,8,8,8] = quantize_linear(%relu_3, $relu_3.scale, $relu_3.zero) {axis=1, bits=8, block_size=0}
  %relu_3.dq: float32[1,8,8,8] = dequantize_linear(%relu_3.q, $relu_3.scale, $relu_3.zero) {axis=1, bits=8, block_size=0}
  %mean: float32[1,8] = mean(%relu_3.dq) {axes=[2, 3], keepdims=False}
  %mean.q: uint8[1,8] = quantize_linear(%mean, $mean.scale, $mean.zero) {axis=1, bits=8, block_size=0}
  %mean.dq: float32[1,8] = dequantize_linear(%mean.q, $mean.scale, $mean.zero) {axis=1, bits=8, block_size=0}
  %fc.weight.dq: float32[4,8] = dequantize_linear($fc.weight.q, $fc.weight.scale, $fc.weight.zero) {axis=0, bits=8, block_size=0}
  %linear.bias.dq: float32[4] = dequantize_linear($linear.bias.q, $linear.bias.scale, $linear.bias.zero) {axis=0, bits=8, block_size=0}
  %linear: float32[1,4] = linear(%mean.dq, %fc.weight.dq, %linear.bias.dq)
  return %linear
}"""


def test_golden_ir_of_a_quantized_residual_net(calib):
    # a fresh graph: fresh names come from a counter that every clone of the fixture advances
    assert str(quantized(tiny_graph(), calib)) == GOLDEN


def test_int8_deviation_is_bounded_and_every_backend_agrees(tiny, calib):
    q = quantized(tiny, calib)
    x = calib[:1]
    (want,) = run(tiny, [x])
    (sim,) = run(q, [x])
    assert deviation([want], [sim]) < 0.05  # int8: a few percent of the output scale
    (ort,) = compile_onnx(q).run(x)
    (nb,) = compile_numba(q).run(x)
    with torch.no_grad():
        tq = compile_torch(q)(torch.from_numpy(x)).numpy()
    # integer kernels requantize with their own rounding: within a step or two of the reference
    # (more where ORT's pair sums saturate, see ORT_INT8_BOUND); numba's and torch's are exact
    assert deviation([sim], [ort]) < ORT_INT8_BOUND
    assert deviation([sim], [nb]) < 1e-5 and deviation([sim], [tq]) < 1e-5


def test_onnx_runtime_is_exact_where_its_16_bit_pair_sums_cannot_saturate(tiny, calib):
    # weights halved to 7 bits (|q| <= 64): a pair of u8 x s8 products fits in 16 bits, so ORT's
    # integer kernels agree with the reference on every CPU; what ORT_INT8_BOUND allows beyond a
    # requantization step is that saturation alone
    q = quantized(tiny, calib)
    for node in q.find("dequantize_linear"):
        w = node.inputs[0]
        if w.is_constant and w.dtype == "int8":
            w.data = (w.data.astype(np.int16) // 2).astype(np.int8)
    x = calib[:1]
    (sim,) = run(q, [x])
    (ort,) = compile_onnx(q).run(x)
    assert deviation([sim], [ort]) < 0.01


def test_onnx_runtime_runs_the_convs_as_integer_kernels(tiny, calib):
    model = compile_onnx(quantized(tiny, calib)).model
    kernels = kernel_profile(model, [calib[:1]], runs=2)
    assert kernels.get("QLinearConv", 0) > 0 and kernels.get("QLinearAdd", 0) > 0
    assert "Conv" not in kernels and "Add" not in kernels
    assert kernels.get("QGemm", 0) > 0 or kernels.get("Gemm", 0) > 0
    fp32 = kernel_profile(compile_onnx(tiny).model, [calib[:1]], runs=2)
    assert "Conv" in fp32 and "QLinearConv" not in fp32


def test_weight_dequantize_survives_fold_constants(tiny, calib):
    q = quantized(tiny, calib)
    PassManager(passes=["fuse"]).run(q)
    weights = [n for n in q.find("dequantize_linear") if n.inputs[0].is_constant]
    assert len(weights) == 8  # 4 weights, 4 int32 biases
    assert {n.inputs[0].dtype for n in weights} == {"int8", "int32"}


def test_skip_patterns_leave_layers_in_float_and_say_so(tiny, calib):
    result = compile(tiny, passes=[Quantize(skip=("fc",))], calibration_data=calib)
    linear = result.graph.find("linear")[0]
    assert linear.inputs[1].is_constant and linear.inputs[1].dtype == "float32"
    assert "left in float: fc (skip pattern 'fc')" in str(result.report)
    assert result.graph.meta["quantization"]["float"] == [("fc", "skip pattern 'fc'")]


def test_int4_weights_per_group_run_everywhere(tiny, calib):
    q = quantized(tiny, calib, weight_bits=4, group_size=4)
    blocked = [n for n in q.find("dequantize_linear") if n.attrs["block_size"]]
    assert len(blocked) == 3  # conv2, conv3 and fc have 8 input channels: 2 groups of 4
    x = calib[:1]
    (sim,) = run(q, [x])
    (want,) = run(tiny, [x])
    assert deviation([want], [sim]) < 0.3
    (ort,) = compile_onnx(q).run(x)
    assert deviation([sim], [ort]) < 0.02


@pytest.mark.parametrize("group_size", [0, 4])
def test_int4_weights_are_stored_packed_two_per_byte(tiny, calib, group_size):
    import onnx

    q = quantized(tiny, calib, weight_bits=4, group_size=group_size)
    weights = [
        n
        for n in q.find("dequantize_linear")
        if n.inputs[0].is_constant and n.inputs[0].dtype == "int8"
    ]
    assert weights and all(n.attrs["bits"] == 4 for n in weights)
    model = compile_onnx(q)  # opset 21 chosen for INT4
    assert model.model.opset_import[0].version == 21
    stored = {t.name: t for t in model.model.graph.initializer}
    int4 = [t for t in stored.values() if t.data_type == onnx.TensorProto.INT4]
    assert len(int4) == len(weights)
    for n in weights:
        t = stored[n.inputs[0].name]
        assert t.data_type == onnx.TensorProto.INT4 and len(t.raw_data) == -(
            -n.inputs[0].numel // 2
        )
        np.testing.assert_array_equal(
            onnx.numpy_helper.to_array(t).astype(np.int8), n.inputs[0].data
        )
    x = calib[:1]
    (sim,) = run(q, [x])
    assert deviation([sim], model.run(x)) < 0.02
    # below opset 21 there is no INT4: the same weights are written as int8, one per byte
    old = compile_onnx(q, opset=20).model
    assert not any(t.data_type == onnx.TensorProto.INT4 for t in old.graph.initializer)
    assert old.ByteSize() > model.model.ByteSize()


def test_a_4_bit_dequantize_refuses_8_bit_values():
    g = Graph("g")
    s = g.constant(np.array([0.1, 0.2], np.float32), "w.scale")
    ok = g.constant(np.array([[-8, 7], [3, 0]], np.int8), "ok.q")
    g.add_node("dequantize_linear", [ok, s], {"axis": 0, "bits": 4})
    bad = g.constant(np.array([[-8, 7], [9, 0]], np.int8), "w.q")
    with pytest.raises(ValueError, match=r"4-bit dequantize holds values outside \[-8, 7\]"):
        g.add_node("dequantize_linear", [bad, s], {"axis": 0, "bits": 4})


def test_bias_correction_removes_the_mean_output_shift(tiny, calib):
    def mean_shift(graph):
        outs = [run(graph, [calib[i : i + 1]])[0] for i in range(16)]
        refs = [run(tiny, [calib[i : i + 1]])[0] for i in range(16)]
        return float(np.abs(np.mean(np.array(outs) - np.array(refs), axis=0)).mean())

    # nearest rounding: learned rounding refits the bias by least squares, subsuming this
    plain = mean_shift(quantized(tiny, calib, weight_bits=4, reconstruct=False))
    corrected = mean_shift(
        quantized(tiny, calib, weight_bits=4, bias_correction=True, reconstruct=False)
    )
    assert corrected < plain


# -- compile(calibration_data=...) and errors ----------------------------------------------------


def test_compile_hands_calibration_data_to_a_copy_of_the_pass(tiny, calib):
    mine = Quantize()
    result = compile(tiny, passes=[mine, "fuse"], calibration_data=list(calib[:4, None]))
    assert mine.calibration_data is None
    assert result.graph.find("quantize_linear")
    assert result.report.rows[1].name == "quantize" and not result.report.rows[1].exact


def test_passes_with_their_own_calibration_data_keep_it(tiny, calib):
    from compiler.api import _with_calibration

    own = Quantize(calibration_data=calib[:2])
    (kept,) = _with_calibration([own], [calib])
    assert kept is own
    (filled,) = _with_calibration([Quantize()], [calib])
    assert filled.calibration_data[0] is calib and dataclasses.is_dataclass(filled)


@pytest.mark.parametrize(
    "data, message",
    [
        ([], "empty"),
        (np.zeros((0, 3, 8, 8), np.float32), "empty"),
        ([np.zeros((1, 3, 9, 8), np.float32)], "shape"),
        ([np.zeros((3, 8, 8), np.float32)], "shape"),
        ([np.zeros((1, 3, 8, 8), np.complex64)], "dtype"),
        (42, "iterable"),
    ],
)
def test_bad_calibration_data_is_an_input_error(tiny, data, message):
    with pytest.raises(InputError, match=message):
        compile(tiny, passes=[Quantize()], calibration_data=data)


def test_quantize_without_calibration_data_says_how_to_give_it(tiny):
    with pytest.raises(OptionError, match="calibration data"):
        compile(tiny, passes=[Quantize()])


@pytest.mark.parametrize(
    "options, message",
    [
        ({"weight_bits": 3}, "weight_bits=3"),
        ({"weight_bits": 16}, "weight_bits=16"),
        ({"layer_bits": {"conv*": 2}}, "layer_bits"),
        ({"calibrator": "magic"}, "calibrator"),
        ({"group_size": 4}, "group_size"),
    ],
)
def test_unsupported_options_are_option_errors(options, message):
    with pytest.raises(OptionError, match=message):
        Quantize(**options)


# -- cross-layer equalization ------------------------------------------------------------------


class Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc1 = nn.Linear(8, 6)
        self.fc2 = nn.Linear(6, 4)

    def forward(self, x):
        y = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc2(torch.relu(self.fc1(y.mean(dim=(2, 3)))))


def imbalanced_chain() -> Graph:
    """conv->relu->conv and linear->relu->linear whose first layers' channel ranges span 1e4
    (scaled in, and compensated in the next layer, so the function is unchanged)."""
    torch.manual_seed(1)
    model = Chain().eval()
    with torch.no_grad():
        k = torch.logspace(-2, 2, 8)
        model.conv1.weight.mul_(k[:, None, None, None])
        model.conv1.bias.mul_(k)
        model.conv2.weight.div_(k[None, :, None, None])
        j = torch.logspace(-2, 2, 6)
        model.fc1.weight.mul_(j[:, None])
        model.fc1.bias.mul_(j)
        model.fc2.weight.div_(j[None, :])
    return compile(model, torch.zeros(1, 3, 8, 8), passes=["fuse"], check=False).graph


def test_equalization_is_exact_and_balances_the_channel_ranges():
    from passes.quantization.equalization import channel_range_spread

    graph = imbalanced_chain()
    x = randn(1, 3, 8, 8)
    result = compile(graph, x, passes=["equalize-cross-layer"], tolerance=1e-4)
    assert deviation(run(graph, [x]), run(result.graph, [x])) <= 1e-4
    for op in ("conv2d", "linear"):
        before, after = graph.find(op)[0].inputs[1].data, result.graph.find(op)[0].inputs[1].data
        assert channel_range_spread(before) > 1000
        assert channel_range_spread(after) < channel_range_spread(before) / 30
    # the rewrite only changes constants: the IR text is the same but for their names
    strip = lambda g: str(g).replace("_eq", "")  # noqa: E731
    assert strip(result.graph) == strip(graph)


def test_equalization_makes_int8_closer_on_an_imbalanced_net(calib):
    graph = imbalanced_chain()
    x = calib[:4]
    ref = [run(graph, [x[i : i + 1]])[0] for i in range(4)]
    plain = quantized(graph, calib)
    equalized = compile(
        graph, passes=["equalize-cross-layer", Quantize()], calibration_data=calib, check=False
    ).graph
    dev = [
        deviation(ref, [run(g, [x[i : i + 1]])[0] for i in range(4)]) for g in (plain, equalized)
    ]
    assert dev[1] < dev[0]


# -- mixed precision ---------------------------------------------------------------------------


def test_allocation_is_the_knapsack_optimum():
    from passes.quantization.quantize import allocate

    sizes = [100, 100, 1000]
    errors = [[0.1, 5.0, 0.0], [0.1, 0.2, 0.0], [0.01, 0.02, 0.0]]  # choices 8, 4, float
    # 6 bits per weight on average: only the big layer can go to 4 bits
    assert allocate(sizes, errors, (8, 4, None), average_bits=6) == [0, 0, 1]
    assert allocate(sizes, errors, (8, 4, None), average_bits=32) == [2, 2, 2]
    # the smallest model whose summed error is within 0.25
    assert allocate(sizes, errors, (8, 4, None), max_error=0.25) == [0, 0, 1]
    assert allocate(sizes, errors, (8, 4, None), max_error=10.0) == [1, 1, 1]


def test_mixed_precision_meets_its_budget_with_sensitive_layers_kept_wide(tiny, calib):
    from passes.quantization.quantize import QuantizeMixed, layer_sensitivity

    layers = [n for n in tiny.nodes if n.op in ("conv2d", "linear")]
    errors = layer_sensitivity(tiny, layers, [calib[:16]], (8, 4, None), 0)
    assert all(e8 < e4 and e_float == 0.0 for e8, e4, e_float in errors)
    result = compile(
        tiny, passes=[QuantizeMixed(average_bits=6)], calibration_data=calib, check=False
    ).graph
    meta = result.meta["mixed_precision"]
    assert meta["average_bits"] <= 6
    assert set(meta["bits"].values()) <= {8, 4, None} and 4 in meta["bits"].values()
    x = calib[:1]
    assert deviation(run(tiny, [x]), run(result, [x])) < 0.3
    assert compile_onnx(result).run(x)[0].shape == (1, 4)


def test_mixed_precision_options_are_checked():
    from passes.quantization.quantize import QuantizeMixed

    with pytest.raises(OptionError, match="exactly one"):
        QuantizeMixed()
    with pytest.raises(OptionError, match="below the smallest"):
        QuantizeMixed(average_bits=2)
    with pytest.raises(OptionError, match="choices"):
        QuantizeMixed(average_bits=6, choices=(8, 2))


def test_zoo_check_quantizes_and_runs_in_integer_kernels(tiny, calib):
    from benchmarks.harness.zoo import check_quantization

    r = check_quantization(tiny, calib[:1])
    assert r["quantized"] and r["layers"] == 4 and r["float"] == 0, r
    # the time share is load-dependent (reported, not asserted); the kernel types are not
    assert "QLinearConv" in r["kernels"] and "Conv" not in r["kernels"], r["kernels"]
    assert r["deviation"] < 0.1


def test_cli_quantizes_with_a_calibration_file(tmp_path, monkeypatch, capsys):
    from compiler.cli import main

    module = tmp_path / "qmodel.py"
    module.write_text(
        "from torch import nn\n"
        "def net():\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(),\n"
        "                         nn.Linear(4 * 6 * 6, 2)).eval()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).random((4, 3, 8, 8), np.float32))
    argv = [
        "compress",
        "qmodel:net",
        "--passes",
        "fuse,quantize",
        "--input-shape",
        "1,3,8,8",
        "--out",
        str(tmp_path),
    ]
    assert main([*argv, "--calibration", str(tmp_path / "calib.npy")]) == 0
    assert "quantize: 2 layer(s) quantized" in capsys.readouterr().out
    assert (tmp_path / "net.onnx").exists()
    assert main([*argv, "--calibration", str(tmp_path / "missing.npy")]) == 2
    assert "cannot read calibration data" in capsys.readouterr().err


# -- numba integer kernels ---------------------------------------------------------------------


def test_numba_runs_quantized_convs_and_linears_in_integer_kernels(tiny, calib, tmp_path):
    from backends.numba.backend import load_numba

    q = quantized(tiny, calib)
    model = compile_numba(q)
    assert model.source.count("KQ.conv2d_u8s8(") == 3 and model.source.count("KQ.linear_u8s8(") == 1
    assert model.source.count("KQ.add_u8(") == 1 and "K.unary(" not in model.source
    assert not any(
        a.dtype == np.float32 and a.ndim == 4 for a in model.weights.values() if a.size > 1
    ), "float copies of the int8 conv weights are not kept"
    x = calib[:2]
    for i in range(2):
        (sim,) = run(q, [x[i : i + 1]])
        (got,) = model.run(x[i : i + 1])
        assert deviation([sim], [got]) < 1e-3  # requantization rounding may flip one step
    saved = load_numba(model.save(tmp_path / "int8_tiny"))
    np.testing.assert_array_equal(saved.run(x[:1])[0], model.run(x[:1])[0])


def test_numba_integer_conv_matches_the_reference_with_padding_stride_and_zero_points():
    from backends.numba.kernels.int8 import RELU, conv2d_u8s8, pack_weight
    from compiler.ops.nn import conv2d

    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (2, 5, 9, 7)).astype(np.uint8)
    w = rng.integers(-127, 128, (19, 5, 3, 2)).astype(np.int8)
    scale = rng.random(19).astype(np.float32) * 1e-3
    bias = rng.standard_normal(19).astype(np.float32)
    packed, wsum, k4, o16 = pack_weight(w)
    want = conv2d(
        x.astype(np.float64) - 9,
        w.astype(np.float64),
        None,
        None,
        stride=(2, 1),
        padding=(1, 2),
        dilation=(1, 2),
        groups=1,
        activation=None,
        activation_attrs=None,
    )
    want = np.maximum(want * scale[None, :, None, None] + bias[None, :, None, None], 0)
    got = np.empty(want.shape, np.float32)
    none_f, none_q = np.empty((0,) * 4, np.float32), np.empty((0,) * 4, np.uint8)
    conv2d_u8s8(
        x,
        9,
        packed,
        wsum,
        k4,
        o16,
        19,
        3,
        2,
        2,
        1,
        1,
        2,
        1,
        2,
        scale,
        bias,
        none_f,
        RELU,
        0.0,
        0.0,
        np.float32(1),
        np.float32(0),
        False,
        got,
        none_q,
    )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_calibration_falls_back_to_batch_by_batch_when_a_reshape_cannot_follow(calib):
    from passes.quantization.calibration import rebatched

    g = Graph("windows")  # (1, 2, 4) -> (2, 4): the leading dim is not the batch
    x = g.add_input("x", (1, 2, 4))
    node = g.add_node("reshape", [x], {"shape": (2, 4)})
    g.outputs = list(g.add_node("relu", node.outputs).outputs)
    assert rebatched(g, 8) is None
    data = np.random.default_rng(0).standard_normal((6, 2, 4)).astype(np.float32)
    stats = run_calibration(g, [data], [node.outputs[0]], batch_size=4)
    assert stats[node.outputs[0].name].hi == pytest.approx(float(data.max()))


# -- share, then quantize ------------------------------------------------------------------------


def test_quantize_after_sharing_keeps_the_indices_and_runs_in_integer_kernels(tiny, calib):
    from passes.weight_sharing import ShareWeights

    shared = compile(
        tiny, passes=[ShareWeights(bits=3, groups=2, min_weights=0)], check=False
    ).graph
    lookups = shared.find("codebook_lookup")
    assert len(lookups) == 4
    q = quantized(shared, calib)
    assert len(q.meta["quantization"]["layers"]) == 4 and not q.meta["quantization"]["float"]
    new = q.find("codebook_lookup")
    # the same packed indices, now behind int8 centroids (G, K); no dense int8 weight is stored
    assert [n.inputs[1].data.tobytes() for n in new] == [
        n.inputs[1].data.tobytes() for n in lookups
    ]
    assert {n.inputs[0].dtype for n in new} == {"int8"}
    for old, n in zip(lookups, new, strict=True):
        assert n.inputs[0].shape == old.inputs[0].shape
        dq = n.outputs[0].users[0]
        assert dq.op == "dequantize_linear" and dq.attrs["axis"] == 0
        # one scale per codebook group: the channels of a group share it
        scale = dq.inputs[1].data.reshape(2, -1)
        assert np.all(scale == scale[:, :1])
    dense_sizes = {n.outputs[0].numel for n in lookups}
    assert not [v for v in q.constants() if v.dtype == "int8" and v.numel in dense_sizes]
    x = calib[:1]
    (want,) = run(shared, [x])
    (sim,) = run(q, [x])
    assert 0 < deviation([want], [sim]) < 0.05
    model = compile_onnx(q)
    (ort,) = model.run(x)
    assert deviation([sim], [ort]) < ORT_INT8_BOUND
    kernels = kernel_profile(model.model, [x], runs=2)
    assert kernels.get("QLinearConv", 0) > 0 and "Conv" not in kernels
    numba_model = compile_numba(q)
    assert numba_model.source.count("KQ.conv2d_u8s8(") == 3
    assert "K.codebook_decode" not in numba_model.source  # decoded once, at compile time
    (nb,) = numba_model.run(x)
    with torch.no_grad():
        tq = compile_torch(q)(torch.from_numpy(x)).numpy()
    assert deviation([sim], [nb]) < 1e-3 and deviation([sim], [tq]) < 1e-5


def test_a_bias_large_next_to_tiny_activations_fits_int32_by_coarser_weights():
    # inception_v3 with random weights: activations decay to 5e-7 before the head, whose bias
    # (0.02) is the whole logit; at s_x * s_w = 4e-13 the int32 bias saturated at 8e-4 (a
    # deviation of 0.96). The weight scale is raised until the bias fits instead.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Flatten(), nn.Linear(8 * 4 * 4, 6)).eval()
    with torch.no_grad():
        model[0].weight.mul_(1e-6)
        model[0].bias.zero_()
    graph = compile(model, torch.zeros(1, 3, 4, 4), passes=["fuse"], check=False).graph
    data = np.random.default_rng(2).standard_normal((8, 3, 4, 4)).astype(np.float32)
    q = quantized(graph, data)
    assert len(q.meta["quantization"]["layers"]) == 2
    bias_q = next(v for v in q.constants() if v.name.endswith(".bias.q") and v.numel == 6)
    assert np.abs(bias_q.data.astype(np.int64)).max() <= 2**30
    x = data[:1]
    (want,) = run(graph, [x])
    (sim,) = run(q, [x])
    assert deviation([want], [sim]) < 0.01
    (ort,) = compile_onnx(q).run(x)
    assert deviation([sim], [ort]) < 1e-3


def test_integer_kernel_types_include_the_int8_matmuls():
    from backends.onnx.quant import is_integer_kernel

    for op in ("QLinearConv", "QLinearAdd", "QGemm", "MatMulIntegerToFloat", "ConvInteger"):
        assert is_integer_kernel(op), op
    for op in ("Conv", "MatMul", "Gemm", "DequantizeLinear", "QuantizeLinear"):
        assert not is_integer_kernel(op), op


# -- learned rounding (AdaRound on the reconstruction engine) ------------------------------------


def test_learned_rounding_lowers_the_output_error_of_4_bit_weights(tiny, calib):
    x = np.random.default_rng(5).random((8, 3, 8, 8), dtype=np.float32)  # held out
    want = [run(tiny, [x[i : i + 1]])[0] for i in range(8)]

    def error(graph):
        return deviation(want, [run(graph, [x[i : i + 1]])[0] for i in range(8)])

    nearest = quantized(tiny, calib, weight_bits=4, reconstruct=False)
    learned = quantized(tiny, calib, weight_bits=4)
    assert "reconstruction" not in nearest.meta["quantization"]
    info = learned.meta["quantization"]["reconstruction"]
    assert info["method"] == "adaround" and info["layers"] == 4 and info["samples"] == 32
    assert info["deviation_after"] < info["deviation_before"]
    assert any("AdaRound" in n for n in learned.meta["notes"])
    assert error(learned) < 0.8 * error(nearest)
    # the structure is the same; only integer values (and int32 biases) change, on the grid
    assert str(learned).splitlines()[1:] == str(nearest).splitlines()[1:]
    for a, b in zip(nearest.constants(), learned.constants()):
        if a.name.endswith(".q") and a.dtype == np.int8:
            assert np.abs(b.data.astype(int)).max() <= 7  # still 4-bit values
            assert np.abs(b.data.astype(int) - a.data.astype(int)).max() <= 1  # down or up


def test_learned_rounding_on_grouped_int4_runs_in_every_backend(tiny, calib):
    q = quantized(tiny, calib, weight_bits=4, group_size=4)
    assert q.meta["quantization"]["reconstruction"]["layers"] >= 2
    x = calib[:1]
    (sim,) = run(q, [x])
    (nb,) = compile_numba(q).run(x)
    with torch.no_grad():
        tq = compile_torch(q)(torch.from_numpy(x)).numpy()
    assert deviation([sim], [nb]) < 1e-5 and deviation([sim], [tq]) < 1e-5
    (ort,) = compile_onnx(q).run(x)
    assert deviation([sim], [ort]) < 0.02  # as without learned rounding


def test_learned_rounding_never_worsens_a_layer(tiny, calib):
    learned = quantized(tiny, calib, rounding_iterations=1)
    info = learned.meta["quantization"]["reconstruction"]
    assert info["deviation_after"] <= info["deviation_before"] * (1 + 1e-6)
    with pytest.raises(OptionError, match="rounding_iterations"):
        Quantize(rounding_iterations=0)
