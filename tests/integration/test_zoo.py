"""A representative slice of the torchvision zoo (one model per architecture family) through the whole
spine: import, fuse (checked after each pass), then the interpreter, the torch backend and ONNX Runtime
against torch eager. The full 80 run in benchmarks/zoo.py (results in docs/benchmarks.md)."""

import pytest

from benchmarks.harness.zoo import check_model, zoo_names

FAMILIES = [
    "alexnet",
    "vgg11_bn",
    "resnet18",
    "resnext50_32x4d",
    "wide_resnet50_2",
    "densenet121",
    "googlenet",
    "inception_v3",
    "squeezenet1_0",
    "shufflenet_v2_x0_5",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "mnasnet0_5",
    "efficientnet_b0",
    "efficientnet_v2_s",
    "regnet_y_400mf",
    "convnext_tiny",
    "swin_t",
    "swin_v2_t",
    "vit_b_32",
    "maxvit_t",
]


def test_families_are_zoo_models():
    assert set(FAMILIES) <= set(zoo_names())
    assert len(zoo_names()) == 80


def test_random_weight_models_depend_on_their_input():
    """Zero-initialised heads (ViT) are redrawn and batch norms that let the signal vanish
    (GoogLeNet, Inception-v3 at random weights) are recalibrated, so checks on them can fail."""
    import torch

    from benchmarks.harness.zoo import MIN_INPUT_DEPENDENCE, build, input_dependence, input_size

    for name in ("googlenet", "inception_v3", "vit_b_32"):
        assert input_dependence(build(name), input_size(name)) > 100 * MIN_INPUT_DEPENDENCE, name
    constant = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 2))
    torch.nn.init.zeros_(constant[1].weight)
    assert input_dependence(constant.eval(), 4) == 0


@pytest.mark.zoo
@pytest.mark.parametrize("name", FAMILIES)
def test_zoo_model(name):
    result = check_model(name, checks=("interpreter", "torch", "onnx"))
    assert "error" not in result, result["error"]
    assert result["input_dependence"] > 1e-3  # the comparisons below could fail
    for check in ("imported", "fused", "interpreter", "torch", "onnx"):
        assert result[check], (check, result["deviation"])


PRUNE_FAMILIES = [
    "resnet18",
    "densenet121",
    "googlenet",
    "squeezenet1_0",
    "shufflenet_v2_x0_5",
    "mobilenet_v3_small",
    "mnasnet0_5",
    "efficientnet_b0",
    "regnet_y_400mf",
    "convnext_tiny",
    "swin_t",
    "vit_b_32",
]


@pytest.mark.zoo
@pytest.mark.parametrize("name", PRUNE_FAMILIES)
def test_zoo_pruning(name):
    """Half of every group's channels removed; the result is proven equal to the masked original
    and runs in torch and ONNX Runtime (the full 80 x 3 configs: benchmarks/prune_zoo.py)."""
    from benchmarks.harness.zoo import check_pruning

    result = check_pruning(name, configs=("uniform50",))
    assert "error" not in result, result["error"]
    r = result["uniform50"]
    assert "error" not in r, r["error"]
    assert r["pruned"] and r["mask-equivalent"] and r["runs"], r
    assert r["macs"] < 0.9
