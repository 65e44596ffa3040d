"""Data-aware reconstruction: refit compressed conv2d/linear layers by least squares so that they
reproduce the original model's layer outputs on calibration data (CP, He et al. 2017; ThiNet).

For each layer to refit, in topological order, :func:`reconstruct` accumulates over calibration
batches

- ``X``: the layer's im2col'd input taken from the COMPRESSED graph, whose earlier layers are
  already refit, so the fit also compensates the errors made upstream, and
- ``Y``: the ORIGINAL layer's pre-epilogue output ``conv(x, w) + b`` (before the fused residual
  add and activation), restricted to the output channels the compressed layer kept,

as ``X^T X`` and ``X^T Y`` (float64), then hands that :class:`LayerProblem` to a solver; the
default solves the ridge problem ``min |X W - Y|^2 + lam |W|^2`` (the bias column is not
penalised) for the new weight and bias.
With ``compensate_residual`` a layer with a fused residual input fits instead
``Y + residual_original - residual_compressed``, so it also absorbs the error of the stream.

Both graphs are walked node by node over all calibration batches (each batch has the graph's
static batch size): the original is advanced through a layer (its ``Y`` captured), the compressed
one up to it, the layer is solved and its new weights used from then on. So one forward pass of
each graph refits every layer (plus, with ``measure``, one of the compressed graph before
refitting), and only values still to be read are held, for all batches: memory is the graph's
live set times the number of samples, plus one layer's ``X^T X``; no activation is kept past its
last use.

Grouped and depthwise convs are solved per group (each group's outputs see only its input
channels). What is done with each layer's accumulated problem is a :class:`Solver`'s business:
the default :class:`RidgeSolver` solves it; passes bring their own (learned rounding of quantized
weights, least-squares codebooks of shared ones), so every lossy pass shares this one engine.
Layers a solver cannot change (by default: weights that are not a constant read by that layer
only) are listed in :attr:`Reconstruction.skipped`.

The engine imports no torch and no backend: ``run_node(node, args) -> outputs`` runs one node on
one batch (the op table's numpy implementation by default).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from compiler.analysis.deviation import deviation
from compiler.errors import InputError, OptionError
from compiler.ir.graph import Graph, Node
from compiler.ops.nn import im2col
from compiler.ops.table import get_op

NodeRunner = Callable[[Node, list], list]
REFIT_OPS = ("conv2d", "linear")


@dataclass
class LayerFit:
    """One refit layer: rows and features of its least-squares problem, and its relative error
    ``|XW - Y| / |Y|`` on the calibration data with the weights it had (``before``) and the
    refit ones (``after``)."""

    name: str
    rows: int
    features: int
    before: float
    after: float


@dataclass
class Reconstruction:
    """What :func:`reconstruct` did: per-layer fits, skipped layers (name -> why), the relative
    output deviation of the compressed graph from the original on the calibration data before and
    after (None when not measured), samples used and seconds taken."""

    layers: list[LayerFit] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    deviation_before: float | None = None
    deviation_after: float | None = None
    samples: int = 0
    seconds: float = 0.0

    def summary(self) -> dict:
        """What a pass records in ``graph.meta``: layers, skipped, samples, deviations, seconds."""
        return {
            "layers": len(self.layers),
            "skipped": dict(self.skipped),
            "samples": self.samples,
            "deviation_before": self.deviation_before,
            "deviation_after": self.deviation_after,
            "seconds": self.seconds,
        }

    def note(self, what: str) -> str:
        """The report line: ``"<what> on N calibration samples: output deviation a -> b (s)"``,
        plus how many layers were skipped and why the first was."""
        note = (
            f"{what} on {self.samples} calibration samples: output deviation "
            f"{self.deviation_before:.3g} -> {self.deviation_after:.3g} ({self.seconds:.1f} s)"
        )
        if self.skipped:
            name, why = next(iter(self.skipped.items()))
            note += f"; {len(self.skipped)} skipped (e.g. {name}: {why})"
        return note


def _default_run_node(node: Node, args: list) -> list:
    return get_op(node.op).run(args, node.attrs)


class _Stepper:
    """Runs a graph one node at a time over a list of batches, freeing values after last use.
    ``capture`` names nodes whose pre-epilogue output (conv/linear without residual and
    activation) is stored in ``captured`` when they run."""

    def __init__(self, graph: Graph, batches: list[list[np.ndarray]], run_node: NodeRunner):
        self.graph, self.run_node = graph, run_node
        self.env: list[dict[int, np.ndarray]] = [
            {id(v): a for v, a in zip(graph.inputs, batch)} for batch in batches
        ]
        self.wanted = {id(v) for v in graph.outputs}
        self.last_use: dict[int, int] = {}
        for i, node in enumerate(graph.nodes):
            for v in node.inputs:
                if v is not None:
                    self.last_use[id(v)] = i
        self.pos = 0
        self.capture: set[str] = set()
        self.with_residual = False
        self.captured: dict[str, list[np.ndarray]] = {}

    def args(self, node: Node, b: int) -> list:
        env = self.env[b]
        return [
            None if v is None else (v.data if v.is_constant else env[id(v)]) for v in node.inputs
        ]

    def step(self) -> None:
        i, node = self.pos, self.graph.nodes[self.pos]
        if node.name in self.capture:
            self.captured[node.name] = [
                _pre_epilogue(node, self.args(node, b), self.with_residual, self.run_node)
                for b in range(len(self.env))
            ]
        for b, env in enumerate(self.env):
            results = self.run_node(node, self.args(node, b))
            for value, array in zip(node.outputs, results):
                env[id(value)] = np.asarray(array)
            for v in node.inputs:
                if v is not None and self.last_use.get(id(v)) == i and id(v) not in self.wanted:
                    env.pop(id(v), None)
        self.pos += 1

    def refresh(self, node: Node) -> None:
        """Recompute the parameter chains feeding ``node`` (its inputs after the first that are
        computed from constants only, such as a dequantized weight), after a solver changed the
        constants they read."""
        chain: list[Node] = []

        def constant_only(value) -> bool:
            if value is None or value.is_constant:
                return True
            p = value.producer
            if p is None or not all(constant_only(v) for v in p.inputs):
                return False
            if p not in chain:
                chain.append(p)
            return True

        for value in node.inputs[1:]:
            constant_only(value)
        for b, env in enumerate(self.env):
            live = set(env)
            for p in chain:  # producers are appended after their own producers
                for value, array in zip(p.outputs, self.run_node(p, self.args(p, b))):
                    env[id(value)] = np.asarray(array)
            for p in chain:  # drop what had been freed already
                for value in p.outputs:
                    if id(value) not in live:
                        env.pop(id(value), None)

    def run_to(self, name: str, *, through: bool) -> Node:
        """Run up to node ``name`` (and it too with ``through``); returns the node."""
        if through and name in self.captured:  # already run (the graphs' orders may differ)
            return self.graph.node(name)
        while self.pos < len(self.graph.nodes):
            node = self.graph.nodes[self.pos]
            if node.name == name:
                if through:
                    self.step()
                return node
            self.step()
        raise InputError(f"node '{name}' not found after position {self.pos}")

    def finish(self) -> list[list[np.ndarray]]:
        while self.pos < len(self.graph.nodes):
            self.step()
        return [
            [v.data if v.is_constant else env[id(v)] for v in self.graph.outputs]
            for env in self.env
        ]


def _pre_epilogue(
    node: Node, args: list, with_residual: bool = False, run_node: NodeRunner | None = None
) -> np.ndarray:
    """conv(x, w) + b (or x @ w.T + b) of a conv2d/linear node, without the activation, and
    without the residual unless ``with_residual``; through ``run_node`` when given (it gets a
    detached copy of the node without the epilogue)."""
    attrs = dict(node.attrs, activation=None, activation_attrs={})
    args = [*args, None, None][:4]
    if not with_residual:
        args[3] = None
    if run_node is None:
        return get_op(node.op).run(args, attrs)[0]
    return run_node(Node(node.op, node.name, attrs), args)[0]


def _columns(node: Node, x: np.ndarray) -> np.ndarray:
    """The layer's input as rows of its least-squares problem: (rows, features), float64."""
    if node.op == "linear":
        return x.reshape(-1, x.shape[-1]).astype(np.float64)
    w = node.inputs[1]
    a = node.attrs
    cols = im2col(x, w.shape[2], w.shape[3], a["stride"], a["padding"], a["dilation"])
    n, c, k, oh, ow = cols.shape
    # one copy (transpose and cast together), not two: it is a third of the accumulation's time
    rows = np.ascontiguousarray(cols.transpose(0, 3, 4, 1, 2), dtype=np.float64)
    return rows.reshape(-1, c * k)


