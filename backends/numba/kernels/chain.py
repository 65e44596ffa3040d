"""Runs of consecutive float32 convs in one parallel region: the persistent team of the numba
backend. Saved packages get a copy as ``kernels_chain.py``.

A model of many small layers (the CIFAR ResNet-56: 55 3x3 convs of ~35 us each at 2 threads)
pays per layer for entering a parallel region (~3.5 us with OpenMP) and for numba's dispatch
of the call. :func:`conv_chain` enters one region for a whole run of layers: each thread walks
the layers in order, runs its share of a layer, and waits for the layer to be complete before
the next reads it (a layer reads its input's halo rows, which another thread wrote).

The shares are tasks claimed with atomic exchanges, never fixed to a thread: thread ``ch`` first
claims task ``ch`` of a layer (the band of rows it wrote in the previous layer, so its reads
stay in its own cache), then any task still unclaimed. So the run cannot deadlock when the
threading layer gives the region fewer threads than chunks (one thread then runs the others'
claims); it only waits for tasks that a running thread holds.

The layers' arrays are passed as addresses in a table (:func:`chain_table`), with their shapes,
so that one compiled signature serves every run, whatever its length: a tuple of arrays would
compile once per length, and a numba typed list compiles its methods when the model loads.
:func:`chain_table` keeps the arrays alive beside the table.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import carray, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .common import CLIP, RELU
from .depthwise import _depthwise_tasks
from .f32 import (
    _conv_band,
    _conv_tasks,
    _pad_band,
    band,
    best_rows,
    by_bands,
    task_geometry,
)
from .pointwise import POINTWISE, PW_MIN_PIXELS, PW_TILE, _pointwise_tasks

# a layer's columns in the table of addresses
X, XP, PACKED, BIAS, BASES, OFFS, RES, OUT = range(8)
# a layer's columns in the table of integers
(
    N,
    C,
    H,
    W,
    O,
    OH,
    OW,
    KH,
    KW,
    SH,
    SW,
    PH,
    PW,
    DH,
    DW,
    GROUPS,
    ACT,
    HAS_RES,
    NBLK,
    KK,
    KIND,
    NBIAS,
) = range(22)
NPROG = 22
# layer kinds: a conv2d_planned (packed weights) or a conv2d_depthwise (OIHW taps)
CONV, DEPTHWISE = 0, 1
KINDS = {"conv": CONV, "depthwise": DEPTHWISE}
# how a layer's conv phase is split into tasks: bands of output rows, channel blocks (of one
# shared padded input), pixel tiles of a 1x1 conv, input planes of a depthwise conv
BANDS, BLOCKS, PIXELS, PLANES = range(4)
# per layer and phase: a claim flag for each of up to MAX_TASKS tasks, then the count of the
# tasks done
MAX_TASKS = 64
PHASES = 2  # a layer split by channel blocks pads its input first (phase 0), then convolves


@intrinsic
def _f32_at(typingctx, addr):
    """float32 pointer at integer address ``addr``."""
    sig = types.CPointer(types.float32)(types.intp)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], ir.PointerType(ir.FloatType()))

    return sig, codegen


@intrinsic
def _intp_at(typingctx, addr):
    """intp pointer at integer address ``addr``."""
    sig = types.CPointer(types.intp)(types.intp)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], ir.PointerType(ir.IntType(64)))

    return sig, codegen


def _slot(context, builder, signature, args):
    """IR pointer to element ``i`` of the array ``args = (array, i)``."""
    array, i = args
    data = context.make_array(signature.args[0])(context, builder, array).data
    return builder.gep(data, [i])


def _atomic_rmw(op: str):
    """An intrinsic ``(a, i, value) -> old`` doing LLVM's ``atomicrmw op`` on ``a[i]`` (an int64
    array), acquire-release."""

    @intrinsic
    def rmw(typingctx, array, i, value):
        sig = types.int64(array, types.intp, types.int64)

        def codegen(context, builder, signature, args):
            return builder.atomic_rmw(
                op, _slot(context, builder, signature, args[:2]), args[2], "acq_rel"
            )

        return sig, codegen

    return rmw


_exchange = _atomic_rmw("xchg")  # old = a[i]; a[i] = value
_fetch_add = _atomic_rmw("add")  # old = a[i]; a[i] += value


@intrinsic
def _wait_for(typingctx, counts, i, value):
    """Spin (with ``pause``) until ``counts[i] >= value``, reading it with acquire order: what
    the threads that counted wrote before is then visible."""
    sig = types.void(counts, types.intp, types.int64)

    def codegen(context, builder, signature, args):
        ptr = _slot(context, builder, signature, args[:2])
        pause = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), []), "llvm.x86.sse2.pause"
        )
        head = builder.append_basic_block("wait.head")
        spin = builder.append_basic_block("wait.spin")
        done = builder.append_basic_block("wait.done")
        builder.branch(head)
        builder.position_at_end(head)
        now = builder.load_atomic(ptr, "acquire", 8)
        builder.cbranch(builder.icmp_signed(">=", now, args[2]), done, spin)
        builder.position_at_end(spin)
        builder.call(pause, [])
        builder.branch(head)
        builder.position_at_end(done)
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True)
def _f32(addr, shape):
    return carray(_f32_at(addr), shape)


@njit(cache=True)
def _layer_tasks(p, chunks):
    """(split, tasks of the conv phase) of layer row ``p``, as its kernel would split it on
    ``chunks`` threads: a depthwise conv by input planes; a 1x1 conv that
    :func:`~backends.numba.kernels.f32.conv2d_planned` gives the pixel-vector kernel by pixel
    tiles; other convs by bands of output rows where conv2d_planned would split them so, else by
    channel blocks of one shared padded input (then a pad phase of one task comes first)."""
    npix = p[OH] * p[OW]
    if p[KIND] == DEPTHWISE:
        return PLANES, min(chunks, p[N] * p[C])
    pointwise = (
        p[KH] == 1
        and p[KW] == 1
        and p[PH] == 0
        and p[PW] == 0
        and p[GROUPS] == 1
        and p[SH] == 1
        and p[SW] == 1
    )
    if POINTWISE and pointwise and npix >= PW_MIN_PIXELS:
        return PIXELS, min(chunks, (npix + PW_TILE - 1) // PW_TILE)
    rows = best_rows(npix)
    tiles = (npix + rows - 1) // rows
    hp, wp = p[H] + 2 * p[PH], p[W] + 2 * p[PW]
    if by_bands(tiles, chunks, p[NBLK] * p[KK] * 16, p[N] * p[C] * hp * wp):
        return BANDS, min(chunks, tiles)
    return BLOCKS, chunks


@njit(cache=True)
def _run_task(addr, p, lo, hi, alo, ahi, phase, t, ntasks, split):
    """Task ``t`` of ``ntasks`` of one phase of a layer (its rows of the tables)."""
    n, c, h, w, o, oh, ow = p[N], p[C], p[H], p[W], p[O], p[OH], p[OW]
    hp, wp = h + 2 * p[PH], w + 2 * p[PW]
    npix = oh * ow
    nres = n if p[HAS_RES] else 0
    x = _f32(addr[X], (n, c, h, w))
    if split == PLANES:
        planes = n * c
        _depthwise_tasks(
            x.reshape(-1),
            _f32(addr[PACKED], (o * p[KH] * p[KW],)),
            _f32(addr[BIAS], (p[NBIAS],)),
            _f32(addr[RES], (nres * o * npix,)),
            _f32(addr[OUT], (n * o * npix,)),
            (c, o, h, w, oh, ow, p[KH], p[KW], p[SH], p[SW], p[PH], p[PW], p[DH], p[DW]),
            p[ACT],
            alo,
            ahi,
            t * planes // ntasks,
            (t + 1) * planes // ntasks,
        )
        return
    if phase == 0:  # the shared padded input of a layer split by channel blocks
        _pad_band(x, p[PH], p[PW], 0, hp, _f32(addr[XP], (n * c * hp * wp,)))
        return
    packed = _f32(addr[PACKED], (p[NBLK], p[KK], 16))
    bias = _f32(addr[BIAS], (p[NBLK] * 16,))
    res = _f32(addr[RES], (nres, o, oh, ow))
    out = _f32(addr[OUT], (n, o, oh, ow))
    if split == PIXELS:
        tiles = (npix + PW_TILE - 1) // PW_TILE
        q0 = t * tiles // ntasks * PW_TILE
        q1 = min(npix, (t + 1) * tiles // ntasks * PW_TILE)
        if q1 > q0:
            _pointwise_tasks(
                x.reshape(n, c, npix),
                packed,
                bias,
                res.reshape(nres, o, npix),
                out.reshape(n, o, npix),
                lo,
                hi,
                p[ACT],
                alo,
                ahi,
                q0,
                q1,
            )
        return
    rows = best_rows(npix)
    if split == BANDS:
        q0, q1 = band(t, ntasks, npix, rows)
        _conv_band(
            x,
            packed,
            bias,
            res,
            out,
            p[KH],
            p[KW],
            p[SH],
            p[SW],
            p[PH],
            p[PW],
            p[DH],
            p[DW],
            p[GROUPS],
            lo,
            hi,
            p[ACT],
            alo,
            ahi,
            rows,
            q0,
            q1,
        )
        return
    src = _f32(addr[XP], (n * c * hp * wp,)) if p[PH] > 0 or p[PW] > 0 else x.reshape(-1)
    bases = carray(_intp_at(addr[BASES]), (npix + 8,))
    offs = carray(_intp_at(addr[OFFS]), (p[KK],))
    geom, total = task_geometry(
        n, p[GROUPS], p[NBLK] // p[GROUPS], c // p[GROUPS], hp * wp, npix, rows, ntasks
    )
    _conv_tasks(
        src,
        bases,
        offs,
        packed,
        bias,
        res.reshape(nres, o, npix),
        out.reshape(n, o, npix),
        geom,
        lo,
        hi,
        p[ACT],
        alo,
        ahi,
        t * total // ntasks,
        (t + 1) * total // ntasks,
        0,
        npix,
    )


@njit(cache=True)
def _walk(addr, prog, fprog, sync, ch, chunks):
    """The layers as thread ``ch`` of ``chunks`` sees them: claim tasks (its own first), run
    them, count them done, wait for the phase to be complete."""
    for layer in range(prog.shape[0]):
        p, a = prog[layer], addr[layer]
        act, alo, ahi = p[ACT], fprog[layer, 0], fprog[layer, 1]
        lo = np.float32(alo if act == CLIP else 0.0 if act == RELU else -np.inf)
        hi = np.float32(ahi if act == CLIP else np.inf)
        split, ntasks = _layer_tasks(p, chunks)
        padded = p[PH] > 0 or p[PW] > 0
        for phase in range(0 if padded and split == BLOCKS else 1, PHASES):
            n = 1 if phase == 0 else ntasks
            base = (layer * PHASES + phase) * (MAX_TASKS + 1)
            for j in range(n):
                t = (ch + j) % n
                if _exchange(sync, base + t, 1) == 0:
                    _run_task(a, p, lo, hi, alo, ahi, phase, t, n, split)
                    _fetch_add(sync, base + MAX_TASKS, 1)
            if chunks > 1:
                _wait_for(sync, base + MAX_TASKS, n)


@njit(parallel=True, cache=True)
def _walk_parallel(addr, prog, fprog, sync, chunks):
    for ch in prange(chunks):
        _walk(addr, prog, fprog, sync, ch, chunks)


@njit(cache=True)
def conv_chain(addr, prog, fprog, sync, nthreads):
    """Run the layers of a table from :func:`chain_table` in order, as their kernels would one
    call at a time, on ``nthreads`` threads in one parallel region."""
    chunks = max(1, min(nthreads, MAX_TASKS))
    sync[:] = 0
    if chunks == 1:
        _walk(addr, prog, fprog, sync, 0, 1)
    else:
        _walk_parallel(addr, prog, fprog, sync, chunks)


def chain_table(layers) -> tuple:
    """The arguments of :func:`conv_chain` but ``nthreads`` for ``layers``: each a kernel's
    name and its arguments without ``nthreads``, ``("conv", *args)`` of
    :func:`~backends.numba.kernels.f32.conv2d_planned` or ``("depthwise", *args)`` of
    :func:`~backends.numba.kernels.depthwise.conv2d_depthwise` (float32). The arrays'
    addresses go in the table; the tuple keeps the arrays alive."""
    addr = np.zeros((len(layers), 8), np.intp)
    prog = np.zeros((len(layers), NPROG), np.intp)
    fprog = np.zeros((len(layers), 2), np.float32)
    keep = []
    empty = np.empty(0, np.intp)
    for i, (kind, *args) in enumerate(layers):
        if kind == "depthwise":
            x, packed, bias, res, out, sh, sw, ph, pw, dh, dw, act, alo, ahi = args
            xp, bases, offs = np.empty(0, np.float32), empty, empty
            _, _, kh, kw = packed.shape
            groups, nblk, kk = x.shape[1], 0, 0
        else:
            (
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
            ) = args
            nblk, kk = packed.shape[0], offs.shape[0]
        arrays = [
            np.require(a, requirements="C") for a in (x, xp, packed, bias, bases, offs, res, out)
        ]
        for a, b in zip(arrays, (x, xp, packed, bias, bases, offs, res, out), strict=True):
            if a.size and not np.shares_memory(a, b):
                raise ValueError("a chained conv's arrays must be C-contiguous")
        if any(a.dtype != np.float32 for a in arrays[:4] + arrays[6:]):
            raise ValueError("a chained conv must be float32")
        keep.extend(arrays)
        addr[i] = [a.ctypes.data for a in arrays]
        n, c, h, w = x.shape
        _, o, oh, ow = out.shape
        prog[i] = (
            n,
            c,
            h,
            w,
            o,
            oh,
            ow,
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
            1 if res.size else 0,
            nblk,
            kk,
            KINDS[kind],
            bias.size,
        )
        fprog[i] = alo, ahi
    sync = np.zeros(len(layers) * PHASES * (MAX_TASKS + 1), np.int64)
    return addr, prog, fprog, sync, keep


def run_chain(table, nthreads) -> None:
    """Run a table of :func:`chain_table` on ``nthreads`` threads (what the generated code
    calls)."""
    addr, prog, fprog, sync, _ = table
    conv_chain(addr, prog, fprog, sync, nthreads)
