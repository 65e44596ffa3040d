"""Depth pruning (``prune-blocks``) of the pretrained CIFAR-10 ResNets, alone and composed with
channel pruning, one-shot: top-1 on test_dev_2k beside the float model and the data-free version
of every row, no fine-tuning.

    python benchmarks/prune_blocks_cifar.py                       # ResNet-56: 0.7, and 0.5 composed
    python benchmarks/prune_blocks_cifar.py --depth 20 --samples 256
    python benchmarks/prune_blocks_cifar.py --rows blocks         # only the prune-blocks rows

Rows (passes after "fuse"):

- ``blocks``: ``prune-blocks(target=--target)`` without data (criteria ``noise`` and ``weight``,
  the default then), then with ``--samples`` random train_20k images (no labels) by the
  ``output`` criterion (the default with data) and by ``entropy``, each followed by the refit
  (reconstruction, on by default with data) and without it.
- ``compose``: ``prune-channels`` alone to ``--compose`` of the MACs, and ``prune-blocks`` to
  ``--blocks-share`` followed by ``prune-channels`` down to the MACs that channel pruning alone
  reached, so the two compare at the same (or fewer) MACs; without data and with data (each
  pass then refits).

The graph is traced with batch ``--batch``; scoring and refits run in batches of that size.
Needs ../shared/data (or $SLIMGRAPH_DATA).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# one BLAS thread, as one torch thread (--threads): steady timings on a shared machine
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

from benchmarks.harness import cifar  # noqa: E402
from compiler.api import compile  # noqa: E402
from compiler.report import graph_stats  # noqa: E402
from passes.pruning.blocks import PruneBlocks  # noqa: E402
from passes.pruning.prune import PruneChannels  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=56, choices=sorted(cifar.CHECKPOINTS))
    parser.add_argument("--target", type=float, default=0.7)
    parser.add_argument("--compose", type=float, default=0.5)
    parser.add_argument("--blocks-share", type=float, default=0.8)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rows", nargs="+", default=["blocks", "compose"])
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: steady on a shared machine)"
    )
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x_dev, y_dev = cifar.load_cifar("test_dev_2k")
    calib = cifar.calibration_batch(args.samples, seed=0)
    model = cifar.load_pretrained(args.depth)
    fused = compile(model, torch.zeros(args.batch, 3, 32, 32), passes=["fuse"], check=False).graph
    base = graph_stats(fused).macs
    rows = [("float", "-", "-", 1.0, cifar.evaluate(model, x_dev, y_dev), None, "-")]

    def measure(label: str, data: str, graph, passes, then=None):
        """Compile ``graph`` with ``passes`` (then ``then(compiled) -> passes`` on the result),
        time it, evaluate it and add a row."""
        start = time.perf_counter()
        cpu = time.process_time()
        compiled = compile(graph, passes=passes, check=False)
        if then is not None:
            compiled = compile(compiled.graph, passes=then(compiled), check=False)
        seconds = (time.perf_counter() - start, time.process_time() - cpu)
        acc = cifar.evaluate(compiled.to_torch(), x_dev, y_dev, batch_size=args.batch)
        info = compiled.graph.meta.get("prune_blocks", {})
        removed = _stages([r["block"] for r in info.get("removed", ())])
        row = (label, data, removed or "-", graph_stats(compiled.graph).macs / base, acc, seconds)
        rows.append((*row, _deviation(compiled.graph)))
        print(rows[-1], flush=True)
        return compiled

    with_data = {"calibration_data": calib, "progress": args.progress}
    t = args.target
    if "blocks" in args.rows:
        for criterion in ("noise", "weight"):
            blocks = PruneBlocks(target=t, criterion=criterion)
            measure(f"blocks {t:g}", f"no data: {criterion}", fused, [blocks])
        for refit in (True, False):
            for criterion in ("output", "entropy"):
                refit_option = None if refit else False  # None: the default, on with data
                blocks = PruneBlocks(
                    target=t, criterion=criterion, reconstruct=refit_option, **with_data
                )
                data = f"{criterion} + refit" if refit else f"{criterion}, no refit"
                measure(f"blocks {t:g}", data, fused, [blocks])
    if "compose" in args.rows:
        c, share = args.compose, args.blocks_share
        reached = {}
        for data, options in (("no data", {}), ("refit", with_data)):
            alone = measure(f"channels {c:g}", data, fused, [PruneChannels(target=c, **options)])
            reached[data] = graph_stats(alone.graph).macs
        label = f"blocks {share:g} + channels -> {c:g}"
        for data, options in (
            ("no data", {}),
            ("output + refit", {"criterion": "output", **with_data}),
            ("entropy + refit", {"criterion": "entropy", **with_data}),
        ):
            # channel pruning after the blocks down to the MACs channel pruning alone reached
            goal = reached["no data" if data == "no data" else "refit"]
            channel_options = {k: v for k, v in options.items() if k != "criterion"}

            def channels(blocks_pruned, goal=goal, channel_options=channel_options):
                rest = goal / graph_stats(blocks_pruned.graph).macs
                return [PruneChannels(target=rest, **channel_options)]

            measure(label, data, fused, [PruneBlocks(target=share, **options)], channels)

    threads = torch.get_num_threads()
    print()
    print(f"ResNet-{args.depth}, CIFAR-10 test_dev_2k top-1, one-shot (no fine-tuning);")
    print(f"{args.samples} calibration images from train_20k (no labels), batch {args.batch};")
    print(f"{threads} threads; seconds are wall (cpu) of the pruning passes, on a shared machine")
    print()
    print("| passes | data | blocks removed | MACs kept | top-1 % | s wall (cpu) | deviation |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for label, data, removed, macs, acc, seconds, dev in rows:
        sec = "-" if seconds is None else f"{seconds[0]:.0f} ({seconds[1]:.0f})"
        print(f"| {label} | {data} | {removed} | {macs:.3f} | {acc:.2f} | {sec} | {dev} |")
    print()
    print("summary: " + _summary(rows, args))


def _stages(blocks: list[str]) -> str:
    """``8: layer1 x3, layer2 x5`` for the removed blocks' module paths."""
    if not blocks:
        return "-"
    stages = [b.split(".")[0] for b in blocks]
    counts = ", ".join(f"{s} x{stages.count(s)}" for s in sorted(set(stages)))
    return f"{len(blocks)}: {counts}"


