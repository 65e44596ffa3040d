"""benchmarks.harness.cifar on the shared CIFAR-10 data and checkpoints: model sizes, the README's accuracies
in torch and through slimgraph's torch and ONNX backends, fine-tuning a compiled graph."""

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import compiler
from benchmarks.harness.cifar import (
    DATA_ENV,
    augment_batch,
    calibration_batch,
    cifar_resnet,
    data_available,
    data_dir,
    evaluate,
    finetune,
    load_cifar,
    load_pretrained,
    require_data,
)
from compiler.errors import InputError, OptionError

pytestmark = [
    pytest.mark.data,
    pytest.mark.skipif(
        not data_available(),
        reason=f"real CIFAR-10 data and checkpoints not found in {data_dir()}: set {DATA_ENV} "
        "to the shared data folder (see its README.md)",
    ),
]

# From ../shared/data/README.md: params, MACs and top-1 on test_dev_2k of the float models.
README = {20: (0.27e6, 41e6, 81.35), 56: (0.85e6, 126e6, 82.60)}
# The exact parameter counts of akamaster's models (what "0.27M" and "0.85M" round).
PARAMS = {20: 269_722, 56: 853_018}


@pytest.fixture(scope="module")
def dev():
    return load_cifar("test_dev_2k")


@functools.cache
def fused(depth: int, batch: int = 1, backend: str = "torch") -> compiler.CompiledModel:
    """The pretrained model through the fuse preset (ResNet-20 at batch 1 numerically checked)."""
    return compiler.compile(
        load_pretrained(depth),
        torch.zeros(batch, 3, 32, 32),
        passes=["fuse"],
        backend=backend,
        check=depth == 20 and batch == 1,
    )


def expected_macs(model: torch.nn.Module) -> int:
    """MACs of every conv and linear layer from torch's own shapes, plus the global average pool."""
    total = 64 * 8 * 8  # the pool accumulates each element of the last 64x8x8 feature map once

    def count(module, inputs, output):
        nonlocal total
        weight = module.weight
        per_output = weight[0].numel() if isinstance(module, torch.nn.Conv2d) else weight.shape[1]
        total += output.numel() * per_output

    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    handles = [m.register_forward_hook(count) for m in layers]
    with torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))
    for h in handles:
        h.remove()
    return total


def test_data_dir_follows_env_and_missing_data_is_explained(monkeypatch, tmp_path):
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    assert data_dir() == tmp_path
    assert not data_available()
    with pytest.raises(InputError, match=r"cifar10/train_20k\.npz.*SLIMGRAPH_DATA"):
        require_data("cifar10/train_20k.npz")


def test_splits_are_float_nchw_in_unit_range(dev):
    x, y = dev
    assert x.shape == (2000, 3, 32, 32) and x.dtype == np.float32
    assert y.shape == (2000,) and y.dtype == np.int64
    assert 0.0 <= x.min() and x.max() <= 1.0 and set(np.unique(y)) == set(range(10))
    calib = calibration_batch(16, seed=3)
    assert calib.shape == (16, 3, 32, 32) and calib.dtype == np.float32
    np.testing.assert_array_equal(calib, calibration_batch(16, seed=3))
    assert not np.array_equal(calib, calibration_batch(16, seed=4))


def test_eval_split_needs_final_evaluation():
    with pytest.raises(OptionError, match="final evaluation"):
        load_cifar("test_eval_8k")
    with pytest.raises(OptionError, match="unknown CIFAR-10 split"):
        load_cifar("test")
    with pytest.raises(OptionError, match="6n \\+ 2"):
        cifar_resnet(21)


@pytest.mark.parametrize("depth", [20, 56])
def test_model_size_matches_readme(depth):
    params, macs, _ = README[depth]
    model = load_pretrained(depth)
    count = sum(p.numel() for p in model.parameters())
    assert count == PARAMS[depth] and round(count / 1e6, 2) == params / 1e6
    # After folding batch norm, slimgraph counts the convolutions, the pool and the classifier.
    measured = fused(depth).report.rows[-1].macs
    assert measured == expected_macs(model)
    assert abs(measured - macs) < 0.02 * macs, measured


@pytest.mark.parametrize("depth", [20, 56])
def test_pretrained_accuracy_matches_readme(depth, dev):
    assert evaluate(load_pretrained(depth), *dev) == pytest.approx(README[depth][2], abs=0.1)


def test_compiled_resnet20_keeps_its_accuracy(dev):
    expected = README[20][2]
    # Traced at batch 1, run at 500: the torch backend lets the batch differ from the traced one.
    assert evaluate(fused(20), *dev, batch_size=500) == pytest.approx(expected, abs=0.1)
    # ONNX takes only its traced batch; 2000 = 6 * 300 + 200 also exercises the padded last batch.
    onnx_model = fused(20, batch=300, backend="onnx")
    assert evaluate(onnx_model, *dev, batch_size=None) == pytest.approx(expected, abs=0.1)


def test_evaluate_pads_the_last_batch_for_fixed_batch_callables(dev):
    model = load_pretrained(20)
    x, y = dev[0][:100], dev[1][:100]
    seen = []

    def fixed_batch(batch: np.ndarray) -> np.ndarray:
        seen.append(len(batch))
        with torch.no_grad():
            return model(torch.from_numpy(batch)).numpy()

    assert evaluate(fixed_batch, x, y, batch_size=64) == evaluate(model, x, y, batch_size=100)
    assert seen == [64, 64]


def test_augment_batch_crops_a_shifted_window_or_its_mirror():
    x = torch.rand(8, 3, 32, 32)
    out = augment_batch(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    padded = F.pad(x, (4, 4, 4, 4))
    for image, crop in zip(padded, out, strict=True):
        windows = [image[:, dy : dy + 32, dx : dx + 32] for dy in range(9) for dx in range(9)]
        assert any(torch.equal(crop, w) or torch.equal(crop, w.flip(2)) for w in windows)
    torch.testing.assert_close(out, augment_batch(x, torch.Generator().manual_seed(0)))


def test_finetune_trains_the_compiled_graph_module(dev):
    compiled = fused(20)
    module = compiled.to_torch()
    x, y = load_cifar("train_20k")
    x, y = x[:512], y[:512]
    xd, yd = dev[0][:200], dev[1][:200]
    probe = torch.from_numpy(xd[:32])
    compiled_logits = compiled(probe)

    def train_loss() -> float:
        with torch.no_grad():
            return F.cross_entropy(module(torch.from_numpy(x)), torch.from_numpy(y)).item()

    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    loss, accuracy = train_loss(), evaluate(module, xd, yd)
    trained = finetune(module, x, y, epochs=0.5, progress=False)  # 2 steps of 128
    assert trained is module and not module.training
    changed = {n for n, p in module.named_parameters() if not torch.equal(p, before[n])}
    assert changed and not any(n.startswith("normalize") for n in changed)
    assert train_loss() < loss
    assert abs(evaluate(module, xd, yd) - accuracy) <= 3.0
    torch.testing.assert_close(compiled(probe), compiled_logits, rtol=0, atol=0)  # untouched
