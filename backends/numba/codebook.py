"""Numba emitters of shared weights: ``codebook_lookup``, and the conv2d that packs one at load.

A ``codebook_lookup`` (compiler/ops/codebook.py) decodes the packed indices through the codebook
with ``K.codebook_decode``, once at load or on every call (:data:`CODEBOOK_DECODE`).
"""

from __future__ import annotations

from backends.numba.core import Codegen, emitter, fmt
from backends.numba.emitters import emit_conv2d, is_depthwise
from compiler.errors import BackendError
from compiler.ir.graph import Node

#: How a ``codebook_lookup`` of constants runs: "load" decodes the weight once, on the first call,
#: into the weights dict (the package on disk keeps only codebook and packed indices; resident
#: memory holds the dense weight); "call" decodes it on every call into an arena buffer (resident
#: memory holds only the packed form, each call pays the decode). benchmarks/share_cifar.py measures
#: both; "load" is faster. A lookup whose codebook or indices are not constants always decodes
#: per call.
CODEBOOK_DECODE = "load"


def decoded_by_dequantize(node: Node) -> bool:
    """An int8 shared weight (quantize after share-weights): a lookup of constants that only
    dequantizes of constant parameters read, which read it decoded at compile time
    (backends/numba/quant.py, static_array)."""
    y = node.outputs[0]
    return bool(
        all(v.is_constant for v in node.inputs)
        and y.uses
        and all(
            reader.op == "dequantize_linear"
            and index == 0
            and all(v.is_constant for v in reader.inputs[1:])
            for reader, index in y.uses
        )
        and not any(v is y for v in node.graph.outputs)
    )


@emitter("codebook_lookup", when=decoded_by_dequantize, priority=1)
def _decoded_at_compile_time(gen: Codegen, node: Node) -> None:
    """Nothing: the dequantize reading it folds the decoded weight into a constant."""


@emitter("codebook_lookup")
def _codebook_lookup(gen: Codegen, node: Node) -> None:
    codebook, indices = node.inputs
    y = node.outputs[0]
    args = (gen.arg(codebook), gen.arg(indices), int(node.attrs["bits"]))
    if CODEBOOK_DECODE == "call" or not (codebook.is_constant and indices.is_constant):
        gen.call("K.codebook_decode", *args, gen.out(y, (y.numel,)))
        return
    if CODEBOOK_DECODE != "load":
        raise BackendError(
            f"CODEBOOK_DECODE is {CODEBOOK_DECODE!r}",
            hint="set backends.numba.codebook.CODEBOOK_DECODE to 'load' or 'call'",
        )
    key = f'w["_decoded.{y.name}"]'  # filled at run time, never saved: weights.npz stays packed
    gen.emit(
        f'if "_decoded.{y.name}" not in w: {key} = np.empty({y.shape}, np.{y.dtype}); '
        f"K.codebook_decode({', '.join(fmt(a) for a in args)}, {key}.reshape(-1))"
    )
    gen.exprs[id(y)] = key


def shared_f32_conv(node: Node) -> bool:
    """A float32 conv (depthwise excepted) whose weight is a codebook_lookup of constants decoded
    once at load: it takes the micro-kernel too, with the weight packed at load."""
    x, w, y = node.inputs[0], node.inputs[1], node.outputs[0]
    p = w.producer
    return (
        p is not None
        and p.op == "codebook_lookup"
        and all(v.is_constant for v in p.inputs)
        and CODEBOOK_DECODE == "load"
        and x.dtype == w.dtype == y.dtype == "float32"
        and not is_depthwise(node)
    )


# below the integer conv (quant.py, priority 2), whose weight is a dequantize, never a lookup
@emitter("conv2d", when=shared_f32_conv, priority=1)
def _conv2d_shared(gen: Codegen, node: Node) -> None:
    # packed once, on the first call (compile-time packing would store the dense weight in
    # weights.npz); a decoded weight only this conv reads is then dropped, so resident memory
    # holds the packed copy alone (its codebook_lookup skips a decoded entry that is present,
    # even as None)
    w = node.inputs[1]
    packed = f'w["_packed.{w.name}"]'
    decoded = gen.arg(w)
    only_reader = len(w.uses) == 1 and not any(v is w for v in gen.graph.outputs)
    drop = f"; {decoded} = None" if only_reader and decoded.startswith('w["_decoded.') else ""
    gen.emit(
        f'if "_packed.{w.name}" not in w: '
        f"{packed} = KC.pack_weight({decoded}, {node.attrs['groups']}){drop}"
    )
    emit_conv2d(gen, node, packed)
