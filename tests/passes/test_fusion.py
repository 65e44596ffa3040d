"""Tests of the cleanup and fusion passes: golden IR text, numerics against the reference
interpreter, preconditions that must block a rewrite, and invariants over random CNN graphs."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from compiler.errors import OptionError
from compiler.ir import interpreter
from compiler.ir.graph import Graph, Value
from compiler.pass_manager import PASSES, PRESETS, PassManager, resolve_passes
from passes.cleanup import EliminateDeadCode, FoldConstants, RemoveNoops
from passes.fusion import FoldBatchNorm, FuseActivations, FuseResidualAdd
from tests.graph_strategies import graphs_with_inputs, random_inputs

RNG = np.random.default_rng(0)


def op(g: Graph, kind: str, inputs: list, name: str | None = None, **attrs) -> Value:
    """Add a ``kind`` node named ``name`` (default: ``kind``) from module ``m.<name>``."""
    name = name or kind
    return g.add_node(kind, inputs, attrs, name=name, meta={"source": f"m.{name}"}).outputs[0]


def const(g: Graph, shape: tuple, name: str, low: float = -1.0, high: float = 1.0) -> Value:
    return g.constant(RNG.uniform(low, high, shape).astype(np.float32), name)


def bn(g: Graph, x: Value, name: str = "batch_norm") -> Value:
    c = x.shape[1]
    params = [
        const(g, (c,), f"{name}.{p}", lo, hi)
        for p, lo, hi in (("scale", 0.5, 1.5), ("shift", -1, 1), ("mean", -1, 1), ("var", 0.5, 2))
    ]
    return op(g, "batch_norm", [x, *params], name)


def dedent(text: str) -> str:
    return textwrap.dedent(text).strip("\n")


def check_exact(p, g: Graph) -> bool:
    """Run pass ``p`` on ``g`` through the PassManager (verify + numeric check) and also compare
    the outputs with the interpreter by hand; return whether any pass changed the graph."""
    inputs = random_inputs(g, seed=1)
    expected = interpreter.run(g, inputs)
    manager = PassManager(passes=[p], example_inputs=inputs)
    manager.run(g)
    for want, got in zip(expected, interpreter.run(g, inputs), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    return any(row.changed for row in manager.report.rows[1:])


def conv(
    g: Graph, x: Value, out: int, name: str = "conv2d", bias: bool = True, k: int = 1, **attrs
) -> Value:
    c = x.shape[1] // attrs.get("groups", 1)
    inputs = [x, const(g, (out, c, k, k), f"{name}.w")]
    if bias:
        inputs.append(const(g, (out,), f"{name}.b"))
    return op(g, "conv2d", inputs, name, padding=(k // 2, k // 2), **attrs)


# -- remove-noops --------------------------------------------------------------------------------


def noop_graph() -> Graph:
    g = Graph("noops")
    y = g.add_input("x", (1, 2, 3, 3))
    for name, attrs in [
        ("identity", {}),
        ("dropout", {"p": 0.1}),
        ("reshape", {"shape": (1, 2, 3, 3)}),
        ("permute", {"perm": (0, 1, 2, 3)}),
        ("slice", {"axis": 2, "end": 9}),
        ("pad", {"pads": ((0, 0),) * 4}),
        ("expand", {"shape": (1, 2, 3, 3)}),
        ("cast", {"dtype": "float32"}),
        # look like no-ops by shape, but move data
        ("pad1", {"pads": ((0, 0), (0, 0), (1, -1), (0, 0))}),
        ("permute1", {"perm": (0, 1, 3, 2)}),
        ("slice1", {"axis": 3, "start": 1, "end": 3}),
        ("cast1", {"dtype": "float64"}),
    ]:
        y = op(g, name.rstrip("1"), [y], name, **attrs)
    g.outputs = [y]
    return g


def test_remove_noops_golden() -> None:
    g = noop_graph()
    assert RemoveNoops().run(g)
    assert str(g) == dedent("""
        graph noops(
            %x: float32[1,2,3,3],
        ) {
          %pad1: float32[1,2,3,3] = pad(%x) {pads=[[0, 0], [0, 0], [1, -1], [0, 0]], value=0.0}
          %permute1: float32[1,2,3,3] = permute(%pad1) {perm=[0, 1, 3, 2]}
          %slice1: float32[1,2,3,2] = slice(%permute1) {axis=3, end=3, start=1, step=1}
          %cast1: float64[1,2,3,2] = cast(%slice1) {dtype='float64'}
          return %cast1
        }
    """)
    assert not RemoveNoops().run(g)


def test_remove_noops_numeric() -> None:
    assert check_exact("remove-noops", noop_graph())


def test_remove_noops_graph_output_becomes_input() -> None:
    g = Graph()
    x = g.add_input("x", (2, 3))
    g.outputs = [op(g, "identity", [x])]
    assert RemoveNoops().run(g)
    g.verify()
    assert g.outputs == [x] and not g.nodes


# -- fold-constants ------------------------------------------------------------------------------


def const_graph() -> Graph:
    g = Graph("consts")
    x = g.add_input("x", (1, 2, 4, 4))
    w = op(g, "permute", [const(g, (3, 3, 2, 3), "w_hwio")], perm=(3, 2, 0, 1))
    s = op(g, "add", [const(g, (1, 3, 1, 1), "a"), const(g, (1, 3, 1, 1), "b")])
    y = op(g, "mul", [op(g, "conv2d", [x, w], padding=(1, 1)), s])
    g.outputs = [y]
    return g


def test_fold_constants_golden() -> None:
    g = const_graph()
    original = g.clone()
    assert FoldConstants().run(g)
    assert str(g) == dedent("""
        graph consts(
            %x: float32[1,2,4,4],
        ) {
          $permute: float32[3,2,3,3]
          $add: float32[1,3,1,1]
          %conv2d: float32[1,3,4,4] = conv2d(%x, $permute) {dilation=[1, 1], groups=1, padding=[1, 1], stride=[1, 1]}
          %mul: float32[1,3,4,4] = mul(%conv2d, $add)
          return %mul
        }
    """)  # noqa: E501 (golden IR text)
    folded = g.node("conv2d").inputs[1]
    assert folded.meta["source"] == "m.permute"
    np.testing.assert_array_equal(
        folded.data, original.node("permute").inputs[0].data.transpose(3, 2, 0, 1)
    )
    assert len(original.nodes) == 4  # the clone is untouched


def test_fold_constants_numeric() -> None:
    assert check_exact("fold-constants", const_graph())


def test_fold_constants_size_guard() -> None:
    g = Graph()
    x = g.add_input("x", (4, 100))
    big = op(g, "expand", [const(g, (1, 100), "row")], shape=(4, 100))
    small = op(g, "neg", [const(g, (1, 100), "row2")])
    g.outputs = [op(g, "add", [x, big]), op(g, "add", [x, small], "add1")]
    assert FoldConstants(max_elements=200).run(g)
    assert [n.op for n in g.nodes] == ["expand", "add", "add"]  # neg keeps its size: folded
    assert FoldConstants().run(g)
    assert [n.op for n in g.nodes] == ["add", "add"]
    with pytest.raises(OptionError):
        FoldConstants(max_elements=-1)


def test_fold_constants_multi_output_and_graph_output() -> None:
    g = Graph("split")
    halves = g.add_node("split", [const(g, (4, 2), "c")], {"axis": 0, "sizes": (1, 3)}).outputs
    g.outputs = [halves[1]]
    assert check_exact(FoldConstants(), g)
    assert not g.nodes and g.outputs[0].is_constant and g.outputs[0].shape == (3, 2)


# -- eliminate-dead-code ---------------------------------------------------------------------------


def test_eliminate_dead_code_golden_and_numeric() -> None:
    g = Graph("dead")
    x = g.add_input("x", (2, 4))
    parts = g.add_node("split", [x], {"axis": 1, "sizes": (1, 3)}, name="split").outputs
    op(g, "exp", [op(g, "neg", [x])])  # dead chain
    live = op(g, "relu", [parts[0]])
    g.outputs = [live]
    assert check_exact(EliminateDeadCode(), g)
    assert str(g) == dedent("""
        graph dead(
            %x: float32[2,4],
        ) {
          %split.0: float32[2,1], %split.1: float32[2,3] = split(%x) {axis=1, sizes=[1, 3]}
          %relu: float32[2,1] = relu(%split.0)
          return %relu
        }
    """)
    assert not EliminateDeadCode().run(g)


# -- fold-batch-norm -----------------------------------------------------------------------------


def test_fold_batch_norm_golden() -> None:
    g = Graph("bn")
    x = g.add_input("x", (1, 2, 4, 4))
    y = bn(g, conv(g, x, 3, bias=False))
    feat = op(g, "reshape", [op(g, "mean", [y], axes=(2, 3), keepdims=True)], shape=(1, 3))
    z = bn(g, op(g, "linear", [feat, const(g, (5, 3), "fc.w"), const(g, (5,), "fc.b")]), "bn1d")
    g.outputs = [z]
    assert check_exact(FoldBatchNorm(), g)
    assert str(g) == dedent("""
        graph bn(
            %x: float32[1,2,4,4],
        ) {
          $conv2d.w: float32[3,2,1,1]
          $conv2d_bias: float32[3]
          $fc.w: float32[5,3]
          $fc.b: float32[5]
          %conv2d: float32[1,3,4,4] = conv2d(%x, $conv2d.w, $conv2d_bias) {dilation=[1, 1], groups=1, padding=[0, 0], stride=[1, 1]}
          %mean: float32[1,3,1,1] = mean(%conv2d) {axes=[2, 3], keepdims=True}
          %reshape: float32[1,3] = reshape(%mean) {shape=[1, 3]}
          %linear: float32[1,5] = linear(%reshape, $fc.w, $fc.b)
          return %linear
        }
    """)  # noqa: E501 (golden IR text)
    conv_node = g.node("conv2d")
    assert conv_node.meta["source"] == "m.conv2d"
    assert conv_node.meta["fused"] == (("batch_norm", "m.batch_norm"),)


def test_fold_batch_norm_grouped_conv_with_shared_weight() -> None:
    g = Graph()
    x = g.add_input("x", (2, 4, 5, 5))
    a = conv(g, x, 6, groups=2, k=3)
    w, b = g.node("conv2d").inputs[1:]
    other = op(g, "conv2d", [x, w, b], "conv2d1", padding=(1, 1), groups=2)  # same weight Values
    g.outputs = [bn(g, a), other]
    assert check_exact(FoldBatchNorm(), g)
    assert g.node("conv2d1").inputs[1] is w and g.node("conv2d").inputs[1] is not w
    assert not g.find("batch_norm")


def test_fold_batch_norm_preconditions() -> None:
    g = Graph()
    x = g.add_input("x", (1, 2, 4, 4))
    two_users = conv(g, x, 2, name="conv2d")
    g.outputs = [op(g, "add", [bn(g, two_users), two_users])]
    with_act = conv(g, x, 2, name="conv2d1", activation="relu")
    g.outputs.append(bn(g, with_act, "batch_norm1"))
    # linear on (N, L, C): batch_norm normalizes axis 1 (L), not linear's features
    tokens = op(g, "reshape", [x], shape=(1, 2, 16))
    proj = op(g, "linear", [tokens, const(g, (2, 16), "proj.w")])
    g.outputs.append(bn(g, proj, "batch_norm2"))
    g.outputs.append(bn(g, op(g, "relu", [x]), "batch_norm3"))
    assert not check_exact(FoldBatchNorm(), g)
    assert len(g.find("batch_norm")) == 4


# -- fuse-residual-add -----------------------------------------------------------------------------


def residual_graph(shortcut_late: bool) -> Graph:
    g = Graph("residual")
    x = g.add_input("x", (1, 2, 4, 4))
    early = op(g, "neg", [x]) if not shortcut_late else None
    y = conv(g, x, 2, bias=False)
    r = op(g, "neg", [x]) if shortcut_late else early
    g.outputs = [op(g, "relu", [op(g, "add", [r, y])])]
    return g


def test_fuse_residual_add_golden() -> None:
    g = residual_graph(shortcut_late=False)
    assert check_exact(FuseResidualAdd(), g)
    assert str(g) == dedent("""
        graph residual(
            %x: float32[1,2,4,4],
        ) {
          $conv2d.w: float32[2,2,1,1]
          %neg: float32[1,2,4,4] = neg(%x)
          %conv2d: float32[1,2,4,4] = conv2d(%x, $conv2d.w, _, %neg) {dilation=[1, 1], groups=1, padding=[0, 0], stride=[1, 1]}
          %relu: float32[1,2,4,4] = relu(%conv2d)
          return %relu
        }
    """)  # noqa: E501 (golden IR text)


def test_fuse_residual_add_moves_conv_after_late_shortcut() -> None:
    g = residual_graph(shortcut_late=True)
    assert [n.op for n in g.nodes] == ["conv2d", "neg", "add", "relu"]
    assert check_exact(FuseResidualAdd(), g)
    assert [n.op for n in g.nodes] == ["neg", "conv2d", "relu"]
    assert g.node("conv2d").inputs[3] is g.node("neg").outputs[0]


def test_fuse_residual_add_linear_and_preconditions() -> None:
    g = Graph()
    x = g.add_input("x", (3, 4))
    fc = op(g, "linear", [x, const(g, (4, 4), "w"), const(g, (4,), "b")])
    fused = op(g, "add", [fc, x])
    row = op(g, "linear", [x, const(g, (4, 4), "w1")], "linear1")
    # shape differs: a broadcast bias, not a residual
    broadcast = op(g, "add", [row, const(g, (4,), "bias2")], "add1")
    act = op(g, "linear", [x, const(g, (4, 4), "w2")], "linear2", activation="relu")
    after_act = op(g, "add", [act, x], "add2")  # would add after the activation
    g.outputs = [fused, broadcast, after_act]
    assert check_exact(FuseResidualAdd(), g)
    assert [n.op for n in g.nodes] == ["linear", "linear", "add", "linear", "add"]
    assert g.node("linear").inputs[3] is x and g.node("linear").inputs[2] is not None


# -- fuse-activations ----------------------------------------------------------------------------


def test_fuse_activations_golden() -> None:
    g = Graph("act")
    x = g.add_input("x", (1, 2, 4, 4))
    y = op(g, "clip", [conv(g, x, 2)], min_val=0.0, max_val=6.0)
    z = op(
        g,
        "sigmoid",
        [op(g, "linear", [op(g, "reshape", [y], shape=(1, 32)), const(g, (3, 32), "fc.w")])],
    )
    g.outputs = [z]
    assert check_exact(FuseActivations(), g)
    assert str(g) == dedent("""
        graph act(
            %x: float32[1,2,4,4],
        ) {
          $conv2d.w: float32[2,2,1,1]
          $conv2d.b: float32[2]
          $fc.w: float32[3,32]
          %conv2d: float32[1,2,4,4] = conv2d(%x, $conv2d.w, $conv2d.b) {activation='clip', activation_attrs={'min_val': 0.0, 'max_val': 6.0}, dilation=[1, 1], groups=1, padding=[0, 0], stride=[1, 1]}
          %reshape: float32[1,32] = reshape(%conv2d) {shape=[1, 32]}
          %linear: float32[1,3] = linear(%reshape, $fc.w) {activation='sigmoid'}
          return %linear
        }
    """)  # noqa: E501 (golden IR text)
    assert g.node("linear").attrs["activation_attrs"] is None
    assert g.node("conv2d").meta == {"source": "m.conv2d", "fused": (("clip", "m.clip"),)}


def test_fuse_activations_preconditions() -> None:
    g = Graph()
    x = g.add_input("x", (1, 2, 4, 4))
    exposed = conv(g, x, 2, name="conv2d")
    two_users = conv(g, x, 2, name="conv2d1")
    has_act = conv(g, x, 2, name="conv2d2", activation="tanh")
    g.outputs = [
        op(g, "relu", [exposed]),
        exposed,  # the pre-activation value is a graph output
        op(g, "add", [op(g, "relu", [two_users], "relu1"), two_users]),
        op(g, "relu", [has_act], "relu2"),
        op(g, "relu", [op(g, "neg", [x])], "relu3"),  # not produced by a conv
    ]
    assert not check_exact(FuseActivations(), g)
    assert len(g.find("relu")) == 4


# -- the fuse preset -----------------------------------------------------------------------------


def basic_block() -> Graph:
    """torchvision's BasicBlock with a downsample computed after the main path."""
    g = Graph("block")
    x = g.add_input("x", (1, 2, 6, 6))
    y = op(g, "relu", [bn(g, conv(g, x, 4, "conv1", bias=False, k=3, stride=(2, 2)), "bn1")])
    y = bn(g, conv(g, op(g, "dropout", [y]), 4, "conv2", bias=False, k=3), "bn2")
    down = bn(g, conv(g, x, 4, "downsample.0", bias=False, stride=(2, 2)), "downsample.1")
    g.outputs = [op(g, "relu", [op(g, "add", [y, down])], "relu1")]
    return g


