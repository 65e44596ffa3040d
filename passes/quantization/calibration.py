"""Calibration for quantization: run the reference interpreter on calibration data, record each
observed tensor's exact range and a random sample of its values, and turn those into a clipping
range with one of four calibrators.

- ``minmax``: the observed range.
- ``percentile``: the ``percentile``-th and ``100 - percentile``-th percentiles.
- ``mse``: the range ``(a * lo, a * hi)``, ``a`` in [0.001, 1] (a geometric grid), whose uint8
  quantization has the
  least mean squared error on the sample.
- ``entropy``: TensorRT's KL calibration: the clipping threshold whose 255-level histogram is
  closest (Kullback-Leibler) to the 2048-bin reference histogram.

Calibration batches are run on a copy of the graph with a larger batch where that is safe (the
interpreter is much faster per image on big batches): reshape/expand attributes that name the
traced batch follow it, and the copy is checked against the original on the first batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from compiler.errors import OptionError, SlimgraphError
from compiler.ir.graph import Graph, Value
from compiler.ir.interpreter import run
from compiler.pass_manager import progress_bar

CALIBRATORS = ("minmax", "percentile", "mse", "entropy")


@dataclass
class TensorStats:
    """What calibration keeps of one tensor: its exact range and a random sample of values."""

    lo: float
    hi: float
    sample: np.ndarray
    mean: np.ndarray | None = None  # mean over the batch axis, when asked for


# -- running calibration data ------------------------------------------------------------------


def rebatched(graph: Graph, batch: int) -> Graph | None:
    """A copy of ``graph`` whose inputs have leading dimension ``batch``, or None when the graph
    does not follow a new batch (a shape attribute that cannot be adjusted, a verify failure)."""
    traced = graph.inputs[0].shape[0] if graph.inputs and graph.inputs[0].shape else None
    if traced is None or any(not v.shape or v.shape[0] != traced for v in graph.inputs):
        return None
    copy = graph.clone()
    for value in copy.inputs:
        value.shape = (batch, *value.shape[1:])
    for node in copy.nodes:
        if node.op in ("reshape", "expand"):
            shape = tuple(node.attrs["shape"])
            if shape and shape[0] == traced:
                node.attrs["shape"] = (batch, *shape[1:])
    try:
        copy.reinfer_all()
        copy.verify()
    except (SlimgraphError, ValueError, TypeError):
        return None
    # a reshape whose leading dim is not the batch (Swin's windows: batch * windows) cannot follow
    if any(n.op == "reshape" and n.inputs[0].numel != n.outputs[0].numel for n in copy.nodes):
        return None
    if any(v.shape[:1] != (batch,) for v in copy.outputs):
        return None
    return copy


def batches(data: Sequence[np.ndarray], size: int):
    """Consecutive row blocks of at most ``size`` rows of every input array."""
    n = len(data[0])
    for start in range(0, n, size):
        yield [a[start : start + size] for a in data]


def run_calibration(
    graph: Graph,
    data: Sequence[np.ndarray],
    values: Sequence[Value],
    *,
    batch_size: int = 64,
    max_samples: int = 1 << 16,
    seed: int = 0,
    means: Sequence[Value] = (),
) -> dict[str, TensorStats]:
    """Stats of ``values`` (by name) over the calibration ``data`` (one array per graph input,
    N rows each, N a multiple of the graph's batch); for ``means`` (a subset) also the mean over
    the samples of each element (one sample's shape)."""
    traced = graph.inputs[0].shape[0]
    n = len(data[0])
    if n % traced:
        raise OptionError(
            f"{n} calibration rows do not fill whole batches of the graph's batch {traced}",
            hint=f"give a multiple of {traced} samples",
        )
    rows = max(traced, batch_size // traced * traced)
    copies: dict[int, tuple[Graph, list[Value]]] = {}
    checked = False

    def graph_for(size: int) -> tuple[Graph, list[Value]]:
        if size not in copies:
            g = rebatched(graph, size) if size != traced else None
            if g is None:
                copies[size] = (graph, list(values))
            else:
                by_name = {v.name: v for v in g.values()}
                copies[size] = (g, [by_name[v.name] for v in values])
        return copies[size]

    chunks = list(batches(data, rows))
    per_chunk = max(1, math.ceil(max_samples / len(chunks)))
    rng = np.random.default_rng(seed)
    lo = {v.name: math.inf for v in values}
    hi = {v.name: -math.inf for v in values}
    samples: dict[str, list[np.ndarray]] = {v.name: [] for v in values}
    sums = {v.name: 0.0 for v in means}
    for chunk in progress_bar(chunks, "calibrate"):
        g, kept = graph_for(len(chunk[0]))
        if g is graph and len(chunk[0]) != traced:
            arrays = _run_per_batch(graph, chunk, values, traced)
        else:
            try:
                arrays = run(g, chunk, keep=kept)[len(g.outputs) :]
            except SlimgraphError:
                if g is graph:
                    raise
                copies[len(chunk[0])] = (graph, list(values))  # the copy cannot follow: per batch
                arrays = _run_per_batch(graph, chunk, values, traced)
                g = graph
            if not checked and g is not graph:
                _check_rebatched(graph, chunk, values, arrays, traced)
        checked = True
        for v, a in zip(values, arrays, strict=True):
            flat = np.asarray(a, np.float32).reshape(-1)
            lo[v.name] = min(lo[v.name], float(flat.min()))
            hi[v.name] = max(hi[v.name], float(flat.max()))
            take = flat if flat.size <= per_chunk else rng.choice(flat, per_chunk, replace=False)
            samples[v.name].append(take)
            if v.name in sums:
                sums[v.name] = sums[v.name] + np.asarray(a, np.float64).sum(axis=0) / traced
    count = n // traced
    return {
        v.name: TensorStats(
            lo[v.name],
            hi[v.name],
            np.concatenate(samples[v.name]),
            sums[v.name] / count if v.name in sums else None,
        )
        for v in values
    }


def _run_per_batch(graph, chunk, values, traced) -> list[np.ndarray]:
    parts = [run(graph, b, keep=values)[len(graph.outputs) :] for b in batches(chunk, traced)]
    return [np.concatenate(p) for p in zip(*parts, strict=True)]


def _check_rebatched(graph, chunk, values, arrays, traced) -> None:
    """The large-batch copy must give the original's values on the first batch's rows."""
    first = [a[:traced] for a in chunk]
    want = run(graph, first, keep=values)[len(graph.outputs) :]
    for v, a, w in zip(values, arrays, want, strict=True):
        got = np.asarray(a)[:traced]
        if got.shape != w.shape or not np.allclose(got, w, rtol=1e-4, atol=1e-5):
            raise SlimgraphError(
                f"calibration on a re-batched copy of the graph disagrees at '{v.name}'",
                hint="report this; calibrate with calibration_batch equal to the graph's batch",
            )


# -- calibrators -------------------------------------------------------------------------------


def uint8_params(lo: float, hi: float) -> tuple[np.float32, np.uint8]:
    """Scale and zero point of uint8 affine quantization over ``[lo, hi]`` (0 included, exactly
    representable)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = (hi - lo) / 255 if hi > lo else 1.0
    zero = int(np.clip(round(-lo / scale), 0, 255))
    return np.float32(scale), np.uint8(zero)


def _fake_quant(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    scale, zero = uint8_params(lo, hi)
    q = np.clip(np.rint(x / scale) + float(zero), 0, 255)
    return (q - float(zero)) * scale


def calibrate(stats: TensorStats, method: str, percentile: float = 99.99) -> tuple[float, float]:
    """The clipping range ``(lo, hi)`` that ``method`` picks for a tensor (within its range)."""
    lo, hi, x = stats.lo, stats.hi, stats.sample
    if method == "minmax" or hi <= lo or x.size == 0:
        return lo, hi
    if method == "percentile":
        a, b = np.percentile(x, [100 - percentile, percentile])
        return max(lo, float(a)) if lo < 0 else lo, min(hi, float(b)) if hi > 0 else hi
    if method == "mse":
        best, best_err = (lo, hi), math.inf
        for a in np.geomspace(1e-3, 1.0, 160):
            err = float(np.mean((_fake_quant(x, a * lo, a * hi) - x) ** 2))
            if err < best_err:
                best, best_err = (a * lo, a * hi), err
        return best
    if method == "entropy":
        signed = lo < 0 < hi and -lo > 0.05 * hi
        t = _kl_threshold(np.abs(x) if signed else x - lo, levels=128 if signed else 255)
        return (max(lo, -t), min(hi, t)) if signed else (lo, lo + t)
    raise OptionError(f"unknown calibrator {method!r}", hint=f"use one of {CALIBRATORS}")


def _kl_threshold(x: np.ndarray, levels: int, bins: int = 2048) -> float:
    """TensorRT's entropy calibration on nonnegative ``x``: the threshold whose ``levels``-level
    quantized histogram has the least KL divergence from the clipped reference histogram."""
    top = float(x.max())
    if top <= 0:
        return top
    hist, edges = np.histogram(x, bins=bins, range=(0, top))
    hist = hist.astype(np.float64)
    best, best_kl = bins, math.inf
    for i in range(levels, bins + 1, 16):
        p = hist[:i].copy()
        p[-1] += hist[i:].sum()
        nonzero = p > 0
        # merge the i bins into `levels` groups, spread each group's mass over its nonzero bins
        group = np.minimum((np.arange(i) * levels) // i, levels - 1)
        mass = np.bincount(group, weights=hist[:i], minlength=levels)
        count = np.bincount(group, weights=nonzero.astype(np.float64), minlength=levels)
        q = np.where(nonzero, mass[group] / np.maximum(count[group], 1), 0.0)
        ps, qs = p / p.sum(), q / max(q.sum(), 1e-300)
        ok = (ps > 0) & (qs > 0)
        kl = float(np.sum(ps[ok] * np.log(ps[ok] / qs[ok]))) + float(ps[(ps > 0) & ~ok].sum()) * 30
        if kl < best_kl:
            best, best_kl = i, kl
    return float(edges[best])
