"""Factorize the pretrained CIFAR-10 ResNets with ``factorize-rank``; top-1 on test_dev_2k.

One-shot, side by side (``--one-shot``): for each depth and MAC target, the float model, the
weight-only pass (no data), the data-aware pass without the least-squares refit
(``reconstruct=False``) and the default data-aware pass (whitened factors in every form, then the
refit), on the fused graph traced at batch ``--batch``, with ``--calibration`` unlabeled
train_20k images; a table and a one-line summary:

    python benchmarks/factorize_cifar.py --one-shot             # ResNet-56 and -20, 0.5 and 0.7
    python benchmarks/factorize_cifar.py --one-shot --depths 20 --targets 0.5

The full comparison (the default; ~1 h, loaded) factorizes ResNet-56 to 1/1.5 and 1/2 of its MACs
with each rank-selection mode and reports accuracy before and after a short fine-tune (the best
mode at each budget), pruning alone and factorize + prune at the 1/2 budget, and ONNX Runtime
latency, side by side:

    python benchmarks/factorize_cifar.py                     # the full table
    python benchmarks/factorize_cifar.py --epochs 0.25 --targets 0.5 --modes global,data-aware

Modes: ratio (each layer keeps the same share of its MACs), energy (one energy threshold for all
layers), evbmf (data-free EVBMF, at whatever MACs it picks), global (the global budget allocator)
and data-aware (the global budget with calibration data: output errors, then the refit).
ratio and energy are bisected to the MAC budget. Needs the real-data folder ($SLIMGRAPH_DATA).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import Counter

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from backends.onnx.backend import compile_onnx  # noqa: E402
from backends.torch.backend import to_graph  # noqa: E402
from benchmarks.harness import cifar  # noqa: E402
from compiler.api import compile  # noqa: E402
from compiler.report import graph_stats  # noqa: E402
from passes.factorization.factorize import FactorizeRank  # noqa: E402
from passes.pruning.prune import PruneChannels  # noqa: E402

MODES = ("ratio", "energy", "evbmf", "global", "data-aware")


def run_passes(graph, *passes):
    """Rewrite the unfused graph (batch norms kept, so the fine-tune can use batch statistics)."""
    return compile(graph, passes=list(passes), check=False)


def macs(graph) -> int:
    return graph_stats(graph).macs


def bisect(make, base_macs: int, target: float, lo: float, hi: float, steps: int = 7):
    """The largest knob value in [lo, hi] whose graph keeps at most ``target`` of the MACs (MACs
    grow with the knob)."""
    best = make(lo)
    for _ in range(steps):
        mid = (lo + hi) / 2
        compiled = make(mid)
        if macs(compiled.graph) <= target * base_macs:
            lo, best = mid, compiled
        else:
            hi = mid
    return best


def factorize_mode(graph, mode: str, target: float, calib, base_macs: int, round_to: int):
    common = {"round_to": round_to}
    if mode == "ratio":
        return bisect(
            lambda r: run_passes(graph, FactorizeRank(ratio=r, **common)),
            base_macs,
            target,
            0.05,
            0.99,
        )
    if mode == "energy":
        return bisect(
            lambda e: run_passes(graph, FactorizeRank(energy=e, **common)),
            base_macs,
            target,
            0.3,
            0.9999,
        )
    if mode == "evbmf":
        return run_passes(graph, FactorizeRank(evbmf=True, **common))
    if mode == "global":
        return run_passes(graph, FactorizeRank(target=target, **common))
    if mode == "data-aware":
        return run_passes(graph, FactorizeRank(target=target, calibration_data=calib, **common))
    raise ValueError(mode)


def prune(graph, target: float):
    """prune_cifar's best setting: L1, one global ranking, block-internal channels, round_to 4."""
    return run_passes(
        graph,
        PruneChannels(target=target, scope="global", criterion="l1", round_to=4, shortcut=False),
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--targets", default=None, help="MAC targets (default 0.667,0.5; one-shot 0.5,0.7)"
    )
    ap.add_argument("--one-shot", action="store_true", help="the side-by-side one-shot table")
    ap.add_argument("--depths", default="56,20", help="one-shot: the ResNet depths")
    ap.add_argument(
        "--batch", type=int, default=64, help="one-shot: traced (and calibration) batch"
    )
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--epochs", type=float, default=0.3, help="fine-tune length (train_20k)")
    ap.add_argument(
        "--split",
        type=float,
        default=0.7,
        help="factorize + prune: MACs kept by the factorization before pruning",
    )
    ap.add_argument("--round-to", type=int, default=1)
    ap.add_argument("--calibration", type=int, default=None, help="images (128; one-shot 512)")
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--json", default="build/factorize_cifar.json")
    ap.add_argument(
        "--latency-only",
        action="store_true",
        help="only time (no accuracy): the model, the global budget in the auto and "
        "channel forms, pruning, and factorize + prune, at the first target",
    )
    args = ap.parse_args()
    if not cifar.data_available("cifar10/test_dev_2k.npz", "resnet_cifar10"):
        print(f"factorize_cifar: skipped, no data under {cifar.data_dir()}")
        return 0
    if args.one_shot:
        return one_shot(args)
    args.targets = args.targets or "0.667,0.5"
    args.calibration = args.calibration or 128
    torch.set_num_threads(1)
    start = time.perf_counter()
    x_dev, y_dev = cifar.load_cifar("test_dev_2k")
    x_train, y_train = cifar.load_cifar("train_20k")
    calib = cifar.calibration_batch(args.calibration)
    model = cifar.load_pretrained(56)
    unfused = compile(model, torch.zeros(1, 3, 32, 32)).graph
    base_macs = macs(unfused)
    rows = []

    def record(name, target, compiled, finetune):
        module = compiled.to_torch()
        acc0 = cifar.evaluate(module, x_dev, y_dev)
        acc1 = float("nan")
        if finetune and args.epochs > 0:
            cifar.finetune(module, x_train, y_train, epochs=args.epochs, lr=0.01)
            acc1 = cifar.evaluate(module, x_dev, y_dev)
        final = compile(to_graph(module), passes=["fuse"]).graph
        row = {
            "method": name,
            "target": target,
            "macs": macs(compiled.graph) / base_macs,
            "params": graph_stats(compiled.graph).params / graph_stats(unfused).params,
            "acc": acc0,
            "acc_ft": acc1,
            "graph": final,
            "layers": compiled.graph.meta.get("factorization", {}).get("layers", {}),
        }
        rows.append(row)
        print(
            f"[{time.perf_counter() - start:6.0f} s] {name:24s} target {target:.3f} MACs "
            f"{row['macs']:.3f} acc {acc0:.2f} acc+ft {acc1:.2f}",
            flush=True,
        )
        return row

    if args.latency_only:
        return latency_only(unfused, float(args.targets.split(",")[-1]), args)
    record("unfactorized", 1.0, compile(unfused), False)
    modes = [m for m in args.modes.split(",") if m]
    targets = [float(t) for t in args.targets.split(",") if t]
    best = {}
    for target in targets:  # one-shot rows first, the fine-tunes (the slow part) after
        done = []
        for mode in modes:
            if mode == "evbmf" and target != targets[0]:
                continue  # EVBMF has no budget knob: one row
            compiled = factorize_mode(unfused, mode, target, calib, base_macs, args.round_to)
            done.append((record(mode, target, compiled, False), mode, compiled))
        budgeted = [d for d in done if d[1] != "evbmf"]
        if budgeted:
            best[target] = max(budgeted, key=lambda d: d[0]["acc"])[1:]
    for target in sorted(best):  # the tightest budget first
        mode, compiled = best[target]
        record(f"{mode} +ft", target, compiled, True)
        if target == 0.5:
            record("prune l1 +ft", target, prune(unfused, target), True)
            first = factorize_mode(unfused, mode, args.split, calib, base_macs, args.round_to)
            rest = target * base_macs / macs(first.graph)
            record(f"{mode} {args.split:g} + prune +ft", target, prune(first.graph, rest), True)
    latencies(rows, args.repeats)
    print_table(rows)
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump([{k: v for k, v in r.items() if k != "graph"} for r in rows], f, indent=1)
    print(f"factorize_cifar: {time.perf_counter() - start:.0f} s")
    return 0