def test_fuse_preset_basic_block_golden() -> None:
    g = basic_block()
    assert check_exact("fuse", g)
    assert str(g) == dedent("""
        graph block(
            %x: float32[1,2,6,6],
        ) {
          $conv1.w: float32[4,2,3,3]
          $conv1_bias: float32[4]
          $conv2.w: float32[4,4,3,3]
          $conv2_bias: float32[4]
          $downsample.0.w: float32[4,2,1,1]
          $downsample.0_bias: float32[4]
          %conv1: float32[1,4,3,3] = conv2d(%x, $conv1.w, $conv1_bias) {activation='relu', dilation=[1, 1], groups=1, padding=[1, 1], stride=[2, 2]}
          %conv2: float32[1,4,3,3] = conv2d(%conv1, $conv2.w, $conv2_bias) {dilation=[1, 1], groups=1, padding=[1, 1], stride=[1, 1]}
          %downsample.0: float32[1,4,3,3] = conv2d(%x, $downsample.0.w, $downsample.0_bias, %conv2) {activation='relu', dilation=[1, 1], groups=1, padding=[0, 0], stride=[2, 2]}
          return %downsample.0
        }
    """)  # noqa: E501 (golden IR text)
    # both convs could take the add; the later one does, so no node has to move
    assert g.node("downsample.0").meta == {
        "source": "m.downsample.0",
        "fused": (("batch_norm", "m.downsample.1"), ("add", "m.add"), ("relu", "m.relu1")),
    }


