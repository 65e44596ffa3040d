"""Structured channel pruning over dependency groups: the ``prune-channels`` pass."""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from compiler.analysis.allocate import BudgetError, bisect_budget
from compiler.analysis.reconstruct import reconstruct as refit_layers
from compiler.errors import OptionError
from compiler.ir.graph import Graph
from compiler.pass_manager import Pass, pass_context, register_pass
from compiler.report import graph_stats
from passes.pruning.apply import (
    apply_plan,
    kept_indices_fn,
    prune_and_prove,
    removed_mask,
    view_for_clone,
)
from passes.pruning.criteria import NEEDS_DATA, NEEDS_LABELS, Context, get_criterion
from passes.pruning.groups import ChannelGroups, Group


@register_pass
@dataclass
class PruneChannels(Pass):
    """Remove whole channels, heads and hidden units, coupled across residual adds, concats, group
    convs, attention and flatten->linear, so the model really gets smaller (lossy).

    ``conv2d(x, $w[64,...]) ... conv2d(y, $v[.,64,...]) -> conv2d(x, $w[32,...]) ... conv2d(y,
    $v[.,32,...])`` for every coupled tensor at once (see passes/pruning/groups.py).

    Give either ``ratio`` (the share of each group's units to remove; with ``scope="global"`` the
    share of all units, ranked across groups) or ``target`` (the fraction of the original MACs or
    params, ``target_metric``, to keep; reached by global ranking or one uniform ratio). With
    ``prove`` (default) the pruned graph is checked against the masked original: the same model with
    the removed channels' parameters zeroed must give the same outputs within 1e-4.

    Attributes:
        ratio: share of units to remove, in [0, 1).
        target: fraction of MACs (or params) to keep, in (0, 1].
        target_metric: "macs" or "params".
        scope: "uniform" (per group) or "global" (one ranking over all groups).
        criterion: a name (l1, l2, bn_scale, fpgm, random, activation, apoz, di, taylor) or a
            function (analysis, group, context) -> scores (higher = keep).
        round_to: keep a multiple of this many units per group (SIMD-friendly widths).
        min_channels: never keep fewer units in a group.
        ignore: module-path patterns (fnmatch) whose channels are left alone.
        shortcut: also prune residual streams (channels tied across a stage by adds); False prunes
            only block-internal channels.
        calibration_data: inputs (an array, or a list with one array per graph input) for the
            data-driven criteria and for reconstruction.
        labels: the calibration inputs' class labels (di, taylor).
        prove: check mask equivalence after pruning.
        seed: seeds the random criterion.
        reconstruct: after removing channels, refit every conv2d/linear that lost input channels
            by least squares on ``calibration_data`` (no labels) so it reproduces the unpruned
            layer's output (compiler/analysis/reconstruct.py). None (default): on when
            calibration data is given, and layers with too few samples are then skipped with a
            note; True: required (an error without data or with too few samples).
        reconstruct_ridge: the ridge penalty of the refit, relative to the mean of diag(X^T X).
        reconstruct_residual: a layer with a fused residual add fits the original's
            ``conv + b + residual`` minus the pruned graph's residual (absorbing the error of the
            residual stream too) instead of the original's ``conv + b`` alone.
        progress: show a progress bar while reconstructing.
    """

    name = "prune-channels"
    exact = False
    ratio: float | None = None
    target: float | None = None
    target_metric: str = "macs"
    scope: str = "uniform"
    criterion: Any = "l2"
    round_to: int = 1
    min_channels: int = 1
    ignore: tuple[str, ...] = ()
    shortcut: bool = True
    calibration_data: Any = field(default=None, repr=False)
    labels: Any = field(default=None, repr=False)
    prove: bool = True
    seed: int = 0
    reconstruct: bool | None = None
    reconstruct_ridge: float = 1e-4
    reconstruct_residual: bool = True
    progress: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        if (self.ratio is None) == (self.target is None):
            raise OptionError("prune-channels needs exactly one of ratio= or target=")
        if self.ratio is not None and not 0 <= self.ratio < 1:
            raise OptionError(
                f"ratio {self.ratio} is outside [0, 1)",
                hint="ratio is the share of channels to remove, e.g. 0.3",
            )
        if self.target is not None and not 0 < self.target <= 1:
            raise OptionError(
                f"target {self.target} is outside (0, 1]",
                hint="target is the fraction of MACs/params to keep, e.g. 0.5",
            )
        if self.scope not in ("uniform", "global"):
            raise OptionError(f"scope {self.scope!r} is not 'uniform' or 'global'")
        if self.target_metric not in ("macs", "params"):
            raise OptionError(f"target_metric {self.target_metric!r} is not 'macs' or 'params'")
        if self.round_to < 1 or self.min_channels < 1:
            raise OptionError("round_to and min_channels must be at least 1")
        get_criterion(self.criterion)

    def _check_data(self) -> None:
        """Data-driven criteria need their data when the pass runs (not when it is built:
        ``compile(..., calibration_data=...)`` hands its data to a copy of the pass)."""
        name = self.criterion if isinstance(self.criterion, str) else None
        if name in NEEDS_DATA and self.calibration_data is None:
            raise OptionError(
                f"criterion '{name}' needs calibration data",
                hint="pass calibration_data=<example inputs> to the pass or to compile()",
            )
        if name in NEEDS_LABELS and self.labels is None:
            raise OptionError(f"criterion '{name}' needs labels", hint="pass labels=<class ids>")
        if self.reconstruct and self.calibration_data is None:
            raise OptionError(
                "reconstruct=True needs calibration data",
                hint="pass calibration_data=<example inputs> (no labels needed) to the pass or "
                "to compile(), or reconstruct=False",
            )

    # -- the pass ---------------------------------------------------------------------------------
    def run(self, graph: Graph) -> bool:
        self._check_data()
        _note_compressed_layers(graph)
        analysis = ChannelGroups(graph)
        groups = self._eligible(graph, analysis)
        scores = self._scores(graph, analysis, groups)
        if self.target is not None:
            plan = self._plan_for_target(graph, analysis, groups, scores)
        else:
            plan = self._plan(groups, scores, self.ratio)
        if not plan:
            return False
        rebuild = self.reconstruct is not False and self.calibration_data is not None
        if rebuild:
            original = graph.clone()
            layers = _refit_layers(graph, analysis, plan)
        dev = prune_and_prove(graph, analysis, plan, prove=self.prove)
        graph.meta["pruning"] = {"removed": len(plan), "groups": len(groups), "mask_deviation": dev}
        if rebuild:
            self._reconstruct(original, graph, layers)
        return True

    def _reconstruct(self, original: Graph, graph: Graph, layers: dict) -> None:
        data = self.calibration_data
        data = list(data) if isinstance(data, (list, tuple)) else [data]
        result = refit_layers(
            original,
            graph,
            [np.asarray(d) for d in data],
            layers,
            ridge=self.reconstruct_ridge,
            skip_underdetermined=self.reconstruct is None,
            compensate_residual=self.reconstruct_residual,
            progress=self.progress or pass_context().progress,
        )
        graph.meta["pruning"]["reconstruction"] = result.summary()
        note = result.note(f"prune-channels: refit {len(result.layers)} layer(s) by least squares")
        graph.meta["notes"] = [*graph.meta.get("notes", ()), note]

    def _eligible(self, graph: Graph, analysis: ChannelGroups) -> list[Group]:
        sources = {g.id: set(analysis.sources(g)) for g in analysis.groups}
        groups = []
        matched: set[str] = set()
        for g in analysis.groups:
            hit = [p for p in self.ignore if any(fnmatch.fnmatch(s, p) for s in sources[g.id])]
            matched.update(hit)
            if hit or (not self.shortcut and _spans_residual(graph, analysis, g)):
                continue
            if len(g) > self.min_channels:
                groups.append(g)
        unmatched = [p for p in self.ignore if p not in matched]
        if unmatched:
            known = sorted({s for ss in sources.values() for s in ss})[:8]
            raise OptionError(
                f"ignore pattern(s) {unmatched} match no prunable layer",
                hint=f"patterns match module paths such as {known}",
            )
        return groups

    def _scores(self, graph: Graph, analysis: ChannelGroups, groups: list[Group]) -> list:
        data = self.calibration_data
        if data is not None and not isinstance(data, (list, tuple)):
            data = [data]
        ctx = Context(
            graph, None if data is None else [np.asarray(d) for d in data], self.labels, self.seed
        )
        criterion = get_criterion(self.criterion)
        out = []
        for g in groups:
            s = np.asarray(criterion(analysis, g, ctx), dtype=np.float64)
            if s.shape != (len(g),):
                raise OptionError(f"criterion returned {s.shape} scores for a group of {len(g)}")
            out.append(s)
        return out

    def _keep(self, n: int, remove: int) -> int:
        keep = max(self.min_channels, n - remove)
        return min(n, math.ceil(keep / self.round_to) * self.round_to)

    def _plan(self, groups: list[Group], scores: list, ratio: float) -> list[int]:
        if self.scope == "uniform":
            counts = [len(g) - self._keep(len(g), int(ratio * len(g))) for g in groups]
        else:
            counts = self._global_counts(groups, scores, int(ratio * sum(map(len, groups))))
        plan = []
        for g, s, k in zip(groups, scores, counts):
            order = np.argsort(s, kind="stable")
            plan += [g.components[i] for i in order[:k]]
        return plan

    def _global_counts(self, groups: list[Group], scores: list, total: int) -> list[int]:
        """How many units each group loses when the ``total`` lowest normalized scores go."""
        ranked = []
        for gi, s in enumerate(scores):
            norm = s / max(float(np.mean(s)), 1e-12)
            ranked += [(v, gi) for v in norm]
        ranked.sort()
        counts = [0] * len(groups)
        caps = [len(g) - self.min_channels for g in groups]
        taken = 0
        for _, gi in ranked:
            if taken >= total:
                break
            if counts[gi] < caps[gi]:
                counts[gi] += 1
                taken += 1
        return [len(g) - self._keep(len(g), c) for g, c in zip(groups, counts)]

    def _measure(self, graph: Graph, analysis: ChannelGroups, plan: list[int]) -> int:
        clone = graph.clone()
        apply_plan(clone, view_for_clone(analysis, graph, clone), plan, shapes_only=True)
        stats = graph_stats(clone)
        return stats.macs if self.target_metric == "macs" else stats.params

    def _plan_for_target(self, graph, analysis, groups, scores) -> list[int]:
        """The plan of the least removal ratio (uniform) or count (global) that reaches the
        target: one parameter defines the plan, so this bisects on it (see bisect_budget)."""
        stats = graph_stats(graph)
        original = stats.macs if self.target_metric == "macs" else stats.params
        measured: dict[tuple, int] = {}

        def cost_at(ratio: float) -> int:
            plan = self._plan(groups, scores, ratio)
            key = tuple(plan)  # nearby ratios often give the same plan: measure it once
            if key not in measured:
                measured[key] = self._measure(graph, analysis, plan)
            return measured[key]

        try:
            ratio = bisect_budget(cost_at, self.target * original, 0.0, 1.0 - 1e-9, steps=14)
        except BudgetError as e:
            raise OptionError(
                f"target {self.target:g} of {self.target_metric} is unreachable: pruning every "
                f"group to its minimum keeps {e.least / original:.3f}",
                hint="raise the target, lower min_channels/round_to, or drop ignore patterns",
            ) from None
        return self._plan(groups, scores, ratio)


