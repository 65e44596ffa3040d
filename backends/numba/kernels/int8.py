"""Integer kernels of the numba backend: uint8 x int8 convolution (dense, depthwise, grouped)
and linear with int32 accumulation, fused bias, residual, relu/clip and requantization.

LLVM (through numba) does not emit AVX-512 VNNI's ``vpdpbusd`` for any int8 loop (its
auto-vectoriser never forms it), so the inner product of dense convs and linears is an explicit
intrinsic: :func:`_dot_rows` builds the LLVM IR of a loop that multiplies 4 uint8 of each of
``R`` activation rows (broadcast) with a packed 64-byte block of int8 weights (16 output channels
x 4 inputs) and accumulates 16 int32 lanes per row in registers (``vpdpbusd`` on CPUs with
AVX-512 VNNI; elsewhere the same sums through 16-bit products, :func:`_widening_step`, since LLVM
aborts on the VNNI intrinsic where the CPU lacks it). Weights are packed once at
compile time as ``(O/16, K/4, 16, 4)``; activations are im2col'ed in uint8, channel-last, padded
with their zero point (which is the value 0.0). Depthwise and grouped convs have too few inputs
per output for that layout; :func:`conv2d_grouped_u8s8` is a direct loop that LLVM vectorises.

``y = act((acc - z_x * sum_k w) * s_x * s_w + b + residual)``, then either written as float32 or
requantized ``clip(rint(y / s_y) + z_y, 0, 255)`` into uint8 (ONNX Runtime's requantization
too: float scale, round half to even), all in float32.

Every kernel takes ``nthreads`` (the generated code passes numba's thread count) and splits a
large layer over that many threads; see "threads" below.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

# the activation codes, shared with the float kernels (whose import also sets the threading layer)
from .common import CLIP, CPU_FEATURES, NONE, RELU, reduction_loop  # noqa: F401

ROWS = 4  # activation rows per micro-kernel call (independent accumulator chains)
TILE_BYTES = 1 << 18  # one conv tile's im2col and accumulators: within L2
# MACs a layer needs per thread before it is split: 100 us or more on one core, twice what
# entering a parallel region costs. The direct kernel does ~10 GMAC/s, the GEMM ones 10-60.
PAR_MACS_GEMM = 1 << 22
PAR_MACS_DIRECT = 1 << 20


def _vnni_step(builder, acc, av, bv):
    """``acc + vpdpbusd(av, bv)``: one AVX-512 VNNI instruction (u8 x s8, 4 products per lane)."""
    v16 = acc.type
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(v16, [v16, v16, v16]), "llvm.x86.avx512.vpdpbusd.512"
    )
    return builder.call(fn, [acc, av, bv])


def _widening_step(builder, acc, av, bv):
    """What :func:`_vnni_step` computes, in generic IR for CPUs without AVX-512 VNNI (LLVM cannot
    select that intrinsic there and aborts the process): widen to i16, multiply (exact: |u8 x s8|
    < 2^15), add pairs in i32 in the form LLVM turns into ``vpmaddwd`` on x86, then add those
    pairs into the 16 lanes."""
    i16, i32 = ir.IntType(16), ir.IntType(32)

    def take(v, start, n):
        return builder.shuffle_vector(
            v,
            ir.Constant(v.type, ir.Undefined),
            ir.Constant(ir.VectorType(i32, n), list(range(start, 2 * n, 2))),
        )

    v64 = ir.VectorType(ir.IntType(8), 64)
    a16 = builder.zext(builder.bitcast(av, v64), ir.VectorType(i16, 64))
    b16 = builder.sext(builder.bitcast(bv, v64), ir.VectorType(i16, 64))
    wide = ir.VectorType(i32, 32)
    pairs = builder.add(
        *(
            builder.mul(builder.sext(take(a16, h, 32), wide), builder.sext(take(b16, h, 32), wide))
            for h in (0, 1)
        )
    )
    return builder.add(acc, builder.add(take(pairs, 0, 16), take(pairs, 1, 16)))


# vpdpbusd.512 needs AVX-512 VNNI; the form that runs everywhere else is exact too, and slower
HAS_VNNI = {"avx512f", "avx512bw", "avx512vnni"} <= CPU_FEATURES
_dot_step = _vnni_step if HAS_VNNI else _widening_step


def _dot_rows(rows: int):
    """``c[ci + r*ldc : +16] = sum_k a[ai + r*lda + 4k : +4] . b[bi + 64k : +64]`` for r < rows."""

    @intrinsic
    def dot(typingctx, c, ci, ldc, a, ai, lda, b, bi, n):
        sig = types.void(
            c, types.intp, types.intp, a, types.intp, types.intp, b, types.intp, types.intp
        )

        def codegen(context, builder, signature, args):
            c, ci, ldc, a, ai, lda, b, bi, n = args
            cty, _, _, aty, _, _, bty, _, _ = signature.args
            cp = context.make_array(cty)(context, builder, c).data
            ap = context.make_array(aty)(context, builder, a).data
            bp = context.make_array(bty)(context, builder, b).data
            i32 = ir.IntType(32)
            v16 = ir.VectorType(i32, 16)
            rows_a = [
                builder.bitcast(
                    builder.gep(ap, [builder.add(ai, builder.mul(lda, ir.Constant(lda.type, r)))]),
                    i32.as_pointer(),
                )
                for r in range(rows)
            ]
            bbase = builder.gep(bp, [bi])
            zero = ir.Constant(v16, [0] * 16)

            def step(k, accs):
                offset = builder.mul(k, ir.Constant(n.type, 64))
                bv = builder.load(
                    builder.bitcast(builder.gep(bbase, [offset]), v16.as_pointer()), align=1
                )
                new = []
                for acc, row in zip(accs, rows_a, strict=True):
                    av = builder.load(builder.gep(row, [k]), align=1)
                    av = builder.insert_element(
                        ir.Constant(v16, ir.Undefined), av, ir.Constant(i32, 0)
                    )
                    av = builder.shuffle_vector(
                        av, ir.Constant(v16, ir.Undefined), ir.Constant(v16, [0] * 16)
                    )
                    new.append(_dot_step(builder, acc, av, bv))
                return new

            accs = reduction_loop(builder, n, [zero] * rows, step)
            for r, acc in enumerate(accs):
                at = builder.add(ci, builder.mul(ldc, ir.Constant(ldc.type, r)))
                builder.store(
                    acc, builder.bitcast(builder.gep(cp, [at]), v16.as_pointer()), align=4
                )
            return context.get_dummy_value()

        return sig, codegen

    return dot


_dot4 = _dot_rows(ROWS)
_dot1 = _dot_rows(1)


def pack_weight(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
    """int8 ``(O, ...)`` -> (packed ``(O16/16, K4/4, 16, 4)`` flat, ``sum_k w`` int32, K4, O16).

    A conv weight ``(O, C, kh, kw)`` is packed with K in (kh, kw, C) order, the order of the
    channel-last im2col of :func:`conv2d_u8s8`."""
    o = w.shape[0]
    if w.ndim == 4:
        w = w.transpose(0, 2, 3, 1)
    flat = w.reshape(o, -1).astype(np.int8)
    k4, o16 = -(-flat.shape[1] // 4) * 4, -(-o // 16) * 16
    padded = np.zeros((o16, k4), np.int8)
    padded[:o, : flat.shape[1]] = flat
    packed = padded.reshape(o16 // 16, 16, k4 // 4, 4).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(packed).reshape(-1), flat.astype(np.int32).sum(1), k4, o16


# -- threads -------------------------------------------------------------------------------------
# Each kernel is a serial ``_*_tasks(..., t0, t1)`` over a range of independent tasks, and a
# ``_*_parallel`` that hands ``chunks`` equal ranges to numba's threads. A small layer calls its
# tasks directly on one thread (PAR_MACS_*). The thresholds were set when entering a parallel
# region cost ~50 us (the workqueue layer on the shared 2 cores); on the OpenMP layer it costs
# ~3.5 us, so they are conservative now (not remeasured; the fp32 conv splits from 512K MACs).


@njit(cache=True)
def _chunks(nthreads, tasks, macs, per_thread):
    """How many threads ``tasks`` tasks of ``macs`` MACs in all are worth."""
    return max(1, min(nthreads, tasks, macs // per_thread))


# -- epilogue ------------------------------------------------------------------------------------
# ``epi`` = (zx, wsum, scale, bias, lo, hi, sy, zy, quant): the layer's constants in one tuple,
# the activation folded into the float32 bounds (none: -inf, inf; relu: 0, inf; clip: lo, hi), so
# that the epilogue loop has no branch on it and LLVM vectorises it.


@njit(cache=True)
def _epilogue(zx, wsum, scale, bias, act, lo, hi, sy, zy, quant):
    f32 = np.float32
    lo32 = f32(lo) if act == CLIP else f32(0.0) if act == RELU else f32(-np.inf)
    hi32 = f32(hi) if act == CLIP else f32(np.inf)
    return (zx, wsum, scale, bias, lo32, hi32, sy, zy, quant)


@njit(cache=True)
def _finish_row(acc, ch, epi, res, out_f, out_q):
    """The epilogue of output channel ``ch`` over 1-D rows: ``out[p]`` from ``acc[p]``; ``res``
    of size 0 means no residual, ``out_f`` or ``out_q`` (by ``quant``) is written."""
    zx, wsum, scale, bias, lo, hi, sy, zy, quant = epi
    off = zx * wsum[ch]
    s = scale[ch]
    b = bias[ch] if bias.size else np.float32(0.0)
    n = acc.shape[0]
    if res.shape[0] == 0 and quant:  # the common case, alone so that it vectorises
        for p in range(n):
            v = min(max(np.float32(acc[p] - off) * s + b, lo), hi)
            q = np.rint(v / sy) + zy
            out_q[p] = np.int32(min(max(q, np.float32(0.0)), np.float32(255.0)))
        return
    for p in range(n):
        v = np.float32(acc[p] - off) * s + b
        if res.shape[0]:
            v += res[p]
        v = min(max(v, lo), hi)
        if quant:
            q = np.rint(v / sy) + zy
            out_q[p] = np.int32(min(max(q, np.float32(0.0)), np.float32(255.0)))
        else:
            out_f[p] = v


@njit(cache=True)
def _finish(acc, c0, c1, epi, res, out_f, out_q, ni, p0):
    """Epilogue of channels [c0, c1) of the rows in ``acc`` (rows, o16): out[ni, o, p0 + p]
    from acc[p, o]; ``res``, ``out_f``, ``out_q`` are (N, O, P) or empty. Each column of
    ``acc`` is first copied into a contiguous row, so that the epilogue itself vectorises (2x
    faster than reading the column in it)."""
    quant = epi[8]
    rows = acc.shape[0]
    row = np.empty(rows, np.int32)
    none_f = np.empty(0, np.float32)
    none_q = np.empty(0, np.uint8)
    for ch in range(c0, c1):
        for p in range(rows):
            row[p] = acc[p, ch]
        r = res[ni, ch, p0 : p0 + rows] if res.size else none_f
        f = none_f if quant else out_f[ni, ch, p0 : p0 + rows]
        q = out_q[ni, ch, p0 : p0 + rows] if quant else none_q
        _finish_row(row, ch, epi, r, f, q)


# -- conv2d (groups 1) and linear: im2col + VNNI GEMM --------------------------------------------


@njit(cache=True)
def _gemm_blocks(a, packed, acc, m, k4, o16, b0, b1):
    """acc[:m, 16 b0 : 16 b1] (int32) = a[m, k4] (uint8) @ w.T for output blocks [b0, b1)."""
    a = a.reshape(-1)
    c = acc.reshape(-1)
    steps = k4 // 4
    full = m // ROWS * ROWS
    for blk in range(b0, b1):
        for row in range(0, full, ROWS):
            _dot4(c, row * o16 + blk * 16, o16, a, row * k4, k4, packed, blk * steps * 64, steps)
        for row in range(full, m):
            _dot1(c, row * o16 + blk * 16, o16, a, row * k4, k4, packed, blk * steps * 64, steps)


@njit(cache=True)
def gemm_u8s8(a, packed, acc, m, k4, o16):
    """acc[m, o16] (int32) = a[m, k4] (uint8) @ w.T, with w packed by :func:`pack_weight`."""
    _gemm_blocks(a, packed, acc, m, k4, o16, 0, o16 // 16)


@njit(cache=True)
def _channels_last(x, xp, ph, pw, zx):
    """xp[n, y + ph, x + pw, c] = x[n, c, y, x], the border (and beyond) zx."""
    n_img, c_in, h, w = x.shape
    xp[:] = zx
    for ni in range(n_img):
        for y in range(h):
            for c in range(c_in):
                src = x[ni, c, y]
                dst = xp[ni, y + ph]
                for j in range(w):
                    dst[j + pw, c] = src[j]


@njit(cache=True)
def _im2col_rows(xp, cols, kh, kw, sh, sw, dh, dw, r0, r1, ow):
    """cols[(i - r0, j), (ki, kj, c)] for output rows i in [r0, r1) of one padded channel-last
    image ``xp`` (K padding 0): a contiguous copy of C bytes per tap (a channel-first im2col
    moved the bytes one at a time: 5x slower on a 64-channel 3x3 conv, transpose included)."""
    c_in = xp.shape[2]
    kk = kh * kw * c_in
    for i in range(r0, r1):
        for j in range(ow):
            dst = cols[(i - r0) * ow + j]
            for ki in range(kh):
                src = xp[i * sh + ki * dh]
                for kj in range(kw):
                    s = src[j * sw + kj * dw]
                    d = dst[(ki * kw + kj) * c_in : (ki * kw + kj + 1) * c_in]
                    for c in range(c_in):
                        d[c] = s[c]
            for k in range(kk, dst.shape[0]):
                dst[k] = 0


@njit(cache=True)
def _conv_tasks(xp, packed, k4, o16, geom, tile, nrb, epi, res, out_f, out_q, t0, t1):
    """Tiles [t0, t1) of (image, block of ``tile`` output rows): im2col, GEMM, epilogue; ``res``
    and the outputs are (N, O, OH * OW) or empty."""
    kh, kw, sh, sw, dh, dw, oh, ow = geom
    quant = epi[8]
    o = out_q.shape[1] if quant else out_f.shape[1]
    cbuf = np.empty(tile * ow * k4, np.uint8)
    abuf = np.empty(tile * ow * o16, np.int32)
    for t in range(t0, t1):
        ni, rb = t // nrb, t % nrb
        r0, r1 = rb * tile, min(oh, rb * tile + tile)
        p0, p1 = r0 * ow, r1 * ow
        cols = cbuf[: (p1 - p0) * k4].reshape(p1 - p0, k4)
        acc = abuf[: (p1 - p0) * o16].reshape(p1 - p0, o16)
        _im2col_rows(xp[ni], cols, kh, kw, sh, sw, dh, dw, r0, r1, ow)
        gemm_u8s8(cols, packed, acc, p1 - p0, k4, o16)
        _finish(acc, 0, o, epi, res, out_f, out_q, ni, p0)


@njit(parallel=True, cache=True)
def _conv_parallel(xp, packed, k4, o16, geom, tile, nrb, epi, res, out_f, out_q, total, chunks):
    for ch in prange(chunks):
        _conv_tasks(
            xp,
            packed,
            k4,
            o16,
            geom,
            tile,
            nrb,
            epi,
            res,
            out_f,
            out_q,
            ch * total // chunks,
            (ch + 1) * total // chunks,
        )


@njit(cache=True)
def conv2d_u8s8(
    x,
    zx,
    packed,
    wsum,
    k4,
    o16,
    o,
    kh,
    kw,
    sh,
    sw,
    ph,
    pw,
    dh,
    dw,
    scale,
    bias,
    res,
    act,
    lo,
    hi,
    sy,
    zy,
    quant,
    out_f,
    out_q,
    nthreads=1,
):
    """Integer conv2d (groups 1) of uint8 NCHW ``x``; writes ``out_f`` (float) or ``out_q``
    (uint8, when ``quant``), both NCHW. Tiles of whole output rows (image, row block), sized so
    that a tile's im2col and accumulators stay in L2, are shared out among ``nthreads``."""
    n_img, c_in, h, w = x.shape
    oh = out_q.shape[2] if quant else out_f.shape[2]
    ow = out_q.shape[3] if quant else out_f.shape[3]
    xp = np.empty((n_img, h + 2 * ph + sh, w + 2 * pw + sw, c_in), np.uint8)
    _channels_last(x, xp, ph, pw, zx)
    fit = max(1, TILE_BYTES // (ow * (k4 + 4 * o16)))  # output rows whose tile fits in L2
    nrb = (oh + fit - 1) // fit
    chunks = _chunks(nthreads, n_img * oh, n_img * oh * ow * k4 * o16, PAR_MACS_GEMM)
    if (n_img * nrb) % chunks:  # equal work per thread: more, smaller row blocks
        per_thread = (n_img * nrb + chunks - 1) // chunks
        nrb = min(oh, (per_thread * chunks + n_img - 1) // n_img)
    tile = (oh + nrb - 1) // nrb  # blocks of equal size: a last block of one row re-reads
    nrb = (oh + tile - 1) // tile  # all the weights for little work
    total = n_img * nrb
    chunks = min(chunks, total)
    epi = _epilogue(zx, wsum, scale, bias, act, lo, hi, sy, zy, quant)
    geom = (kh, kw, sh, sw, dh, dw, oh, ow)
    flat = (n_img, o, oh * ow)
    r = res.reshape(flat) if res.size else res.reshape(0, 0, 0)
    f = out_f.reshape(flat) if not quant else out_f.reshape(0, 0, 0)
    q = out_q.reshape(flat) if quant else out_q.reshape(0, 0, 0)
    if chunks == 1:
        _conv_tasks(xp, packed, k4, o16, geom, tile, nrb, epi, r, f, q, 0, total)
    else:
        _conv_parallel(xp, packed, k4, o16, geom, tile, nrb, epi, r, f, q, total, chunks)


@njit(cache=True)
def _linear_tasks(a, packed, acc, k4, o16, epi, res, out_f, out_q, b0, b1):
    """Output blocks [b0, b1) of 16 channels: GEMM and epilogue (outputs (1, O, M))."""
    quant = epi[8]
    o = out_q.shape[1] if quant else out_f.shape[1]
    _gemm_blocks(a, packed, acc, a.shape[0], k4, o16, b0, b1)
    _finish(acc, 16 * b0, min(o, 16 * b1), epi, res, out_f, out_q, 0, 0)


@njit(parallel=True, cache=True)
def _linear_parallel(a, packed, acc, k4, o16, epi, res, out_f, out_q, nb, chunks):
    for ch in prange(chunks):
        _linear_tasks(
            a,
            packed,
            acc,
            k4,
            o16,
            epi,
            res,
            out_f,
            out_q,
            ch * nb // chunks,
            (ch + 1) * nb // chunks,
        )


@njit(cache=True)
def linear_u8s8(
    x,
    zx,
    packed,
    wsum,
    k4,
    o16,
    o,
    scale,
    bias,
    res,
    act,
    lo,
    hi,
    sy,
    zy,
    quant,
    out_f,
    out_q,
    nthreads=1,
):
    """Integer linear of uint8 ``x`` (M, K); ``out_f``/``out_q`` are (M, O). Blocks of 16
    output channels are shared out among ``nthreads``."""
    m, k = x.shape
    a = np.zeros((m, k4), np.uint8)
    a[:, :k] = x
    acc = np.empty((m, o16), np.int32)
    r = res.T.copy().reshape(1, o, m) if res.size else res.reshape(0, 0, 0)
    of = np.empty((1, o, m) if not quant else (0, 0, 0), np.float32)
    oq = np.empty((1, o, m) if quant else (0, 0, 0), np.uint8)
    epi = _epilogue(zx, wsum, scale, bias, act, lo, hi, sy, zy, quant)
    nb = o16 // 16
    chunks = _chunks(nthreads, nb, m * k4 * o16, PAR_MACS_GEMM)
    if chunks == 1:
        _linear_tasks(a, packed, acc, k4, o16, epi, r, of, oq, 0, nb)
    else:
        _linear_parallel(a, packed, acc, k4, o16, epi, r, of, oq, nb, chunks)
    if quant:
        out_q[:] = oq[0].T
    else:
        out_f[:] = of[0].T


# -- depthwise and grouped conv2d: direct ------------------------------------------------------
# Each group's input planes are copied, padded with the zero point, into sh * sw phase planes
# (padded pixel (y, x) goes to plane (y % sh, x % sw) at (y // sh, x // sw)) of width wq. Output
# pixel (r, q) is then accumulated at r * wq + q, and tap (c, ki, kj) reads the phase planes at
# that index plus one constant offset: every tap is one contiguous pass over a block of output
# rows (the wq - ow columns past each row are computed and dropped), three taps per pass, which
# LLVM vectorises. Blocks of rows keep the int32 accumulators in L1.

ACC_ELEMS = 4096  # int32 accumulators of one block of output rows (16 KiB)


def pack_grouped_weight(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int8 ``(O, C/groups, kh, kw)`` -> (the taps, int8 ``(O, C/groups * kh * kw)``, and
    ``sum_k w`` int32 ``(O,)``)."""
    flat = np.ascontiguousarray(w.reshape(w.shape[0], -1).astype(np.int8))
    return flat, flat.sum(1, dtype=np.int32)


@njit(cache=True)
def _copy(dst, src):
    for i in range(dst.shape[0]):
        dst[i] = src[i]


@njit(cache=True)
def _phase_planes(x, ni, c0, xp, row, ph, pw, zx):
    """xp[c, y % sh, x % sw, y // sh, x // sw] = channel c0 + c of image ni padded with zx;
    ``row`` is scratch for one padded row."""
    cg, sh, sw, wq = xp.shape[0], xp.shape[1], xp.shape[2], xp.shape[4]
    h, w = x.shape[2], x.shape[3]
    xp[:] = zx
    row[:] = zx
    for c in range(cg):
        for y in range(h):
            yy = y + ph
            if sw == 1:
                _copy(xp[c, yy % sh, 0, yy // sh, pw : pw + w], x[ni, c0 + c, y])
                continue
            _copy(row[pw : pw + w], x[ni, c0 + c, y])
            for p in range(sw):
                dst = xp[c, yy % sh, p, yy // sh]
                if sw == 2:  # a constant stride, which LLVM vectorises
                    for j in range(wq):
                        dst[j] = row[2 * j + p]
                else:
                    for j in range(wq):
                        dst[j] = row[j * sw + p]


@njit(cache=True)
def _tap_offsets(cg, kh, kw, sh, sw, dh, dw, hq, wq):
    """Offset of each tap (c, ki, kj) in the flat phase planes, relative to the output index."""
    offs = np.empty(cg * kh * kw, np.intp)
    for c in range(cg):
        for ki in range(kh):
            for kj in range(kw):
                plane = (c * sh + (ki * dh) % sh) * sw + (kj * dw) % sw
                row, col = (ki * dh) // sh, (kj * dw) // sw
                offs[(c * kh + ki) * kw + kj] = (plane * hq + row) * wq + col
    return offs


@njit(cache=True)
def _taps(acc, xf, wt, offs, base):
    """acc[q] = sum_t wt[t] * xf[base + offs[t] + q], three taps per pass."""
    n, m = wt.shape[0], acc.shape[0]
    acc[:] = 0
    for t in range(0, n - 2, 3):
        s0 = xf[base + offs[t] : base + offs[t] + m]
        s1 = xf[base + offs[t + 1] : base + offs[t + 1] + m]
        s2 = xf[base + offs[t + 2] : base + offs[t + 2] + m]
        w0, w1, w2 = np.int32(wt[t]), np.int32(wt[t + 1]), np.int32(wt[t + 2])
        for q in range(m):
            acc[q] += w0 * np.int32(s0[q]) + w1 * np.int32(s1[q]) + w2 * np.int32(s2[q])
    for t in range(n - n % 3, n):
        s0 = xf[base + offs[t] : base + offs[t] + m]
        w0 = np.int32(wt[t])
        for q in range(m):
            acc[q] += w0 * np.int32(s0[q])


@njit(cache=True)
def _grouped_tasks(x, wt, groups, geom, epi, res, out_f, out_q, t0, t1):
    """Tasks [t0, t1) of (image, group): the group's phase planes, then its output channels in
    blocks of rows, each finished as one flat row of stride wq (a loop over rows as short as 14
    pixels ran mostly in LLVM's scalar remainder: 3x slower) and copied out row by row."""
    kh, kw, sh, sw, ph, pw, dh, dw = geom
    quant = epi[8]
    h, w = x.shape[2], x.shape[3]
    cg, og = x.shape[1] // groups, wt.shape[0] // groups
    oh = out_q.shape[2] if quant else out_f.shape[2]
    ow = out_q.shape[3] if quant else out_f.shape[3]
    hq, wq = (h + 2 * ph + sh - 1) // sh, (w + 2 * pw + sw - 1) // sw
    xp = np.empty((cg, sh, sw, hq, wq), np.uint8)
    xf = xp.reshape(-1)
    row = np.empty(wq * sw + sw, np.uint8)
    offs = _tap_offsets(cg, kh, kw, sh, sw, dh, dw, hq, wq)
    block = max(1, min(oh, ACC_ELEMS // wq))
    acc_buf = np.empty(block * wq, np.int32)
    res_buf = np.zeros(block * wq if res.size else 0, np.float32)
    f_buf = np.empty(0 if quant else block * wq, np.float32)
    q_buf = np.empty(block * wq if quant else 0, np.uint8)
    for t in range(t0, t1):
        ni, g = t // groups, t % groups
        _phase_planes(x, ni, g * cg, xp, row, ph, pw, epi[0])
        for oc in range(g * og, g * og + og):
            for r0 in range(0, oh, block):
                r1 = min(oh, r0 + block)
                n = (r1 - r0 - 1) * wq + ow
                acc = acc_buf[:n]
                _taps(acc, xf, wt[oc], offs, r0 * wq)
                if res.size:
                    for r in range(r0, r1):
                        _copy(res_buf[(r - r0) * wq : (r - r0) * wq + ow], res[ni, oc, r])
                _finish_row(
                    acc,
                    oc,
                    epi,
                    res_buf[:n],
                    f_buf[: 0 if quant else n],
                    q_buf[: n if quant else 0],
                )
                for r in range(r0, r1):
                    if quant:
                        _copy(out_q[ni, oc, r], q_buf[(r - r0) * wq :])
                    else:
                        _copy(out_f[ni, oc, r], f_buf[(r - r0) * wq :])


@njit(parallel=True, cache=True)
def _grouped_parallel(x, wt, groups, geom, epi, res, out_f, out_q, total, chunks):
    for ch in prange(chunks):
        _grouped_tasks(
            x,
            wt,
            groups,
            geom,
            epi,
            res,
            out_f,
            out_q,
            ch * total // chunks,
            (ch + 1) * total // chunks,
        )


@njit(cache=True)
def conv2d_grouped_u8s8(
    x,
    zx,
    wt,
    wsum,
    groups,
    kh,
    kw,
    sh,
    sw,
    ph,
    pw,
    dh,
    dw,
    scale,
    bias,
    res,
    act,
    lo,
    hi,
    sy,
    zy,
    quant,
    out_f,
    out_q,
    nthreads=1,
):
    """Integer grouped conv2d (depthwise when C/groups == 1, any channel multiplier) of uint8
    NCHW ``x`` with taps ``wt`` from :func:`pack_grouped_weight`; the epilogue and outputs of
    :func:`conv2d_u8s8`. (image, group) tasks are shared out among ``nthreads``."""
    oh = out_q.shape[2] if quant else out_f.shape[2]
    ow = out_q.shape[3] if quant else out_f.shape[3]
    total = x.shape[0] * groups
    chunks = _chunks(nthreads, total, x.shape[0] * wt.size * oh * ow, PAR_MACS_DIRECT)
    epi = _epilogue(zx, wsum, scale, bias, act, lo, hi, sy, zy, quant)
    geom = (kh, kw, sh, sw, ph, pw, dh, dw)
    if chunks == 1:
        _grouped_tasks(x, wt, groups, geom, epi, res, out_f, out_q, 0, total)
    else:
        _grouped_parallel(x, wt, groups, geom, epi, res, out_f, out_q, total, chunks)


@njit(cache=True)
def add_u8(a, za, sa, b, zb, sb, relu, sy, zy, out):
    """``out = quantize(act((a - za) sa + (b - zb) sb))``: a residual add of two uint8 tensors
    requantized to uint8 (ONNX Runtime's QLinearAdd), all flat."""
    for i in range(out.size):
        v = np.float32(np.int32(a[i]) - za) * sa + np.float32(np.int32(b[i]) - zb) * sb
        if relu:
            v = max(v, np.float32(0.0))
        q = np.rint(v / sy) + zy
        out[i] = np.uint8(min(max(q, 0.0), 255.0))
