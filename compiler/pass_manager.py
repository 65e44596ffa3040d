"""Passes and the pass manager: run each pass, verify the graph, compare its numbers with the graph
it was given, and record a report row (params, MACs, weight bytes, seconds, deviation) per pass."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import numpy as np

from compiler.analysis.deviation import deviation
from compiler.errors import OptionError, PassError, SlimgraphError, did_you_mean
from compiler.ir.graph import Graph
from compiler.report import Report, compare_layers, graph_stats, layer_summary


class Pass:
    """Base class of graph rewrites.

    Subclasses are dataclasses whose fields are the pass's options; they set ``name`` (kebab-case,
    used by :func:`register_pass`), ``exact`` (True when the rewrite preserves the graph's outputs
    to float tolerance), and implement :meth:`run`. The contract: leave the graph verifiable.
    """

    name: ClassVar[str] = ""
    exact: ClassVar[bool] = True

    def run(self, graph: Graph) -> bool:
        """Rewrite ``graph`` in place; return True when anything changed."""
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        try:
            return {f.name: getattr(self, f.name) for f in fields(self)}
        except TypeError:  # not a dataclass
            return {}

    def missing_data(self) -> str | None:
        """What this pass needs and was not given (calibration data, labels), or None.

        ``compile()`` asks before tracing, so a pass that cannot run fails in a second, not after
        the model was traced and earlier passes ran. ``compile(..., calibration_data=...)`` fills
        the pass's data afterwards, so it only asks when no data was given there.
        """
        return None

    def changed_options(self) -> dict[str, Any]:
        """Options that differ from their defaults (what a report needs to show)."""
        try:
            shown = [f for f in fields(self) if f.repr]
        except TypeError:
            return {}
        out = {}
        for f in shown:
            value = getattr(self, f.name)
            if value is f.default:
                continue
            try:
                if bool(value == f.default):
                    continue
            except (TypeError, ValueError):
                pass
            out[f.name] = getattr(value, "__name__", value) if callable(value) else value
        return out

    def __str__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.changed_options().items())
        return f"{self.name}({opts})" if opts else self.name


@dataclass
class PassContext:
    """What the layer above lends to passes that must run the model.

    Passes sit below the backends and the API, so a pass that needs gradients or a fast forward
    (Taylor scores, layer sensitivity) asks the context instead of importing a backend;
    :mod:`compiler.api` fills it when imported.

    Attributes:
        torch_module: ``graph -> torch.nn.Module`` computing the graph with ``nn.Parameter``
            weights in the order of ``graph.constants()`` (the module's ``_const_attrs``).
        progress: show progress bars inside long passes (calibration, rank analysis, k-means,
            reconstruction); ``compile(progress=True)`` sets it while its passes run.
    """

    torch_module: Callable[[Graph], Any] | None = None
    progress: bool = False  # long loops inside passes show a bar (compile(progress=True))

    def require_torch_module(self, who: str) -> Callable[[Graph], Any]:
        if self.torch_module is None:
            raise OptionError(
                f"{who} needs to run the model in torch, and no torch module builder is set",
                hint="import compiler (compiler.api sets one), or call "
                "set_pass_context(PassContext(torch_module=...))",
            )
        return self.torch_module


_context = PassContext()


def pass_context() -> PassContext:
    """The context passes read (see :class:`PassContext`)."""
    return _context


def progress_bar(iterable: Iterable, desc: str, total: int | None = None) -> Iterable:
    """``iterable`` with a progress bar when the pass context asks for one (on a terminal, a bar
    that disappears when done; piped, nothing), else ``iterable`` itself."""
    if not _context.progress:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False)


def set_pass_context(context: PassContext) -> PassContext:
    """Install ``context`` for every pass; returns the one it replaces."""
    global _context
    previous, _context = _context, context
    return previous


PASSES: dict[str, type[Pass]] = {}
PRESETS: dict[str, list[str]] = {}
# Callables that register passes when first needed. The pass manager never imports a pass package:
# a package adds its loader here (``passes/__init__.py`` does, for the built-in passes), so the
# registry is filled lazily and the core stays below the passes.
PASS_SOURCES: list[Callable[[], None]] = []
_loaded_sources: set[int] = set()


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available by its registered name."""
    if not cls.name:
        raise OptionError(f"pass class {cls.__name__} has no name", hint="set name = 'my-pass'")
    PASSES[cls.name] = cls
    return cls


def register_preset(name: str, passes: Sequence[str]) -> None:
    """A named sequence of passes, usable wherever a pass name is."""
    PRESETS[name] = list(passes)


def add_pass_source(load: Callable[[], None]) -> None:
    """Register ``load``, called once before the first lookup of a pass by name."""
    if load not in PASS_SOURCES:
        PASS_SOURCES.append(load)


def load_passes() -> None:
    """Run every pass source not yet run (each registers its passes and presets)."""
    for load in list(PASS_SOURCES):
        if id(load) not in _loaded_sources:
            _loaded_sources.add(id(load))
            load()


@dataclass(frozen=True)
class OptionDoc:
    """One option of a pass, as ``slimgraph passes --verbose`` shows it."""

    name: str
    type: str
    default: str
    meaning: str


def pass_summary(cls: type[Pass]) -> str:
    """The first sentence of the pass's docstring, whole (however many lines it spans)."""
    import inspect

    paragraph = (inspect.getdoc(cls) or "").split("\n\n")[0]
    text = " ".join(paragraph.split())
    end = text.find(". ")
    return text if end < 0 else text[: end + 1]


def _attribute_docs(cls: type[Pass]) -> dict[str, str]:
    """``name -> meaning`` from the docstring's ``Attributes:`` section (``a, b:`` names both)."""
    import inspect
    import re

    doc = inspect.getdoc(cls) or ""
    if "Attributes:" not in doc:
        return {}
    out: dict[str, str] = {}
    current: list[str] = []
    for line in doc.split("Attributes:", 1)[1].splitlines():
        if line and not line.startswith(" "):  # the section ended
            break
        head = re.match(r"^    ([\w, ]+):\s*(.*)$", line)
        if head:
            current = [n.strip() for n in head.group(1).split(",")]
            for name in current:
                out[name] = head.group(2).strip()
        elif line.strip() and current:
            for name in current:
                out[name] += " " + line.strip()
    return out


def pass_options(cls: type[Pass]) -> list[OptionDoc]:
    """Every option of a (dataclass) pass: name, type, default and meaning from its docstring."""
    from dataclasses import MISSING

    try:
        declared = [f for f in fields(cls) if f.init]
    except TypeError:
        return []
    meanings: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # a subclass's docstring overrides its base's
        if isinstance(klass, type) and issubclass(klass, Pass):
            meanings.update(_attribute_docs(klass))
    out = []
    for f in declared:
        if f.default is not MISSING:
            default = f.default
        elif f.default_factory is not MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        shown = getattr(default, "__name__", None) or repr(default)
        out.append(OptionDoc(f.name, str(f.type), shown, meanings.get(f.name, "")))
    return out


def _unknown_pass(spec: str) -> OptionError:
    known = sorted(PASSES) + sorted(f"{p} (preset)" for p in PRESETS)
    return OptionError(
        f"unknown pass {spec!r}{did_you_mean(spec, [*PASSES, *PRESETS])}",
        hint="use one of: " + ", ".join(known) + "; or register your own with @register_pass",
    )


def make_pass(cls: type[Pass], options: dict[str, Any]) -> Pass:
    """``cls(**options)``, with an unknown option named beside the valid ones and the nearest."""
    try:
        valid = [f.name for f in fields(cls) if f.init]
    except TypeError:  # not a dataclass: the constructor says what it takes
        valid = None
    unknown = [k for k in options if valid is not None and k not in valid]
    if unknown:
        raise OptionError(
            f"pass '{cls.name}' has no option {unknown[0]!r}{did_you_mean(unknown[0], valid)}",
            hint=f"its options: {', '.join(valid)} (slimgraph passes --verbose describes them)",
        )
    try:
        return cls(**options)
    except (TypeError, ValueError) as e:
        raise OptionError(f"bad options for pass '{cls.name}': {e}") from e


def resolve_passes(specs: str | Iterable[str | Pass | type[Pass]]) -> list[Pass]:
    """Turn pass names, presets, classes and instances into a flat list of pass instances.

    A string is read as a comma-separated pass list (``"fuse,prune-channels(target=0.5)"``), as the
    CLI's ``--passes`` is; names, option names and option syntax are all checked here, before any
    work is done.
    """
    load_passes()
    if isinstance(specs, str):
        specs = split_pass_list(specs)
    out: list[Pass] = []
    for spec in specs:
        if isinstance(spec, Pass):
            out.append(spec)
        elif isinstance(spec, type) and issubclass(spec, Pass):
            out.append(make_pass(spec, {}))
        elif isinstance(spec, str) and "(" in spec:
            out.append(parse_pass_spec(spec))
        elif isinstance(spec, str) and spec.strip() in PRESETS:
            out.extend(resolve_passes(PRESETS[spec.strip()]))
        elif isinstance(spec, str) and spec.strip() in PASSES:
            out.append(make_pass(PASSES[spec.strip()], {}))
        else:
            raise _unknown_pass(str(spec))
    return out


def parse_pass_spec(spec: str) -> Pass:
    """``"prune-channels(target=0.5, scope='global')"`` -> a configured pass instance."""
    import ast

    name, _, rest = spec.partition("(")
    name = name.strip()
    if name not in PASSES and rest.rstrip().endswith(")"):
        raise _unknown_pass(name)
    if name not in PASSES or not rest.rstrip().endswith(")"):
        raise OptionError(
            f"cannot read pass spec {spec!r}",
            hint="write name(option=value, ...), e.g. prune-channels(ratio=0.3)",
        )
    try:
        call = ast.parse(f"f({rest}", mode="eval").body
        kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
    except (SyntaxError, ValueError) as e:
        raise OptionError(
            f"cannot read the options of {spec!r}: {e}",
            hint="options are Python literals: numbers, strings, tuples",
        ) from e
    if call.args or None in kwargs:
        raise OptionError(f"pass options must be named in {spec!r}")
    return make_pass(PASSES[name], kwargs)


def split_pass_list(text: str) -> list[str]:
    """Split ``"fuse,prune-channels(ratio=0.3, round_to=8)"`` on the commas outside parentheses."""
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += ch
    parts.append(current.strip())
    return [p for p in parts if p]


@dataclass
class PassManager:
    """Runs passes with verification and numeric checking.

    Attributes:
        passes: pass instances, names or presets.
        example_inputs: arrays the graph is run on to compare outputs before and after each pass;
            None disables numeric checking.
        tolerance: the largest relative deviation an exact pass may cause.
        verify: run ``graph.verify()`` after each pass.
        runner: function ``(graph, inputs) -> outputs`` used for checking (the reference
        interpreter).
    """

    passes: Sequence[str | Pass | type[Pass]] = ()
    example_inputs: Sequence[np.ndarray] | None = None
    tolerance: float = 1e-4
    verify: bool = True
    runner: Callable[[Graph, Sequence[np.ndarray]], list[np.ndarray]] | None = None
    progress: Callable[[str], None] | None = None
    report: Report = field(default_factory=Report)

    def run(self, graph: Graph) -> Graph:
        """Run every pass on ``graph`` in place and return it; rows go to ``self.report``."""
        from compiler.ir import interpreter

        runner = self.runner or interpreter.run
        instances = resolve_passes(self.passes)
        if self.verify:
            graph.verify()
        reference = None
        if self.example_inputs is not None:
            reference = runner(graph, self.example_inputs)
        if not self.report.rows:
            self.report.add("input", graph_stats(graph), 0.0, 0.0, changed=False)
        layers_before = layer_summary(graph)
        original = reference
        for p in instances:
            if self.progress:
                self.progress(p.name)
            start = time.perf_counter()
            try:
                changed = bool(p.run(graph))
            except SlimgraphError as e:
                raise type(e)(f"in pass '{p.name}': {e}") from e
            except Exception as e:
                raise PassError(f"pass '{p.name}' failed: {type(e).__name__}: {e}") from e
            seconds = time.perf_counter() - start
            if self.verify:
                try:
                    graph.verify()
                except SlimgraphError as e:
                    raise PassError(f"pass '{p.name}' left an invalid graph: {e}") from e
            dev = 0.0
            total = 0.0
            if reference is not None and changed:
                outputs = runner(graph, self.example_inputs)
                dev = deviation(reference, outputs)
                total = deviation(original, outputs)
                if p.exact and not dev <= self.tolerance:
                    raise PassError(
                        f"pass '{p.name}' is exact but changed the outputs by {dev:.3g} "
                        f"(relative; tolerance {self.tolerance:g})",
                        hint="report this as a bug in the pass, or run with check=False to skip",
                    )
                reference = outputs
            elif reference is not None:
                total = self.report.rows[-1].total_deviation
            self.report.add(
                str(p),
                graph_stats(graph),
                seconds,
                dev,
                changed=changed,
                total_deviation=total,
                exact=p.exact,
            )
        # what passes want the user to know (layers left in float...), for every caller
        self.report.notes = list(graph.meta.get("notes", ()))
        self.report.layers = compare_layers(layers_before, layer_summary(graph))
        self.report.layer_count = len(layers_before)
        return graph
