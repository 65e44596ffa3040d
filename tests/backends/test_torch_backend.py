"""What only the torch backend has: trainable parameters and buffers, training and export back to
the IR, any batch size, pickling, its errors. The cases every backend runs are in
test_conformance.py."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from backends.torch.backend import EMITTERS, GraphModule, compile_torch, to_graph
from compiler.errors import BackendError, InputError
from compiler.ir.graph import Graph
from compiler.ir.interpreter import run
from tests.backends.cases import one_node, randn


def positive(*shape: int) -> np.ndarray:
    return (np.abs(randn(*shape)) + 0.5).astype(np.float32)


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
    assert sorted(n for n, _ in module.named_parameters()) == [  # the model's own names
        "classifier.bias",
        "classifier.weight",
        "features.0.bias",
        "features.0.weight",
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
        param = module.get_parameter(value.name).detach().numpy()
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
    y = g.add_node("add", [y, g.constant(randn(4), "bn")]).outputs[0]  # clashes: a flat name
    y = g.add_node("sub", [y, g.constant(randn(4), "scale.x")]).outputs[0]  # scale: a tensor
    y = g.add_node("mul", [y, g.constant(randn(4), "bn.weight.q")]).outputs[0]  # made from one
    g.outputs = [y]
    module = compile_torch(g)
    assert sorted(n for n, _ in module.named_parameters()) == [
        "bn.bias",
        "bn.weight",
        "bn.weight_q",
        "bn_1",
        "scale_x",
    ]
    assert sorted(n for n, _ in module.named_buffers()) == ["bn.mean", "bn.var", "idx", "scale"]
    assert getattr(module, "bn.weight") is module.bn.weight
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


def test_missing_emitter_of_a_fused_activation_is_named(monkeypatch):
    # the missing emitter of an op: test_conformance.py::test_missing_emitter_names_op_node_and_fix
    monkeypatch.delitem(EMITTERS, "relu")
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
    graph, inputs = one_node(
        "batch_norm", [x, randn(3), randn(3), randn(3), positive(3)], {}, (1, 2, 3, 4)
    )
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
    np.testing.assert_allclose(
        got.detach().numpy(), expected.detach().numpy(), rtol=1e-4, atol=1e-5
    )
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


# -- saving and loading ---------------------------------------------------------------------------


def test_save_and_load_without_pickle(tmp_path):
    from backends.torch.backend import load_torch, save_torch
    from compiler.ir.serialize import graph_from_plain, graph_to_plain
    from compiler.ops.codebook import pack_indices

    graph = conv_linear_graph()
    g, _ = one_node(
        "codebook_lookup",
        [randn(2, 4), pack_indices(np.array([0, 3, 1, 2]), 2)],
        {"shape": (2, 2), "bits": 2},
        (0, 1),
    )
    module = compile_torch(graph)
    module.classifier.weight.data.mul_(2.0)  # a tuned weight is what gets saved
    path = save_torch(module.double(), tmp_path / "m.pt")  # saved in float64, loads in float32
    payload = torch.load(path, weights_only=True)
    assert set(payload) == {"format", "graph", "constants", "state_dict"}
    loaded = load_torch(path)
    assert [n for n, _ in loaded.named_parameters()] == [n for n, _ in module.named_parameters()]
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        np.testing.assert_allclose(loaded(x).numpy(), module(x.double()).numpy(), rtol=1e-5)
    plain = graph_to_plain(g)  # the plain form round-trips: names, attributes, meta, types
    back = graph_from_plain(plain, {v.name: v.data for v in g.constants()}.__getitem__)
    assert str(back) == str(g)
    g.nodes[0].attrs["shape"] = object()
    with pytest.raises(BackendError, match="cannot be saved"):
        graph_to_plain(g)
    with pytest.raises(BackendError, match="not a slimgraph torch file"):
        torch.save({"weights": torch.ones(2)}, tmp_path / "other.pt")
        load_torch(tmp_path / "other.pt")
    torch.save(module, tmp_path / "pickled.pt")  # a module pickled whole, as before
    with pytest.raises(BackendError, match=r"weights_only=False"):
        load_torch(tmp_path / "pickled.pt")
