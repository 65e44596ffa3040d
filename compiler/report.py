"""Graph statistics (params, MACs, weight bytes) and the per-pass report table."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from compiler.ir.graph import Graph
from compiler.ops.table import get_op


@dataclass
class GraphStats:
    params: int
    macs: int
    weight_bytes: int
    nodes: int


def graph_stats(graph: Graph) -> GraphStats:
    """Parameters and bytes of every constant the graph reads, and the sum of per-node MACs.

    A shared weight's packed indices count as the weights they index (one parameter per weight
    element, however many bits it takes), so ``params`` stays comparable across passes while
    ``weight_bytes`` shows the compression."""
    consts = graph.constants()
    return GraphStats(
        params=sum(_param_count(c) for c in consts),
        macs=sum(int(get_op(n.op).macs(n)) for n in graph.nodes),
        weight_bytes=sum(c.nbytes for c in consts),
        nodes=len(graph.nodes),
    )


def _param_count(value) -> int:
    lookups = [n for n, i in value.uses if n.op == "codebook_lookup" and i == 1]
    if lookups and len(lookups) == len(value.uses):
        return math.prod(lookups[0].attrs["shape"])
    return value.numel


LAYER_OPS = ("conv2d", "linear")
DEVIATION = (
    "max dev: the largest |difference| between a pass's outputs and the previous graph's, over "
    "all outputs of the check inputs, divided by the largest |output| of the previous graph; "
    "total dev: the same against the input graph"
)
MAX_LAYER_ROWS = 40  # the table lists at most this many changed layers (to_dict() has them all)


def _weight_bits(node) -> str:
    """How the layer's weight is stored: fp32, k-means codebook bits, or integer bits."""
    w = node.inputs[1] if len(node.inputs) > 1 else None
    producer = getattr(w, "producer", None)
    if producer is not None and producer.op == "codebook_lookup":
        return f"{producer.attrs['bits']}-bit codebook"
    if producer is not None and producer.op == "dequantize_linear":
        return f"int{producer.attrs.get('bits', 8)}"
    return "fp32" if w is None else str(w.dtype).replace("float", "fp")


def _layer_shape(node) -> tuple[int, int, str]:
    """(input width, output width, kernel) of a conv2d or linear node."""
    shape = node.inputs[1].shape if len(node.inputs) > 1 and node.inputs[1] is not None else ()
    x, y = node.inputs[0].shape, node.outputs[0].shape
    if node.op == "conv2d":
        kernel = f" {shape[2]}x{shape[3]}" if len(shape) == 4 else ""
        groups = node.attrs.get("groups", 1)
        return x[1], y[1], kernel + (f" g{groups}" if groups != 1 else "")
    return x[-1], y[-1], ""


def layer_summary(graph: Graph) -> dict[str, str]:
    """``module path -> "in->out kernel, bits"`` for each conv2d/linear layer of the user's model.

    A layer the passes turned into several nodes of the same source (a factorized chain) reads as
    its chain of widths, e.g. ``64->16->64 1x1,3x3 fp32`` (rank 16)."""
    nodes: dict[str, list] = {}
    for node in graph.nodes:
        if node.op in LAYER_OPS:
            nodes.setdefault(node.source or node.outputs[0].name, []).append(node)
    out = {}
    for name, chain in nodes.items():
        shapes = [_layer_shape(n) for n in chain]
        widths = "->".join(str(w) for w in [shapes[0][0]] + [o for _, o, _ in shapes])
        kernels = ",".join(k.strip() for _, _, k in shapes if k.strip())
        bits = sorted({_weight_bits(n) for n in chain})
        rank = f" (rank {min(o for _, o, _ in shapes[:-1])})" if len(chain) > 1 else ""
        out[name] = f"{widths}{' ' + kernels if kernels else ''} {'/'.join(bits)}{rank}"
    return out


@dataclass
class LayerRow:
    """One layer of the user's model whose shape or storage the passes changed."""

    layer: str
    before: str
    after: str


def compare_layers(before: dict[str, str], after: dict[str, str]) -> list[LayerRow]:
    rows = [
        LayerRow(k, v, after.get(k, "(removed)")) for k, v in before.items() if after.get(k) != v
    ]
    rows += [LayerRow(k, "(new)", v) for k, v in after.items() if k not in before]
    return rows


