"""Low-rank factorization of conv2d and linear layers into chains of ordinary conv2d/linear nodes:
the ``factorize-rank`` pass, with rank selection by fixed rank, per-layer MAC ratio, energy, EVBMF
or a global budget; with calibration data, data-aware (factors and errors whitened by the layers'
input statistics) and refit by least squares to the original's outputs."""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from compiler.analysis.allocate import BudgetError
from compiler.errors import OptionError, PassError
from compiler.ir.graph import Graph, Node
from compiler.pass_manager import Pass, pass_context, progress_bar, register_pass
from compiler.report import graph_stats
from passes.factorization import ranks as rs
from passes.factorization.calibration import (
    Chain,
    checked_inputs,
    refit_chains,
    second_moments,
)

FORMS = ("auto", "channel", "spatial", "tucker2")
MAX_TUCKER_LEVELS = 64  # rank levels per mode searched for Tucker-2 (64 x 64 pairs at most)
EPILOGUE = ("activation", "activation_attrs")


@register_pass
@dataclass
class FactorizeRank(Pass):
    """Replace conv2d/linear layers by low-rank chains of conv2d/linear nodes (lossy).

    ``linear(x, $w[O,I], $b) -> linear(linear(x, $b_r[r,I]), $a_r[O,r], $b)`` (truncated SVD);
    a k x k conv becomes one of three forms: ``channel`` ``conv1x1(conv_kxk(x) -> r) -> O``,
    ``spatial`` ``conv_1xk(conv_kx1(x) -> r) -> O`` (AIMET-style; stride, padding and dilation
    split by axis) or ``tucker2`` ``conv1x1(conv_kxk(conv1x1(x) -> r_in) -> r_out) -> O`` (HOSVD).
    ``form="auto"`` picks per layer the form with the least error at the same cost. The bias,
    residual input and activation of a fused epilogue move to the last factor; every factor keeps
    the layer's ``meta["source"]``. Grouped convs use the channel form per group (same rank in
    each); depthwise convs are left alone. A layer is factorized only where its MACs go down.

    Give exactly one of: ``rank`` (the same rank everywhere), ``ratio`` (each layer keeps at most
    this share of its MACs, least error within it), ``energy`` (each layer keeps at least this
    share of its squared singular values, at the least cost), ``evbmf=True`` (EVBMF per unfolding)
    or ``target`` (the fraction of the whole graph's MACs or params to keep, allocated across
    layers for the least summed discarded energy by compiler/analysis/allocate.py).

    With ``calibration_data`` (no labels) the pass is data-aware: every form's factors and errors
    are whitened by the layer's input second moment ``E[x x^T] = L L^T`` (channel: SVD of ``W L``,
    ``W ~= (U_r S_r)(V_r^T L^-1)``; spatial and Tucker-2: see passes/factorization/ranks.py), so
    the errors that pick ranks and forms are output errors. Then (``reconstruct``, on by default
    with data) the last factor of every chain (every factor with ``reconstruct_factors="all"``)
    is refit by least squares, in graph order on the factorized graph's own activations, so the
    chain reproduces the original layer's output and absorbs the errors made upstream
    (compiler/analysis/reconstruct.py). The factorized graph is built beside the original and
    committed only once the refit succeeded: bad calibration data leaves the graph untouched.

    Attributes:
        rank, ratio, energy, evbmf, target: the rank selection (exactly one).
        target_metric: what ``target`` counts, "macs" or "params".
        form: "auto", "channel", "spatial" or "tucker2" (convs; linears always use the SVD).
        round_to: ranks are multiples of this (or a layer's full rank), except a given ``rank``.
        min_rank: no factor narrower than this.
        ignore: module-path patterns (fnmatch) of layers to leave alone.
        require_saving: factorize only where MACs drop (False forces it, e.g. to test full rank).
        calibration_data: inputs (an array, or one array per graph input, samples along axis
            0; at least one batch of the graph's batch size) for the data-aware factors.
        calibration_samples: input rows (conv patches) per layer used for the second moment.
        damping: relative ridge added to the second moment before its Cholesky factor.
        seed: seeds the choice of calibration rows (conv patches) per layer.
        reconstruct: refit the factors by least squares on ``calibration_data``. None (default):
            on when calibration data is given, factors with fewer rows than unknowns skipped
            with a note; True: required (an error without data or with too few samples);
            False: off.
        reconstruct_factors: "last" refits each chain's last factor to the original layer's
            output; "all" also refits the inner factors, each to the leading outputs of its
            full-rank counterpart (lower deviation, about 1.4x the refit time).
        reconstruct_ridge: the refit's ridge penalty, relative to the mean of diag(X^T X).
        reconstruct_residual: a last factor with a fused residual add also absorbs the error
            carried by its residual input.
        progress: show a progress bar while reconstructing.
    """

    name = "factorize-rank"
    exact = False
    rank: int | None = None
    ratio: float | None = None
    energy: float | None = None
    evbmf: bool = False
    target: float | None = None
    target_metric: str = "macs"
    form: str = "auto"
    round_to: int = 1
    min_rank: int = 1
    ignore: tuple[str, ...] = ()
    require_saving: bool = True
    calibration_data: Any = field(default=None, repr=False)
    calibration_samples: int = 16384
    damping: float = 1e-3
    seed: int = 0
    reconstruct: bool | None = None
    reconstruct_factors: str = "last"
    reconstruct_ridge: float = 1e-4
    reconstruct_residual: bool = True
    progress: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        given = [n for n in ("rank", "ratio", "energy", "target") if getattr(self, n) is not None]
        given += ["evbmf"] if self.evbmf else []
        if len(given) != 1:
            raise OptionError(
                f"factorize-rank needs exactly one of rank=, ratio=, energy=, evbmf=True, target= "
                f"(got {', '.join(given) or 'none'})",
                hint="e.g. factorize-rank(energy=0.95) or factorize-rank(target=0.5)",
            )
        if self.rank is not None and (int(self.rank) != self.rank or self.rank < 1):
            raise OptionError(f"rank {self.rank} is not a positive integer")
        if self.ratio is not None and not 0 < self.ratio < 1:
            raise OptionError(
                f"ratio {self.ratio} is outside (0, 1)",
                hint="ratio is the share of each layer's MACs to keep, e.g. 0.5",
            )
        if self.energy is not None and not 0 < self.energy <= 1:
            raise OptionError(
                f"energy {self.energy} is outside (0, 1]",
                hint="energy is the share of squared singular values to keep, e.g. 0.95",
            )
        if self.target is not None and not 0 < self.target <= 1:
            raise OptionError(
                f"target {self.target} is outside (0, 1]",
                hint="target is the fraction of MACs/params to keep, e.g. 0.5",
            )
        if self.target_metric not in ("macs", "params"):
            raise OptionError(f"target_metric {self.target_metric!r} is not 'macs' or 'params'")
        if self.form not in FORMS:
            raise OptionError(f"form {self.form!r} is unknown", hint=f"use one of {FORMS}")
        if self.round_to < 1 or self.min_rank < 1:
            raise OptionError("round_to and min_rank must be at least 1")
        if self.reconstruct_factors not in ("last", "all"):
            raise OptionError(
                f"reconstruct_factors {self.reconstruct_factors!r} is not 'last' or 'all'"
            )

    # -- the pass ---------------------------------------------------------------------------------
    def run(self, graph: Graph) -> bool:
        if self.reconstruct and self.calibration_data is None:
            raise OptionError(
                "reconstruct=True needs calibration data",
                hint="pass calibration_data=<example inputs> (no labels needed) to the pass or "
                "to compile(), or reconstruct=False",
            )
        data = None
        if self.calibration_data is not None:  # checked before anything changes
            data = checked_inputs(graph, self.calibration_data)
        nodes = self._eligible(graph)
        moments = {}
        if data is not None:
            moments = second_moments(graph, nodes, data, self.calibration_samples, self.seed)
        rebuild = data is not None and self.reconstruct is not False
        # with a refit, the factorized graph is built beside the original and committed only
        # when the refit succeeded, so a failure leaves the graph untouched
        work = graph.clone() if rebuild else graph
        reference = graph.clone() if rebuild else None
        by_name = [{n.name: n for n in g.nodes} for g in (work, reference) if g is not None]
        done: dict[str, str] = {}
        chains: list[Chain] = []

        def rewrite(layer: Layer, choice: rs.Choice | None) -> None:
            if choice is None:
                return
            name = layer.node.name
            new = layer.rewrite(work, choice, by_name[0][name])
            done[name] = _label(choice)
            if reference is not None:
                full = rs.Choice(choice.form, layer.full_ranks(choice.form), 0, 0, 0.0)
                names = [n.name for n in new]
                layer.rewrite(reference, full, by_name[1][name], names)
                chains.append(Chain(names, layer.kept_outputs(choice)))

        if self.target is not None:  # a global choice: every layer's candidates first
            layers = [
                Layer.analyse(n, self, moments.get(n.name))
                for n in progress_bar(nodes, "factorize-rank: layers")
            ]
            for layer, choice in zip(layers, self._allocate(graph, layers)):
                rewrite(layer, choice)
        else:  # one layer at a time, so only one layer's SVDs are held (large zoo models)
            for n in progress_bar(nodes, "factorize-rank: layers"):
                layer = Layer.analyse(n, self, moments.get(n.name))
                rewrite(layer, self._select(layer))
        info: dict[str, Any] = {"layers": done, "considered": len(nodes)}
        if chains:
            info["reconstruction"] = self._refit(reference, work, data, chains)
            _commit(graph, work, done, chains)
        graph.meta["factorization"] = info
        if not done:  # "(no change)" after a long analysis needs its reason
            why = (
                f"factorize-rank changed nothing: none of the {len(nodes)} eligible conv2d/linear "
                "layers has a factorization that meets the rank setting and costs fewer MACs"
            )
            if self.require_saving:
                why += " (require_saving=False factorizes anyway)"
            graph.meta["notes"] = [*graph.meta.get("notes", ()), why]
        return bool(done)

    def _refit(self, reference: Graph, work: Graph, data, chains: list[Chain]) -> dict:
        result = refit_chains(
            reference,
            work,
            data,
            chains,
            factors=self.reconstruct_factors,
            ridge=self.reconstruct_ridge,
            compensate_residual=self.reconstruct_residual,
            skip_underdetermined=self.reconstruct is None,
            progress=self.progress or pass_context().progress,
        )
        note = result.note(
            f"factorize-rank: refit {len(result.layers)} factor(s) of {len(chains)} layer(s) by "
            "least squares"
        )
        work.meta["notes"] = [*work.meta.get("notes", ()), note]
        summary = result.summary()
        return {"factors": summary.pop("layers"), **summary}

    def _eligible(self, graph: Graph) -> list[Node]:
        out, matched = [], set()
        for node in graph.nodes:
            if node.op not in ("conv2d", "linear") or not node.inputs[1].is_constant:
                continue
            if not np.issubdtype(np.dtype(node.inputs[1].dtype), np.floating):
                continue
            hit = [p for p in self.ignore if fnmatch.fnmatch(node.source or node.name, p)]
            matched.update(hit)
            if hit:
                continue
            w = node.inputs[1]
            if node.op == "conv2d" and w.shape[1] == 1 and node.attrs["groups"] > 1:
                continue  # depthwise: nothing to factor across channels
            if node.op == "linear" and len(w.shape) != 2:
                continue
            out.append(node)
        unmatched = [p for p in self.ignore if p not in matched]
        if unmatched:
            known = sorted({n.source or n.name for n in out})[:8]
            raise OptionError(
                f"ignore pattern(s) {unmatched} match no conv2d/linear layer",
                hint=f"patterns match module paths such as {known}",
            )
        return out

    # -- rank selection ---------------------------------------------------------------------------
    def _select(self, layer: Layer) -> rs.Choice | None:
        kept = layer.macs
        choices = layer.choices
        if self.energy is not None:
            ok = [c for c in choices if c.error <= 1 - self.energy + 1e-12]
            best = min(ok, key=lambda c: (c.macs, c.error), default=None)
        else:
            if self.ratio is not None:
                budget = self.ratio * kept
            else:
                primary = layer.primary(self)
                if self.form != "auto" or primary is None:
                    best = primary
                    return best if best is None or self._saves(best, kept) else None
                budget = primary.macs
            ok = [c for c in choices if c.macs <= budget]
            best = min(ok, key=lambda c: (c.error, c.macs), default=None)
        return best if best is not None and self._saves(best, kept) else None

    def _saves(self, choice: rs.Choice, kept: int) -> bool:
        return choice.macs < kept or not self.require_saving

    def _allocate(self, graph: Graph, layers: list[Layer]) -> list[rs.Choice | None]:
        metric = self.target_metric
        stats = graph_stats(graph)
        total = stats.macs if metric == "macs" else stats.params
        kept = [layer.macs if metric == "macs" else layer.params for layer in layers]
        fixed = total - sum(kept)
        try:
            return rs.allocate(
                [lay.choices for lay in layers], kept, fixed, self.target * total, metric
            )[0]
        except BudgetError as e:  # say it in the pass's terms: the target and the layers
            least = fixed + e.least
            raise OptionError(
                f"target {self.target:g} of {metric} is unreachable: factorizing every layer to "
                f"its smallest rank keeps {least / total:.3f} (layers never factorized hold "
                f"{fixed / total:.3f})",
                hint=f"use target >= {math.ceil(least / total * 1000) / 1000:g}, or lower "
                "min_rank/round_to, or drop ignore patterns",
            ) from None