def _targets(node: Node, y: np.ndarray, kept: np.ndarray | None) -> np.ndarray:
    """Original pre-epilogue outputs as (rows, kept outputs), float64."""
    if node.op == "linear":
        y = y.reshape(-1, y.shape[-1])
        return (y if kept is None else y[:, kept]).astype(np.float64)
    if kept is not None:
        y = y[:, kept]
    return y.transpose(0, 2, 3, 1).reshape(-1, y.shape[1]).astype(np.float64)


def _batches(graph: Graph, inputs) -> list[list[np.ndarray]]:
    if inputs is None:
        raise InputError("reconstruction needs calibration inputs", hint="pass calibration data")
    arrays = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
    if len(arrays) != len(graph.inputs):
        raise InputError(
            f"graph '{graph.name}' takes {len(graph.inputs)} input(s), got {len(arrays)} "
            "calibration array(s)",
            hint="give one array of samples per graph input, in order",
        )
    arrays = [np.asarray(a) for a in arrays]
    batch = graph.inputs[0].shape[0]
    n = len(arrays[0])
    for v, a in zip(graph.inputs, arrays):
        if a.ndim != len(v.shape) or tuple(a.shape[1:]) != v.shape[1:] or len(a) != n:
            raise InputError(
                f"calibration input for '{v.name}' has shape {a.shape}, expected "
                f"(N, {', '.join(map(str, v.shape[1:]))}) with the same N for every input",
                hint="give samples stacked along axis 0, shaped like the graph's inputs",
            )
        if np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a)):
            raise InputError(
                f"calibration input for '{v.name}' contains NaN or inf",
                hint="clean or drop those samples",
            )
    if n < batch:
        raise InputError(
            f"reconstruction got {n} calibration samples, the graph's batch is {batch}",
            hint=f"give at least {batch} samples (whole batches are used)",
        )
    return [
        [a[s : s + batch].astype(v.dtype, copy=False) for v, a in zip(graph.inputs, arrays)]
        for s in range(0, n - batch + 1, batch)
    ]


