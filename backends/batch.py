"""Where the batch axis flows through a graph, and the node that mixes samples, if any.

The example input's batch is an example, not a contract: an emitted model should run any batch
when every op treats the samples of a batch independently. :func:`batch_flow` follows the batch
(axis 0 of every graph input) from node to node with one rule per op (:data:`BATCH_RULES`) and
records, per value, the axis that holds it as ``(axis, outer, inner)``: that axis has
``outer * B * inner`` entries, the sample index the middle factor (Swin's window partition
reshapes ``(B, 8, 8, 7, 7, 96)`` to ``(B * 64, 49, 96)``: ``(0, 1, 64)``; the rows of
``nn.MultiheadAttention``'s ``(L * B, E)`` are ``(0, L, 1)``). A convolution keeps the batch
at axis 0, a permute moves it, a reshape keeps it while the sample index stays a factor of one
axis (``(1, 512, 1, 1) -> (1, 512)``); a reduction, softmax or split along it, a contraction over
it, or a reshape that cuts samples apart mixes them. Constants, and values computed from constants
only, have no batch. A concat of batched values with an unbatched one of size 1 on the batch axis
(ViT's class token, traced at batch 1) repeats that value for every sample: torch's own model can
only have meant that, since ``cat`` would refuse it at any other batch; so does an expand of an
unbatched value to the traced batch on axis 0 (the same token, traced at batch 2 or more).

The backends read the result: the ONNX backend gives inputs and outputs a symbolic batch dim and
writes shape constants that follow it, the torch module and :func:`rebatch` set the batch-sized
attributes for the batch they get, the numba package runs other batches in chunks of its compiled
one; each keeps the static batch, naming the node, where the flow is mixed.

A graph traced at batch 1 cannot say which axis of a reshape's result holds the batch when
several could (``(197, 1, 768) -> (197, 768)``: the rows, as ``nn.MultiheadAttention`` means, or
the features): the one that folds it with the fewest entries is tried first, then the axis it had
(``(1, C) -> (1, 1, C)`` keeps it at axis 0), and a choice that makes a later node mix the
samples (a linear over the features) is undone for the next.

An op registered by a user gets a rule with ``@batch_rule("my_op")``: ``rule(node, batches)``
gets each input's :data:`Batch` (None: no batch, or an omitted input) and returns one per output,
or raises :class:`Mixed` saying how the op mixes the samples. Without a rule, an op that reads a
batched value keeps the graph at its static batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from compiler.errors import InputError
from compiler.ir.graph import Graph, Node, Value

__all__ = [
    "BATCH_RULES",
    "Batch",
    "BatchFlow",
    "Mixed",
    "batch_attrs",
    "batch_flow",
    "batch_rule",
    "rebatch",
    "reshape_batch",
    "reshape_batches",
    "with_batch",
]

#: (axis, outer, inner): the axis that holds the batch, ``outer * batch * inner`` entries long
Batch = tuple[int, int, int]
Batches = list[Batch | None]
Rule = Callable[[Node, Batches], Batches]

#: op name -> ``rule(node, input_batches) -> output_batches``
BATCH_RULES: dict[str, Rule] = {}


class Mixed(Exception):
    """Raised by a rule: the op mixes the samples of a batch (the message says how)."""


def batch_rule(*ops: str) -> Callable[[Rule], Rule]:
    """Register ``rule`` as the batch rule of each op in ``ops``."""

    def register(rule: Rule) -> Rule:
        for op in ops:
            BATCH_RULES[op] = rule
        return rule

    return register


@dataclass
class BatchFlow:
    """The batch of every value of a graph (see :func:`batch_flow`).

    Attributes:
        traced: the batch of the example inputs (axis 0 of the graph inputs); None for a graph
            without inputs, with a scalar input, or whose inputs disagree on it.
        batches: ``id(value) -> (axis, outer, inner)`` for the batched values.
        repeats: ``id(node) -> [input indices]``: unbatched inputs of a concat repeated for every
            sample (a backend expands them to the run's batch).
        mixer: the first node that mixes the samples (None: the batch is free).
        reason: why ``mixer`` mixes them (or why there is no batch).
    """

    traced: int | None
    batches: dict[int, Batch] = field(default_factory=dict)
    repeats: dict[int, list[int]] = field(default_factory=dict)
    mixer: Node | None = None
    reason: str = ""

    @property
    def dynamic(self) -> bool:
        """Whether the graph runs any batch: the samples flow through without mixing."""
        return self.traced is not None and self.mixer is None

    def batch(self, value: Value | None) -> Batch | None:
        """``(axis, outer, inner)`` of ``value`` in a dynamic graph (None otherwise, or when
        unbatched)."""
        if value is None or not self.dynamic:
            return None
        return self.batches.get(id(value))

    def axis(self, value: Value | None) -> int | None:
        """The batch axis of ``value`` in a dynamic graph (None otherwise, or when unbatched)."""
        batch = self.batch(value)
        return None if batch is None else batch[0]

    def why_static(self) -> str:
        """One sentence on why the graph keeps its traced batch ('' when it does not)."""
        if self.traced is None:
            return self.reason or "the graph has no batched input"
        if self.mixer is None:
            return ""
        node = self.mixer
        where = f", module '{node.source}'" if node.source else ""
        return f"node '{node.name}' ({node.op}{where}) mixes the samples: {self.reason}"


MAX_VISITS = 20  # node visits per node of the graph, backtracking included, before giving up


def batch_flow(graph: Graph) -> BatchFlow:
    """Follow the batch from the graph inputs (axis 0 of each) through every node.

    Where a reshape leaves the batch more than one axis to be in (only at batch 1), the
    preferred one is taken first; if a later node then mixes the samples, the next is tried
    (backtracking to the last such reshape). The first mixing met is reported when none works.
    """
    leading = {v.shape[0] for v in graph.inputs if v.shape}
    if not graph.inputs or any(not v.shape for v in graph.inputs) or len(leading) != 1:
        reason = "the graph inputs have different leading dims" if len(leading) > 1 else ""
        return BatchFlow(None, reason=reason)
    flow = BatchFlow(leading.pop())
    for value in graph.inputs:
        flow.batches[id(value)] = (0, 1, 1)
    nodes = graph.nodes
    choices: list[tuple[int, list[Batches], dict, dict]] = []  # node, untried, state before
    first: tuple[Node, str] | None = None
    i, budget = 0, MAX_VISITS * max(len(nodes), 1)
    while i < len(nodes):
        node = nodes[i]
        try:
            options = _options(node, flow)
        except Mixed as e:
            first = first or (node, str(e))
            budget -= 1
            while choices and not choices[-1][1]:
                choices.pop()
            if not choices or budget <= 0:
                flow.mixer, flow.reason = first
                return flow
            i, untried, batches, repeats = choices[-1]
            flow.batches, flow.repeats = dict(batches), dict(repeats)
            options = [untried.pop(0)]
            node = nodes[i]
        if len(options) > 1:
            choices.append((i, options[1:], dict(flow.batches), dict(flow.repeats)))
        if options:
            _record(flow, node, options[0])
        i += 1
        budget -= 1
    return flow


def _options(node: Node, flow: BatchFlow) -> list[Batches]:
    """The batches ``node``'s outputs may have, preferred first ([] when it has no batched
    input and makes no batch); raises :class:`Mixed`."""
    batches = [None if v is None else flow.batches.get(id(v)) for v in node.inputs]
    if all(b is None for b in batches):
        return [[(0, 1, 1)]] if _makes_batch(node, flow.traced) else []
    if node.op == "reshape":  # the one op whose batch may be ambiguous
        before, after = node.inputs[0].shape, node.outputs[0].shape
        fits = reshape_batches(before, after, batches[0])
        if not fits:
            raise Mixed(f"{list(before)} -> {list(after)} cuts samples apart")
        return [[f] for f in fits]
    rule = BATCH_RULES.get(node.op)
    if rule is None:
        raise Mixed(
            f"op '{node.op}' has no batch rule (register one with backends.batch.batch_rule)"
        )
    out = list(rule(node, batches))
    if len(out) != len(node.outputs):
        raise Mixed(f"its batch rule gave {len(out)} result(s)")
    return [out]


def _record(flow: BatchFlow, node: Node, out: Batches) -> None:
    if node.op == "concat":
        unbatched = [i for i, v in enumerate(node.inputs) if id(v) not in flow.batches]
        if unbatched:
            flow.repeats[id(node)] = unbatched
    for value, batch in zip(node.outputs, out, strict=True):
        if batch is not None:
            flow.batches[id(value)] = batch


def _makes_batch(node: Node, traced: int) -> bool:
    """An expand of an unbatched value to the traced batch on axis 0 (a class token expanded to
    the batch, traced at batch > 1): the same value for every sample."""
    if node.op != "expand" or traced < 2:
        return False
    x, shape = node.inputs[0], node.outputs[0].shape
    lead = len(shape) - len(x.shape)
    return bool(shape) and shape[0] == traced and (lead > 0 or x.shape[0] == 1)


# -- what a backend does with it -------------------------------------------------------------------


def batch_attrs(node: Node, flow: BatchFlow) -> tuple[str, int, int] | None:
    """Where ``node``'s attributes hold the batch size, as ``(name, index, per_sample)``: a
    reshape's or an expand's target shape at the output's batch axis (``("shape", axis, n)``),
    a whole-batch slice's end (``("end", -1, n)``), where the size is ``batch * n``; None when
    they do not."""
    batch = flow.batch(node.outputs[0]) if node.outputs else None
    if batch is None:
        return None
    axis, outer, inner = batch
    if node.op in ("reshape", "expand"):
        return ("shape", axis, outer * inner)
    if node.op == "slice" and node.attrs["axis"] % len(node.inputs[0].shape) == axis:
        return ("end", -1, outer * inner)
    return None


def with_batch(attrs: dict, where: tuple[str, int, int], batch: int) -> dict:
    """``attrs`` with the batch size named at ``where`` (from :func:`batch_attrs`) set for a run
    of batch ``batch``."""
    name, index, per_sample = where
    if name == "end":
        return {**attrs, "start": 0, "end": batch * per_sample}
    shape = list(attrs[name])
    shape[index] = batch * per_sample
    return {**attrs, name: tuple(shape)}


def static_batch_error(flow: BatchFlow, what: str, got: int) -> InputError:
    """The error for a run of batch ``got`` on a graph that keeps its traced batch."""
    return InputError(
        f"{what} runs only at the batch it was traced with ({flow.traced}), got {got}: "
        f"{flow.why_static()}",
        hint=f"run batches of {flow.traced} (split or pad the input), or trace with example "
        "inputs of the batch you will run",
    )


def rebatch(graph: Graph, batch: int) -> Graph:
    """A copy of ``graph`` for inputs of batch ``batch``: its reshapes, expands and whole-batch
    slices follow, unbatched concat inputs are expanded to the batch, every shape is inferred
    again.

    Raises:
        InputError: the graph mixes the samples (the message names the node).
    """
    flow = batch_flow(graph)
    if not flow.dynamic:
        raise static_batch_error(flow, f"graph '{graph.name}'", batch)
    new = graph.clone()
    plans = [
        (batch_attrs(n, flow), flow.repeats.get(id(n), ()), flow.axis(n.outputs[0]))
        for n in graph.nodes
    ]
    for value in new.inputs:
        value.shape = (batch, *value.shape[1:])
    for node, (where, repeats, axis) in zip(list(new.nodes), plans, strict=True):
        if where is not None:
            node.attrs = with_batch(node.attrs, where, batch)
        for i in repeats:  # a concat's unbatched input, size 1 at the output's batch axis
            x = node.inputs[i]
            shape = tuple(batch if k == axis else d for k, d in enumerate(x.shape))
            node.set_input(i, new.add_node("expand", [x], {"shape": shape}, before=node).outputs[0])
    new.reinfer_all()
    return new


# -- the rules -------------------------------------------------------------------------------------


def _broadcast(
    node: Node, batches: Batches, rank: int, inputs: Sequence[int] | None = None
) -> Batch:
    """The batch of a broadcast result of ``rank`` dims: every batched input must put it at the
    same axis the same way, and no unbatched input may broadcast it (a size > 1 there)."""
    picked = range(len(node.inputs)) if inputs is None else inputs
    at = set()
    for i in picked:
        v, b = node.inputs[i], batches[i]
        if v is not None and b is not None:
            at.add((b[0] + rank - len(v.shape), *b[1:]))
    if len(at) != 1:
        raise Mixed(f"its inputs have the batch at different axes {sorted(at)}")
    batch = at.pop()
    axis = batch[0]
    for i in picked:
        v, b = node.inputs[i], batches[i]
        if v is None or b is not None:
            continue
        k = axis - (rank - len(v.shape))
        if k >= 0 and v.shape[k] != 1:
            raise Mixed(f"input '{v.name}' {list(v.shape)} has no batch but spans axis {axis}")
    return batch


def _params(batches: Batches, first: int, what: str) -> None:
    if any(b is not None for b in batches[first:]):
        raise Mixed(f"its {what} depends on the batch")


@batch_rule(
    *"abs add cast clip div dropout eq exp gelu gt hardsigmoid hardswish identity log lt "
    "maximum minimum mul ne neg pow relu rsqrt sigmoid silu sqrt sub tanh where".split()
)
def _elementwise(node: Node, batches: Batches) -> Batches:
    return [_broadcast(node, batches, len(node.outputs[0].shape))]


@batch_rule("quantize_linear", "dequantize_linear")
def _quant(node: Node, batches: Batches) -> Batches:
    _params(batches, 1, "scale or zero point")
    x, scale = node.inputs[0], node.inputs[1]
    if batches[0] is None:
        return [None]
    if node.attrs["block_size"]:
        raise Mixed("its block-wise scales span the batch axis")
    if scale.numel > 1 and node.attrs["axis"] % max(len(x.shape), 1) == batches[0][0]:
        raise Mixed("it quantizes per index of the batch axis")
    return [batches[0]]


def _images(node: Node, batches: Batches) -> Batches:
    """Ops that compute each image of axis 0 alone (pooling, norms over the other axes); their
    other inputs are parameters."""
    if batches[0] is None or batches[0][0] != 0:
        where = "no batch" if batches[0] is None else f"the batch at axis {batches[0][0]}"
        raise Mixed(f"its input has {where}, not at axis 0")
    _params(batches, 1, "parameters")
    return [batches[0]] * len(node.outputs)


for _op in ("max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "adaptive_max_pool2d"):
    BATCH_RULES[_op] = _images
BATCH_RULES["batch_norm"] = _images
BATCH_RULES["group_norm"] = _images


@batch_rule("conv2d")
def _conv2d(node: Node, batches: Batches) -> Batches:
    x = _images(node, batches[:3])[0]
    if len(batches) > 3 and batches[3] is not None:  # the fused residual
        if _broadcast(node, batches, 4, inputs=(0, 3)) != x:
            raise Mixed("its residual has the batch elsewhere")
    return [x]


@batch_rule("linear")
def _linear(node: Node, batches: Batches) -> Batches:
    x, b = node.inputs[0], batches[0]
    if b is None or b[0] == len(x.shape) - 1:
        raise Mixed("the batch is its input's feature axis")
    _params(batches[:3], 1, "weight or bias")
    if len(batches) > 3 and batches[3] is not None:
        if _broadcast(node, batches, len(x.shape), inputs=(0, 3)) != b:
            raise Mixed("its residual has the batch elsewhere")
    return [b]


def _leading(node: Node, batches: Batches, rank: int) -> Batch:
    """``_broadcast`` over the leading dims of matrix operands (the last two are the matrices)."""
    batch = _broadcast(node, batches, rank)
    if batch[0] >= rank - 2:
        raise Mixed("the batch is an axis of the matrices")
    return batch


@batch_rule("matmul")
def _matmul(node: Node, batches: Batches) -> Batches:
    x, y = node.inputs
    rank = len(node.outputs[0].shape)
    if len(x.shape) < 2 or len(y.shape) < 2:
        raise Mixed("a 1-D operand")
    bx, by = batches
    if bx is not None and bx[0] == len(x.shape) - 2:  # rows of x: each sample's rows times y
        if by is not None:
            raise Mixed("the batch is both x's rows and an axis of y")
        return [(rank - 2, *bx[1:])]
    if by is not None and by[0] == len(y.shape) - 1:  # columns of y
        if bx is not None:
            raise Mixed("the batch is both y's columns and an axis of x")
        return [(rank - 1, *by[1:])]
    return [_leading(node, batches, rank)]


@batch_rule("attention")
def _attention(node: Node, batches: Batches) -> Batches:
    return [_leading(node, batches, len(node.outputs[0].shape))]


@batch_rule("softmax", "log_softmax")
def _along_axis(node: Node, batches: Batches) -> Batches:
    if node.attrs["axis"] % len(node.inputs[0].shape) == batches[0][0]:
        raise Mixed("it normalizes along the batch axis")
    return [batches[0]]


@batch_rule("layer_norm")
def _layer_norm(node: Node, batches: Batches) -> Batches:
    rank = len(node.inputs[0].shape)
    if batches[0] is None or batches[0][0] in {a % rank for a in node.attrs["axes"]}:
        raise Mixed("it normalizes over the batch axis")
    _params(batches, 1, "scale or bias")
    return [batches[0]]


@batch_rule("mean", "sum", "norm")
def _reduce(node: Node, batches: Batches) -> Batches:
    b, rank = batches[0], len(node.inputs[0].shape)
    reduced = {r % rank for r in node.attrs["axes"]}
    if b[0] in reduced:
        raise Mixed("it reduces over the batch axis")
    return [b if node.attrs["keepdims"] else (b[0] - sum(r < b[0] for r in reduced), *b[1:])]


def reshape_batches(before: Sequence[int], after: Sequence[int], batch: Batch) -> list[Batch]:
    """Where the batch can be after the reshape of ``before`` to ``after``, preferred first;
    [] when the reshape cuts the sample index apart. The index has the entries above it (``O``,
    a product of whole dims and ``outer``) and the entries below it (``S``); it stays a factor
    of axis ``k`` of ``after`` when the dims before ``k`` divide ``O`` and the dims after ``k``
    divide ``S``. Several axes fit only at batch 1: the one with the fewest other entries is
    preferred, then the same axis, then the first."""
    axis, outer, inner = batch
    above = math.prod(before[:axis]) * outer
    below = inner * math.prod(before[axis + 1 :])
    fits = []
    for k in range(len(after)):
        pre, post = math.prod(after[:k]), math.prod(after[k + 1 :])
        if pre and post and above % pre == 0 and below % post == 0:
            fits.append((k, above // pre, below // post))
    return sorted(fits, key=lambda f: (f[1] * f[2], f[0] != axis, f[0]))


def reshape_batch(before: Sequence[int], after: Sequence[int], batch: Batch) -> Batch | None:
    """The preferred of :func:`reshape_batches` (None: the reshape cuts samples apart)."""
    fits = reshape_batches(before, after, batch)
    return fits[0] if fits else None


@batch_rule("expand")
def _expand(node: Node, batches: Batches) -> Batches:
    x, shape = node.inputs[0], node.outputs[0].shape
    b = batches[0]
    k = b[0] + len(shape) - len(x.shape)
    if shape[k] != x.shape[b[0]]:
        raise Mixed(f"it broadcasts the batch axis from {x.shape[b[0]]} to {shape[k]}")
    return [(k, *b[1:])]


@batch_rule("permute")
def _permute(node: Node, batches: Batches) -> Batches:
    rank = len(node.attrs["perm"])
    b = batches[0]
    return [([p % rank for p in node.attrs["perm"]].index(b[0]), *b[1:])]


@batch_rule("slice")
def _slice(node: Node, batches: Batches) -> Batches:
    x, b = node.inputs[0], batches[0]
    if node.attrs["axis"] % len(x.shape) == b[0] and (
        node.outputs[0].shape != x.shape or node.attrs["step"] != 1
    ):
        raise Mixed("it slices the batch axis")
    return [b]


@batch_rule("split")
def _split(node: Node, batches: Batches) -> Batches:
    if node.attrs["axis"] % len(node.inputs[0].shape) == batches[0][0]:
        raise Mixed("it splits the batch axis")
    return [batches[0]] * len(node.outputs)


@batch_rule("concat")
def _concat(node: Node, batches: Batches) -> Batches:
    rank = len(node.outputs[0].shape)
    batch = _broadcast(node, batches, rank)
    if node.attrs["axis"] % rank == batch[0]:
        raise Mixed("it joins along the batch axis")
    sizes = {v.shape[batch[0]] for v, b in zip(node.inputs, batches) if b is not None}
    if None in batches and (batch[1:] != (1, 1) or sizes != {1}):
        raise Mixed("it joins batched values with an unbatched one the size of the batch")
    return [batch]


@batch_rule("pad")
def _pad(node: Node, batches: Batches) -> Batches:
    if tuple(node.attrs["pads"][batches[0][0]]) != (0, 0):
        raise Mixed("it pads the batch axis")
    return [batches[0]]


@batch_rule("roll")
def _roll(node: Node, batches: Batches) -> Batches:
    rank = len(node.inputs[0].shape)
    rolled = node.attrs["axes"]
    rolled = rolled if isinstance(rolled, (list, tuple)) else (rolled,)
    if batches[0][0] in {r % rank for r in rolled}:
        raise Mixed("it rolls along the batch axis")
    return [batches[0]]


@batch_rule("take")
def _take(node: Node, batches: Batches) -> Batches:
    x, idx = node.inputs
    along = node.attrs["axis"] % len(x.shape)
    bx, bi = batches
    if bx is not None:
        if bi is not None or bx[0] == along:
            raise Mixed("it gathers along the batch axis")
        return [(bx[0] if bx[0] < along else bx[0] + len(idx.shape) - 1, *bx[1:])]
    return [(along + bi[0], *bi[1:])]  # a table looked up by batched indices (an embedding)


@batch_rule("einsum")
def _einsum(node: Node, batches: Batches) -> Batches:
    equation = node.attrs["equation"].replace(" ", "")
    if "..." in equation or "->" not in equation:
        raise Mixed("an einsum with an ellipsis or without '->'")
    ins, out = equation.split("->")
    terms = ins.split(",")
    found = {(t[b[0]], *b[1:]) for t, b in zip(terms, batches) if b is not None}
    if len(found) != 1:
        raise Mixed("its operands have the batch on different letters")
    letter, *factors = found.pop()
    if letter not in out:
        raise Mixed("it sums over the batch letter")
    if any(b is None and letter in t for t, b in zip(terms, batches)):
        raise Mixed("an unbatched operand spans the batch letter")
    return [(out.index(letter), *factors)]
