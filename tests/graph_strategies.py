"""Hypothesis strategies for random small CNN graphs built with the IR, reused by pass and backend
tests: dense, grouped and depthwise convs, batch norms, activations, residual adds, concats,
pooling, no-ops, constant subgraphs, values with several readers, and a linear head.

Usage::

    @given(case=graphs_with_inputs())
    def test_something(case):
        graph, inputs = case
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from hypothesis import strategies as st

from compiler.ir.graph import Graph, Value
from compiler.ops.elementwise import ACTIVATIONS

BLOCKS = ("conv", "residual", "concat", "pool", "noop", "shared", "const", "lone_bn")
NOOPS = ("identity", "dropout", "reshape", "permute", "slice", "pad", "expand", "cast")


@dataclass
class CnnBuilder:
    """Builds a graph with random weights; ``draw`` picks the structure, ``rng`` the numbers."""

    draw: st.DrawFn
    rng: np.random.Generator
    graph: Graph = field(default_factory=lambda: Graph("random_cnn"))

    def const(self, array: np.ndarray, name: str) -> Value:
        return self.graph.constant(np.asarray(array, dtype=np.float32), name)

    def node(self, op: str, inputs: list, source: str, **attrs) -> Value:
        node = self.graph.add_node(op, inputs, attrs, meta={"source": source})
        return node.outputs[0]

    # -- layers -------------------------------------------------------------------------------
    def conv(
        self,
        x: Value,
        out: int,
        source: str,
        *,
        kernel: int | None = None,
        stride: int = 1,
        groups: int = 1,
        bias: bool | None = None,
    ) -> Value:
        c = x.shape[1]
        k = kernel if kernel is not None else self.draw(st.sampled_from((1, 3)))
        bias = self.draw(st.booleans()) if bias is None else bias
        fan_in = c // groups * k * k
        w = self.const(
            self.rng.normal(0, 1 / np.sqrt(fan_in), (out, c // groups, k, k)), f"{source}.weight"
        )
        b = self.const(self.rng.normal(0, 0.1, out), f"{source}.bias") if bias else None
        pad = k // 2
        return self.node(
            "conv2d",
            [x, w] + ([b] if b is not None else []),
            source,
            stride=(stride, stride),
            padding=(pad, pad),
            groups=groups,
        )

    def random_conv(self, x: Value, source: str) -> Value:
        """A dense, grouped or depthwise conv with a random stride."""
        c = x.shape[1]
        kind = self.draw(st.sampled_from(("dense", "grouped", "depthwise")))
        stride = self.draw(st.sampled_from((1, 2))) if min(x.shape[2:]) >= 4 else 1
        if kind == "depthwise":
            groups, out = c, c * self.draw(st.sampled_from((1, 2)))
        elif kind == "grouped":
            groups = self.draw(st.sampled_from([g for g in range(1, c + 1) if c % g == 0]))
            out = groups * self.draw(st.integers(1, 3))
        else:
            groups, out = 1, self.draw(st.integers(1, 8))
        return self.conv(x, out, source, stride=stride, groups=groups)

    def batch_norm(self, x: Value, source: str) -> Value:
        c = x.shape[1]
        params = [
            self.const(self.rng.uniform(0.5, 1.5, c), f"{source}.weight"),
            self.const(self.rng.normal(0, 0.1, c), f"{source}.bias"),
            self.const(self.rng.normal(0, 0.1, c), f"{source}.running_mean"),
            self.const(self.rng.uniform(0.5, 2.0, c), f"{source}.running_var"),
        ]
        return self.node("batch_norm", [x, *params], source, eps=1e-5)

    def activation(self, x: Value, source: str) -> Value:
        op = self.draw(st.sampled_from(ACTIVATIONS))
        attrs = {}
        if op == "clip":
            attrs = {"min_val": 0.0, "max_val": 6.0}
        elif op == "gelu":
            attrs = {"approximate": self.draw(st.sampled_from(("none", "tanh")))}
        return self.node(op, [x], source, **attrs)

    def maybe(self, layer, x: Value, source: str) -> Value:
        return layer(x, source) if self.draw(st.booleans()) else x

    def noop(self, x: Value, source: str) -> Value:
        op = self.draw(st.sampled_from(NOOPS))
        rank = len(x.shape)
        attrs = {
            "reshape": {"shape": x.shape},
            "expand": {"shape": x.shape},
            "permute": {"perm": tuple(range(rank))},
            "cast": {"dtype": x.dtype},
            "slice": {"axis": 1, "start": 0, "end": x.shape[1] + 3},
            "pad": {"pads": ((0, 0),) * rank},
        }
        return self.node(op, [x], source, **attrs.get(op, {}))


# -- blocks: each takes the running feature map and returns the next one ---------------------------


def conv_block(b: CnnBuilder, x: Value, name: str) -> Value:
    y = b.random_conv(x, f"{name}.conv")
    y = b.maybe(b.batch_norm, y, f"{name}.bn")
    return b.maybe(b.activation, y, f"{name}.act")


def residual_block(b: CnnBuilder, x: Value, name: str) -> Value:
    """ResNet basic block; the shortcut is built before or after the main path, and added on
    either side, so that fuse-residual-add sees both orders."""
    c = x.shape[1]
    out = c if b.draw(st.booleans()) else b.draw(st.integers(1, 8))
    stride = b.draw(st.sampled_from((1, 2))) if min(x.shape[2:]) >= 4 else 1
    needs_proj = out != c or stride != 1

    def shortcut() -> Value:
        kind = "conv" if needs_proj else b.draw(st.sampled_from(("identity", "scaled")))
        if kind == "identity":
            return x
        if kind == "scaled":  # a computed shortcut: built late, the conv must move to fuse
            scale = b.const(b.rng.uniform(0.5, 1.5, (1, c, 1, 1)), f"{name}.scale")
            return b.node("mul", [x, scale], f"{name}.shortcut")
        s = b.conv(x, out, f"{name}.downsample.0", kernel=1, stride=stride, bias=False)
        return b.batch_norm(s, f"{name}.downsample.1")

    early = shortcut() if b.draw(st.booleans()) else None
    y = b.conv(x, out, f"{name}.conv1", kernel=3, stride=stride, bias=False)
    y = b.node("relu", [b.batch_norm(y, f"{name}.bn1")], f"{name}.relu")
    y = b.batch_norm(b.conv(y, out, f"{name}.conv2", kernel=3, bias=False), f"{name}.bn2")
    identity = early if early is not None else shortcut()
    pair = [y, identity] if b.draw(st.booleans()) else [identity, y]
    return b.node("relu", [b.node("add", pair, name)], f"{name}.relu_out")


def concat_block(b: CnnBuilder, x: Value, name: str) -> Value:
    branches = [conv_block(b, x, f"{name}.branch{i}") for i in range(2)]
    branches = [v for v in branches if v.shape[2:] == x.shape[2:]] or [x]
    if b.draw(st.booleans()):
        branches.append(x)
    return b.node("concat", branches, name, axis=1)


def pool_block(b: CnnBuilder, x: Value, name: str) -> Value:
    op = b.draw(st.sampled_from(("max_pool2d", "avg_pool2d")))
    if min(x.shape[2:]) >= 4 and b.draw(st.booleans()):
        return b.node(op, [x], name, kernel=(2, 2), stride=(2, 2))
    return b.node(op, [x], name, kernel=(3, 3), stride=(1, 1), padding=(1, 1))


def shared_block(b: CnnBuilder, x: Value, name: str) -> Value:
    """A conv output read twice (by a batch norm or activation and by an add): nothing may fuse."""
    y = b.random_conv(x, f"{name}.conv")
    z = b.batch_norm(y, f"{name}.bn") if b.draw(st.booleans()) else b.activation(y, f"{name}.act")
    return b.node("add", [z, y], name)


def const_block(b: CnnBuilder, x: Value, name: str) -> Value:
    """x * (c1 + c2) with per-channel constants: a constant subgraph for fold-constants."""
    c = x.shape[1]
    c1 = b.const(b.rng.uniform(0.5, 1.0, (1, c, 1, 1)), f"{name}.c1")
    c2 = b.const(b.rng.uniform(0.0, 0.5, (1, c, 1, 1)), f"{name}.c2")
    return b.node("mul", [x, b.node("add", [c1, c2], f"{name}.sum")], name)


def lone_bn_block(b: CnnBuilder, x: Value, name: str) -> Value:
    """A batch norm after something that is not a conv: it must stay."""
    return b.batch_norm(b.node("relu", [x], f"{name}.relu"), f"{name}.bn")


BLOCK_BUILDERS = {
    "conv": conv_block,
    "residual": residual_block,
    "concat": concat_block,
    "pool": pool_block,
    "noop": lambda b, x, name: b.noop(x, name),
    "shared": shared_block,
    "const": const_block,
    "lone_bn": lone_bn_block,
}


def head(b: CnnBuilder, x: Value) -> Value:
    """Global pool, flatten, linear [+ batch norm] [+ activation], linear."""
    n, c = x.shape[:2]
    pooled = b.node("adaptive_avg_pool2d", [x], "avgpool", output_size=(1, 1))
    feat = b.node("reshape", [pooled], "flatten", shape=(n, c))
    hidden = b.draw(st.integers(1, 8))
    w1 = b.const(b.rng.normal(0, 1 / np.sqrt(c), (hidden, c)), "fc1.weight")
    y = b.node("linear", [feat, w1, b.const(b.rng.normal(0, 0.1, hidden), "fc1.bias")], "fc1")
    y = b.maybe(b.batch_norm, y, "fc1.bn")
    y = b.maybe(b.activation, y, "fc1.act")
    classes = b.draw(st.integers(1, 5))
    w2 = b.const(b.rng.normal(0, 1 / np.sqrt(hidden), (classes, hidden)), "fc2.weight")
    return b.node("linear", [y, w2], "fc2")


def token_head(b: CnnBuilder, x: Value) -> Value:
    """(N, C, H, W) -> tokens (N, HW, C) -> linear -> batch_norm: the batch norm normalizes axis 1
    (the HW tokens), not linear's features, so it must not fold (even when F == HW)."""
    n, c, h, w = x.shape
    flat = b.node("reshape", [x], "tokens.flatten", shape=(n, c, h * w))
    tokens = b.node("permute", [flat], "tokens.permute", perm=(0, 2, 1))
    features = b.draw(st.sampled_from((h * w, 3)))
    wt = b.const(b.rng.normal(0, 1 / np.sqrt(c), (features, c)), "tokens.proj.weight")
    y = b.node("linear", [tokens, wt], "tokens.proj")
    return b.batch_norm(y, "tokens.norm")


