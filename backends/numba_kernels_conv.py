"""Numba kernels for the heavy ops: conv2d (tiled im2col + BLAS, depthwise row-wise; float32 with
constant weights runs on the implicit GEMM of numba_kernels_f32, re-exported here as
``conv2d_packed``), linear, batched matmul, attention and pooling. Saved packages get a copy as
``kernels_conv.py``.

Every GEMM is ``np.dot`` (single-threaded BLAS) on a tile, called from a ``prange`` over tiles, so
packing, the GEMM and the fused epilogue ``act(y + bias + residual)`` of one tile run on one thread
while the tile is in cache; the epilogue is never a separate pass over memory.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .numba_kernels import finish_row, softmax_rows
from .numba_kernels_f32 import conv2d_packed  # noqa: F401  (called by the generated code as KC.)

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
def _max_row(row, src, lo, hi, sw, off):
    """row[q] = max(row[q], src[q * sw + off]) for q in [lo, hi)."""
    if hi <= lo:
        return
    a = row[lo:hi]
    if sw == 1:
        s = src[lo + off : hi + off]
        for q in range(hi - lo):
            a[q] = max(a[q], s[q])
    else:
        s = _segment(src, lo, hi, sw, off)
        for q in range(hi - lo):
            a[q] = max(a[q], s[q])


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


@njit(cache=True)
def _depthwise_tap(xp, acc, wv, i0, j0, sh, sw):
    """acc[r, q] += wv * xp[i0 + r * sh, j0 + q * sw] over the whole output plane."""
    oh, ow = acc.shape
    for r in range(oh):
        a = acc[r]
        if sw == 1:
            src = xp[i0 + r * sh, j0 : j0 + ow]
            for q in range(ow):
                a[q] += wv * src[q]
        else:
            srcs = xp[i0 + r * sh, j0 : j0 + sw * (ow - 1) + 1 : sw]
            for q in range(ow):
                a[q] += wv * srcs[q]


@njit(parallel=True, cache=True)
def conv2d_depthwise(x, w, b, res, out, sh, sw, ph, pw, dh, dw, act, lo, hi, nthreads):
    """Depthwise conv (groups == in channels, O = multiplier * C), direct: each channel is copied
    into a zero-padded plane, then every tap adds ``weight * shifted plane`` to a local output
    plane, one row slice at a time (a loop over a 2-D strided view did not vectorise: 6x slower)."""
    n, c, hgt, wid = x.shape
    o, _, kh, kw = w.shape
    oh, ow = out.shape[2], out.shape[3]
    mult, total = o // c, n * o
    chunks = min(nthreads, total)
    for ch in prange(chunks):
        xp = np.zeros((hgt + 2 * ph, wid + 2 * pw), x.dtype)
        acc = np.empty((oh, ow), x.dtype)
        for t in range(ch * total // chunks, (ch + 1) * total // chunks):
            ni, co = t // o, t % o
            xp[ph : ph + hgt, pw : pw + wid] = x[ni, co // mult]
            acc[:] = 0.0
            for i in range(kh):
                for j in range(kw):
                    _depthwise_tap(xp, acc, w[co, 0, i, j], i * dh, j * dw, sh, sw)
            bias = b[co] if b.shape[0] > 0 else 0.0
            for r in range(oh):
                rr = res[ni, co, r] if res.shape[0] > 0 else acc[0, 0:0]
                finish_row(acc[r], out[ni, co, r], bias, rr, act, lo, hi)


@njit(parallel=True, cache=True)
def linear(x, w, b, res, out, act, lo, hi, nthreads):
    """``out = act(x @ w.T + b + res)`` on (M, K) inputs, row blocks in parallel."""
    m = x.shape[0]
    chunks = max(1, min(nthreads, m // 8))
    for ch in prange(chunks):
        m0, m1 = ch * m // chunks, (ch + 1) * m // chunks
        acc = np.empty((m1 - m0, w.shape[0]), x.dtype)
        np.dot(x[m0:m1], w.T, acc)
        for i in range(m1 - m0):
            r = res[m0 + i] if res.shape[0] > 0 else acc[0, 0:0]
            if b.shape[0] > 0:
                for j in range(acc.shape[1]):
                    acc[i, j] += b[j]
            finish_row(acc[i], out[m0 + i], 0.0, r, act, lo, hi)


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


@njit(parallel=True, cache=True)
def max_pool2d(x, out, kh, kw, sh, sw, ph, pw, dh, dw):
    """Max over each window, row-wise; a window of padding only gives -inf (like the reference)."""
    n, c, hgt, wid = x.shape
    oh, ow = out.shape[2], out.shape[3]
    for t in prange(n * c):
        plane, dst = x[t // c, t % c], out[t // c, t % c]
        for r in range(oh):
            row = dst[r]
            row[:] = -np.inf
            for i in range(kh):
                ih = r * sh - ph + i * dh
                if ih < 0 or ih >= hgt:
                    continue
                src = plane[ih]
                for j in range(kw):
                    off = j * dw - pw
                    q0, q1 = _valid_range(off, sw, wid, ow)
                    _max_row(row, src, q0, q1, sw, off)


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


@njit(cache=True)
def adaptive_pool2d(x, out, is_max):
    """Adaptive average or max pooling over torch's bins [floor(i*H/OH), ceil((i+1)*H/OH))."""
    n, c, hgt, wid = x.shape
    oh, ow = out.shape[2], out.shape[3]
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
