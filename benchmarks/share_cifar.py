"""Share the weights of the pretrained CIFAR-10 ResNet-56 at 8, 5, 4 and 3 bits: accuracy on
test_dev_2k without and with a short centroid fine-tune, ONNX and numba artifact bytes (on disk and
zipped) against fp32, numba decode-at-load vs decode-per-call; then the Deep-Compression-style
pipeline prune + share (+ int8 with ``--pipeline-quantize``) with its total compression ratio.

With ``--aware``, instead: weight-only against output-aware codebooks (``share-weights`` given
``--samples`` unlabeled train_20k images as calibration data), side by side per model and bit width,
no fine-tune, with the float model's accuracy and the reconstruction's seconds (wall and CPU) and
output deviation on the calibration data.

    python benchmarks/share_cifar.py                          # the full table (tens of minutes)
    python benchmarks/share_cifar.py --bits 4 --epochs 0.1 --no-pipeline
    python benchmarks/share_cifar.py --aware                  # ResNet-56 and -20 at 4, 3, 2 bits
    python benchmarks/share_cifar.py --aware --depths 20 --bits 3 --samples 256

Needs ../shared/data (or $SLIMGRAPH_DATA).
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import backends.numba.codebook as numba_codebook  # noqa: E402
from backends.numba.backend import compile_numba  # noqa: E402
from backends.onnx.backend import compile_onnx  # noqa: E402
from backends.torch.backend import compile_torch, mean_centroid_gradients, to_graph  # noqa: E402
from benchmarks.harness import cifar  # noqa: E402
from compiler.api import compile  # noqa: E402
from compiler.pass_manager import PassManager  # noqa: E402
from passes.pruning.prune import PruneChannels  # noqa: E402
from passes.quantization.quantize import Quantize  # noqa: E402
from passes.weight_sharing import ShareWeights  # noqa: E402

BATCH = 50  # traced batch of the ONNX and numba artifacts (the torch module takes any)


def zipped_size(files: dict[str, bytes]) -> int:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return len(buf.getvalue())


def onnx_sizes(graph) -> tuple[int, int, object]:
    model = compile_onnx(graph, threads=1)
    data = model.model.SerializeToString()
    return len(data), zipped_size({"model.onnx": data}), model


def numba_sizes(graph) -> tuple[int, int, object]:
    """Bytes of the saved numba package's weights.npz (the code is the same for every model)."""
    model = compile_numba(graph)
    with tempfile.TemporaryDirectory() as tmp:
        path = model.save(Path(tmp) / "pkg")
        data = (path / "weights.npz").read_bytes()
    return len(data), zipped_size({"weights.npz": data}), model


def numba_modes(dense, repeats: int) -> dict[str, tuple[float, int]]:
    """Median latency (ms) and resident bytes (the weights dict after a call, plus the activation
    arena) of the numba model of ``dense``, and of it shared at 4 bits with the weights decoded
    at load or per call; the three run in rotation so machine load hits them alike."""
    shared = compile(dense, passes=[ShareWeights(bits=4)], check=False).graph
    x = np.random.default_rng(0).random(dense.inputs[0].shape, dtype=np.float32)
    models = {"dense": compile_numba(dense)}
    for mode in ("load", "call"):
        numba_codebook.CODEBOOK_DECODE = mode
        models[mode] = compile_numba(shared)
    numba_codebook.CODEBOOK_DECODE = "load"
    for m in models.values():
        m.run(x)
    times: dict[str, list[float]] = {mode: [] for mode in models}
    for _ in range(repeats):
        for mode, m in models.items():
            t = time.perf_counter()
            m.run(x)
            times[mode].append(time.perf_counter() - t)
    out = {}
    for mode, m in models.items():
        resident = sum(v.nbytes for v in m.model.w.values() if v is not None) + m.peak_bytes
        out[mode] = (1000 * statistics.median(times[mode]), resident)
    return out


def evaluate_onnx(model, x, y) -> float:
    return cifar.evaluate(lambda batch: model.run(batch)[0], x, y, batch_size=BATCH)


