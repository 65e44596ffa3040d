"""Numba kernels for the heavy ops: conv2d (tiled im2col + BLAS; depthwise direct, on an AVX-512
plane kernel written as LLVM IR; float32 with constant weights runs on the implicit GEMM of
numba_kernels_f32, re-exported here as ``conv2d_packed`` / ``conv2d_planned``), linear, batched
matmul, attention and pooling. Saved packages get a copy as ``kernels_conv.py``.

Every GEMM is ``np.dot`` (single-threaded BLAS) on a tile, called from a ``prange`` over tiles, so
packing, the GEMM and the fused epilogue ``act(y + bias + residual)`` of one tile run on one thread
while the tile is in cache; the epilogue is never a separate pass over memory.
"""

from __future__ import annotations

import functools
import math

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .numba_kernels import (
    CLIP,
    HAS_AVX512,
    NONE,
    RELU,
    act_inplace,
    finish_row,
    softmax_rows,
)
from .numba_kernels_f32 import (  # noqa: F401  (conv2d_*, pack_*, ...: called as KC.)
    LANES,  # linear splits its columns in whole vectors and from the fp32 conv's PAR_MACS
    PAR_MACS,
    conv2d_packed,
    conv2d_planned,
    pack_bias,
    pack_weight,
    pixel_bases,
    tap_offsets,
)

# Target size (elements) of one im2col tile: a few hundred KiB, so the tile and its GEMM output
# stay in the L2 cache while the epilogue reads them.
TILE_ELEMS = 1 << 17


@njit(cache=True)
def _valid_range(off, stride, size, count):
    """Output positions q in [0, count) whose input position q * stride + off lies in [0, size)."""
    lo = 0 if off >= 0 else (-off + stride - 1) // stride
    hi = (size - off + stride - 1) // stride if size > off else 0
    return min(lo, count), max(min(hi, count), min(lo, count))


# Row helpers: the loops run over slices from index 0, because numba's wraparound check on an
# index that may be negative (``src[q * sw + off]`` with q from ``lo``) stops LLVM from
# vectorising; measured 12x slower on a depthwise row.


@njit(cache=True)
def _segment(src, lo, hi, sw, off):
    """``src[q * sw + off]`` for q in [lo, hi), as a view (strided when ``sw`` > 1)."""
    return src[lo * sw + off : (hi - 1) * sw + off + 1 : sw]


@njit(cache=True)
def _copy_row(dst, src, lo, hi, sw, off):
    if hi <= lo:
        return
    d = dst[lo:hi]
    if sw == 1:
        s = src[lo + off : hi + off]
        for q in range(hi - lo):
            d[q] = s[q]
    else:
        s = _segment(src, lo, hi, sw, off)
        for q in range(hi - lo):
            d[q] = s[q]


@njit(cache=True)
def _axpy_row(acc, src, wv, lo, hi, sw, off):
    """acc[q] += wv * src[q * sw + off] for q in [lo, hi)."""
    if hi <= lo:
        return
    a = acc[lo:hi]
    if sw == 1:
        s = src[lo + off : hi + off]
        for q in range(hi - lo):
            a[q] += wv * s[q]
    else:
        s = _segment(src, lo, hi, sw, off)
        for q in range(hi - lo):
            a[q] += wv * s[q]


@njit(cache=True)
def _pack(x, c0, cg, kh, kw, sh, sw, ph, pw, dh, dw, r0, r1, ow, cols):
    """im2col of output rows [r0, r1) of one image: cols[(c, i, j), p] for c in [c0, c0 + cg)."""
    h, w = x.shape[1], x.shape[2]
    for c in range(cg):
        for i in range(kh):
            for j in range(kw):
                dst = cols[(c * kh + i) * kw + j]
                off = j * dw - pw
                lo, hi = _valid_range(off, sw, w, ow)
                for r in range(r0, r1):
                    base = (r - r0) * ow
                    ih = r * sh - ph + i * dh
                    if ih < 0 or ih >= h:
                        dst[base : base + ow] = 0.0
                        continue
                    dst[base : base + lo] = 0.0
                    _copy_row(dst[base : base + ow], x[c0 + c, ih], lo, hi, sw, off)
                    dst[base + hi : base + ow] = 0.0


