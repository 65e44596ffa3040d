"""Channel-coupling rules of the built-in ops, one table keyed by op name (``RULES``); see
passes/pruning/coupling.py for the vocabulary. Each rule says which axes shrink together when
channels are pruned. An op registered with ``register_op(..., coupling=rule)`` brings its own."""

from __future__ import annotations

from collections.abc import Callable

from compiler.ir.graph import Node
from compiler.ops.elementwise import ACTIVATIONS
from passes.pruning.coupling import Couplings

Rule = Callable[[Node, Couplings], None]
RULES: dict[str, Rule] = {}


def coupling(*ops: str) -> Callable[[Rule], Rule]:
    """Decorator: ``rule`` is the coupling rule of each op in ``ops``."""

    def wrap(rule: Rule) -> Rule:
        for op in ops:
            RULES[op] = rule
        return rule

    return wrap


@coupling(*ACTIVATIONS, "identity", "dropout", "cast", "neg", "exp", "sqrt", "rsqrt", "abs", "log")
def unary(node: Node, c: Couplings) -> None:
    c.same_all(node.inputs[0], node.outputs[0])


@coupling("add", "sub", "mul", "div", "pow", "maximum", "minimum", "eq", "ne", "lt", "gt", "where")
def broadcasting(node: Node, c: Couplings) -> None:
    for operand in node.inputs:
        c.broadcast(node.outputs[0], operand)


def _epilogue(node: Node, c: Couplings, channel_axis: int) -> None:
    """Bias, residual and activation of conv2d/linear follow the output channels."""
    x, w = node.inputs[0], node.inputs[1]
    out = node.outputs[0]
    c.same(c.slot(out, channel_axis), c.slot(w, 0))
    if len(node.inputs) > 2:
        c.same(c.slot(node.inputs[2], 0), c.slot(w, 0))
    if len(node.inputs) > 3 and node.inputs[3] is not None:
        c.same_all(node.inputs[3], out)
    del x


