"""Weight sharing by 1-D k-means per layer (or per group of output channels): ``share-weights``."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from compiler.errors import OptionError, PassError
from compiler.ir.graph import Graph, Node, Value
from compiler.ops.codebook import MAX_BITS, pack_indices
from compiler.pass_manager import Pass, pass_context, register_pass

INITS = ("linear", "density", "kmeans++")
SHAREABLE = ("conv2d", "linear")
KMEANS_PP_SAMPLE = 65536  # k-means++ seeds from at most this many weights (it is O(n k))


# -- 1-D k-means ---------------------------------------------------------------------------------


def kmeans_1d(
    values: np.ndarray,
    k: int,
    *,
    init: str = "linear",
    weights: np.ndarray | None = None,
    iterations: int = 100,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means on scalars, optionally weighted; returns (sorted centroids, assignment).

    In 1-D the clusters of sorted centroids are runs of the sorted values split at the midpoints
    between neighbouring centroids, so after one sort each iteration is a ``searchsorted`` of the
    k-1 midpoints plus prefix sums: O(k log n), not O(n k). It stops when no boundary moves.
    Every value is assigned to its nearest centroid (ties to the lower one); a centroid left
    without members keeps its value.

    Args:
        values: the weights (any shape, flattened).
        k: number of centroids (>= 1, at most the number of values).
        init: "linear" (evenly spaced over [min, max], Deep Compression's choice), "density"
            (quantiles of the weighted distribution) or "kmeans++" (D^2 seeding from ``seed``).
        weights: non-negative importance per value (same size), or None for all equal.
        iterations: the most Lloyd iterations.
        seed: for k-means++.
    """
    x = np.asarray(values, np.float64).reshape(-1)
    n = x.size
    if not 1 <= k <= n:
        raise OptionError(f"k-means needs 1 <= k <= {n} values, got k={k}")
    if init not in INITS:
        raise OptionError(f"unknown init {init!r}", hint=f"use one of {INITS}")
    w = np.ones(n) if weights is None else np.asarray(weights, np.float64).reshape(-1)
    if w.shape != (n,) or not np.all(np.isfinite(w)) or w.min() < 0:
        raise OptionError(
            f"importance weights must be {n} finite non-negative numbers, got shape {w.shape}",
            hint="give one importance per weight element, e.g. squared gradients",
        )
    w = w + 1e-12 * max(float(w.max()), 1e-12)  # all-zero importance must not divide by zero
    order = np.argsort(x, kind="stable")
    xs, ws = x[order], w[order]
    cw = np.concatenate([[0.0], np.cumsum(ws)])
    cwx = np.concatenate([[0.0], np.cumsum(ws * xs)])
    centroids = np.sort(_init(xs, ws, cw, k, init, seed))
    bounds = None
    for _ in range(iterations):
        new_bounds = _boundaries(xs, centroids)
        if bounds is not None and np.array_equal(new_bounds, bounds):
            break
        bounds = new_bounds
        mass = cw[bounds[1:]] - cw[bounds[:-1]]
        total = cwx[bounds[1:]] - cwx[bounds[:-1]]
        filled = mass > 0
        centroids = np.where(filled, total / np.where(filled, mass, 1.0), centroids)
        centroids = np.sort(centroids)
    assignment = np.searchsorted((centroids[1:] + centroids[:-1]) / 2, x, side="left")
    return centroids, assignment


