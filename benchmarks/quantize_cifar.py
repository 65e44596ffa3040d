"""Post-training quantization of the pretrained CIFAR-10 ResNet-20 and ResNet-56: slimgraph's
``quantize`` (int8, and mixed precision) against ONNX Runtime's own ``quantize_static`` (QDQ, U8S8,
per channel) on the same fused model and the same calibration images; accuracy on test_dev_2k
(run in ONNX Runtime, integer kernels), file sizes, and batch-1 latency in ONNX Runtime (fp32 vs
int8, medians of interleaved repeats, 1 thread) with the share of kernel time in integer kernels;
numba fp32 vs numba int8 (integer kernels); prune-then-quantize and share-then-quantize.

    python benchmarks/quantize_cifar.py                         # both models (minutes)
    python benchmarks/quantize_cifar.py --depths 20 --calibrators percentile --repeats 50

Needs ../shared/data (or $SLIMGRAPH_DATA).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import torch  # noqa: E402

from backends.onnx.backend import OnnxModel, compile_onnx  # noqa: E402
from backends.onnx.quant import is_integer_kernel, kernel_profile  # noqa: E402
from benchmarks.harness import cifar  # noqa: E402
from compiler.api import compile  # noqa: E402
from passes.quantization.quantize import Quantize  # noqa: E402


def ort_quantize_static(fp32: onnx.ModelProto, calib: np.ndarray) -> onnx.ModelProto:
    """ONNX Runtime's static quantization: QDQ, uint8 activations, int8 per-channel weights."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    name = fp32.graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.rows = iter(range(len(calib)))

        def get_next(self):
            i = next(self.rows, None)
            return None if i is None else {name: calib[i : i + 1]}

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "fp32.onnx"), os.path.join(tmp, "int8.onnx")
        onnx.save(fp32, src)
        quantize_static(
            src,
            dst,
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
        return onnx.load(dst)


def ort_accuracy(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray) -> float:
    runner = OnnxModel(model, threads=1)
    return cifar.evaluate(lambda batch: runner.run(batch)[0], x, y, batch_size=1)


def latencies(models: dict[str, onnx.ModelProto], repeats: int) -> dict[str, float]:
    """Median batch-1 ms per model, one thread, measured in interleaved rounds."""
    x = np.random.default_rng(0).random((1, 3, 32, 32), dtype=np.float32)
    runners = {k: OnnxModel(m, threads=1) for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in models}
    for r in runners.values():
        for _ in range(20):
            r.run(x)
    for _ in range(repeats):
        for k, r in runners.items():
            t = time.perf_counter()
            for _ in range(10):
                r.run(x)
            times[k].append((time.perf_counter() - t) / 10)
    return {k: 1000 * statistics.median(v) for k, v in times.items()}


def numba_latencies(graphs: dict, repeats: int) -> dict[str, float]:
    """Median batch-1 ms of each graph in the numba backend, interleaved rounds."""
    from backends.numba.backend import compile_numba

    x = np.random.default_rng(0).random((1, 3, 32, 32), dtype=np.float32)
    models = {k: compile_numba(g) for k, g in graphs.items()}
    times: dict[str, list[float]] = {k: [] for k in models}
    for m in models.values():
        for _ in range(10):
            m.run(x)
    for _ in range(repeats):
        for k, m in models.items():
            t = time.perf_counter()
            m.run(x)
            times[k].append(time.perf_counter() - t)
    return {k: 1000 * statistics.median(v) for k, v in times.items()}


def integer_share(model: onnx.ModelProto) -> float:
    x = np.random.default_rng(0).random((1, 3, 32, 32), dtype=np.float32)
    kernels = kernel_profile(model, [x], runs=20)
    return sum(v for k, v in kernels.items() if is_integer_kernel(k)) / sum(kernels.values())


def add_then_quantized(rows: dict, name: str, graph, calib, x_dev, y_dev) -> None:
    """Rows ``<name> fp32`` and ``<name> + int8``: a compressed graph, then it quantized."""
    start = time.perf_counter()
    q = compile(graph, passes=[Quantize()], calibration_data=calib, check=False).graph
    seconds = time.perf_counter() - start
    for label, g, sec in ((f"{name} fp32", graph, 0.0), (f"{name} + int8", q, seconds)):
        emitted = compile_onnx(g).model
        rows[label] = (emitted, ort_accuracy(emitted, x_dev, y_dev), sec)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depths", default="20,56")
    ap.add_argument("--calibrators", default="minmax,percentile")
    ap.add_argument("--calibration", type=int, default=256, help="calibration images")
    ap.add_argument("--mixed", default="6", help="average weight bits for mixed precision")
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument(
        "--prune",
        type=float,
        default=0.8,
        help="also prune to this MAC fraction, then quantize (0: skip)",
    )
    ap.add_argument(
        "--share",
        type=int,
        default=5,
        help="also share weights at these bits (8 codebooks per layer, no "
        "fine-tune), then quantize (0: skip)",
    )
    args = ap.parse_args()
    if not cifar.data_available("cifar10/test_dev_2k.npz", "resnet_cifar10"):
        print(f"quantize_cifar: skipped, no data under {cifar.data_dir()}")
        return 0
    torch.set_num_threads(1)
    x_dev, y_dev = cifar.load_cifar("test_dev_2k")
    calib = cifar.calibration_batch(args.calibration)
    summary = []
    for depth in [int(d) for d in args.depths.split(",") if d]:
        model = cifar.load_pretrained(depth)
        graph = compile(model, torch.zeros(1, 3, 32, 32), passes=["fuse"], check=False).graph
        fp32 = compile_onnx(graph).model
        rows = {"fp32": (fp32, cifar.evaluate(model, x_dev, y_dev), 0.0)}
        ours_name = f"slimgraph int8 ({args.calibrators.split(',')[0]})"
        ours_graph = {}
        for cal in [c for c in args.calibrators.split(",") if c]:
            start = time.perf_counter()
            q = compile(
                graph, passes=[Quantize(calibrator=cal)], calibration_data=calib, check=False
            ).graph
            seconds = time.perf_counter() - start
            emitted = compile_onnx(q).model
            ours_graph.setdefault("int8", q)
            rows[f"slimgraph int8 ({cal})"] = (
                emitted,
                ort_accuracy(emitted, x_dev, y_dev),
                seconds,
            )
        for bits in [float(b) for b in args.mixed.split(",") if b]:
            from passes.quantization.quantize import QuantizeMixed

            start = time.perf_counter()
            q = compile(
                graph,
                passes=[QuantizeMixed(average_bits=bits)],
                calibration_data=calib,
                check=False,
            ).graph
            seconds = time.perf_counter() - start
            emitted = compile_onnx(q).model
            rows[f"slimgraph mixed ({bits:g} bits)"] = (
                emitted,
                ort_accuracy(emitted, x_dev, y_dev),
                seconds,
            )
        if args.prune:
            from passes.pruning.prune import PruneChannels

            unfused = compile(model, torch.zeros(1, 3, 32, 32), check=False).graph
            pruned = compile(
                unfused,
                passes=[
                    PruneChannels(target=args.prune, scope="global", round_to=4, shortcut=False),
                    "fuse",
                ],
                check=False,
            ).graph
            add_then_quantized(rows, f"pruned {args.prune:g} MACs", pruned, calib, x_dev, y_dev)
        if args.share:  # share then quantize: int8 centroids behind the packed indices
            from passes.weight_sharing import ShareWeights

            shared = compile(
                graph, passes=[ShareWeights(bits=args.share, groups=8)], check=False
            ).graph
            add_then_quantized(rows, f"shared {args.share} bits", shared, calib, x_dev, y_dev)
        start = time.perf_counter()
        ort_q = ort_quantize_static(fp32, calib)
        rows["ORT quantize_static"] = (
            ort_q,
            ort_accuracy(ort_q, x_dev, y_dev),
            time.perf_counter() - start,
        )
        ms = latencies({k: m for k, (m, _, _) in rows.items()}, args.repeats)
        base_bytes = len(fp32.SerializeToString())
        print(f"\nResNet-{depth} (test_dev_2k, {args.calibration} calibration images)")
        print(
            f"{'model':32} {'acc %':>6} {'file KB':>8} {'smaller':>7} {'ORT ms':>7} "
            f"{'speedup':>7} {'int kernels':>11} {'quantize s':>10}"
        )
        for name, (m, acc, seconds) in rows.items():
            size = len(m.SerializeToString())
            share = integer_share(m)
            print(
                f"{name:32} {acc:6.2f} {size / 1024:8.1f} {base_bytes / size:6.2f}x "
                f"{ms[name]:7.3f} {ms['fp32'] / ms[name]:6.2f}x {100 * share:10.1f}% "
                f"{seconds:10.1f}"
            )
        nb = numba_latencies({"fp32": graph, "int8": ours_graph["int8"]}, args.repeats)
        print(
            f"numba (1 thread): fp32 {nb['fp32']:.3f} ms, {ours_name} {nb['int8']:.3f} ms "
            f"({nb['fp32'] / nb['int8']:.2f}x)"
        )
        ours = max((k for k in rows if k.startswith("slimgraph int8")), key=lambda k: rows[k][1])
        summary.append(
            f"ResNet-{depth}: fp32 {rows['fp32'][1]:.2f} %, {ours} {rows[ours][1]:.2f} %, "
            f"ORT quantize_static {rows['ORT quantize_static'][1]:.2f} %, "
            f"{base_bytes / len(rows[ours][0].SerializeToString()):.1f}x smaller, "
            f"{ms['fp32'] / ms[ours]:.2f}x faster in ORT, "
            f"{nb['fp32'] / nb['int8']:.2f}x in numba"
        )
    print("\nquantize_cifar: " + "; ".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
