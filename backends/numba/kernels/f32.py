"""The float32 conv2d of the numba backend as an implicit GEMM: an explicit micro-kernel
(:mod:`numba_kernels_f32_tile`) reads the zero-padded input planes directly (no im2col). This
module holds the layers around it: packing, padding, and the split of a layer's tiles among
threads. Saved packages get a copy as ``kernels_f32.py``.

Each reduction step k of a tile reads ``xp[base_r + offs[k]]`` for its pixel r, where
``offs[k] = (c * Hp + ki * dh) * Wp + kj * dw`` and ``base_r`` is the padded-plane offset of
output pixel r. Weights are packed once at compile time (:func:`pack_weight`) as
``(groups * O16 / 16, K, 16)``, O padded to 16 per group. A K longer than ``KC`` runs in passes
over a block of pixels (the tile's raw sums wait in a scratch buffer), so the weights of one
pass stay in L1 across the block's tiles.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from .common import CLIP, LANES, NONE, RELU, act_inplace
from .f32_tile import ACC_LOAD, ACC_STORE, TILE_ROWS, _conv_tile
from .pointwise import POINTWISE, PW_MIN_PIXELS, conv1x1_pixel_vectors

MAX_ROWS = 8  # the largest tile of any CPU: scratch and the zeros after a plane's pixel bases
# MACs a layer needs per thread before it is split among threads: ~10 us of work, three times
# what entering a parallel region of the OpenMP layer costs (~3.5 us; kernels/common.py).
PAR_MACS = 1 << 19
# Output tiles per thread from which a layer is split by bands of pixels (conv2d_planned): the
# bands are whole tiles, so fewer would leave the threads' shares unequal by more than 1/8
# (unless the tiles divide evenly among the threads).
BAND_TILES = 8
# 1x1 planes of at most this many pixels read a channel-last copy of their input on the CPUs that
# run the pixel-vector 1x1 kernel on larger planes (_channels_last)
CL_MAX_PIXELS = 64
# K blocking: a layer with more reduction steps than KC runs them in passes of at most KC over
# each block of pixels, so that a channel block's weights for one pass (KC x 64 bytes) stay in
# L1 while every tile of the block reads them (_conv_tasks); the tile's raw sums wait in a
# scratch buffer between passes (ACC_LOAD / ACC_STORE of _conv_tile)
KC = 256


ROWS_A, ROWS_B = TILE_ROWS
_tile_a = _conv_tile(ROWS_A)
_tile_b = _conv_tile(ROWS_B)


@njit(cache=True)
def best_rows(npix):
    """Pixels per tile for a plane of ``npix`` output pixels: the smaller tile (ROWS_B) where it
    leaves fewer dropped lanes in the last tile than the larger (the last tile always runs
    whole), else ROWS_A."""
    return ROWS_B if -(-npix // ROWS_B) * ROWS_B < -(-npix // ROWS_A) * ROWS_A else ROWS_A


def pack_weight(w: np.ndarray, groups: int) -> np.ndarray:
    """float32 OIHW ``w`` -> ``(groups * O16 / 16, K, 16)``: per group, 16 output channels x the
    K = C/groups * kh * kw inputs, in the order (c, ki, kj); output channels padded with zeros to a
    multiple of 16 (O16) per group."""
    o = w.shape[0]
    og, kk = o // groups, int(np.prod(w.shape[1:]))
    o16 = -(-og // LANES) * LANES
    padded = np.zeros((groups, o16, kk), np.float32)
    padded[:, :og] = w.reshape(groups, og, kk)
    packed = padded.reshape(groups * o16 // LANES, LANES, kk).transpose(0, 2, 1)
    return np.ascontiguousarray(packed)


@njit(cache=True)
def tap_offsets(cg, kh, kw, dh, dw, hp, wp):
    """offs[(c * kh + ki) * kw + kj] = offset of tap (c, ki, kj) in a group's padded planes."""
    offs = np.empty(cg * kh * kw, np.intp)
    for c in range(cg):
        for ki in range(kh):
            for kj in range(kw):
                offs[(c * kh + ki) * kw + kj] = (c * hp + ki * dh) * wp + kj * dw
    return offs


