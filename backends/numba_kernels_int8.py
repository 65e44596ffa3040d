"""Integer kernels of the numba backend: uint8 x int8 convolution and linear with int32
accumulation, fused bias, residual, relu/clip and requantization.

LLVM (through numba) does not emit AVX-512 VNNI's ``vpdpbusd`` for any int8 loop
(../shared/PERF_NOTES.md), so the inner product is an explicit intrinsic: :func:`_dot_rows`
builds the LLVM IR of a loop that multiplies 4 uint8 of each of ``R`` activation rows (broadcast)
with a packed 64-byte block of int8 weights (16 output channels x 4 inputs) and accumulates 16
int32 lanes per row in registers. Weights are packed once at compile time as
``(O/16, K/4, 16, 4)``; activations are im2col'ed in uint8, padded with their zero point (which is
the value 0.0).

``y = act((acc - z_x * sum_k w) * s_x * s_w + b + residual)``, then either written as float32 or
requantized ``clip(rint(y / s_y) + z_y, 0, 255)`` into uint8 (ONNX Runtime's requantization
too: float scale, round half to even).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

NONE, RELU, CLIP = 0, 1, 2
ROWS = 4  # activation rows per micro-kernel call (independent accumulator chains)


def _dot_rows(rows: int):
    """``c[ci + r*ldc : +16] = sum_k a[ai + r*lda + 4k : +4] . b[bi + 64k : +64]`` for r < rows."""

    @intrinsic
    def dot(typingctx, c, ci, ldc, a, ai, lda, b, bi, n):
        sig = types.void(c, types.intp, types.intp, a, types.intp, types.intp, b, types.intp,
                         types.intp)

        def codegen(context, builder, signature, args):
            c, ci, ldc, a, ai, lda, b, bi, n = args
            cty, _, _, aty, _, _, bty, _, _ = signature.args
            cp = context.make_array(cty)(context, builder, c).data
            ap = context.make_array(aty)(context, builder, a).data
            bp = context.make_array(bty)(context, builder, b).data
            i32 = ir.IntType(32)
            v16 = ir.VectorType(i32, 16)
            fn = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(v16, [v16, v16, v16]),
                "llvm.x86.avx512.vpdpbusd.512")
            rows_a = [builder.bitcast(builder.gep(ap, [builder.add(ai, builder.mul(
                lda, ir.Constant(lda.type, r)))]), i32.as_pointer()) for r in range(rows)]
            bbase = builder.gep(bp, [bi])
            zero = ir.Constant(v16, [0] * 16)
            pre = builder.block
            head = builder.append_basic_block("dot.head")
            body = builder.append_basic_block("dot.body")
            end = builder.append_basic_block("dot.end")
            builder.branch(head)
            builder.position_at_end(head)
            k = builder.phi(n.type)
            accs = [builder.phi(v16) for _ in range(rows)]
            k.add_incoming(ir.Constant(n.type, 0), pre)
            for acc in accs:
                acc.add_incoming(zero, pre)
            builder.cbranch(builder.icmp_signed("<", k, n), body, end)
            builder.position_at_end(body)
            offset = builder.mul(k, ir.Constant(n.type, 64))
            bv = builder.load(builder.bitcast(builder.gep(bbase, [offset]), v16.as_pointer()),
                              align=1)
            new = []
            for acc, row in zip(accs, rows_a, strict=True):
                av = builder.load(builder.gep(row, [k]), align=1)
                av = builder.insert_element(ir.Constant(v16, ir.Undefined), av,
                                            ir.Constant(i32, 0))
                av = builder.shuffle_vector(av, ir.Constant(v16, ir.Undefined),
                                            ir.Constant(v16, [0] * 16))
                new.append(builder.call(fn, [acc, av, bv]))
            step = builder.add(k, ir.Constant(n.type, 1))
            k.add_incoming(step, builder.block)
            for acc, value in zip(accs, new, strict=True):
                acc.add_incoming(value, builder.block)
            builder.branch(head)
            builder.position_at_end(end)
            for r, acc in enumerate(accs):
                at = builder.add(ci, builder.mul(ldc, ir.Constant(ldc.type, r)))
                builder.store(acc, builder.bitcast(builder.gep(cp, [at]), v16.as_pointer()),
                              align=4)
            return context.get_dummy_value()

        return sig, codegen

    return dot


_dot4 = _dot_rows(ROWS)
_dot1 = _dot_rows(1)


def pack_weight(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
    """int8 ``(O, ...)`` -> (packed ``(O16/16, K4/4, 16, 4)`` flat, ``sum_k w`` int32, K4, O16)."""
    o = w.shape[0]
    flat = w.reshape(o, -1).astype(np.int8)
    k4, o16 = -(-flat.shape[1] // 4) * 4, -(-o // 16) * 16
    padded = np.zeros((o16, k4), np.int8)
    padded[:o, : flat.shape[1]] = flat
    packed = padded.reshape(o16 // 16, 16, k4 // 4, 4).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(packed).reshape(-1), flat.astype(np.int32).sum(1), k4, o16


@njit(cache=True)
def gemm_u8s8(a, packed, acc, m, k4, o16):
    """acc[m, o16] (int32) = a[m, k4] (uint8) @ w.T, with w packed by :func:`pack_weight`."""
    a = a.reshape(-1)
    c = acc.reshape(-1)
    nb = o16 // 16
    steps = k4 // 4
    full = m // ROWS * ROWS
    for blk in range(nb):
        for row in range(0, full, ROWS):
            _dot4(c, row * o16 + blk * 16, o16, a, row * k4, k4, packed, blk * steps * 64, steps)
        for row in range(full, m):
            _dot1(c, row * o16 + blk * 16, o16, a, row * k4, k4, packed, blk * steps * 64, steps)


@njit(cache=True)
def _im2col_u8(x, n, xp, cols, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow, zx):
    """cols[(i, j), (c, ki, kj)] of image ``n`` through a plane padded with zx (K padding 0)."""
    c_in, h, w = x.shape[1], x.shape[2], x.shape[3]
    xp[:] = zx
    for c in range(c_in):
        for y in range(h):
            for xx in range(w):
                xp[c, y + ph, xx + pw] = x[n, c, y, xx]
    k = 0
    for c in range(c_in):
        for ki in range(kh):
            for kj in range(kw):
                for i in range(oh):
                    src = xp[c, i * sh + ki * dh]
                    base = i * ow
                    x0 = kj * dw
                    for j in range(ow):
                        cols[base + j, k] = src[x0 + j * sw]
                k += 1
    for kk in range(k, cols.shape[1]):
        cols[:, kk] = 0


@njit(cache=True)
def _finish(acc, rows, o, zx, wsum, scale, bias, res, act, lo, hi, sy, zy, quant, out_f, out_q):
    """Epilogue over ``rows`` outputs of one image: out[o, p] from acc[p, o]."""
    for ch in range(o):
        off = zx * wsum[ch]
        s = scale[ch]
        b = bias[ch] if bias.size else np.float32(0.0)
        for p in range(rows):
            v = np.float32(acc[p, ch] - off) * s + b
            if res.size:
                v += res[ch, p]
            if act == RELU:
                v = max(v, np.float32(0.0))
            elif act == CLIP:
                v = min(max(v, lo), hi)
            if quant:
                q = np.rint(v / sy) + zy
                out_q[ch, p] = np.uint8(min(max(q, 0.0), 255.0))
            else:
                out_f[ch, p] = v


@njit(cache=True)
def conv2d_u8s8(x, zx, packed, wsum, k4, o16, o, kh, kw, sh, sw, ph, pw, dh, dw, scale, bias,
                res, act, lo, hi, sy, zy, quant, out_f, out_q):
    """Integer conv2d (groups 1) of uint8 NCHW ``x``; writes ``out_f`` (float) or ``out_q``
    (uint8, when ``quant``), both NCHW."""
    n_img = x.shape[0]
    oh = out_q.shape[2] if quant else out_f.shape[2]
    ow = out_q.shape[3] if quant else out_f.shape[3]
    rows = oh * ow
    cols = np.empty((rows, k4), np.uint8)
    acc = np.empty((rows, o16), np.int32)
    xp = np.empty((x.shape[1], x.shape[2] + 2 * ph + sh, x.shape[3] + 2 * pw + sw), np.uint8)
    for n in range(n_img):
        _im2col_u8(x, n, xp, cols, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow, zx)
        gemm_u8s8(cols, packed, acc, rows, k4, o16)
        r = res[n].reshape(o, rows) if res.size else res.reshape(0, 0)
        of = out_f[n].reshape(o, rows) if not quant else out_f.reshape(0, 0)
        oq = out_q[n].reshape(o, rows) if quant else out_q.reshape(0, 0)
        _finish(acc, rows, o, zx, wsum, scale, bias, r, act, lo, hi, sy, zy, quant, of, oq)


@njit(cache=True)
def linear_u8s8(x, zx, packed, wsum, k4, o16, o, scale, bias, res, act, lo, hi, sy, zy, quant,
                out_f, out_q):
    """Integer linear of uint8 ``x`` (M, K); ``out_f``/``out_q`` are (M, O)."""
    m, k = x.shape
    a = np.zeros((m, k4), np.uint8)
    a[:, :k] = x
    acc = np.empty((m, o16), np.int32)
    gemm_u8s8(a, packed, acc, m, k4, o16)
    r = res.T.copy() if res.size else res.reshape(0, 0)
    of = np.empty((o, m), np.float32)
    oq = np.empty((o, m), np.uint8)
    _finish(acc, m, o, zx, wsum, scale, bias, r, act, lo, hi, sy, zy, quant, of, oq)
    if quant:
        out_q[:] = oq.T
    else:
        out_f[:] = of.T


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