def _deviation(graph) -> str:
    """The refits' output deviation (calibration data) before -> after, per pass that refit."""
    parts = []
    for key in ("prune_blocks", "pruning"):
        info = graph.meta.get(key, {}).get("reconstruction")
        if info:
            parts.append(f"{info['deviation_before']:.2f} -> {info['deviation_after']:.2f}")
    return "; ".join(parts) or "-"


def _summary(rows: list, args) -> str:
    acc = {(r[0], r[1]): r[4] for r in rows}
    float_acc = acc[("float", "-")]
    parts = [f"float {float_acc:.1f} %"]
    blocks = f"blocks {args.target:g}"
    got = [
        f"{c} + refit {acc[(blocks, f'{c} + refit')]:.1f} % "
        f"({acc[(blocks, f'{c} + refit')] - float_acc:+.1f})"
        for c in ("output", "entropy")
        if (blocks, f"{c} + refit") in acc
    ]
    if got:
        parts.append(f"prune-blocks to {args.target:g} of the MACs: " + ", ".join(got))
    composed = f"blocks {args.blocks_share:g} + channels -> {args.compose:g}"
    alone = acc.get((f"channels {args.compose:g}", "refit"))
    got = [
        f"blocks ({c}) + channels {acc[(composed, f'{c} + refit')]:.1f} %"
        for c in ("output", "entropy")
        if (composed, f"{c} + refit") in acc
    ]
    if alone is not None and got:
        parts.append(f"at the MACs of channels alone ({alone:.1f} %): " + ", ".join(got))
    return "; ".join(parts)


if __name__ == "__main__":
    main()
