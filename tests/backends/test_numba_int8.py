"""The numba backend's integer kernels: depthwise and grouped conv2d against the reference conv on
dequantized inputs (strides, padding, dilation, zero points, relu/clip, residual,
requantization), the threaded paths of every int8 kernel against their one-thread results, and
a quantized depthwise network end to end against the reference interpreter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from backends.numba.backend import compile_numba
from backends.numba.kernels.int8 import (
    CLIP,
    NONE,
    RELU,
    conv2d_grouped_u8s8,
    conv2d_u8s8,
    linear_u8s8,
    pack_grouped_weight,
    pack_weight,
)
from compiler.api import compile
from compiler.ir.interpreter import run
from compiler.ops.nn import conv2d, conv_out_size
from compiler.pass_manager import deviation
from passes.quantization.quantize import Quantize

f32 = np.float32


def layer_case(rng, xshape, wshape):
    """uint8 input, int8 weight, per-channel scales of a realistic size, a float bias."""
    x = rng.integers(0, 256, xshape).astype(np.uint8)
    w = rng.integers(-127, 128, wshape).astype(np.int8)
    scale = (rng.random(wshape[0]) * 2e-3 + 1e-4).astype(f32)
    bias = rng.standard_normal(wshape[0]).astype(f32)
    return x, w, scale, bias


def reference(x, zx, w, scale, bias, res, act, requant, **geometry):
    """conv2d of the zero-point-shifted integers (exact in float64), then the kernels' epilogue
    in float32: ``act(acc * scale + bias + res)``, requantized to uint8 when ``requant``."""
    acc = conv2d(
        x.astype(np.float64) - zx,
        w.astype(np.float64),
        None,
        None,
        activation=None,
        activation_attrs=None,
        **geometry,
    ).astype(np.int64)
    v = acc.astype(f32) * scale[None, :, None, None] + bias[None, :, None, None]
    if res is not None:
        v = v + res
    if act == RELU:
        v = np.maximum(v, f32(0))
    elif act == CLIP:
        v = np.clip(v, f32(0), f32(6))
    if requant is None:
        return v
    sy, zy = requant
    return np.clip(np.rint(v / sy) + zy, 0, 255).astype(np.uint8)


def assert_close(got, want):
    """Float outputs to float32 rounding; uint8 outputs to one quantization step, rarely."""
    if want.dtype == np.uint8:
        diff = np.abs(got.astype(np.int32) - want.astype(np.int32))
        assert diff.max() <= 1 and np.mean(diff != 0) < 1e-3, (diff.max(), np.mean(diff != 0))
    else:
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def run_grouped(
    x, zx, w, scale, bias, res, act, requant, groups, stride, padding, dilation, nthreads=1
):
    n, o = x.shape[0], w.shape[0]
    out = [
        conv_out_size(x.shape[2 + i], w.shape[2 + i], stride[i], padding[i], dilation[i])
        for i in range(2)
    ]
    taps, wsum = pack_grouped_weight(w)
    none_f, none_q = np.empty((0,) * 4, f32), np.empty((0,) * 4, np.uint8)
    out_f = none_f if requant else np.empty((n, o, *out), f32)
    out_q = np.empty((n, o, *out), np.uint8) if requant else none_q
    sy, zy = requant or (1.0, 0.0)
    conv2d_grouped_u8s8(
        x,
        zx,
        taps,
        wsum,
        groups,
        *w.shape[2:],
        *stride,
        *padding,
        *dilation,
        scale,
        bias,
        none_f if res is None else res,
        act,
        0.0,
        6.0,
        f32(sy),
        f32(zy),
        requant is not None,
        out_f,
        out_q,
        nthreads,
    )
    return out_q if requant else out_f


GROUPED_CASES = [
    # (x shape, weight shape, groups, stride, padding, dilation, zx, act, residual, requant)
    ((1, 6, 9, 11), (6, 1, 3, 3), 6, (1, 1), (1, 1), (1, 1), 0, RELU, False, None),
    ((2, 6, 12, 13), (6, 1, 3, 3), 6, (2, 2), (1, 1), (1, 1), 7, CLIP, False, (0.05, 0.0)),
    ((1, 4, 15, 14), (8, 1, 5, 5), 4, (1, 1), (2, 2), (2, 2), 128, NONE, True, None),
    ((2, 8, 11, 10), (12, 2, 3, 2), 4, (2, 1), (1, 0), (1, 2), 255, RELU, True, (0.04, 3.0)),
    ((1, 5, 13, 16), (5, 1, 1, 4), 5, (3, 2), (0, 2), (1, 1), 31, CLIP, True, (0.03, 10.0)),
    ((1, 3, 7, 7), (6, 1, 7, 7), 3, (1, 1), (3, 3), (1, 1), 9, NONE, False, (0.5, 128.0)),
]


@pytest.mark.parametrize("case", GROUPED_CASES, ids=[f"case{i}" for i in range(len(GROUPED_CASES))])
def test_grouped_conv_matches_the_reference(case):
    xshape, wshape, groups, stride, padding, dilation, zx, act, with_res, requant = case
    rng = np.random.default_rng(len(xshape) + wshape[0] + zx)
    x, w, scale, bias = layer_case(rng, xshape, wshape)
    geometry = {"stride": stride, "padding": padding, "dilation": dilation, "groups": groups}
    out_shape = reference(x, zx, w, scale, bias, None, act, None, **geometry).shape
    res = rng.standard_normal(out_shape).astype(f32) if with_res else None
    want = reference(x, zx, w, scale, bias, res, act, requant, **geometry)
    got = run_grouped(x, zx, w, scale, bias, res, act, requant, groups, stride, padding, dilation)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert_close(got, want)


def test_grouped_conv_without_bias_and_with_a_zero_point_padding_matches():
    """Padding with the zero point is what makes a border pixel's sum exact."""
    rng = np.random.default_rng(5)
    x, w, scale, _ = layer_case(rng, (1, 4, 5, 5), (4, 1, 3, 3))
    x[:] = 200  # every input is the zero point: the output is exactly act(0)
    got = run_grouped(
        x, 200, w, scale, np.empty(0, f32), None, NONE, None, 4, (1, 1), (1, 1), (1, 1)
    )
    np.testing.assert_array_equal(got, np.zeros_like(got))


