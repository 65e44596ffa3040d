"""IR invariants: use-lists, erase refusal, verifier failures, printer, clone, op table errors."""

import numpy as np
import pytest

from compiler.errors import InputError, OptionError, UnsupportedOpError, VerificationError
from compiler.ir import interpreter
from compiler.ir.graph import Graph
from compiler.ops.table import get_op
from compiler.report import graph_stats


def small_graph():
    g = Graph("small")
    x = g.add_input("x", (1, 3, 8, 8))
    w = g.constant(np.arange(4 * 3 * 9, dtype=np.float32).reshape(4, 3, 3, 3) / 100, "w")
    conv = g.add_node("conv2d", [x, w], {"padding": (1, 1)}, name="conv", meta={"source": "c1"})
    relu = g.add_node("relu", [conv.outputs[0]], name="act")
    pool = g.add_node("adaptive_avg_pool2d", [relu.outputs[0]], name="pool")
    flat = g.add_node("reshape", [pool.outputs[0]], {"shape": (1, 4)}, name="flat")
    g.outputs = [flat.outputs[0]]
    return g


def test_golden_print():
    assert (
        str(small_graph())
        == """graph small(
    %x: float32[1,3,8,8],
) {
  $w: float32[4,3,3,3]
  %conv: float32[1,4,8,8] = conv2d(%x, $w) {dilation=[1, 1], groups=1, padding=[1, 1], stride=[1, 1]}
  %act: float32[1,4,8,8] = relu(%conv)
  %pool: float32[1,4,1,1] = adaptive_avg_pool2d(%act) {output_size=[1, 1]}
  %flat: float32[1,4] = reshape(%pool) {shape=[1, 4]}
  return %flat
}"""
    )


def test_use_lists_follow_rewiring():
    g = small_graph()
    conv, relu = g.node("conv"), g.node("act")
    assert conv.outputs[0].uses == [(relu, 0)]
    g.replace_all_uses(relu.outputs[0], conv.outputs[0])
    assert relu.outputs[0].uses == []
    assert {n.name for n in conv.outputs[0].users} == {"act", "pool"}
    g.erase_node(relu)
    assert conv.outputs[0].uses == [(g.node("pool"), 0)]
    g.verify()


def test_erase_refuses_node_with_users():
    g = small_graph()
    with pytest.raises(VerificationError, match="still read by pool"):
        g.erase_node(g.node("act"))


def test_verify_catches_bad_order_and_stale_shapes():
    g = small_graph()
    g.nodes.reverse()
    with pytest.raises(VerificationError, match="used before it is defined"):
        g.verify()
    g = small_graph()
    g.node("conv").attrs["stride"] = (2, 2)
    with pytest.raises(VerificationError, match="inference gives"):
        g.verify()
    g.reinfer_all()
    g.verify()


def test_clone_is_independent_and_shares_arrays():
    g = small_graph()
    c = g.clone()
    assert str(c) == str(g)
    c.node("conv").attrs["padding"] = (0, 0)
    c.reinfer_all()
    assert g.node("conv").outputs[0].shape == (1, 4, 8, 8)
    assert c.constants()[0].data is g.constants()[0].data
    g.verify()
    c.verify()


def test_clone_leaves_the_source_naming_alone():
    # fresh names in a graph must not depend on how many clones were taken of it before
    g, h = small_graph(), small_graph()
    for _ in range(3):
        g.clone()
    c = g.clone()
    names = [g.add_node("relu", [g.outputs[0]]).name for _ in range(2)]
    assert names == [h.add_node("relu", [h.outputs[0]]).name for _ in range(2)]
    assert [c.add_node("relu", [c.outputs[0]]).name for _ in range(2)] == names


def test_networkx_view():
    nxg = small_graph().to_networkx()
    assert list(nxg.successors("conv")) == ["act"]
    assert nxg.nodes["pool"]["op"] == "adaptive_avg_pool2d"


def test_interpreter_input_checks():
    g = small_graph()
    with pytest.raises(InputError, match="expects shape"):
        interpreter.run(g, [np.zeros((1, 3, 4, 4), np.float32)])
    with pytest.raises(InputError, match="takes 1 input"):
        interpreter.run(g, [])
    out = interpreter.run(g, [np.ones((1, 3, 8, 8), np.float64)])  # same-kind cast is fine
    assert out[0].shape == (1, 4)


def test_op_table_errors():
    with pytest.raises(UnsupportedOpError, match="register it with"):
        get_op("frobnicate")
    g = Graph()
    x = g.add_input("x", (2, 2))
    with pytest.raises(OptionError, match="unknown attribute"):
        g.add_node("relu", [x], {"alpha": 1})
    with pytest.raises(OptionError, match="missing attribute"):
        g.add_node("reshape", [x])


def test_stats_count_params_and_macs():
    s = graph_stats(small_graph())
    assert s.params == 4 * 3 * 9
    assert s.macs == 4 * 8 * 8 * 27 + 4 * 8 * 8  # conv + the pooling's adds
    assert s.weight_bytes == 4 * 3 * 9 * 4