def share_and_tune(graph, bits: int, epochs: float, lr: float, data, groups: int = 1):
    """Share ``graph`` at ``bits``; returns (graph, acc before, acc after fine-tune, seconds)."""
    x_dev, y_dev, x_train, y_train = data
    shared = compile(graph, passes=[ShareWeights(bits=bits, groups=groups)], check=False).graph
    module = compile_torch(shared)
    acc0 = cifar.evaluate(module, x_dev, y_dev)
    acc1, seconds = float("nan"), 0.0
    if epochs > 0:
        start = time.perf_counter()
        mean_centroid_gradients(module)  # SGD on the mean, not the sum, of member gradients
        cifar.finetune(module, x_train, y_train, epochs=epochs, lr=lr)
        seconds = time.perf_counter() - start
        acc1 = cifar.evaluate(module, x_dev, y_dev)
        shared = to_graph(module)
    return shared, acc0, acc1, seconds


def aware_rows(depth: int, bit_widths: list[int], args, x_dev, y_dev) -> list[dict]:
    """Float, then per bit width weight-only and output-aware sharing of the pretrained ResNet-
    ``depth`` (fused, traced at batch ``args.batch``), top-1 on test_dev_2k without fine-tuning."""
    model = cifar.load_pretrained(depth)
    fused = compile(model, torch.zeros(args.batch, 3, 32, 32), passes=["fuse"], check=False).graph
    calib = cifar.calibration_batch(args.samples, seed=0)
    rows = [{"model": f"ResNet-{depth}", "bits": None, "kind": "float", "acc": None}]
    rows[0]["acc"] = cifar.evaluate(model, x_dev, y_dev)
    print(f"ResNet-{depth} float: {rows[0]['acc']:.2f} %", flush=True)
    for bits in bit_widths:
        for kind in ("weight-only", "output-aware"):
            options = {"bits": bits, "groups": args.groups}
            if kind == "output-aware":
                options["calibration_data"] = calib
            graph = fused.clone()
            wall, cpu = time.perf_counter(), time.process_time()
            PassManager(passes=[ShareWeights(**options)]).run(graph)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            acc = cifar.evaluate(compile_torch(graph), x_dev, y_dev)
            info = graph.meta["weight_sharing"].get("reconstruction")
            rows.append(
                {
                    "model": f"ResNet-{depth}",
                    "bits": bits,
                    "kind": kind,
                    "acc": acc,
                    "wall": wall,
                    "cpu": cpu,
                    "info": info,
                }
            )
            print(f"ResNet-{depth} {bits} bits {kind}: {acc:.2f} % ({wall:.1f} s)", flush=True)
    return rows