def test_fuse_preset_removes_dead_readers_before_fusing() -> None:
    g = Graph()
    x = g.add_input("x", (1, 2, 4, 4))
    y = conv(g, x, 2)
    op(g, "neg", [y])  # dead, but a reader of the conv output until removed
    g.outputs = [op(g, "relu", [bn(g, y)])]
    assert check_exact("fuse", g)
    assert [n.op for n in g.nodes] == ["conv2d"]
    assert g.nodes[0].attrs["activation"] == "relu"
    assert PRESETS["fuse"].index("eliminate-dead-code") < PRESETS["fuse"].index("fold-batch-norm")


def test_passes_are_registered_exact_and_documented() -> None:
    for cls in (
        RemoveNoops,
        FoldConstants,
        EliminateDeadCode,
        FoldBatchNorm,
        FuseResidualAdd,
        FuseActivations,
    ):
        assert PASSES[cls.name] is cls and cls.exact
        assert "->" in (cls.__doc__ or ""), cls.name


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=graphs_with_inputs(max_blocks=5))
def test_fuse_preset_on_random_cnns(case: tuple[Graph, list[np.ndarray]]) -> None:
    graph, inputs = case
    original = graph.clone()
    expected = interpreter.run(graph, inputs)
    # the manager verifies the graph and checks the outputs (1e-4 relative) after every pass
    PassManager(passes=["fuse"], example_inputs=inputs).run(graph)
    graph.verify()
    assert len(graph.nodes) <= len(original.nodes)
    for want, got in zip(expected, interpreter.run(graph, inputs), strict=True):
        scale = max(1.0, float(np.abs(want).max(initial=0.0)))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale)
    # the original (a clone sharing constant arrays) still computes the same outputs
    for want, got in zip(expected, interpreter.run(original, inputs), strict=True):
        np.testing.assert_array_equal(got, want)
    # every surviving node keeps its source; one sweep of the preset reaches a fixpoint
    assert all(n.source for n in graph.nodes)
    assert not any(p.run(graph) for p in resolve_passes(["fuse"]))
