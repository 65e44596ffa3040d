"""Numba kernels for the numba backend: activations, elementwise math, normalization, softmax, data
movement and reductions (conv, linear, matmul, attention and pooling live in numba_kernels_conv).

This module needs only numpy and numba: :func:`backends.numba.backend.NumbaModel.save` copies it
into a saved package as ``kernels.py``. Every kernel writes into a preallocated ``out`` array; the
generated code passes arrays in a canonical rank (1-D for unary ops, 4-D for broadcasting, 3-D
``(outer, axis, inner)`` for axis ops) so that each kernel compiles once per dtype. Every kernel is
``cache=True``: a second process loads machine code from ``__pycache__`` instead of compiling.

Threading: kernels marked ``parallel=True`` split work with ``prange`` into ``nthreads`` chunks
(an argument: ``numba.get_num_threads()`` inside a jitted function makes it uncacheable). No
kernel calls BLAS (numba's ``np.dot`` needs SciPy's), so the only thread pool is numba's, and its
OpenMP layer comes first: entering a parallel region costs ~3.5 us there, ~95 us with
``workqueue`` (the fallback).
"""

from __future__ import annotations

import math
import os

import numba
from numba import njit

# numba re-reads its config from the environment when it compiles, so set the variables too.
# OpenMP first: its workers spin briefly between parallel regions, so entering one costs ~3.5 us;
# workqueue's sleeping workers cost ~95 us per region on these machines (docs/backends.md), as
# much as a whole small layer. workqueue (always built) is the fallback when no OpenMP runtime
# (libgomp) is installed.
os.environ.setdefault("NUMBA_THREADING_LAYER_PRIORITY", "omp tbb workqueue")
os.environ.setdefault("NUMBA_THREADING_LAYER", "default")
numba.config.THREADING_LAYER_PRIORITY = os.environ["NUMBA_THREADING_LAYER_PRIORITY"].split()
numba.config.THREADING_LAYER = os.environ["NUMBA_THREADING_LAYER"]

# Activation and unary-math codes; the generated code passes them with two float parameters
# (clip's bounds, -inf/inf when absent).
NONE, RELU, CLIP, HARDSWISH, HARDSIGMOID, SILU, GELU, GELU_TANH, SIGMOID, TANH = range(10)
NEG, EXP, SQRT, RSQRT, ABS, LOG = range(10, 16)
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
INV_SQRT2 = 1.0 / math.sqrt(2.0)


def cpu_features() -> frozenset[str]:
    """The instruction-set features numba compiles for: ``NUMBA_CPU_FEATURES`` when set (as numba
    itself does), else the host's, as names without the sign (``{"avx2", "avx512f", ...}``).

    The hand-written micro-kernels pick their form from these at import: an AVX-512 tile on a
    CPU without AVX-512 spills half its accumulators, and an AVX-512 VNNI intrinsic aborts the
    process (LLVM cannot select it). numba's cache is keyed by the same features, so a cached
    kernel never runs on a CPU it was not built for."""
    spec = numba.config.CPU_FEATURES  # "" for NUMBA_CPU_NAME=generic: the baseline only
    if spec is None:
        import llvmlite.binding as llvm

        spec = llvm.get_host_cpu_features().flatten()
    return frozenset(f[1:] for f in spec.split(",") if f.startswith("+"))


CPU_FEATURES = cpu_features()


def reduction_loop(builder, n, inits, step):
    """LLVM IR of ``for k in range(n): values = step(k, values)`` with ``values`` kept in
    registers (phi nodes) from ``inits``: the reduction loop of the hand-written micro-kernels.
    Returns the values after the loop, with ``builder`` positioned there."""
    pre = builder.block
    head = builder.append_basic_block("loop.head")
    body = builder.append_basic_block("loop.body")
    end = builder.append_basic_block("loop.end")
    builder.branch(head)
    builder.position_at_end(head)
    k = builder.phi(n.type)
    values = [builder.phi(v.type) for v in inits]
    k.add_incoming(n.type(0), pre)
    for phi, init in zip(values, inits, strict=True):
        phi.add_incoming(init, pre)
    builder.cbranch(builder.icmp_signed("<", k, n), body, end)
    builder.position_at_end(body)
    new = step(k, values)
    k.add_incoming(builder.add(k, n.type(1)), builder.block)
    for phi, value in zip(values, new, strict=True):
        phi.add_incoming(value, builder.block)
    builder.branch(head)
    builder.position_at_end(end)
    return values


