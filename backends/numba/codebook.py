"""Numba emitter of the shared-weight op (``codebook_lookup``, compiler/ops/codebook.py): decode
the packed indices through the codebook with ``K.codebook_decode``, once at load or on every
call."""

from __future__ import annotations

from backends.numba.backend import Codegen, emitter, fmt
from compiler.errors import BackendError
from compiler.ir.graph import Node

#: How a ``codebook_lookup`` of constants runs: "load" decodes the weight once, on the first call,
#: into the weights dict (the package on disk keeps only codebook and packed indices; resident
#: memory holds the dense weight); "call" decodes it on every call into an arena buffer (resident
#: memory holds only the packed form, each call pays the decode). benchmarks/share_cifar.py measures
#: both; "load" is faster. A lookup whose codebook or indices are not constants always decodes
#: per call.
CODEBOOK_DECODE = "load"


@emitter("codebook_lookup")
def _codebook_lookup(gen: Codegen, node: Node) -> None:
    codebook, indices = node.inputs
    y = node.outputs[0]
    if all(v.is_constant for v in node.inputs) and y.uses and all(
        reader.op == "dequantize_linear" and index == 0 and all(
            v.is_constant for v in reader.inputs[1:])
        for reader, index in y.uses
    ) and not any(v is y for v in gen.graph.outputs):
        return  # an int8 shared weight: its dequantize reads it decoded at compile time
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
