"""compile(): never mutates the model, reports per pass, checks exact passes, saves atomically."""

import os
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

from compiler import Pass, compile, register_pass
from compiler.errors import InputError, OptionError, PassError


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=2),
        nn.BatchNorm2d(8),
        nn.Hardswish(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )


def test_compile_does_not_mutate_the_model():
    model = small_model().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compiled = compile(model, torch.randn(2, 3, 8, 8), passes=["fuse"])
    assert all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # the compiled graph is the model in eval mode
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = model.eval()(x)
    assert torch.allclose(compiled(x), ref, atol=1e-5)


def test_report_rows_and_dict():
    compiled = compile(small_model(), torch.randn(1, 3, 8, 8), passes=["fuse"])
    names = [r.name.split("(")[0] for r in compiled.report.rows]
    assert names[0] == "input" and "fold-batch-norm" in names and "fuse-activations" in names
    first, last = compiled.report.rows[0], compiled.report.rows[-1]
    assert last.nodes < first.nodes and last.params < first.params  # BN parameters folded away
    assert all(r.deviation <= 1e-4 for r in compiled.report.rows)
    table = str(compiled.report)
    assert "max dev" in table and "fold-batch-norm" in table
    d = compiled.report.to_dict()
    assert d["rows"][0]["macs"] == first.macs > 0


def test_numpy_and_torch_inputs():
    model = small_model().eval()
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    compiled = compile(model, x, passes=["fuse"])
    out_np = compiled(x)
    out_t = compiled(torch.from_numpy(x))
    assert isinstance(out_np, np.ndarray) and isinstance(out_t, torch.Tensor)
    np.testing.assert_allclose(out_np, out_t.numpy(), rtol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_backends_match_and_save_atomically(tmp_path, backend):
    model = small_model().eval()
    x = torch.randn(1, 3, 8, 8)
    compiled = compile(model, x, passes=["fuse"], backend=backend)
    with torch.no_grad():
        ref = model(x)
    assert torch.allclose(compiled(x), ref, atol=1e-5)
    path = tmp_path / ("m.onnx" if backend == "onnx" else "m.pt")
    compiled.save(path)
    assert path.stat().st_size > 0
    assert [p for p in os.listdir(tmp_path) if p.startswith(".tmp")] == []


def test_to_torch_is_trainable():
    compiled = compile(small_model(), torch.randn(1, 3, 8, 8), passes=["fuse"])
    module = compiled.to_torch()
    params = list(module.parameters())
    assert params and all(p.requires_grad for p in params)
    loss = module(torch.randn(1, 3, 8, 8)).sum()
    loss.backward()
    assert all(p.grad is not None for p in params)


def test_exact_pass_that_changes_numbers_fails():
    @register_pass
    @dataclass
    class Breaks(Pass):
        """x -> 2x on every linear weight (claims to be exact, is not)."""

        name = "test-breaks"

        def run(self, graph):
            for node in graph.find("linear"):
                node.inputs[1].data = node.inputs[1].data * 2
            return True

    with pytest.raises(PassError, match="pass 'test-breaks' is exact but changed the outputs"):
        compile(small_model(), torch.randn(1, 3, 8, 8), passes=[Breaks()])


def test_bad_arguments():
    with pytest.raises(OptionError, match="unknown backend"):
        compile(small_model(), torch.randn(1, 3, 8, 8), backend="tflite")
    with pytest.raises(OptionError, match="unknown pass 'fusee'"):
        compile(small_model(), torch.randn(1, 3, 8, 8), passes=["fusee"])
    with pytest.raises(InputError, match="needs example_inputs"):
        compile(small_model())
    for backend in ("torch", "onnx"):
        compiled = compile(small_model(), torch.randn(1, 3, 8, 8), backend=backend)
        with pytest.raises(InputError):
            compiled(np.zeros((1, 3, 9, 9), np.float32))


def test_deviation_is_infinite_for_nan_and_uses_one_scale_for_all_outputs():
    from compiler.pass_manager import deviation

    one = np.ones(3, np.float32)
    assert deviation([one], [np.array([1, np.nan, 1], np.float32)]) == float("inf")
    assert deviation([np.array([1, np.inf])], [np.array([1, 5.0])]) == float("inf")
    assert deviation([np.array([1, np.inf])], [np.array([1, np.inf])]) == 0.0
    assert deviation([one], [one[:2]]) == float("inf")  # a shape change
    # a numerically-zero output beside a large one: the error is relative to the graph's scale
    small, large = np.array([2e-5]), np.array([4.0])
    assert deviation([small, large], [small + 4e-9, large]) == pytest.approx(1e-9)