# output channels per block of a packed fp32 conv weight (numba_kernels_f32.pack_weight): one
# AVX-512 register of float32, two of AVX2's; the layout is the same on every CPU
LANES = 16
# 512-bit registers: 32 of them; without AVX-512 (AVX2) a <16 x float> is two of 16 ymm registers
HAS_AVX512 = "avx512f" in CPU_FEATURES


# -- activations -----------------------------------------------------------------------------------


@njit(cache=True)
def act_inplace(y, code, lo, hi):
    """Apply activation or unary op ``code`` to the 1-D array ``y`` in place (one branch per call,
    so each loop below vectorises)."""
    n = y.shape[0]
    if code == NONE:
        return
    if code == RELU:
        for i in range(n):
            y[i] = max(y[i], 0.0)
    elif code == CLIP:
        for i in range(n):
            y[i] = min(max(y[i], lo), hi)
    elif code == HARDSWISH:
        for i in range(n):
            v = y[i]
            y[i] = v * min(max(v / 6.0 + 0.5, 0.0), 1.0)
    elif code == HARDSIGMOID:
        for i in range(n):
            y[i] = min(max(y[i] / 6.0 + 0.5, 0.0), 1.0)
    elif code == SILU:
        for i in range(n):
            v = y[i]
            y[i] = v / (1.0 + math.exp(-v))
    elif code == SIGMOID:
        for i in range(n):
            y[i] = 1.0 / (1.0 + math.exp(-y[i]))
    elif code == TANH:
        for i in range(n):
            y[i] = math.tanh(y[i])
    elif code == GELU:
        for i in range(n):
            v = y[i]
            y[i] = 0.5 * v * (1.0 + math.erf(v * INV_SQRT2))
    elif code == GELU_TANH:
        for i in range(n):
            v = y[i]
            y[i] = 0.5 * v * (1.0 + math.tanh(SQRT_2_OVER_PI * (v + 0.044715 * v * v * v)))
    else:
        _math_inplace(y, code)


@njit(cache=True)
def _math_inplace(y, code):
    n = y.shape[0]
    if code == NEG:
        for i in range(n):
            y[i] = -y[i]
    elif code == EXP:
        for i in range(n):
            y[i] = math.exp(y[i])
    elif code == SQRT:
        for i in range(n):
            y[i] = math.sqrt(y[i]) if y[i] >= 0 else math.nan
    elif code == RSQRT:
        for i in range(n):
            y[i] = 1.0 / math.sqrt(y[i]) if y[i] >= 0 else math.nan
    elif code == ABS:
        for i in range(n):
            y[i] = abs(y[i])
    elif code == LOG:
        for i in range(n):
            v = y[i]
            y[i] = math.log(v) if v > 0 else (-math.inf if v == 0 else math.nan)


@njit(cache=True)
def finish_row(acc, out, bias, res, act, lo, hi):
    """``out = act(acc + bias + res)`` on 1-D rows; ``res`` of size 0 means no residual. The fused
    epilogue of conv2d and linear, applied while the row is still in cache."""
    n = out.shape[0]
    if res.shape[0] == n:
        for i in range(n):
            out[i] = acc[i] + bias + res[i]
    else:
        for i in range(n):
            out[i] = acc[i] + bias
    act_inplace(out, act, lo, hi)


@njit(cache=True)
def unary(x, out, code, lo, hi):
    """Activation or unary math op on flat arrays: ``out = f(x)`` (single-threaded: memory-bound,
    and a parallel kernel costs seconds more to compile)."""
    out[:] = x
    act_inplace(out, code, lo, hi)


@njit(cache=True)
def cast(x, out):
    """Flat dtype conversion (float to int truncates, to bool tests != 0, like numpy)."""
    for i in range(x.shape[0]):
        out[i] = x[i]


@njit(cache=True)
def cast_to_bool(x, out):
    for i in range(x.shape[0]):
        out[i] = x[i] != 0


# -- broadcasting binary ops on canonical 4-D views (each dim equal to out's or 1) -----------------

ADD, SUB, MUL, DIV, POW, MAXIMUM, MINIMUM = range(7)
EQ, NE, LT, GT = range(4)


