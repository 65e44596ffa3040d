"""Any batch: where the batch flows (backends/batch.py), and every backend running batches other
than the traced one against the reference interpreter, or naming the node that mixes samples."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backends.batch import batch_flow, rebatch, reshape_batch
from backends.numba.backend import compile_numba
from backends.onnx.backend import compile_onnx
from backends.torch.backend import compile_torch
from compiler.errors import InputError
from compiler.ir.graph import Graph
from compiler.ir.interpreter import run
from tests.backends.cases import randn, small_cnn
from tests.numerics import relative_error

COMPILERS = {"torch": compile_torch, "onnx": compile_onnx, "numba": compile_numba}


def token_graph() -> Graph:
    """Traced at batch 1: a class token joined to the samples (ViT), rows of (L * B, E) as
    nn.MultiheadAttention makes them, windows folded into the batch (Swin), a slice of one token."""
    g = Graph("tokens")
    x = g.add_input("x", (1, 6, 4))
    h = g.add_node("linear", [x, g.constant(randn(4, 4), "embed.weight")]).outputs[0]
    token = g.constant(randn(1, 1, 4), "class_token")
    h = g.add_node("concat", [token, h], {"axis": 1}, name="join").outputs[0]  # (1, 7, 4)
    t = g.add_node("permute", [h], {"perm": (1, 0, 2)}).outputs[0]  # (7, 1, 4): (L, B, E)
    rows = g.add_node("reshape", [t], {"shape": (7, 4)}, name="rows").outputs[0]  # (L * B, E)
    rows = g.add_node("linear", [rows, g.constant(randn(4, 4), "proj.weight")]).outputs[0]
    t = g.add_node("reshape", [rows], {"shape": (7, 1, 4)}).outputs[0]
    h = g.add_node("permute", [t], {"perm": (1, 0, 2)}).outputs[0]  # (1, 7, 4)
    body = g.add_node("slice", [h], {"axis": 1, "start": 1, "end": 7}).outputs[0]  # (1, 6, 4)
    win = g.add_node("reshape", [body], {"shape": (2, 3, 4)}, name="windows").outputs[0]
    win = g.add_node("softmax", [win], {"axis": 1}).outputs[0]  # within each window
    body = g.add_node("reshape", [win], {"shape": (1, 6, 4)}).outputs[0]
    first = g.add_node("slice", [h], {"axis": 1, "start": 0, "end": 1}).outputs[0]
    g.outputs = [g.add_node("reshape", [first], {"shape": (1, 4)}).outputs[0], body]
    g.verify()
    return g


def mixing_graph() -> Graph:
    """The samples of a batch summed together: no other batch is the same computation."""
    g = Graph("mixing")
    x = g.add_input("x", (2, 3))
    y = g.add_node("relu", [x]).outputs[0]
    g.outputs = [g.add_node("sum", [y], {"axes": (0,), "keepdims": True}, name="pool").outputs[0]]
    return g


def per_sample(graph: Graph, x: np.ndarray) -> list[np.ndarray]:
    """The graph run on each sample alone (the oracle for a batch-1 graph)."""
    runs = [run(graph, [x[i : i + 1]]) for i in range(len(x))]
    axes = [batch_flow(graph).axis(v) for v in graph.outputs]
    return [np.concatenate([r[k] for r in runs], axis=a) for k, a in enumerate(axes)]


def test_the_batch_flows_through_folds_and_interleaved_rows():
    g = token_graph()
    flow = batch_flow(g)
    assert flow.dynamic and flow.traced == 1
    by_name = {v.name: flow.batch(v) for n in g.nodes for v in n.outputs}
    assert by_name["join"] == (0, 1, 1)  # the token repeated for every sample
    assert by_name["rows"] == (0, 7, 1)  # row l * B + b: the batch inside the rows
    assert by_name["windows"] == (0, 1, 2)  # two windows per sample
    assert flow.repeats[id(g.node("join"))] == [0]


def test_reshape_keeps_the_batch_only_where_samples_stay_whole():
    assert reshape_batch((1, 512, 1, 1), (1, 512), (0, 1, 1)) == (0, 1, 1)
    assert reshape_batch((1, 8), (1, 1, 8), (0, 1, 1)) == (0, 1, 1)  # the axis it had
    assert reshape_batch((3, 4, 6), (3, 24), (0, 1, 1)) == (0, 1, 1)
    assert reshape_batch((3, 4, 6), (12, 6), (0, 1, 1)) == (0, 1, 4)
    assert reshape_batch((2, 3), (3, 2), (0, 1, 1)) is None  # cuts the samples apart


def test_mixing_is_named():
    flow = batch_flow(mixing_graph())
    assert not flow.dynamic
    assert (
        "node 'pool' (sum)" in flow.why_static() and "reduces over the batch" in flow.why_static()
    )
    with pytest.raises(InputError, match="node 'pool'"):
        rebatch(mixing_graph(), 3)


def test_rebatch_is_the_graph_run_per_sample():
    g = token_graph()
    x = randn(3, 6, 4)
    for got, want in zip(run(rebatch(g, 3), [x]), per_sample(g, x), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", list(COMPILERS))
@pytest.mark.parametrize("make", [small_cnn, token_graph], ids=["cnn", "tokens"])
def test_backends_run_any_batch(backend, make):
    g = make()
    model = COMPILERS[backend](g)
    for n in (1, 2, 5):
        x = randn(n, *g.inputs[0].shape[1:])
        want = run(rebatch(g, n), [x])
        if backend == "torch":
            with torch.no_grad():
                got = model(x)
            got = [t.numpy() for t in (got if isinstance(got, tuple) else (got,))]
        else:
            got = model.run(x)
        for a, b in zip(got, want, strict=True):
            assert a.shape == b.shape
            assert relative_error(a, b) <= 1e-4


def test_numba_chunks_are_the_compiled_batch_exactly():
    g = small_cnn()
    model = compile_numba(g)
    x = randn(3, *g.inputs[0].shape[1:])
    got = model.run(x)
    for i in range(3):  # each sample computed as in a run of one
        for a, b in zip(got, model.run(x[i : i + 1]), strict=True):
            np.testing.assert_array_equal(a[i : i + 1], b)


@pytest.mark.parametrize("backend", list(COMPILERS))
def test_a_graph_that_mixes_samples_keeps_its_batch(backend):
    g = mixing_graph()
    model = COMPILERS[backend](g)
    x = randn(2, 3)
    want = run(g, [x])[0]
    got = model(x) if backend == "torch" else model.run(x)[0]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)
    error = model.input_error if backend == "numba" else InputError
    with pytest.raises(error, match=r"node 'pool' \(sum\)"):
        model(randn(3, 3)) if backend == "torch" else model.run(randn(3, 3))


def test_onnx_batch_dims_and_shape_constants():
    proto = compile_onnx(token_graph()).model
    dims = lambda t: [d.dim_param or d.dim_value for d in t.type.tensor_type.shape.dim]  # noqa: E731
    assert [dims(t) for t in proto.graph.input] == [["batch", 6, 4]]
    assert [dims(t) for t in proto.graph.output] == [["batch", 4], ["batch", 6, 4]]
    assert "Expand" in {n.op_type for n in proto.graph.node}  # the class token, to the batch
    static = compile_onnx(mixing_graph()).model
    assert [dims(t) for t in static.graph.input] == [[2, 3]]
    props = {p.key: p.value for p in static.metadata_props}
    assert "node 'pool' (sum)" in props["slimgraph.static_batch"]
    fixed = compile_onnx(token_graph(), dynamic_batch=False)
    assert [dims(t) for t in fixed.model.graph.input] == [[1, 6, 4]]
    with pytest.raises(InputError, match="dynamic_batch=False"):
        fixed.run(randn(2, 6, 4))


def test_torch_expands_a_class_token_traced_at_batch_two():
    g = Graph("expand")  # the token expanded to the traced batch 2, then joined
    x = g.add_input("x", (2, 3, 4))
    token = g.add_node("expand", [g.constant(randn(1, 1, 4), "token")], {"shape": (2, 1, 4)})
    both = g.add_node("concat", [token.outputs[0], x], {"axis": 1}).outputs[0]
    g.outputs = [both]
    for backend in COMPILERS:
        model = COMPILERS[backend](g)
        x3 = randn(3, 3, 4)
        got = model(x3).detach().numpy() if backend == "torch" else model.run(x3)[0]
        np.testing.assert_allclose(got, run(rebatch(g, 3), [x3])[0], rtol=1e-6)
