"""The float32 implicit-GEMM conv2d micro-kernel (backends/numba/kernels/f32.py) against the
reference conv2d over a grid of shapes and epilogues, and a small CNN through compile_numba."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from backends.numba.backend import compile_numba
from backends.numba.kernels import common as K
from backends.numba.kernels import f32 as F
from backends.numba.kernels import pointwise as PW
from compiler.ir.graph import Graph
from compiler.ir.interpreter import run
from compiler.ops.nn import conv2d as reference_conv2d
from compiler.ops.nn import conv_out_size
from tests.numerics import relative_error

RTOL = 1e-4
rng = np.random.default_rng(0)

# (activation, attrs, kernel code, lo, hi): the clamps run in the micro-kernel, the others after it
EPILOGUES = [
    (None, None, K.NONE, 0.0, 0.0),
    ("relu", None, K.RELU, 0.0, 0.0),
    ("clip", {"min_val": -0.5, "max_val": 0.5}, K.CLIP, -0.5, 0.5),
    ("hardswish", None, K.HARDSWISH, 0.0, 0.0),
]


def randn(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def check_conv(
    xshape, o, k, stride, padding, dilation, groups, bias, residual, epilogue, nthreads=1
):
    """conv2d_packed, and conv2d_planned with its tables from conv_geometry / pack_bias and a
    padded-input buffer full of NaN (an arena buffer other layers wrote: its borders must be
    zeroed), == the reference conv2d within RTOL of max|ref|, for one case."""
    n, c, h, w = xshape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = k, stride, padding, dilation
    oh, ow = conv_out_size(h, kh, sh, ph, dh), conv_out_size(w, kw, sw, pw, dw)
    x, wt = randn(*xshape), randn(o, c // groups, kh, kw)
    b = randn(o) if bias else None
    r = randn(n, o, oh, ow) if residual else None
    act, attrs, code, lo, hi = epilogue
    want = reference_conv2d(
        x,
        wt,
        b,
        r,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        activation=act,
        activation_attrs=attrs,
    )
    packed = F.pack_weight(wt, groups)
    res = np.empty((0, 0, 0, 0), np.float32) if r is None else r
    out = np.full((n, o, oh, ow), np.nan, np.float32)  # every output must be written
    F.conv2d_packed(
        x,
        packed,
        np.empty(0, np.float32) if b is None else b,
        res,
        out,
        kh,
        kw,
        sh,
        sw,
        ph,
        pw,
        dh,
        dw,
        groups,
        code,
        lo,
        hi,
        nthreads,
    )
    case = (xshape, o, k, stride, padding, dilation, groups)
    assert relative_error(out, want) < RTOL, case
    base_args, offs_args, padded = F.conv_geometry(
        xshape, o, kh, kw, stride, padding, dilation, groups
    )
    xp = np.full(padded, np.nan, np.float32)
    planned = np.full((n, o, oh, ow), np.nan, np.float32)
    F.conv2d_planned(
        x,
        xp,
        packed,
        F.pack_bias(b, o, groups),
        F.pixel_bases(*base_args),
        F.tap_offsets(*offs_args),
        res,
        planned,
        kh,
        kw,
        sh,
        sw,
        ph,
        pw,
        dh,
        dw,
        groups,
        code,
        lo,
        hi,
        nthreads,
    )
    np.testing.assert_array_equal(planned, out, err_msg=str(case))
    # split into bands of output pixels, each from its own padded copy of the rows it reads (the
    # threaded path of large layers), as 2 and 3 threads would: the same numbers
    alo, ahi = (lo, hi) if code == K.CLIP else (0.0, 0.0)
    klo = np.float32(lo if code == K.CLIP else 0.0 if code == K.RELU else -np.inf)
    khi = np.float32(hi if code == K.CLIP else np.inf)
    for chunks in (2, 3):
        banded = np.full((n, o, oh, ow), np.nan, np.float32)
        F._conv_bands(
            x,
            packed,
            F.pack_bias(b, o, groups),
            res,
            banded,
            kh,
            kw,
            sh,
            sw,
            ph,
            pw,
            dh,
            dw,
            groups,
            klo,
            khi,
            code,
            alo,
            ahi,
            F.best_rows(oh * ow),
            chunks,
        )
        np.testing.assert_array_equal(banded, out, err_msg=f"{case} in {chunks} bands")


# every (stride, padding, dilation, kernel) combination, with channels, groups, epilogues and
# sizes rotating over the cases; channel counts are not multiples of 16 (nor of a group's 16
# lanes), the output planes' pixel counts are mostly not multiples of the tile's 8 or 7 pixels
GEOMETRY = list(itertools.product((1, 2), (0, 1, 2), (1, 2), (1, 3, 5, 7)))
CHANNELS = [(3, 17, 1), (17, 40, 1), (40, 3, 1), (6, 34, 2), (34, 40, 2), (40, 6, 2)]


@pytest.mark.parametrize("i", range(len(GEOMETRY)))
def test_kernel_matches_reference_over_shapes(i):
    s, p, d, k = GEOMETRY[i]
    c, o, groups = CHANNELS[i % len(CHANNELS)]
    size = max(1, d * (k - 1) + 1 - 2 * p)  # the smallest input with one output
    h, w = size + i % 6, size + (i * 5) % 9
    check_conv(
        (1 + i % 2, c, h, w),
        o,
        (k, k),
        (s, s),
        (p, p),
        (d, d),
        groups,
        i % 3 != 0,
        i % 2 == 0,
        EPILOGUES[i % len(EPILOGUES)],
    )


@pytest.mark.parametrize("epilogue", EPILOGUES, ids=lambda e: str(e[0]))
@pytest.mark.parametrize("bias, residual", [(False, False), (True, False), (True, True)])
def test_kernel_epilogues(epilogue, bias, residual):
    check_conv((1, 17, 9, 10), 20, (3, 3), (1, 1), (1, 1), (1, 1), 1, bias, residual, epilogue)


A, B = F.ROWS_A, F.ROWS_B  # this CPU's two tile sizes: (8, 7) with AVX-512, (6, 5) without


@pytest.mark.parametrize(
    "xshape, k, stride, padding",
    [
        ((1, 5, B, B), (3, 3), (1, 1), (1, 1)),  # B * B pixels: tiles of B
        ((1, 5, 2 * B, 2 * B), (1, 1), (1, 1), (0, 0)),  # 4 B^2: tiles of B
        ((2, 5, A, A), (3, 3), (1, 1), (1, 1)),  # A * A: tiles of A
        ((1, 5, 3, 4), (3, 2), (2, 1), (1, 0)),  # fewer pixels than a tile, rectangular kernel
    ],
)
def test_kernel_tile_sizes(xshape, k, stride, padding):
    oh = conv_out_size(xshape[2], k[0], stride[0], padding[0], 1)
    ow = conv_out_size(xshape[3], k[1], stride[1], padding[1], 1)
    assert F.best_rows(B * B) == F.best_rows(4 * B * B) == B and F.best_rows(A * A) == A
    assert F.best_rows(oh * ow) in (A, B)
    check_conv(xshape, 33, k, stride, padding, (1, 1), 1, True, True, EPILOGUES[1])


@pytest.mark.parametrize(
    "xshape, o, nthreads",
    [
        ((1, 40, 7, 7), 36, 1),  # a 7x7 plane: channel-last input where PW.POINTWISE
        ((2, 17, 4, 5), 20, 2),  # two images, split over two threads
        ((1, 300, 8, 8), 70, 2),  # CL_MAX_PIXELS pixels, more channels than a 64-channel block
    ],
)
def test_small_1x1_planes(xshape, o, nthreads):
    assert xshape[2] * xshape[3] <= F.CL_MAX_PIXELS
    for epilogue in (EPILOGUES[1], EPILOGUES[3]):
        check_conv(
            xshape, o, (1, 1), (1, 1), (0, 0), (1, 1), 1, True, True, epilogue, nthreads=nthreads
        )


@pytest.mark.parametrize("rows", [8, 7, 6, 5])
def test_every_cpus_tile_is_exact_here(rows):
    # the tile sizes of other CPUs too (AVX-512's 8 and 7, AVX2's 6 and 5): the IR is generic, so
    # each runs anywhere (slower where it spills); one tile of 13 of its 16 channels, with bias,
    # residual and clip, against numpy; the channel rows past 13 must stay untouched
    from numba import njit

    tile = F._conv_tile(rows)

    @njit
    def one_tile(out, res, xp, bases, offs, packed, bias, lo, hi, nc):
        tile(
            out,
            0,
            rows,
            res,
            0,
            rows,
            1,
            xp,
            2,
            bases,
            1,
            offs,
            0,
            offs.shape[0],
            packed,
            0,
            bias,
            0,
            lo,
            hi,
            nc,
            out[:0],
            0,
            0,
        )

    kk, nc = 21, 13
    xp, packed, bias = randn(400), randn(kk, F.LANES), randn(F.LANES)
    bases = np.arange(rows + 1, dtype=np.intp) * 11
    offs = rng.integers(0, 250, kk).astype(np.intp)
    res = randn(F.LANES * rows)
    out = np.full(F.LANES * rows, np.nan, np.float32)
    one_tile(out, res, xp, bases, offs, packed, bias, np.float32(-0.5), np.float32(2.0), nc)
    patch = xp[2 + bases[1:, None] + offs[None, :]]  # (rows, kk)
    want = (patch.astype(np.float64) @ packed + bias).T + res.reshape(F.LANES, rows)
    want = np.clip(want, -0.5, 2.0)
    got = out.reshape(F.LANES, rows)
    np.testing.assert_allclose(got[:nc], want[:nc], rtol=1e-5, atol=1e-5)
    assert np.isnan(got[nc:]).all()


@pytest.mark.parametrize("rows", [8, 6, 5])
def test_tile_resumes_its_sums_across_k_passes(rows):
    # K blocking: the first pass stores raw sums (no bias, no epilogue) into acc, the middle one
    # loads and stores them, the last loads them and runs the epilogue: the same numbers as one
    # pass over all of K, and out untouched until the last pass
    from numba import njit

    tile = F._conv_tile(rows)

    @njit
    def passes(out, res, xp, bases, offs, packed, bias, acc, cuts, modes):
        for i in range(len(modes)):
            tile(
                out,
                0,
                rows,
                res,
                0,
                rows,
                1,
                xp,
                0,
                bases,
                0,
                offs,
                cuts[i],
                cuts[i + 1] - cuts[i],
                packed,
                cuts[i] * F.LANES,
                bias,
                0,
                np.float32(-np.inf),
                np.float32(np.inf),
                F.LANES,
                acc,
                3,
                modes[i],
            )

    kk = 40
    xp, packed, bias = randn(300), randn(kk, F.LANES), randn(F.LANES)
    bases = np.arange(rows, dtype=np.intp) * 7
    offs = rng.integers(0, 250, kk).astype(np.intp)
    res = randn(F.LANES * rows)
    acc = np.full(3 + F.LANES * rows, np.nan, np.float32)
    want = (xp[bases[:, None] + offs[None, :]].astype(np.float64) @ packed + bias).T
    want += res.reshape(F.LANES, rows)
    for cuts, modes in [
        ((0, 17, kk), (F.ACC_STORE, F.ACC_LOAD)),
        ((0, 9, 30, kk), (F.ACC_STORE, F.ACC_LOAD | F.ACC_STORE, F.ACC_LOAD)),
    ]:
        out = np.full(F.LANES * rows, np.nan, np.float32)
        passes(
            out,
            res,
            xp,
            bases,
            offs,
            packed,
            bias,
            acc,
            np.array(cuts, np.intp),
            np.array(modes, np.intp),
        )
        np.testing.assert_allclose(out.reshape(F.LANES, rows), want, rtol=1e-5, atol=1e-5)
        assert np.isnan(acc[:3]).all()  # writes stay inside acc[ai:]


@pytest.mark.parametrize(
    "xshape, o, k, nthreads",
    [
        ((1, 64, 9, 11), 20, (3, 3), 1),  # K = 576: three passes of 192; a partial last tile
        ((2, 40, 7, 7), 33, (3, 3), 2),  # K = 360: two passes; two images on two threads
        ((1, 300, 8, 8), 24, (1, 1), 2),  # 1x1 on the channel-last copy, K = 300
    ],
)
def test_layers_with_k_split_into_passes(xshape, o, k, nthreads):
    kk = xshape[1] * k[0] * k[1]
    assert kk > F.KC
    pad = (k[0] // 2, k[1] // 2)
    for epilogue in (EPILOGUES[1], EPILOGUES[3]):
        check_conv(xshape, o, k, (1, 1), pad, (1, 1), 1, True, True, epilogue, nthreads=nthreads)


@pytest.mark.parametrize(
    "xshape, stride, nthreads",
    [
        ((1, 20, 41, 40), (2, 2), 2),  # 21 x 20 = 420 outputs: the pixel-vector 1x1 kernel's size
        ((2, 9, 15, 16), (2, 3), 1),  # 8 x 6 outputs: the channel-last copy's
        ((1, 24, 30, 30), (2, 2), 1),  # 15 x 15 = 225 outputs: the tile on the strided input
    ],
)
def test_strided_1x1_convs(xshape, stride, nthreads):
    # a downsample 1x1 conv runs as a 1x1 conv of the subsampled input where one of the 1x1
    # paths takes its output size
    for epilogue in (EPILOGUES[1], EPILOGUES[3]):
        check_conv(
            xshape, 33, (1, 1), stride, (0, 0), (1, 1), 1, True, True, epilogue, nthreads=nthreads
        )


@pytest.mark.parametrize("xshape, o", [((1, 48, 37, 37), 16), ((2, 16, 30, 30), 40)])
def test_kernel_splits_large_layers_over_threads(xshape, o):
    # > PAR_MACS: two chunks, with the pixels of one channel block split between them (first) or
    # the channel blocks of two images (second)
    assert xshape[0] * o * xshape[2] * xshape[3] * xshape[1] * 9 > 2 * F.PAR_MACS
    check_conv(xshape, o, (3, 3), (1, 1), (1, 1), (1, 1), 1, True, True, EPILOGUES[2], nthreads=2)


def test_packed_weight_layout():
    w = randn(40, 3, 2, 2)  # groups 2: 20 channels per group, padded to 32
    packed = F.pack_weight(w, 2)
    assert packed.shape == (4, 12, 16) and packed.dtype == np.float32
    flat = w.reshape(40, 12)
    for g, cb, j in itertools.product(range(2), range(2), range(16)):
        oc = cb * 16 + j
        want = flat[g * 20 + oc] if oc < 20 else np.zeros(12, np.float32)
        np.testing.assert_array_equal(packed[g * 2 + cb, :, j], want)


# -- end to end ------------------------------------------------------------------------------------


def small_cnn() -> Graph:
    """stem conv + relu, a strided grouped conv, a residual conv with clip, a depthwise conv
    (which stays on conv2d_depthwise), a 1x1 conv, global mean."""
    g = Graph("small_cnn")
    x = g.add_input("x", (1, 3, 15, 13))

    def conv(h, o, k, name, **attrs):
        cin = h.shape[1] // attrs.get("groups", 1)
        w = g.constant(randn(o, cin, k, k) * 0.3, f"{name}.w")
        b = g.constant(randn(o), f"{name}.b")
        res = attrs.pop("residual", None)
        return g.add_node("conv2d", [h, w, b, res], attrs).outputs[0]

    h = conv(x, 17, 3, "stem", padding=(1, 1), activation="relu")
    h = conv(h, 34, 3, "down", stride=(2, 2), padding=(1, 1), groups=1, activation="relu")
    h = conv(
        h,
        34,
        3,
        "grouped",
        padding=(1, 1),
        groups=2,
        residual=h,
        activation="clip",
        activation_attrs={"min_val": 0.0, "max_val": 6.0},
    )
    h = conv(h, 34, 3, "dw", padding=(1, 1), groups=34, activation="relu")
    h = conv(h, 20, 1, "project")
    g.outputs = [g.add_node("mean", [h], {"axes": (2, 3)}).outputs[0]]
    return g


def test_small_cnn_through_compile_numba_uses_the_kernel():
    g = small_cnn()
    model = compile_numba(g)
    body = model.source.split("def forward")[1]
    assert body.count("KC.conv2d_planned(") == 4 and body.count("KC.conv2d_depthwise(") == 1
    assert "KC.conv2d(" not in body
    assert "stem.w_packed" in model.weights and "stem.w" not in model.weights  # packed only
    x = randn(1, 3, 15, 13)
    (got,), (want,) = model.run(x), run(g, [x])
    assert got.shape == want.shape and relative_error(got, want) < RTOL


@pytest.mark.parametrize(
    "n, c, o, hw, residual, epilogue",
    [
        (1, 7, 21, (9, 11), True, EPILOGUES[2]),  # 99 pixels: 4 whole tiles of AVX2, a partial one
        (2, 33, 16, (5, 5), False, EPILOGUES[3]),  # fewer pixels than a tile; an activation after
        (1, 16, 5, (24, 24), True, EPILOGUES[1]),  # whole tiles only, 5 of a 16-channel block
    ],
)
def test_pointwise_kernel_is_the_reference(n, c, o, hw, residual, epilogue):
    # the pixel-vector 1x1 kernel that CPUs without AVX-512 run (PW.POINTWISE), here on any CPU:
    # the whole plane on one thread, and split in two by pixel tiles as the threads split it
    x, wt, b = randn(n, c, *hw), randn(o, c, 1, 1), randn(o)
    r = randn(n, o, *hw) if residual else None
    act, attrs, code, lo, hi = epilogue
    want = reference_conv2d(
        x,
        wt,
        b,
        r,
        stride=(1, 1),
        padding=(0, 0),
        dilation=(1, 1),
        groups=1,
        activation=act,
        activation_attrs=attrs,
    )
    npix = hw[0] * hw[1]
    klo = np.float32(lo if code == K.CLIP else 0.0 if code == K.RELU else -np.inf)
    khi = np.float32(hi if code == K.CLIP else np.inf)
    res = r.reshape(n, o, npix) if residual else np.empty((0, 0, 0), np.float32)
    args = (x.reshape(n, c, npix), F.pack_weight(wt, 1), F.pack_bias(b, o, 1), res)
    for split in (False, True):
        out = np.full((n, o, npix), np.nan, np.float32)
        if split:
            PW._pointwise_parallel(*args, out, klo, khi, code, lo, hi, 2)
        else:
            PW._pointwise_tasks(*args, out, klo, khi, code, lo, hi, 0, npix)
        assert relative_error(out.reshape(want.shape), want) < RTOL, split