@njit(cache=True)
def pixel_bases(oh, ow, sh, sw, wp):
    """bases[p] = padded-plane offset of output pixel p = (oy, ox); MAX_ROWS zeros after the last,
    for the lanes of a last, partial tile (they read a valid address, their result is dropped)."""
    bases = np.zeros(oh * ow + MAX_ROWS, np.intp)
    for oy in range(oh):
        for ox in range(ow):
            bases[oy * ow + ox] = oy * sh * wp + ox * sw
    return bases


@njit(cache=True)
def _tile_pass(
    rows,
    out,
    ob,
    ldo,
    res,
    rb,
    ldr,
    has_res,
    xp,
    xi,
    bases,
    bb,
    offs,
    k0,
    n,
    packed,
    wi,
    bias,
    ci,
    lo,
    hi,
    nc,
    acc,
    ab,
    pa,
    pz,
    mode,
):
    """Reduction steps [k0, k0 + n) of the tiles of ``rows`` pixels starting at pa, pa + rows, ...
    below pz; the tile at p writes ``out`` from ``ob + p``, reads ``res`` from ``rb + p``, its
    bases from ``bb + p`` and keeps its sums in ``acc`` from ``ab + 16 p``. One loop per tile
    size: a call that picks the size inside the loop cost 15 % on 1x1 layers (K = 24), where a
    tile is ~250 cycles."""
    wk = wi + k0 * LANES
    if rows == ROWS_A:
        for p in range(pa, pz, ROWS_A):
            _tile_a(
                out,
                ob + p,
                ldo,
                res,
                rb + p,
                ldr,
                has_res,
                xp,
                xi,
                bases,
                bb + p,
                offs,
                k0,
                n,
                packed,
                wk,
                bias,
                ci,
                lo,
                hi,
                nc,
                acc,
                ab + p * LANES,
                mode,
            )
    else:
        for p in range(pa, pz, ROWS_B):
            _tile_b(
                out,
                ob + p,
                ldo,
                res,
                rb + p,
                ldr,
                has_res,
                xp,
                xi,
                bases,
                bb + p,
                offs,
                k0,
                n,
                packed,
                wk,
                bias,
                ci,
                lo,
                hi,
                nc,
                acc,
                ab + p * LANES,
                mode,
            )