@njit(cache=True)
def binary(a, b, out, code):
    """``out = a <op> b`` with broadcasting; one branch per output row, so the loops vectorise
    (LLVM versions ``x[i * s]`` for a runtime stride ``s`` of 1)."""
    s0, s1, s2, n = out.shape
    sa, sb = 1 if a.shape[3] == n else 0, 1 if b.shape[3] == n else 0
    for i in range(s0):
        for j in range(s1):
            for k in range(s2):
                x = a[min(i, a.shape[0] - 1), min(j, a.shape[1] - 1), min(k, a.shape[2] - 1)]
                y = b[min(i, b.shape[0] - 1), min(j, b.shape[1] - 1), min(k, b.shape[2] - 1)]
                o = out[i, j, k]
                if code == ADD:
                    for m in range(n):
                        o[m] = x[m * sa] + y[m * sb]
                elif code == SUB:
                    for m in range(n):
                        o[m] = x[m * sa] - y[m * sb]
                elif code == MUL:
                    for m in range(n):
                        o[m] = x[m * sa] * y[m * sb]
                elif code == DIV:
                    for m in range(n):
                        o[m] = x[m * sa] / y[m * sb]
                elif code == POW:
                    for m in range(n):
                        o[m] = x[m * sa] ** y[m * sb]
                elif code == MAXIMUM:
                    for m in range(n):
                        o[m] = max(x[m * sa], y[m * sb])
                else:
                    for m in range(n):
                        o[m] = min(x[m * sa], y[m * sb])


@njit(cache=True)
def compare(a, b, out, code):
    """``out = a <cmp> b`` (bool) with broadcasting, like :func:`binary`."""
    s0, s1, s2, n = out.shape
    sa, sb = 1 if a.shape[3] == n else 0, 1 if b.shape[3] == n else 0
    for i in range(s0):
        for j in range(s1):
            for k in range(s2):
                x = a[min(i, a.shape[0] - 1), min(j, a.shape[1] - 1), min(k, a.shape[2] - 1)]
                y = b[min(i, b.shape[0] - 1), min(j, b.shape[1] - 1), min(k, b.shape[2] - 1)]
                o = out[i, j, k]
                for m in range(n):
                    u, v = x[m * sa], y[m * sb]
                    o[m] = (
                        u == v
                        if code == EQ
                        else u != v
                        if code == NE
                        else (u < v if code == LT else u > v)
                    )


@njit(cache=True)
def where(cond, a, b, out):
    """``out = cond ? a : b`` on 4-D views whose dims equal out's or are 1."""
    s0, s1, s2, s3 = out.shape
    for i in range(s0):
        for j in range(s1):
            for k in range(s2):
                for m in range(s3):
                    c = cond[
                        min(i, cond.shape[0] - 1),
                        min(j, cond.shape[1] - 1),
                        min(k, cond.shape[2] - 1),
                        min(m, cond.shape[3] - 1),
                    ]
                    if c:
                        out[i, j, k, m] = a[
                            min(i, a.shape[0] - 1),
                            min(j, a.shape[1] - 1),
                            min(k, a.shape[2] - 1),
                            min(m, a.shape[3] - 1),
                        ]
                    else:
                        out[i, j, k, m] = b[
                            min(i, b.shape[0] - 1),
                            min(j, b.shape[1] - 1),
                            min(k, b.shape[2] - 1),
                            min(m, b.shape[3] - 1),
                        ]


# -- normalization and softmax ---------------------------------------------------------------------


