"""Calibration data for ``factorize-rank``: checked before anything changes, the second moments of
each layer's input rows (what the data-aware factors whiten with), and the least-squares refit of
the factor chains by the shared engine (compiler/analysis/reconstruct.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from compiler.analysis.reconstruct import Reconstruction, reconstruct
from compiler.errors import InputError
from compiler.ir.graph import Graph, Node

MAX_WHITENED_DIM = 8192  # wider inputs keep plain SVD (the covariance would not fit in memory)


def checked_inputs(graph: Graph, data) -> list[np.ndarray]:
    """``data`` (an array, or one per graph input) as float arrays checked against the graph's
    inputs: one per input, each ``(N, *input shape[1:])`` with the same N, finite, and at least
    one batch of the graph's static batch size.

    Raises:
        InputError: what is wrong, and how many samples are needed where there are too few.
    """
    arrays = list(data) if isinstance(data, (list, tuple)) else [data]
    if len(arrays) != len(graph.inputs):
        raise InputError(
            f"calibration_data has {len(arrays)} array(s), the graph takes {len(graph.inputs)} "
            "input(s)",
            hint="give one array of samples per graph input, in order",
        )
    arrays = [np.asarray(a) for a in arrays]
    n = len(arrays[0]) if arrays[0].ndim else 0
    for v, a in zip(graph.inputs, arrays):
        if a.ndim != len(v.shape) or tuple(a.shape[1:]) != tuple(v.shape[1:]) or len(a) != n:
            raise InputError(
                f"calibration data for input '{v.name}' has shape {a.shape}, expected "
                f"(N, {', '.join(map(str, v.shape[1:]))}) with the same N for every input",
                hint="stack the samples along axis 0, shaped like the graph's inputs",
            )
        if not np.issubdtype(a.dtype, np.number):
            raise InputError(f"calibration data for input '{v.name}' has dtype {a.dtype}")
        if np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a)):
            bad = int(np.sum(~np.isfinite(a).reshape(n, -1).all(axis=1)))
            raise InputError(
                f"calibration data for input '{v.name}' has NaN or inf in {bad} of {n} samples",
                hint="clean or drop those samples",
            )
    batch = graph.inputs[0].shape[0]
    if n < batch:
        raise InputError(
            f"calibration_data has {n} samples; the graph runs in batches of {batch}, so it "
            f"needs at least {batch}",
            hint=f"give at least {batch} samples (a few hundred is typical)",
        )
    return [a.astype(v.dtype, copy=False) for v, a in zip(graph.inputs, arrays)]


def input_dim(node: Node) -> int:
    """Length of the layer's input rows: in-features, or ``C_in/groups * kh * kw``."""
    return int(np.prod(node.inputs[1].shape[1:]))


def sampled_rows(node: Node, x: np.ndarray, count: int, rng) -> list[np.ndarray]:
    """``count`` random rows of the layer's input (all of them if fewer) matching its weight's
    flattened columns, one array per group: for a conv, im2col patches gathered at random output
    positions only, so a large activation is never unfolded whole."""
    if node.op == "linear":
        rows = x.reshape(-1, x.shape[-1])
        return [rows[rng.choice(len(rows), min(count, len(rows)), replace=False)]]
    a = node.attrs
    _, cg, kh, kw = node.inputs[1].shape
    n, c = x.shape[:2]
    _, _, oh, ow = node.outputs[0].shape
    (sh, sw), (ph, pw), (dh, dw) = a["stride"], a["padding"], a["dilation"]
    pick = rng.choice(n * oh * ow, min(count, n * oh * ow), replace=False)
    b, p, q = np.unravel_index(pick, (n, oh, ow))
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    span = (dh * (kh - 1) + 1, dw * (kw - 1) + 1)
    windows = np.lib.stride_tricks.sliding_window_view(xp, span, axis=(2, 3))[..., ::dh, ::dw]
    patches = windows[b, :, p * sh, q * sw]  # (S, C, kh, kw): only the sampled windows copied
    rows = patches.reshape(len(pick), c, kh * kw)  # (i, y, x) order, as the weight flattens
    return [rows[:, g * cg : (g + 1) * cg].reshape(len(pick), -1) for g in range(a["groups"])]


def second_moments(
    graph: Graph, nodes: list[Node], data: list[np.ndarray], samples: int, seed: int
) -> dict[str, list[np.ndarray]]:
    """Per layer (by node name) and group, ``E[x x^T]`` of up to ``samples`` of its input rows
    (im2col patches for convs), over one interpreter pass of ``data`` in whole batches. Layers
    whose rows are longer than ``MAX_WHITENED_DIM`` are left out."""
    from compiler.ir.interpreter import run

    batch = graph.inputs[0].shape[0]
    starts = range(0, len(data[0]) - batch + 1, batch)
    per_batch = math.ceil(samples / len(starts))
    rng = np.random.default_rng(seed)
    sums: dict[str, list[np.ndarray]] = {}
    counts: dict[str, int] = {}
    nodes = [n for n in nodes if input_dim(n) <= MAX_WHITENED_DIM]
    keep = [n.inputs[0] for n in nodes]
    for start in starts:
        acts = run(graph, [d[start : start + batch] for d in data], keep=keep)
        for node, act in zip(nodes, acts[len(graph.outputs) :]):
            parts = sampled_rows(node, act, per_batch, rng)
            moments = sums.setdefault(node.name, [np.zeros((p.shape[1],) * 2) for p in parts])
            for m, p in zip(moments, parts):  # float32 products of a batch, float64 sums
                m += p.T @ p
            counts[node.name] = counts.get(node.name, 0) + len(parts[0])
    return {name: [m / counts[name] for m in ms] for name, ms in sums.items()}


@dataclass
class Chain:
    """One factorized layer: its factor nodes' names (input side first) and, per factor, the
    indices of the full-rank chain's outputs it computes (None for the last: all of them)."""

    names: list[str]
    kept: list[np.ndarray | None]


def refit_chains(
    reference: Graph,
    compressed: Graph,
    data: list[np.ndarray],
    chains: list[Chain],
    *,
    factors: str,
    ridge: float,
    compensate_residual: bool,
    skip_underdetermined: bool,
    progress: bool,
) -> Reconstruction:
    """Refit the factors of ``chains`` in ``compressed`` by least squares (the shared engine):
    the last factor of each (``factors="last"``) or every one (``"all"``).

    ``reference`` is the original graph with each factorized layer replaced by its exact full-rank
    chain in the same form and under the same node names, so every factor has a same-named
    counterpart whose outputs it should reproduce: the last factor the original layer's output,
    an inner factor the leading ``r`` outputs of its full-rank counterpart (the original input
    projected as the factorization meant it). Factors are refit in graph order on the compressed
    graph's own activations, so each absorbs the error of everything upstream.
    """
    if factors == "last":
        layers = {c.names[-1]: None for c in chains}
    else:
        layers = {name: kept for c in chains for name, kept in zip(c.names, c.kept)}
    return reconstruct(
        reference,
        compressed,
        data,
        layers,
        ridge=ridge,
        skip_underdetermined=skip_underdetermined,
        compensate_residual=compensate_residual,
        progress=progress,
    )