def _label(choice: rs.Choice) -> str:
    return f"{choice.form} {'x'.join(map(str, choice.ranks))}"


def _commit(graph: Graph, work: Graph, done: dict[str, str], chains: list[Chain]) -> None:
    """Replace ``graph``'s factorized layers by ``work``'s (refit) factor chains, same names."""
    nodes = {n.name: n for n in graph.nodes}
    factors = {n.name: n for n in work.nodes}
    for (name, label), chain in zip(done.items(), chains):
        parts = [factors[f] for f in chain.names]
        kernels = [
            (f.inputs[1].data, {k: v for k, v in f.attrs.items() if k not in EPILOGUE})
            for f in parts
        ]
        new = replace_by_chain(graph, nodes[name], kernels, label, chain.names)
        bias, refit = new[-1].inputs[2:3], parts[-1].inputs[2:3]
        if bias and bias[0] is not None and refit[0].data is not bias[0].data:
            bias[0].data = refit[0].data  # the bias moved to the last factor and was refit
    graph.meta["notes"] = list(work.meta.get("notes", ()))


def replace_by_chain(
    graph: Graph,
    node: Node,
    kernels: list[tuple[np.ndarray, dict]],
    label: str,
    names: list[str] | None = None,
) -> list[Node]:
    """Replace ``node`` by a chain of nodes of its op with these (weight, attributes), input side
    first; the last takes the node's bias, residual and epilogue, every one its source. ``names``
    are the nodes' names (``<node>_f1``, ``_f2``... by default)."""
    w = node.inputs[1]
    epilogue = {k: node.attrs[k] for k in EPILOGUE if k in node.attrs}
    base_meta = {k: node.meta[k] for k in ("source", "stack") if k in node.meta}
    base_meta["factorized"] = label
    y = node.inputs[0]
    chain = []
    for k, (array, attrs) in enumerate(kernels, start=1):
        last = k == len(kernels)
        name = names[k - 1] if names else f"{node.name}_f{k}"
        weight = graph.constant(array.astype(w.dtype), f"{w.name}_f{k}")
        new = graph.add_node(
            node.op,
            [y, weight, *(node.inputs[2:] if last else [])],
            {**attrs, **(epilogue if last else {})},
            name=name,
            before=node,
            meta={**node.meta, **base_meta} if last else dict(base_meta),
        )
        if new.name != name:  # both graphs come from one clone: their free names agree
            raise PassError(f"factor node '{name}' is named '{new.name}' in graph '{graph.name}'")
        chain.append(new)
        y = new.outputs[0]
    graph.replace_node(node, [y])
    return chain