def _boundaries(sorted_x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Start of each centroid's run in ``sorted_x`` (k + 1 entries, the last = n)."""
    mids = (centroids[1:] + centroids[:-1]) / 2
    # a value equal to a midpoint goes to the lower centroid, as searchsorted(mids, x, "left")
    inner = np.searchsorted(sorted_x, mids, side="right")
    return np.concatenate([[0], inner, [sorted_x.size]])


def _init(xs, ws, cw, k: int, init: str, seed: int) -> np.ndarray:
    lo, hi = xs[0], xs[-1]
    if init == "linear":
        return np.linspace(lo, hi, k) if k > 1 else np.array([(lo + hi) / 2])
    if init == "density":
        targets = (np.arange(k) + 0.5) / k * cw[-1]
        at = np.clip(np.searchsorted(cw[1:], targets, side="left"), 0, xs.size - 1)
        return xs[at]
    rng = np.random.default_rng(seed)
    if xs.size > KMEANS_PP_SAMPLE:
        pick = np.sort(rng.choice(xs.size, KMEANS_PP_SAMPLE, replace=False))
        xs, ws = xs[pick], ws[pick]
    chosen = [xs[rng.choice(xs.size, p=ws / ws.sum())]]
    dist = ws * (xs - chosen[0]) ** 2
    for _ in range(k - 1):
        total = dist.sum()
        if total <= 0:  # fewer distinct values than k: repeat one (an empty cluster)
            chosen.append(chosen[-1])
            continue
        chosen.append(xs[rng.choice(xs.size, p=dist / total)])
        dist = np.minimum(dist, ws * (xs - chosen[-1]) ** 2)
    return np.array(chosen)


# -- the pass --------------------------------------------------------------------------------------


@register_pass
@dataclass
class ShareWeights(Pass):
    """Replace conv2d/linear weights by a k-means codebook and packed indices (lossy).

    ``conv2d(x, $w)`` -> ``conv2d(x, codebook_lookup($w.codebook, $w.indices))`` where
    ``$w.codebook`` is float32[groups, 2**bits] (sorted centroids per group of output channels),
    ``$w.indices`` the packed uint8 cluster indices (``bits`` bits each, see
    ``compiler/ops/codebook.py``) and every weight is replaced by its nearest centroid. The same
    for ``linear``. The lookup is not foldable, so later passes and every backend see it; the torch
    backend trains the codebook (each centroid's gradient is the sum over its members).

    Preconditions: run it after ``fuse`` (and after ``prune-channels``): batch-norm folding and
    pruning need constant weights. A batch norm that ``fold-batch-norm`` could still fold into a
    layer raises a PassError (``allow_unfused=True`` shares anyway, leaving it unfolded).

    Skipped layers (recorded in ``graph.meta["weight_sharing"]["skipped"]`` with the reason):
    fewer than ``min_weights`` weights; fewer weights per group than clusters (2**bits); weights
    that are not constants of a floating dtype; the first / last shareable layer with
    ``skip_first`` / ``skip_last``; module paths matching ``ignore``.

    Attributes:
        bits: index width, 1..8: 2**bits centroids per group.
        groups: codebooks per layer, each for an equal share of the output channels; a layer
            whose output channels ``groups`` does not divide gets the largest divisor of
            ``groups`` that divides them (1 always does).
        init: centroid initialisation: "linear", "density" or "kmeans++".
        iterations: the most Lloyd iterations per codebook.
        min_weights: layers with fewer weights stay dense.
        skip_first, skip_last: leave the first / last shareable layer (graph order) dense.
        ignore: module-path patterns (fnmatch) of layers to leave dense.
        importance: per-weight importance for weighted k-means: a dict mapping the weight's
            constant name or module path to an array of its shape, or a function
            ``(node, weight array) -> array``; None weighs all equally.
        seed: seeds k-means++.
        allow_unfused: share even when a batch norm could still be folded into a layer.
        progress: a progress bar over the layers.
    """

    name = "share-weights"
    exact = False
    bits: int = 4
    groups: int = 1
    init: str = "linear"
    iterations: int = 100
    min_weights: int = 256
    skip_first: bool = False
    skip_last: bool = False
    ignore: tuple[str, ...] = ()
    importance: Any = field(default=None, repr=False)
    seed: int = 0
    allow_unfused: bool = False
    progress: bool = False

    def __post_init__(self) -> None:
        if not (isinstance(self.bits, int) and 1 <= self.bits <= MAX_BITS):
            raise OptionError(
                f"share-weights: bits={self.bits!r} is outside 1..{MAX_BITS}",
                hint="bits is the index width: 4 gives 16 centroids per codebook",
            )
        if not (isinstance(self.groups, int) and self.groups >= 1):
            raise OptionError(f"share-weights: groups={self.groups!r} must be an integer >= 1")
        if self.init not in INITS:
            raise OptionError(
                f"share-weights: unknown init {self.init!r}", hint=f"use one of {INITS}"
            )
        if self.iterations < 1 or self.min_weights < 0:
            raise OptionError("share-weights: iterations must be >= 1 and min_weights >= 0")
        if self.importance is not None and not (
            isinstance(self.importance, dict) or callable(self.importance)
        ):
            raise OptionError(
                "share-weights: importance must be None, a dict or a function",
                hint="map weight names (or module paths) to arrays, or pass fn(node, weight)",
            )
        if isinstance(self.ignore, str):
            self.ignore = (self.ignore,)

    def run(self, graph: Graph) -> bool:
        if not self.allow_unfused:
            _refuse_unfused(graph)
        layers = self._layers(graph)
        skipped = self._skips(graph, layers)
        todo = [(w, users) for w, users in layers.items() if w not in skipped]
        bar = None
        if self.progress or pass_context().progress:
            from tqdm.auto import tqdm

            total = sum(w.numel for w, _ in todo)
            bar = tqdm(total=total, desc="share-weights", unit="weight", unit_scale=True)
        before = after = 0
        for value, users in todo:
            before += value.nbytes
            codebook, indices = self._share(graph, value, users)
            after += codebook.nbytes + indices.nbytes
            if bar is not None:
                bar.update(value.numel)
        if bar is not None:
            bar.close()
        graph.meta["weight_sharing"] = {
            "bits": self.bits,
            "shared": len(todo),
            "skipped": [(v.name, reason) for v, reason in skipped.items()],
            "bytes_before": before,
            "bytes_after": after,
        }
        return bool(todo)

    # -- choosing layers -------------------------------------------------------------------------
    def _layers(self, graph: Graph) -> dict[Value, list[Node]]:
        """Weight values read as input 1 of conv2d/linear, in graph order, with their readers."""
        layers: dict[Value, list[Node]] = {}
        for node in graph.nodes:
            if node.op in SHAREABLE and len(node.inputs) > 1 and node.inputs[1] is not None:
                layers.setdefault(node.inputs[1], []).append(node)
        return layers

    def _skips(self, graph: Graph, layers: dict[Value, list[Node]]) -> dict[Value, str]:
        k = 1 << self.bits
        skipped: dict[Value, str] = {}
        order = list(layers)
        matched: set[str] = set()
        for i, (value, users) in enumerate(layers.items()):
            paths = [u.source or u.name for u in users]
            hit = [p for p in self.ignore if any(fnmatch.fnmatch(s, p) for s in paths)]
            matched.update(hit)
            if not value.is_constant or np.dtype(value.dtype).kind != "f":
                reason = "not a float constant (already shared or computed)"
            elif hit:
                reason = f"ignored ({hit[0]})"
            elif self.skip_first and i == 0:
                reason = "first layer"
            elif self.skip_last and i == len(order) - 1:
                reason = "last layer"
            elif value.numel < self.min_weights:
                reason = f"{value.numel} weights < min_weights={self.min_weights}"
            elif value.numel // self.groups_for(value) < k:
                per_group = value.numel // self.groups_for(value)
                reason = f"{per_group} weights per group < {k} clusters"
            else:
                continue
            skipped[value] = reason
        unmatched = [p for p in self.ignore if p not in matched]
        if unmatched:
            known = sorted({u.source or u.name for us in layers.values() for u in us})[:8]
            raise OptionError(
                f"share-weights: ignore pattern(s) {unmatched} match no conv2d/linear layer",
                hint=f"patterns match module paths such as {known}",
            )
        return skipped

    def groups_for(self, value: Value) -> int:
        """``groups``, or its largest divisor that divides the layer's output channels."""
        channels = value.shape[0]
        return max(
            d for d in range(1, self.groups + 1) if self.groups % d == 0 and channels % d == 0
        )

    # -- sharing one weight ----------------------------------------------------------------------
    def _share(self, graph: Graph, value: Value, users: list[Node]) -> tuple[Value, Value]:
        data = value.data
        importance = self._importance(value, users[0], data)
        k = 1 << self.bits
        groups = self.groups_for(value)
        rows = data.reshape(groups, -1)
        weights = None if importance is None else importance.reshape(groups, -1)
        codebook = np.empty((groups, k), data.dtype)
        index = np.empty(rows.shape, np.uint8)
        for g in range(groups):
            centroids, assignment = kmeans_1d(
                rows[g],
                k,
                init=self.init,
                weights=None if weights is None else weights[g],
                iterations=self.iterations,
                seed=self.seed + g,
            )
            codebook[g], index[g] = centroids, assignment
        cb = graph.constant(codebook, f"{value.name}.codebook")
        packed = graph.constant(pack_indices(index, self.bits), f"{value.name}.indices")
        for const in (cb, packed):
            const.meta.update(value.meta)
        first = users[0]
        lookup = graph.add_node(
            "codebook_lookup",
            [cb, packed],
            {"shape": tuple(value.shape), "bits": self.bits},
            name=f"{value.name}.shared",
            before=first,
            meta={"source": first.source} if first.source else None,
        )
        for node, i in list(value.uses):
            if node.op in SHAREABLE and i == 1:
                node.set_input(1, lookup.outputs[0])
        return cb, packed

    def _importance(self, value: Value, node: Node, data: np.ndarray) -> np.ndarray | None:
        if self.importance is None:
            return None
        if isinstance(self.importance, dict):
            found = self.importance.get(value.name, self.importance.get(node.source or ""))
        else:
            found = self.importance(node, data)
        if found is None:
            return None
        found = np.asarray(found, np.float64)
        if found.shape != data.shape:
            raise OptionError(
                f"share-weights: importance for '{value.name}' has shape {found.shape}, the "
                f"weight has {data.shape}",
                node=node.name,
                op=node.op,
                source=node.source,
                hint="give one importance per weight element",
            )
        return found


def _refuse_unfused(graph: Graph) -> None:
    """A batch norm fold-batch-norm could fold is left unfoldable by sharing: fuse first."""
    from passes.fusion import _foldable_producer

    for bn in graph.find("batch_norm"):
        producer = _foldable_producer(graph, bn)
        if producer is not None:
            raise PassError(
                f"share-weights: batch norm '{bn.name}' can still be folded into "
                f"'{producer.name}'; once the weight is shared it cannot",
                node=producer.name,
                op=producer.op,
                source=producer.source,
                hint="run 'fuse' before 'share-weights' (passes=['fuse', 'share-weights']), or "
                "pass allow_unfused=True to keep the batch norms",
            )


Importance = dict[str, np.ndarray] | Callable[[Node, np.ndarray], np.ndarray]

__all__ = ["INITS", "Importance", "ShareWeights", "kmeans_1d"]
