"""The GEMM of the numba backend: every matrix product of the kernels (linear, matmul, attention,
the im2col conv) on the float32 conv micro-kernel of numba_kernels_f32, with a matrix's rows as its
pixels; other dtypes by loops. No BLAS: numba's ``np.dot`` calls SciPy's, which a saved package
(numpy and numba only) must not need. Saved packages get a copy as ``kernels_gemm.py``.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from .common import CLIP, LANES, NONE, RELU, act_inplace, reduction_loop
from .f32 import ACC_LOAD, ACC_STORE, KC, MAX_ROWS, ROWS_B, _tile_pass, best_rows

# Rows of A per block of a GEMM: the block's raw sums (GEMM_ROW_TILES tiles x 64 bytes per row)
# wait in a scratch buffer between the passes over K, and then get their epilogue.
GEMM_ROW_TILES = 40


# Independent partial sums of a matrix-vector product's 16 columns (_gemv_block): one chain
# waits an FMA's latency (4 cycles) per step, and the conv tile on a single row is that chain
GEMV_CHAINS = 4


@intrinsic
def _gemv_block(typingctx, x, xi, w, wi, n, acc, ai):
    """``acc[ai : ai + 16] = sum_{k < n} x[xi + k] * w[wi + 16 k : wi + 16 k + 16]`` (flat
    offsets into any float32 arrays): one row of A against one block of 16 packed columns, the
    steps k spread over GEMV_CHAINS accumulators. For rows fewer than a tile's (a batch-1
    classifier head), where the tile would compute rows it drops."""
    i = types.intp
    sig = types.void(x, i, w, i, i, acc, i)

    def codegen(context, builder, signature, args):
        x, xi, w, wi, n, acc, ai = args
        aty = signature.args
        xb, wb, ab = (
            builder.gep(context.make_array(aty[k])(context, builder, v).data, [o])
            for k, v, o in ((0, x, xi), (2, w, wi), (5, acc, ai))
        )
        v16 = ir.VectorType(ir.FloatType(), LANES)
        idx = n.type
        fma = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(v16, [v16, v16, v16]), "llvm.fma.v16f32"
        )
        undef = ir.Constant(v16, ir.Undefined)
        splat0 = ir.Constant(ir.VectorType(ir.IntType(32), LANES), [0] * LANES)

        def fma_step(k, total):
            xv = builder.insert_element(
                undef, builder.load(builder.gep(xb, [k])), ir.IntType(32)(0)
            )
            xv = builder.shuffle_vector(xv, undef, splat0)
            wv = builder.load(
                builder.bitcast(builder.gep(wb, [builder.mul(k, idx(LANES))]), v16.as_pointer()),
                align=4,
            )
            return builder.call(fma, [wv, xv, total])

        chains = idx(GEMV_CHAINS)
        rounds = builder.sdiv(n, chains)
        accs = reduction_loop(
            builder,
            rounds,
            [ir.Constant(v16, [0.0] * LANES)] * GEMV_CHAINS,
            lambda r, vals: [
                fma_step(builder.add(builder.mul(r, chains), idx(c)), v) for c, v in enumerate(vals)
            ],
        )
        done = builder.mul(rounds, chains)
        (last,) = reduction_loop(
            builder,
            builder.sub(n, done),
            [accs[0]],
            lambda k, vals: [fma_step(builder.add(done, k), vals[0])],
        )
        total = last
        for more in accs[1:]:
            total = builder.fadd(total, more)
        builder.store(total, builder.bitcast(ab, v16.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True)
def gemm_packed(a, packed, bias, res, c, act, alo, ahi, m0, m1, b0, b1):
    """``c[m, 16 b + j] = act(sum_k a[m, k] packed[b, k, j] + bias[16 b + j] (+ res[m, 16 b + j]))``
    for rows m in [m0, m1) and column blocks b in [b0, b1) (j within ``c``'s columns): the
    conv's micro-kernel (:func:`_tile_pass`) with A's rows as its pixels (row m's k-th input at
    ``m * K + k``) and ``packed`` as its weights (:func:`pack_weight` of a (N, K) matrix, or
    :func:`pack_columns` of a (K, N) one). It runs in ``ACC_STORE`` mode: a tile's sums go to a
    row-major scratch (16 columns per row), whose epilogue here writes row-major ``c`` (the
    kernel's own epilogue writes channel planes). ``a`` is C-contiguous (M, K) float32, ``res``
    (M, N) or size 0, ``bias`` padded to 16 columns per block."""
    kk = a.shape[1]
    n = c.shape[1]
    if m1 <= m0 or b1 <= b0:
        return
    af = a.reshape(-1)
    has_res = res.shape[0] > 0
    passes = max(1, (kk + KC - 1) // KC)
    kc = (kk + passes - 1) // passes
    rows = best_rows(m1 - m0)
    mb = rows * GEMM_ROW_TILES
    bases = np.zeros(mb + MAX_ROWS, np.intp)  # zeros after the rows: a last, partial tile's
    offs = np.arange(kk)
    acc = np.empty((mb + MAX_ROWS) * LANES, np.float32)
    none = np.empty(0, np.float32)
    lo = np.float32(alo if act == CLIP else 0.0 if act == RELU else -np.inf)
    hi = np.float32(ahi if act == CLIP else np.inf)
    for q0 in range(m0, m1, mb):
        q1 = min(m1, q0 + mb)
        for p in range(q0, q1):
            bases[p - q0] = p * kk
        for p in range(q1 - q0, q1 - q0 + MAX_ROWS):
            bases[p] = 0
        for blk in range(b0, b1):
            col = blk * LANES
            nc = min(LANES, n - col)
            if q1 - q0 < ROWS_B:  # fewer rows than the smaller tile: row by row
                for p in range(q0, q1):
                    _gemv_block(af, p * kk, packed, blk * kk * LANES, kk, acc, (p - q0) * LANES)
                kp_count = 0
            else:
                kp_count = passes
            for kp in range(kp_count):
                k0 = kp * kc
                _tile_pass(
                    rows,
                    none,
                    0,
                    0,
                    none,
                    0,
                    0,
                    0,
                    af,
                    0,
                    bases,
                    -q0,
                    offs,
                    k0,
                    min(kc, kk - k0),
                    packed,
                    blk * kk * LANES,
                    bias,
                    col,
                    lo,
                    hi,
                    nc,
                    acc,
                    -q0 * LANES,
                    q0,
                    q1,
                    ACC_STORE | (ACC_LOAD if kp else 0),
                )
            for p in range(q0, q1):
                s = (p - q0) * LANES
                for j in range(nc):
                    v = acc[s + j] + bias[col + j]
                    if has_res:
                        v += res[p, col + j]
                    # a clamp that keeps NaN, like the kernel's own epilogue
                    v = lo if v < lo else v
                    c[p, col + j] = hi if v > hi else v
                if act != NONE and act != RELU and act != CLIP:
                    act_inplace(c[p, col : col + nc], act, alo, ahi)


@njit(cache=True)
def pack_columns(b):
    """(K, N) ``b`` (any strides) -> (ceil(N / 16), K, 16) float32, the layout of
    :func:`pack_weight`: ``packed[blk, k, j] = b[k, 16 blk + j]``, zero past N."""
    kk, n = b.shape
    nb = (n + LANES - 1) // LANES
    packed = np.zeros((nb, kk, LANES), np.float32)
    for blk in range(nb):
        for k in range(kk):
            for j in range(min(LANES, n - blk * LANES)):
                packed[blk, k, j] = b[k, blk * LANES + j]
    return packed


@njit(cache=True)
def pack_rows(bt):
    """:func:`pack_columns` of ``bt.T``, reading ``bt`` (N, K) row by row: a (N, K) matrix
    (a linear layer's weight, attention's keys) as the right operand."""
    n, kk = bt.shape
    nb = (n + LANES - 1) // LANES
    packed = np.zeros((nb, kk, LANES), np.float32)
    for i in range(n):
        blk, j = i // LANES, i % LANES
        for k in range(kk):
            packed[blk, k, j] = bt[i, k]
    return packed


def gemm(a, b, c):
    """``c[:] = a @ b`` on 2-D arrays; in numba code, the kernels' GEMM (_gemm_overload)."""
    c[:] = a @ b


def gemm_t(a, bt, c):
    """``c[:] = a @ bt.T`` on 2-D arrays; in numba code, the kernels' GEMM (_gemm_overload)."""
    c[:] = a @ bt.T


@njit(cache=True)
def _gemm_f32(a, packed, c):
    bias = np.zeros(packed.shape[0] * LANES, np.float32)
    gemm_packed(
        np.ascontiguousarray(a),
        packed,
        bias,
        np.empty((0, 0), np.float32),
        c,
        NONE,
        0.0,
        0.0,
        0,
        a.shape[0],
        0,
        packed.shape[0],
    )


@njit(cache=True)
def _gemm_loops(a, b, c, transposed):
    """``c = a @ b`` (or ``a @ b.T``) by loops, for dtypes other than float32: the inner loop
    runs along a row of ``c`` (or a row of both operands), so it vectorises."""
    m, kk = a.shape
    n = c.shape[1]
    for i in range(m):
        row = c[i]
        if transposed:
            for j in range(n):
                acc = 0.0
                for k in range(kk):
                    acc += a[i, k] * b[j, k]
                row[j] = acc
        else:
            row[:] = 0.0
            for k in range(kk):
                aik = a[i, k]
                for j in range(n):
                    row[j] += aik * b[k, j]


@overload(gemm, jit_options={"cache": True})
def _gemm_overload(a, b, c):
    """float32 on the micro-kernel (B packed per call), else loops: numba's ``np.dot`` calls
    SciPy's BLAS, which a saved package must not need (numpy and numba only; without SciPy a
    cached np.dot crashed the process)."""
    if a.dtype == b.dtype == c.dtype == types.float32:
        return lambda a, b, c: _gemm_f32(a, pack_columns(b), c)
    return lambda a, b, c: _gemm_loops(a, b, c, False)


@overload(gemm_t, jit_options={"cache": True})
def _gemm_t_overload(a, bt, c):
    if a.dtype == bt.dtype == c.dtype == types.float32:
        return lambda a, bt, c: _gemm_f32(a, pack_rows(bt), c)
    return lambda a, bt, c: _gemm_loops(a, bt, c, True)