@njit(parallel=True, cache=True)
def conv2d(x, w, b, res, out, sh, sw, ph, pw, dh, dw, groups, act, lo, hi, nthreads):
    """General conv2d (NCHW, OIHW; any stride, padding, dilation, groups) with fused epilogue.

    Work is split into tiles of whole output rows (image, group, row block); each tile is packed
    (im2col), multiplied with the group's weight matrix by BLAS and finished row by row.
    ``b`` (O,) and ``res`` (like ``out``) may have size 0 when absent.
    """
    n, _, _, _ = x.shape
    o, cg, kh, kw = w.shape
    oh, ow = out.shape[2], out.shape[3]
    og, kk = o // groups, cg * kh * kw
    wm = w.reshape(groups, og, kk)
    outf = out.reshape(n, o, oh * ow)
    resf = res.reshape(res.shape[0], res.shape[1], res.shape[2] * res.shape[3])
    # row blocks: enough for the cache budget, then rounded so every thread gets equal work
    nrb = min(oh, max(1, (oh * ow * kk + TILE_ELEMS - 1) // TILE_ELEMS))
    others = n * groups
    if (others * nrb) % nthreads:
        per_thread = (others * nrb + nthreads - 1) // nthreads
        nrb = min(oh, (per_thread * nthreads + others - 1) // others)
    rows = (oh + nrb - 1) // nrb
    nrb = (oh + rows - 1) // rows
    total = n * groups * nrb
    chunks = min(nthreads, total)
    for ch in prange(chunks):
        buf = np.empty(kk * rows * ow, x.dtype)
        acc_buf = np.empty(og * rows * ow, x.dtype)
        for t in range(ch * total // chunks, (ch + 1) * total // chunks):
            ni, g, rb = t // (groups * nrb), (t // nrb) % groups, t % nrb
            r0, r1 = rb * rows, min(oh, rb * rows + rows)
            p = (r1 - r0) * ow
            cols = buf[: kk * p].reshape(kk, p)
            acc = acc_buf[: og * p].reshape(og, p)
            _pack(x[ni], g * cg, cg, kh, kw, sh, sw, ph, pw, dh, dw, r0, r1, ow, cols)
            np.dot(wm[g], cols, acc)
            for oc in range(og):
                co = g * og + oc
                bias = b[co] if b.shape[0] > 0 else 0.0
                r = resf[ni, co, r0 * ow : r1 * ow] if res.shape[0] > 0 else acc[oc, 0:0]
                finish_row(acc[oc], outf[ni, co, r0 * ow : r1 * ow], bias, r, act, lo, hi)


# -- depthwise conv2d: direct, every tap of a vector of outputs in one register --------------------
# One layer kernel (LLVM IR) runs a thread's whole range of channels: per input channel a copy of
# its plane, then per output channel a vector of 64 bytes of outputs at a time, all kh * kw taps
# summed in registers and stored once with the fused epilogue (the old kernel made kh * kw passes
# over the output plane). Its loads are plain unaligned loads from the copy, in which padding reads
# zeros: AVX-512 masked loads that did the padding without a copy took 1.7x as long (the mask
# compares and masked loads, not the FMAs, bound that loop). Two lane layouts:
#
# FLAT, where w == sw * ow and sw <= 2 (the "same" padding of MobileNet/EfficientNet layers at
#   stride 1, or 2 on even widths): a vector is 16 consecutive pixels of the flat output plane,
#   across row ends, so a 7x7 plane is 4 vectors, not 7 part-empty rows. The input is copied into
#   sh x sw phase planes of ow columns (padded row Y = y + ph goes to row phase Y % sh at row
#   Y // sh; column x to column phase x % sw at x // sw), zero rows standing for the vertical
#   padding. Tap (ki, kj) of pixel p then sits at one offset + p in one phase plane, and a lane
#   whose column falls outside the row (horizontal padding) is left out of the tap's FMA by a mask
#   made from the pixel's column (``cols``): one compare per kernel column, none for the centre.
#   Stride 2 costs one split of each input row into its even and odd columns (two two-source
#   shuffles per 32 inputs), not shuffles per tap.
# ROW otherwise: the input is copied zero-padded (width wq = w + 2 pw), vectors run along each
#   output row and the last one of a row is stored under a mask; at column stride 2 each tap loads
#   two vectors and takes their even lanes; larger column strides run scalar loops.

SLACK = 256  # zeros before and after the copied planes: what lanes past a plane's end read
VEC_BYTES = 64 if HAS_AVX512 else 32
# MACs a depthwise layer needs per thread before it is split: ~10 us of work at the ~6 GMAC/s a
# depthwise layer runs at (it is memory-bound), three times what entering a parallel region costs.
# At 1 << 20 MobileNetV2's layers from 28x28 down ran on one thread (192 x 28 x 28: 219 us; 138 on
# two threads; 576 x 14 x 14 stride 2: 167 and 101; Zen 3).
PAR_MACS_DIRECT = 1 << 16


class _Vec:
    """Vectors of one register of ``fty`` for the kernels' IR: 64 bytes with AVX-512 (float: 16
    lanes, double: 8), else 32 (AVX2: 8 and 4). A 64-byte vector on AVX2 is a register pair, and
    the unrolled 3x3 kernel's 9 broadcast weights and accumulators then outgrow its 16 registers."""

    def __init__(self, builder, fty):
        self.b = builder
        single = isinstance(fty, ir.FloatType)
        self.lanes = lanes = (VEC_BYTES // 4) if single else (VEC_BYTES // 8)
        self.vty = ir.VectorType(fty, lanes)
        self.i32, self.idx = ir.IntType(32), ir.IntType(64)
        self.iota = ir.Constant(ir.VectorType(self.i32, lanes), list(range(lanes)))
        self.zero = ir.Constant(self.vty, [0.0] * lanes)
        self.align = 4 if single else 8
        name = f"v{lanes}{'f32' if single else 'f64'}"
        mty, vp, i32 = ir.VectorType(ir.IntType(1), lanes), self.vty.as_pointer(), self.i32
        declare = functools.partial(cgutils.get_or_insert_function, builder.module)
        self._fma = declare(ir.FunctionType(self.vty, [self.vty] * 3), f"llvm.fma.{name}")
        self._load = declare(ir.FunctionType(self.vty, [vp, i32, mty, self.vty]),
                             f"llvm.masked.load.{name}.p0")
        self._store = declare(ir.FunctionType(ir.VoidType(), [self.vty, vp, i32, mty]),
                              f"llvm.masked.store.{name}.p0")

    def const(self, value):
        return ir.Constant(self.idx, value)

    def splat(self, value):
        vec = ir.Constant(ir.VectorType(value.type, self.lanes), ir.Undefined)
        one = self.b.insert_element(vec, value, ir.Constant(self.i32, 0))
        zeros = ir.Constant(ir.VectorType(self.i32, self.lanes), [0] * self.lanes)
        return self.b.shuffle_vector(one, vec, zeros)

    def splat32(self, value):
        return self.splat(self.b.trunc(value, self.i32) if isinstance(value, ir.Value) else
                          ir.Constant(self.i32, value))

    def below(self, a, bound):
        """Lanes where 0 <= a < bound (one unsigned compare)."""
        return self.b.icmp_unsigned("<", a, bound)

    def first(self, count):
        """The mask of the first ``count`` lanes (none if count <= 0, all if count >= lanes)."""
        return self.b.icmp_signed("<", self.iota, self.splat32(count))

    def ptr(self, base, offset, vty=None):
        return self.b.bitcast(self.b.gep(base, [offset]), (vty or self.vty).as_pointer())

    def load(self, base, offset):
        return self.b.load(self.ptr(base, offset), align=self.align)

    def store(self, value, base, offset):
        self.b.store(value, self.ptr(base, offset), align=self.align)

    def load_i32(self, base, offset):
        return self.b.load(self.ptr(base, offset, ir.VectorType(self.i32, self.lanes)), align=4)

    def mload(self, base, offset, mask):
        align = ir.Constant(self.i32, self.align)
        return self.b.call(self._load, [self.ptr(base, offset), align, mask, self.zero])

    def mstore(self, value, base, offset, mask):
        align = ir.Constant(self.i32, self.align)
        self.b.call(self._store, [value, self.ptr(base, offset), align, mask])

    def fma(self, a, x, acc):
        return self.b.call(self._fma, [a, x, acc])

    def lanes_of(self, v0, v1, parity):
        """The even (parity 0) or odd lanes of the concatenation v0 | v1."""
        mask = [2 * j + parity for j in range(self.lanes)]
        return self.b.shuffle_vector(v0, v1, ir.Constant(ir.VectorType(self.i32, self.lanes), mask))


def _copy_rows_ir(v, dst, drows, src, lds, nrows, n):
    """IR: ``dst[drows[r] + j] = src[r * lds + j]`` for r < nrows, j < n; full vectors, then one
    masked vector per row."""
    b, c, lanes = v.b, v.const, v.lanes
    full = b.mul(b.sdiv(n, c(lanes)), c(lanes))
    mask = v.first(b.sub(n, full))
    with cgutils.for_range(b, nrows, intp=v.idx) as rows:
        s = b.gep(src, [b.mul(rows.index, lds)])
        d = b.gep(dst, [b.load(b.gep(drows, [rows.index]))])
        with cgutils.for_range_slice(b, c(0), full, c(lanes), intp=v.idx) as (j, _):
            v.store(v.load(s, j), d, j)
        v.mstore(v.mload(s, full, mask), d, full, mask)


def _split_rows_ir(v, dst, drows, d1, src, lds, nrows, n, step):
    """IR: the even and odd columns of rows, ``dst[drows[r] + m] = src[r * lds + 2 m]`` and
    ``dst[drows[r] + d1 + m] = src[r * lds + 2 m + 1]`` for r < nrows, m < n: two vectors split by
    two two-source shuffles, full ones, then one masked step per row. Rows no wider than half a
    vector (n <= lanes / 2) go two at a time: rows r and r + step, which must land in consecutive
    rows of a plane (drows[r + step] = drows[r] + n), are loaded into one pair and split once
    (the 14-column rows of a 7x7-output layer took 1.4x as long one at a time)."""
    b, c, lanes, add, mul = v.b, v.const, v.lanes, v.b.add, v.b.mul
    full = mul(b.sdiv(n, c(lanes)), c(lanes))
    left = b.sub(n, full)
    two = add(left, left)
    mask, m0, m1 = v.first(left), v.first(two), v.first(b.sub(two, c(lanes)))

    def src_row(r):
        return b.gep(src, [mul(r, lds)])

    def dst_row(r):
        return b.gep(dst, [b.load(b.gep(drows, [r]))])

    def row(r):
        s, d = src_row(r), dst_row(r)
        odd = b.gep(d, [d1])
        with cgutils.for_range_slice(b, c(0), full, c(lanes), intp=v.idx) as (j, _):
            v0, v1 = v.load(s, add(j, j)), v.load(s, add(add(j, j), c(lanes)))
            v.store(v.lanes_of(v0, v1, 0), d, j)
            v.store(v.lanes_of(v0, v1, 1), odd, j)
        v0, v1 = v.mload(s, add(full, full), m0), v.mload(s, add(add(full, full), c(lanes)), m1)
        v.mstore(v.lanes_of(v0, v1, 0), d, full, mask)
        v.mstore(v.lanes_of(v0, v1, 1), odd, full, mask)

    half = lanes // 2
    with b.if_else(b.icmp_signed("<=", n, c(half))) as (narrow, wide):
        with narrow:  # lanes [0, n) of the split are row r's, [half, half + n) row r + step's
            upper = v.below(b.sub(v.iota, v.splat32(half)), v.splat32(n))
            mrow = v.first(add(n, n))
            block = add(step, step)  # rows [r0, r0 + 2 step): pairs (r0 + k, r0 + k + step)
            blocks = b.sdiv(nrows, block)
            with cgutils.for_range(b, blocks, intp=v.idx) as blk:
                with cgutils.for_range(b, step, intp=v.idx) as k:
                    r = add(mul(blk.index, block), k.index)
                    v0 = v.mload(src_row(r), c(0), mrow)
                    v1 = v.mload(src_row(add(r, step)), c(0), mrow)
                    d = dst_row(r)
                    for parity, base in ((0, d), (1, b.gep(d, [d1]))):
                        split = v.lanes_of(v0, v1, parity)
                        v.mstore(split, base, c(0), mask)
                        v.mstore(split, base, b.sub(n, c(half)), upper)
            with cgutils.for_range_slice(b, mul(blocks, block), nrows, c(1), intp=v.idx) as (r, _):
                row(r)
        with wide:
            with cgutils.for_range(b, nrows, intp=v.idx) as rows:
                row(rows.index)


class _LayerIR:
    """The IR of one call of a layer kernel (see :func:`_depthwise_layer`): per input channel its
    copy, then per output channel the taps' weights, one accumulator per kernel row when unrolled
    (chains of kw FMAs, not kh * kw), the vectors of outputs and their epilogue."""

    def __init__(self, context, builder, signature, args, kh, kw, sw, flat):
        aty = signature.args

        def data(k):
            return context.make_array(aty[k])(context, builder, args[k]).data

        self.b, self.kh, self.kw, self.sw, self.is_flat = builder, kh, kw, sw, flat
        (self.outp, self.resp, self.xp, self.xpp, self.tp, self.bp, self.colp, self.krowp,
         self.drowp) = (data(k) for k in (0, 1, 3, 4, 5, 6, 9, 10, 11))
        self.nb = builder.extract_value(context.make_array(aty[6])(
            context, builder, args[6]).shape, 0)
        (self.oh, self.ow, self.wq, self.sh, self.dh, self.dw, self.pw, self.hq, self.kh_rt,
         self.kw_rt) = cgutils.unpack_tuple(builder, args[12])
        self.t0, self.t1, self.c, self.mult, self.h, self.w, self.copy = cgutils.unpack_tuple(
            builder, args[13])
        self.v = v = _Vec(builder, context.get_value_type(aty[0].dtype))
        self.lo, self.hi = v.splat(args[7]), v.splat(args[8])
        self.use_res = builder.icmp_signed("!=", args[2], v.const(0))
        self.accs = [cgutils.alloca_once(builder, v.vty) for _ in range(max(kh, 1))]
        self.fty = self.v.vty.element

    def emit(self):
        """For t in [t0, t1): copy input plane t, then its mult output planes."""
        b, v, c = self.b, self.v, self.v.const
        add, mul = b.add, b.mul
        npix = mul(self.oh, self.ow)
        hw = mul(self.h, self.w)
        self.prepare()
        ci_p = cgutils.alloca_once_value(b, b.urem(self.t0, self.c))
        with cgutils.for_range_slice(b, self.t0, self.t1, c(1), intp=v.idx) as (t, _):
            self.copy_in(b.gep(self.xp, [mul(t, hw)]))
            ci = b.load(ci_p)
            with cgutils.for_range(b, self.mult, intp=v.idx) as m:
                co = add(mul(ci, self.mult), m.index)
                self.plane(co, mul(add(mul(t, self.mult), m.index), npix))
            nxt = add(ci, c(1))
            b.store(b.select(b.icmp_signed("<", nxt, self.c), nxt, c(0)), ci_p)

    def copy_in(self, src):
        """Input plane ``src`` into the planes, as _depthwise_layout says (``copy``)."""
        b, v, c = self.b, self.v, self.v.const
        dst = self.xpp  # drows include SLACK
        if self.is_flat and self.sw == 2:
            _split_rows_ir(v, dst, self.drowp, b.mul(self.hq, self.wq), src, self.w, self.h,
                           self.wq, self.sh)
            return
        whole = b.icmp_signed("==", self.copy, c(0))
        with b.if_else(whole) as (one, rows):
            with one:  # one contiguous copy (FLAT at stride 1)
                _copy_rows_ir(v, dst, self.drowp, src, c(0), c(1), b.mul(self.h, self.w))
            with rows:
                _copy_rows_ir(v, dst, self.drowp, src, self.w, self.h, self.w)

    def prepare(self):
        """FLAT, unrolled: where each (kernel row, column phase) starts, before every loop."""
        c, kh, kw, sw = self.v.const, self.kh, self.kw, self.sw
        self.bases = {}
        if self.is_flat:
            pw_c = (kw - 1) // 2
            for ki in range(kh):
                for kj in range(kw):
                    key = (ki, (kj - pw_c) % sw)
                    if key not in self.bases:
                        self.bases[key] = self.flat_base(c(ki), c(kj))

    def flat_base(self, kiv, kjv):
        """FLAT: where tap (ki, kj) of pixel 0 lies, but for its column offset: kernel row ki's
        offset (krows) in column phase (kj dw - pw) % sw."""
        b, c, sw = self.b, self.v.const, self.sw
        row = b.load(b.gep(self.krowp, [kiv]))
        phase = b.mul(b.urem(self.tap_x(kjv), c(sw)), b.mul(self.hq, self.wq))
        return b.gep(self.xpp, [b.add(c(SLACK), b.add(row, phase))])

    def tap_x(self, kjv):
        """kj dw - pw + sw: the tap's column, shifted to be >= 0."""
        b = self.b
        return b.add(b.mul(kjv, self.dw), b.sub(self.v.const(self.sw), self.pw))

    def plane(self, co, oi):
        """Output plane ``co`` at out[oi:]: its bias and weights, then its vectors."""
        b, v, kh, kw = self.b, self.v, self.kh, self.kw
        before = b.block
        with b.if_then(b.icmp_signed(">", self.nb, v.const(0))):  # b may be empty
            loaded = b.load(b.gep(self.bp, [co]))
            after = b.block
        bias = b.phi(self.fty)
        bias.add_incoming(ir.Constant(self.fty, 0.0), before)
        bias.add_incoming(loaded, after)
        self.bias = v.splat(bias)
        self.wbase = b.gep(self.tp, [b.mul(co, b.mul(self.kh_rt, self.kw_rt))])
        # the unrolled kernel's weights, broadcast once per plane
        self.tap_w = {(ki, kj): v.splat(b.load(b.gep(self.wbase, [v.const(ki * kw + kj)])))
                      for ki in range(kh) for kj in range(kw)}
        if self.is_flat:
            self.flat(oi)
        else:
            self.rows(oi)

    def each(self, n, n_rt, fn):
        """fn(python index or None, LLVM index) for n indices (unrolled) or n_rt (a loop)."""
        if n:
            for k in range(n):
                fn(k, self.v.const(k))
        else:
            with cgutils.for_range(self.b, n_rt, intp=self.v.idx) as loop:
                fn(None, loop.index)

    def start(self):
        for k, acc in enumerate(self.accs):
            self.b.store(self.bias if k == 0 else self.v.zero, acc)

    def fma(self, ki, kj, kiv, kjv, xv, mask=None):
        """Add tap (ki, kj) times ``xv`` (in the lanes of ``mask``) to kernel row ki's sum."""
        b = self.b
        if self.kh:
            wv = self.tap_w[ki, kj]
        else:
            wv = self.v.splat(b.load(b.gep(self.wbase, [b.add(b.mul(kiv, self.kw_rt), kjv)])))
        accp = self.accs[ki or 0]
        acc = b.load(accp)
        new = self.v.fma(wv, xv, acc)
        b.store(new if mask is None else b.select(mask, new, acc), accp)

    def finish(self, ooff, count):
        """``out[ooff + l] = clamp(sum + res[ooff + l])`` for the first ``count`` lanes."""
        b, v = self.b, self.v
        smask = v.first(count)
        acc = b.load(self.accs[0])
        for accp in self.accs[1:]:
            acc = b.fadd(acc, b.load(accp))
        before = b.block
        with b.if_then(self.use_res):
            summed = b.fadd(acc, v.mload(self.resp, ooff, smask))
            added = b.block
        merged = b.phi(v.vty)
        merged.add_incoming(acc, before)
        merged.add_incoming(summed, added)
        # clamp as compare + select: keeps NaN like the reference, one vmaxps/vminps each
        acc = b.select(b.fcmp_ordered("<", merged, self.lo), self.lo, merged)
        acc = b.select(b.fcmp_ordered(">", acc, self.hi), self.hi, acc)
        v.mstore(acc, self.outp, ooff, smask)

    def flat(self, oi):
        """FLAT: vectors of consecutive pixels p0 + l; tap (ki, kj) at its phase plane's base
        + krows[ki] + p + floor((kj dw - pw) / sw), masked where that column leaves the row."""
        b, v, c, kh, kw, sw = self.b, self.v, self.v.const, self.kh, self.kw, self.sw
        npix = b.mul(self.oh, self.ow)
        wq32 = v.splat32(self.wq)
        pw_c = (kw - 1) // 2
        with cgutils.for_range_slice(b, c(0), npix, c(v.lanes), intp=v.idx) as (p0, _):
            self.start()
            qs = v.load_i32(self.colp, p0)
            masks = {}

            def tap(ki, kj, kiv, kjv):
                if kj is None:
                    dx = b.sub(b.udiv(self.tap_x(kjv), c(sw)), c(1))
                    mask = v.below(b.add(qs, v.splat32(dx)), wq32)
                    xv = v.load(b.gep(self.flat_base(kiv, kjv), [p0]), dx)
                else:  # unrolled: dilation 1, pw = (kw - 1) // 2
                    dx = (kj - pw_c) // sw
                    if dx and dx not in masks:  # the centre columns never read padding
                        masks[dx] = v.below(b.add(qs, v.splat32(dx)), wq32)
                    mask = masks.get(dx)
                    xv = v.load(b.gep(self.bases[ki, (kj - pw_c) % sw], [p0]), c(dx))
                self.fma(ki, kj, kiv, kjv, xv, mask)

            self.each(kh, self.kh_rt, lambda ki, kiv: self.each(
                kw, self.kw_rt, lambda kj, kjv: tap(ki, kj, kiv, kjv)))
            self.finish(b.add(oi, p0), b.sub(npix, p0))

    def rows(self, oi):
        """ROW: vectors along output row r from column q0; tap (ki, kj) at padded row
        r sh + ki dh, column q0 sw + kj dw (+ 2 l for lane l at stride 2: a pair, even lanes)."""
        b, v, c, sw = self.b, self.v, self.v.const, self.sw
        with cgutils.for_range(b, self.oh, intp=v.idx) as rloop:
            rsh = b.mul(rloop.index, self.sh)
            orow = b.add(oi, b.mul(rloop.index, self.ow))
            with cgutils.for_range_slice(b, c(0), self.ow, c(v.lanes), intp=v.idx) as (q0, _):
                self.start()

                def tap(kiv, kjv):
                    y = b.add(rsh, b.mul(kiv, self.dh))
                    at = b.add(c(SLACK), b.add(b.mul(y, self.wq), b.add(
                        b.mul(q0, c(sw)), b.mul(kjv, self.dw))))
                    xv = v.load(self.xpp, at)
                    if sw == 2:
                        xv = v.lanes_of(xv, v.load(self.xpp, b.add(at, c(v.lanes))), 0)
                    self.fma(None, None, kiv, kjv, xv)

                self.each(0, self.kh_rt, lambda ki, kiv: self.each(
                    0, self.kw_rt, lambda kj, kjv: tap(kiv, kjv)))
                self.finish(b.add(orow, q0), b.sub(self.ow, q0))


def _depthwise_layer(kh: int, kw: int, sw: int, flat: bool):
    """The layer kernel for column stride ``sw`` (1 or 2) in layout FLAT or ROW (see above), for
    a kh x kw kernel unrolled (dilation 1, and pw = (kw - 1) // 2 in FLAT) or, with kh = kw = 0,
    any kernel and dilation, as loops. As LLVM IR, generic in the float type: for the input
    planes t in [t0, t1) (t = image * c + channel; ``tasks`` = (t0, t1, c, mult, h, w, copy)),
    the plane's copy into ``xp`` as :func:`_depthwise_layout` lays it out, then for its mult
    output channels co ``out[plane + r * ow + q] = clamp(sum_{ki, kj} taps[co, ki, kj] *
    x[t, r sh + ki dh - ph, q sw + kj dw - pw] + b[co] (+ res[plane + ...] if has_res), lo, hi)``
    for r < oh, q < ow; ``geom`` = (oh, ow, wq, sh, dh, dw, pw, hq, kh, kw). One kernel for the
    whole range: a call per plane cost 25-40 % on 7x7 planes.
    """

    @intrinsic
    def layer(typingctx, out, res, has_res, x, xp, taps, b, lo, hi, cols, krows, drows, geom,
              tasks):
        i, f = types.intp, out.dtype
        sig = types.void(out, res, i, x, xp, taps, b, f, f, cols, krows, drows, geom, tasks)

        def codegen(context, builder, signature, args):
            _LayerIR(context, builder, signature, args, kh, kw, sw, flat).emit()
            return context.get_dummy_value()

        return sig, codegen

    return layer


# the FLAT kernels unrolled for 3x3 and 5x5 or for any kernel, the ROW kernels for any kernel
_flat1_33, _flat1_55, _flat1_any, _flat2_33, _flat2_55, _flat2_any = (
    _depthwise_layer(k, k, s, True) for s in (1, 2) for k in (3, 5, 0))
_row1_any, _row2_any = (_depthwise_layer(0, 0, s, False) for s in (1, 2))


@njit(cache=True)
def _layer_scalar(out, res, has_res, x, xp, taps, b, lo, hi, geom, tasks, sw, ph, pw):
    """A ROW layer kernel's result for any column stride, as plain loops (strides above 2)."""
    oh, ow, wq, sh, dh, dw, _, _, kh, kw = geom
    t0, t1, c, mult, h, w, _ = tasks
    for t in range(t0, t1):
        for y in range(h):
            for j in range(w):
                xp[SLACK + (y + ph) * wq + pw + j] = x[(t * h + y) * w + j]
        for m in range(mult):
            co = (t % c) * mult + m
            for r in range(oh):
                for q in range(ow):
                    acc = b[co] if b.shape[0] > 0 else 0.0
                    for ki in range(kh):
                        for kj in range(kw):
                            pos = SLACK + (r * sh + ki * dh) * wq + q * sw + kj * dw
                            acc += taps[(co * kh + ki) * kw + kj] * xp[pos]
                    p = ((t * mult + m) * oh + r) * ow + q
                    if has_res:
                        acc += res[p]
                    out[p] = min(max(acc, lo), hi)


@njit(cache=True)
def _depthwise_layout(geom, dtype_of):
    """The copied planes of one thread (FLAT: sh * sw phase planes of hq rows of ow columns; ROW:
    one zero-padded plane), zeroed once: the copies only write the interior. With them:
    ``cols`` (each flat pixel's column), ``krows`` (FLAT: where kernel row ki starts, phase
    (ki dh) % sh at row (ki dh) // sh), ``drows`` (where each input row is copied to; a single
    entry when the plane is one contiguous copy), the layer kernel's geometry and which kernel."""
    c, o, h, w, oh, ow, kh, kw, sh, sw, ph, pw, dh, dw = geom
    npix = oh * ow
    # FLAT taps reach pw before a plane and (kw - 1) dw - pw + 16 after one: within SLACK
    flat = sw <= 2 and w == sw * ow and pw < SLACK // 2 and (kw - 1) * dw < SLACK // 2
    wq, hq = (ow, (h + 2 * ph + sh - 1) // sh + 1) if flat else (w + 2 * pw, h + 2 * ph)
    xp = np.zeros((sh * sw if flat else 1) * hq * wq + 2 * SLACK, dtype_of.dtype)
    cols = np.empty(npix + 16, np.int32)
    for p in range(npix + 16):
        cols[p] = p % ow
    krows = np.empty(kh, np.intp)
    for ki in range(kh):
        krows[ki] = (((ki * dh) % sh) * sw * hq + (ki * dh) // sh) * wq
    whole = flat and sh == 1 and sw == 1
    drows = np.empty(1 if whole else h, np.intp)
    for y in range(drows.shape[0]):
        yy = y + ph
        drows[y] = SLACK + ((((yy % sh) * sw * hq + yy // sh) * wq) if flat else yy * wq + pw)
    unrolled = dh == 1 and dw == 1 and kh == kw and pw == (kw - 1) // 2
    k = 0 if unrolled and kh == 3 else 1 if unrolled and kh == 5 else 2
    # 0-5: FLAT at stride 1, 2 for 3x3, 5x5, any; 6, 7: ROW at stride 1, 2; 8: scalar loops
    kind = (k if sw == 1 else 3 + k) if flat else 6 if sw == 1 else 7 if sw == 2 else 8
    copy = 0 if whole else 1 if flat and sw == 2 else 2  # whole plane, split rows, rows
    return xp, cols, krows, drows, (oh, ow, wq, sh, dh, dw, pw, hq, kh, kw), kind, copy


@njit(cache=True)
def _depthwise_tasks(x, taps, b, res, out, geom, act, lo, hi, t0, t1):
    """Input planes [t0, t1) (image * c + channel) through the layer kernel, then an activation
    other than a clamp over the output planes written. ``x``, ``taps``, ``out`` and ``res`` are
    flat; ``res`` may be empty."""
    c, o, h, w, oh, ow, kh, kw, sh, sw, ph, pw = geom[:12]
    mult = o // c
    xp, cols, krows, drows, pg, kind, copy = _depthwise_layout(geom, x[:0])
    has_res = 1 if res.shape[0] > 0 else 0
    # clamps run in the layer kernel; any other activation afterwards, over the written planes
    clo = x.dtype.type(lo if act == CLIP else 0.0 if act == RELU else -np.inf)
    chi = x.dtype.type(hi if act == CLIP else np.inf)
    tasks = (t0, t1, c, mult, h, w, copy)
    args = (out, res, has_res, x, xp, taps, b, clo, chi, cols, krows, drows, pg, tasks)
    if kind == 0:
        _flat1_33(*args)
    elif kind == 1:
        _flat1_55(*args)
    elif kind == 2:
        _flat1_any(*args)
    elif kind == 3:
        _flat2_33(*args)
    elif kind == 4:
        _flat2_55(*args)
    elif kind == 5:
        _flat2_any(*args)
    elif kind == 6:
        _row1_any(*args)
    elif kind == 7:
        _row2_any(*args)
    else:
        _layer_scalar(out, res, has_res, x, xp, taps, b, clo, chi, pg, tasks, sw, ph, pw)
    if act != NONE and act != RELU and act != CLIP:
        act_inplace(out[t0 * mult * oh * ow : t1 * mult * oh * ow], act, lo, hi)


@njit(parallel=True, cache=True)
def _depthwise_parallel(x, taps, b, res, out, geom, act, lo, hi, total, chunks):
    for ch in prange(chunks):
        _depthwise_tasks(x, taps, b, res, out, geom, act, lo, hi, ch * total // chunks,
                         (ch + 1) * total // chunks)


@njit(cache=True)
def conv2d_depthwise(x, w, b, res, out, sh, sw, ph, pw, dh, dw, act, lo, hi, nthreads):
    """Depthwise conv2d (groups == C, O = multiplier * C; any kernel, stride, padding, dilation;
    float32 or float64) of NCHW ``x`` with OIHW ``w`` and the fused epilogue ``act(y + b +
    res)``; ``b`` (O,) and ``res`` (like ``out``) may have size 0. (image, channel) tasks are
    shared among ``nthreads``; a layer too small to be worth a parallel region runs on the
    calling thread."""
    n, c, h, wid = x.shape
    o, _, kh, kw = w.shape
    oh, ow = out.shape[2], out.shape[3]
    geom = (c, o, h, wid, oh, ow, kh, kw, sh, sw, ph, pw, dh, dw)
    xf, taps, outf, resf = x.reshape(-1), w.reshape(-1), out.reshape(-1), res.reshape(-1)
    total = n * c
    chunks = max(1, min(nthreads, total, n * o * oh * ow * kh * kw // PAR_MACS_DIRECT))
    if chunks == 1:
        _depthwise_tasks(xf, taps, b, resf, outf, geom, act, lo, hi, 0, total)
    else:
        _depthwise_parallel(xf, taps, b, resf, outf, geom, act, lo, hi, total, chunks)


@njit(parallel=True, cache=True)
def linear(x, w, b, res, out, act, lo, hi, nthreads):
    """``out = act(x @ w.T + b + res)`` on (M, K) inputs. Blocks of rows, or with fewer than 8
    rows per thread blocks of output columns, in parallel, once the product has PAR_MACS per
    thread: a batch-1 classifier head (1280 -> 1000) is a matrix-vector product that one thread
    ran at one core's memory bandwidth (0.32 ms in MobileNetV2 on 2 threads)."""
    m, n, k = x.shape[0], w.shape[0], x.shape[1]
    threads = max(1, min(nthreads, m * n * k // PAR_MACS))
    rsplit = max(1, min(threads, m // 8))
    csplit = max(1, min(threads // rsplit, n // LANES))
    total = rsplit * csplit
    for ch in prange(total):
        ri, cj = ch // csplit, ch % csplit
        m0, m1 = ri * m // rsplit, (ri + 1) * m // rsplit
        # column blocks of whole vectors
        n0 = cj * (n // LANES) // csplit * LANES
        n1 = n if cj == csplit - 1 else (cj + 1) * (n // LANES) // csplit * LANES
        acc = np.empty((m1 - m0, n1 - n0), x.dtype)
        np.dot(x[m0:m1], w[n0:n1].T, acc)
        for i in range(m1 - m0):
            row = acc[i]
            if b.shape[0] > 0:
                for j in range(n1 - n0):
                    row[j] += b[n0 + j]
            r = res[m0 + i, n0:n1] if res.shape[0] > 0 else acc[0, 0:0]
            finish_row(row, out[m0 + i, n0:n1], 0.0, r, act, lo, hi)


@njit(parallel=True, cache=True)
def matmul(a, b, out, nthreads):
    """Batched ``out[i] = a[i or 0] @ b[i or 0]`` on (Ba, M, K) and (Bb, K, N) views; batches, or
    row blocks of a single product, in parallel."""
    nb, m = out.shape[0], out.shape[1]
    split = max(1, min((nthreads + nb - 1) // nb, m // 16))
    total = nb * split
    chunks = min(nthreads, total)
    for ch in prange(chunks):
        for t in range(ch * total // chunks, (ch + 1) * total // chunks):
            i, s = t // split, t % split
            m0, m1 = s * m // split, (s + 1) * m // split
            left = a[i if a.shape[0] > 1 else 0]
            right = b[i if b.shape[0] > 1 else 0]
            np.dot(left[m0:m1], right, out[i, m0:m1])


@njit(parallel=True, cache=True)
def attention(q, k, v, mask, out, scale, causal, nthreads):
    """Scaled dot-product attention on (B, L, E) views: ``softmax(q @ k.T * scale + mask) @ v``.
    ``mask`` is additive, (1 or B, Lq, Lk), or size 0; ``causal`` keeps key j <= query i."""
    nb, lq, lk = q.shape[0], q.shape[1], k.shape[1]
    chunks = min(nthreads, nb)
    for ch in prange(chunks):
        s = np.empty((lq, lk), q.dtype)
        for i in range(ch * nb // chunks, (ch + 1) * nb // chunks):
            np.dot(q[i], k[i].T, s)
            mk = mask[i if mask.shape[0] > 1 else 0] if mask.shape[0] > 0 else s[0:0]
            for r in range(lq):
                for c in range(lk):
                    val = s[r, c] * scale
                    if mk.shape[0] > 0:
                        val += mk[r, c]
                    if causal and c > r:
                        val = -math.inf
                    s[r, c] = val
            softmax_rows(s)
            np.dot(s, v[i], out[i])


# -- pooling ---------------------------------------------------------------------------------------


@njit(cache=True)
def _max_plane(plane, dst, hmax, kh, kw, sh, sw, ph, pw, dh, dw):
    """One plane of max_pool2d, separably: each input row's max over the kernel's columns into
    ``hmax`` (H, OW) once, then each output row the max of its kernel rows' ``hmax`` rows. The
    loops index flat arrays with unsigned offsets and are inline, not helper calls on views:
    rows are short (56 outputs on resnet18's pool), and a call with its views cost ~45 ns, as much
    as its work; signed indices keep numba's wraparound check, which stops LLVM vectorising, and
    so does the builtin ``max`` (``np.maximum`` of two scalars vectorises, and propagates NaN as
    the reference's ``max`` over a window does)."""
    hgt, wid = plane.shape
    oh, ow = dst.shape
    xf, hf, df = plane.reshape(-1), hmax.reshape(-1), dst.reshape(-1)
    u = numba.uint64
    for y in range(hgt):
        row = u(y * ow)
        for q in range(u(ow)):
            hf[row + q] = -np.inf
        for j in range(kw):
            off = j * dw - pw
            q0, q1 = _valid_range(off, sw, wid, ow)
            if q1 <= q0:
                continue
            at, n = u(y * wid + q0 * sw + off), u(q1 - q0)
            out = row + u(q0)
            if sw == 1:
                for q in range(n):
                    hf[out + q] = np.maximum(hf[out + q], xf[at + q])
            elif sw == 2:
                for q in range(n):
                    hf[out + q] = np.maximum(hf[out + q], xf[at + u(2) * q])
            else:
                step = u(sw)
                for q in range(n):
                    hf[out + q] = np.maximum(hf[out + q], xf[at + step * q])
    for r in range(oh):
        d = u(r * ow)
        for q in range(u(ow)):
            df[d + q] = -np.inf
        for i in range(kh):
            ih = r * sh - ph + i * dh
            if 0 <= ih < hgt:
                h = u(ih * ow)
                for q in range(u(ow)):
                    df[d + q] = np.maximum(df[d + q], hf[h + q])


@njit(parallel=True, cache=True)
def max_pool2d(x, out, kh, kw, sh, sw, ph, pw, dh, dw):
    """Max over each window, separably (_max_plane); a window of padding only gives -inf (like
    the reference). The old kernel took the max of all kh x kw taps per output row, a strided
    pass each: 1.7-2.2 ms on resnet18's 3x3/2 pool of 64x112x112 against ORT's 0.23-0.39."""
    n, c, hgt, wid = x.shape
    ow = out.shape[3]
    for t in prange(n * c):
        hmax = np.empty((hgt, ow), x.dtype)
        _max_plane(x[t // c, t % c], out[t // c, t % c], hmax, kh, kw, sh, sw, ph, pw, dh, dw)


@njit(cache=True)
def avg_pool2d(x, out, kh, kw, sh, sw, ph, pw, count_include_pad):
    """Mean over each window; the divisor counts padding (not the ceil-mode overhang) when
    ``count_include_pad``, else only the input positions in the window."""
    n, c, hgt, wid = x.shape
    oh, ow = out.shape[2], out.shape[3]
    for t in prange(n * c):
        plane, dst = x[t // c, t % c], out[t // c, t % c]
        for r in range(oh):
            row = dst[r]
            row[:] = 0.0
            for i in range(kh):
                ih = r * sh - ph + i
                if ih < 0 or ih >= hgt:
                    continue
                src = plane[ih]
                for j in range(kw):
                    q0, q1 = _valid_range(j - pw, sw, wid, ow)
                    _axpy_row(row, src, 1.0, q0, q1, sw, j - pw)
            h0, h1 = r * sh - ph, r * sh - ph + kh
            for q in range(ow):
                w0, w1 = q * sw - pw, q * sw - pw + kw
                if count_include_pad:
                    cnt = (min(h1, hgt + ph) - h0) * (min(w1, wid + pw) - w0)
                else:
                    cnt = (min(h1, hgt) - max(h0, 0)) * (min(w1, wid) - max(w0, 0))
                row[q] /= cnt


@njit(cache=True, fastmath={"reassoc"})
def _plane_means(x, out, size):
    """``out[t] = mean(x[t * size : (t + 1) * size])`` on flat arrays. Reassociation and unsigned
    indices let LLVM keep vectors of partial sums: the in-order sum of the general loop below
    took ~2 ns per element (126 us for MobileNetV2's 1280 x 7 x 7 global pool; signed indices
    38 us, reassociation alone 44, both 11.5)."""
    usize = numba.uint64(size)
    for t in range(out.shape[0]):
        base = numba.uint64(t) * usize
        acc = 0.0
        for k in range(usize):
            acc += x[base + k]
        out[t] = acc / size


@njit(cache=True)
def adaptive_pool2d(x, out, is_max):
    """Adaptive average or max pooling over torch's bins [floor(i*H/OH), ceil((i+1)*H/OH))."""
    n, c, hgt, wid = x.shape
    oh, ow = out.shape[2], out.shape[3]
    if oh == 1 and ow == 1 and not is_max:  # global average pooling
        _plane_means(x.reshape(-1), out.reshape(-1), hgt * wid)
        return
    for t in prange(n * c):
        plane, dst = x[t // c, t % c], out[t // c, t % c]
        for i in range(oh):
            h0, h1 = i * hgt // oh, -(-(i + 1) * hgt // oh)
            for j in range(ow):
                w0, w1 = j * wid // ow, -(-(j + 1) * wid // ow)
                acc = -np.inf if is_max else 0.0
                for r in range(h0, h1):
                    for q in range(w0, w1):
                        acc = max(acc, plane[r, q]) if is_max else acc + plane[r, q]
                dst[i, j] = acc if is_max else acc / ((h1 - h0) * (w1 - w0))
