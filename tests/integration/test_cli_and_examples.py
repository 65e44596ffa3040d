"""The CLI and every example in examples/ run and do what they say."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from compiler.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_cli_compress_writes_onnx_and_prints_report(tmp_path, capsys):
    out_dir = tmp_path / "new" / "folder"  # created on demand
    code = main(
        [
            "compress",
            "torchvision:squeezenet1_1",
            "--passes",
            "fuse",
            "--emit",
            "onnx",
            "--out",
            str(out_dir),
            "--input-shape",
            "1,3,64,64",
            "--json",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "fold-batch-norm" in out and "max dev" in out
    model = onnx.load(str(out_dir / "squeezenet1_1.onnx"))
    onnx.checker.check_model(model)
    assert (out_dir / "squeezenet1_1.report.json").exists()


def test_cli_user_factory_and_torch_emit(tmp_path, capsys, monkeypatch):
    (tmp_path / "mynet.py").write_text(
        "import torch\n"
        "def make():\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    code = main(
        [
            "compress",
            "mynet:make",
            "--emit",
            "torch",
            "--out",
            str(tmp_path / "o"),
            "--input-shape",
            "1,3,8,8",
        ]
    )
    assert code == 0
    assert (tmp_path / "o" / "make.pt").exists()


def test_cli_errors_are_clear(capsys):
    assert main(["compress", "torchvision:resnet18", "--passes", "fusee"]) == 2
    err = capsys.readouterr().err
    assert "unknown pass 'fusee'" in err and "Fix:" in err
    assert main(["compress", "torchvision:nonet"]) == 2
    assert "no classifier named 'nonet'" in capsys.readouterr().err


def test_cli_lists(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "fold-batch-norm" in out and "fuse" in out and "preset" in out
    assert main(["ops"]) == 0
    assert "conv2d" in capsys.readouterr().out


def test_console_script_entry_point():
    # the installed `slimgraph` script calls compiler.cli:main; run the module the same way
    proc = subprocess.run(
        [sys.executable, "-m", "compiler.cli", "passes"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "remove-noops" in proc.stdout


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_example_is_tested():
    examples = {p.stem for p in (ROOT / "examples").glob("*.py")}
    tested = {"quickstart", "custom_pass", "prune_resnet56", "reconstruct_resnet"}
    assert examples <= tested, f"add a test for {examples - tested}"


def test_example_quickstart(tmp_path):
    compiled = load_example("quickstart").main(str(tmp_path))
    assert os.path.exists(tmp_path / "mobilenet_v2.onnx")
    assert compiled.report.rows[-1].total_deviation < 1e-4


def test_example_custom_pass():
    compiled = load_example("custom_pass").main()
    assert compiled.report.rows[-1].name.startswith("round-weights")


def test_cli_groups(capsys):
    assert main(["groups", "torchvision:resnet18", "--input-shape", "1,3,32,32"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("12 prunable groups")
    assert "layer1.0.conv1, layer1.0.conv2" in out


def test_example_prune_resnet56(tmp_path):
    from benchmarks.harness import cifar

    if not cifar.data_available("cifar10/test_dev_2k.npz", "resnet_cifar10"):
        pytest.skip(f"no CIFAR data under {cifar.data_dir()} (set SLIMGRAPH_DATA)")
    final, accuracy = load_example("prune_resnet56").main(
        epochs=0.02, out_dir=str(tmp_path), images=200
    )
    assert (tmp_path / "resnet56_pruned.onnx").exists()
    assert 10 < accuracy <= 100  # a tiny fine-tune: well above chance, checked end to end
    from compiler.report import graph_stats

    assert graph_stats(final.graph).macs < 0.55 * 125_489_792


def test_example_reconstruct_resnet():
    from benchmarks.harness import cifar

    if not cifar.data_available(
        "cifar10/test_dev_2k.npz", "cifar10/train_20k.npz", "resnet_cifar10"
    ):
        pytest.skip(f"no CIFAR data under {cifar.data_dir()} (set SLIMGRAPH_DATA)")
    results = load_example("reconstruct_resnet").main(samples=128, images=500)
    # pruned to 0.7 of the MACs and int8: reconstruction is what keeps it near the float model
    assert results["reconstructed"] > results["weights only"] + 5
    assert results["reconstructed"] > results["float"] - 15


def test_cli_pass_options(tmp_path, capsys):
    code = main(
        [
            "compress",
            "torchvision:resnet18",
            "--input-shape",
            "1,3,32,32",
            "--out",
            str(tmp_path),
            "--passes",
            "prune-channels(ratio=0.25, round_to=8),fuse",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "prune-channels(ratio=0.25, round_to=8)" in out
    assert main(["compress", "torchvision:resnet18", "--passes", "prune-channels(ratio=2)"]) == 2
    assert "outside [0, 1)" in capsys.readouterr().err