def one_shot(args) -> int:
    """Float, weight-only, data-aware and data-aware + reconstruction, side by side."""
    targets = [float(t) for t in (args.targets or "0.5,0.7").split(",") if t]
    calib = cifar.calibration_batch(args.calibration or 512, seed=0)
    x_dev, y_dev = cifar.load_cifar("test_dev_2k")
    variants = {
        "weight-only": {},
        "data-aware": {"calibration_data": calib, "reconstruct": False},
        "data-aware + reconstruction": {"calibration_data": calib},
    }
    rows = []
    for depth in [int(d) for d in args.depths.split(",") if d]:
        model = cifar.load_pretrained(depth)
        x = torch.zeros(args.batch, 3, 32, 32)
        fused = compile(model, x, passes=["fuse"], check=False).graph
        base = macs(fused)
        anchor = cifar.evaluate(model, x_dev, y_dev)
        rows.append({"depth": depth, "method": "float", "target": None, "macs": 1.0, "acc": anchor})
        print(f"ResNet-{depth} float {anchor:.2f}", flush=True)
        for target in targets:
            for method, options in variants.items():
                pass_ = FactorizeRank(target=target, round_to=args.round_to, **options)
                start, cpu = time.perf_counter(), time.process_time()
                compiled = compile(fused.clone(), passes=[pass_], check=False)
                wall, cpu = time.perf_counter() - start, time.process_time() - cpu
                acc = cifar.evaluate(compiled.to_torch(), x_dev, y_dev, batch_size=args.batch)
                info = compiled.graph.meta["factorization"]
                refit = info.get("reconstruction") or {}
                forms = Counter(label.split()[0] for label in info["layers"].values())
                rows.append(
                    {
                        "depth": depth,
                        "method": method,
                        "target": target,
                        "macs": macs(compiled.graph) / base,
                        "acc": acc,
                        "delta": acc - anchor,
                        "seconds": wall,
                        "cpu": cpu,
                        "refit": refit.get("seconds"),
                        "forms": ", ".join(f"{n} {f}" for f, n in sorted(forms.items())),
                    }
                )
                print(
                    f"ResNet-{depth} {target:g} {method}: {acc:.2f} ({acc - anchor:+.2f}) "
                    f"{wall:.0f} s, {cpu:.0f} s CPU",
                    flush=True,
                )
    print()
    print(
        f"one-shot, no fine-tune: top-1 % on test_dev_2k; {args.calibration or 512} unlabeled "
        f"train_20k images, traced batch {args.batch}; pass s: wall (CPU) of factorize-rank"
    )
    print("| model | target | method | MACs kept | top-1 % | vs float | pass s | refit s | forms |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        if r["target"] is None:
            print(f"| ResNet-{r['depth']} | - | float | 1.000 | {r['acc']:.2f} | | | | |")
            continue
        refit = "-" if r["refit"] is None else f"{r['refit']:.0f}"
        print(
            f"| ResNet-{r['depth']} | {r['target']:g} | {r['method']} | {r['macs']:.3f} | "
            f"{r['acc']:.2f} | {r['delta']:+.2f} | {r['seconds']:.0f} ({r['cpu']:.0f}) | "
            f"{refit} | {r['forms']} |"
        )
    print()
    parts = []
    for depth in dict.fromkeys(r["depth"] for r in rows):
        anchor = next(r["acc"] for r in rows if r["depth"] == depth and r["target"] is None)
        for target in targets:
            got = {r["method"]: r for r in rows if r["depth"] == depth and r["target"] == target}
            best = got["data-aware + reconstruction"]
            parts.append(
                f"ResNet-{depth} at {target:g}: float {anchor:.2f} -> weight-only "
                f"{got['weight-only']['acc']:.2f}, data-aware {got['data-aware']['acc']:.2f}, "
                f"+ reconstruction {best['acc']:.2f} ({best['delta']:+.2f} pt)"
            )
    half = [
        r["delta"]
        for r in rows
        if r["target"] == 0.5 and r["method"] == "data-aware + reconstruction"
    ]
    if half:  # the bound the default path is held to: at most 5 points lost at half the MACs
        verdict = "met" if min(half) >= -5 else "missed"
        parts.append(f"bound (at most 5 pt lost at 0.5): {verdict}, worst {min(half):+.2f} pt")
    print("factorize_cifar one-shot: " + "; ".join(parts))
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json.replace(".json", "_one_shot.json"), "w") as f:
        json.dump(rows, f, indent=1)
    return 0


