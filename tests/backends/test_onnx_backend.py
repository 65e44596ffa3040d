"""What only the ONNX backend has: opsets, the node structure it emits (Gemm, Erf, explicit pads),
checked models with the graph's interface, files (atomic saves, external data), its options. The
cases every backend runs are in test_conformance.py."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest

import backends.onnx.backend as onnx_backend
from backends.onnx.backend import MAX_OPSET, MIN_OPSET, OnnxModel, compile_onnx, emit_onnx
from compiler.errors import OptionError
from compiler.ir.graph import Graph
from compiler.ir.interpreter import run
from tests.backends.cases import EPILOGUES, OP_CASES, block, epilogue_id, one_node, randn, small_cnn
from tests.numerics import relative_error

RTOL = 1e-4


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


def single(op, shapes, attrs=None, consts=()):
    """Graph with float32 inputs of ``shapes`` (then constants ``consts``) feeding one ``op``."""
    return one_node(
        op,
        [*(randn(*s) for s in shapes), *consts],
        attrs,
        range(len(shapes), len(shapes) + len(consts)),
    )[0]


# -- opsets ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("opset", [MIN_OPSET, MAX_OPSET])
def test_every_op_at_the_ends_of_the_opset_range(opset):
    for op, arrays, attrs, const in OP_CASES.values():
        graph, inputs = one_node(op, arrays, attrs, const)
        model = assert_matches(graph, *inputs, opset=opset)
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


# -- the nodes emitted ----------------------------------------------------------------------------


@pytest.mark.parametrize("act, act_attrs", EPILOGUES, ids=[epilogue_id(e) for e in EPILOGUES])
@pytest.mark.parametrize("xshape", [(3, 8), (2, 3, 8)])
def test_linear_is_a_gemm_in_2d_only(xshape, act, act_attrs):
    g = Graph("linear")
    x, r = g.add_input("x", xshape), g.add_input("r", (*xshape[:-1], 5))
    w, b = g.constant(randn(5, 8), "w"), g.constant(randn(5), "b")
    node = g.add_node("linear", [x, w, b, r], {"activation": act, "activation_attrs": act_attrs})
    g.outputs = [node.outputs[0]]
    model = compile_onnx(g)
    assert ("Gemm" in {n.op_type for n in model.model.graph.node}) == (len(xshape) == 2)


@pytest.mark.parametrize("count_include_pad", [False, True])
@pytest.mark.parametrize("size, kernel, stride, overhang", [(5, 2, 3, False), (6, 3, 2, True)])
def test_ceil_mode_pooling_is_emitted_as_explicit_end_padding(
    size, kernel, stride, overhang, count_include_pad
):
    # the cases (and their numbers): test_conformance.py::test_ceil_mode_pooling_overhang_is_not_counted
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
        nodes = emit_onnx(single(op, [(1, 2, size, size)], {**attrs, **extra})).graph.node
        ceil = [a.i for n in nodes for a in n.attribute if a.name == "ceil_mode"]
        assert not any(ceil)
        explicit = op == "avg_pool2d" and count_include_pad and overhang
        assert ("Pad" in {n.op_type for n in nodes}) == explicit


def test_model_checks_and_keeps_interface():
    g = small_cnn()
    model = compile_onnx(g)
    onnx.checker.check_model(model.model, full_check=True)
    proto = model.model.graph
    assert [i.name for i in proto.input] == ["image"]
    assert [o.name for o in proto.output] == [v.name for v in g.outputs]
    dims = [
        [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in proto.output
    ]
    assert dims == [["batch", 3], ["batch", 3]]  # traced at batch 1, runs any (test_batch.py)
    assert {"w1", "b1", "w2"} <= {t.name for t in proto.initializer}


def test_outputs_that_alias_inputs_or_repeat_get_identity_copies():
    g = Graph("alias")
    x = g.add_input("x", (2, 3))
    y = g.add_node("relu", [x]).outputs[0]
    g.outputs = [x, y, y, g.constant(np.ones(2, "float32"), "ones")]
    names = [o.name for o in emit_onnx(g).graph.output]
    assert names[1] == y.name and len(set(names)) == 4


def test_bad_options_are_rejected():
    with pytest.raises(OptionError, match="valid options"):
        compile_onnx(single("relu", [(2,)]), opset_version=18)
    with pytest.raises(OptionError, match="opset"):
        emit_onnx(single("relu", [(2,)]), opset=MIN_OPSET - 1)


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


def test_compiled_model_saves_and_loads(tmp_path):
    import torch

    from compiler.api import compile as compile_model

    model, x = block()
    compiled = compile_model(model, x, passes=["fuse"], backend="onnx")
    compiled.save(tmp_path / "block.onnx")
    with torch.no_grad():
        want = model(x).numpy()
    assert relative_error(OnnxModel.load(tmp_path / "block.onnx").run(x.numpy())[0], want) <= RTOL
