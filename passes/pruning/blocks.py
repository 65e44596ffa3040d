"""Depth pruning: the ``prune-blocks`` pass removes whole residual branches (``y = x + f(x)``
becomes ``y = x``) chosen by their measured effect on the output, then refits what remains.

Finding, removing and masking blocks: passes/pruning/residual.py; the criteria:
passes/pruning/block_criteria.py.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from compiler.analysis.deviation import deviation
from compiler.analysis.reconstruct import reconstruct as refit_layers
from compiler.errors import InputError, OptionError, PassError
from compiler.ir.graph import Graph
from compiler.ir.inputs import calibration_inputs
from compiler.pass_manager import Pass, pass_context, register_pass
from compiler.report import graph_stats
from passes.pruning.block_criteria import (
    Batches,
    entropy_scores,
    node_runner,
    output_scores,
    runner,
    weight_scores,
)
from passes.pruning.residual import Block, find_blocks, mask_block, remove_block

CRITERIA = ("output", "entropy", "noise", "weight")
NEEDS_DATA = ("output", "entropy")
LAZY_BATCH = 4  # blocks measured again together when a stale score comes first
NOISE_SAMPLES = 16  # standard-normal inputs the "noise" criterion runs


# -- the pass --------------------------------------------------------------------------------------


@register_pass
@dataclass
class PruneBlocks(Pass):
    """Remove whole residual branches, ``y = x + f(x) -> y = x`` (ResNet blocks, transformer
    attention and MLP blocks), the least harmful first, then refit the layers after them (lossy).

    ``add(%x, %f) -> %x`` and ``conv2d(%h, $w, $b, %x) {activation='relu'} -> %x`` (``relu(%x)``
    where ``%x`` is not a relu output already), erasing the nodes that computed ``%f`` or ``%h``.
    Blocks behind a projection or downsampling shortcut are kept (passes/pruning/residual.py).

    Give ``target`` (the fraction of the original MACs to keep) or ``blocks`` (how many to
    remove). Each step removes the block that hurts least (per MAC saved, with ``target``) on the
    graph as pruned so far (output errors lazily: a score from an earlier step stands in until
    its block comes first, which is then measured again); ``greedy=False`` ranks once. With
    ``prove`` (default) the result is checked against the masked original (the same graph with
    every removed branch's output set to zero) within 1e-4. With calibration data the
    conv2d/linear layers after the removed blocks are refit by least squares to the original's
    outputs, as ``prune-channels`` does (compiler/analysis/reconstruct.py).

    Attributes:
        target: fraction of the original MACs to keep, in (0, 1].
        blocks: number of blocks to remove, at least 1.
        criterion: "output" (the default with calibration data): the relative output error,
            on the calibration data, of the graph without that block; "entropy": how far the
            block changes the information in the stream, the mean over channels of
            ``|H(output) - H(stream)|`` (bits, activation histograms on the calibration data),
            so near-identity blocks (EBCLE's past a network's useful depth) go first: cheaper,
            and on ResNet-56 its blocks were easier for the refit to make up for; "noise":
            "output" on seeded standard-normal inputs, no data needed; "weight" (the default
            without data): the branch's gain on white inputs from its weights alone. None picks
            the default.
        ignore: module-path patterns (fnmatch, e.g. "layer1.*") whose blocks are kept; a
            pattern matching no block is an error.
        greedy: measure the remaining blocks again after each removal (default); False ranks
            them once on the unpruned graph.
        score_samples: how many calibration samples the criteria run on (whole batches of the
            graph's batch size; reconstruction uses every sample).
        calibration_data: inputs (an array, or a list with one array per graph input) for the
            data-driven criteria and for reconstruction; no labels.
        prove: check the pruned graph against the masked original.
        reconstruct: refit the conv2d/linear layers downstream of the removed blocks on
            ``calibration_data``. None (default): on when calibration data is given, layers
            with too few samples skipped with a note; True: required.
        reconstruct_ridge: the refit's ridge penalty, relative to the mean of diag(X^T X).
        reconstruct_residual: a layer with a fused residual input fits the original's
            ``conv + b + residual`` minus the pruned graph's residual, so it also absorbs the
            error the removed blocks left in the stream.
        progress: show progress bars while scoring and reconstructing.
    """

    name = "prune-blocks"
    exact = False
    target: float | None = None
    blocks: int | None = None
    criterion: str | None = None
    ignore: tuple[str, ...] = ()
    greedy: bool = True
    score_samples: int = 128
    calibration_data: Any = field(default=None, repr=False)
    prove: bool = True
    reconstruct: bool | None = None
    reconstruct_ridge: float = 1e-4
    reconstruct_residual: bool = True
    progress: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        if (self.target is None) == (self.blocks is None):
            raise OptionError(
                "prune-blocks needs exactly one of target= or blocks=",
                hint="target=0.7 keeps 70 % of the MACs; blocks=4 removes four blocks",
            )
        if self.target is not None and (
            isinstance(self.target, bool)
            or not isinstance(self.target, (int, float))
            or not 0 < self.target <= 1
        ):
            raise OptionError(
                f"target {self.target!r} is outside (0, 1]",
                hint="target is the fraction of MACs to keep, e.g. 0.7",
            )
        if self.blocks is not None and (
            isinstance(self.blocks, bool) or not isinstance(self.blocks, int) or self.blocks < 1
        ):
            raise OptionError(
                f"blocks {self.blocks!r} is not a whole number >= 1",
                hint="blocks is how many residual blocks to remove, e.g. 4",
            )
        if self.criterion is not None and self.criterion not in CRITERIA:
            raise OptionError(
                f"unknown criterion {self.criterion!r}",
                hint=f"use one of {', '.join(CRITERIA)}, or None (output with data, else weight)",
            )
        if isinstance(self.score_samples, bool) or not isinstance(self.score_samples, int):
            raise OptionError(f"score_samples {self.score_samples!r} is not a whole number")
        if self.score_samples < 1:
            raise OptionError(f"score_samples {self.score_samples} must be at least 1")
        if not (self.reconstruct_ridge >= 0 and math.isfinite(self.reconstruct_ridge)):
            raise OptionError(f"reconstruct_ridge {self.reconstruct_ridge} must be >= 0")
        if isinstance(self.ignore, str):
            self.ignore = (self.ignore,)

    def _criterion(self) -> str:
        if self.criterion is not None:
            return self.criterion
        return "weight" if self.calibration_data is None else "output"

    def missing_data(self) -> str | None:
        if self.calibration_data is not None:
            return None
        if self.criterion in NEEDS_DATA:
            return f"criterion '{self.criterion}' needs calibration data"
        if self.reconstruct:
            return "reconstruct=True needs calibration data"
        return None

    # -- the pass ---------------------------------------------------------------------------------
    def run(self, graph: Graph) -> bool:
        missing = self.missing_data()
        if missing:
            raise OptionError(
                missing,
                hint="pass calibration_data=<example inputs> (no labels needed) to the pass or "
                "to compile(), or use a data-free criterion ('noise', 'weight')",
            )
        data = None if self.calibration_data is None else _checked_data(graph, self)
        saved = graph.clone()
        try:
            return self._run(graph, data)
        except BaseException:
            _restore(graph, saved)  # a failed pass leaves the graph as it found it
            raise

    def _run(self, graph: Graph, data: list[np.ndarray] | None) -> bool:
        if self.target == 1:
            return False
        start = graph_stats(graph).macs
        candidates = self._eligible(graph)
        self._check_reachable(graph, start)
        criterion = self._criterion()
        if criterion == "noise" and any(np.dtype(v.dtype).kind != "f" for v in graph.inputs):
            raise OptionError(
                "criterion 'noise' needs float graph inputs (it runs standard-normal noise)",
                hint="give calibration_data, or use criterion='weight'",
            )
        if criterion == "noise":
            batches = _noise_batches(graph, min(self.score_samples, NOISE_SAMPLES))
        elif criterion in NEEDS_DATA:
            batches = _whole_batches(graph, data, self.score_samples)
        else:
            batches = []
        run = runner()
        reference = run(graph, batches) if criterion in ("output", "noise") else []
        original = graph.clone()
        removed = self._select(graph, criterion, batches, reference, run, start)
        proof_inputs = [batches[0]] if batches else [_random_inputs(graph)]
        removed_blocks = [b for b, _ in removed]
        dev = _prove(original, graph, removed_blocks, proof_inputs, run) if self.prove else None
        macs = graph_stats(graph).macs
        graph.meta["prune_blocks"] = {
            "criterion": criterion,
            "candidates": len(candidates),
            "removed": [
                {"block": b.name, "node": b.node, "macs": b.macs, "score": score}
                for b, score in removed
            ],
            "macs_kept": macs / max(start, 1),
            "mask_deviation": dev,
        }
        names = ", ".join(b.name for b, _ in removed[:6]) + (", ..." if len(removed) > 6 else "")
        _note(
            graph,
            f"prune-blocks: removed {len(removed)} of {len(candidates)} residual block(s) "
            f"({names}) by {criterion}; MACs kept {macs / max(start, 1):.3f}",
        )
        if data is not None and self.reconstruct is not False:
            self._reconstruct(original, graph, data)
        return True

    def _eligible(self, graph: Graph) -> list[Block]:
        blocks = find_blocks(graph)
        if not blocks:
            raise OptionError(
                f"graph '{graph.name}' has no removable residual block",
                hint="prune-blocks removes branches f of y = x + f(x) (ResNet, transformer "
                "blocks); blocks behind a projection or downsampling shortcut are kept",
            )
        kept, matched = [], set()
        for b in blocks:
            hit = [
                p
                for p in self.ignore
                if any(fnmatch.fnmatch(s, p) for s in (b.name, b.node, *b.sources))
            ]
            matched.update(hit)
            if not hit:
                kept.append(b)
        unmatched = [p for p in self.ignore if p not in matched]
        if unmatched:
            raise OptionError(
                f"ignore pattern(s) {unmatched} match no removable block",
                hint=f"blocks are named by module path, e.g. {[b.name for b in blocks[:6]]}",
            )
        return kept

    def _check_reachable(self, graph: Graph, start: int) -> None:
        """Remove every eligible block from a copy: the least MACs and most blocks reachable."""
        trial, count = graph.clone(), 0
        while True:
            try:
                blocks = self._eligible(trial)
            except OptionError:
                break
            if not blocks:
                break
            remove_block(trial, blocks[0])
            count += 1
        if self.blocks is not None and self.blocks > count:
            raise OptionError(
                f"blocks={self.blocks} but only {count} residual block(s) can be removed",
                hint=f"use blocks <= {count}, or drop ignore patterns",
            )
        least = graph_stats(trial).macs
        if self.target is not None and least > self.target * start:
            raise OptionError(
                f"target {self.target:g} of the MACs is unreachable: removing every removable "
                f"block ({count}) keeps {least / max(start, 1):.3f}",
                hint="raise the target, drop ignore patterns, or add prune-channels after it",
            )

    def _select(
        self, graph, criterion, batches, reference, run, start
    ) -> list[tuple[Block, float]]:
        """Remove, step by step, the block that hurts least (per MAC saved, with ``target``) on
        the graph as pruned so far. Output errors are measured again lazily (CELF): a score from
        an earlier step stands for the block until it is the best one; then it and the next
        best few are measured on the current graph, until the best has a current score."""
        removed: list[tuple[Block, float]] = []
        scores: dict[str, float] = {}
        goal = None if self.target is None else self.target * start
        lazy = criterion in ("output", "noise")

        def cost(b: Block) -> float:
            return scores[b.node] if goal is None else scores[b.node] / max(b.macs, 1)

        while len(removed) < self.blocks if goal is None else graph_stats(graph).macs > goal:
            candidates = self._eligible(graph)
            todo = [b for b in candidates if b.node not in scores or (self.greedy and not lazy)]
            measured: set[str] = set()
            while True:
                if todo:
                    new = self._scores(graph, criterion, todo, batches, reference, run)
                    scores.update(zip([b.node for b in todo], new))
                    measured.update(b.node for b in todo)
                best = min(candidates, key=cost)
                if not self.greedy or best.node in measured:
                    break
                todo = sorted((b for b in candidates if b.node not in measured), key=cost)
                todo = todo[:LAZY_BATCH]
            remove_block(graph, best)
            removed.append((best, scores[best.node]))
        return removed

    def _scores(self, graph, criterion, blocks, batches, reference, run) -> list[float]:
        if criterion in ("output", "noise"):
            bar = _bar(self.progress, f"prune-blocks: scoring {len(blocks)} blocks")
            return output_scores(graph, blocks, batches, reference, run, bar)
        if criterion == "entropy":
            return entropy_scores(graph, blocks, batches, run)
        return weight_scores(graph, blocks)

    def _reconstruct(self, original: Graph, graph: Graph, data: list[np.ndarray]) -> None:
        layers = downstream_layers(original, graph)
        result = refit_layers(
            original,
            graph,
            data,
            layers,
            ridge=self.reconstruct_ridge,
            skip_underdetermined=self.reconstruct is None,
            compensate_residual=self.reconstruct_residual,
            run_node=node_runner(),
            progress=self.progress or pass_context().progress,
        )
        graph.meta["prune_blocks"]["reconstruction"] = result.summary()
        note = result.note(
            f"prune-blocks: refit {len(result.layers)} layer(s) after the removed blocks by "
            "least squares"
        )
        _note(graph, note)


# -- helpers of the pass ---------------------------------------------------------------------------


def downstream_layers(original: Graph, pruned: Graph) -> list[str]:
    """The conv2d/linear nodes of ``pruned`` that see other inputs than in ``original``: they read
    a value another node computed there (a removed block's stream), or come after one that does."""
    before = {n.name: n for n in original.nodes}
    changed: set[int] = set()
    layers = []
    for node in pruned.nodes:
        old = before.get(node.name)
        same = (
            old is not None
            and old.op == node.op
            and len(old.inputs) == len(node.inputs)
            and all(
                (v is None) == (o is None)
                and (v is None or (v.name == o.name and id(v) not in changed))
                for v, o in zip(node.inputs, old.inputs)
            )
        )
        if not same:
            changed.update(id(v) for v in node.outputs)
            if old is not None and old.op == node.op and node.op in ("conv2d", "linear"):
                layers.append(node.name)
    return layers


def _prove(original: Graph, pruned: Graph, removed: list[Block], inputs: Batches, run) -> float:
    """The deviation of ``pruned`` from ``original`` with every removed branch masked to zero
    (on one batch); a PassError when it is not within 1e-4."""
    masked = original.clone()
    for block in removed:
        mask_block(masked, block)
    dev = deviation(run(masked, inputs)[0], run(pruned, inputs)[0])
    if not dev <= 1e-4:
        raise PassError(
            f"prune-blocks: the pruned graph deviates {dev:.3g} from the masked original",
            hint="report this as a bug in prune-blocks (the rewrite must equal zeroing the "
            "branch); prove=False skips the check",
        )
    return dev


def _checked_data(graph: Graph, options: PruneBlocks) -> list[np.ndarray]:
    data = calibration_inputs(graph, options.calibration_data)
    batch = graph.inputs[0].shape[0] if graph.inputs and graph.inputs[0].shape else 1
    if len(data[0]) < batch:
        raise InputError(
            f"prune-blocks got {len(data[0])} calibration sample(s), the graph's batch is {batch}",
            hint=f"give at least {batch} samples (whole batches are used)",
        )
    for v, a in zip(graph.inputs, data, strict=True):
        if np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a)):
            raise InputError(
                f"calibration input for '{v.name}' contains NaN or inf",
                hint="clean or drop those samples",
            )
    return data


def _whole_batches(graph: Graph, data: list[np.ndarray], limit: int) -> Batches:
    """The first ``limit`` samples (at least one batch) in batches of the graph's batch size."""
    batch = graph.inputs[0].shape[0]
    n = max(batch, min(limit, len(data[0])) // batch * batch)
    return [[a[s : s + batch] for a in data] for s in range(0, n, batch)]


def _noise_batches(graph: Graph, samples: int) -> Batches:
    """Seeded standard-normal inputs, whole batches of the graph's batch size (at least one)."""
    rng = np.random.default_rng(0)
    batch = graph.inputs[0].shape[0]
    return [_random_inputs(graph, rng) for _ in range(max(1, samples // batch))]


def _random_inputs(graph: Graph, rng: np.random.Generator | None = None) -> list[np.ndarray]:
    rng = rng or np.random.default_rng(0)
    return [
        rng.standard_normal(v.shape).astype(v.dtype)
        if np.dtype(v.dtype).kind == "f"
        else np.zeros(v.shape, v.dtype)  # integer inputs (token ids): zeros are valid
        for v in graph.inputs
    ]


def _restore(graph: Graph, saved: Graph) -> None:
    """Make ``graph`` hold ``saved`` (a clone taken before the pass) again."""
    graph.__dict__.update(saved.__dict__)
    for node in graph.nodes:
        node.graph = graph


def _note(graph: Graph, text: str) -> None:
    graph.meta["notes"] = [*graph.meta.get("notes", ()), text]


def _bar(on: bool, desc: str) -> Callable:
    if not (on or pass_context().progress):
        return lambda items: items
    from tqdm.auto import tqdm

    return lambda items: tqdm(items, desc=desc, leave=False)