def latency_only(unfused, target: float, args) -> int:
    """The same interleaved ORT timing, three times over, on graphs built without fine-tuning."""
    base = macs(unfused)
    first = run_passes(unfused, FactorizeRank(target=args.split))
    graphs = {
        "unfactorized": unfused,
        "global auto": run_passes(unfused, FactorizeRank(target=target)).graph,
        "global channel": run_passes(unfused, FactorizeRank(target=target, form="channel")).graph,
        "global channel round 8": run_passes(
            unfused, FactorizeRank(target=target, form="channel", round_to=8)
        ).graph,
        "prune l1": prune(unfused, target).graph,
        f"global {args.split:g} + prune": prune(
            first.graph, target * base / macs(first.graph)
        ).graph,
    }
    rows = [
        {"method": k, "macs": macs(g) / base, "graph": compile(g, passes=["fuse"]).graph}
        for k, g in graphs.items()
    ]
    for round_ in range(3):
        latencies(rows, args.repeats)
        print(
            f"round {round_ + 1}: "
            + ", ".join(f"{r['method']} ({r['macs']:.3f} MACs) {r['ort_ms']:.2f} ms" for r in rows),
            flush=True,
        )
    return 0


def latencies(rows, repeats: int) -> None:
    """Batch-1, one-thread ONNX Runtime medians, every model timed in the same rounds (one call each
    per round, in rotating order) so that load on the machine hits all of them alike."""
    x = np.random.default_rng(0).random((1, 3, 32, 32), dtype=np.float32)
    sessions = [compile_onnx(r["graph"], threads=1) for r in rows]
    times = [[] for _ in rows]
    for s in sessions:
        s.run(x)
    for rep in range(repeats):
        for k in range(len(rows)):
            i = (k + rep) % len(rows)
            t = time.perf_counter()
            sessions[i].run(x)
            times[i].append(time.perf_counter() - t)
    for r, ts in zip(rows, times):
        r["ort_ms"] = 1000 * statistics.median(ts)


