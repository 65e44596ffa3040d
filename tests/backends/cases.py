"""The backend conformance cases: one table of single-op graphs, every op of the table at least
once, shared by tests/backends/test_conformance.py (each backend against the reference
interpreter) and the ONNX opset test; plus the small graphs and models the suite runs whole.

A case is ``(op, arrays, attrs, const)``: the op's operands in order (None for an absent optional
one), its attributes, and the positions of the operands that are constants rather than graph
inputs. The table is the union of the per-backend tables the torch, ONNX and numba tests had
before: cases equal in op, attributes, operand shapes, dtypes and kinds were merged (they differed
only in their random values); every other case is kept, and now runs on every backend.
"""

from __future__ import annotations

import numpy as np
import torch

from compiler.ir.graph import Graph
from compiler.ops.codebook import pack_indices
from tests.quant_cases import QDQ_CASES

RNG = np.random.default_rng(0)


def randn(*shape: int, dtype: str = "float32") -> np.ndarray:
    return RNG.standard_normal(shape).astype(dtype)


def positive(*shape: int, low: float = 0.1) -> np.ndarray:
    return (np.abs(randn(*shape)) + low).astype(np.float32)


def ints(*shape: int, high: int = 3) -> np.ndarray:
    return RNG.integers(-high, high, size=shape).astype(np.int64)


def one_node(op: str, arrays, attrs=None, const=()) -> tuple[Graph, list[np.ndarray]]:
    """A graph running ``op`` once, and its inputs; arrays at the positions in ``const`` become
    constants, the others graph inputs (of the array's shape and dtype)."""
    graph = Graph(op)
    values, inputs = [], []
    for i, array in enumerate(arrays):
        if array is None:
            values.append(None)
        elif i in const:
            values.append(graph.constant(array, f"{op}.w{i}"))
        else:
            values.append(graph.add_input(f"x{i}", array.shape, str(array.dtype)))
            inputs.append(array)
    graph.outputs = list(graph.add_node(op, values, attrs).outputs)
    graph.verify()
    return graph, inputs


# -- the op table: op -> list of (arrays, attrs, constant positions) ------------------------------

CASES: dict[str, list[tuple]] = {}


def case(op: str, inputs=(), consts=(), attrs=None, const=None) -> None:
    """Add a case: ``inputs`` then ``consts`` (or, with ``const``, ``inputs`` alone holds every
    operand and ``const`` names the constant positions)."""
    arrays = [*inputs, *consts]
    if const is None:
        const = tuple(range(len(inputs), len(arrays)))
    CASES.setdefault(op, []).append((arrays, attrs or {}, tuple(const)))


X = randn(2, 3, 4, 5)
POS = positive(2, 3, 4)

for op in "relu hardswish hardsigmoid silu sigmoid tanh neg exp abs identity dropout".split():
    case(op, [X])
    case(op, [randn(2, 3, 4) * 4])
for op in ("sqrt", "rsqrt", "log"):
    case(op, [POS])
case("gelu", [X])
case("gelu", [X], attrs={"approximate": "tanh"})
for approximate in ("none", "tanh"):
    case("gelu", [randn(2, 3, 4)], attrs={"approximate": approximate})
case("clip", [X], attrs={"min_val": 0.0, "max_val": 0.5})
case("clip", [X], attrs={"min_val": -0.2})
case("clip", [X])
case("clip", [randn(2, 8) * 5], attrs={"min_val": 0.0, "max_val": 6.0})
case("clip", [randn(2, 8)], attrs={"min_val": None, "max_val": 0.5})
case("clip", [randn(2, 8)], attrs={"min_val": -0.5, "max_val": None})
case("cast", [X * 3], attrs={"dtype": "int32"})
case("cast", [ints(3, 4)], attrs={"dtype": "float32"})
case("cast", [randn(3, 4)], attrs={"dtype": "float64"})
case("cast", [randn(3, 4) * 10], attrs={"dtype": "int32"})
case("cast", [np.round(randn(3, 4) * 3)], attrs={"dtype": "bool"})
for op in ("add", "sub", "mul", "div", "maximum", "minimum"):
    case(op, [randn(2, 3, 4)], [randn(4)])
