"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization"): the exact, data-free
``equalize-cross-layer`` pass that makes per-channel weight ranges of consecutive layers match, so
per-tensor (and better per-channel) int8 loses less."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from compiler.ir.graph import Graph, Node
from compiler.pass_manager import Pass, register_pass
from passes.fusion import set_constant, sole_producer

#: activations with act(x / s) = act(x) / s for s > 0 (positively homogeneous)
HOMOGENEOUS = (None, "relu")


@register_pass
@dataclass
class EqualizeCrossLayer(Pass):
    """Rescale channel ``i`` between two consecutive layers by ``s_i = sqrt(r1_i / r2_i)``.

    ``conv2d(conv2d(x, $w1, $b1) {relu}, $w2) -> conv2d(conv2d(x, $w1 / s, $b1 / s) {relu},
    $w2 * s)`` with ``r1_i = max |w1[i]|`` (output channel ``i`` of the first layer) and ``r2_i =
    max |w2[:, i]|`` (input channel ``i`` of the second); afterwards both ranges are
    ``sqrt(r1_i * r2_i)``. Exact because ``relu(z / s) = relu(z) / s`` for ``s > 0``. Also for
    linear -> linear and mixes of the two.

    Preconditions: the first layer's output is read only by the second (input 0) and is not a
    graph output; the first has no fused residual and a relu or no activation; both weights (and
    the first bias) are float constants; the second is not a grouped conv. Channels that are
    zero in either layer are left alone. Chains are swept ``iterations`` times.

    Attributes:
        iterations: sweeps over each chain of layers (each sweep evens the ranges further).
    """

    name = "equalize-cross-layer"
    exact = True
    iterations: int = 4

    def run(self, graph: Graph) -> bool:
        changed = False
        for _ in range(self.iterations):
            pairs = [p for p in (_pair(graph, n) for n in graph.nodes) if p is not None]
            if not pairs:
                break
            for first, second in pairs:
                _equalize(graph, first, second)
            changed = True
        return changed


def _pair(graph: Graph, second: Node) -> tuple[Node, Node] | None:
    if second.op not in ("conv2d", "linear"):
        return None
    if second.op == "conv2d" and second.attrs["groups"] != 1:
        return None
    first = sole_producer(graph, second.inputs[0])
    if first is None or (len(first.inputs) > 3 and first.inputs[3] is not None):
        return None
    if first.attrs.get("activation") not in HOMOGENEOUS:
        return None
    if first.op == "linear" and second.op == "conv2d":
        return None
    if first.op == "conv2d" and second.op == "linear" and len(first.outputs[0].shape) != 2:
        return None  # a conv feeds a linear only through a reshape, which is not matched here
    b = first.inputs[2] if len(first.inputs) > 2 else None
    weights = [first.inputs[1], second.inputs[1]] + ([b] if b is not None else [])
    if not all(v.is_constant and np.dtype(v.dtype).kind == "f" for v in weights):
        return None
    return first, second


def _equalize(graph: Graph, first: Node, second: Node) -> None:
    w1, w2 = first.inputs[1].data.astype(np.float64), second.inputs[1].data.astype(np.float64)
    r1 = np.abs(w1).reshape(w1.shape[0], -1).max(axis=1)
    r2 = np.abs(np.moveaxis(w2, 1, 0)).reshape(w2.shape[1], -1).max(axis=1)
    ok = (r1 > 0) & (r2 > 0)
    s = np.ones_like(r1)
    s[ok] = np.sqrt(r1[ok] / r2[ok])
    shape1 = (-1,) + (1,) * (w1.ndim - 1)
    shape2 = (1, -1) + (1,) * (w2.ndim - 2)
    set_constant(
        graph,
        first,
        1,
        (w1 / s.reshape(shape1)).astype(first.inputs[1].dtype),
        f"{first.inputs[1].name}_eq",
    )
    b = first.inputs[2] if len(first.inputs) > 2 else None
    if b is not None:
        set_constant(
            graph, first, 2, (b.data.astype(np.float64) / s).astype(b.dtype), f"{b.name}_eq"
        )
    set_constant(
        graph,
        second,
        1,
        (w2 * s.reshape(shape2)).astype(second.inputs[1].dtype),
        f"{second.inputs[1].name}_eq",
    )


def channel_range_spread(w: np.ndarray) -> float:
    """max / min of the per-output-channel ranges ``max |w[i]|`` (1 is perfectly balanced)."""
    r = np.abs(w).reshape(w.shape[0], -1).max(axis=1)
    return float(r.max() / max(r.min(), 1e-12))