def print_table(rows) -> None:
    base = rows[0]
    print()
    print(
        "accuracy: top-1 on test_dev_2k; acc+ft after the fine-tune; latency: ORT, batch 1, one "
        "thread, medians of interleaved rounds; MACs/params relative to the unfactorized model"
    )
    print(
        f"{'method':30s} {'target':>6s} {'MACs':>6s} {'params':>6s} {'acc':>6s} {'acc+ft':>6s} "
        f"{'ORT ms':>7s} {'ORT x':>6s}"
    )
    for r in rows:
        print(
            f"{r['method']:30s} {r['target']:6.3f} {r['macs']:6.3f} {r['params']:6.3f} "
            f"{r['acc']:6.2f} {r['acc_ft']:6.2f} {r['ort_ms']:7.2f} "
            f"{base['ort_ms'] / r['ort_ms']:6.2f}"
        )
    tuned = [r for r in rows if r["target"] == 0.5 and not np.isnan(r["acc_ft"])]
    if tuned:
        summary = ", ".join(
            f"{r['method']} {r['acc_ft']:.2f} ({r['acc_ft'] - base['acc']:+.2f} pt,"
            f" ORT {base['ort_ms'] / r['ort_ms']:.2f}x)"
            for r in tuned
        )
        print(
            f"factorize_cifar: ResNet-56 {base['acc']:.2f} % at 1/2 MACs after fine-tune: {summary}"
        )


if __name__ == "__main__":
    sys.exit(main())