@njit(cache=True)
def batch_norm(x, scale, bias, mean, var, eps, out):
    """Inference batch norm on (N, C, R) views with per-channel (C,) parameters."""
    n, c, r = x.shape
    for t in range(n * c):
        ch = t % c
        k = scale[ch] / math.sqrt(var[ch] + eps)
        shift = bias[ch] - mean[ch] * k
        src, dst = x[t // c, ch], out[t // c, ch]
        for i in range(r):
            dst[i] = src[i] * k + shift


@njit(cache=True)
def _moments(row):
    """Mean and variance of a 1-D row, accumulated in float64 (two passes, like the reference)."""
    s = 0.0
    for i in range(row.shape[0]):
        s += row[i]
    mean = s / row.shape[0]
    v = 0.0
    for i in range(row.shape[0]):
        d = row[i] - mean
        v += d * d
    return mean, v / row.shape[0]


@njit(cache=True)
def layer_norm(x, scale, bias, eps, out):
    """Normalise each row of (R, D) views, then ``* scale + bias`` ((D,) each, size 0 if absent)."""
    rows, d = x.shape
    for r in range(rows):
        src, dst = x[r], out[r]
        mean, var = _moments(src)
        inv = 1.0 / math.sqrt(var + eps)
        for i in range(d):
            dst[i] = (src[i] - mean) * inv
        if scale.shape[0] == d:
            for i in range(d):
                dst[i] *= scale[i]
        if bias.shape[0] == d:
            for i in range(d):
                dst[i] += bias[i]


@njit(cache=True)
def normalize_axis(x, eps, out):
    """Normalise (A, D, B) views over D (layer_norm over a middle block of axes, no affine)."""
    a_, d, b_ = x.shape
    for t in range(a_ * b_):
        a, b = t // b_, t % b_
        s = 0.0
        for i in range(d):
            s += x[a, i, b]
        mean = s / d
        v = 0.0
        for i in range(d):
            v += (x[a, i, b] - mean) ** 2
        inv = 1.0 / math.sqrt(v / d + eps)
        for i in range(d):
            out[a, i, b] = (x[a, i, b] - mean) * inv


@njit(cache=True)
def group_norm(x, scale, bias, eps, out):
    """Group norm on (N, G, C/G, R) views with per-channel (C,) scale and bias."""
    n, g, cg, r = x.shape
    for t in range(n * g):
        block, dst = x[t // g, t % g].reshape(cg * r), out[t // g, t % g]
        mean, var = _moments(block)
        inv = 1.0 / math.sqrt(var + eps)
        for c in range(cg):
            ch = (t % g) * cg + c
            k, src = scale[ch] * inv, x[t // g, t % g, c]
            shift = bias[ch] - mean * k
            for i in range(r):
                dst[c, i] = src[i] * k + shift


@njit(cache=True)
def softmax(x, out, log):
    """(Log-)softmax of (A, D, B) views over D."""
    a_, d, b_ = x.shape
    for t in range(a_ * b_):
        a, b = t // b_, t % b_
        m = -math.inf
        for i in range(d):
            m = max(m, x[a, i, b])
        s = 0.0
        for i in range(d):
            e = math.exp(x[a, i, b] - m)
            s += e
            if not log:
                out[a, i, b] = e
        if log:
            ls = math.log(s)
            for i in range(d):
                out[a, i, b] = x[a, i, b] - m - ls
        else:
            for i in range(d):
                out[a, i, b] = out[a, i, b] / s


@njit(cache=True)
def softmax_rows(x):
    """Softmax of each row of a 2-D array in place (attention's logits)."""
    for r in range(x.shape[0]):
        row = x[r]
        m = -math.inf
        for i in range(row.shape[0]):
            m = max(m, row[i])
        s = 0.0
        for i in range(row.shape[0]):
            e = math.exp(row[i] - m)
            row[i] = e
            s += e
        inv = 1.0 / s
        for i in range(row.shape[0]):
            row[i] *= inv


# -- reductions ------------------------------------------------------------------------------------

SUM, MEAN, NORM2, NORM_MAX, NORM_MIN, NORM_P = range(6)


@njit(cache=True)
def reduce(x, out, kind, p):
    """Reduce (A, D, B) views over D into (A, B): sum, mean, or a vector norm of order ``p``."""
    a_, d, b_ = x.shape
    for t in range(a_ * b_):
        a, b = t // b_, t % b_
        if kind == NORM_MAX or kind == NORM_MIN:
            acc = abs(x[a, 0, b]) if d > 0 else 0.0
            for i in range(1, d):
                v = abs(x[a, i, b])
                acc = max(acc, v) if kind == NORM_MAX else min(acc, v)
            out[a, b] = acc
            continue
        acc = 0.0
        for i in range(d):
            v = x[a, i, b]
            if kind == NORM2:
                acc += v * v
            elif kind == NORM_P:
                acc += abs(v) ** p
            else:
                acc += v
        if kind == MEAN:
            acc /= d
        elif kind == NORM2:
            acc = math.sqrt(acc)
        elif kind == NORM_P:
            acc = acc ** (1.0 / p)
        out[a, b] = acc


# -- data movement ---------------------------------------------------------------------------------


@njit(cache=True)
def slice_axis(x, out, start, step):
    """``out[:, i, :] = x[:, start + i * step, :]`` on (A, D, B) views (slice, split)."""
    for a in range(out.shape[0]):
        for i in range(out.shape[1]):
            out[a, i] = x[a, start + i * step]


@njit(cache=True)
def place_axis(x, out, offset):
    """``out[:, offset + i, :] = x[:, i, :]`` on (A, D, B) views (one input of a concat)."""
    for a in range(out.shape[0]):
        for i in range(x.shape[1]):
            out[a, offset + i] = x[a, i]


@njit(cache=True)
def expand(x, out):
    """Broadcast a 4-D view (dims equal to out's or 1) into ``out``."""
    s0, s1, s2, s3 = out.shape
    for i in range(s0):
        for j in range(s1):
            for k in range(s2):
                src = x[min(i, x.shape[0] - 1), min(j, x.shape[1] - 1), min(k, x.shape[2] - 1)]
                dst = out[i, j, k]
                if src.shape[0] == s3:
                    dst[:] = src
                else:
                    dst[:] = src[0]


@njit(cache=True)
def permute(x, out, perm):
    """``out = x.transpose(perm)`` for 4-D views; ``perm`` is a 4-tuple."""
    xs = x.strides
    st = (xs[perm[0]], xs[perm[1]], xs[perm[2]], xs[perm[3]])
    flat = x.reshape(x.size)
    isz = x.itemsize
    s0, s1, s2, s3 = out.shape
    for i in range(s0):
        for j in range(s1):
            for k in range(s2):
                base = (i * st[0] + j * st[1] + k * st[2]) // isz
                inner = st[3] // isz
                dst = out[i, j, k]
                for m in range(s3):
                    dst[m] = flat[base + m * inner]


@njit(cache=True)
def pad(x, out, before, value):
    """Constant padding of 4-D views; ``before`` holds the leading pad per axis (negative crops)."""
    out[:] = value
    lo = [0, 0, 0, 0]
    hi = [0, 0, 0, 0]
    for d in range(4):
        lo[d] = max(0, -before[d])
        hi[d] = min(x.shape[d], out.shape[d] - before[d])
    for i in range(lo[0], hi[0]):
        for j in range(lo[1], hi[1]):
            for k in range(lo[2], hi[2]):
                src = x[i, j, k]
                dst = out[i + before[0], j + before[1], k + before[2]]
                for m in range(lo[3], hi[3]):
                    dst[m + before[3]] = src[m]


@njit(cache=True)
def roll(x, out, shifts):
    """``np.roll`` of 4-D views with one shift per axis."""
    s0, s1, s2, s3 = x.shape
    for i in range(s0):
        oi = (i + shifts[0]) % s0
        for j in range(s1):
            oj = (j + shifts[1]) % s1
            for k in range(s2):
                ok = (k + shifts[2]) % s2
                src, dst = x[i, j, k], out[oi, oj, ok]
                for m in range(s3):
                    dst[(m + shifts[3]) % s3] = src[m]


@njit(cache=True)
def take(x, indices, out):
    """``out[a, i, b] = x[a, indices[i], b]`` on (A, D, B) views; negative indices wrap."""
    d = x.shape[1]
    for a in range(x.shape[0]):
        for i in range(indices.shape[0]):
            j = indices[i]
            if j < 0:
                j += d
            out[a, i] = x[a, j]


@njit(cache=True)
def codebook_decode(codebook, packed, bits, out):
    """``out[e] = codebook[e // (n / G), index e]`` for the dense little-endian bit-packed indices
    of compiler/ops/codebook.py (an index may span two bytes); ``out`` is flat, ``codebook`` (G, K).
    """
    n = out.shape[0]
    per_group = n // codebook.shape[0]
    mask = (1 << bits) - 1
    for e in range(n):
        bit = e * bits
        byte, shift = bit >> 3, bit & 7
        v = int(packed[byte]) >> shift
        if shift + bits > 8:
            v |= int(packed[byte + 1]) << (8 - shift)
        out[e] = codebook[e // per_group, v & mask]
