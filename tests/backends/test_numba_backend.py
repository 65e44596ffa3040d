"""The numba backend, op by op against the reference interpreter; fused epilogues; memory planning;
the saved standalone package; whole torchvision models against torch eager."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.numba.backend import EMITTERS, compile_numba, load_numba
from compiler.errors import BackendError, InputError
from compiler.ir.graph import Graph
from compiler.ir.interpreter import run
from compiler.ops.codebook import pack_indices
from compiler.ops.nn import conv_out_size
from compiler.ops.table import OPS, get_op
from tests.numerics import relative_error
from tests.quant_cases import QDQ_CASES

get_op("relu")  # loads the built-in ops into OPS
import backends.numba.emitters  # noqa: E402,F401  (registers the emitters)

RTOL = 1e-4
rng = np.random.default_rng(0)


def randn(*shape, dtype="float32"):
    return rng.standard_normal(shape).astype(dtype)


def assert_matches(graph: Graph, *inputs: np.ndarray):
    """numba output == reference output: shapes, dtypes, values within RTOL of max|ref|."""
    model = compile_numba(graph)
    got, want = model.run(*inputs), run(graph, inputs)
    assert len(got) == len(want) == len(graph.outputs)
    for value, a, b in zip(graph.outputs, got, want, strict=True):
        assert a.shape == b.shape == value.shape, value.name
        assert a.dtype == np.dtype(value.dtype), value.name
        if a.dtype.kind in "biu":
            np.testing.assert_array_equal(a, b)
        else:
            assert relative_error(a, b) <= RTOL, (value.name, relative_error(a, b))
    return model


def single(op, shapes, attrs=None, consts=(), dtype="float32"):
    """Graph with inputs of ``shapes`` (then constants ``consts``) feeding one ``op`` node."""
    g = Graph(op)
    xs = [g.add_input(f"x{i}", s, dtype) for i, s in enumerate(shapes)]
    cs = [None if c is None else g.constant(c, f"c{i}") for i, c in enumerate(consts)]
    node = g.add_node(op, [*xs, *cs], attrs)
    g.outputs = list(node.outputs)
    return g


# -- op by op: op -> list of (attrs, input shapes, constants, inputs or None) ----------------------

POS = np.abs(randn(2, 3, 4)) + 0.1
UNARY = [
    "relu",
    "hardswish",
    "hardsigmoid",
    "sigmoid",
    "silu",
    "tanh",
    "neg",
    "exp",
    "abs",
    "identity",
    "dropout",
]
CASES: dict[str, list] = {
    **{op: [({}, [(2, 3, 4)], (), [randn(2, 3, 4) * 4])] for op in UNARY},
    **{op: [({}, [(2, 3, 4)], (), [POS])] for op in ["sqrt", "rsqrt", "log"]},
    "gelu": [({"approximate": a}, [(2, 3, 4)], (), None) for a in ("none", "tanh")],
    "clip": [
        ({"min_val": 0.0, "max_val": 6.0}, [(2, 8)], (), [randn(2, 8) * 5]),
        ({"min_val": None, "max_val": 0.5}, [(2, 8)], (), None),
    ],
    "cast": [
        ({"dtype": d}, [(3, 4)], (), [np.round(randn(3, 4) * 3)])
        for d in ("float64", "int32", "bool")
    ],
    **{
        op: [({}, [(2, 1, 4), (3, 1)], (), None), ({}, [(2, 3, 4, 5)], (randn(3, 1, 1),), None)]
        for op in ["add", "sub", "mul", "maximum", "minimum"]
    },
    "div": [({}, [(2, 3), (3,)], (), [randn(2, 3), POS[0, :, 0]])],
    "pow": [({}, [(2, 3)], (np.array([1.0, 2.0, 0.5], "float32"),), [POS[0, :2, :3]])],
    **{
        op: [({}, [(4, 5), (5,)], (), [np.round(randn(4, 5)), np.round(randn(5))])]
        for op in ["eq", "ne", "lt", "gt"]
    },
    "where": [({}, [(3, 1), (4,)], (randn(3, 4),), None)],
    "matmul": [
        ({}, [(2, 1, 3, 4), (5, 4, 6)], (), None),
        ({}, [(3, 4)], (randn(4, 2),), None),
        ({}, [(2, 40, 8), (2, 8, 3)], (), None),
    ],
    "softmax": [({"axis": 1}, [(2, 5, 3)], (), None), ({"axis": -1}, [(4, 7)], (), None)],
    "log_softmax": [({"axis": -1}, [(2, 5, 3)], (), None)],
    "batch_norm": [
        ({"eps": 1e-3}, [(2, 3, 4, 4)], (randn(3), randn(3), randn(3), POS[0, :, 0]), None)
    ],
    "layer_norm": [
        ({"axes": (-1,)}, [(2, 3, 8)], (randn(8), randn(8)), None),
        ({"axes": (-2, -1)}, [(2, 3, 8)], (), None),
        ({"axes": (1,)}, [(2, 3, 8)], (randn(3, 1),), None),
    ],
    "group_norm": [
        ({"groups": 2}, [(2, 4, 3, 3)], (randn(4), randn(4)), None),
        ({"groups": 4, "eps": 1e-3}, [(1, 4, 5)], (), None),
    ],
    "adaptive_avg_pool2d": [
        ({"output_size": s}, [(1, 2, 7, 6)], (), None) for s in [(1, 1), (7, 3), (3, 4)]
    ],
    "adaptive_max_pool2d": [
        ({"output_size": s}, [(1, 2, 8, 6)], (), None) for s in [(1, 1), (3, 5)]
    ],
    "reshape": [({"shape": (4, 6)}, [(2, 3, 4)], (), None)],
    "permute": [
        ({"perm": (2, 0, 1)}, [(2, 3, 4)], (), None),
        ({"perm": (0, 2, 3, 1)}, [(2, 3, 4, 5)], (), None),
        ({"perm": (4, 2, 0, 3, 1)}, [(2, 3, 4, 5, 2)], (), None),
    ],
    "slice": [
        ({"axis": 1, "start": 1, "end": 5, "step": 2}, [(2, 6)], (), None),
        ({"axis": -1, "start": -3, "end": 2**62, "step": 1}, [(2, 6)], (), None),
    ],
    "concat": [({"axis": 1}, [(2, 1), (2, 3)], (randn(2, 2),), None)],
    "split": [({"axis": 1, "sizes": (1, 2, 3)}, [(2, 6)], (), None)],
    "pad": [
        ({"pads": ((0, 0), (1, 2)), "value": 1.5}, [(2, 3)], (), None),
        ({"pads": ((1, -1), (-2, 1))}, [(3, 4)], (), None),
    ],
    "expand": [({"shape": (2, 3, 4)}, [(3, 1)], (), None)],
    "roll": [
        ({"shifts": (1, -2), "axes": (0, 2)}, [(2, 3, 4)], (), None),
        ({"shifts": 5, "axes": 1}, [(2, 3)], (), None),
    ],
    "take": [({"axis": 1}, [(3, 4)], (np.array([[0, -1], [2, 2]]),), None)],
    **QDQ_CASES,
    # 3-bit indices span byte boundaries; two codebook groups (rows of 4 output elements)
    "codebook_lookup": [
        ({"shape": (2, 3, 2), "bits": 3}, [(2, 8)], (pack_indices(np.arange(12) % 8, 3),), None),
        ({"shape": (5, 3), "bits": 4}, [(1, 16)], (pack_indices(np.arange(15), 4),), None),
    ],
    "mean": [
        ({"axes": (1, 2), "keepdims": True}, [(2, 3, 4)], (), None),
        ({"axes": (0, 2)}, [(2, 3, 4)], (), None),
        ({"axes": ()}, [(2, 3)], (), None),
    ],
    "sum": [({"axes": (-1,)}, [(2, 3, 4)], (), None)],
    "norm": [
        ({"axes": (1,), "ord": o}, [(2, 5)], (), None) for o in (2.0, 1.0, 3.0, np.inf, -np.inf)
    ],
    "einsum": [({"equation": "bij,bjk->bik"}, [(2, 3, 4), (2, 4, 5)], (), None)],
}
PARAMS = [
    pytest.param(op, *case, id=f"{op}-{i}")
    for op, cases in CASES.items()
    for i, case in enumerate(cases)
]


@pytest.mark.parametrize("op, attrs, shapes, consts, inputs", PARAMS)
def test_op_matches_reference(op, attrs, shapes, consts, inputs):
    g = single(op, shapes, attrs, consts)
    assert_matches(g, *(inputs or [randn(*s) for s in shapes]))


def test_every_op_has_an_emitter_and_a_test():
    covered = set(CASES) | {"conv2d", "linear", "attention", "max_pool2d", "avg_pool2d"}
    assert set(OPS) <= set(EMITTERS)
    assert set(OPS) <= covered


def test_unknown_op_says_how_to_add_an_emitter(monkeypatch):
    g = single("relu", [(2, 3)])
    monkeypatch.delitem(EMITTERS, "relu")
    with pytest.raises(BackendError, match="emitter"):
        compile_numba(g)


# -- conv2d, linear, attention ---------------------------------------------------------------------

EPILOGUES = [
    (None, None),
    ("relu", None),
    ("clip", {"min_val": 0.0, "max_val": 6.0}),
    ("clip", None),
    ("hardswish", None),
    ("hardsigmoid", None),
    ("silu", None),
    ("sigmoid", None),
    ("tanh", None),
    ("gelu", {"approximate": "tanh"}),
    ("gelu", None),
]


def min_size(kernel: int, dilation: int, padding: int) -> int:
    return max(1, dilation * (kernel - 1) + 1 - 2 * padding)


@st.composite
def conv_cases(draw):
    kind = draw(st.sampled_from(["dense", "grouped", "depthwise", "pointwise"]))
    groups = {
        "dense": 1,
        "pointwise": 1,
        "grouped": draw(st.integers(2, 3)),
        "depthwise": draw(st.integers(2, 4)),
    }[kind]
    cin = groups * (1 if kind == "depthwise" else draw(st.integers(1, 3)))
    cout = groups * draw(st.integers(1, 2))
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


def conv_graph(xshape, wshape, attrs, with_bias, with_residual) -> Graph:
    g = Graph("conv")
    x = g.add_input("x", xshape)
    out = [
        conv_out_size(
            xshape[2 + i],
            wshape[2 + i],
            attrs["stride"][i],
            attrs["padding"][i],
            attrs["dilation"][i],
        )
        for i in range(2)
    ]
    r = g.add_input("r", (xshape[0], wshape[0], *out)) if with_residual else None
    b = g.constant(randn(wshape[0]), "b") if with_bias else None
    g.outputs = [g.add_node("conv2d", [x, g.constant(randn(*wshape), "w"), b, r], attrs).outputs[0]]
    return g


@settings(max_examples=10, deadline=None)
@given(conv_cases())
def test_conv2d(case):
    g = conv_graph(*case)
    assert_matches(g, *[randn(*v.shape) for v in g.inputs])


@pytest.mark.parametrize("act, act_attrs", EPILOGUES)
def test_conv2d_with_fused_epilogue(act, act_attrs):
    attrs = {
        "stride": (2, 2),
        "padding": (1, 1),
        "dilation": (1, 1),
        "groups": 2,
        "activation": act,
        "activation_attrs": act_attrs,
    }
    g = conv_graph((1, 4, 6, 6), (4, 2, 3, 3), attrs, True, True)
    assert_matches(g, randn(1, 4, 6, 6) * 3, randn(1, 4, 3, 3))


def test_conv2d_depthwise_with_multiplier_and_large_tiles():
    attrs = {
        "stride": (1, 1),
        "padding": (2, 2),
        "dilation": (2, 2),
        "groups": 3,
        "activation": "relu",
        "activation_attrs": None,
    }
    assert_matches(
        conv_graph((2, 3, 30, 31), (6, 1, 3, 3), attrs, True, True),
        randn(2, 3, 30, 31),
        randn(2, 6, 30, 31),
    )
    dense = {**attrs, "groups": 1, "padding": (1, 1), "dilation": (1, 1)}
    assert_matches(
        conv_graph((1, 64, 40, 40), (8, 64, 3, 3), dense, True, False), randn(1, 64, 40, 40)
    )


@pytest.mark.parametrize("act, act_attrs", EPILOGUES[:4])
@pytest.mark.parametrize("xshape", [(3, 8), (2, 30, 8)])
def test_linear_with_fused_epilogue(xshape, act, act_attrs):
    g = Graph("linear")
    x, r = g.add_input("x", xshape), g.add_input("r", (*xshape[:-1], 5))
    w, b = g.constant(randn(5, 8), "w"), g.constant(randn(5), "b")
    node = g.add_node("linear", [x, w, b, r], {"activation": act, "activation_attrs": act_attrs})
    g.outputs = [node.outputs[0]]
    assert_matches(g, randn(*xshape), randn(*xshape[:-1], 5))


@pytest.mark.parametrize("m", [1, 7, 20, 300])
def test_linear_kernel_splits_rows_or_columns_among_threads(m):
    """Few rows: blocks of output columns (1003: not whole vectors) per thread; many: rows (300
    rows: two row blocks of the GEMM, the last tile partial). Both kernels: the weight as it is
    (packed per call) and packed at compile time; K = 2048 runs in 8 passes."""
    from backends.numba.kernels import common as K
    from backends.numba.kernels import conv as KC

    x, w, b, r = randn(m, 2048), randn(1003, 2048), randn(1003), randn(m, 1003)
    want = np.maximum(x.astype(np.float64) @ w.T.astype(np.float64) + b + r, 0)
    packed, bias16 = KC.pack_weight(w.reshape(1003, 2048, 1, 1), 1), KC.pack_bias(b, 1003, 1)
    for nthreads in (1, 2, 3):
        out = np.full((m, 1003), np.nan, np.float32)
        KC.linear(x, w, b, r, out, K.RELU, 0.0, 0.0, nthreads)
        assert relative_error(out, want) < 1e-5, nthreads
        out = np.full((m, 1003), np.nan, np.float32)
        KC.linear_packed(x, packed, bias16, r, out, K.RELU, 0.0, 0.0, nthreads)
        assert relative_error(out, want) < 1e-5, nthreads


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gemm_without_blas(dtype):
    """The kernels' GEMM (no BLAS: numba's np.dot needs SciPy) against float64 numpy, on shapes
    around the micro-kernel's sizes (tiles of 5/6 or 7/8 rows, 16 columns, passes of 256 over K)
    and on strided views of both operands; 1-4 rows run row by row (_gemv_block), K = 1001 leaves
    a remainder past its 4 chains."""
    from numba import njit

    from backends.numba.kernels import gemm as G

    @njit
    def both(a, b, bt, c, ct):
        G.gemm(a, b, c)
        G.gemm_t(a, bt, ct)

    rng = np.random.default_rng(0)
    for m, k, n in [(1, 3, 1), (3, 1001, 20), (4, 4, 16), (5, 256, 16), (6, 257, 17), (9, 40, 33),
                    (250, 600, 48)]:
        a = rng.standard_normal((m, 2 * k)).astype(dtype)[:, ::2]
        b = rng.standard_normal((k, n)).astype(dtype)
        c, ct = np.full((m, n), np.nan, dtype), np.full((m, n), np.nan, dtype)
        both(a, b, b.T, c, ct)
        want = a.astype(np.float64) @ b.astype(np.float64)
        assert relative_error(c, want) < 1e-5 and relative_error(ct, want) < 1e-5, (m, k, n)


def test_linear_with_broadcast_bias_and_weight_as_input():
    g = Graph("linear")
    x, w = g.add_input("x", (4, 3, 8)), g.add_input("w", (5, 8))
    b = g.constant(randn(3, 5), "b")
    g.outputs = [g.add_node("linear", [x, w, b], {"activation": "relu"}).outputs[0]]
    assert_matches(g, randn(4, 3, 8), randn(5, 8))


@pytest.mark.parametrize("mask", [None, "bool", "additive", "input"])
@pytest.mark.parametrize("causal", [False, True])
def test_attention(mask, causal):
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
    assert_matches(g, *[randn(*x.shape) for x in g.inputs])


# -- pooling ---------------------------------------------------------------------------------------


@st.composite
def pool_cases(draw):
    op = draw(st.sampled_from(["max_pool2d", "avg_pool2d"]))
    k, s = (tuple(draw(st.integers(1, 3)) for _ in range(2)) for _ in range(2))
    p = tuple(draw(st.integers(0, ki // 2)) for ki in k)
    d = tuple(draw(st.integers(1, 2)) for _ in range(2)) if op == "max_pool2d" else (1, 1)
    attrs = {"kernel": k, "stride": s, "padding": p, "ceil_mode": draw(st.booleans())}
    if op == "max_pool2d":
        attrs["dilation"] = d
    else:
        attrs["count_include_pad"] = draw(st.booleans())
    size = tuple(min_size(k[i], d[i], p[i]) + draw(st.integers(0, 6)) for i in range(2))
    return op, (1, 2, *size), attrs


@settings(max_examples=10, deadline=None)
@given(pool_cases())
def test_pooling(case):
    op, shape, attrs = case
    assert_matches(single(op, [shape], attrs), randn(*shape))


@pytest.mark.parametrize("kernel", [(3, 3), (2, 3), (3, 1), (4, 2)])
def test_max_pool_paths_against_torch(kernel):
    """Every path of the max-pool kernel (the fused 3-row and 3-column loops, stride 2 and any
    other, the general ones) on planes from 1 to 9 wide, with padding, dilation, ceil mode and
    a NaN, which a window must propagate, against torch bit for bit."""
    import torch

    from backends.numba.kernels import conv as KC

    torch_pool = torch.nn.functional.max_pool2d
    rng = np.random.default_rng(0)
    kh, kw = kernel
    checked = 0
    for h in (1, 2, 5, 7, 9):
        for w in (1, 3, 6, 9):
            for s in (1, 2, 3):
                for p in range(kw // 2 + 1):
                    for d in (1, 2):
                        for ceil in (False, True):
                            x = rng.standard_normal((1, 2, h, w), dtype=np.float32)
                            x[0, 1, h // 2, w // 2] = np.nan
                            pads = (min(p, kh // 2), p)
                            try:
                                want = torch_pool(torch.from_numpy(x), kernel, s, pads, d,
                                                  ceil_mode=ceil).numpy()
                            except RuntimeError:  # torch: the output would be empty
                                continue
                            got = np.empty_like(want)
                            KC.max_pool2d(x, got, kh, kw, s, s, *pads, d, d)
                            assert np.array_equal(got, want, equal_nan=True), (
                                kernel, (h, w), s, pads, d, ceil)
                            checked += 1
    assert checked > 100


def test_ceil_mode_pooling_overhang_is_not_counted():
    for op, extra in [("avg_pool2d", {"count_include_pad": True}), ("max_pool2d", {})]:
        attrs = {"kernel": (3, 3), "stride": (2, 2), "padding": (1, 1), "ceil_mode": True, **extra}
        assert_matches(single(op, [(1, 2, 6, 6)], attrs), randn(1, 2, 6, 6))


# -- memory planning -------------------------------------------------------------------------------


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


def test_derived_tables_of_names_that_sanitise_alike_stay_apart():
    """Two convs named 'a/b' and 'a_b' (both 'a_b' once sanitised) keep their own padded bias."""
    g = Graph("names")
    h = g.add_input("x", (1, 4, 6, 6))
    for name in ("a/b", "a_b"):
        w, b = g.constant(randn(4, 4, 3, 3), f"{name}.w"), g.constant(randn(4) * 5, f"{name}.b")
        h = g.add_node("conv2d", [h, w, b], {"padding": (1, 1)}, name=name).outputs[0]
    g.outputs = [h]
    model = assert_matches(g, randn(1, 4, 6, 6))
    prepare = model.source.split("def prepare")[1].split("def forward")[0]
    assert prepare.count("KC.pack_bias(") == 2 and prepare.count("KC.tap_offsets(") == 1


def test_buffers_are_reused_and_results_stay_right():
    g = chain_graph()
    model = assert_matches(g, randn(1, 8, 12, 12))
    one, padded = 8 * 12 * 12 * 4, 8 * 14 * 14 * 4
    # 10 intermediate values of this size, at most 3 alive, and 6 zero-padded conv inputs (the
    # micro-kernel's scratch), one alive at a time
    assert model.peak_bytes <= 3 * one + padded
    assert "Activation memory" in model.source
    x = randn(1, 8, 12, 12)
    first = model.run(x)[0]
    model.run(randn(1, 8, 12, 12))
    np.testing.assert_array_equal(model.run(x)[0], first)  # outputs are copies, buffers reset


def test_source_has_one_kernel_line_per_node():
    g = chain_graph(2)
    body = compile_numba(g).source.split("def forward")[1].split("def load")[0]
    calls = [line for line in body.splitlines() if "= conv2d(" in line or "= add(" in line]
    assert len(calls) == 3 and all("KC.conv2d_planned(" in c or "K.binary(" in c for c in calls)


# -- saved packages --------------------------------------------------------------------------------

# a saved package needs numpy and numba only: torch, SciPy (whose BLAS numba's np.dot calls) and
# this repository are blocked
BLOCK_TORCH = textwrap.dedent("""
    import importlib.abc, sys
    class NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name in ("torch", "scipy") or name.startswith(
                    ("torch.", "scipy.", "compiler", "backends")):
                raise ImportError(f"{name} is blocked in this test")
    sys.meta_path.insert(0, NoTorch())
