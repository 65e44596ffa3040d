"""One-shot compression of the pretrained CIFAR-10 ResNet-56 (or -20) with and without
reconstruction on calibration data (compiler/analysis/reconstruct.py): top-1 on test_dev_2k, side
by side, no fine-tuning.

    python benchmarks/reconstruct_cifar.py                   # pruning to 0.7 and 0.5, 512 images
    python benchmarks/reconstruct_cifar.py --targets 0.5 --samples 256
    python benchmarks/reconstruct_cifar.py --quantize --targets   # int8 and W4A8 only

The pruning is what a user gets by default: passes "fuse" then ``prune-channels(target=t)`` (l2
criterion, uniform scope, round_to=1). Reconstruction adds ``calibration_data`` (``--samples``
random train_20k images, no labels), which turns it on; the row "yes, Y = conv + b" also sets
``reconstruct_residual=False`` (fit the original's conv + b, not conv + b + residual minus the
pruned residual). The graph is traced with batch
``--batch`` (the calibration data is run in batches of that size).

Quantization (``--quantize``): ``quantize`` with 8- and 4-bit weights (uint8 activations, minmax
calibrator, per-channel weight scales: the defaults) on the same calibration images, with nearest
rounding (``reconstruct=False``) and with the default learned rounding (AdaRound on the engine);
accuracy in ONNX Runtime (integer kernels for int8), next to ORT's own ``quantize_static`` (QDQ,
U8S8, per channel) of the same fused model on the same images.

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
    parser.add_argument("--depth", type=int, default=56, choices=[20, 56])
    parser.add_argument("--targets", type=float, nargs="*", default=[0.7, 0.5])
    parser.add_argument("--quantize", action="store_true", help="add int8 and W4A8 rows")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args()

    torch.manual_seed(0)
    x_dev, y_dev = cifar.load_cifar("test_dev_2k")
    calib = cifar.calibration_batch(args.samples, seed=0)
    model = cifar.load_pretrained(args.depth)
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
    if args.quantize:
        rows += quantize_rows(fused, calib, x_dev, y_dev, args)

    threads = torch.get_num_threads()
    print(f"ResNet-{args.depth}, CIFAR-10 test_dev_2k top-1, no fine-tuning;")
    print(f"{args.samples} calibration images from train_20k (no labels), batch {args.batch};")
    print(f"{threads} threads")
    print()
    header = "model | target | reconstruct | MACs kept | top-1 % | pass s | refit s | deviation"
    if args.quantize:
        print("quantized rows run in ONNX Runtime; the target column is the weight bits")
    print(f"| {header} |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for kind, rebuild, macs, acc, seconds, info, target in rows:
        tgt = "-" if target is None else (target if isinstance(target, str) else f"{target:g}")
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
    parts = [f"prune {t:g}: {by[(t, 'no')]:.1f} % -> {by[(t, 'yes')]:.1f} %" for t in args.targets]
    quant = {(r[6], r[1]): r[3] for r in rows if r[0].startswith("quantize")}
    parts += [
        f"W{bits}A8: {quant[(bits, 'no')]:.1f} % -> {quant[(bits, 'yes')]:.1f} %"
        for bits in (8, 4)
        if (bits, "no") in quant
    ]
    if ("ORT", "ORT quantize_static") in quant:
        parts.append(f"ORT quantize_static int8 {quant[('ORT', 'ORT quantize_static')]:.1f} %")
    print(f"summary: ResNet-{args.depth} float {float_acc:.1f} %; " + "; ".join(parts))


def quantize_rows(fused, calib, x_dev, y_dev, args) -> list:
    """int8 and W4A8 with nearest and learned rounding, and ORT's quantize_static, run in ORT."""
    from backends.onnx.backend import OnnxModel, compile_onnx
    from benchmarks.quantize_cifar import ort_quantize_static
    from passes.quantization.quantize import Quantize

    rows = []
    for bits in (8, 4):
        for rebuild in ("no", "yes"):
            options = {"weight_bits": bits, "reconstruct": rebuild == "yes"}
            start = time.perf_counter()
            compiled = compile(
                fused.clone(),
                passes=[Quantize(**options, progress=args.progress)],
                calibration_data=calib,
                check=False,
            )
            seconds = time.perf_counter() - start
            info = compiled.graph.meta["quantization"].get("reconstruction")
            runner = compile_onnx(compiled.graph)
            acc = cifar.evaluate(
                lambda b, r=runner: r.run(b)[0], x_dev, y_dev, batch_size=args.batch
            )
            rows.append((f"quantize W{bits}A8", rebuild, 1.0, acc, seconds, info, bits))
    start = time.perf_counter()
    fp32 = compile_onnx(fused).model
    ort = OnnxModel(ort_quantize_static(fp32, calib))
    seconds = time.perf_counter() - start
    acc = cifar.evaluate(lambda b: ort.run(b)[0], x_dev, y_dev, batch_size=args.batch)
    rows.append(("quantize int8", "ORT quantize_static", 1.0, acc, seconds, None, "ORT"))
    return rows


if __name__ == "__main__":
    main()
