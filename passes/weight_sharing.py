"""Weight sharing by 1-D k-means per layer (or per group of output channels): ``share-weights``.

Without calibration data every codebook is the k-means of its weights. With it (the default when
``calibration_data`` is given), each layer's codebook is fit to the layer's output instead: the one
reconstruction engine (``compiler/analysis/reconstruct.py``) walks the original and the shared
graph layer by layer and hands :class:`CodebookSolver` each layer's ``X^T X`` and ``X^T Y``;
the solver picks indices for the quadratic output error and refits the centroids and the bias by
least squares.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from compiler.analysis.reconstruct import LayerProblem, Solver, layer_parameters
from compiler.analysis.reconstruct import reconstruct as refit_layers
from compiler.errors import OptionError, PassError
from compiler.ir.graph import Graph, Node, Value
from compiler.ir.inputs import calibration_inputs
from compiler.ops.codebook import MAX_BITS, pack_indices
from compiler.ops.table import get_op
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


# -- output-aware codebooks ------------------------------------------------------------------------


@dataclass
class _Terms:
    """One conv group's quadratic with the bias eliminated: the weights ``w`` of an output row
    cost ``w^T hs w - 2 w^T gs[:, o]`` (plus a constant) once its bias takes its best value
    ``(gb[o] - hwb . w) / hbb``; without a bias ``hs, gs`` are ``X^T X, X^T Y`` themselves."""

    hs: np.ndarray  # (d, d)
    gs: np.ndarray  # (d, outputs of the group)
    hwb: np.ndarray | None  # (d,): X^T 1
    hbb: float  # rows
    gb: np.ndarray | None  # (outputs of the group,): 1^T Y


def _terms(problem: LayerProblem) -> list[_Terms]:
    d = problem.features
    out = []
    for h, y in zip(problem.xtx, problem.xty):
        if not problem.bias:
            out.append(_Terms(h, y, None, 0.0, None))
            continue
        hwb, hbb, gb = h[:d, d], max(float(h[d, d]), 1e-30), y[d]
        out.append(
            _Terms(
                h[:d, :d] - np.outer(hwb, hwb) / hbb, y[:d] - np.outer(hwb, gb) / hbb, hwb, hbb, gb
            )
        )
    return out


def _ridge(hs: np.ndarray, ridge: float) -> float:
    """The damping ``lam = ridge * mean(diag(hs))``."""
    return ridge * max(float(np.mean(np.diag(hs))), 1e-12)


def _ridge_target(t: _Terms, w0: np.ndarray, ridge: float) -> np.ndarray:
    """``argmin |X w - Y|^2 + lam |w - w0|^2`` per output row, bias eliminated: (rows, d). The
    dense layer refit to the original's outputs, pulled towards the original weights ``w0``
    (rows, d) in the directions the calibration data does not determine."""
    lam = _ridge(t.hs, ridge)
    hd = t.hs + lam * np.eye(len(t.hs))
    rhs = t.gs + lam * w0.T
    try:
        return np.linalg.solve(hd, rhs).T
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(hd, rhs, rcond=None)[0].T


def _upper_cholesky_of_inverse(h: np.ndarray) -> np.ndarray:
    """``U`` upper triangular with ``inv(h) = U^T U`` (GPTQ's sequential-update factor)."""
    scale = max(float(np.mean(np.diag(h))), 1e-12)
    for extra in (0.0, 1e-6, 1e-4, 1e-2, 1.0):
        try:
            hinv = np.linalg.inv(h + extra * scale * np.eye(len(h)))
            return np.linalg.cholesky((hinv + hinv.T) / 2).T
        except np.linalg.LinAlgError:
            continue
    raise np.linalg.LinAlgError("X^T X cannot be factored")


def rounding_factor(hs: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """The column order (decreasing ``diag(hs)``) and the upper Cholesky factor of the inverse
    of the damped, reordered ``hs`` that :func:`assign_indices` rounds with."""
    order = np.argsort(-np.diag(hs), kind="stable")
    damped = hs + _ridge(hs, ridge) * np.eye(len(hs))
    return order, _upper_cholesky_of_inverse(damped[np.ix_(order, order)])


def assign_indices(
    hs: np.ndarray,
    target: np.ndarray,
    books: np.ndarray,
    ridge: float,
    factor: tuple[np.ndarray, np.ndarray] | None = None,
    block: int = 128,
) -> np.ndarray:
    """Codebook indices for ``target`` rows (rows, d) that keep ``|X (W - target)^T|^2`` small:
    GPTQ's column-by-column rounding with error feedback (Frantar et al. 2023), rounding to each
    row's nearest centroid in ``books`` (rows, K) instead of a uniform grid. Columns go in order
    of decreasing input energy ``diag(hs)``; each column's rounding error is spread over the
    columns not yet rounded through the Cholesky factor of ``inv(hs + lam I)`` (``factor``, from
    :func:`rounding_factor`, when already computed).
    """
    d = hs.shape[0]
    order, u = factor if factor is not None else rounding_factor(hs, ridge)
    w = target[:, order].astype(np.float64, copy=True)
    rows = np.arange(len(w))
    index = np.empty(w.shape, np.int64)
    for start in range(0, d, block):
        end = min(start + block, d)
        errors = np.empty((len(w), end - start))
        for i in range(start, end):
            col = w[:, i]
            j = np.abs(col[:, None] - books).argmin(axis=1)
            index[:, i] = j
            err = (col - books[rows, j]) / u[i, i]
            errors[:, i - start] = err
            w[:, i + 1 : end] -= np.outer(err, u[i, i + 1 : end])
        w[:, end:] -= errors @ u[start:end, end:]
    out = np.empty_like(index)
    out[:, order] = index
    return out


def solve_centroids(
    problem: LayerProblem,
    index: np.ndarray,
    row_group: np.ndarray,
    previous: np.ndarray,
    terms: list[_Terms] | None = None,
) -> np.ndarray:
    """The centroids minimising the layer's output error ``|X M^T - Y|^2`` for fixed indices,
    the bias (when the layer has one) free: exact least squares in the K centroids per codebook.

    With ``W = sum_k c_k M_k`` (``M_k`` the indicator of index k) the error is quadratic in ``c``;
    eliminating each output's bias leaves ``A c = r`` with ``A = sum_o M_o^T Hs M_o`` and
    ``r = sum_o M_o^T gs_o`` (:class:`_Terms`). A centroid no weight uses keeps its value in
    ``previous`` (codebooks, K).

    Args:
        problem: the layer's accumulated problem.
        index: (outputs, d) indices into each row's codebook.
        row_group: (outputs,) the codebook row (group) of each output.
        previous: (codebooks, K) the current centroids.
    """
    terms = terms or _terms(problem)
    k = previous.shape[1]
    d = problem.features
    per_group = problem.outputs // problem.groups
    a = np.zeros((len(previous), k, k))
    r = np.zeros((len(previous), k))
    chunk = max(1, max(d * d, 1 << 18) // (k * d))  # one-hot blocks of about d x d numbers
    for g, t in enumerate(terms):
        for lo in range(g * per_group, (g + 1) * per_group, chunk):
            hi = min(lo + chunk, (g + 1) * per_group)
            onehot = (index[lo:hi, None, :] == np.arange(k)[None, :, None]).astype(np.float64)
            p = (onehot.reshape(-1, d) @ t.hs).reshape(hi - lo, k, d)
            quad = np.matmul(p, onehot.transpose(0, 2, 1))
            lin = np.einsum("akd,da->ak", onehot, t.gs[:, lo - g * per_group : hi - g * per_group])
            np.add.at(a, row_group[lo:hi], quad)
            np.add.at(r, row_group[lo:hi], lin)
    out = previous.astype(np.float64, copy=True)
    for c in range(len(previous)):
        used = np.diag(a[c]) > 0
        if not used.any():
            continue
        sub, rhs = a[c][np.ix_(used, used)], r[c][used]
        try:
            out[c, used] = np.linalg.solve(sub, rhs)
        except np.linalg.LinAlgError:
            out[c, used] = np.linalg.lstsq(sub, rhs, rcond=None)[0]
    return out


def layer_matrix(
    problem: LayerProblem,
    codebook: np.ndarray,
    index: np.ndarray,
    row_group: np.ndarray,
    terms: list[_Terms] | None = None,
) -> np.ndarray:
    """The ``(outputs, unknowns)`` parameters of shared weights ``codebook[row_group, index]``,
    with each output's bias at its least-squares best for those weights."""
    w = np.take_along_axis(codebook[row_group].astype(np.float64), index, axis=1)
    if not problem.bias:
        return w
    terms = terms or _terms(problem)
    per_group = problem.outputs // problem.groups
    bias = np.concatenate(
        [
            (t.gb - w[g * per_group : (g + 1) * per_group] @ t.hwb) / t.hbb
            for g, t in enumerate(terms)
        ]
    )
    return np.concatenate([w, bias[:, None]], axis=1)


def sort_codebook(codebook: np.ndarray, index: np.ndarray, row_group: np.ndarray):
    """Sort each codebook row and renumber the indices to match."""
    order = np.argsort(codebook, axis=1, kind="stable")
    rank = np.argsort(order, axis=1)
    return np.take_along_axis(codebook, order, axis=1), np.take_along_axis(
        rank[row_group], index, axis=1
    )


@dataclass
class CodebookSolver(Solver):
    """Output-aware codebooks for :func:`compiler.analysis.reconstruct.reconstruct`.

    The engine hands over each shared layer's problem (``X`` from the shared graph, whose
    earlier layers are already refit, ``Y`` the original layer's output); :meth:`solve` fits the
    layer's codebook(s), indices and bias to it, writes the decoded weight and the bias into the
    layer's constants and keeps ``(codebook, index)`` in :attr:`fitted` for the pass to pack.

    Per layer it tries, and keeps whichever gives the smallest output error on the data:

    1. the weight-only indices with the centroids refit by least squares (:func:`solve_centroids`);
    2. the activation-weighted k-means of the dense least-squares refit ``W*``
       (:func:`_ridge_target`): every weight ``w[o, i]`` weighs ``Hs[i, i]``, the energy of its
       input column (an input channel at one kernel position; ``Hs`` is ``X^T X``, centred when
       the layer has a bias, see :class:`_Terms`), then the centroids refit;
    3. ``iterations`` rounds of: indices by error-feedback rounding to the current centroids
       (:func:`assign_indices`, minimising ``(w - W*)^T Hs (w - W*)`` column by column), then
       the centroids refit.

    Every candidate's bias is the least-squares best for its weights. So the result is never
    worse on the calibration data than the weight-only codebook with refit centroids and bias.

    Attributes:
        books: weight constant name -> its weight-only ``(codebook (G, K), index (O, d))``.
        dense: weight constant name -> the original dense weight.
        ridge: damping of ``X^T X``, relative to its mean diagonal (``W*`` is pulled towards the
            original weights by it, and the rounding's Cholesky factor is taken of the damped
            matrix).
        iterations: rounds of rounding + centroid refit.
        init, kmeans_iterations, seed: for the weighted k-means (see :func:`kmeans_1d`).
        fitted: weight name -> ``(codebook (G, K) float, index (O, d))`` chosen per solved layer.
        methods: weight name -> which candidate won ("refit", "weighted", "rounded").
    """

    books: dict[str, tuple[np.ndarray, np.ndarray]]
    dense: dict[str, np.ndarray]
    ridge: float = 1e-2
    iterations: int = 3
    init: str = "linear"
    kmeans_iterations: int = 100
    seed: int = 0
    fitted: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    methods: dict[str, str] = field(default_factory=dict)

    def skip(self, node: Node) -> str | None:
        if node.inputs[1].name not in self.books:
            return "weight not shared"
        return super().skip(node)

    def solve(self, problem: LayerProblem) -> tuple[np.ndarray, np.ndarray]:
        node = problem.node
        weight = node.inputs[1]
        codebook0, index0 = self.books[weight.name]
        outputs, k = problem.outputs, codebook0.shape[1]
        row_group = np.arange(outputs) // (outputs // len(codebook0))
        terms = _terms(problem)
        per_group = outputs // problem.groups
        w0 = self.dense[weight.name].reshape(outputs, -1).astype(np.float64)
        target = np.concatenate(
            [
                _ridge_target(t, w0[g * per_group : (g + 1) * per_group], self.ridge)
                for g, t in enumerate(terms)
            ]
        )
        energy = np.concatenate(
            [np.broadcast_to(np.diag(t.hs), (per_group, problem.features)) for t in terms]
        )
        dtype = weight.data.dtype

        best: list = []

        def consider(method: str, codebook: np.ndarray, index: np.ndarray) -> None:
            codebook = codebook.astype(dtype).astype(np.float64)  # as it will be stored
            m = layer_matrix(problem, codebook, index, row_group, terms)
            err = problem.error(m)
            if not best or err < best[0]:
                best[:] = [err, method, codebook, index, m]

        index0 = index0.astype(np.int64)
        consider("refit", solve_centroids(problem, index0, row_group, codebook0, terms), index0)
        codebook = np.empty_like(codebook0, np.float64)
        index = np.empty((outputs, problem.features), np.int64)
        for c in range(len(codebook0)):
            rows = row_group == c
            codebook[c], assigned = kmeans_1d(
                target[rows],
                k,
                init=self.init,
                weights=np.maximum(energy[rows], 0.0),
                iterations=self.kmeans_iterations,
                seed=self.seed + c,
            )
            index[rows] = assigned.reshape(-1, problem.features)
        codebook = solve_centroids(problem, index, row_group, codebook, terms)
        consider("weighted", codebook, index)
        factors = [rounding_factor(t.hs, self.ridge) for t in terms] if self.iterations else []
        for _ in range(self.iterations):
            for g, t in enumerate(terms):
                rows = slice(g * per_group, (g + 1) * per_group)
                index[rows] = assign_indices(
                    t.hs, target[rows], codebook[row_group[rows]], self.ridge, factors[g]
                )
            codebook = solve_centroids(problem, index, row_group, codebook, terms)
            consider("rounded", codebook, index)
        _, method, codebook, index, m = best
        codebook, index = sort_codebook(codebook, index, row_group)
        self.fitted[weight.name] = (codebook.astype(dtype), index)
        self.methods[weight.name] = method
        old = layer_parameters(node)
        d = problem.features
        weight.data = np.ascontiguousarray(m[:, :d].reshape(weight.shape)).astype(dtype)
        if problem.bias:
            bias = node.inputs[2]
            bias.data = np.ascontiguousarray(m[:, d]).astype(bias.dtype)
        return old, layer_parameters(node)


# -- the pass --------------------------------------------------------------------------------------


@register_pass
@dataclass
class ShareWeights(Pass):
    """Replace conv2d/linear weights by a k-means codebook and packed indices (lossy).

    ``conv2d(x, $w)`` -> ``conv2d(x, codebook_lookup($w.codebook, $w.indices))`` where
    ``$w.codebook`` is float32[groups, 2**bits] (sorted centroids per group of output channels),
    ``$w.indices`` the packed uint8 cluster indices (``bits`` bits each, see
    ``compiler/ops/codebook.py``) and every weight is replaced by its nearest centroid (without
    calibration data; see below). The same for ``linear``. The lookup is not foldable, so later
    passes and every backend see it; the torch backend trains the codebook (each centroid's
    gradient is the sum over its members).

    Preconditions: run it after ``fuse`` (and after ``prune-channels``): batch-norm folding and
    pruning need constant weights. A batch norm that ``fold-batch-norm`` could still fold into a
    layer raises a PassError (``allow_unfused=True`` shares anyway, leaving it unfolded).

    Skipped layers (recorded in ``graph.meta["weight_sharing"]["skipped"]`` with the reason):
    fewer than ``min_weights`` weights; fewer weights per group than clusters (2**bits); weights
    that are not constants of a floating dtype; the first / last shareable layer with
    ``skip_first`` / ``skip_last``; module paths matching ``ignore``.

    With ``calibration_data`` (no labels; ``compile(..., calibration_data=...)`` hands it over)
    the codebooks are fit to the layers' outputs instead of their weights, in graph order, each
    layer seeing the already shared layers before it (:class:`CodebookSolver` on the
    reconstruction engine): activation-weighted k-means, error-feedback rounding and a
    least-squares refit of the centroids and the bias. The result and the time are in
    ``graph.meta["weight_sharing"]["reconstruction"]`` and a report note.

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
        calibration_data: inputs (an array, or one array per graph input, N samples each) the
            layers' outputs are fit on; None: weight-only codebooks.
        reconstruct: fit the codebooks to the layers' outputs on ``calibration_data``. None
            (default): on when calibration data is given, layers with fewer output rows than
            unknowns are then left weight-only with a note; True: required (an error without
            data or with too few samples); False: weight-only codebooks even with data.
        reconstruct_ridge: damping of each layer's ``X^T X``, relative to its mean diagonal.
        reconstruct_iterations: rounds of error-feedback rounding + centroid refit per layer.
        reconstruct_residual: a layer with a fused residual add fits the original's
            ``conv + b + residual`` minus the shared graph's residual (absorbing the error the
            residual stream carries) instead of the original's ``conv + b`` alone.
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
    calibration_data: Any = field(default=None, repr=False)
    reconstruct: bool | None = None
    reconstruct_ridge: float = 1e-2
    reconstruct_iterations: int = 3
    reconstruct_residual: bool = True
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
        if not (
            isinstance(self.reconstruct_ridge, (int, float))
            and math.isfinite(self.reconstruct_ridge)
            and self.reconstruct_ridge > 0
        ):
            raise OptionError(
                f"share-weights: reconstruct_ridge={self.reconstruct_ridge!r} must be a finite "
                "number > 0",
                hint="it damps X^T X relative to its mean diagonal, e.g. 1e-2",
            )
        if not (isinstance(self.reconstruct_iterations, int) and self.reconstruct_iterations >= 0):
            raise OptionError(
                f"share-weights: reconstruct_iterations={self.reconstruct_iterations!r} must be "
                "an integer >= 0"
            )

    def missing_data(self) -> str | None:
        if self.reconstruct and self.calibration_data is None:
            return "reconstruct=True needs calibration data (inputs only, no labels)"
        return None

    def _check_data(self) -> None:
        """What the options need, checked when the pass runs (``compile(...,
        calibration_data=...)`` hands its data to a copy of the pass)."""
        missing = self.missing_data()
        if missing:
            raise OptionError(
                f"share-weights: {missing}",
                hint="pass calibration_data=<example inputs> to the pass or to compile(), or "
                "reconstruct=False",
            )
        if self.importance is not None and self._rebuild:
            raise OptionError(
                "share-weights: importance= weighs the weight-only k-means, but with calibration "
                "data the codebooks are fit to the layers' outputs",
                hint="drop importance=, or pass reconstruct=False to share by importance",
            )

    @property
    def _rebuild(self) -> bool:
        return self.reconstruct is not False and self.calibration_data is not None

    def run(self, graph: Graph) -> bool:
        self._check_data()
        if not self.allow_unfused:
            _refuse_unfused(graph)
        layers = self._layers(graph)
        skipped = self._skips(graph, layers)
        todo = [(w, users) for w, users in layers.items() if w not in skipped]
        rebuild = self._rebuild and bool(todo)
        data = calibration_inputs(graph, self.calibration_data) if rebuild else None
        bar = None
        if self.progress or pass_context().progress:
            from tqdm.auto import tqdm

            total = sum(w.numel for w, _ in todo)
            bar = tqdm(total=total, desc="share-weights", unit="weight", unit_scale=True)
        books: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for value, users in todo:
            books[value.name] = self._kmeans(value, users)
            if bar is not None:
                bar.update(value.numel)
        if bar is not None:
            bar.close()
        biases: dict[str, np.ndarray] = {}
        info = self._reconstruct(graph, todo, books, biases, data) if rebuild else None
        # nothing in ``graph`` changed so far: every error above leaves it as it was
        before = after = 0
        for value, users in todo:
            before += value.nbytes
            codebook, indices = self._rewrite(graph, value, users, *books[value.name])
            after += codebook.nbytes + indices.nbytes
        for node in graph.nodes:
            if node.name in biases:
                node.inputs[2].data = biases[node.name]
        graph.meta["weight_sharing"] = {
            "bits": self.bits,
            "shared": len(todo),
            "skipped": [(v.name, reason) for v, reason in skipped.items()],
            "bytes_before": before,
            "bytes_after": after,
        }
        if info is not None:
            graph.meta["weight_sharing"]["reconstruction"] = info
            note = (
                f"share-weights: fit {info['layers']} codebook(s) to the layers' outputs on "
                f"{info['samples']} calibration samples: output deviation "
                f"{info['deviation_before']:.3g} (weight-only) -> {info['deviation_after']:.3g} "
                f"({info['seconds']:.1f} s)"
            )
            if info["skipped"]:
                name, why = next(iter(info["skipped"].items()))
                note += f"; {len(info['skipped'])} left weight-only (e.g. {name}: {why})"
            graph.meta["notes"] = [*graph.meta.get("notes", ()), note]
        return bool(todo)

    def _reconstruct(
        self,
        graph: Graph,
        todo: list[tuple[Value, list[Node]]],
        books: dict[str, tuple[np.ndarray, np.ndarray]],
        biases: dict[str, np.ndarray],
        data: list[np.ndarray],
    ) -> dict:
        """Fit the codebooks of ``todo`` to the layers' outputs on ``data``; updates ``books``
        and fills ``biases`` (node name -> refit bias). ``graph`` is not changed: the fit runs on
        a copy whose shared weights are constants holding the decoded codebooks (the engine
        reads constants afresh at every layer, so each refit is seen downstream at once)."""
        work = graph.clone()
        constants = {v.name: v for v in work.constants()}
        for value, _ in todo:
            codebook, index = books[value.name]
            constants[value.name].data = _decode(codebook, index, value.shape)
        names = [
            n.name
            for n in work.nodes
            if n.op in SHAREABLE
            and len(n.inputs) > 1
            and n.inputs[1] is not None
            and n.inputs[1].name in books
        ]
        solver = CodebookSolver(
            books=books,
            dense={value.name: value.data for value, _ in todo},
            ridge=self.reconstruct_ridge,
            iterations=self.reconstruct_iterations,
            init=self.init,
            kmeans_iterations=self.iterations,
            seed=self.seed,
        )
        result = refit_layers(
            graph,
            work,
            data,
            names,
            solver=solver,
            skip_underdetermined=self.reconstruct is None,
            compensate_residual=self.reconstruct_residual,
            run_node=_node_runner(),
            progress=self.progress or pass_context().progress,
        )
        books.update(solver.fitted)
        for fit in result.layers:
            node = work.node(fit.name)
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                biases[fit.name] = node.inputs[2].data
        methods: dict[str, int] = {}
        for method in solver.methods.values():
            methods[method] = methods.get(method, 0) + 1
        return {
            **result.summary(),
            "methods": methods,
            "per_layer": {f.name: (f.before, f.after) for f in result.layers},
        }

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
    def _kmeans(self, value: Value, users: list[Node]) -> tuple[np.ndarray, np.ndarray]:
        """The weight-only codebook (groups, K) and indices (output channels, rest) of ``value``."""
        data = value.data
        importance = self._importance(value, users[0], data)
        k = 1 << self.bits
        groups = self.groups_for(value)
        rows = data.reshape(groups, -1)
        weights = None if importance is None else importance.reshape(groups, -1)
        codebook = np.empty((groups, k), data.dtype)
        index = np.empty(rows.shape, np.int64)
        for g in range(groups):
            codebook[g], index[g] = kmeans_1d(
                rows[g],
                k,
                init=self.init,
                weights=None if weights is None else weights[g],
                iterations=self.iterations,
                seed=self.seed + g,
            )
        return codebook, index.reshape(value.shape[0], -1)

    def _rewrite(
        self, graph: Graph, value: Value, users: list[Node], codebook: np.ndarray, index
    ) -> tuple[Value, Value]:
        """Replace ``value``'s conv2d/linear uses by ``codebook_lookup(codebook, indices)``."""
        cb = graph.constant(codebook.astype(value.data.dtype), f"{value.name}.codebook")
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


def _decode(codebook: np.ndarray, index: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The dense weight of ``codebook`` (groups, K) and ``index`` (output channels, rest)."""
    rows = np.arange(shape[0]) // (shape[0] // len(codebook))
    return np.take_along_axis(codebook[rows], index.reshape(shape[0], -1), axis=1).reshape(shape)


def _node_runner() -> Callable[[Node, list], list] | None:
    """``(node, args) -> outputs`` for the reconstruction engine: conv2d and linear nodes run as
    one-node torch modules of the pass context (the numpy reference conv is most of the refit
    time otherwise), every other node with the op table; None (the engine's numpy default) when
    the context lends no torch module."""
    build = pass_context().torch_module
    if build is None:
        return None
    modules: dict[tuple, Any] = {}

    def run_node(node: Node, args: list) -> list:
        if node.op not in SHAREABLE:
            return get_op(node.op).run(args, node.attrs)
        import torch

        key = (
            node.op,
            repr(sorted(node.attrs.items())),
            *(getattr(a, "shape", None) for a in args),
        )
        if key not in modules:
            g = Graph("node")
            ins = [
                None if a is None else g.add_input(f"a{i}", a.shape, str(a.dtype))
                for i, a in enumerate(args)
            ]
            g.outputs = list(g.add_node(node.op, ins, node.attrs).outputs)
            modules[key] = build(g)
        with torch.no_grad():
            y = modules[key](
                *[torch.from_numpy(np.ascontiguousarray(a)) for a in args if a is not None]
            )
        return [t.numpy() for t in (y if isinstance(y, tuple) else (y,))]

    return run_node


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

__all__ = [
    "INITS",
    "CodebookSolver",
    "Importance",
    "ShareWeights",
    "assign_indices",
    "kmeans_1d",
    "layer_matrix",
    "solve_centroids",
]
