"""The depthwise conv2d of the numba backend (groups == C, any channel multiplier, kernel, stride,
padding and dilation; float32 and float64): a direct convolution whose plane kernels are LLVM IR
written with ``numba.extending.intrinsic``. The generated code calls it as
``KC.conv2d_depthwise`` (re-exported by numba_kernels_conv). Saved packages get a copy as
``kernels_dw.py``.
"""

from __future__ import annotations

import functools

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .common import CLIP, HAS_AVX512, NONE, RELU, act_inplace

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
        self._load = declare(
            ir.FunctionType(self.vty, [vp, i32, mty, self.vty]), f"llvm.masked.load.{name}.p0"
        )
        self._store = declare(
            ir.FunctionType(ir.VoidType(), [self.vty, vp, i32, mty]), f"llvm.masked.store.{name}.p0"
        )

    def const(self, value):
        return ir.Constant(self.idx, value)

    def splat(self, value):
        vec = ir.Constant(ir.VectorType(value.type, self.lanes), ir.Undefined)
        one = self.b.insert_element(vec, value, ir.Constant(self.i32, 0))
        zeros = ir.Constant(ir.VectorType(self.i32, self.lanes), [0] * self.lanes)
        return self.b.shuffle_vector(one, vec, zeros)

    def splat32(self, value):
        return self.splat(
            self.b.trunc(value, self.i32)
            if isinstance(value, ir.Value)
            else ir.Constant(self.i32, value)
        )

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

    def load_part(self, whole, base, offset, mask):
        """A plain load where ``whole`` (an i1: every lane valid), else a masked one; masked
        loads and stores (vmaskmovps) are slow on Zen 3, so only a partial vector takes them."""
        with self.b.if_else(whole, likely=True) as (plain, masked):
            with plain:
                full = self.load(base, offset)
                full_block = self.b.block
            with masked:
                part = self.mload(base, offset, mask)
                part_block = self.b.block
        value = self.b.phi(self.vty)
        value.add_incoming(full, full_block)
        value.add_incoming(part, part_block)
        return value

    def store_part(self, whole, value, base, offset, mask):
        """A plain store where ``whole``, else a masked one (see :meth:`load_part`)."""
        with self.b.if_else(whole, likely=True) as (plain, masked):
            with plain:
                self.store(value, base, offset)
            with masked:
                self.mstore(value, base, offset, mask)

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
        (
            self.outp,
            self.resp,
            self.xp,
            self.xpp,
            self.tp,
            self.bp,
            self.colp,
            self.krowp,
            self.drowp,
        ) = (data(k) for k in (0, 1, 3, 4, 5, 6, 9, 10, 11))
        self.nb = builder.extract_value(
            context.make_array(aty[6])(context, builder, args[6]).shape, 0
        )
        (
            self.oh,
            self.ow,
            self.wq,
            self.sh,
            self.dh,
            self.dw,
            self.pw,
            self.hq,
            self.kh_rt,
            self.kw_rt,
        ) = cgutils.unpack_tuple(builder, args[12])
        self.t0, self.t1, self.c, self.mult, self.h, self.w, self.copy = cgutils.unpack_tuple(
            builder, args[13]
        )
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
            _split_rows_ir(
                v, dst, self.drowp, b.mul(self.hq, self.wq), src, self.w, self.h, self.wq, self.sh
            )
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
        self.tap_w = {
            (ki, kj): v.splat(b.load(b.gep(self.wbase, [v.const(ki * kw + kj)])))
            for ki in range(kh)
            for kj in range(kw)
        }
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
        # a whole vector loads and stores plainly, only a plane's (or row's) last one under the
        # mask: with a masked store per vector 144 x 56 x 56 stride 1 took 584 us at 1 thread on
        # the Zen 3, without 355 (ORT's in-model layer: 430)
        whole = b.icmp_signed(">=", count, v.const(v.lanes))
        before = b.block
        with b.if_then(self.use_res):
            summed = b.fadd(acc, v.load_part(whole, self.resp, ooff, smask))
            added = b.block
        merged = b.phi(v.vty)
        merged.add_incoming(acc, before)
        merged.add_incoming(summed, added)
        # clamp as compare + select: keeps NaN like the reference, one vmaxps/vminps each
        acc = b.select(b.fcmp_ordered("<", merged, self.lo), self.lo, merged)
        acc = b.select(b.fcmp_ordered(">", acc, self.hi), self.hi, acc)
        v.store_part(whole, acc, self.outp, ooff, smask)

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

            self.each(
                kh,
                self.kh_rt,
                lambda ki, kiv: self.each(kw, self.kw_rt, lambda kj, kjv: tap(ki, kj, kiv, kjv)),
            )
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
                    at = b.add(
                        c(SLACK),
                        b.add(b.mul(y, self.wq), b.add(b.mul(q0, c(sw)), b.mul(kjv, self.dw))),
                    )
                    xv = v.load(self.xpp, at)
                    if sw == 2:
                        xv = v.lanes_of(xv, v.load(self.xpp, b.add(at, c(v.lanes))), 0)
                    self.fma(None, None, kiv, kjv, xv)

                self.each(
                    0,
                    self.kh_rt,
                    lambda ki, kiv: self.each(0, self.kw_rt, lambda kj, kjv: tap(kiv, kjv)),
                )
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
    def layer(
        typingctx, out, res, has_res, x, xp, taps, b, lo, hi, cols, krows, drows, geom, tasks
    ):
        i, f = types.intp, out.dtype
        sig = types.void(out, res, i, x, xp, taps, b, f, f, cols, krows, drows, geom, tasks)

        def codegen(context, builder, signature, args):
            _LayerIR(context, builder, signature, args, kh, kw, sw, flat).emit()
            return context.get_dummy_value()

        return sig, codegen

    return layer


# the FLAT kernels unrolled for 3x3 and 5x5 or for any kernel, the ROW kernels for any kernel
_flat1_33, _flat1_55, _flat1_any, _flat2_33, _flat2_55, _flat2_any = (
    _depthwise_layer(k, k, s, True) for s in (1, 2) for k in (3, 5, 0)
)
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
        _depthwise_tasks(
            x,
            taps,
            b,
            res,
            out,
            geom,
            act,
            lo,
            hi,
            ch * total // chunks,
            (ch + 1) * total // chunks,
        )


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
