"""The float32 1x1 conv of the numba backend on CPUs without AVX-512: a micro-kernel with vectors
along the output pixels (:mod:`backends.numba.kernels.f32` has vectors along the output channels).
Saved packages get a copy as ``kernels_pointwise.py``.

A 1x1 conv at stride 1 without padding is out (O, P) = W (O, C) @ x (C, P) per image, and x's
rows are already contiguous. Vectors along the pixels then need no transpose in the epilogue
and no broadcast per pixel: the tile is PW_CH output channels x PW_VECS vectors of pixels, each
step k loads PW_VECS vectors of x[k] and broadcasts PW_CH weights, and each channel's sums are
stored straight into its output row. On AVX2 the channel-vector tile (6 pixels x 16 channels)
spends its epilogue transposing 8 <16 x float> through 2-register shuffles, as long as the
reduction itself when C is small (MobileNetV2's 1x1 layers took 1.15-1.3x ORT's time).
:func:`backends.numba.kernels.f32.conv2d_planned` calls it where ``POINTWISE`` and the plane
has at least ``PW_MIN_PIXELS`` pixels.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .common import CLIP, HAS_AVX512, LANES, NONE, RELU, act_inplace, reduction_loop

VEC = 16 if HAS_AVX512 else 8  # float32 lanes of one register
PW_CH, PW_VECS = 4, 3  # 12 accumulators, 3 vectors of x, 1 broadcast: AVX2's 16 registers
PW_TILE = PW_VECS * VEC  # pixels per tile
POINTWISE = not HAS_AVX512  # measured on AVX2 only; AVX-512 keeps the channel-vector tile
# Planes of fewer pixels keep the channel-vector tile: their last, partial pixel tile is a larger
# share of the work (7x7: 72 pixels computed for 49), and with C = 576-960 the x columns of a
# tile no longer stay in L1 (576 -> 96 on 14x14, 960 -> 160 on 7x7: 1.03-1.1x its time).
PW_MIN_PIXELS = 16 * PW_TILE


def _pointwise_tile(nch: int, nvec: int):
    """``out[oi + j * ldo + q] = clamp(sum_k w[wi + 16 k + j] * x[xi + k * ldx + q] + bias[ci + j]
    (+ res[ri + j * ldr + q] if has_res), lo, hi)`` for q < nvec * VEC, j < min(nch, nc)."""

    @intrinsic
    def tile(
        typingctx, out, oi, ldo, res, ri, ldr, has_res, x, xi, ldx, n, w, wi, bias, ci, lo, hi, nc
    ):
        i, f = types.intp, types.float32
        sig = types.void(out, i, i, res, i, i, i, x, i, i, i, w, i, bias, i, f, f, i)

        def codegen(context, builder, signature, args):
            (out, oi, ldo, res, ri, ldr, has_res, x, xi, ldx, n, w, wi, bias, ci, lo, hi, nc) = args
            aty = signature.args

            def data(k, value):
                return context.make_array(aty[k])(context, builder, value).data

            outp, resp, xpp, wp, biasp = (
                data(k, v) for k, v in ((0, out), (3, res), (7, x), (11, w), (13, bias))
            )
            vt = ir.VectorType(ir.FloatType(), VEC)
            i32, idx = ir.IntType(32), n.type
            fma = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(vt, [vt, vt, vt]), f"llvm.fma.v{VEC}f32"
            )
            undef = ir.Constant(vt, ir.Undefined)
            zeros32 = ir.Constant(ir.VectorType(i32, VEC), [0] * VEC)

            def splat(value):
                one = builder.insert_element(undef, value, ir.Constant(i32, 0))
                return builder.shuffle_vector(one, undef, zeros32)

            def vptr(base, at):
                return builder.bitcast(builder.gep(base, [at]), vt.as_pointer())

            xbase, wbase = builder.gep(xpp, [xi]), builder.gep(wp, [wi])
            zero = ir.Constant(vt, [0.0] * VEC)

            def step(k, flat):
                xrow = builder.mul(k, ldx)
                xv = [
                    builder.load(vptr(xbase, builder.add(xrow, ir.Constant(idx, v * VEC))), align=4)
                    for v in range(nvec)
                ]
                wrow = builder.mul(k, ir.Constant(idx, LANES))
                new = []
                for j in range(nch):
                    wv = splat(
                        builder.load(builder.gep(wbase, [builder.add(wrow, ir.Constant(idx, j))]))
                    )
                    new += [builder.call(fma, [wv, xv[v], flat[j * nvec + v]]) for v in range(nvec)]
                return new

            flat = reduction_loop(builder, n, [zero] * (nch * nvec), step)
            accs = [flat[j * nvec : (j + 1) * nvec] for j in range(nch)]
            lov, hiv = splat(lo), splat(hi)
            use_res = builder.icmp_signed("!=", has_res, ir.Constant(idx, 0))
            for j in range(nch):
                with builder.if_then(
                    builder.icmp_signed("<", ir.Constant(idx, j), nc), likely=True
                ):
                    bv = splat(
                        builder.load(builder.gep(biasp, [builder.add(ci, ir.Constant(idx, j))]))
                    )
                    orow = builder.add(oi, builder.mul(ldo, ir.Constant(idx, j)))
                    rrow = builder.add(ri, builder.mul(ldr, ir.Constant(idx, j)))
                    for v in range(nvec):
                        row = builder.fadd(accs[j][v], bv)
                        before = builder.block
                        with builder.if_then(use_res):
                            at = builder.add(rrow, ir.Constant(idx, v * VEC))
                            summed = builder.fadd(row, builder.load(vptr(resp, at), align=4))
                            added = builder.block
                        merged = builder.phi(vt)
                        merged.add_incoming(row, before)
                        merged.add_incoming(summed, added)
                        # compare + select, as the channel-vector tile: keeps NaN
                        row = builder.select(builder.fcmp_ordered("<", merged, lov), lov, merged)
                        row = builder.select(builder.fcmp_ordered(">", row, hiv), hiv, row)
                        at = builder.add(orow, ir.Constant(idx, v * VEC))
                        builder.store(row, vptr(outp, at), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return tile


_pw_tile = _pointwise_tile(PW_CH, PW_VECS)


@njit(cache=True)
def _pointwise_tasks(x, packed, bias, res, out, lo, hi, act, alo, ahi, q0, q1):
    """Output pixels [q0, q1) (q0 a multiple of PW_TILE) of every image and channel of a 1x1
    stride-1 unpadded conv: ``x`` (N, C, P), ``res``/``out`` (N, O, P), ``res`` maybe empty. A
    last partial tile runs on copies of its columns of x (and res) in scratch rows of PW_TILE."""
    n_img, c, npix = x.shape
    o = out.shape[1]
    has_res = 1 if res.shape[0] > 0 else 0
    xf, outf, resf, wf = x.reshape(-1), out.reshape(-1), res.reshape(-1), packed.reshape(-1)
    full = q0 + (q1 - q0) // PW_TILE * PW_TILE
    m = q1 - full
    xs = np.zeros(c * PW_TILE if m else 0, np.float32)
    os_ = np.empty(PW_CH * PW_TILE, np.float32)
    rs = np.zeros(PW_CH * PW_TILE, np.float32)
    for ni in range(n_img):
        xi = ni * c * npix
        # pixel tiles outermost: a tile's columns of x (C x PW_TILE floats) stay in cache while
        # every output channel reads them; channel tiles outermost streamed all of x from L2 once
        # per 4 channels (576 -> 96 channels on 14x14: 1.5x slower than the channel-vector tile)
        for p in range(q0, full, PW_TILE):
            for co in range(0, o, PW_CH):
                wi = co // LANES * c * LANES + co % LANES
                chan = (ni * o + co) * npix
                _pw_tile(
                    outf,
                    chan + p,
                    npix,
                    resf,
                    chan + p,
                    npix,
                    has_res,
                    xf,
                    xi + p,
                    npix,
                    c,
                    wf,
                    wi,
                    bias,
                    co,
                    lo,
                    hi,
                    o - co,
                )
        if m:  # the last, partial tile, on scratch copies of its columns
            for k in range(c):
                xs[k * PW_TILE : k * PW_TILE + m] = x[ni, k, full:q1]
            for co in range(0, o, PW_CH):
                nc = min(PW_CH, o - co)
                wi = co // LANES * c * LANES + co % LANES
                if has_res:
                    for j in range(nc):
                        rs[j * PW_TILE : j * PW_TILE + m] = res[ni, co + j, full:q1]
                _pw_tile(
                    os_,
                    0,
                    PW_TILE,
                    rs,
                    0,
                    PW_TILE,
                    has_res,
                    xs,
                    0,
                    PW_TILE,
                    c,
                    wf,
                    wi,
                    bias,
                    co,
                    lo,
                    hi,
                    nc,
                )
                for j in range(nc):
                    out[ni, co + j, full:q1] = os_[j * PW_TILE : j * PW_TILE + m]
        if act != NONE and act != RELU and act != CLIP:
            for co in range(o):
                act_inplace(out[ni, co, q0:q1], act, alo, ahi)


@njit(parallel=True, cache=True)
def _pointwise_parallel(x, packed, bias, res, out, lo, hi, act, alo, ahi, chunks):
    tiles = (x.shape[2] + PW_TILE - 1) // PW_TILE
    for ch in prange(chunks):
        q0 = ch * tiles // chunks * PW_TILE
        q1 = min(x.shape[2], (ch + 1) * tiles // chunks * PW_TILE)
        if q1 > q0:
            _pointwise_tasks(x, packed, bias, res, out, lo, hi, act, alo, ahi, q0, q1)


@njit(cache=True)
def conv1x1_pixel_vectors(x, packed, bias, res, out, lo, hi, act, alo, ahi, chunks):
    """A 1x1 stride-1 unpadded float32 conv, NCHW (``res`` like ``out``, or empty), with weights
    packed by ``numba_kernels_f32.pack_weight``, clamped to [lo, hi] in the tile and any other
    activation after it; on up to ``chunks`` threads, which split the pixel tiles."""
    n_img, c = x.shape[0], x.shape[1]
    o, npix = out.shape[1], out.shape[2] * out.shape[3]
    xf = x.reshape(n_img, c, npix)
    outf = out.reshape(n_img, o, npix)
    resf = res.reshape(n_img, o, npix) if res.size else res.reshape(0, 0, 0)
    chunks = min(chunks, (npix + PW_TILE - 1) // PW_TILE)
    if chunks == 1:
        _pointwise_tasks(xf, packed, bias, resf, outf, lo, hi, act, alo, ahi, 0, npix)
    else:
        _pointwise_parallel(xf, packed, bias, resf, outf, lo, hi, act, alo, ahi, chunks)
