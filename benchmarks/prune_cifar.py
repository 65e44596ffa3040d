"""Prune the pretrained CIFAR-10 ResNet-56 to 1/2 and 1/3 of its MACs with several criteria; report
accuracy on test_dev_2k before and after a short fine-tune, and measured latency in ONNX Runtime
and torch
against the unpruned model, side by side; compare with Torch-Pruning at the same MAC budget.

    python benchmarks/prune_cifar.py                       # the full table (tens of minutes)
    python benchmarks/prune_cifar.py --epochs 1 --targets 0.5 --criteria l1 --no-torch-pruning

Needs ../shared/data (or $SLIMGRAPH_DATA). Torch-Pruning (`pip install torch-pruning`) is optional.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from backends.onnx.backend import compile_onnx  # noqa: E402
from backends.torch.backend import compile_torch, to_graph  # noqa: E402
from benchmarks.harness import cifar  # noqa: E402
from benchmarks.timing import median_ms  # noqa: E402
from compiler.api import compile  # noqa: E402
from compiler.report import graph_stats  # noqa: E402
from passes.pruning.prune import PruneChannels  # noqa: E402


def latencies(graph, repeats: int) -> tuple[float, float]:
    """Median batch-1 latency (ms) of the fused graph in ONNX Runtime and in torch (1 thread
    each)."""
    x = np.random.default_rng(0).random((1, 3, 32, 32), dtype=np.float32)
    ort = compile_onnx(graph, threads=1)
    module = compile_torch(graph)
    xt = torch.from_numpy(x)
    with torch.inference_mode():
        t_ms = median_ms(lambda: module(xt), repeats)
    return median_ms(lambda: ort.run(x), repeats), t_ms


def prune_config(graph, target: float, criterion: str, calib, labels, shortcut: bool):
    """Prune the unfused graph (batch norms kept, so fine-tuning can use batch statistics)."""
    options = {
        "target": target,
        "scope": "global",
        "criterion": criterion,
        "round_to": 4,
        "shortcut": shortcut,
    }
    if criterion in ("taylor", "activation", "di", "apoz"):
        options.update(calibration_data=calib, labels=labels)
    return compile(graph, passes=[PruneChannels(**options)], check=False)


def fused(graph):
    return compile(graph, passes=["fuse"]).graph


def torch_pruning_model(target: float, base_macs: int):
    """Torch-Pruning (L1 magnitude, global) at the same MAC budget, by bisection on its ratio."""
    import torch_pruning as tp

    example = torch.zeros(1, 3, 32, 32)
    lo, hi, best = 0.0, 0.95, None
    for _ in range(10):
        mid = (lo + hi) / 2
        model = cifar.load_pretrained(56)
        pruner = tp.pruner.MagnitudePruner(
            model,
            example,
            importance=tp.importance.MagnitudeImportance(p=1),
            pruning_ratio=mid,
            global_pruning=True,
            ignored_layers=[model.linear],
        )
        pruner.step()
        macs, _ = tp.utils.count_ops_and_params(model, example)
        if macs <= target * base_macs:
            hi, best = mid, model
        else:
            lo = mid
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", default="0.5,0.333")
    ap.add_argument("--criteria", default="l1,fpgm,taylor")
    ap.add_argument("--epochs", type=float, default=3)
    ap.add_argument("--finetune-targets", default="0.5", help="targets that get the fine-tune")
    ap.add_argument(
        "--finetune-criteria",
        default="l1,fpgm,taylor",
        help="criteria that get the fine-tune (it is the slow part: minutes per epoch)",
    )
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--no-torch-pruning", action="store_true")
    ap.add_argument(
        "--shortcut",
        action="store_true",
        help="also prune the residual streams (one-shot accuracy collapses: see docs)",
    )
    args = ap.parse_args()
    if not cifar.data_available("cifar10/test_dev_2k.npz", "resnet_cifar10"):
        print(f"prune_cifar: skipped, no data under {cifar.data_dir()}")
        return 0
    torch.set_num_threads(1)
    x_dev, y_dev = cifar.load_cifar("test_dev_2k")
    x_train, y_train = cifar.load_cifar("train_20k")
    calib_idx = np.random.default_rng(0).choice(len(x_train), 256, replace=False)
    calib, calib_y = x_train[calib_idx], y_train[calib_idx]
    model = cifar.load_pretrained(56)
    unfused = compile(model, torch.zeros(1, 3, 32, 32)).graph
    base_graph = fused(unfused)
    base_stats = graph_stats(base_graph)
    base_acc = cifar.evaluate(model, x_dev, y_dev)
    base_ort, base_torch = latencies(base_graph, args.repeats)
    rows = [("unpruned", 1.0, 1.0, base_acc, base_acc, base_ort, base_torch)]
    print(
        f"unpruned: {base_stats.macs / 1e6:.1f} M MACs, {base_acc:.2f} %, ORT {base_ort:.2f} ms, "
        f"torch {base_torch:.2f} ms",
        flush=True,
    )
    finetune_targets = {float(t) for t in args.finetune_targets.split(",") if t}
    tuned = set(args.finetune_criteria.split(","))
    for target in [float(t) for t in args.targets.split(",")]:
        for criterion in args.criteria.split(","):
            pruned = prune_config(unfused, target, criterion, calib, calib_y, args.shortcut)
            module = pruned.to_torch()
            acc0 = cifar.evaluate(module, x_dev, y_dev)
            acc1 = float("nan")
            if target in finetune_targets and criterion in tuned and args.epochs > 0:
                cifar.finetune(module, x_train, y_train, epochs=args.epochs, lr=0.01)
                acc1 = cifar.evaluate(module, x_dev, y_dev)
            final = fused(to_graph(module))
            stats = graph_stats(final)
            ort_ms, torch_ms = latencies(final, args.repeats)
            rows.append(
                (
                    f"slimgraph {criterion}",
                    target,
                    stats.macs / base_stats.macs,
                    acc0,
                    acc1,
                    ort_ms,
                    torch_ms,
                )
            )
            print(rows[-1], flush=True)
        if not args.no_torch_pruning:
            rows.append(run_torch_pruning(target, base_stats.macs, x_dev, y_dev, args.repeats))
            print(rows[-1], flush=True)
    print_table(rows, base_ort, base_torch)
    return 0


def run_torch_pruning(target, base_macs, x_dev, y_dev, repeats):
    try:
        tp_model = torch_pruning_model(target, base_macs)
        compiled = compile(tp_model, torch.zeros(1, 3, 32, 32), passes=["fuse"])
        macs = graph_stats(compiled.graph).macs / base_macs
        acc0 = cifar.evaluate(tp_model, x_dev, y_dev)
        ort_ms, torch_ms = latencies(compiled.graph, repeats)
        return ("torch-pruning l1", target, macs, acc0, float("nan"), ort_ms, torch_ms)
    except Exception as e:  # noqa: BLE001 - report the anchor's failure instead of hiding it
        print(f"torch-pruning failed: {type(e).__name__}: {e}")
        return (
            "torch-pruning l1 (failed)",
            target,
            float("nan"),
            float("nan"),
            float("nan"),
            float("nan"),
            float("nan"),
        )


def print_table(rows, base_ort, base_torch) -> None:
    print()
    print(
        "latency: batch 1, one thread, medians; both sides fused by slimgraph; torch = the torch "
        "backend's module"
    )
    print(
        f"{'method':22s} {'target':>6s} {'MACs':>6s} {'acc':>7s} {'acc+ft':>7s} "
        f"{'ORT ms':>7s} {'ORT x':>6s} {'torch ms':>8s} {'torch x':>7s}"
    )
    for name, target, macs, a0, a1, o, t in rows:
        print(
            f"{name:22s} {target:6.3f} {macs:6.3f} {a0:7.2f} {a1:7.2f} {o:7.2f} "
            f"{base_ort / o:6.2f} {t:8.2f} {base_torch / t:7.2f}"
        )
    best = [r for r in rows[1:] if r[1] == 0.5 and not np.isnan(r[4])]
    if best:
        top = max(best, key=lambda r: r[4])
        print(
            f"prune_cifar: ResNet-56 at {top[2]:.2f}x MACs ({top[0]}): {rows[0][3]:.2f} -> "
            f"{top[4]:.2f} % after fine-tune ({top[4] - rows[0][3]:+.2f} pt), ORT "
            f"{base_ort / top[5]:.2f}x faster, torch {base_torch / top[6]:.2f}x faster"
        )


if __name__ == "__main__":
    sys.exit(main())