for op in ("add", "sub", "mul", "maximum", "minimum"):
    case(op, [randn(2, 1, 4), randn(3, 1)])
    case(op, [randn(2, 3)], [randn(3, dtype="float64")])
    case(op, [randn(2, 3, 4, 5)], [randn(3, 1, 1)])
case("div", [randn(2, 3), POS[0, :, 0]])
case("div", [ints(3, 4, high=9)], [np.array([2, 3, 4, 5])])
case("pow", [positive(3, 4, low=0.5)], [randn(4)])
case("pow", [POS[0, :2, :3]], [np.array([1.0, 2.0, 0.5], "float32")])
for op in ("eq", "ne", "lt", "gt"):
    case(op, [ints(3, 4)], [ints(4)])
    case(op, [np.round(randn(4, 5)), np.round(randn(5))])
case("where", [randn(3, 4) > 0, randn(3, 4)], [randn(4)])
case("where", [randn(3, 1), randn(4)], [randn(3, 4)])  # a float condition

case("reshape", [X], attrs={"shape": (6, 20)})
case("reshape", [randn(2, 3, 4)], attrs={"shape": (4, 6)})
case("permute", [X], attrs={"perm": (0, 2, 3, 1)})
case("permute", [randn(2, 3, 4)], attrs={"perm": (2, 0, 1)})
case("permute", [randn(2, 3, 4, 5, 2)], attrs={"perm": (4, 2, 0, 3, 1)})
case("slice", [X], attrs={"axis": 3, "start": -4, "end": 5, "step": 2})
case("slice", [randn(2, 6)], attrs={"axis": 1, "start": 1, "end": 5, "step": 2})
case("slice", [randn(2, 6)], attrs={"axis": -1, "start": -3, "end": 2**62, "step": 1})
case("concat", [X, randn(2, 1, 4, 5), randn(2, 2, 4, 5)], attrs={"axis": 1}, const=(1,))
case("concat", [randn(2, 1), randn(2, 3)], [randn(2, 2)], attrs={"axis": 1})
case("split", [X], attrs={"axis": -1, "sizes": (1, 3, 1)})
case("split", [randn(2, 6)], attrs={"axis": 1, "sizes": (1, 2, 3)})
case("split", [randn(2, 6)], attrs={"axis": 0, "sizes": (2,)})
case("pad", [X], attrs={"pads": ((0, 0), (1, -1), (2, 0), (-1, 3)), "value": 1.5})
case("pad", [randn(2, 3)], attrs={"pads": ((0, 0), (1, 2)), "value": 1.5})
case("pad", [randn(3, 4)], attrs={"pads": ((1, -1), (-2, 1))})
case("expand", [randn(3, 1, 5)], attrs={"shape": (2, 3, 4, 5)})
case("expand", [randn(3, 1)], attrs={"shape": (2, 3, 4)})
case("roll", [X], attrs={"shifts": (1, -2), "axes": (0, 3)})
case("roll", [randn(2, 3, 4)], attrs={"shifts": (1, -2), "axes": (0, 2)})
case("roll", [randn(2, 3)], attrs={"shifts": 5, "axes": 1})
case("take", [X], [np.array([[0, -1], [2, 2]])], attrs={"axis": 2})
case("take", [randn(3, 4)], [np.array([[0, -1], [2, 2]])], attrs={"axis": 1})
case("mean", [X], attrs={"axes": (1, 3)})
case("mean", [randn(2, 3, 4)], attrs={"axes": (1, 2), "keepdims": True})
case("mean", [randn(2, 3, 4)], attrs={"axes": (0, 2)})
case("mean", [randn(2, 3)], attrs={"axes": ()})
case("sum", [X], attrs={"axes": (-1,), "keepdims": True})
case("sum", [ints(3, 4).astype(np.int32)], attrs={"axes": (0,)})
case("sum", [randn(2, 3, 4)], attrs={"axes": (-1,)})
case("norm", [X], attrs={"axes": (2, 3)})
case("norm", [X], attrs={"axes": (1,), "keepdims": True, "ord": 3.0})
for order in (2.0, 1.0, 3.0, np.inf, -np.inf):
    case("norm", [randn(2, 5)], attrs={"axes": (1,), "ord": order})