@coupling("conv2d")
def conv2d(node: Node, c: Couplings) -> None:
    """Groups: input channels factor as (groups, cin/groups), outputs as (groups, cout/groups);
    removing a whole group is legal (groups shrinks), and so is removing the same in-group position
    from every group. Depthwise convs (cin/groups == 1) thus tie input to output channels."""
    x, w = node.inputs[0], node.inputs[1]
    out = node.outputs[0]
    groups = node.attrs["groups"]
    c.same(c.slot(x, 0), c.slot(out, 0))
    _epilogue(node, c, 1)
    if groups == 1:
        c.same(c.slot(x, 1), c.slot(w, 1))
        return
    g_in, per_in = c.virtual("groups_in", groups), c.virtual("per_group_in", w.shape[1])
    g_out = c.virtual("groups_out", groups)
    per_out = c.virtual("per_group_out", w.shape[0] // groups)
    c.regroup([c.slot(x, 1)], [g_in, per_in])
    c.regroup([c.slot(out, 1)], [g_out, per_out])
    c.same(g_in, g_out)
    c.same(per_in, c.slot(w, 1))


@coupling("linear")
def linear(node: Node, c: Couplings) -> None:
    x, w = node.inputs[0], node.inputs[1]
    out = node.outputs[0]
    c.same(c.slot(x, -1), c.slot(w, 1))
    c.same_all(x, out, skip=(len(x.shape) - 1,))
    _epilogue(node, c, -1)


@coupling("matmul")
def matmul(node: Node, c: Couplings) -> None:
    a, b = node.inputs
    out = node.outputs[0]
    c.same(c.slot(a, -1), c.slot(b, -2))
    c.same(c.slot(a, -2), c.slot(out, -2))
    c.same(c.slot(b, -1), c.slot(out, -1))
    _batch_dims(c, out, [a, b], 2)


def _batch_dims(c: Couplings, out, operands, trailing: int) -> None:
    """Relate leading (batch) axes of operands to the output's, aligned from the right."""
    for operand in operands:
        if operand is None:
            continue
        shift = len(out.shape) - len(operand.shape)
        for axis in range(len(operand.shape) - trailing):
            if operand.shape[axis] == out.shape[axis + shift] != 1:
                c.same(c.slot(operand, axis), c.slot(out, axis + shift))


@coupling("attention")
def attention(node: Node, c: Couplings) -> None:
    """q.k contracts the key dim (q, k last axes tie); v's last axis is the output's; heads and
    batch axes tie everything. Pruning heads or head dims keeps the softmax scale (pinned by the
    rewrite)."""
    q, k, v = node.inputs[:3]
    mask = node.inputs[3] if len(node.inputs) > 3 else None
    out = node.outputs[0]
    c.same(c.slot(q, -1), c.slot(k, -1))
    c.same(c.slot(v, -1), c.slot(out, -1))
    c.same(c.slot(q, -2), c.slot(out, -2))
    c.same(c.slot(k, -2), c.slot(v, -2))
    _batch_dims(c, out, [q, k, v], 2)
    if mask is not None:
        c.block_value(mask)
        c.block(c.slot(k, -2))


@coupling("einsum")
def einsum(node: Node, c: Couplings) -> None:
    """Axes named by the same letter are the same index space."""
    lhs, rhs = node.attrs["equation"].split("->")
    named = list(zip(lhs.split(","), node.inputs)) + [(rhs, node.outputs[0])]
    first: dict[str, object] = {}
    for term, value in named:
        for axis, letter in enumerate(term):
            slot = c.slot(value, axis)
            if slot.size == 1:
                continue
            if letter in first:
                c.same(first[letter], slot)
            else:
                first[letter] = slot


@coupling("batch_norm")
def batch_norm(node: Node, c: Couplings) -> None:
    x, out = node.inputs[0], node.outputs[0]
    c.same_all(x, out)
    for param in node.inputs[1:]:
        c.same(c.slot(param, 0), c.slot(x, 1))


def _normalized(node: Node, c: Couplings, axes: set[int]) -> None:
    """Statistics over ``axes`` change if any element there is removed: block them."""
    x, out = node.inputs[0], node.outputs[0]
    c.same_all(x, out, skip=tuple(axes))
    for axis in axes:
        c.block(c.slot(x, axis), c.slot(out, axis))
    for param in node.inputs[1:]:
        c.block_value(param)


@coupling("layer_norm")
def layer_norm(node: Node, c: Couplings) -> None:
    rank = len(node.inputs[0].shape)
    _normalized(node, c, {a % rank for a in node.attrs["axes"]})


@coupling("group_norm")
def group_norm(node: Node, c: Couplings) -> None:
    rank = len(node.inputs[0].shape)
    _normalized(node, c, set(range(1, rank)))


@coupling("softmax", "log_softmax")
def softmax(node: Node, c: Couplings) -> None:
    rank = len(node.inputs[0].shape)
    _normalized(node, c, {node.attrs["axis"] % rank})


@coupling("mean", "sum", "norm")
def reduction(node: Node, c: Couplings) -> None:
    x, out = node.inputs[0], node.outputs[0]
    axes = {a % len(x.shape) for a in node.attrs["axes"]}
    kept = [a for a in range(len(x.shape)) if a not in axes]
    for i, axis in enumerate(kept):
        out_axis = axis if node.attrs["keepdims"] else i
        c.same(c.slot(x, axis), c.slot(out, out_axis))
    for axis in axes:
        c.block(c.slot(x, axis))


@coupling("max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "adaptive_max_pool2d")
def pooling(node: Node, c: Couplings) -> None:
    x, out = node.inputs[0], node.outputs[0]
    c.same(c.slot(x, 0), c.slot(out, 0))
    c.same(c.slot(x, 1), c.slot(out, 1))


@coupling("permute")
def permute(node: Node, c: Couplings) -> None:
    x, out = node.inputs[0], node.outputs[0]
    for out_axis, in_axis in enumerate(node.attrs["perm"]):
        c.same(c.slot(x, in_axis), c.slot(out, out_axis))


def reshape_groups(src: tuple[int, ...], dst: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Pair minimal runs of non-unit axes of two equal-size shapes whose products agree."""
    ins = [a for a, d in enumerate(src) if d != 1]
    outs = [a for a, d in enumerate(dst) if d != 1]
    groups, i, j = [], 0, 0
    while i < len(ins):
        gi, pi, gj, pj = [ins[i]], src[ins[i]], [outs[j]], dst[outs[j]]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj:
                gi.append(ins[i])
                pi *= src[ins[i]]
                i += 1
            else:
                gj.append(outs[j])
                pj *= dst[outs[j]]
                j += 1
        groups.append((gi, gj))
    return groups


@coupling("reshape")
def reshape(node: Node, c: Couplings) -> None:
    x, out = node.inputs[0], node.outputs[0]
    for gi, gj in reshape_groups(x.shape, out.shape):
        if len(gi) == 1 and len(gj) == 1:
            c.same(c.slot(x, gi[0]), c.slot(out, gj[0]))
        else:
            c.regroup([c.slot(x, a) for a in gi], [c.slot(out, a) for a in gj])


@coupling("slice")
def slice_(node: Node, c: Couplings) -> None:
    x, out = node.inputs[0], node.outputs[0]
    axis = node.attrs["axis"] % len(x.shape)
    c.same_all(x, out, skip=(axis,))
    if node.attrs["step"] == 1:
        c.offset(c.slot(x, axis), c.slot(out, axis), node.attrs["start"])
    else:
        c.block(c.slot(x, axis), c.slot(out, axis))


@coupling("concat")
def concat(node: Node, c: Couplings) -> None:
    out = node.outputs[0]
    axis = node.attrs["axis"] % len(out.shape)
    start = 0
    for piece in node.inputs:
        c.same_all(piece, out, skip=(axis,))
        c.offset(c.slot(out, axis), c.slot(piece, axis), start)
        start += piece.shape[axis]


@coupling("split")
def split(node: Node, c: Couplings) -> None:
    x = node.inputs[0]
    axis = node.attrs["axis"] % len(x.shape)
    start = 0
    for piece in node.outputs:
        c.same_all(x, piece, skip=(axis,))
        c.offset(c.slot(x, axis), c.slot(piece, axis), start)
        start += piece.shape[axis]


@coupling("pad")
def pad(node: Node, c: Couplings) -> None:
    """Padded elements are generated by the pad itself; the rest map by the leading pad."""
    x, out = node.inputs[0], node.outputs[0]
    for axis, (before, after) in enumerate(node.attrs["pads"]):
        if before == after == 0:
            c.same(c.slot(x, axis), c.slot(out, axis))
        elif before >= 0 and after >= 0:
            c.offset(c.slot(out, axis), c.slot(x, axis), before)
        else:
            c.block(c.slot(x, axis), c.slot(out, axis))


@coupling("expand")
def expand(node: Node, c: Couplings) -> None:
    x, out = node.inputs[0], node.outputs[0]
    c.broadcast(out, x)
    shift = len(out.shape) - len(x.shape)
    for axis in range(len(out.shape)):
        if axis < shift or x.shape[axis - shift] != out.shape[axis]:
            c.generated(c.slot(out, axis))


@coupling("roll")
def roll(node: Node, c: Couplings) -> None:
    x, out = node.inputs[0], node.outputs[0]
    axes = tuple(a % len(x.shape) for a in node.attrs["axes"])
    c.same_all(x, out, skip=axes)
    for axis in axes:
        c.block(c.slot(x, axis), c.slot(out, axis))


@coupling("take")
def take(node: Node, c: Couplings) -> None:
    x, idx = node.inputs
    out = node.outputs[0]
    axis = node.attrs["axis"] % len(x.shape)
    for a in range(axis):
        c.same(c.slot(x, a), c.slot(out, a))
    for a in range(axis + 1, len(x.shape)):
        c.same(c.slot(x, a), c.slot(out, a - 1 + len(idx.shape)))
    c.block(c.slot(x, axis))
    c.block_value(idx)
