"""Numba kernels for the heavy ops: conv2d (tiled im2col + GEMM; float32 with constant weights runs
on the implicit GEMM of numba_kernels_f32, re-exported here as ``conv2d_packed`` /
``conv2d_planned``, and depthwise convs on the direct kernel of numba_kernels_dw, re-exported as
``conv2d_depthwise``), linear, batched matmul, attention and pooling. Saved packages get a copy as
``kernels_conv.py``.

Every GEMM is single-threaded on a tile (``gemm``/``gemm_t`` of numba_kernels_gemm: float32 on
the conv's micro-kernel, other dtypes by loops; no BLAS, which numba reaches through SciPy),
called from a ``prange`` over tiles, so packing, the GEMM and the fused epilogue
``act(y + bias + residual)`` of one tile run on one thread while the tile is in cache; the
epilogue is never a separate pass over memory.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import njit, prange

from .chain import chain_table, run_chain  # noqa: F401  (called as KC.)
from .common import (
    finish_row,
    softmax_rows,
)
from .depthwise import conv2d_depthwise  # noqa: F401  (called as KC.)
from .f32 import (  # noqa: F401  (conv2d_*, pack_*, ...: called as KC.)
    LANES,  # linear splits its columns in whole vectors and from the fp32 conv's PAR_MACS
    PAR_MACS,
    conv2d_packed,
    conv2d_planned,
    pack_bias,
    pack_weight,
    pixel_bases,
    tap_offsets,
)
from .gemm import gemm, gemm_packed, gemm_t

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
    (im2col), multiplied with the group's weight matrix (``gemm``) and finished row by row.
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
            gemm(wm[g], cols, acc)
            for oc in range(og):
                co = g * og + oc
                bias = b[co] if b.shape[0] > 0 else 0.0
                r = resf[ni, co, r0 * ow : r1 * ow] if res.shape[0] > 0 else acc[oc, 0:0]
                finish_row(acc[oc], outf[ni, co, r0 * ow : r1 * ow], bias, r, act, lo, hi)


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
        gemm_t(x[m0:m1], w[n0:n1], acc)
        for i in range(m1 - m0):
            row = acc[i]
            if b.shape[0] > 0:
                for j in range(n1 - n0):
                    row[j] += b[n0 + j]
            r = res[m0 + i, n0:n1] if res.shape[0] > 0 else acc[0, 0:0]
            finish_row(row, out[m0 + i, n0:n1], 0.0, r, act, lo, hi)


@njit(parallel=True, cache=True)
def linear_packed(x, packed, bias, res, out, act, lo, hi, nthreads):
    """:func:`linear` of a float32 weight packed at compile time (``pack_weight`` of (N, K, 1,
    1); ``bias`` padded by ``pack_bias``), on the conv's micro-kernel (``gemm_packed``). Threads
    take blocks of rows, or with fewer than 8 rows per thread blocks of 16 columns: a batch-1
    classifier head is a matrix-vector product, bound by reading the weight, which each thread
    then reads a part of."""
    m, k = x.shape
    nb = packed.shape[0]
    threads = max(1, min(nthreads, m * nb * LANES * k // PAR_MACS))
    rsplit = max(1, min(threads, m // 8))
    csplit = max(1, min(threads // rsplit, nb))
    xc = np.ascontiguousarray(x)
    for ch in prange(rsplit * csplit):
        ri, cj = ch // csplit, ch % csplit
        gemm_packed(
            xc,
            packed,
            bias,
            res,
            out,
            act,
            lo,
            hi,
            ri * m // rsplit,
            (ri + 1) * m // rsplit,
            cj * nb // csplit,
            (cj + 1) * nb // csplit,
        )


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
            gemm(left[m0:m1], right, out[i, m0:m1])


@njit(parallel=True, cache=True)
def attention(q, k, v, mask, out, scale, causal, nthreads):
    """Scaled dot-product attention on (B, L, E) views: ``softmax(q @ k.T * scale + mask) @ v``.
    ``mask`` is additive, (1 or B, Lq, Lk), or size 0; ``causal`` keeps key j <= query i."""
    nb, lq, lk = q.shape[0], q.shape[1], k.shape[1]
    chunks = min(nthreads, nb)
    for ch in prange(chunks):
        s = np.empty((lq, lk), q.dtype)
        for i in range(ch * nb // chunks, (ch + 1) * nb // chunks):
            gemm_t(q[i], k[i], s)
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
            gemm(s, v[i], out[i])


# -- pooling ---------------------------------------------------------------------------------------


@njit(cache=True)
def _max_plane(plane, dst, vmax, kh, kw, sh, sw, ph, pw, dh, dw):
    """One plane of max_pool2d, separably, one output row at a time: the max of its window's
    input rows into ``vmax[pw : pw + W]`` (a contiguous pass), then each output the max of its
    window's columns of ``vmax``, whose borders hold -inf for the padding (and ceil mode's
    overhang), so no column needs a bounds check. Rows first: the column pass is strided, and
    after the row pass it runs on ``oh`` rows, not all ``H`` input rows. ResNet-18's 3x3/2 pool
    of 64x112x112, 2 threads: 398 -> 99 us (ORT 121) with the 3-row and the 3-column stride-2
    cases fused into one loop each, the latter with strides LLVM knows, so it vectorises. The
    loops index flat arrays with unsigned offsets and are inline, not helper calls on views: rows
    are short, and a call with its views cost ~45 ns, as much as its work; signed indices keep
    numba's wraparound check, which stops LLVM vectorising, and so does the builtin ``max``
    (``np.maximum`` of two scalars vectorises, and propagates NaN as the reference's ``max`` over
    a window does)."""
    hgt, wid = plane.shape
    oh, ow = dst.shape
    xf, df = plane.reshape(-1), dst.reshape(-1)
    u = numba.uint64
    uw, upw, step, udw = u(wid), u(pw), u(sw), u(dw)
    for q in range(u(vmax.shape[0])):
        vmax[q] = -np.inf
    for r in range(oh):
        i0 = r * sh - ph
        if kh == 3 and i0 >= 0 and i0 + 2 * dh < hgt:
            s0, s1, s2 = u(i0 * wid), u((i0 + dh) * wid), u((i0 + 2 * dh) * wid)
            for q in range(uw):
                vmax[upw + q] = np.maximum(np.maximum(xf[s0 + q], xf[s1 + q]), xf[s2 + q])
        else:
            rows = 0
            for i in range(kh):
                ih = i0 + i * dh
                if ih < 0 or ih >= hgt:
                    continue
                s = u(ih * wid)
                if rows == 0:
                    for q in range(uw):
                        vmax[upw + q] = xf[s + q]
                else:
                    for q in range(uw):
                        vmax[upw + q] = np.maximum(vmax[upw + q], xf[s + q])
                rows += 1
            if rows == 0:  # a window of padding rows only
                for q in range(uw):
                    vmax[upw + q] = -np.inf
        d = u(r * ow)
        if kw == 3 and sw == 2 and dw == 1:
            for q in range(u(ow)):
                c = u(2) * q
                df[d + q] = np.maximum(np.maximum(vmax[c], vmax[c + u(1)]), vmax[c + u(2)])
        elif kw == 3:
            for q in range(u(ow)):
                c = step * q
                df[d + q] = np.maximum(np.maximum(vmax[c], vmax[c + udw]), vmax[c + udw + udw])
        else:
            for q in range(u(ow)):
                c = step * q
                acc = vmax[c]
                for j in range(u(1), u(kw)):
                    acc = np.maximum(acc, vmax[c + j * udw])
                df[d + q] = acc


@njit(parallel=True, cache=True)
def max_pool2d(x, out, kh, kw, sh, sw, ph, pw, dh, dw):
    """Max over each window, separably (_max_plane); a window of padding only gives -inf (like
    the reference). The first kernel took the max of all kh x kw taps per output row, a strided
    pass each: 1.7-2.2 ms on resnet18's 3x3/2 pool of 64x112x112 against ORT's 0.23-0.39."""
    n, c, hgt, wid = x.shape
    ow = out.shape[3]
    # -inf borders: the left padding, the right one and ceil mode's overhang
    size = max(wid + 2 * pw, (ow - 1) * sw + (kw - 1) * dw + 1)
    for t in prange(n * c):
        vmax = np.empty(size, x.dtype)
        _max_plane(x[t // c, t % c], out[t // c, t % c], vmax, kh, kw, sh, sw, ph, pw, dh, dw)


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