@dataclass
class LayerProblem:
    """The accumulated least-squares problem of one layer: for each of its ``groups`` (1 unless a
    grouped conv), ``xtx[g] = X_g^T X_g`` over the ``features`` input columns of that group (plus
    a ones column last when the layer has a bias), ``xty[g] = X_g^T Y_g`` for the group's outputs
    and ``yty[o] = |Y_o|^2``. Parameters are ``(outputs, unknowns)`` matrices: row ``o`` holds
    output ``o``'s weights over its group's columns (then its bias)."""

    node: Node
    groups: int
    features: int
    bias: bool
    xtx: np.ndarray
    xty: np.ndarray
    yty: np.ndarray
    rows: int

    @property
    def unknowns(self) -> int:
        return self.features + self.bias

    @property
    def outputs(self) -> int:
        return len(self.yty)

    def per_group(self, m: np.ndarray) -> np.ndarray:
        """``m`` (outputs, unknowns) as (groups, outputs per group, unknowns)."""
        return m.reshape(self.groups, -1, m.shape[-1])

    def error(self, m: np.ndarray) -> float:
        """Relative output error ``|X M^T - Y| / |Y|`` of parameters ``m``, from the products."""
        mg = self.per_group(np.asarray(m, np.float64))
        cross = float(np.sum(mg * self.xty.transpose(0, 2, 1)))
        quad = float(np.sum((mg @ self.xtx) * mg))  # xtx is symmetric
        total = float(self.yty.sum())
        return float(math.sqrt(max(total - 2 * cross + quad, 0.0) / max(total, 1e-30)))

    def gradient(self, m: np.ndarray) -> np.ndarray:
        """d/dm of ``|X M^T - Y|^2`` (the unnormalised squared error), shaped like ``m``."""
        mg = self.per_group(np.asarray(m, np.float64))
        grad = 2 * (mg @ self.xtx - self.xty.transpose(0, 2, 1))  # batched BLAS
        return grad.reshape(m.shape)

    def ridge_solution(self, ridge: float) -> np.ndarray:
        """The ridge least-squares parameters (the bias column is not penalised)."""
        d = self.features
        sols = []
        for g in range(self.groups):
            a = self.xtx[g].copy()
            lam = ridge * max(float(np.mean(np.diag(a)[:d])), 1e-12)
            a[np.arange(d), np.arange(d)] += lam
            try:
                sols.append(np.linalg.solve(a, self.xty[g]).T)
            except np.linalg.LinAlgError:
                sols.append(np.linalg.lstsq(a, self.xty[g], rcond=None)[0].T)
        return np.concatenate(sols, axis=0)


