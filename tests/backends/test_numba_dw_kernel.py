"""The depthwise conv2d kernel (KC.conv2d_depthwise: AVX-512 plane kernels written as LLVM IR, in
backends/numba/kernels/depthwise.py) against the reference conv2d over kernels, strides, paddings,
dilations, channel multipliers, sizes and epilogues, and a MobileNet-like block through
compile_numba."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from backends.numba.backend import compile_numba
from backends.numba.kernels import common as K
from backends.numba.kernels import conv as KC
from backends.numba.kernels import depthwise as DW
from compiler import compile as slim_compile
from compiler.ir.interpreter import run
from compiler.ops.nn import conv2d as reference_conv2d
from compiler.ops.nn import conv_out_size
from tests.numerics import relative_error

RTOL = 1e-4
rng = np.random.default_rng(0)

# (activation, attrs, kernel code, lo, hi): the clamps run in the plane kernel, the others after it
EPILOGUES = [
    (None, None, K.NONE, 0.0, 0.0),
    ("relu", None, K.RELU, 0.0, 0.0),
    ("clip", {"min_val": 0.0, "max_val": 6.0}, K.CLIP, 0.0, 6.0),
    ("hardswish", None, K.HARDSWISH, 0.0, 0.0),
    ("clip", {"min_val": -0.5, "max_val": None}, K.CLIP, -0.5, np.inf),
]
# the plane kernel _depthwise_layout picks (see the comment above it in backends/numba/kernels/depthwise.py)
FLAT1_33, FLAT1_55, FLAT1_ANY, FLAT2_33, FLAT2_55, FLAT2_ANY, ROW1, ROW2, SCALAR = range(9)


def randn(*shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


def geometry(xshape, k, stride, padding, dilation):
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = k, stride, padding, dilation
    oh = conv_out_size(xshape[2], kh, sh, ph, dh)
    ow = conv_out_size(xshape[3], kw, sw, pw, dw)
    return oh, ow


def kernel_kind(xshape, mult, k, stride, padding, dilation) -> int:
    """Which plane kernel conv2d_depthwise runs for this layer."""
    oh, ow = geometry(xshape, k, stride, padding, dilation)
    c = xshape[1]
    geom = (c, c * mult, xshape[2], xshape[3], oh, ow, *k, *stride, *padding, *dilation)
    return DW._depthwise_layout(geom, np.empty(0, np.float32))[5]


def check_depthwise(
    xshape,
    mult,
    k,
    stride,
    padding,
    dilation,
    bias,
    residual,
    epilogue,
    nthreads=1,
    dtype=np.float32,
):
    """conv2d_depthwise == the reference conv2d within RTOL of max|ref|; returns the kernel kind."""
    n, c = xshape[:2]
    o = c * mult
    oh, ow = geometry(xshape, k, stride, padding, dilation)
    x, w = randn(*xshape, dtype=dtype), randn(o, 1, *k, dtype=dtype)
    b = randn(o, dtype=dtype) if bias else None
    r = randn(n, o, oh, ow, dtype=dtype) if residual else None
    act, attrs, code, lo, hi = epilogue
    want = reference_conv2d(
        x,
        w,
        b,
        r,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=c,
        activation=act,
        activation_attrs=attrs,
    )
    out = np.full((n, o, oh, ow), np.nan, dtype)  # every output must be written
    KC.conv2d_depthwise(
        x,
        w,
        np.empty(0, dtype) if b is None else b,
        np.empty((0, 0, 0, 0), dtype) if r is None else r,
        out,
        *stride,
        *padding,
        *dilation,
        code,
        lo,
        hi,
        nthreads,
    )
    case = (xshape, mult, k, stride, padding, dilation, bias, residual, act)
    assert relative_error(out, want) < RTOL, case
    return kernel_kind(xshape, mult, k, stride, padding, dilation)


# every (kernel, stride, padding, dilation), with multiplier, epilogue, bias, residual and odd or
# even sizes rotating over the cases
GEOMETRY = list(itertools.product((3, 5, 7), (1, 2, 3), (0, 1, 2, 3), (1, 2)))


@pytest.mark.parametrize("i", range(len(GEOMETRY)))
def test_kernel_matches_reference_over_geometry(i):
    k, s, p, d = GEOMETRY[i]
    size = max(1, d * (k - 1) + 1 - 2 * p)  # the smallest input with one output
    h, w = size + i % 7, size + (i * 5) % 19
    check_depthwise(
        (1 + i % 2, 3 + i % 4, h, w),
        1 + i % 2,
        (k, k),
        (s, s),
        (p, p),
        (d, d),
        i % 3 != 0,
        i % 4 == 1,
        EPILOGUES[i % len(EPILOGUES)],
    )


# "same" padding (the FLAT kernels): MobileNet/EfficientNet-like planes, from narrower than one
# vector to several vectors per row, odd and even, with and without a residual
SAME = [(k, s, hw) for k in (3, 5) for s in (1, 2) for hw in (1, 6, 7, 14, 17, 28, 33)]


@pytest.mark.parametrize("k, s, hw", SAME)
def test_kernel_same_padding(k, s, hw):
    kind = check_depthwise(
        (1, 5, hw, hw + 1),
        1,
        (k, k),
        (s, s),
        (k // 2, k // 2),
        (1, 1),
        True,
        hw % 2 == 0,
        EPILOGUES[2],
    )
    assert kind == (
        {1: FLAT1_33, 2: FLAT2_33}[s] + (k == 5) if s == 1 or (hw + 1) % 2 == 0 else ROW2
    )


@pytest.mark.parametrize(
    "xshape, k, stride, padding, dilation, mult, want",
    [
        ((1, 4, 9, 9), (3, 3), (1, 1), (1, 1), (1, 1), 1, FLAT1_33),
        ((1, 4, 9, 9), (5, 5), (1, 1), (2, 2), (1, 1), 2, FLAT1_55),
        ((1, 4, 9, 9), (3, 3), (1, 1), (2, 2), (2, 2), 1, FLAT1_ANY),  # dilated "same"
        ((1, 4, 10, 10), (7, 7), (1, 1), (3, 3), (1, 1), 1, FLAT1_ANY),
        ((1, 4, 10, 12), (3, 3), (2, 2), (1, 1), (1, 1), 2, FLAT2_33),
        ((1, 4, 10, 12), (5, 5), (2, 2), (2, 2), (1, 1), 1, FLAT2_55),
        ((1, 4, 10, 12), (3, 5), (2, 2), (1, 2), (1, 1), 1, FLAT2_ANY),  # rectangular kernel
        ((1, 4, 9, 9), (3, 3), (2, 1), (1, 1), (1, 1), 1, FLAT1_33),  # 2 row phases
        ((1, 4, 9, 9), (3, 3), (1, 1), (0, 1), (1, 1), 2, FLAT1_33),  # no padding above/below
        ((1, 4, 9, 9), (3, 3), (1, 1), (0, 0), (1, 1), 1, ROW1),  # "valid"
        ((1, 4, 9, 9), (3, 3), (2, 2), (1, 1), (1, 1), 1, ROW2),  # odd width at stride 2
        ((1, 4, 9, 10), (3, 3), (1, 2), (1, 1), (1, 1), 1, FLAT2_33),  # stride 1 down, 2 across
        ((1, 4, 9, 11), (3, 3), (3, 3), (1, 1), (1, 1), 2, SCALAR),
        ((1, 4, 9, 11), (3, 3), (2, 3), (0, 1), (1, 1), 1, SCALAR),
    ],
)
def test_every_plane_kernel(xshape, k, stride, padding, dilation, mult, want):
    for epilogue, residual in ((EPILOGUES[1], False), (EPILOGUES[3], True)):
        kind = check_depthwise(xshape, mult, k, stride, padding, dilation, True, residual, epilogue)
        assert kind == want


@pytest.mark.parametrize("epilogue", EPILOGUES, ids=lambda e: f"{e[0]}{e[4]}")
@pytest.mark.parametrize("bias, residual", [(False, False), (True, False), (True, True)])
def test_kernel_epilogues(epilogue, bias, residual):
    check_depthwise((2, 6, 11, 11), 1, (3, 3), (1, 1), (1, 1), (1, 1), bias, residual, epilogue)
    check_depthwise((1, 6, 12, 12), 2, (3, 3), (2, 2), (1, 1), (1, 1), bias, residual, epilogue)


@pytest.mark.parametrize("stride", [(1, 1), (2, 2)])
def test_kernel_float64(stride):
    check_depthwise(
        (1, 5, 13, 14),
        2,
        (3, 3),
        stride,
        (1, 1),
        (1, 1),
        True,
        True,
        EPILOGUES[2],
        dtype=np.float64,
    )
    check_depthwise(
        (1, 5, 13, 14),
        1,
        (5, 5),
        stride,
        (1, 1),
        (2, 2),
        True,
        False,
        EPILOGUES[3],
        dtype=np.float64,
    )


@pytest.mark.parametrize("xshape, stride", [((1, 256, 32, 32), (1, 1)), ((2, 64, 96, 98), (2, 2))])
def test_kernel_splits_large_layers_over_threads(xshape, stride):
    oh, ow = geometry(xshape, (3, 3), stride, (1, 1), (1, 1))
    assert xshape[0] * xshape[1] * oh * ow * 9 >= 2 * DW.PAR_MACS_DIRECT  # two chunks
    check_depthwise(xshape, 1, (3, 3), stride, (1, 1), (1, 1), True, True, EPILOGUES[2], nthreads=2)


# -- end to end ------------------------------------------------------------------------------------


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand + BN + ReLU6, depthwise 3x3 + BN + ReLU6, 1x1 project + BN,
    plus the input when the shapes allow."""

    def __init__(self, c: int, expand: int, stride: int) -> None:
        super().__init__()
        e = c * expand
        self.body = nn.Sequential(
            nn.Conv2d(c, e, 1, bias=False),
            nn.BatchNorm2d(e),
            nn.ReLU6(),
            nn.Conv2d(e, e, 3, stride=stride, padding=1, groups=e, bias=False),
            nn.BatchNorm2d(e),
            nn.ReLU6(),
            nn.Conv2d(e, c, 1, bias=False),
            nn.BatchNorm2d(c),
        )
        self.residual = stride == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


def randomized_bn(model: nn.Module) -> nn.Module:
    """Batch norms with non-trivial statistics, so that folding them is tested."""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


@pytest.mark.parametrize("stride, hw", [(1, 15), (2, 16), (2, 15)])
def test_mobilenet_block_through_compile_numba(stride, hw):
    torch.manual_seed(stride + hw)
    model = randomized_bn(
        nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU6(),
            nn.Conv2d(8, 8, 3, padding=1, groups=8),
            nn.BatchNorm2d(8),
            nn.ReLU6(),
            InvertedResidual(8, 6, stride),
        )
    )
    x = torch.randn(1, 3, hw, hw)
    graph = slim_compile(model, x, passes=["fuse"], check=False).graph
    compiled = compile_numba(graph)
    body = compiled.source.split("def forward")[1]
    assert body.count("KC.conv2d_depthwise(") == 2, body  # batch norm and ReLU6 fused into both
    assert "K.unary(" not in body and "batch_norm" not in body
    xs = x.numpy()
    (got,), (want,) = compiled.run(xs), run(graph, [xs])
    assert got.shape == want.shape and relative_error(got, want) < RTOL
    with torch.no_grad():
        assert relative_error(got, model(x).numpy()) < 1e-3
