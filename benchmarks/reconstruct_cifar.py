"""One-shot channel pruning of the pretrained CIFAR-10 ResNet-56 with and without least-squares
reconstruction (compiler/analysis/reconstruct.py): top-1 on test_dev_2k, side by side, no
fine-tuning.

    python benchmarks/reconstruct_cifar.py                   # targets 0.7 and 0.5, 512 images
    python benchmarks/reconstruct_cifar.py --targets 0.5 --samples 256

The pruning is what a user gets by default: passes "fuse" then ``prune-channels(target=t)`` (l2
criterion, uniform scope, round_to=1). Reconstruction adds ``calibration_data`` (``--samples``
random train_20k images, no labels), which turns it on; the row "yes, Y = conv + b" also sets
``reconstruct_residual=False`` (fit the original's conv + b, not conv + b + residual minus the
pruned residual). The graph is traced with batch
``--batch`` (the calibration data is run in batches of that size).

Needs ../shared/data (or $SLIMGRAPH_DATA).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

from benchmarks.harness import cifar  # noqa: E402
from compiler.api import compile  # noqa: E402
from compiler.report import graph_stats  # noqa: E402
from passes.pruning.prune import PruneChannels  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=float, nargs="+", default=[0.7, 0.5])
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args()

    torch.manual_seed(0)
    x_dev, y_dev = cifar.load_cifar("test_dev_2k")
    calib = cifar.calibration_batch(args.samples, seed=0)
    model = cifar.load_pretrained(56)
    fused = compile(model, torch.zeros(args.batch, 3, 32, 32), passes=["fuse"], check=False).graph
    base_macs = graph_stats(fused).macs
    float_acc = cifar.evaluate(model, x_dev, y_dev)
    rows = [("float", "-", 1.0, float_acc, None, None, None)]
    for target in args.targets:
        for rebuild in ("no", "yes", "yes, Y = conv + b"):
            options = {"target": target}
            if rebuild != "no":
                options.update(calibration_data=calib, progress=args.progress)
            if rebuild == "yes, Y = conv + b":
                options.update(reconstruct_residual=False)
            start = time.perf_counter()
            compiled = compile(fused.clone(), passes=[PruneChannels(**options)], check=False)
            seconds = time.perf_counter() - start
            info = compiled.graph.meta["pruning"].get("reconstruction")
            acc = cifar.evaluate(compiled.to_torch(), x_dev, y_dev, batch_size=args.batch)
            macs = graph_stats(compiled.graph).macs / base_macs
            rows.append(("prune", rebuild, macs, acc, seconds, info, target))

    threads = torch.get_num_threads()
    print(f"ResNet-56, CIFAR-10 test_dev_2k top-1, no fine-tuning; {args.samples} calibration")
    print(f"images from train_20k (no labels), batch {args.batch}; {threads} threads")
    print()
    header = "model | target | reconstruct | MACs kept | top-1 % | pass s | refit s | deviation"
    print(f"| {header} |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for kind, rebuild, macs, acc, seconds, info, target in rows:
        tgt = "-" if target is None else f"{target:g}"
        sec = "-" if seconds is None else f"{seconds:.1f}"
        refit = "-" if info is None else f"{info['seconds']:.1f}"
        dev = (
            "-"
            if info is None
            else f"{info['deviation_before']:.3f} -> {info['deviation_after']:.3f}"
            f" ({info['layers']} layers)"
        )
        print(f"| {kind} | {tgt} | {rebuild} | {macs:.3f} | {acc:.2f} | {sec} | {refit} | {dev} |")
    print()
    by = {(r[6], r[1]): r[3] for r in rows if r[6] is not None}
    parts = [f"target {t:g}: {by[(t, 'no')]:.1f} % -> {by[(t, 'yes')]:.1f} %" for t in args.targets]
    print(f"summary: float {float_acc:.1f} %; reconstruction " + "; ".join(parts))


if __name__ == "__main__":
    main()