@dataclass
class ReportRow:
    name: str
    params: int
    macs: int
    weight_bytes: int
    nodes: int
    seconds: float
    deviation: float
    total_deviation: float
    changed: bool
    exact: bool


def _human(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.4g}{unit}"
        n /= 1000
    return f"{n:.4g}P"


@dataclass
class Report:
    """One row per pass (plus the input graph); ``str()`` gives a table, ``to_dict()`` the data."""

    rows: list[ReportRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what passes want the user to know
    layers: list[LayerRow] = field(default_factory=list)  # layers the passes changed
    layer_count: int = 0  # conv2d/linear layers in the input graph

    def add(
        self,
        name: str,
        stats: GraphStats,
        seconds: float,
        deviation: float,
        *,
        changed: bool,
        total_deviation: float = 0.0,
        exact: bool = True,
    ) -> None:
        self.rows.append(
            ReportRow(
                name,
                stats.params,
                stats.macs,
                stats.weight_bytes,
                stats.nodes,
                seconds,
                deviation,
                total_deviation,
                changed,
                exact,
            )
        )

    def to_dict(self) -> dict:
        return {
            "rows": [asdict(r) for r in self.rows],
            "totals": self.totals(),
            "layers": [asdict(r) for r in self.layers],
            "notes": list(self.notes),
            "definitions": {"deviation": DEVIATION},
        }

    def totals(self) -> dict:
        """Seconds over all passes and the last row against the first (ratios < 1: smaller)."""
        if not self.rows:
            return {}
        first, last = self.rows[0], self.rows[-1]
        ratio = lambda a, b: a / b if b else 1.0  # noqa: E731
        return {
            "seconds": sum(r.seconds for r in self.rows),
            "params": ratio(last.params, first.params),
            "macs": ratio(last.macs, first.macs),
            "weight_bytes": ratio(last.weight_bytes, first.weight_bytes),
            "total_deviation": last.total_deviation,
        }

    def _totals_line(self) -> str:
        t = self.totals()
        if not t:
            return ""
        return (
            f"total: {t['seconds']:.2f} s in passes; params {t['params']:.3f}x, MACs "
            f"{t['macs']:.3f}x, weight bytes {t['weight_bytes']:.3f}x of the input graph; output "
            f"deviation {t['total_deviation']:.2e}"
        )

    def _layers_text(self) -> list[str]:
        if not self.layers:
            return []
        shown = self.layers[:MAX_LAYER_ROWS]
        width = max(len(r.layer) for r in shown)
        wide = max(len(r.before) for r in shown)
        lines = [
            f"layers changed ({len(self.layers)} of {self.layer_count}; in->out kernel, storage):"
        ]
        lines += [f"  {r.layer.ljust(width)}  {r.before.ljust(wide)}  ->  {r.after}" for r in shown]
        if len(self.layers) > len(shown):
            lines.append(f"  ... {len(self.layers) - len(shown)} more (report.to_dict()['layers'])")
        return lines

    def __str__(self) -> str:
        header = ("pass", "nodes", "params", "MACs", "weights", "seconds", "max dev", "total dev")
        lines = [header]
        for r in self.rows:
            mark = "" if r.changed or r.name == "input" else " (no change)"
            lines.append(
                (
                    r.name + mark,
                    str(r.nodes),
                    _human(r.params),
                    _human(r.macs),
                    _human(r.weight_bytes) + "B",
                    f"{r.seconds:.3f}",
                    f"{r.deviation:.2e}",
                    f"{r.total_deviation:.2e}",
                )
            )
        widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
        text = []
        for k, row in enumerate(lines):
            cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
            text.append("  ".join(cells))
            if k == 0:
                text.append("  ".join("-" * w for w in widths))
        import textwrap

        text += [self._totals_line(), *textwrap.wrap(DEVIATION + ".", 100)]
        return "\n".join(text + self._layers_text() + self.notes)

    def _repr_html_(self) -> str:  # notebooks
        return "<pre>" + str(self) + "</pre>"
