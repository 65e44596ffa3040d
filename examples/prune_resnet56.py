"""Prune the pretrained CIFAR-10 ResNet-56 to half its MACs, prove the result, fine-tune it briefly
and save it as ONNX.

Run it: python examples/prune_resnet56.py [--epochs 1] [--out build/]
Needs ../shared/data (or $SLIMGRAPH_DATA); prints why and exits when it is absent.
"""

import argparse
import os
import sys

import torch

# the CIFAR models and data loaders live in the repository's benchmark harness, not the library
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from backends.torch.backend import to_graph  # noqa: E402
from benchmarks.harness import cifar  # noqa: E402
from compiler import compile  # noqa: E402
from compiler.report import graph_stats  # noqa: E402
from passes.pruning.prune import PruneChannels  # noqa: E402


def main(epochs: float = 1.0, out_dir: str = "build", images: int = 2000):
    if not cifar.data_available(
        "cifar10/test_dev_2k.npz", "cifar10/train_20k.npz", "resnet_cifar10"
    ):
        print(f"no CIFAR data under {cifar.data_dir()}; set SLIMGRAPH_DATA")
        return None
    x_dev, y_dev = cifar.load_cifar("test_dev_2k")
    x_dev, y_dev = x_dev[:images], y_dev[:images]
    model = cifar.load_pretrained(56)
    x = torch.zeros(1, 3, 32, 32)

    # 1. Prune before fusing, so the batch norms are still there for fine-tuning. The pass ranks
    #    block-internal channels globally by L1 norm until half the MACs are gone, keeps widths a
    #    multiple of 8, and proves the pruned graph equals the masked original.
    pruner = PruneChannels(target=0.5, scope="global", criterion="l1", round_to=8, shortcut=False)
    pruned = compile(model, x, passes=[pruner])
    print(pruned.report)
    print(
        f"accuracy: float {cifar.evaluate(model, x_dev, y_dev):.2f} %, "
        f"pruned {cifar.evaluate(pruned, x_dev, y_dev, batch_size=1000):.2f} %"
    )

    # 2. A short fine-tune of the pruned network through the torch backend.
    module = pruned.to_torch()
    if epochs > 0:
        x_train, y_train = cifar.load_cifar("train_20k")
        cifar.finetune(module, x_train, y_train, epochs=epochs, lr=0.01)
    tuned = to_graph(module)

    # 3. Fuse and emit ONNX: the fine-tuned, pruned, fused model.
    final = compile(tuned, x, passes=["fuse"], backend="onnx")
    accuracy = cifar.evaluate(final, x_dev, y_dev, batch_size=1)
    macs = graph_stats(final.graph).macs
    print(f"after fine-tune: {accuracy:.2f} %, {macs / 1e6:.1f} M MACs")
    path = os.path.join(out_dir, "resnet56_pruned.onnx")
    final.save(path)
    print(f"wrote {path}")
    return final, accuracy


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--out", default="build")
    args = ap.parse_args()
    main(args.epochs, args.out)
    sys.exit(0)
