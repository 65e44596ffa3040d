"""The torch backend against the reference interpreter, op by op, plus training and export."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.torch.backend import EMITTERS, GraphModule, compile_torch, to_graph
from compiler.errors import BackendError, InputError
from compiler.ir.graph import Graph
from compiler.ir.interpreter import run
from compiler.ops.codebook import pack_indices
from compiler.ops.elementwise import ACTIVATIONS
from compiler.ops.table import OPS, get_op
from tests.quant_cases import torch_cases

RNG = np.random.default_rng(0)


def randn(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def positive(*shape: int) -> np.ndarray:
    return (np.abs(randn(*shape)) + 0.5).astype(np.float32)


def ints(*shape: int, high: int = 3) -> np.ndarray:
    return RNG.integers(-high, high, size=shape).astype(np.int64)


def one_node(op: str, arrays, attrs=None, const=()) -> tuple[Graph, list[np.ndarray]]:
    """A graph running ``op`` once; arrays at the positions in ``const`` become constants."""
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


def assert_matches(graph: Graph, inputs: list[np.ndarray], tol: float = 1e-4) -> None:
    """The compiled module's outputs equal the interpreter's: exact for ints and infinities, else
    within ``tol`` of the largest magnitude."""
    expected = run(graph, inputs)
    with torch.no_grad():
        got = compile_torch(graph)(*[torch.from_numpy(a) for a in inputs])
    got = got if isinstance(got, tuple) else (got,)
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        g = g.numpy()
        assert g.shape == e.shape
        if e.dtype.kind != "f":
            assert g.dtype == e.dtype
            np.testing.assert_array_equal(g, e)
        else:  # windows wholly in padding give -inf in both: compare those exactly
            finite = np.isfinite(e)
            np.testing.assert_array_equal(g[~finite], e[~finite])
            scale = max(float(np.abs(e[finite]).max(initial=0.0)), 1e-6)
            assert float(np.abs(g[finite] - e[finite]).max(initial=0.0)) / scale <= tol


def _attention_cases() -> dict[str, tuple]:
    q, k, v = randn(2, 3, 4, 8), randn(2, 3, 6, 8), randn(2, 3, 6, 5)
    qs = randn(2, 3, 6, 8)
    keep = RNG.random((6, 6)) > 0.3
    keep[:, 0] = True  # no fully masked row (the reference gives NaN there)
    return {
        "attention": ("attention", [q, k, v], {}, ()),
        "attention-scale": ("attention", [q, k, v], {"scale": 0.3}, ()),
        "attention-causal": ("attention", [qs, qs, randn(2, 3, 6, 5)], {"causal": True}, ()),
        "attention-bool-mask": ("attention", [q, k, v, keep[:4]], {}, (3,)),
        "attention-add-mask": ("attention", [q, k, v, randn(4, 6)], {}, (3,)),
        "attention-causal-mask": ("attention", [qs, qs, v, keep], {"causal": True}, (3,)),
    }


def _elementwise_cases(x: np.ndarray) -> dict[str, tuple]:
    unary = "relu hardswish hardsigmoid silu sigmoid tanh neg exp abs identity dropout".split()
    cases = {op: (op, [x], {}, ()) for op in unary}
    cases |= {op: (op, [positive(2, 3, 4)], {}, ()) for op in ("sqrt", "rsqrt", "log")}
    binary = ("add", "sub", "mul", "div", "maximum", "minimum")
    cases |= {op: (op, [randn(2, 3, 4), randn(4)], {}, (1,)) for op in binary}
    cases |= {op: (op, [ints(3, 4), ints(4)], {}, (1,)) for op in ("eq", "ne", "lt", "gt")}
    return cases | {
        "clip": ("clip", [x], {"min_val": 0.0, "max_val": 0.5}, ()),
        "clip-min": ("clip", [x], {"min_val": -0.2}, ()),
        "clip-none": ("clip", [x], {}, ()),
        "gelu": ("gelu", [x], {}, ()),
        "gelu-tanh": ("gelu", [x], {"approximate": "tanh"}, ()),
        "cast": ("cast", [x * 3], {"dtype": "int32"}, ()),
        "cast-float": ("cast", [ints(3, 4)], {"dtype": "float32"}, ()),
        "pow": ("pow", [positive(3, 4), randn(4)], {}, (1,)),
        "div-int": ("div", [ints(3, 4, high=9), np.array([2, 3, 4, 5])], {}, (1,)),
        "where": ("where", [randn(3, 4) > 0, randn(3, 4), randn(4)], {}, (2,)),
    }


def _tensor_cases(x: np.ndarray) -> dict[str, tuple]:
    return {
        "reshape": ("reshape", [x], {"shape": (6, 20)}, ()),
        "permute": ("permute", [x], {"perm": (0, 2, 3, 1)}, ()),
        "slice": ("slice", [x], {"axis": 3, "start": -4, "end": 5, "step": 2}, ()),
        "concat": ("concat", [x, randn(2, 1, 4, 5), randn(2, 2, 4, 5)], {"axis": 1}, (1,)),
        "split": ("split", [x], {"axis": -1, "sizes": (1, 3, 1)}, ()),
        "pad": ("pad", [x], {"pads": ((0, 0), (1, -1), (2, 0), (-1, 3)), "value": 1.5}, ()),
        "expand": ("expand", [randn(3, 1, 5)], {"shape": (2, 3, 4, 5)}, ()),
        "roll": ("roll", [x], {"shifts": (1, -2), "axes": (0, 3)}, ()),
        "take": ("take", [x, np.array([[0, -1], [2, 2]])], {"axis": 2}, (1,)),
        "mean": ("mean", [x], {"axes": (1, 3)}, ()),
        "sum": ("sum", [x], {"axes": (-1,), "keepdims": True}, ()),
        "sum-int": ("sum", [ints(3, 4).astype(np.int32)], {"axes": (0,)}, ()),
        "norm": ("norm", [x], {"axes": (2, 3)}, ()),
        "norm-3": ("norm", [x], {"axes": (1,), "keepdims": True, "ord": 3.0}, ()),
        "einsum": ("einsum", [randn(2, 3, 4), randn(2, 4, 5)], {"equation": "bij,bjk->bik"}, ()),
        "einsum-transpose": ("einsum", [randn(3, 4)], {"equation": "ij->ji"}, ()),
    }


def _nn_cases(x: np.ndarray) -> dict[str, tuple]:
    odd = randn(2, 3, 7, 5)
    bn = [randn(3), randn(3), randn(3), positive(3)]
    return {
        "conv2d": ("conv2d", [x, randn(4, 3, 3, 3), randn(4)], {"padding": (1, 1)}, (1, 2)),
        "linear": ("linear", [randn(2, 3, 5), randn(4, 5), randn(4)], {}, (1, 2)),
        "matmul": ("matmul", [randn(2, 3, 4, 5), randn(5, 6)], {}, (1,)),
        "max_pool2d": ("max_pool2d", [x], {"kernel": (2, 2), "stride": (2, 2)}, ()),
        "avg_pool2d": ("avg_pool2d", [x], {"kernel": (3, 3), "padding": (1, 1)}, ()),
        "adaptive_avg_pool2d": ("adaptive_avg_pool2d", [odd], {"output_size": (3, 2)}, ()),
        "adaptive_max_pool2d": ("adaptive_max_pool2d", [odd], {"output_size": (3, 2)}, ()),
        "batch_norm": ("batch_norm", [x, *bn], {}, (1, 2, 3, 4)),
        "layer_norm": ("layer_norm", [x, randn(5), randn(5)], {}, (1, 2)),
        "layer_norm-2d": ("layer_norm", [x, randn(4, 5), None], {"axes": (-2, -1)}, (1,)),
        "layer_norm-broadcast": ("layer_norm", [x, randn(5), randn(5)], {"axes": (2, 3)}, (1, 2)),
        "layer_norm-plain": ("layer_norm", [x], {"axes": (1,)}, ()),
        "group_norm": (
            "group_norm",
            [randn(2, 6, 3, 3), randn(6), randn(6)],
            {"groups": 3},
            (1, 2),
        ),
        "softmax": ("softmax", [x], {"axis": 1}, ()),
        "log_softmax": ("log_softmax", [x], {}, ()),
        "codebook_lookup": (
            "codebook_lookup",
            [randn(2, 8), pack_indices(np.arange(12) % 8, 3)],
            {"shape": (2, 3, 2), "bits": 3},
            (0, 1),
        ),
        "codebook_lookup-input": (
            "codebook_lookup",
            [randn(1, 16), pack_indices(np.arange(15), 4)],
            {"shape": (5, 3), "bits": 4},
            (1,),
        ),
    }


def _cases() -> dict[str, tuple]:
    """case id -> (op, arrays, attrs, constant positions); every op of the table appears."""
    x = randn(2, 3, 4, 5)
    return (_elementwise_cases(x) | _tensor_cases(x) | _nn_cases(x) | _attention_cases()
            | torch_cases())


CASES = _cases()


def test_every_op_has_an_emitter_and_a_case():
    get_op("relu")  # loads the built-in ops
    assert set(OPS) <= set(EMITTERS)
    assert {case[0] for case in CASES.values()} == set(OPS)


@pytest.mark.parametrize("case", sorted(CASES))
def test_op_matches_interpreter(case):
    op, arrays, attrs, const = CASES[case]
    assert_matches(*one_node(op, arrays, attrs, const))


# -- conv2d and pooling over their attributes -----------------------------------------------------


@st.composite
def conv_configs(draw):
    groups = draw(st.sampled_from([1, 2, 3]))
    cin_per_group = draw(st.integers(1, 3))
    depthwise = draw(st.booleans())
    cout = groups * (1 if depthwise else draw(st.integers(1, 3)))
    cin = groups * (1 if depthwise else cin_per_group)
    k = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    size = [
        max(1, d * (kk - 1) + 1 - 2 * p) + draw(st.integers(0, 4))
        for kk, d, p in zip(k, dilation, padding, strict=True)
    ]
    attrs = {"stride": stride, "padding": padding, "dilation": dilation, "groups": groups}
    activation = draw(st.sampled_from([None, "relu", "hardswish"]))
    attrs["activation"] = activation
    bias = randn(cout) if draw(st.booleans()) else None
    return [randn(draw(st.integers(1, 2)), cin, *size), randn(cout, cin // groups, *k), bias], attrs


@given(conv_configs())
@settings(max_examples=15, deadline=None)
def test_conv2d_attrs(config):
    arrays, attrs = config
    assert_matches(*one_node("conv2d", arrays, attrs, const=(1, 2)))


@st.composite
def pool_configs(draw):
    op = draw(st.sampled_from(["max_pool2d", "avg_pool2d"]))
    k = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = (draw(st.integers(0, k[0] // 2)), draw(st.integers(0, k[1] // 2)))  # torch's limit
    attrs = {
        "kernel": k,
        "stride": (draw(st.integers(1, 3)), draw(st.integers(1, 3))),
        "padding": padding,
        "ceil_mode": draw(st.booleans()),
    }
    dilation = (1, 1)
    if op == "max_pool2d":
        dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
        attrs["dilation"] = dilation
    else:
        attrs["count_include_pad"] = draw(st.booleans())
    size = [
        max(1, d * (kk - 1) + 1 - 2 * p) + draw(st.integers(0, 4))
        for kk, d, p in zip(k, dilation, padding, strict=True)
    ]
    return op, randn(2, 3, *size), attrs


@given(pool_configs())
@settings(max_examples=15, deadline=None)
def test_pool_attrs(config):
    op, x, attrs = config
    assert_matches(*one_node(op, [x], attrs))


# -- fused epilogues ------------------------------------------------------------------------------

ACTIVATION_ATTRS = {"clip": {"min_val": 0.0, "max_val": 6.0}, "gelu": {"approximate": "tanh"}}


@pytest.mark.parametrize("activation", [None, *ACTIVATIONS])
def test_conv2d_epilogue(activation):
    attrs = {
        "activation": activation,
        "activation_attrs": ACTIVATION_ATTRS.get(activation),
        "stride": (2, 1),
        "padding": (1, 1),
    }
    arrays = [randn(2, 4, 6, 6), randn(4, 4, 3, 3), randn(4), randn(2, 4, 3, 6)]
    assert_matches(*one_node("conv2d", arrays, attrs, const=(1, 2)))


@pytest.mark.parametrize("activation", ["relu", "clip", "gelu"])
def test_linear_epilogue(activation):
    attrs = {"activation": activation, "activation_attrs": ACTIVATION_ATTRS.get(activation)}
    arrays = [randn(3, 5), randn(4, 5), None, randn(3, 4)]
    assert_matches(*one_node("linear", arrays, attrs, const=(1,)))


# -- parameters, training and export --------------------------------------------------------------


def conv_linear_graph(batch: int = 4, seed: int = 1) -> Graph:
    rng = np.random.default_rng(seed)
    weights = {
        "features.0.weight": rng.standard_normal((6, 3, 3, 3)).astype(np.float32) * 0.3,
        "features.0.bias": np.zeros(6, np.float32),
        "classifier.weight": rng.standard_normal((5, 6)).astype(np.float32) * 0.3,
        "classifier.bias": np.zeros(5, np.float32),
    }
    g = Graph("tiny")
    x = g.add_input("x", (batch, 3, 8, 8))
    w = {name: g.constant(array, name) for name, array in weights.items()}
    conv = g.add_node(
        "conv2d",
        [x, w["features.0.weight"], w["features.0.bias"]],
        {"padding": (1, 1), "activation": "relu"},
    )
    pooled = g.add_node("mean", [conv.outputs[0]], {"axes": (2, 3)})
    fc = g.add_node("linear", [pooled.outputs[0], w["classifier.weight"], w["classifier.bias"]])
    g.outputs = [fc.outputs[0]]
    g.verify()
    return g


def test_sgd_step_lowers_loss_and_exports_weights():
    graph = conv_linear_graph()
    before = {v.name: v.data.copy() for v in graph.constants()}
    module = compile_torch(graph)
    assert sorted(n for n, _ in module.named_parameters()) == [
        "classifier_bias",
        "classifier_weight",
        "features_0_bias",
        "features_0_weight",
    ]
    x, target = torch.randn(4, 3, 8, 8), torch.randn(4, 5)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.5)
    losses = []
    for _ in range(2):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(module(x), target)
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
        optimizer.step()
        losses.append(loss.item())
    assert losses[1] < losses[0]

    tuned = to_graph(module)
    tuned.verify()
    for value in graph.constants():  # the original graph is untouched
        np.testing.assert_array_equal(value.data, before[value.name])
    for value in tuned.constants():
        param = module.get_parameter(value.name.replace(".", "_")).detach().numpy()
        np.testing.assert_array_equal(value.data, param)
        assert not np.array_equal(value.data, before[value.name])
    with torch.no_grad():
        expected = module(x).numpy()
        next(module.parameters()).add_(1.0)  # later training reaches neither graph
    np.testing.assert_allclose(run(tuned, [x.numpy()])[0], expected, rtol=1e-4, atol=1e-5)
    for value in graph.constants():
        np.testing.assert_array_equal(value.data, before[value.name])
    assert not np.array_equal(to_graph(module).constants()[0].data, tuned.constants()[0].data)


def test_constants_become_parameters_or_buffers():
    g = Graph("kinds")
    x = g.add_input("x", (2, 3, 4, 4))
    bn = [
        g.constant(a, f"bn.{n}")
        for a, n in zip(
            [randn(3), randn(3), randn(3), positive(3)],
            ["weight", "bias", "mean", "var"],
            strict=True,
        )
    ]
    y = g.add_node("batch_norm", [x, *bn]).outputs[0]
    y = g.add_node("mul", [y, g.constant(np.float32(2.0), "scale")]).outputs[0]
    y = g.add_node("take", [y, g.constant(np.array([2, 0]), "idx")], {"axis": 1}).outputs[0]
    y = g.add_node("add", [y, g.constant(randn(4), "bn_weight")]).outputs[0]  # clashes once
    g.outputs = [y]
    module = compile_torch(g)
    assert sorted(n for n, _ in module.named_parameters()) == [
        "bn_bias",
        "bn_weight",
        "bn_weight_1",
    ]
    assert sorted(n for n, _ in module.named_buffers()) == ["bn_mean", "bn_var", "idx", "scale"]
    assert not graph_shares_memory(g, module)


def graph_shares_memory(graph: Graph, module: GraphModule) -> bool:
    tensors = [t.detach().numpy() for t in [*module.parameters(), *module.buffers()]]
    return any(np.shares_memory(v.data, t) for v in graph.constants() for t in tensors)


def batch_graph(batch: int, weights: dict[str, np.ndarray]) -> Graph:
    """Flatten + linear, and a class token expanded to the batch and concatenated."""
    g = Graph("batch")
    x = g.add_input("x", (batch, 2, 3, 4))
    flat = g.add_node("reshape", [x], {"shape": (batch, 24)}).outputs[0]
    token = g.add_node(
        "expand", [g.constant(weights["token"], "token")], {"shape": (batch, 1, 24)}
    ).outputs[0]
    rows = g.add_node("reshape", [flat], {"shape": (batch, 1, 24)}).outputs[0]
    both = g.add_node("concat", [token, rows], {"axis": 1}).outputs[0]
    heads = g.add_node("reshape", [both], {"shape": (batch * 2, 2, 12)}).outputs[0]
    out = g.add_node("linear", [heads, g.constant(weights["w"], "w")]).outputs[0]
    g.outputs = [out]
    return g


def test_runs_other_batch_sizes():
    weights = {"token": randn(1, 1, 24), "w": randn(3, 12)}
    module = compile_torch(batch_graph(2, weights))
    for batch in (1, 2, 5):
        x = randn(batch, 2, 3, 4)
        expected = run(batch_graph(batch, weights), [x])[0]
        with torch.no_grad():
            np.testing.assert_allclose(module(x).numpy(), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(InputError, match="any batch"):
        module(randn(2, 2, 3, 5))


def test_missing_emitter_names_op_node_and_fix(monkeypatch):
    graph, _ = one_node("relu", [randn(2, 3)])
    monkeypatch.delitem(EMITTERS, "relu")
    with pytest.raises(BackendError) as info:
        compile_torch(graph)
    message = str(info.value)
    assert "relu" in message and f"node '{graph.nodes[0].name}'" in message
    assert "EMITTERS" in message and "emitter('relu')" in message
    fused, _ = one_node("linear", [randn(2, 3), randn(4, 3)], {"activation": "relu"}, (1,))
    with pytest.raises(BackendError, match="fused activation 'relu'"):
        compile_torch(fused)


def test_runtime_failure_is_a_backend_error(monkeypatch):
    graph, inputs = one_node("relu", [randn(2, 3)])
    module = compile_torch(graph)
    monkeypatch.setitem(EMITTERS, "relu", lambda x: x.no_such_method())
    with pytest.raises(BackendError, match="torch failed"):
        module(*inputs)


def test_train_mode_batch_norm_uses_batch_statistics():
    x = randn(8, 3, 4, 4) * 3 + 1
    graph, inputs = one_node("batch_norm", [x, randn(3), randn(3), randn(3), positive(3)], {},
                             (1, 2, 3, 4))
    module = compile_torch(graph).train()
    bn = torch.nn.BatchNorm2d(3, momentum=0.1)
    consts = graph.constants()
    with torch.no_grad():
        bn.weight.copy_(torch.from_numpy(consts[0].data))
        bn.bias.copy_(torch.from_numpy(consts[1].data))
        bn.running_mean.copy_(torch.from_numpy(consts[2].data))
        bn.running_var.copy_(torch.from_numpy(consts[3].data))
    expected = bn.train()(torch.from_numpy(inputs[0]))
    got = module(*inputs)
    np.testing.assert_allclose(got.detach().numpy(), expected.detach().numpy(), rtol=1e-4,
                               atol=1e-5)
    exported = to_graph(module).constants()
    np.testing.assert_allclose(exported[2].data, bn.running_mean.numpy(), rtol=1e-5)
    np.testing.assert_allclose(exported[3].data, bn.running_var.numpy(), rtol=1e-5)


def test_train_mode_keeps_dropout_off_and_module_pickles():
    graph, inputs = one_node(
        "batch_norm",
        [randn(2, 3, 4, 4), randn(3), randn(3), randn(3), positive(3)],
        {},
        (1, 2, 3, 4),
    )
    y = graph.add_node("dropout", [graph.outputs[0]], {"p": 0.9}).outputs[0]
    graph.outputs = [y]
    module = compile_torch(graph)
    expected = run(graph, inputs)[0]
    np.testing.assert_allclose(module(*inputs).detach().numpy(), expected, rtol=1e-4, atol=1e-5)
    drop_graph, drop_inputs = one_node("dropout", [randn(2, 3)], {"p": 0.9})
    trained = compile_torch(drop_graph).train()  # dropout stays off: fine-tuning is deterministic
    np.testing.assert_array_equal(trained(*drop_inputs).numpy(), drop_inputs[0])
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    np.testing.assert_array_equal(
        loaded(*inputs).detach().numpy(), module(*inputs).detach().numpy()
    )
    np.testing.assert_array_equal(to_graph(loaded).constants()[3].data, graph.constants()[3].data)
