"""The ONNX backend, op by op against the reference interpreter, plus checker, save and errors."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import backends.onnx.backend as onnx_backend
from backends.onnx.backend import (
    EMITTERS,
    MAX_OPSET,
    MIN_OPSET,
    OnnxModel,
    compile_onnx,
    emit_onnx,
)
from compiler.errors import BackendError, InputError, OptionError
from compiler.ir.graph import Graph
from compiler.ir.interpreter import run
from compiler.ops.codebook import pack_indices
from compiler.ops.nn import conv_out_size
from compiler.ops.table import OPS, get_op
from tests.numerics import relative_error
from tests.quant_cases import QDQ_CASES

get_op("relu")  # loads the built-in ops into OPS
RTOL = 1e-4
rng = np.random.default_rng(0)


def randn(*shape, dtype="float32"):
    return rng.standard_normal(shape).astype(dtype)


def assert_matches(graph: Graph, *inputs: np.ndarray, **options) -> OnnxModel:
    """ORT output == reference output: same shapes and dtypes, values within RTOL of max|ref|."""
    model = compile_onnx(graph, **options)
    got, want = model.run(*inputs), run(graph, inputs)
    assert len(got) == len(want) == len(graph.outputs)
    for value, a, b in zip(graph.outputs, got, want, strict=True):
        assert a.shape == b.shape == value.shape, value.name
        assert a.dtype == np.dtype(value.dtype), value.name
        if a.dtype.kind in "biu":
            np.testing.assert_array_equal(a, b)
        else:
            assert relative_error(a, b) <= RTOL, value.name
    return model


def single(op, shapes, attrs=None, consts=(), dtype="float32"):
    """Graph with inputs of ``shapes`` (then constants ``consts``) feeding one ``op`` node."""
    g = Graph(op)
    xs = [g.add_input(f"x{i}", s, dtype) for i, s in enumerate(shapes)]
    cs = [None if c is None else g.constant(c, f"c{i}") for i, c in enumerate(consts)]
    node = g.add_node(op, [*xs, *cs], attrs)
    g.outputs = list(node.outputs)
    return g


def check_single(op, shapes, attrs=None, consts=(), inputs=None, **options):
    g = single(op, shapes, attrs, consts)
    return assert_matches(g, *(inputs or [randn(*s) for s in shapes]), **options)


# -- per-op cases: op -> list of (attrs, shapes, constants, inputs or None) -----------------------

POS = np.abs(randn(2, 3, 4)) + 0.1
CASES: dict[str, list] = {
    **{
        op: [({}, [(2, 3, 4)], (), None)]
        for op in [
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
    },
    **{op: [({}, [(2, 3, 4)], (), [POS])] for op in ["sqrt", "rsqrt", "log"]},
    "gelu": [
        ({"approximate": "none"}, [(2, 3, 4)], (), None),
        ({"approximate": "tanh"}, [(2, 3, 4)], (), None),
    ],
    "clip": [
        ({"min_val": 0.0, "max_val": 6.0}, [(2, 8)], (), [randn(2, 8) * 5]),
        ({"min_val": None, "max_val": 0.5}, [(2, 8)], (), None),
        ({"min_val": -0.5, "max_val": None}, [(2, 8)], (), None),
    ],
    "cast": [
        ({"dtype": "float64"}, [(3, 4)], (), None),
        ({"dtype": "int32"}, [(3, 4)], (), [randn(3, 4) * 10]),
        ({"dtype": "bool"}, [(3, 4)], (), [np.round(randn(3, 4))]),
    ],
    **{
        op: [
            ({}, [(2, 1, 4), (3, 1)], (), None),
            ({}, [(2, 3)], (randn(3).astype("float64"),), None),
        ]
        for op in ["add", "sub", "mul", "maximum", "minimum"]
    },
    "div": [({}, [(2, 3), (3,)], (), [randn(2, 3), POS[0, :, 0]])],
    "pow": [({}, [(2, 3)], (np.array([1.0, 2.0, 0.5], "float32"),), [POS[0, :2, :3]])],
    **{
        op: [({}, [(4, 5), (5,)], (), [np.round(randn(4, 5)), np.round(randn(5))])]
        for op in ["eq", "ne", "lt", "gt"]
    },
    "where": [({}, [(3, 1), (4,)], (randn(3, 4),), None)],
    "matmul": [({}, [(2, 1, 3, 4), (5, 4, 6)], (), None), ({}, [(3, 4)], (randn(4, 2),), None)],
    "softmax": [({"axis": 1}, [(2, 5, 3)], (), None)],
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
        ({"output_size": s}, [(1, 2, 7, 6)], (), None) for s in [(1, 1), (7, 3), (3, 4), (5, 6)]
    ],
    "adaptive_max_pool2d": [
        ({"output_size": s}, [(1, 2, 8, 6)], (), None) for s in [(1, 1), (4, 2), (3, 5)]
    ],
    "reshape": [({"shape": (4, 6)}, [(2, 3, 4)], (), None)],
    "permute": [({"perm": (2, 0, 1)}, [(2, 3, 4)], (), None)],
    "slice": [
        ({"axis": 1, "start": 1, "end": 5, "step": 2}, [(2, 6)], (), None),
        ({"axis": -1, "start": -3, "end": 2**62, "step": 1}, [(2, 6)], (), None),
    ],
    "concat": [({"axis": 1}, [(2, 1), (2, 3)], (randn(2, 2),), None)],
    "split": [
        ({"axis": 1, "sizes": (1, 2, 3)}, [(2, 6)], (), None),
        ({"axis": 0, "sizes": (2,)}, [(2, 6)], (), None),
    ],
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
        ({"axes": ()}, [(2, 3)], (), None),
    ],
    "sum": [({"axes": (-1,)}, [(2, 3, 4)], (), None)],
    "norm": [
        ({"axes": (1,), "ord": o}, [(2, 5)], (), None) for o in (2.0, 1.0, 3.0, np.inf, -np.inf)
    ],
    "einsum": [
        ({"equation": "bij,bjk->bik"}, [(2, 3, 4), (2, 4, 5)], (), None),
        ({"equation": "ij->ji"}, [(3, 4)], (), None),
    ],
}
PARAMS = [
    pytest.param(op, *case, id=f"{op}-{i}")
    for op, cases in CASES.items()
    for i, case in enumerate(cases)
]


@pytest.mark.parametrize("op, attrs, shapes, consts, inputs", PARAMS)
def test_op_matches_reference(op, attrs, shapes, consts, inputs):
    check_single(op, shapes, attrs, consts, inputs)


def test_every_op_has_an_emitter_and_a_test():
    covered = set(CASES) | {"conv2d", "linear", "attention", "max_pool2d", "avg_pool2d"}
    assert set(OPS) <= set(EMITTERS)
    assert set(OPS) <= covered


@pytest.mark.parametrize("opset", [MIN_OPSET, MAX_OPSET])
def test_every_op_at_the_ends_of_the_opset_range(opset):
    for param in PARAMS:
        op, attrs, shapes, consts, inputs = param.values
        model = check_single(op, shapes, attrs, consts, inputs, opset=opset)
        assert model.model.opset_import[0].version == opset


def test_gelu_below_opset_20_uses_erf_and_tanh():
    ops = {
        a: {
            n.op_type
            for n in compile_onnx(
                single("gelu", [(4,)], {"approximate": a}), opset=18
            ).model.graph.node
        }
        for a in ("none", "tanh")
    }
    assert "Erf" in ops["none"] and "Tanh" in ops["tanh"] and "Gelu" not in ops["none"]


# -- conv2d, linear, attention --------------------------------------------------------------------

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


def min_size(kernel: int, dilation: int, padding: int) -> int:
    """Smallest input size that fits one window."""
    return max(1, dilation * (kernel - 1) + 1 - 2 * padding)


@st.composite
def conv_cases(draw):
    kind = draw(st.sampled_from(["dense", "grouped", "depthwise"]))
    groups = (
        1
        if kind == "dense"
        else draw(st.integers(2, 3) if kind == "grouped" else st.integers(1, 4))
    )
    cin = groups * (1 if kind == "depthwise" else draw(st.integers(1, 3)))
    cout = groups * draw(st.integers(1, 2))
    k, s, d, p = (
        tuple(draw(st.integers(lo, hi)) for _ in range(2))
        for lo, hi in [(1, 3), (1, 3), (1, 2), (0, 2)]
    )
    size = tuple(min_size(k[i], d[i], p[i]) + draw(st.integers(0, 5)) for i in range(2))
    attrs = {"stride": s, "padding": p, "dilation": d, "groups": groups}
    act, act_attrs = draw(st.sampled_from(EPILOGUES))
    attrs.update(activation=act, activation_attrs=act_attrs)
    return (
        (draw(st.integers(1, 2)), cin, *size),
        (cout, cin // groups, *k),
        attrs,
        draw(st.booleans()),
        draw(st.booleans()),
    )


@settings(max_examples=15, deadline=None)
@given(conv_cases())
def test_conv2d(case):
    xshape, wshape, attrs, with_bias, with_residual = case
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
    conv = g.add_node("conv2d", [x, g.constant(randn(*wshape), "w"), b, r], attrs)
    g.outputs = [conv.outputs[0]]
    assert_matches(g, *[randn(*v.shape) for v in g.inputs])


@pytest.mark.parametrize("act, act_attrs", EPILOGUES)
def test_conv2d_with_fused_epilogue(act, act_attrs):
    g = Graph("conv")
    x, r = g.add_input("x", (1, 4, 6, 6)), g.add_input("r", (1, 4, 3, 3))
    w, b = g.constant(randn(4, 2, 3, 3), "w"), g.constant(randn(4), "b")
    attrs = {
        "stride": (2, 2),
        "padding": (1, 1),
        "groups": 2,
        "activation": act,
        "activation_attrs": act_attrs,
    }
    g.outputs = [g.add_node("conv2d", [x, w, b, r], attrs).outputs[0]]
    assert_matches(g, randn(1, 4, 6, 6) * 3, randn(1, 4, 3, 3))


@pytest.mark.parametrize("act, act_attrs", EPILOGUES)
@pytest.mark.parametrize("xshape", [(3, 8), (2, 3, 8)])
def test_linear_with_fused_epilogue(xshape, act, act_attrs):
    g = Graph("linear")
    x, r = g.add_input("x", xshape), g.add_input("r", (*xshape[:-1], 5))
    w, b = g.constant(randn(5, 8), "w"), g.constant(randn(5), "b")
    node = g.add_node("linear", [x, w, b, r], {"activation": act, "activation_attrs": act_attrs})
    g.outputs = [node.outputs[0]]
    model = assert_matches(g, randn(*xshape), randn(*xshape[:-1], 5))
    assert ("Gemm" in {n.op_type for n in model.model.graph.node}) == (len(xshape) == 2)


def test_linear_weight_as_input_and_no_bias():
    check_single("linear", [(4, 3, 8), (5, 8)])


@pytest.mark.parametrize("mask", [None, "bool", "additive"])
@pytest.mark.parametrize("causal", [False, True])
def test_attention(mask, causal):
    g = Graph("attention")
    q, k, v = (g.add_input(n, (2, 3, 5, 4)) for n in "qkv")
    m = None
    if mask == "bool":
        m = g.constant(np.triu(np.ones((5, 5), bool), -1) | np.eye(5, dtype=bool), "mask")
    elif mask == "additive":
        m = g.constant(randn(1, 1, 5, 5), "mask")
    node = g.add_node("attention", [q, k, v, m], {"causal": causal, "scale": 0.3 if mask else None})
    g.outputs = [node.outputs[0]]
    assert_matches(g, *[randn(2, 3, 5, 4) for _ in range(3)])


# -- pooling --------------------------------------------------------------------------------------


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


@settings(max_examples=15, deadline=None)
@given(pool_cases())
def test_pooling(case):
    op, shape, attrs = case
    check_single(op, [shape], attrs)


@pytest.mark.parametrize("count_include_pad", [False, True])
@pytest.mark.parametrize("size, kernel, stride, overhang", [(5, 2, 3, False), (6, 3, 2, True)])
def test_ceil_mode_pooling_is_emitted_as_explicit_end_padding(
    size, kernel, stride, overhang, count_include_pad
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
        model = check_single(op, [(1, 2, size, size)], {**attrs, **extra})
        nodes = model.model.graph.node
        ceil = [a.i for n in nodes for a in n.attribute if a.name == "ceil_mode"]
        assert not any(ceil)
        explicit = op == "avg_pool2d" and count_include_pad and overhang
        assert ("Pad" in {n.op_type for n in nodes}) == explicit


def test_max_pool_window_of_only_padding_is_minus_inf():
    # H=1, dilation 2, padding 1: the one window reads rows -1 and 1, both padding (torch: -inf)
    attrs = {"kernel": (2, 1), "padding": (1, 0), "dilation": (2, 1)}
    model = check_single("max_pool2d", [(1, 2, 1, 1)], attrs)
    assert np.all(model.run(randn(1, 2, 1, 1))[0] == -np.inf)


# -- elementwise broadcasting ---------------------------------------------------------------------


@st.composite
def broadcast_pairs(draw):
    rank = draw(st.integers(0, 4))
    full = [draw(st.integers(1, 4)) for _ in range(rank)]
    a = [1 if draw(st.booleans()) else d for d in full]
    b = [1 if draw(st.booleans()) else d for d in full][draw(st.integers(0, rank)) :]
    return draw(st.sampled_from(["add", "sub", "mul", "maximum", "minimum", "lt"])), a, b


@settings(max_examples=15, deadline=None)
@given(broadcast_pairs())
def test_elementwise_broadcasting(case):
    op, a, b = case
    check_single(op, [tuple(a), tuple(b)])


# -- whole models, checker, names -----------------------------------------------------------------


def small_cnn() -> Graph:
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


def test_model_checks_and_keeps_interface():
    g = small_cnn()
    g.verify()
    model = assert_matches(g, randn(1, 3, 9, 9))
    onnx.checker.check_model(model.model, full_check=True)
    proto = model.model.graph
    assert [i.name for i in proto.input] == ["image"]
    assert [o.name for o in proto.output] == [v.name for v in g.outputs]
    dims = [[d.dim_value for d in o.type.tensor_type.shape.dim] for o in proto.output]
    assert dims == [[1, 3], [1, 3]]
    assert {"w1", "b1", "w2"} <= {t.name for t in proto.initializer}


def test_outputs_that_alias_inputs_or_repeat_get_identity_copies():
    g = Graph("alias")
    x = g.add_input("x", (2, 3))
    y = g.add_node("relu", [x]).outputs[0]
    g.outputs = [x, y, y, g.constant(np.ones(2, "float32"), "ones")]
    model = assert_matches(g, randn(2, 3))
    names = [o.name for o in model.model.graph.output]
    assert names[1] == y.name and len(set(names)) == 4


def test_run_checks_inputs():
    model = compile_onnx(small_cnn())
    with pytest.raises(InputError, match="expects shape"):
        model.run(randn(1, 3, 8, 8))
    with pytest.raises(InputError, match="takes 1 input"):
        model.run()
    assert model.run(randn(1, 3, 9, 9).astype("float64"))[0].dtype == np.float32


def test_missing_emitter_says_how_to_add_one(monkeypatch):
    monkeypatch.delitem(EMITTERS, "relu")
    g = single("relu", [(2,)])
    with pytest.raises(BackendError) as err:
        emit_onnx(g)
    message = str(err.value)
    assert "no emitter for op 'relu'" in message and f"node '{g.nodes[0].name}'" in message
    assert "EMITTERS['relu']" in message and "onnx_emitters.py" in message


def test_bad_options_are_rejected():
    with pytest.raises(OptionError, match="valid options"):
        compile_onnx(single("relu", [(2,)]), opset_version=18)
    with pytest.raises(OptionError, match="opset"):
        emit_onnx(single("relu", [(2,)]), opset=MIN_OPSET - 1)


def test_emit_does_not_mutate_the_graph():
    g = small_cnn()
    before = str(g)
    emit_onnx(g)
    assert str(g) == before


# -- saving ---------------------------------------------------------------------------------------


def test_save_writes_a_complete_file(tmp_path):
    model = compile_onnx(small_cnn())
    path = model.save(tmp_path / "m.onnx")
    assert os.listdir(tmp_path) == ["m.onnx"]
    x = randn(1, 3, 9, 9)
    np.testing.assert_array_equal(OnnxModel.load(path).run(x)[0], model.run(x)[0])


def test_failed_save_leaves_no_partial_file(tmp_path, monkeypatch):
    model = compile_onnx(small_cnn())
    path = tmp_path / "m.onnx"
    path.write_bytes(b"old")

    def write_half_then_fail(data, target):
        target.write_bytes(data[: len(data) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(onnx_backend, "_write_bytes", write_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        model.save(path)
    with pytest.raises(OSError, match="disk full"):
        model.save(tmp_path / "new.onnx")
    assert os.listdir(tmp_path) == ["m.onnx"] and path.read_bytes() == b"old"


def test_models_past_the_protobuf_limit_use_external_data(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_backend, "PROTOBUF_LIMIT", 1024)  # pretend 1 KiB is past 2 GB
    g = single("linear", [(2, 64)], consts=(randn(32, 64), randn(32)))
    model = assert_matches(g, randn(2, 64))
    model.save(tmp_path / "big.onnx")
    assert sorted(os.listdir(tmp_path)) == ["big.onnx", "big.onnx.data"]
    assert os.path.getsize(tmp_path / "big.onnx") < 1024
    assert len(model.model.graph.initializer[0].raw_data) == 32 * 64 * 4  # in memory: unchanged
    x = randn(2, 64)
    np.testing.assert_array_equal(OnnxModel.load(tmp_path / "big.onnx").run(x)[0], model.run(x)[0])


# -- whole models against torch -------------------------------------------------------------------


def test_small_torch_model_through_compile_matches_torch(tmp_path):
    torch = pytest.importorskip("torch")
    from compiler.api import compile as compile_model

    class Block(torch.nn.Module):
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

    torch.manual_seed(0)
    model = Block().eval()
    x = torch.randn(2, 8, 7, 7)
    compiled = compile_model(model, x, passes=["fuse"], backend="onnx")
    with torch.no_grad():
        want = model(x).numpy()
    assert relative_error(compiled(x.numpy()), want) <= RTOL
    compiled.save(tmp_path / "block.onnx")
    assert relative_error(OnnxModel.load(tmp_path / "block.onnx").run(x.numpy())[0], want) <= RTOL