class Solver:
    """What to do with a layer's least-squares problem. The engine collects the problem; a solver
    says which layers it can change (:meth:`skip`), and :meth:`solve` writes new parameters into
    the compressed graph, returning the parameter matrices before and after (``(outputs,
    unknowns)``, see :class:`LayerProblem`) or a string saying why it left the layer alone.
    Passes subclass it (learned rounding for quantized weights, codebook refits for shared ones);
    :class:`RidgeSolver` is the plain refit."""

    #: whether a layer with fewer rows than unknowns is an error (a plain solve is then
    #: underdetermined; a regularised search such as learned rounding is not)
    needs_rows = True

    def skip(self, node: Node) -> str | None:
        """Why ``node`` cannot be solved by this solver, or None."""
        w = node.inputs[1]
        if not w.is_constant or len(w.uses) != 1:
            return "weight is not a constant read by this layer only"
        b = node.inputs[2] if len(node.inputs) > 2 else None
        if b is not None and (not b.is_constant or len(b.uses) != 1):
            return "bias is not a constant read by this layer only"
        return None

    def solve(self, problem: LayerProblem) -> tuple[np.ndarray, np.ndarray] | str:
        raise NotImplementedError


@dataclass
class RidgeSolver(Solver):
    """Ridge least squares ``min |X W - Y|^2 + lam |W|^2``, ``lam = ridge * mean(diag(X^T X))``,
    written into the layer's constant weight and bias."""

    ridge: float = 1e-4

    def solve(self, problem: LayerProblem) -> tuple[np.ndarray, np.ndarray]:
        node = problem.node
        old = layer_parameters(node)
        new = problem.ridge_solution(self.ridge)
        set_layer_parameters(node, new)
        return old, new


def layer_parameters(node: Node) -> np.ndarray:
    """A conv2d/linear node's constant weight (and bias) as an ``(outputs, unknowns)`` matrix."""
    w = node.inputs[1]
    b = node.inputs[2] if len(node.inputs) > 2 else None
    m = w.data.reshape(w.shape[0], -1).astype(np.float64)
    if b is not None:
        m = np.concatenate([m, b.data.reshape(-1, 1).astype(np.float64)], axis=1)
    return m


def set_layer_parameters(node: Node, m: np.ndarray) -> None:
    """Write an ``(outputs, unknowns)`` matrix back into the node's constant weight and bias."""
    w = node.inputs[1]
    b = node.inputs[2] if len(node.inputs) > 2 else None
    d = int(np.prod(w.shape[1:]))
    w.data = np.ascontiguousarray(m[:, :d].reshape(w.shape)).astype(w.dtype)
    if b is not None:
        b.data = np.ascontiguousarray(m[:, d]).astype(b.dtype)


