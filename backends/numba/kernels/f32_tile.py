"""The micro-kernel of the numba backend's float32 conv2d, built as LLVM IR: ``rows`` output
pixels x 16 output channels per call. Saved packages get a copy as ``kernels_f32_tile.py``;
the layers that call it (padding, bands, tasks, threads) are in ``backends/numba/kernels/f32.py``.

:func:`_conv_tile` builds the IR of the inner loop, like the int8 ``_dot_rows``: accumulators
for ``rows`` output pixels x 16 output channels, one ``<16 x float>`` per pixel (that many
independent FMA chains). Each reduction step k loads one 64-byte vector of packed weights (16
output channels of input index k) and broadcasts pixel r's input ``xp[base_r + offs[k]]``.
The epilogue runs in registers: bias, a transpose into 16 channel rows of ``rows`` pixels,
residual, relu/clip, and stores straight into the NCHW output.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .common import HAS_AVX512, LANES, reduction_loop

# Output pixels per micro-kernel call (independent FMA chains; 4 cycles of FMA latency need >= 4),
# two sizes: a plane uses the one that wastes fewer lanes in its last tile. With AVX-512 (32 zmm
# registers) 8 was as fast as 4 or 6 on 3x3 layers and 1.1-1.3x faster on 1x1 ones, where the
# epilogue weighs more, and 7 divides 7x7 and 14x14 planes (7x7: 2.31 ms against 2.67 for 8 on
# 512->512). Without it a <16 x float> is two of AVX2's 16 ymm registers: 8 pixels would need 16
# accumulators plus the weights and a broadcast, and spilled (ResNet-18 ran at half ORT's speed).
# 6 pixels keep 12 accumulators, 2 weight halves and the broadcast in registers.
TILE_ROWS = (8, 7) if HAS_AVX512 else (6, 5)
# a tile's modes when a layer's K runs in passes (K blocking, numba_kernels_f32._conv_tasks):
# start from the raw sums kept in scratch, or keep them there and skip the epilogue
ACC_LOAD, ACC_STORE = 1, 2


def _transpose_masks(rows: int) -> tuple[list, list]:
    """Shuffle stages that turn ``p`` vectors (``rows`` rounded up to a power of two) holding
    ``acc[r][j]`` (pixel r, channel j) into vectors holding whole channels, ``p`` pixels each:
    each stage swaps one bit of the vector index with one bit of the lane index, one 2-source
    shuffle (one ``vpermt2ps``) per output vector. Returns the stages, each a list of
    (lo, hi, mask) per output vector, and the label (r, j) of every lane at the end; the last stage
    also sorts every vector's lanes by (channel, pixel)."""
    p = 1
    while p < rows:
        p *= 2
    bits = p.bit_length() - 1
    labels = [[(r, j) for j in range(LANES)] for r in range(p)]
    stages = []
    for s in range(bits):
        vb, lb = 1 << s, 1 << (4 - bits + s)
        new_labels, stage = [None] * p, [None] * p
        for v in range(p):
            lo, hi = v & ~vb, v | vb
            mask = []
            for lane in range(LANES):
                # element (v, lane) after the swap comes from vector (bit vb = lane bit lb) at lane
                # with bit lb = v's bit vb
                src = hi if lane & lb else lo
                src_lane = (lane | lb) if v & vb else (lane & ~lb)
                mask.append((LANES if src == hi else 0) + src_lane)
            stage[v] = (lo, hi, mask)
            new_labels[v] = [labels[hi if m >= LANES else lo][m % LANES] for m in mask]
        labels = new_labels
        stages.append(stage)
    for v in range(p):  # the last stage also sorts each vector's lanes by (channel, pixel)
        order = sorted(range(LANES), key=lambda lane: (labels[v][lane][1], labels[v][lane][0]))
        lo, hi, mask = stages[-1][v]
        stages[-1][v] = (lo, hi, [mask[i] for i in order])
        labels[v] = [labels[v][i] for i in order]
    return stages, labels