@st.composite
def cnn_graphs(draw: st.DrawFn, max_blocks: int = 4) -> Graph:
    """A random small CNN: 1-2 images of 1-4 channels and 4-8 pixels a side, up to ``max_blocks``
    blocks, a classifier head, and sometimes extra graph outputs (an intermediate feature map, a
    token head)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    b = CnnBuilder(draw, rng)
    n, c = draw(st.integers(1, 2)), draw(st.integers(1, 4))
    h, w = draw(st.integers(4, 8)), draw(st.integers(4, 8))
    x = b.graph.add_input("x", (n, c, h, w))
    extra = []
    for i, kind in enumerate(draw(st.lists(st.sampled_from(BLOCKS), max_size=max_blocks))):
        x = BLOCK_BUILDERS[kind](b, x, f"block{i}")
        if draw(st.integers(0, 9)) == 0:
            extra.append(x)
    if draw(st.booleans()):
        extra.append(token_head(b, x))
    b.graph.outputs = [head(b, x), *extra]
    return b.graph


def random_inputs(graph: Graph, seed: int = 0) -> list[np.ndarray]:
    """Standard-normal arrays for every graph input."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(v.shape).astype(v.dtype) for v in graph.inputs]


@st.composite
def graphs_with_inputs(draw: st.DrawFn, max_blocks: int = 4) -> tuple[Graph, list[np.ndarray]]:
    """(graph, example inputs) pairs from :func:`cnn_graphs`."""
    graph = draw(cnn_graphs(max_blocks=max_blocks))
    return graph, random_inputs(graph, draw(st.integers(0, 2**16)))