def _refit_layers(graph: Graph, analysis: ChannelGroups, plan: list[int]) -> dict:
    """The conv2d/linear nodes that lose input channels under ``plan`` (computed before it is
    applied), each with the indices of its output channels that stay."""
    kept = kept_indices_fn(analysis, removed_mask(analysis, plan))
    layers = {}
    for node in graph.nodes:
        if node.op not in ("conv2d", "linear") or not node.inputs[1].is_constant:
            continue
        w = node.inputs[1]
        if len(kept(w, 1)) < w.shape[1]:
            layers[node.name] = kept(w, 0)
    return layers


def _spans_residual(graph: Graph, analysis: ChannelGroups, group: Group) -> bool:
    """Whether the group's channels run through a residual add (a stream shared by blocks)."""
    keys = {slot.key for slot, _ in group.slots}
    for node in graph.nodes:
        residual = (node.op == "add" and all(not v.is_constant for v in node.inputs)) or (
            node.op in ("conv2d", "linear") and len(node.inputs) > 3 and node.inputs[3] is not None
        )
        if residual and id(node.outputs[0]) in keys:
            return True
    return False


def _note_compressed_layers(graph: Graph) -> None:
    """Say in the report which layers cannot be pruned because their weights are already shared
    or quantized (computed by a codebook_lookup / dequantize_linear, not constants): the channel
    analysis only removes channels of constant weights, so pruning after those passes would
    otherwise be a silent no-op for them."""
    kinds = {"codebook_lookup": "shared", "dequantize_linear": "quantized"}
    found = [
        (n.source or n.name, kinds[w.producer.op])
        for n in graph.nodes
        if n.op in ("conv2d", "linear") and len(n.inputs) > 1
        for w in [n.inputs[1]]
        if w.producer is not None and w.producer.op in kinds
    ]
    if found:
        what = sorted({k for _, k in found})
        note = (
            f"prune-channels: {len(found)} layer(s) with {'/'.join(what)} weights are not "
            f"pruned (e.g. {found[0][0]}); run prune-channels before share-weights/quantize"
        )
        graph.meta["notes"] = [*graph.meta.get("notes", ()), note]