@njit(cache=True)
def _conv_tasks(
    xp, bases, offs, packed, bias, res, out, geom, lo, hi, act, alo, ahi, t0, t1, q0, q1
):
    """Tasks [t0, t1) of (image, channel block of 16, block of the output pixels [q0, q1)): the
    micro-kernel over the block's tiles, in passes of at most KC reduction steps (the last,
    partial tile of the last pass into scratch rows, then copied), then an activation other
    than a clamp over the written rows. ``res``/``out`` are (N, O, P) flat; ``res`` may be
    empty; ``bases[p - q0]`` is output pixel p's offset in its padded planes."""
    groups, nbg, cg, hw, npb, pb, rows = geom
    o, npix = out.shape[1], out.shape[2]
    og = o // groups
    kk = offs.shape[0]
    passes = (kk + KC - 1) // KC
    kc = (kk + passes - 1) // passes
    has_res = 1 if res.shape[0] > 0 else 0
    outf = out.reshape(-1)
    resf = res.reshape(-1)
    scratch = np.empty(LANES * MAX_ROWS, np.float32)
    rscratch = np.empty(LANES * MAX_ROWS, np.float32)
    acc = np.empty((pb + MAX_ROWS) * LANES if passes > 1 else 0, np.float32)
    for t in range(t0, t1):
        ni, g = t // (groups * npb * nbg), (t // (npb * nbg)) % groups
        pblk, cb = (t // nbg) % npb, t % nbg
        blk = g * nbg + cb
        co0 = g * og + cb * LANES
        nc = min(LANES, og - cb * LANES)
        xi = (ni * groups + g) * cg * hw
        wi = blk * kk * LANES
        ci = blk * LANES
        p0, p1 = q0 + pblk * pb, min(q1, q0 + pblk * pb + pb)
        chan = (ni * o + co0) * npix
        full = p0 + (p1 - p0) // rows * rows
        for kp in range(passes - 1):  # every tile, the partial one too, sums into acc
            _tile_pass(
                rows,
                outf,
                0,
                0,
                resf,
                0,
                0,
                0,
                xp,
                xi,
                bases,
                -q0,
                offs,
                kp * kc,
                kc,
                packed,
                wi,
                bias,
                ci,
                lo,
                hi,
                nc,
                acc,
                -p0 * LANES,
                p0,
                p1,
                ACC_STORE | (ACC_LOAD if kp else 0),
            )
        k0 = (passes - 1) * kc
        mode = ACC_LOAD if passes > 1 else 0
        _tile_pass(
            rows,
            outf,
            chan,
            npix,
            resf,
            chan,
            npix,
            has_res,
            xp,
            xi,
            bases,
            -q0,
            offs,
            k0,
            kk - k0,
            packed,
            wi,
            bias,
            ci,
            lo,
            hi,
            nc,
            acc,
            -p0 * LANES,
            p0,
            full,
            mode,
        )
        if full < p1:  # the last, partial tile: into scratch rows of ``rows``, then copied
            m = p1 - full
            if has_res:
                for j in range(nc):
                    rscratch[j * rows : j * rows + m] = res[ni, co0 + j, full:p1]
            _tile_pass(
                rows,
                scratch,
                -full,
                rows,
                rscratch,
                -full,
                rows,
                has_res,
                xp,
                xi,
                bases,
                -q0,
                offs,
                k0,
                kk - k0,
                packed,
                wi,
                bias,
                ci,
                lo,
                hi,
                nc,
                acc,
                -p0 * LANES,
                full,
                full + 1,
                mode,
            )
            for j in range(nc):
                out[ni, co0 + j, full:p1] = scratch[j * rows : j * rows + m]
        if act != NONE and act != RELU and act != CLIP:
            for j in range(nc):
                act_inplace(out[ni, co0 + j, p0:p1], act, alo, ahi)


@njit(parallel=True, cache=True)
def _conv_parallel(
    xp, bases, offs, packed, bias, res, out, geom, lo, hi, act, alo, ahi, total, chunks
):
    for ch in prange(chunks):
        _conv_tasks(
            xp,
            bases,
            offs,
            packed,
            bias,
            res,
            out,
            geom,
            lo,
            hi,
            act,
            alo,
            ahi,
            ch * total // chunks,
            (ch + 1) * total // chunks,
            0,
            out.shape[2],
        )


@njit(cache=True)
def _pad_band(x, ph, pw, iy0, hb, xb):
    """Rows [iy0, iy0 + hb) of every plane of ``x`` zero-padded by (ph, pw) into flat ``xb``,
    borders included (``xb`` may be an arena buffer other layers wrote). Unsigned indices: signed
    ones keep numba's negative-index wraparound, which stops LLVM vectorising the copy (a view per
    row, or signed indices, took 10-20 us on a 16x32x32 input, a quarter of its conv; this ~3)."""
    n, c, h, w = x.shape
    xf = x.reshape(-1)
    wp = w + 2 * pw
    width, side, full = numba.uint64(w), numba.uint64(pw), numba.uint64(wp)
    for t in range(n * c):
        for r in range(hb):
            d = numba.uint64((t * hb + r) * wp)
            y = iy0 + r - ph
            if y < 0 or y >= h:
                for j in range(full):
                    xb[d + j] = 0.0
                continue
            s = numba.uint64((t * h + y) * w)
            for j in range(side):
                xb[d + j] = 0.0
                xb[d + side + width + j] = 0.0
            d += side
            for j in range(width):
                xb[d + j] = xf[s + j]


@njit(cache=True)
def _conv_band(
    x,
    packed,
    bias,
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
    lo,
    hi,
    act,
    alo,
    ahi,
    rows,
    q0,
    q1,
):
    """Output pixels [q0, q1) of every image and channel, from a private zero-padded copy of
    the input rows they read (see :func:`conv2d_planned`); without padding (1x1 convs) straight
    from the input, whose rows of this band the same thread wrote if the previous layer was
    split the same way."""
    if q1 <= q0:
        return
    n_img, c, h, w = x.shape
    ow, npix = out.shape[3], out.shape[2] * out.shape[3]
    wp = w + 2 * pw
    oy0, oy1 = q0 // ow, (q1 - 1) // ow
    if ph == 0 and pw == 0:
        iy0, hb = 0, h
        xb = x.reshape(-1)
    else:
        iy0 = oy0 * sh
        hb = oy1 * sh + dh * (kh - 1) + 1 - iy0
        xb = np.empty(n_img * c * hb * wp, np.float32)
        _pad_band(x, ph, pw, iy0, hb, xb)
    # pixel by pixel without a division per pixel (512 of them took 1.7 us, this 0.5)
    bases = np.zeros(q1 - q0 + MAX_ROWS, np.intp)
    ox, row = q0 % ow, (oy0 * sh - iy0) * wp
    for i in range(q1 - q0):
        bases[i] = row + ox * sw
        ox += 1
        if ox == ow:
            ox, row = 0, row + sh * wp
    offs = tap_offsets(c // groups, kh, kw, dh, dw, hb, wp)
    nbg = packed.shape[0] // groups
    geom = (groups, nbg, c // groups, hb * wp, 1, q1 - q0, rows)
    _conv_tasks(
        xb,
        bases,
        offs,
        packed,
        bias,
        res.reshape(n_img, out.shape[1], npix) if res.size else res.reshape(0, 0, 0),
        out.reshape(n_img, out.shape[1], npix),
        geom,
        lo,
        hi,
        act,
        alo,
        ahi,
        0,
        n_img * groups * nbg,
        q0,
        q1,
    )


@njit(cache=True)
def by_bands(tiles, chunks, weights, padded_input):
    """Whether a layer of ``tiles`` output tiles splits among ``chunks`` threads by bands of
    output rows (see :func:`conv2d_planned`): ``BAND_TILES`` tiles per thread or tiles that
    divide evenly among them, and weights no larger than the padded input (floats)."""
    return (tiles >= BAND_TILES * chunks or tiles % chunks == 0) and weights <= padded_input


@njit(cache=True)
def band(ch, chunks, npix, rows):
    """Output pixels [q0, q1) of band ``ch`` of ``chunks``: whole tiles of ``rows`` pixels."""
    tiles = (npix + rows - 1) // rows
    return ch * tiles // chunks * rows, min(npix, (ch + 1) * tiles // chunks * rows)


@njit(parallel=True, cache=True)
def _conv_bands(
    x,
    packed,
    bias,
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
    lo,
    hi,
    act,
    alo,
    ahi,
    rows,
    chunks,
):
    npix = out.shape[2] * out.shape[3]
    for ch in prange(chunks):
        q0, q1 = band(ch, chunks, npix, rows)
        _conv_band(
            x,
            packed,
            bias,
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
            lo,
            hi,
            act,
            alo,
            ahi,
            rows,
            q0,
            q1,
        )


def conv_geometry(xshape, o, kh, kw, stride, padding, dilation, groups):
    """The per-layer constants of :func:`conv2d_planned` for a conv on input ``xshape``:
    ``(pixel_bases args, tap_offsets args, padded input size)``. The generated code computes
    the two arrays once, when the model is constructed (per call they cost ~3 us of a ~25 us
    layer); they are not stored in weights.npz."""
    n, c, h, w, kh, kw, groups = (int(v) for v in (*xshape, kh, kw, groups))
    (sh, sw), (ph, pw), (dh, dw) = ((int(a), int(b)) for a, b in (stride, padding, dilation))
    hp, wp = h + 2 * ph, w + 2 * pw
    oh = (hp - dh * (kh - 1) - 1) // sh + 1
    ow = (wp - dw * (kw - 1) - 1) // sw + 1
    return (
        (oh, ow, sh, sw, wp),
        (c // groups, kh, kw, dh, dw, hp, wp),
        n * c * hp * wp if ph or pw else 0,
    )


def pack_bias(b, o: int, groups: int) -> np.ndarray:
    """Bias (O,) or None -> float32 padded like :func:`pack_weight`'s output channels."""
    og = o // groups
    o16 = -(-og // LANES) * LANES
    out = np.zeros((groups, o16), np.float32)
    if b is not None and np.size(b):
        out[:, :og] = np.asarray(b, np.float32).reshape(groups, og)
    return out.reshape(-1)


@njit(cache=True)
def _channels_last(x):
    """(``xt``, bases, offs) for the micro-kernel on a 1x1 conv: ``xt`` (flat) holds each image
    of ``x`` (N, C, H, W) as (H * W, C), so pixel p's taps are at p * C + k. On a small plane
    the micro-kernel then reads a tile's pixels as C consecutive floats each (bases p * C,
    offsets k) instead of one cache line per channel: on NCHW input a tile's C lines and its
    weight block outgrew L1 (320 -> 1280 on 7x7: 20 KB each) and the loop ran at the L2's rate.
    Measured on the Zen 3, 1 thread: 0.63-0.73x the time on MobileNetV2's 7x7 1x1 layers,
    0.88-0.99x on its 14x14 ones, before the copy, which made those slower (CL_MAX_PIXELS).
    The copy reads each channel's plane in order and writes it with stride C (the H * W lines
    it writes stay in L1 from one channel to the next), with unsigned indices: 25 us for
    960 x 7 x 7, where blocks of 16 pixels x 64 channels with signed indices took 79."""
    n, c, h, w = x.shape
    npix = h * w
    xf = x.reshape(-1)
    xt = np.empty(x.size, np.float32)
    bases = np.zeros(npix + MAX_ROWS, np.intp)
    for p in range(npix):
        bases[p] = p * c
    uc, un = numba.uint64(c), numba.uint64(npix)
    for ni in range(n):
        base = numba.uint64(ni * c * npix)
        for k in range(uc):
            src = base + k * un
            for p in range(un):
                xt[base + p * uc + k] = xf[src + p]
    return xt, bases, np.arange(c)


@njit(cache=True)
def _subsample(x, sh, sw, oh, ow):
    """``x[:, :, ::sh, ::sw]`` cut to (oh, ow), contiguous (unsigned indices: the copy's loops
    then compile without numba's wraparound checks)."""
    n, c, h, w = x.shape
    xf = x.reshape(-1)
    out = np.empty((n, c, oh, ow), np.float32)
    of = out.reshape(-1)
    u = numba.uint64
    for t in range(n * c):
        for r in range(oh):
            src, dst = u((t * h + r * sh) * w), u((t * oh + r) * ow)
            for q in range(u(ow)):
                of[dst + q] = xf[src + q * u(sw)]
    return out


@njit(cache=True)
def task_geometry(n_img, groups, nbg, cg, plane, npix, rows, chunks):
    """(``geom`` of :func:`_conv_tasks`, number of tasks) for a layer split by channel blocks
    (and, where they do not divide evenly among ``chunks`` threads, blocks of pixels)."""
    blocks = n_img * groups * nbg
    npb = 1  # blocks of pixels per channel block: equal work per thread
    while (blocks * npb) % chunks:
        npb += 1
    per_block = (npix + npb - 1) // npb
    pb = (per_block + rows - 1) // rows * rows  # pixels per block, a multiple of rows
    npb = (npix + pb - 1) // pb
    return (groups, nbg, cg, plane, npb, pb, rows), blocks * npb


@njit(cache=True)
def conv2d_planned(
    x,
    xp,
    packed,
    bias,
    bases,
    offs,
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
    act,
    alo,
    ahi,
    nthreads,
):
    """:func:`conv2d_packed` with its per-layer constants given: ``xp`` a buffer for the padded
    input (size 0 without padding), ``bias`` from :func:`pack_bias`, ``bases``/``offs`` from
    :func:`pixel_bases` / :func:`tap_offsets` with :func:`conv_geometry`'s arguments. What the
    generated code calls.

    Threads split a layer by bands of output pixels when it has ``BAND_TILES`` tiles per thread
    or its tiles divide evenly among them, and its weights are no larger than its padded input:
    each pads the input rows its band reads into a private buffer (a conv without padding reads
    the input directly), so a thread reads what it wrote in the previous layer, except the halo
    rows. Splitting by channel blocks instead made every thread read the whole input, half of it
    from the other core's cache: a 16x32x32 layer took 40 us on 2 threads against 25 us with an
    input both caches already held. But bands make every thread read all the weights, which
    costs more where they outweigh the input: ResNet-18's 512->512 3x3 on 7x7 (9.4 MB of
    weights, 166 KB of input) took 1.65 ms in bands and 1.47 by channel blocks from cold caches
    (Zen 3, 2 threads, min of 25). Other layers split by channel blocks (or pixel blocks) of one
    shared padded input, ``xp``."""
    n_img, c, h, w = x.shape
    o, oh, ow = out.shape[1], out.shape[2], out.shape[3]
    cg = c // groups
    hp, wp = h + 2 * ph, w + 2 * pw
    nbg = packed.shape[0] // groups
    # clamps run in the micro-kernel; any other activation afterwards, on the written rows
    lo = np.float32(alo if act == CLIP else 0.0 if act == RELU else -np.inf)
    hi = np.float32(ahi if act == CLIP else np.inf)
    npix = oh * ow
    rows = best_rows(npix)
    macs = n_img * o * npix * offs.shape[0]
    chunks = max(1, min(nthreads, macs // PAR_MACS))
    pointwise = kh == 1 and kw == 1 and ph == 0 and pw == 0 and groups == 1 and POINTWISE
    if pointwise and (sh > 1 or sw > 1) and (npix >= PW_MIN_PIXELS or npix <= CL_MAX_PIXELS):
        # a strided 1x1 conv (a ResNet's downsample) is a 1x1 conv of the subsampled input:
        # with its copy it takes the two 1x1 paths below, where the tile read two cache lines
        # per channel for a tile's pixels at stride 2 (64->128 on 56->28: 265 us on 2 threads,
        # ORT 109-155)
        x = _subsample(x, sh, sw, oh, ow)
        sh = sw = 1
        h, w, hp, wp = oh, ow, oh, ow
    pointwise = pointwise and sh == 1 and sw == 1
    if pointwise and npix >= PW_MIN_PIXELS:
        conv1x1_pixel_vectors(x, packed, bias, res, out, lo, hi, act, alo, ahi, chunks)
        return
    # a smaller 1x1 plane (the pixel-vector kernel's are larger) reads a channel-last copy of
    # its input where that kernel exists: see _channels_last
    transposed = pointwise and npix <= CL_MAX_PIXELS
    tiles = (npix + rows - 1) // rows
    # bands make every thread read all the weights, channel blocks all the input: the smaller
    bands = chunks > 1 and by_bands(tiles, chunks, packed.size, n_img * c * hp * wp)
    if bands and not transposed:
        _conv_bands(
            x,
            packed,
            bias,
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
            lo,
            hi,
            act,
            alo,
            ahi,
            rows,
            chunks,
        )
        return
    if transposed:
        src, bases, offs = _channels_last(x)
    elif ph or pw:
        _pad_band(x, ph, pw, 0, hp, xp)
        src = xp
    else:
        src = x.reshape(-1)
    geom, total = task_geometry(n_img, groups, nbg, cg, hp * wp, npix, rows, chunks)
    outf = out.reshape(n_img, o, npix)
    resf = res.reshape(n_img, o, npix) if res.size else res.reshape(0, 0, 0)
    if chunks == 1:
        _conv_tasks(
            src,
            bases,
            offs,
            packed,
            bias,
            resf,
            outf,
            geom,
            lo,
            hi,
            act,
            alo,
            ahi,
            0,
            total,
            0,
            npix,
        )
    else:
        _conv_parallel(
            src,
            bases,
            offs,
            packed,
            bias,
            resf,
            outf,
            geom,
            lo,
            hi,
            act,
            alo,
            ahi,
            total,
            min(chunks, total),
        )


@njit(cache=True)
def conv2d_packed(
    x, packed, b, res, out, kh, kw, sh, sw, ph, pw, dh, dw, groups, act, alo, ahi, nthreads
):
    """float32 conv2d (NCHW; any stride, padding, dilation, groups) with weights packed by
    :func:`pack_weight`, fused ``act(y + b + res)``; ``b`` (O,) and ``res`` (like ``out``) may have
    size 0. Tasks of (image, 16 output channels, block of output pixels) are shared among
    ``nthreads``; a layer too small to be worth a parallel region runs on the calling thread.
    Computes its per-layer constants on each call (:func:`conv2d_planned` takes them given)."""
    n_img, c, h, w = x.shape
    o, oh, ow = out.shape[1], out.shape[2], out.shape[3]
    og = o // groups
    hp, wp = h + 2 * ph, w + 2 * pw
    nbg = packed.shape[0] // groups
    bases = pixel_bases(oh, ow, sh, sw, wp)
    offs = tap_offsets(c // groups, kh, kw, dh, dw, hp, wp)
    bias = np.zeros(packed.shape[0] * LANES, np.float32)
    if b.shape[0] > 0:
        for g in range(groups):
            bias[g * nbg * LANES : g * nbg * LANES + og] = b[g * og : (g + 1) * og]
    xp = np.empty(n_img * c * hp * wp if ph or pw else 0, np.float32)
    conv2d_planned(
        x,
        xp,
        packed,
        bias,
        bases,
        offs,
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
        act,
        alo,
        ahi,
        nthreads,
    )