""")


def package_graph() -> Graph:
    """chain_graph(2), then a linear layer and a matmul: every kind of GEMM a package runs."""
    g = chain_graph(2)
    h = g.outputs[0]
    h = g.add_node("linear", [h, g.constant(randn(6, 8), "fc.w"), g.constant(randn(6), "fc.b")],
                   {"activation": "relu"}).outputs[0]
    g.outputs = [g.add_node("matmul", [h, g.constant(randn(6, 3), "proj")]).outputs[0]]
    return g


def test_saved_package_runs_without_torch_and_checks_inputs(tmp_path):
    g = package_graph()
    model = compile_numba(g)
    x = randn(1, 8, 12, 12)
    want = model.run(x)[0]
    (tmp_path / "pkg").mkdir()  # an existing folder is replaced whole
    (tmp_path / "pkg" / "stale.txt").write_text("old")
    path = model.save(tmp_path / "pkg")
    assert sorted(os.listdir(path)) == sorted(
        ["__init__.py", "model.py", "kernels.py", "kernels_conv.py", "kernels_int8.py",
         "kernels_f32.py", "kernels_f32_tile.py", "kernels_chain.py", "kernels_pointwise.py",
         "kernels_dw.py", "kernels_gemm.py", "runtime.py", "weights.npz"]
    )
    assert [p.name for p in tmp_path.iterdir()] == ["pkg"]  # no temporary folder left behind
    np.save(tmp_path / "x.npy", x)
    script = BLOCK_TORCH + textwrap.dedent(f"""
        import numpy as np
        sys.path.insert(0, {str(tmp_path)!r})
        import pkg
        m = pkg.load({str(path)!r})
        np.save({str(tmp_path / "y.npy")!r}, m.run(np.load({str(tmp_path / "x.npy")!r}))[0])
        for bad in (np.zeros((1, 8, 12, 13), "float32"), np.zeros((1, 8, 12, 12), "complex64")):
            try:
                m.run(bad)
            except pkg.InputError as e:
                print("InputError:", e)
        assert "torch" not in sys.modules and "scipy" not in sys.modules
    """)
    for _ in range(2):  # the second process loads the kernels from the package's numba cache
        done = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp_path,
        )
        assert done.returncode == 0, done.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), want)
    errors = [line for line in done.stdout.splitlines() if line.startswith("InputError")]
    assert "expects shape (1, 8, 12, 12), got (1, 8, 12, 13)" in errors[0] and "Fix:" in errors[0]
    assert "expects dtype float32, got complex64" in errors[1] and ".astype" in errors[1]
    assert list((path / "__pycache__").glob("kernels_f32*.nbi"))  # numba's cache index
    np.testing.assert_array_equal(load_numba(path).run(x)[0], want)


def test_wrong_inputs_raise_clear_errors():
    model = compile_numba(single("relu", [(2, 3)]))
    with pytest.raises(ValueError, match="takes 1 input"):
        model.run()
    with pytest.raises(ValueError, match=r"expects shape \(2, 3\)"):
        model.run(np.zeros((3, 2), "float32"))
    assert model.run(np.zeros((2, 3), "float64"))[0].dtype == np.float32  # same-kind cast


def test_compile_entry_point_checks_inputs():
    import compiler

    cm = compiler.compile(chain_graph(2), backend="numba")
    with pytest.raises(InputError):
        cm(np.zeros((1, 8, 12, 11), "float32"))


# -- whole models ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_torchvision_model_matches_torch(name):
    torch = pytest.importorskip("torch")
    import compiler
    from benchmarks.harness.zoo import build

    model = build(name)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    cm = compiler.compile(model, x, passes=["fuse"], backend="numba")
    with torch.no_grad():
        want = model(x).numpy()
    got = cm(x).numpy()
    assert np.abs(got - want).max() / np.abs(want).max() <= RTOL
    assert "KC.conv2d" in cm.artifact.source