def print_aware(rows: list[dict], args) -> None:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print()
    print(
        f"CIFAR-10 test_dev_2k top-1, no fine-tune; output-aware: {args.samples} unlabeled "
        f"train_20k images (batch {args.batch}), {args.groups} codebook(s) per layer; "
        f"{os.cpu_count()} CPUs, load average {load:.1f} at the end"
    )
    print()
    print(
        "| model | bits | weight-only % | output-aware % | vs float (weight-only / aware) | "
        "pass s (wall / CPU) | deviation on calibration data |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    floats = {r["model"]: r["acc"] for r in rows if r["kind"] == "float"}
    pairs: dict[tuple, dict] = {}
    for r in rows:
        if r["kind"] != "float":
            pairs.setdefault((r["model"], r["bits"]), {})[r["kind"]] = r
    for model, acc in floats.items():
        print(f"| {model} | float | {acc:.2f} | {acc:.2f} | | | |")
        for (m, bits), pair in pairs.items():
            if m != model:
                continue
            plain, aware = pair["weight-only"], pair["output-aware"]
            info = aware["info"]
            print(
                f"| {model} | {bits} | {plain['acc']:.2f} | **{aware['acc']:.2f}** | "
                f"{plain['acc'] - acc:+.2f} / {aware['acc'] - acc:+.2f} | "
                f"{aware['wall']:.1f} / {aware['cpu']:.1f} | "
                f"{info['deviation_before']:.3f} -> {info['deviation_after']:.3f} |"
            )
    print()
    bounds = {4: 1.0, 3: 3.0}
    parts, met = [], True
    for (model, bits), pair in pairs.items():
        drop = floats[model] - pair["output-aware"]["acc"]
        parts.append(
            f"{model} {bits} bits {pair['output-aware']['acc'] - floats[model]:+.2f} (weight-only "
            f"{pair['weight-only']['acc'] - floats[model]:+.2f})"
        )
        if bits in bounds and drop > bounds[bits]:
            met = False
    slowest = max(
        (p["output-aware"]["wall"] for (m, _), p in pairs.items() if m == "ResNet-56"),
        default=float("nan"),
    )
    print(
        "share_cifar: output-aware vs float: " + "; ".join(parts) + f"; bounds (4 bits within 1 "
        f"pt, 3 within 3) {'met' if met else 'NOT met'}; slowest ResNet-56 pass {slowest:.0f} s"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--aware",
        action="store_true",
        help="compare weight-only and output-aware codebooks (no fine-tune, no artifacts)",
    )
    ap.add_argument("--depths", default="56,20", help="--aware: CIFAR ResNet depths")
    ap.add_argument("--samples", type=int, default=512, help="--aware: calibration images")
    ap.add_argument("--batch", type=int, default=64, help="--aware: traced batch")
    ap.add_argument("--bits", default=None, help="bit widths (default 8,5,4,3; --aware: 4,3,2)")
    ap.add_argument("--epochs", type=float, default=0.25, help="centroid fine-tune, in epochs")
    ap.add_argument(
        "--lr",
        type=float,
        default=1e-3,
        help="centroid fine-tune learning rate (on the mean member gradient)",
    )
    ap.add_argument("--groups", type=int, default=1, help="codebooks per layer")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--no-pipeline", action="store_true")
    ap.add_argument(
        "--baseline-finetune",
        action="store_true",
        help="also fine-tune the dense model the same way (the gain of tuning alone)",
    )
    ap.add_argument(
        "--prune-target",
        type=float,
        default=0.4,
        help="fraction of the params prune-channels keeps in the pipeline",
    )
    ap.add_argument("--prune-epochs", type=float, default=0.5)
    ap.add_argument("--pipeline-bits", default="4")
    ap.add_argument(
        "--pipeline-quantize",
        action="store_true",
        help="then quantize the pipeline's shared model to int8 (calibrated)",
    )
    ap.add_argument(
        "--pruned-cache",
        default="",
        help="pickle of the pruned, fine-tuned, fused graph: reused when it was made "
        "with the same --prune-target and --prune-epochs (the fine-tune is the long "
        "part), written otherwise",
    )
    ap.add_argument(
        "--calibration", type=int, default=256, help="training images the int8 step calibrates on"
    )
    ap.add_argument("--threads", type=int, default=2, help="torch threads for the fine-tunes")
    args = ap.parse_args()
    if args.bits is None:
        args.bits = "4,3,2" if args.aware else "8,5,4,3"
    if not cifar.data_available(
        "cifar10/test_dev_2k.npz", "cifar10/train_20k.npz", "resnet_cifar10"
    ):
        print(f"share_cifar: skipped, no data under {cifar.data_dir()}")
        return 0
    torch.set_num_threads(args.threads)
    x_dev, y_dev = cifar.load_cifar("test_dev_2k")
    if args.aware:
        bit_widths = [int(b) for b in args.bits.split(",") if b]
        rows = []
        for depth in [int(d) for d in args.depths.split(",") if d]:
            rows += aware_rows(depth, bit_widths, args, x_dev, y_dev)
        print_aware(rows, args)
        return 0
    x_train, y_train = cifar.load_cifar("train_20k")
    data = (x_dev, y_dev, x_train, y_train)
    model = cifar.load_pretrained(56)
    unfused = compile(model, torch.zeros(BATCH, 3, 32, 32), check=False).graph
    dense = compile(unfused, passes=["fuse"], check=False).graph
    base_acc = cifar.evaluate(model, x_dev, y_dev)
    fp32_onnx, fp32_onnx_zip, fp32_model = onnx_sizes(dense)
    fp32_numba, fp32_numba_zip, _ = numba_sizes(dense)
    fp32_ort = evaluate_onnx(fp32_model, x_dev, y_dev)
    print(
        f"fp32: {base_acc:.2f} %, ONNX {fp32_onnx} B ({fp32_onnx_zip} zipped), numba weights "
        f"{fp32_numba} B ({fp32_numba_zip} zipped), ORT {fp32_ort:.2f} %",
        flush=True,
    )
    rows = []
    if args.baseline_finetune:  # what the same fine-tune does to the dense model, for comparison
        module = compile_torch(dense)
        cifar.finetune(module, x_train, y_train, epochs=args.epochs, lr=args.lr)
        print(
            f"fp32 after the same fine-tune: {cifar.evaluate(module, x_dev, y_dev):.2f} %",
            flush=True,
        )
    for bits in [int(b) for b in args.bits.split(",") if b]:
        shared, acc0, acc1, secs = share_and_tune(
            dense, bits, args.epochs, args.lr, data, args.groups
        )
        size, zsize, onnx_model = onnx_sizes(shared)
        nsize, nzsize, _ = numba_sizes(shared)
        ort_acc = evaluate_onnx(onnx_model, x_dev, y_dev)
        rows.append((f"share {bits} bits", acc0, acc1, ort_acc, size, zsize, nsize, nzsize))
        print(rows[-1], f"fine-tune {secs:.0f} s", flush=True)
    if not args.no_pipeline:
        bits = [int(b) for b in args.pipeline_bits.split(",") if b]
        for row in pipeline(unfused, bits, args, data):
            rows.append(row)
            print(row, flush=True)
    batch1 = compile(model, torch.zeros(1, 3, 32, 32), passes=["fuse"], check=False).graph
    modes = numba_modes(batch1, args.repeats)
    print_table(base_acc, rows, fp32_onnx, fp32_onnx_zip, fp32_numba, fp32_numba_zip, args)
    print(
        f"numba, batch 1, median of {args.repeats}: dense "
        f"{modes['dense'][0]:.2f} ms, resident {modes['dense'][1]} B; 4-bit shared decoded at "
        f"load {modes['load'][0]:.2f} ms, resident {modes['load'][1]} B; decoded per call "
        f"{modes['call'][0]:.2f} ms, resident {modes['call'][1]} B"
    )
    return 0


def pipeline(unfused, bit_widths: list[int], args, data) -> list[tuple]:
    """prune-channels (block-internal, l1, params target) on the unfused graph, fine-tune with live
    batch norms, fuse; then for each bit width share and fine-tune the centroids (the pruned,
    fine-tuned model is made once: its fine-tune is the long part)."""
    x_dev, y_dev, x_train, y_train = data
    cache = Path(args.pruned_cache) if args.pruned_cache else None
    key = (args.prune_target, args.prune_epochs)
    if cache is not None and cache.exists() and pickle.loads(cache.read_bytes())[0] == key:
        _, fused, acc_pruned = pickle.loads(cache.read_bytes())  # the same pruning, fine-tuned
    else:
        pruner = PruneChannels(
            target=args.prune_target,
            target_metric="params",
            scope="global",
            criterion="l1",
            round_to=4,
            shortcut=False,
        )
        pruned = unfused.clone()
        PassManager(passes=[pruner]).run(pruned)
        module = compile_torch(pruned)
        if args.prune_epochs > 0:
            cifar.finetune(module, x_train, y_train, epochs=args.prune_epochs, lr=0.01)
        acc_pruned = cifar.evaluate(module, x_dev, y_dev)
        fused = compile(to_graph(module), passes=["fuse"], check=False).graph
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_bytes(pickle.dumps((key, fused, acc_pruned)))
    print(
        f"pipeline: pruned to {args.prune_target} of the params, {acc_pruned:.2f} % after "
        f"{args.prune_epochs} epochs",
        flush=True,
    )
    rows = []
    for bits in bit_widths:
        shared, acc0, acc1, _ = share_and_tune(fused, bits, args.epochs, args.lr, data, args.groups)
        size, zsize, onnx_model = onnx_sizes(shared)
        nsize, nzsize, _ = numba_sizes(shared)
        ort_acc = evaluate_onnx(onnx_model, x_dev, y_dev)
        rows.append(
            (
                f"prune {args.prune_target}+share {bits}",
                acc0,
                acc1,
                ort_acc,
                size,
                zsize,
                nsize,
                nzsize,
            )
        )
        print(rows[-1], flush=True)  # before the int8 step: a failure there keeps this row
        if args.pipeline_quantize:  # Deep Compression's third step: int8 centroids, activations
            calib = x_train[: max(1, args.calibration // BATCH) * BATCH]  # whole traced batches
            quant = compile(shared, passes=[Quantize(calibration_data=calib)], check=False).graph
            size, zsize, onnx_model = onnx_sizes(quant)
            nsize, nzsize, _ = numba_sizes(quant)
            q_acc = evaluate_onnx(onnx_model, x_dev, y_dev)
            rows.append(
                (
                    f"prune {args.prune_target}+share {bits}+int8",
                    acc1,
                    float("nan"),
                    q_acc,
                    size,
                    zsize,
                    nsize,
                    nzsize,
                )
            )
    return rows


def print_table(base_acc, rows, fp32_onnx, fp32_zip, fp32_numba, fp32_numba_zip, args) -> None:
    print()
    print(
        f"ResNet-56, test_dev_2k top-1; fine-tune {args.epochs} epoch of train_20k, lr "
        f"{args.lr} on mean centroid gradients, {args.groups} codebooks per layer; sizes in "
        "bytes, x = fp32 / this"
    )
    print(
        f"{'config':22s} {'acc':>6s} {'acc+ft':>6s} {'ORT':>6s} {'ONNX':>8s} {'x':>5s} "
        f"{'zipped':>8s} {'x':>5s} {'numba':>8s} {'x':>5s} {'zipped':>8s} {'x':>5s}"
    )
    print(
        f"{'fp32':22s} {base_acc:6.2f} {base_acc:6.2f} {base_acc:6.2f} {fp32_onnx:8d} {1:5.2f} "
        f"{fp32_zip:8d} {1:5.2f} {fp32_numba:8d} {1:5.2f} {fp32_numba_zip:8d} {1:5.2f}"
    )
    for name, a0, a1, ort, size, zsize, nsize, nzsize in rows:
        print(
            f"{name:22s} {a0:6.2f} {a1:6.2f} {ort:6.2f} {size:8d} {fp32_onnx / size:5.2f} "
            f"{zsize:8d} {fp32_onnx / zsize:5.2f} {nsize:8d} {fp32_numba / nsize:5.2f} "
            f"{nzsize:8d} {fp32_numba / nzsize:5.2f}"
        )
    ok = [r for r in rows if r[0].startswith("share") and base_acc - r[3] <= 1]
    if ok:
        best = max(ok, key=lambda r: fp32_onnx / r[4])
        print(
            f"share_cifar: best within 1 pt: {best[0]}, ONNX {fp32_onnx / best[4]:.2f}x smaller "
            f"({fp32_onnx / best[5]:.2f}x zipped), {best[3]:.2f} % vs {base_acc:.2f} % fp32"
        )
    for r in rows:
        if r[0].startswith("prune"):
            print(
                f"share_cifar: {r[0]}: ONNX {fp32_onnx / r[4]:.2f}x smaller "
                f"({fp32_onnx / r[5]:.2f}x zipped), {r[3]:.2f} % ({r[3] - base_acc:+.2f} pt)"
            )


if __name__ == "__main__":
    sys.exit(main())