def _allowed_ranks(full: int, min_rank: int, round_to: int, limit: int | None = None) -> np.ndarray:
    """Ranks 1..full that are multiples of ``round_to`` (and ``full`` itself), at most ``limit``
    of them, evenly spread."""
    ranks = sorted({r for r in range(max(1, min_rank), full + 1) if r % round_to == 0} | {full})
    if limit is not None and len(ranks) > limit:
        ranks = sorted({ranks[int(i)] for i in np.linspace(0, len(ranks) - 1, limit)})
    return np.array(ranks, dtype=np.int64)


def _round_up(r: int, full: int, opts: FactorizeRank) -> int:
    r = max(r, opts.min_rank, 1)
    return min(full, math.ceil(r / opts.round_to) * opts.round_to)


class Layer:
    """One conv2d/linear: its unfoldings, costs and candidate factorizations. With ``moments``
    (the second moment of its input rows, one per group) every form is data-aware."""

    def __init__(self, node: Node, moments: list[np.ndarray] | None, damping: float) -> None:
        self.node = node
        w = node.inputs[1]
        self.w = w.data.astype(np.float64)
        self.params = w.numel
        self.macs = int(np.prod(node.outputs[0].shape)) * int(np.prod(w.shape[1:]))
        self.groups = node.attrs.get("groups", 1) if node.op == "conv2d" else 1
        self.moments, self.damping = moments, damping
        self.whiten = (
            None if moments is None else [rs.whitening_factor(m, damping) for m in moments]
        )
        self.svds: dict[str, Any] = {}
        self.choices: list[rs.Choice] = []

    @classmethod
    def analyse(cls, node: Node, opts: FactorizeRank, moments) -> Layer:
        layer = cls(node, moments, opts.damping)
        for form in layer.forms(opts.form):
            layer.choices += layer.choices_of(form, opts.min_rank, opts.round_to)
        return layer

    def choices_of(self, form: str, min_rank: int, round_to: int, only=None) -> list[rs.Choice]:
        """The candidates of one form at the allowed ranks (or exactly the ranks ``only``)."""
        full = self.full_ranks(form)
        if only is not None:
            lists = [np.array([r], dtype=np.int64) for r in only]
        else:
            limit = MAX_TUCKER_LEVELS if form == "tucker2" else None
            lists = [_allowed_ranks(f, min_rank, round_to, limit) for f in full]
        return getattr(self, f"_{form}_choices")(*lists)

    def full_ranks(self, form: str) -> tuple[int, ...]:
        if form == "channel":
            return (max(s.full_rank for s in self._channel_svds()),)
        if form == "spatial":
            return (self._spatial_svd().full_rank,)
        tucker = self._tucker()
        return (tucker.u_out.shape[1], tucker.first.shape[0])

    def forms(self, form: str) -> list[str]:
        if self.node.op == "linear":
            return ["channel"]
        kh, kw = self.w.shape[2:]
        possible = ["channel"]
        if self.groups == 1:
            possible += ["tucker2"] + (["spatial"] if kh > 1 and kw > 1 else [])
        return possible if form == "auto" else [f for f in possible if f == form]

    def kept_outputs(self, choice: rs.Choice) -> list[np.ndarray | None]:
        """Per factor, which outputs of the full-rank chain (same form) it computes: the factors
        at a lower rank are leading slices of the full-rank ones (per group, grouped)."""
        full = self.full_ranks(choice.form)
        if choice.form == "tucker2":
            return [np.arange(choice.ranks[1]), np.arange(choice.ranks[0]), None]
        r, g = choice.ranks[0], self.groups
        return [(np.arange(g)[:, None] * full[0] + np.arange(r)).ravel(), None]

    def _moment_factors(self) -> tuple[np.ndarray, np.ndarray]:
        """Whitening factors of the ``kh x 1`` column patches and of one pixel's channels."""
        if "blocks" not in self.svds:
            blocks = rs.moment_blocks(self.moments[0], self.w.shape)
            self.svds["blocks"] = tuple(rs.whitening_factor(m, self.damping) for m in blocks)
        return self.svds["blocks"]

    # per-form candidates: cost formulas follow the factor chain's shapes
    def _geometry(self):
        n, c, h, wd = self.node.inputs[0].shape
        _, o, ho, wo = self.node.outputs[0].shape
        return n, c, h, wd, o, ho, wo

    def _channel_svds(self) -> list[rs.Svd]:
        if "channel" not in self.svds:
            linear = self.node.op == "linear"
            mats = [self.w] if linear else rs.channel_matrices(self.w, self.groups)
            whiten = self.whiten or [None] * len(mats)
            self.svds["channel"] = [rs.Svd.of(m, lw) for m, lw in zip(mats, whiten)]
        return self.svds["channel"]

    def _channel_cost(self, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.node.op == "linear":
            o, i = self.w.shape
            rows = int(np.prod(self.node.inputs[0].shape[:-1]))
            params = r * (i + o)
            return rows * params, params
        n, _, _, _, o, ho, wo = self._geometry()
        inner = int(np.prod(self.w.shape[1:]))  # cg * kh * kw
        params = self.groups * r * inner + o * r
        return n * ho * wo * params, params

    def _spatial_svd(self) -> rs.Svd:
        if "spatial" not in self.svds:
            left = None if self.whiten is None else self._moment_factors()[0]
            self.svds["spatial"] = rs.Svd.of(rs.spatial_matrix(self.w), left=left)
        return self.svds["spatial"]

    def _tucker(self) -> rs.Tucker2:
        if "tucker2" not in self.svds:
            if self.whiten is None:
                self.svds["tucker2"] = rs.Tucker2.of(self.w)
            else:
                pixels = self._moment_factors()[1]
                self.svds["tucker2"] = rs.Tucker2.of(self.w, self.whiten[0], pixels)
        return self.svds["tucker2"]

    def _channel_choices(self, ranks: np.ndarray) -> list[rs.Choice]:
        errors = rs.relative_error_curve(*(s.s for s in self._channel_svds()))
        macs, params = self._channel_cost(ranks)
        return [
            rs.Choice("channel", (int(r),), int(m), int(p), float(errors[r - 1]))
            for r, m, p in zip(ranks, macs, params)
        ]

    def _spatial_choices(self, ranks: np.ndarray) -> list[rs.Choice]:
        svd = self._spatial_svd()
        if self.whiten is None:
            errors = rs.relative_error_curve(svd.s)
        else:
            errors = rs.spatial_error_curve(svd, self.w, self.whiten[0])
        n, c, _, wd, o, ho, wo = self._geometry()
        kh, kw = self.w.shape[2:]
        params = ranks * c * kh + o * ranks * kw
        macs = n * ho * wd * ranks * c * kh + n * ho * wo * o * ranks * kw
        return [
            rs.Choice("spatial", (int(r),), int(m), int(p), float(errors[r - 1]))
            for r, m, p in zip(ranks, macs, params)
        ]

    def _tucker2_choices(self, r_out: np.ndarray, r_in: np.ndarray) -> list[rs.Choice]:
        grid = self._tucker().error_grid()
        a, b = np.meshgrid(r_out, r_in, indexing="ij")
        n, c, h, wd, o, ho, wo = self._geometry()
        k = int(np.prod(self.w.shape[2:]))
        params = b * c + a * b * k + o * a
        macs = n * h * wd * b * c + n * ho * wo * (a * b * k + o * a)
        errors = grid[a - 1, b - 1]
        return [
            rs.Choice("tucker2", (int(x), int(y)), int(m), int(p), float(e))
            for x, y, m, p, e in zip(a.flat, b.flat, macs.flat, params.flat, errors.flat)
        ]

    def primary(self, opts: FactorizeRank) -> rs.Choice | None:
        """The choice a fixed ``rank`` or EVBMF names in the layer's main form (channel under
        ``auto``); None when that form does not apply."""
        form = "channel" if opts.form == "auto" or self.node.op == "linear" else opts.form
        if form not in self.forms(opts.form):
            return None
        full = self.full_ranks(form)
        if opts.rank is not None:
            ranks = (opts.rank,) * len(full)
        else:
            ranks = tuple(_round_up(r, f, opts) for r, f in zip(self.evbmf_ranks(form), full))
        for r, f in zip(ranks, full):
            if r > f:
                raise OptionError(
                    f"rank {r} is larger than possible for this layer's {form} form (at most {f})",
                    node=self.node.name,
                    op=self.node.op,
                    source=self.node.source,
                    hint=f"use rank <= {f}, ratio=/energy= for per-layer ranks, or ignore=",
                )
        return self.choices_of(form, 1, 1, only=ranks)[0]

    def evbmf_ranks(self, form: str) -> tuple[int, ...]:
        """EVBMF's rank per unfolding: the (whitened) channel matrices (the largest over groups),
        the (whitened) spatial matrix, or Tucker-2's two (whitened) channel modes."""
        if form == "channel":
            return (max(rs.evbmf(s.whitened())[0] for s in self._channel_svds()),)
        if form == "spatial":
            return (rs.evbmf(self._spatial_svd().whitened())[0],)
        o, i = self.w.shape[:2]
        flat, mode1 = self.w.reshape(o, -1), self.w.transpose(1, 0, 2, 3).reshape(i, -1)
        if self.whiten is not None:
            flat, mode1 = flat @ self.whiten[0], self._moment_factors()[1].T @ mode1
        return (rs.evbmf(flat)[0], rs.evbmf(mode1)[0])

    # -- the rewrite ------------------------------------------------------------------------------
    def factor_kernels(self, choice: rs.Choice) -> list[tuple[np.ndarray, dict]]:
        """The factor chain as (weight, conv attributes) pairs, input side first."""
        a = self.node.attrs
        if choice.form == "channel":
            r = choice.ranks[0]
            pairs = [s.factors(r) for s in self._channel_svds()]
            first = np.concatenate([b for _, b in pairs])  # (g*r, cg*kh*kw)
            last = np.concatenate([u for u, _ in pairs])  # (O, r)
            if self.node.op == "linear":
                return [(first, {}), (last, {})]
            first = first.reshape(len(first), *self.w.shape[1:])
            spatial = {k: a[k] for k in ("stride", "padding", "dilation")}
            return [
                (first, {**spatial, "groups": self.groups}),
                (last[:, :, None, None], {"groups": self.groups}),
            ]
        if choice.form == "spatial":
            vertical, horizontal = rs.spatial_kernels(
                self._spatial_svd(), choice.ranks[0], self.w.shape
            )
            return [
                (
                    vertical,
                    {
                        "stride": (a["stride"][0], 1),
                        "padding": (a["padding"][0], 0),
                        "dilation": (a["dilation"][0], 1),
                    },
                ),
                (
                    horizontal,
                    {
                        "stride": (1, a["stride"][1]),
                        "padding": (0, a["padding"][1]),
                        "dilation": (1, a["dilation"][1]),
                    },
                ),
            ]
        first, core, last = self._tucker().kernels(*choice.ranks)
        spatial = {k: a[k] for k in ("stride", "padding", "dilation")}
        return [(first, {}), (core, spatial), (last, {})]

    def rewrite(
        self, graph: Graph, choice: rs.Choice, node: Node | None = None, names=None
    ) -> list[Node]:
        """Replace the layer (or ``node``, its counterpart in a copy of the graph) by the chain
        of ``choice``; returns the factor nodes."""
        node = node or self.node
        return replace_by_chain(graph, node, self.factor_kernels(choice), _label(choice), names)