def _check_layer(original: Graph, compressed: Graph, name: str, kept) -> None:
    """Raise for layers that cannot correspond."""
    try:
        node, onode = compressed.node(name), original.node(name)
    except KeyError:
        raise OptionError(
            f"layer '{name}' to refit is not a node of both graphs",
            hint="name conv2d/linear nodes that the original and compressed graph share",
        ) from None
    if node.op not in REFIT_OPS or onode.op != node.op:
        raise OptionError(
            f"layer '{name}' is {node.op} (original: {onode.op}); only conv2d/linear are refit",
            node=name,
        )
    w, ow = node.inputs[1], onode.inputs[1]
    n_out = len(kept) if kept is not None else ow.shape[0]
    if w.shape[0] != n_out or w.shape[2:] != ow.shape[2:]:
        raise InputError(
            f"layer '{name}' has weight {w.shape}; the original {ow.shape} with {n_out} kept "
            "outputs does not match it",
            node=name,
            hint="kept output indices must index the original layer's outputs",
        )


def _groups(node: Node) -> int:
    return node.attrs.get("groups", 1) if node.op == "conv2d" else 1


def reconstruct(
    original: Graph,
    compressed: Graph,
    inputs,
    layers: Mapping[str, np.ndarray | None] | Sequence[str],
    *,
    ridge: float = 1e-4,
    solver: Solver | None = None,
    run_node: NodeRunner | None = None,
    skip_underdetermined: bool = False,
    measure: bool = True,
    compensate_residual: bool = False,
    max_features: int = 8192,
    progress: bool = False,
) -> Reconstruction:
    """Refit ``layers`` of ``compressed`` in place so they reproduce ``original``'s layer outputs.

    Args:
        original: the uncompressed graph (not changed).
        compressed: the compressed graph; its conv2d/linear nodes named in ``layers`` get new
            parameters from ``solver``.
        inputs: calibration samples, one array (N, ...) per graph input; whole batches of the
            graph's static batch size are used, no labels.
        layers: node names to refit, or name -> indices of the original layer's outputs that the
            compressed layer kept (None: all).
        ridge: the penalty of the default :class:`RidgeSolver`, relative to the mean diagonal of
            ``X^T X``.
        solver: what to do with each layer's accumulated problem (default: ridge least squares
            into the layer's constant weight and bias).
        run_node: ``(node, args) -> outputs`` for one node on one batch (op table by default).
        skip_underdetermined: skip (instead of raising) layers with fewer rows than unknowns.
        measure: also measure the output deviation before and after (one more forward pass).
        compensate_residual: for layers with a fused residual input, fit the original's
            ``conv + b + residual`` minus the compressed graph's residual instead of the
            original's ``conv + b``, so the layer also absorbs the error its residual input
            carries.
        max_features: layers whose group has more input columns than this are skipped (``X^T X``
            is features^2 float64 numbers: 8192 is 512 MiB).
        progress: show a tqdm progress bar over the layers.
    """
    from tqdm.auto import tqdm

    start = time.perf_counter()
    if ridge < 0 or not math.isfinite(ridge):
        raise OptionError(f"ridge {ridge} must be a finite number >= 0", hint="e.g. 1e-4")
    solver = solver or RidgeSolver(ridge)
    if not isinstance(layers, Mapping):
        layers = {name: None for name in layers}
    result = Reconstruction()
    todo = {}
    for name, kept in layers.items():
        kept = None if kept is None else np.asarray(kept, np.int64)
        _check_layer(original, compressed, name, kept)
        node = compressed.node(name)
        w = node.inputs[1]
        features = int(np.prod(w.shape[1:]))
        why = solver.skip(node)
        if why is None and features > max_features:
            why = f"{features} input columns exceed max_features={max_features}"
        if why is None:
            todo[name] = kept
        else:
            result.skipped[name] = why
    batches = _batches(compressed, inputs)
    _batches(original, inputs)  # same checks against the original's inputs
    result.samples = sum(len(b[0]) for b in batches)
    run_node = run_node or _default_run_node

    before = None
    if measure:
        before = _Stepper(compressed, batches, run_node).finish()
    orig = _Stepper(original, batches, run_node)
    comp = _Stepper(compressed, batches, run_node)
    orig.capture = set(todo)
    orig.with_residual = compensate_residual
    order = [n for n in compressed.nodes if n.name in todo]
    for node in tqdm(order, desc="reconstruct", disable=not progress, leave=False):
        onode = orig.run_to(node.name, through=True)
        comp.run_to(node.name, through=False)
        ys = orig.captured.pop(node.name)
        problem = _accumulate(node, onode, comp, ys, todo[node.name], compensate_residual)
        fit = _solve(problem, solver, ys, skip_underdetermined)
        comp.refresh(node)
        if isinstance(fit, str):
            result.skipped[node.name] = fit
        else:
            result.layers.append(fit)
    after = comp.finish()
    if measure:
        reference = orig.finish()
        result.deviation_before = max(deviation(r, o) for r, o in zip(reference, before))
        result.deviation_after = max(deviation(r, o) for r, o in zip(reference, after))
    result.seconds = time.perf_counter() - start
    return result


