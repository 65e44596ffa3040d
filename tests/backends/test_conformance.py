"""The conformance suite: every backend (torch, ONNX, numba) against the reference interpreter, op
by op (tests/backends/cases.py) and over the attributes of conv2d, linear, attention and pooling,
on small graphs and on whole models against torch; and the behaviour every compiled model shares
(input checks, the error for a missing emitter, the graph left as it was).

What only one backend has stays in its own file: torch training and export
(test_torch_backend.py), ONNX opsets, files and node structure (test_onnx_backend.py), the numba
kernels, memory plan and saved package (test_numba_*.py).

Outputs are compared with the reference as the per-backend tests did: equal shapes and dtypes,
integers exactly, floats within RTOL of the largest magnitude; that magnitude has a floor of 1e-6
for torch and 1e-2 for ONNX and numba (tests/numerics.py says why).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import backends.numba.emitters  # noqa: F401  (registers the numba emitters)
import backends.numba.kernels.runtime as numba_runtime
import compiler
from backends.numba.backend import EMITTERS as NUMBA_EMITTERS
from backends.numba.backend import compile_numba
from backends.onnx.backend import EMITTERS as ONNX_EMITTERS
from backends.onnx.backend import compile_onnx
from backends.torch.backend import EMITTERS as TORCH_EMITTERS
from backends.torch.backend import compile_torch
from compiler.errors import BackendError, InputError
from compiler.ir.graph import Graph
from compiler.ir.interpreter import run
from compiler.ops.nn import conv_out_size
from compiler.ops.table import OPS, get_op
from tests.backends.cases import (
    EPILOGUES,
    OP_CASES,
    block,
    chain_graph,
    epilogue_id,
    one_node,
    randn,
    small_cnn,
)
from tests.numerics import relative_error

get_op("relu")  # loads the built-in ops into OPS

BACKENDS = ["torch", "onnx", "numba"]
pytestmark = pytest.mark.parametrize("backend", BACKENDS)

RTOL = 1e-4
SCALE_FLOOR = {"torch": 1e-6, "onnx": 1e-2, "numba": 1e-2}
EMITTERS = {"torch": TORCH_EMITTERS, "onnx": ONNX_EMITTERS, "numba": NUMBA_EMITTERS}
COMPILERS = {"torch": compile_torch, "onnx": compile_onnx, "numba": compile_numba}
# the error a compiled model raises for wrong inputs (a saved numba package has its own, which
# needs nothing but numpy)
INPUT_ERRORS = {"torch": InputError, "onnx": InputError, "numba": numba_runtime.InputError}


def compile_graph(backend: str, graph: Graph) -> Callable[..., list[np.ndarray]]:
    """``graph`` compiled by ``backend``, as a function from numpy inputs to numpy outputs."""
    model = COMPILERS[backend](graph)
    if backend != "torch":
        return model.run

    def run_module(*inputs: np.ndarray) -> list[np.ndarray]:
        with torch.no_grad():
            out = model(*inputs)
        # detached: a constant output is the module's parameter itself
        return [o.detach().numpy() for o in (out if isinstance(out, tuple) else (out,))]

    return run_module


def assert_matches(backend: str, graph: Graph, *inputs: np.ndarray) -> None:
    """The backend's outputs equal the reference's: shapes and dtypes, integers exactly, floats
    within RTOL of the largest finite magnitude (equal infinities and NaNs count as equal)."""
    got, want = compile_graph(backend, graph)(*inputs), run(graph, inputs)
    assert len(got) == len(want) == len(graph.outputs)
    for value, a, b in zip(graph.outputs, got, want, strict=True):
        assert a.shape == b.shape == value.shape, value.name
        assert a.dtype == np.dtype(value.dtype), value.name
        if a.dtype.kind in "biu":
            np.testing.assert_array_equal(a, b)
        else:
            error = relative_error(a, b, floor=SCALE_FLOOR[backend])
            assert error <= RTOL, (value.name, error)


def check_op(backend: str, op: str, arrays, attrs=None, const=()) -> None:
    """``op`` run once on ``arrays`` (those at the positions in ``const`` constants) matches."""
    graph, inputs = one_node(op, arrays, attrs, const)
    assert_matches(backend, graph, *inputs)


# -- op by op -------------------------------------------------------------------------------------


def test_every_op_has_an_emitter_and_a_case(backend):
    assert set(OPS) <= set(EMITTERS[backend])
    assert {op for op, *_ in OP_CASES.values()} == set(OPS)


@pytest.mark.parametrize("case", list(OP_CASES))
def test_op_matches_reference(backend, case):
    check_op(backend, *OP_CASES[case])


@st.composite
def broadcast_pairs(draw):
    rank = draw(st.integers(0, 4))
    full = [draw(st.integers(1, 4)) for _ in range(rank)]
    a = [1 if draw(st.booleans()) else d for d in full]
    b = [1 if draw(st.booleans()) else d for d in full][draw(st.integers(0, rank)) :]
    return draw(st.sampled_from(["add", "sub", "mul", "maximum", "minimum", "lt"])), a, b


@settings(max_examples=15, deadline=None)
@given(broadcast_pairs())
def test_elementwise_broadcasting(backend, case):
    op, a, b = case
    check_op(backend, op, [randn(*a), randn(*b)])


# -- conv2d ---------------------------------------------------------------------------------------


def min_size(kernel: int, dilation: int, padding: int) -> int:
    """Smallest input size that fits one window."""
    return max(1, dilation * (kernel - 1) + 1 - 2 * padding)


def conv_graph(xshape, wshape, attrs, with_bias, with_residual) -> Graph:
    g = Graph("conv")
    x = g.add_input("x", xshape)
    out = [
        conv_out_size(
            xshape[2 + i],
            wshape[2 + i],
            attrs.get("stride", (1, 1))[i],
            attrs.get("padding", (0, 0))[i],
            attrs.get("dilation", (1, 1))[i],
        )
        for i in range(2)
    ]
    r = g.add_input("r", (xshape[0], wshape[0], *out)) if with_residual else None
    b = g.constant(randn(wshape[0]), "b") if with_bias else None
    g.outputs = [g.add_node("conv2d", [x, g.constant(randn(*wshape), "w"), b, r], attrs).outputs[0]]
    return g


@st.composite
def conv_cases(draw):
    """Dense, grouped, depthwise (with a channel multiplier) and pointwise convs over strides,
    paddings, dilations and fused epilogues, with or without a bias and a residual input."""
    kind = draw(st.sampled_from(["dense", "grouped", "depthwise", "pointwise"]))
    groups = {
        "dense": 1,
        "pointwise": 1,
        "grouped": draw(st.integers(2, 3)),
        "depthwise": draw(st.integers(1, 4)),
    }[kind]
    cin = groups * (1 if kind == "depthwise" else draw(st.integers(1, 3)))
    cout = groups * draw(st.integers(1, 3))
    k, s, d, p = (
        tuple(draw(st.integers(lo, hi)) for _ in range(2))
        for lo, hi in [(1, 3), (1, 3), (1, 2), (0, 2)]
    )
    if kind == "pointwise":
        k, s, p = (1, 1), (1, 1), (0, 0)
    size = tuple(min_size(k[i], d[i], p[i]) + draw(st.integers(0, 5)) for i in range(2))
    act, act_attrs = draw(st.sampled_from(EPILOGUES))
    attrs = {
        "stride": s,
        "padding": p,
        "dilation": d,
        "groups": groups,
        "activation": act,
        "activation_attrs": act_attrs,
    }
    return (
        (draw(st.integers(1, 2)), cin, *size),
        (cout, cin // groups, *k),
        attrs,
        draw(st.booleans()),
        draw(st.booleans()),
    )


@settings(max_examples=15, deadline=None)
@given(conv_cases())
def test_conv2d(backend, case):
    g = conv_graph(*case)
    assert_matches(backend, g, *[randn(*v.shape) for v in g.inputs])


# the layouts of the fused-epilogue cases: dense with stride (2, 1), and grouped
CONV_EPILOGUE_LAYOUTS = {
    "dense": ((2, 4, 6, 6), (4, 4, 3, 3), {"stride": (2, 1), "padding": (1, 1)}, 1.0),
    "grouped": (
        (1, 4, 6, 6),
        (4, 2, 3, 3),
        {"stride": (2, 2), "padding": (1, 1), "dilation": (1, 1), "groups": 2},
        3.0,
    ),
}


@pytest.mark.parametrize("epilogue", EPILOGUES, ids=epilogue_id)
@pytest.mark.parametrize("layout", list(CONV_EPILOGUE_LAYOUTS))
def test_conv2d_with_fused_epilogue(backend, layout, epilogue):
    xshape, wshape, attrs, scale = CONV_EPILOGUE_LAYOUTS[layout]
    attrs = {**attrs, "activation": epilogue[0], "activation_attrs": epilogue[1]}
    g = conv_graph(xshape, wshape, attrs, True, True)
    assert_matches(backend, g, randn(*xshape) * scale, randn(*g.inputs[1].shape))


def test_conv2d_depthwise_with_multiplier_and_large_tiles(backend):
    attrs = {
        "stride": (1, 1),
        "padding": (2, 2),
        "dilation": (2, 2),
        "groups": 3,
        "activation": "relu",
        "activation_attrs": None,
    }
    assert_matches(
        backend,
        conv_graph((2, 3, 30, 31), (6, 1, 3, 3), attrs, True, True),
        randn(2, 3, 30, 31),
        randn(2, 6, 30, 31),
    )
    dense = {**attrs, "groups": 1, "padding": (1, 1), "dilation": (1, 1)}
    assert_matches(
        backend,
        conv_graph((1, 64, 40, 40), (8, 64, 3, 3), dense, True, False),
        randn(1, 64, 40, 40),
    )


# -- linear and attention -------------------------------------------------------------------------

# input shape, weight shape, with a bias
LINEAR_EPILOGUE_LAYOUTS = {
    "2d": ((3, 8), (5, 8), True),
    "3d": ((2, 3, 8), (5, 8), True),
    "3d-many-rows": ((2, 30, 8), (5, 8), True),
    "2d-no-bias": ((3, 5), (4, 5), False),
}


@pytest.mark.parametrize("epilogue", EPILOGUES, ids=epilogue_id)
@pytest.mark.parametrize("layout", list(LINEAR_EPILOGUE_LAYOUTS))
def test_linear_with_fused_epilogue(backend, layout, epilogue):
    xshape, wshape, with_bias = LINEAR_EPILOGUE_LAYOUTS[layout]
    rshape = (*xshape[:-1], wshape[0])
    g = Graph("linear")
    x, r = g.add_input("x", xshape), g.add_input("r", rshape)
    w = g.constant(randn(*wshape), "w")
    b = g.constant(randn(wshape[0]), "b") if with_bias else None
    attrs = {"activation": epilogue[0], "activation_attrs": epilogue[1]}
    g.outputs = [g.add_node("linear", [x, w, b, r], attrs).outputs[0]]
    assert_matches(backend, g, randn(*xshape), randn(*rshape))


@pytest.mark.parametrize("mask", [None, "bool", "additive", "input"])
@pytest.mark.parametrize("causal", [False, True])
def test_attention(backend, mask, causal):
    g = Graph("attention")
    q, k, v = (g.add_input(n, (2, 3, 5, 4)) for n in "qkv")
    m = None
    if mask == "bool":
        m = g.constant(np.triu(np.ones((5, 5), bool), -1) | np.eye(5, dtype=bool), "mask")
    elif mask == "additive":
        m = g.constant(randn(1, 1, 5, 5), "mask")
    elif mask == "input":
        m = g.add_input("m", (3, 5, 5))
    node = g.add_node("attention", [q, k, v, m], {"causal": causal, "scale": 0.3 if mask else None})
    g.outputs = [node.outputs[0]]
    assert_matches(backend, g, *[randn(*x.shape) for x in g.inputs])


# -- pooling --------------------------------------------------------------------------------------


@st.composite
def pool_cases(draw):
    op = draw(st.sampled_from(["max_pool2d", "avg_pool2d"]))
    k, s = (tuple(draw(st.integers(1, 3)) for _ in range(2)) for _ in range(2))
    p = tuple(draw(st.integers(0, ki // 2)) for ki in k)  # torch's limit
    d = tuple(draw(st.integers(1, 2)) for _ in range(2)) if op == "max_pool2d" else (1, 1)
    attrs = {"kernel": k, "stride": s, "padding": p, "ceil_mode": draw(st.booleans())}
    if op == "max_pool2d":
        attrs["dilation"] = d
    else:
        attrs["count_include_pad"] = draw(st.booleans())
    size = tuple(min_size(k[i], d[i], p[i]) + draw(st.integers(0, 6)) for i in range(2))
    return op, (draw(st.integers(1, 2)), draw(st.integers(2, 3)), *size), attrs


@settings(max_examples=15, deadline=None)
@given(pool_cases())
def test_pooling(backend, case):
    op, shape, attrs = case
    check_op(backend, op, [randn(*shape)], attrs)


@pytest.mark.parametrize("count_include_pad", [False, True])
@pytest.mark.parametrize("size, kernel, stride, overhang", [(5, 2, 3, False), (6, 3, 2, True)])
def test_ceil_mode_pooling_overhang_is_not_counted(
    backend, size, kernel, stride, overhang, count_include_pad
):
    # (5, 2, 3): plain ceil gives 3 windows but the third starts in the padding, so torch keeps 2;
    # (6, 3, 2): the last window hangs past the padding, which torch does not count
    assert conv_out_size(size, kernel, stride, 1, 1, True) == (4 if overhang else 2)
    attrs = {
        "kernel": (kernel, kernel),
        "stride": (stride, stride),
        "padding": (1, 1),
        "ceil_mode": True,
    }
    for op, extra in [
        ("avg_pool2d", {"count_include_pad": count_include_pad}),
        ("max_pool2d", {"dilation": (1, 1)}),
    ]:
        check_op(backend, op, [randn(1, 2, size, size)], {**attrs, **extra})


def test_max_pool_window_of_only_padding_is_minus_inf(backend):
    # H=1, dilation 2, padding 1: the one window reads rows -1 and 1, both padding (torch: -inf)
    attrs = {"kernel": (2, 1), "padding": (1, 0), "dilation": (2, 1)}
    graph, inputs = one_node("max_pool2d", [randn(1, 2, 1, 1)], attrs)
    assert_matches(backend, graph, *inputs)
    assert np.all(compile_graph(backend, graph)(*inputs)[0] == -np.inf)


# -- small graphs ---------------------------------------------------------------------------------


def test_small_cnn_with_two_outputs(backend):
    g = small_cnn()
    g.verify()
    assert_matches(backend, g, randn(1, 3, 9, 9))


def test_outputs_that_alias_inputs_or_repeat(backend):
    g = Graph("alias")
    x = g.add_input("x", (2, 3))
    y = g.add_node("relu", [x]).outputs[0]
    g.outputs = [x, y, y, g.constant(np.ones(2, "float32"), "ones")]
    assert_matches(backend, g, randn(2, 3))


def test_compile_does_not_mutate_the_graph(backend):
    g = small_cnn()
    before = str(g)
    COMPILERS[backend](g)
    assert str(g) == before


# -- errors ---------------------------------------------------------------------------------------


def test_wrong_inputs_raise_clear_errors(backend):
    graph, _ = one_node("relu", [randn(2, 3)])
    model = compile_graph(backend, graph)
    with pytest.raises(INPUT_ERRORS[backend], match="takes 1 input"):
        model()
    # (batch, 3) where the model takes any batch (ONNX's symbolic dim)
    with pytest.raises(INPUT_ERRORS[backend], match=r"expects shape \((2|batch), 3\)"):
        model(np.zeros((3, 2), "float32"))
    assert model(np.zeros((2, 3), "float64"))[0].dtype == np.float32  # same-kind cast


def test_compile_entry_point_checks_inputs(backend):
    compiled = compiler.compile(chain_graph(2), backend=backend)
    with pytest.raises(InputError):
        compiled(np.zeros((1, 8, 12, 11), "float32"))


# what each backend's message says to do about a missing emitter
EMITTER_HINTS = {
    "torch": ["EMITTERS", "emitter('relu')"],
    "onnx": ["EMITTERS['relu']", "backends/onnx/emitters.py"],
    "numba": ["emitter('relu')"],
}


def test_missing_emitter_names_op_node_and_fix(backend, monkeypatch):
    graph, _ = one_node("relu", [randn(2, 3)])
    monkeypatch.delitem(EMITTERS[backend], "relu")
    with pytest.raises(BackendError) as info:
        COMPILERS[backend](graph)
    message = str(info.value)
    assert "no emitter for op 'relu'" in message and f"node '{graph.nodes[0].name}'" in message
    assert all(hint in message for hint in EMITTER_HINTS[backend]), message


# -- whole models against torch -------------------------------------------------------------------


def test_small_model_through_compile_matches_torch(backend):
    model, x = block()
    compiled = compiler.compile(model, x, passes=["fuse"], backend=backend)
    with torch.no_grad():
        want = model(x).numpy()
    assert relative_error(np.asarray(compiled(x.numpy())), want) <= RTOL


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_torchvision_model_matches_torch(backend, name):
    from benchmarks.harness.zoo import build

    model = build(name)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    compiled = compiler.compile(model, x, passes=["fuse"], backend=backend)
    with torch.no_grad():
        want = model(x).numpy()
    got = np.asarray(compiled(x.numpy()))
    assert np.abs(got - want).max() / np.abs(want).max() <= RTOL
    if backend == "numba":  # the convs run in the conv kernel, not a fallback
        assert "KC.conv2d" in compiled.artifact.source
