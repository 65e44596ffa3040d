"""One-shot compression that keeps accuracy: give ``compile`` a few hundred unlabeled images and
every lossy pass reconstructs what it removed (least-squares refits after pruning, learned rounding
after quantization). Prunes the pretrained CIFAR-10 ResNet-20 to 0.7 of its MACs, quantizes it to
int8, and prints top-1 with and without reconstruction; no training, no labels.

Run it: python examples/reconstruct_resnet.py [--depth 56] [--samples 512] [--images 2000]
Needs ../shared/data (or $SLIMGRAPH_DATA); prints why and exits when it is absent.
"""

import argparse
import os
import sys

import torch

# the CIFAR models and data loaders live in the repository's benchmark harness, not the library
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.harness import cifar  # noqa: E402
from compiler import compile  # noqa: E402
from passes.pruning.prune import PruneChannels  # noqa: E402
from passes.quantization.quantize import Quantize  # noqa: E402


def main(depth: int = 20, samples: int = 512, images: int = 2000, batch: int = 64):
    if not cifar.data_available(
        "cifar10/test_dev_2k.npz", "cifar10/train_20k.npz", "resnet_cifar10"
    ):
        print(f"no CIFAR data under {cifar.data_dir()}; set SLIMGRAPH_DATA")
        return None
    x_dev, y_dev = cifar.load_cifar("test_dev_2k")
    x_dev, y_dev = x_dev[:images], y_dev[:images]
    model = cifar.load_pretrained(depth)
    calibration = cifar.calibration_batch(samples, seed=0)  # unlabeled training images
    x = torch.zeros(batch, 3, 32, 32)  # the batch the calibration data is run in
    results = {"float": cifar.evaluate(model, x_dev, y_dev)}
    for name, data in (("weights only", None), ("reconstructed", calibration)):
        # the same passes; with calibration_data every lossy pass reconstructs by default
        passes = ["fuse", PruneChannels(target=0.7), Quantize()]
        if data is None:  # quantize always needs data: without reconstruction it still calibrates
            passes[-1] = Quantize(reconstruct=False, calibration_data=calibration)
        compiled = compile(model, x, passes=passes, calibration_data=data)
        results[name] = cifar.evaluate(compiled, x_dev, y_dev, batch_size=batch)
        print(compiled.report)
    print("top-1 %: " + ", ".join(f"{k} {v:.2f}" for k, v in results.items()))
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=20, choices=[20, 56])
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--images", type=int, default=2000)
    main(**vars(parser.parse_args()))