# -- threads -----------------------------------------------------------------------------------
# Large enough layers that each kernel splits its work (PAR_MACS_*); the threaded result must be
# exactly the one-thread result (the same integer sums and epilogue per output), and right.


def test_threaded_grouped_conv_is_the_one_thread_result():
    rng = np.random.default_rng(11)
    x, w, scale, bias = layer_case(rng, (2, 64, 48, 48), (64, 1, 3, 3))
    geometry = {"stride": (1, 1), "padding": (1, 1), "dilation": (1, 1), "groups": 64}
    requant = (0.05, 0.0)
    one = run_grouped(x, 3, w, scale, bias, None, CLIP, requant, 64, (1, 1), (1, 1), (1, 1), 1)
    two = run_grouped(x, 3, w, scale, bias, None, CLIP, requant, 64, (1, 1), (1, 1), (1, 1), 2)
    np.testing.assert_array_equal(one, two)
    assert_close(two, reference(x, 3, w, scale, bias, None, CLIP, requant, **geometry))


def test_threaded_conv_and_linear_are_the_one_thread_result():
    rng = np.random.default_rng(12)
    x, w, scale, bias = layer_case(rng, (2, 32, 33, 32), (40, 32, 3, 3))
    packed, wsum, k4, o16 = pack_weight(w)
    geometry = {"stride": (1, 1), "padding": (1, 1), "dilation": (1, 1), "groups": 1}
    res = rng.standard_normal((2, 40, 33, 32)).astype(f32)
    none_q = np.empty((0,) * 4, np.uint8)
    outs = []
    for nthreads in (1, 2):
        out = np.empty((2, 40, 33, 32), f32)
        conv2d_u8s8(
            x,
            5,
            packed,
            wsum,
            k4,
            o16,
            40,
            3,
            3,
            1,
            1,
            1,
            1,
            1,
            1,
            scale,
            bias,
            res,
            RELU,
            0.0,
            0.0,
            f32(1),
            f32(0),
            False,
            out,
            none_q,
            nthreads,
        )
        outs.append(out)
    np.testing.assert_array_equal(*outs)
    assert_close(outs[1], reference(x, 5, w, scale, bias, res, RELU, None, **geometry))

    a = rng.integers(0, 256, (4, 1100)).astype(np.uint8)
    wl = rng.integers(-127, 128, (2050, 1100)).astype(np.int8)
    sl = np.full(2050, 1e-5, f32)
    bl = rng.standard_normal(2050).astype(f32)
    packed, wsum, k4, o16 = pack_weight(wl)
    v = ((a.astype(np.int64) - 9) @ wl.T.astype(np.int64)).astype(f32) * sl + bl
    want = np.clip(np.rint(v / f32(0.1)) + f32(100), 0, 255).astype(np.uint8)
    outs = []
    for nthreads in (1, 2):
        out = np.empty((4, 2050), np.uint8)
        linear_u8s8(
            a,
            9,
            packed,
            wsum,
            k4,
            o16,
            2050,
            sl,
            bl,
            np.empty((0, 0), f32),
            NONE,
            0.0,
            0.0,
            f32(0.1),
            f32(100),
            True,
            np.empty((0, 0), f32),
            out,
            nthreads,
        )
        outs.append(out)
    np.testing.assert_array_equal(*outs)
    assert_close(outs[1], want)


# -- end to end ----------------------------------------------------------------------------------


class DepthwiseNet(nn.Module):
    """A MobileNetV2-like block: dense stem, depthwise 3x3, a stride-2 depthwise with two
    channels per input, a pointwise projection and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn2 = nn.BatchNorm2d(8)
        self.dw2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=8)
        self.pw = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.bn1(self.stem(x)))
        y = torch.clamp(self.bn2(self.dw(y)), 0.0, 6.0)
        y = self.pw(torch.relu(self.dw2(y)))
        return self.fc(y.mean(dim=(2, 3)))


def test_numba_runs_quantized_depthwise_convs_in_the_integer_kernel():
    torch.manual_seed(0)
    model = DepthwiseNet().eval()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
    graph = compile(model, torch.zeros(1, 3, 12, 12), passes=["fuse"], check=False).graph
    calib = np.random.default_rng(1).random((16, 3, 12, 12), dtype=np.float32)
    q = compile(graph, passes=[Quantize()], calibration_data=calib, check=False).graph
    compiled = compile_numba(q)
    assert compiled.source.count("KQ.conv2d_grouped_u8s8(") == 2
    assert compiled.source.count("KQ.conv2d_u8s8(") == 2
    assert "KC.conv2d_depthwise(" not in compiled.source
    assert not any(
        a.dtype == np.float32 and a.ndim == 4 for a in compiled.weights.values() if a.size > 1
    ), "float copies of the int8 conv weights are not kept"
    for i in range(3):
        x = calib[i : i + 1]
        (want,) = run(q, [x])
        (got,) = compiled.run(x)
        assert deviation([want], [got]) < 1e-3  # requantization rounding may flip one step