case("einsum", [randn(2, 3, 4), randn(2, 4, 5)], attrs={"equation": "bij,bjk->bik"})
case("einsum", [randn(3, 4)], attrs={"equation": "ij->ji"})

ODD = randn(2, 3, 7, 5)
case("conv2d", [X], [randn(4, 3, 3, 3), randn(4)], attrs={"padding": (1, 1)})
case("linear", [randn(2, 3, 5)], [randn(4, 5), randn(4)])
case("linear", [randn(4, 3, 8), randn(5, 8)])  # the weight an input, no bias
case("linear", [randn(4, 3, 8), randn(5, 8)], [randn(3, 5)], attrs={"activation": "relu"})
case("matmul", [randn(2, 3, 4, 5)], [randn(5, 6)])
case("matmul", [randn(2, 1, 3, 4), randn(5, 4, 6)])
case("matmul", [randn(3, 4)], [randn(4, 2)])
case("matmul", [randn(2, 40, 8), randn(2, 8, 3)])
case("max_pool2d", [X], attrs={"kernel": (2, 2), "stride": (2, 2)})
case("avg_pool2d", [X], attrs={"kernel": (3, 3), "padding": (1, 1)})
case("adaptive_avg_pool2d", [ODD], attrs={"output_size": (3, 2)})
for size in [(1, 1), (7, 3), (3, 4), (5, 6)]:
    case("adaptive_avg_pool2d", [randn(1, 2, 7, 6)], attrs={"output_size": size})
case("adaptive_max_pool2d", [ODD], attrs={"output_size": (3, 2)})
for size in [(1, 1), (4, 2), (3, 5)]:
    case("adaptive_max_pool2d", [randn(1, 2, 8, 6)], attrs={"output_size": size})
case("batch_norm", [X], [randn(3), randn(3), randn(3), positive(3, low=0.5)])
case(
    "batch_norm",
    [randn(2, 3, 4, 4)],
    [randn(3), randn(3), randn(3), POS[0, :, 0]],
    attrs={"eps": 1e-3},
)
case("layer_norm", [X], [randn(5), randn(5)])
case("layer_norm", [X], [randn(4, 5), None], attrs={"axes": (-2, -1)})
case("layer_norm", [X], [randn(5), randn(5)], attrs={"axes": (2, 3)})
case("layer_norm", [X], attrs={"axes": (1,)})
case("layer_norm", [randn(2, 3, 8)], [randn(8), randn(8)], attrs={"axes": (-1,)})
case("layer_norm", [randn(2, 3, 8)], attrs={"axes": (-2, -1)})
case("layer_norm", [randn(2, 3, 8)], [randn(3, 1)], attrs={"axes": (1,)})
case("group_norm", [randn(2, 6, 3, 3)], [randn(6), randn(6)], attrs={"groups": 3})
case("group_norm", [randn(2, 4, 3, 3)], [randn(4), randn(4)], attrs={"groups": 2})
case("group_norm", [randn(1, 4, 5)], attrs={"groups": 4, "eps": 1e-3})
case("softmax", [X], attrs={"axis": 1})
case("softmax", [randn(2, 5, 3)], attrs={"axis": 1})
case("softmax", [randn(4, 7)], attrs={"axis": -1})
case("log_softmax", [X])
case("log_softmax", [randn(2, 5, 3)], attrs={"axis": -1})
# 3-bit indices span byte boundaries; two codebook groups (rows of 4 output elements)
CODES_3BIT = pack_indices(np.arange(12) % 8, 3)
case("codebook_lookup", [], [randn(2, 8), CODES_3BIT], attrs={"shape": (2, 3, 2), "bits": 3})
case("codebook_lookup", [randn(2, 8)], [CODES_3BIT], attrs={"shape": (2, 3, 2), "bits": 3})
case(
    "codebook_lookup",
    [randn(1, 16)],
    [pack_indices(np.arange(15), 4)],
    attrs={"shape": (5, 3), "bits": 4},
)