def _accumulate(node, onode, comp, ys, kept, compensate) -> LayerProblem:
    """Stream the calibration batches into the layer's ``X^T X``, ``X^T Y`` and ``|Y|^2``."""
    groups = _groups(node)
    w = node.inputs[1]
    bias = len(node.inputs) > 2 and node.inputs[2] is not None
    d = int(np.prod(w.shape[1:]))
    u = d + bias
    per_out = w.shape[0] // groups
    xtx = np.zeros((groups, u, u))
    xty = np.zeros((groups, u, per_out))
    yty = np.zeros(w.shape[0])
    rows = 0
    for bi, y in enumerate(ys):
        args = comp.args(node, bi)
        cols = _columns(node, args[0]).reshape(-1, groups, d)
        if bias:
            cols = np.concatenate([cols, np.ones((len(cols), groups, 1))], axis=2)
        t = _targets(onode, y, kept)
        residual = args[3] if compensate and len(args) > 3 else None
        if residual is not None:
            t -= _targets(node, residual, None)
        tg = t.reshape(len(t), groups, per_out)
        if groups == 1:
            xtx[0] += cols[:, 0].T @ cols[:, 0]
            xty[0] += cols[:, 0].T @ tg[:, 0]
        else:
            xtx += np.einsum("rgi,rgj->gij", cols, cols)
            xty += np.einsum("rgi,rgj->gij", cols, tg)
        yty += np.einsum("ij,ij->j", t, t)
        rows += len(cols)
    if not (np.all(np.isfinite(xtx)) and np.all(np.isfinite(xty))):
        raise InputError(
            f"layer '{node.name}' sees NaN or inf activations on the calibration data",
            node=node.name,
            hint="check the calibration inputs' range and the model's numerics",
        )
    return LayerProblem(node, groups, d, bias, xtx, xty, yty, rows)


def _solve(problem: LayerProblem, solver: Solver, ys, skip_underdetermined) -> LayerFit | str:
    node, rows, unknowns = problem.node, problem.rows, problem.unknowns
    if solver.needs_rows and rows < unknowns:
        per_sample = max(1, rows // max(1, sum(len(y) for y in ys)))
        batch = max(1, len(ys[0]))
        need = math.ceil(math.ceil(unknowns / per_sample) / batch) * batch
        msg = (
            f"layer '{node.name}' has {unknowns} unknowns per output but the calibration data "
            f"gives only {rows} rows ({per_sample} per sample)"
        )
        if skip_underdetermined:
            return f"{msg}; needs at least {need} samples"
        raise InputError(
            msg, node=node.name, hint=f"give at least {need} calibration samples (whole batches)"
        )
    solved = solver.solve(problem)
    if isinstance(solved, str):
        return solved
    old, new = solved
    return LayerFit(node.name, rows, unknowns, problem.error(old), problem.error(new))