def _tile_epilogue(rows, builder, accs, outb, ldo, resb, ldr, has_res, bv, lo, hi, nc):
    """IR of a tile's epilogue (:func:`_conv_tile`): bias, the transpose of the ``rows``
    accumulators into 16 channel rows of ``rows`` pixels, residual, clamp, store."""
    stages, labels = _transpose_masks(rows)
    p = len(stages[0])
    per_vec = LANES // p  # channels per vector after the transpose
    f32, i32, idx = ir.FloatType(), ir.IntType(32), ldo.type
    v16, vr = ir.VectorType(f32, LANES), ir.VectorType(f32, rows)
    undef = ir.Constant(v16, ir.Undefined)
    vecs = [builder.fadd(acc, bv) for acc in accs]
    vecs += [ir.Constant(v16, [0.0] * LANES)] * (p - rows)
    for stage in stages:
        vecs = [
            builder.shuffle_vector(vecs[a], vecs[b], ir.Constant(ir.VectorType(i32, LANES), mask))
            for a, b, mask in stage
        ]

    def splat(value):
        return builder.shuffle_vector(
            builder.insert_element(ir.Constant(vr, ir.Undefined), value, i32(0)),
            ir.Constant(vr, ir.Undefined),
            ir.Constant(ir.VectorType(i32, rows), [0] * rows),
        )

    lov, hiv = splat(lo), splat(hi)
    use_res = builder.icmp_signed("!=", has_res, idx(0))
    for j in range(LANES):
        v, slot = j // per_vec, j % per_vec
        first = slot * (LANES // per_vec)
        assert labels[v][first] == (0, j)
        row = builder.shuffle_vector(
            vecs[v], undef, ir.Constant(ir.VectorType(i32, rows), list(range(first, first + rows)))
        )
        with builder.if_then(builder.icmp_signed("<", idx(j), nc), likely=True):
            before = builder.block
            with builder.if_then(use_res):
                rp = builder.gep(resb, [builder.mul(ldr, idx(j))])
                summed = builder.fadd(
                    row, builder.load(builder.bitcast(rp, vr.as_pointer()), align=4)
                )
                added = builder.block
            merged = builder.phi(vr)
            merged.add_incoming(row, before)
            merged.add_incoming(summed, added)
            row = merged
            # clamp as compare + select, which keeps NaN like the reference and is one
            # vmaxps/vminps (llvm.maxnum adds a NaN fix-up: 3 instructions each)
            row = builder.select(builder.fcmp_ordered("<", row, lov), lov, row)
            row = builder.select(builder.fcmp_ordered(">", row, hiv), hiv, row)
            op = builder.gep(outb, [builder.mul(ldo, idx(j))])
            builder.store(row, builder.bitcast(op, vr.as_pointer()), align=4)


def _conv_tile(rows: int):
    """The micro-kernel of ``rows`` output pixels x 16 output channels (see the module docstring):

    ``out[oi + j * ldo + r] = clamp(sum_k w[wi + 16 k + j] * xp[xi + bases[bi + r] + offs[ko + k]]
    + bias[ci + j] (+ res[ri + j * ldr + r] if has_res), lo, hi)`` for r < rows, j < nc, k < n.

    A layer whose K is split into passes (K blocking, :func:`_conv_tasks`) keeps the raw sums
    of a tile between passes in ``acc[ai:ai + 16 * rows]`` (pixel-major, 16 channels each):
    ``mode & ACC_LOAD`` starts from them instead of zero, ``mode & ACC_STORE`` stores them there
    and skips the epilogue.
    """

    @intrinsic
    def tile(
        typingctx,
        out,
        oi,
        ldo,
        res,
        ri,
        ldr,
        has_res,
        xp,
        xi,
        bases,
        bi,
        offs,
        ko,
        n,
        w,
        wi,
        bias,
        ci,
        lo,
        hi,
        nc,
        acc,
        ai,
        mode,
    ):
        i, f = types.intp, types.float32
        sig = types.void(
            out, i, i, res, i, i, i, xp, i, bases, i, offs, i, i, w, i, bias, i, f, f, i, acc, i, i
        )

        def codegen(context, builder, signature, args):
            (
                out,
                oi,
                ldo,
                res,
                ri,
                ldr,
                has_res,
                xp,
                xi,
                bases,
                bi,
                offs,
                ko,
                n,
                w,
                wi,
                bias,
                ci,
                lo,
                hi,
                nc,
                acc,
                ai,
                mode,
            ) = args
            aty = signature.args

            def data(k, value):
                return context.make_array(aty[k])(context, builder, value).data

            outp, resp, xpp, basep, offp, wp, biasp, accp = (
                data(k, v)
                for k, v in (
                    (0, out),
                    (3, res),
                    (7, xp),
                    (9, bases),
                    (11, offs),
                    (14, w),
                    (16, bias),
                    (21, acc),
                )
            )
            v16 = ir.VectorType(ir.FloatType(), LANES)
            idx = n.type
            fma = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(v16, [v16, v16, v16]), "llvm.fma.v16f32"
            )
            xbase = builder.gep(xpp, [xi])
            rowp = [
                builder.gep(xbase, [builder.load(builder.gep(basep, [builder.add(bi, idx(r))]))])
                for r in range(rows)
            ]
            wbase = builder.gep(wp, [wi])
            offb = builder.gep(offp, [ko])
            zero = ir.Constant(v16, [0.0] * LANES)
            undef = ir.Constant(v16, ir.Undefined)
            accb = builder.gep(accp, [ai])
            saved = [
                builder.bitcast(builder.gep(accb, [idx(r * LANES)]), v16.as_pointer())
                for r in range(rows)
            ]

            def mode_has(bit):
                return builder.icmp_signed("!=", builder.and_(mode, idx(bit)), idx(0))

            def step(k, accs):
                off = builder.load(builder.gep(offb, [k]))
                wv = builder.load(
                    builder.bitcast(
                        builder.gep(wbase, [builder.mul(k, idx(LANES))]), v16.as_pointer()
                    ),
                    align=4,
                )
                new = []
                for acc, row in zip(accs, rowp, strict=True):
                    xv = builder.insert_element(
                        undef, builder.load(builder.gep(row, [off])), ir.IntType(32)(0)
                    )
                    xv = builder.shuffle_vector(
                        xv, undef, ir.Constant(ir.VectorType(ir.IntType(32), LANES), [0] * LANES)
                    )
                    new.append(builder.call(fma, [wv, xv, acc]))
                return new

            start = builder.block
            with builder.if_then(mode_has(ACC_LOAD)):
                loaded = [builder.load(a, align=4) for a in saved]
                resumed = builder.block
            inits = []
            for value in loaded:
                inits.append(builder.phi(v16))
                inits[-1].add_incoming(zero, start)
                inits[-1].add_incoming(value, resumed)
            accs = reduction_loop(builder, n, inits, step)
            with builder.if_else(mode_has(ACC_STORE)) as (partial, final):
                with partial:
                    for value, a in zip(accs, saved, strict=True):
                        builder.store(value, a, align=4)
                with final:
                    bv = builder.load(
                        builder.bitcast(builder.gep(biasp, [ci]), v16.as_pointer()), align=4
                    )
                    _tile_epilogue(
                        rows,
                        builder,
                        accs,
                        builder.gep(outp, [oi]),
                        ldo,
                        builder.gep(resp, [ri]),
                        ldr,
                        has_res,
                        bv,
                        lo,
                        hi,
                        nc,
                    )
            return context.get_dummy_value()

        return sig, codegen

    return tile