Q, K, V, QS = randn(2, 3, 4, 8), randn(2, 3, 6, 8), randn(2, 3, 6, 5), randn(2, 3, 6, 8)
KEEP = RNG.random((6, 6)) > 0.3
KEEP[:, 0] = True  # no fully masked row (the reference gives NaN there)
case("attention", [Q, K, V])
case("attention", [Q, K, V], attrs={"scale": 0.3})
case("attention", [QS, QS, randn(2, 3, 6, 5)], attrs={"causal": True})
case("attention", [Q, K, V], [KEEP[:4]])
case("attention", [Q, K, V], [randn(4, 6)])
case("attention", [QS, QS, V], [KEEP], attrs={"causal": True})

for op, cases in QDQ_CASES.items():
    for attrs, shapes, consts, inputs in cases:
        case(op, inputs or [randn(*s) for s in shapes], consts, attrs)

OP_CASES = {f"{op}-{i}": (op, *c) for op, cases in CASES.items() for i, c in enumerate(cases)}


# -- fused epilogues: (activation, activation_attrs) -----------------------------------------------

EPILOGUES = [
    (None, None),
    ("relu", None),
    ("clip", {"min_val": 0.0, "max_val": 6.0}),
    ("clip", {"min_val": None, "max_val": 0.5}),
    ("clip", None),
    ("hardswish", None),
    ("hardsigmoid", None),
    ("silu", None),
    ("sigmoid", None),
    ("tanh", None),
    ("gelu", {"approximate": "tanh"}),
    ("gelu", None),
]


def epilogue_id(epilogue: tuple) -> str:
    act, attrs = epilogue
    return f"{act}" + ("" if attrs is None else "-" + "-".join(f"{v}" for v in attrs.values()))


# -- small graphs and models run whole ------------------------------------------------------------


def small_cnn() -> Graph:
    """Conv + relu, ceil-mode max pool, group norm, global pool, a named linear; two outputs."""
    g = Graph("cnn")
    x = g.add_input("image", (1, 3, 9, 9))
    y = g.add_node(
        "conv2d",
        [x, g.constant(randn(4, 3, 3, 3), "w1"), g.constant(randn(4), "b1")],
        {"padding": (1, 1), "activation": "relu"},
    ).outputs[0]
    y = g.add_node("max_pool2d", [y], {"kernel": (2, 2), "stride": (2, 2), "ceil_mode": True})
    y = g.add_node("group_norm", [y.outputs[0]], {"groups": 2}).outputs[0]
    y = g.add_node("adaptive_avg_pool2d", [y], {"output_size": (1, 1)}).outputs[0]
    y = g.add_node("reshape", [y], {"shape": (1, 4)}).outputs[0]
    logits = g.add_node("linear", [y, g.constant(randn(3, 4), "w2")], name="head").outputs[0]
    g.outputs = [logits, g.add_node("softmax", [logits]).outputs[0]]
    return g


def chain_graph(depth: int = 6) -> Graph:
    """A conv chain with residual adds: values die and their buffers can be reused."""
    g = Graph("chain")
    x = g.add_input("x", (1, 8, 12, 12))
    h = x
    for i in range(depth):
        c = g.add_node(
            "conv2d",
            [h, g.constant(randn(8, 8, 3, 3) * 0.2, f"w{i}")],
            {"padding": (1, 1), "activation": "relu"},
        ).outputs[0]
        h = g.add_node("add", [c, h]).outputs[0] if i % 2 else c
    g.outputs = [g.add_node("mean", [h], {"axes": (2, 3)}).outputs[0]]
    return g


class Block(torch.nn.Module):
    """Grouped conv, batch norm and a residual, ceil-mode average pooling, layer norm,
    self-attention and gelu: a small model with most of the op families."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.bn = torch.nn.BatchNorm2d(8)
        self.norm = torch.nn.LayerNorm(8)
        self.head = torch.nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)) + x)
        x = torch.nn.functional.avg_pool2d(x, 3, 2, 1, ceil_mode=True)
        tokens = self.norm(x.flatten(2).transpose(1, 2))
        attended = torch.nn.functional.scaled_dot_product_attention(tokens, tokens, tokens)
        return self.head(torch.nn.functional.gelu(attended.mean(1)))


def block() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return Block().eval(), torch.randn(2, 8, 7, 7)
