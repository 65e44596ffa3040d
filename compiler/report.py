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
        return {"rows": [asdict(r) for r in self.rows], "notes": list(self.notes)}

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
        return "\n".join(text + self.notes)

    def _repr_html_(self) -> str:  # notebooks
        return "<pre>" + str(self) + "</pre>"
