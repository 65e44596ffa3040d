"""Numba backend: an IR graph as a generated, standalone Python module calling jitted kernels.

    model = compile_numba(graph)     # generate the forward's source, plan buffers, load kernels
    (y,) = model.run(x)              # numpy in, numpy out
    print(model.source)              # one line per IR node, each calling one kernel
    model.save("resnet18_numba")     # a package: model.py, kernels/, weights.npz
    m = load_numba("resnet18_numba") # or: import resnet18_numba; resnet18_numba.load()

The generated ``forward`` writes every intermediate value into a preallocated buffer; buffers are
views of a few arena slots shared by values whose lifetimes do not overlap (a greedy best-fit
allocator over liveness, :func:`plan_memory`), and ``model.peak_bytes`` reports the arena's size.
The kernels (:mod:`backends.numba.kernels`) are ``cache=True``: the first process
compiles them (a few seconds per kernel), later ones load machine code.

Each op is emitted by a small function in :data:`EMITTERS` keyed by the op table's names. Where a
shape pattern has no kernel (a broadcast or permutation needing more than 4 merged axes, einsum,
a runtime attention mask) the line calls numpy instead; those lines read ``np.``.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import shutil
import sys
import tempfile
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from compiler.errors import BackendError, SlimgraphError
from compiler.ir.graph import Graph, Node, Value

__all__ = ["EMITTERS", "NumbaModel", "compile_numba", "emitter", "load_numba", "plan_memory"]

Emitter = Callable[["Codegen", Node], None]
EMITTERS: dict[str, Emitter] = {}


def emitter(*names: str) -> Callable[[Emitter], Emitter]:
    """Decorator registering ``fn(codegen, node)`` as the numba emitter of the IR ops ``names``."""

    def wrap(fn: Emitter) -> Emitter:
        for name in names:
            EMITTERS[name] = fn
        return fn

    return wrap


# -- code generation -------------------------------------------------------------------------------


@dataclass
class View:
    """One intermediate array ``b[i]``: its own buffer (``root`` None) or a reshape of another."""

    shape: tuple[int, ...]
    dtype: str
    root: int | None = None
    first: int = 0  # line that writes it first
    last: int = 0  # line that reads it last
    slot: int = -1

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def fmt(arg: object) -> str:
    """Python source of a kernel argument: expressions (str) verbatim, numbers and tuples as
    literals (floats always with a point, so a kernel never compiles twice for int vs float)."""
    if isinstance(arg, str):
        return arg
    if isinstance(arg, bool) or arg is None:
        return repr(arg)
    if isinstance(arg, (int, np.integer)):
        return str(int(arg))
    if isinstance(arg, (float, np.floating)):
        return "INF" if arg == math.inf else "-INF" if arg == -math.inf else repr(float(arg))
    if isinstance(arg, tuple):
        return "(" + "".join(f"{fmt(a)}, " for a in arg).rstrip(" ") + ")"
    raise TypeError(f"cannot format {arg!r}")


@dataclass
class Codegen:
    """Builds the forward's lines; emitters call :meth:`arg`, :meth:`out`, :meth:`call`."""

    graph: Graph
    lines: list[str] = field(default_factory=list)
    weights: dict[str, np.ndarray] = field(default_factory=dict)
    views: list[View] = field(default_factory=list)
    exprs: dict[int, str] = field(default_factory=dict)
    view_of: dict[int, int] = field(default_factory=dict)
    node: Node | None = None
    temps: list[int] = field(default_factory=list)
    derived_exprs: dict[str, str] = field(default_factory=dict)
    # line -> (kernel, its arguments, the node that emitted it): what chain_convs reads
    calls: dict[int, tuple[str, tuple, Node | None]] = field(default_factory=dict)
    # each conv chain's layers: (kind, kernel arguments without nt), for its table in bind()
    chains: list[list[tuple]] = field(default_factory=list)

    # -- values ----------------------------------------------------------------------------
    def arg(self, value: Value | None, shape: tuple[int, ...] | None = None) -> str:
        """Expression reading ``value`` (reshaped to ``shape`` if given); marks it live here."""
        if value is None:
            raise BackendError("a required input is missing", node=self.node.name)
        if value.is_constant and id(value) not in self.exprs:
            self.exprs[id(value)] = self.weight(value.data, value.name)
        if id(value) in self.view_of:
            self.touch(self.view_of[id(value)])
        expr = self.exprs[id(value)]
        return expr if shape is None or tuple(shape) == value.shape else f"{expr}.reshape({shape})"

    def touch(self, index: int, line: int | None = None) -> None:
        """Keep view ``index`` alive through ``line`` (default: the line being emitted)."""
        view = self.views[index]
        root = self.views[view.root] if view.root is not None else view
        root.last = max(root.last, len(self.lines) if line is None else line)

    def out(self, value: Value, shape: tuple[int, ...] | None = None) -> str:
        """Expression of the preallocated buffer for node output ``value``."""
        if id(value) not in self.exprs:
            self.exprs[id(value)] = self.new_view(value.shape, value.dtype)
            self.view_of[id(value)] = len(self.views) - 1
        return self.arg(value, shape)

    def temp(self, shape: tuple[int, ...], dtype: str) -> str:
        """A scratch buffer that lives until the current node's last line."""
        expr = self.new_view(shape, dtype)
        self.temps.append(len(self.views) - 1)
        return expr

    def new_view(self, shape, dtype, root: int | None = None) -> str:
        line = len(self.lines)
        self.views.append(View(tuple(int(d) for d in shape), str(dtype), root, line, line))
        return f"b[{len(self.views) - 1}]"

    def alias(self, value: Value, source: Value) -> None:
        """``value`` is ``source`` reshaped: no copy, no line."""
        if id(source) in self.view_of:
            root = self.views[self.view_of[id(source)]]
            index = self.view_of[id(source)] if root.root is None else root.root
            self.exprs[id(value)] = self.new_view(value.shape, value.dtype, root=index)
            self.view_of[id(value)] = len(self.views) - 1
            self.touch(self.view_of[id(value)])
        else:
            self.exprs[id(value)] = self.arg(source, value.shape)

    def weight(self, array: np.ndarray, hint: str) -> str:
        """Store ``array`` (made C-contiguous) with the weights; returns its expression."""
        name = re.sub(r"[^\w.]", "_", hint) or "w"
        base, i = name, 1
        while name in self.weights:
            name, i = f"{base}_{i}", i + 1
        self.weights[name] = np.array(array, copy=True, order="C")
        return f'w["{name}"]'

    def derived(self, key: str, expr: str) -> str:
        """A constant the generated ``prepare(w)`` computes from ``expr`` (which may read other
        weights) once, when the model is constructed: per-layer tables such as a conv's tap
        offsets, cheap to compute and not worth bytes in weights.npz. An equal (key, expr) pair
        is computed once (layers of one geometry share their tables); a key that a different
        table or a weight already holds gets a suffix."""
        base = key = re.sub(r"[^\w.]", "_", key)
        i = 1
        while key in self.weights or self.derived_exprs.get(key, expr) != expr:
            key, i = f"{base}_{i}", i + 1
        self.derived_exprs[key] = expr
        return f'w["{key}"]'

    def none(self, ndim: int, dtype: str) -> str:
        """An empty array standing for an absent optional input (one compiled signature)."""
        key = f"_none{ndim}d_{dtype}"
        if key not in self.weights:
            self.weights[key] = np.empty((0,) * ndim, dtype)
        return f'w["{key}"]'

    # -- lines -----------------------------------------------------------------------------
    def call(self, fn: str, *args: object) -> None:
        self.calls[len(self.lines)] = (fn, args, self.node)
        self.emit(f"{fn}({', '.join(fmt(a) for a in args)})")

    def emit(self, code: str) -> None:
        self.lines.append(code)


def _signature(node: Node) -> str:
    ins = ", ".join(
        "_" if v is None else ("$" if v.is_constant else "%") + v.name for v in node.inputs
    )
    outs = ", ".join("%" + v.name for v in node.outputs)
    return f"{outs} = {node.op}({ins})"


def generate(graph: Graph) -> Codegen:
    """Emit every node; returns the code generator holding lines, weights and views."""
    gen = Codegen(graph)
    for i, value in enumerate(graph.inputs):
        gen.exprs[id(value)] = f"x{i}"
    for node in graph.nodes:
        emit = EMITTERS.get(node.op)
        if emit is None:
            raise BackendError(
                f"the numba backend has no emitter for op '{node.op}'",
                node=node.name,
                op=node.op,
                source=node.source,
                hint=f"add @backends.numba.backend.emitter('{node.op}') on a function "
                "(codegen, node) that emits a kernel call; see the existing emitters",
            )
        gen.node = node
        start = len(gen.lines)
        try:
            emit(gen, node)
        except SlimgraphError:
            raise
        except Exception as e:
            raise BackendError(
                f"numba emitter failed: {e}", node=node.name, op=node.op, source=node.source
            ) from e
        # scratch buffers, and the node's inputs, live through all of the node's lines (an
        # emitter may read an input before emitting a preparatory line, such as packing)
        for index in gen.temps:
            gen.views[index].last = len(gen.lines) - 1
        gen.temps = []
        for value in node.inputs:
            if value is not None and id(value) in gen.view_of:
                gen.touch(gen.view_of[id(value)], len(gen.lines) - 1)
        comment = f"  # {_signature(node)}"
        if len(gen.lines) == start:
            gen.emit(f"#{comment[3:]} (a view, no copy)")
        else:
            gen.lines[start] += comment
    gen.node = None
    outputs = [gen.arg(v) + ".copy()" for v in graph.outputs]
    gen.emit(f"return [{', '.join(outputs)}]")
    return gen


# -- conv chains -----------------------------------------------------------------------------------

MIN_CHAIN = 2  # convs in a run worth one table
# kernels a chain runs (backends/numba/kernels/chain.py), by the kind name its table takes
CHAIN_KINDS = {"KC.conv2d_planned": "conv", "KC.conv2d_depthwise": "depthwise"}
# arguments a chain's table can hold: a weight or prepared table, an arena buffer (maybe
# reshaped), a kernel module's constant
_WEIGHT = re.compile(r'w\["([^"]+)"\](\.reshape\(.*\))?')
_BOUND = re.compile(r"b\[\d+\](\.reshape\(.*\))?|K\.\w+")


def chain_kind(gen: Codegen, fn: str, args: tuple, node: Node | None) -> str | None:
    """The kind a kernel call takes in a conv chain, or None where it cannot be chained: a
    float32 ``KC.conv2d_planned`` or ``KC.conv2d_depthwise`` whose arrays all exist when the
    model is constructed (arena buffers, weights and prepared tables: not a graph input, nor a
    codebook's weight packed on the first call), and not a 1x1 conv that
    :func:`~backends.numba.kernels.f32.conv2d_planned` runs on a copy of its input (strided, or
    a small plane read channel-last), which a chain has no buffer for."""
    kind = CHAIN_KINDS.get(fn)
    if kind is None or args[-1] != "nt" or node is None:
        return None
    if any(v is not None and v.dtype != "float32" for v in (*node.inputs, *node.outputs)):
        return None  # the table holds float32 arrays only (a float64 weight stays a call)
    for a in args[:-1]:
        if not isinstance(a, str):
            continue
        weight = _WEIGHT.fullmatch(a)
        if weight and weight[1] not in gen.weights and weight[1] not in gen.derived_exprs:
            return None
        if not weight and not _BOUND.fullmatch(a):
            return None
    if kind == "conv":
        from backends.numba.kernels.f32 import CL_MAX_PIXELS
        from backends.numba.kernels.pointwise import POINTWISE, PW_MIN_PIXELS

        kh, kw, sh, sw, ph, pw, groups = (args[i] for i in (8, 9, 10, 11, 12, 13, 16))
        npix = node.outputs[0].shape[2] * node.outputs[0].shape[3]
        pointwise = POINTWISE and kh == kw == 1 and ph == pw == 0 and groups == 1
        if pointwise and (npix <= CL_MAX_PIXELS or (sh, sw) != (1, 1) and npix >= PW_MIN_PIXELS):
            return None
    return kind


def chain_convs(gen: Codegen) -> None:
    """Rewrite each run of consecutive chainable conv lines (comment lines between them allowed)
    into one ``KC.run_chain`` line: the convs run in order, in one parallel region, each
    complete before the next starts, so the memory plan of the separate lines holds. The
    chained lines stay in the source as comments; their arguments make the chain's table in the
    generated ``bind(w, b)``."""
    run: list[tuple[int, str]] = []

    def close() -> None:
        if len(run) >= MIN_CHAIN:
            k = len(gen.chains)
            gen.chains.append([(repr(kind), *gen.calls[i][1][:-1]) for i, kind in run])
            for i, _ in run:
                gen.lines[i] = "# " + gen.lines[i]
            first = run[0][0]
            gen.lines[first] = (f'KC.run_chain(w["_chain.{k}"], nt)  # the {len(run)} convs '
                                f"below, in one parallel region\n    {gen.lines[first]}")
        run.clear()

    for i, line in enumerate(gen.lines):
        kind = chain_kind(gen, *gen.calls[i]) if i in gen.calls else None
        if kind is not None:
            run.append((i, kind))
        elif not line.startswith("#"):
            close()
    close()


# -- memory planning -------------------------------------------------------------------------------


def plan_memory(views: list[View], end: int) -> list[int]:
    """Assign each root view a slot so that views alive at the same line never share one.

    Greedy over lines: a view is allocated at its first line, before the views whose last read is
    that line are freed (so no kernel ever writes over its own input), into the smallest free slot
    that fits, else the largest free slot grown to fit, else a new slot. Returns slot sizes.
    """
    slots: list[int] = []
    free: list[int] = []
    births: dict[int, list[int]] = {}
    deaths: dict[int, list[int]] = {}
    for i, view in enumerate(views):
        if view.root is None:
            births.setdefault(view.first, []).append(i)
            deaths.setdefault(max(view.last, view.first) if view.last < end else end, []).append(i)
    for line in range(end + 1):
        for i in births.get(line, []):
            size = views[i].nbytes
            fits = [s for s in free if slots[s] >= size]
            if fits:
                slot = min(fits, key=lambda s: slots[s])
            elif free:
                slot = max(free, key=lambda s: slots[s])
                slots[slot] = size
            else:
                slots.append(size)
                slot = len(slots) - 1
            if slot in free:
                free.remove(slot)
            views[i].slot = slot
        free.extend(views[i].slot for i in deaths.get(line, []))
    for view in views:
        if view.root is not None:
            view.slot = views[view.root].slot
    return slots


LOADER = '''

def load(path=None):
    """This model with the weights in ``path`` (default: this package's folder)."""
    return runtime.load(sys.modules[__name__], path or os.path.dirname(os.path.abspath(__file__)))
'''
PACKAGE_INIT = '''"""A model saved by slimgraph's numba backend: ``load()`` it, then ``.run(x)``."""

from .kernels.runtime import InputError, Model
from .model import load

__all__ = ["InputError", "Model", "load"]
'''

KERNELS = Path(__file__).parent / "kernels"

# -- the generated module --------------------------------------------------------------------------

HEADER = '''"""Forward of graph {name!r}, generated by slimgraph's numba backend; do not edit.

Activation memory: {peak} bytes in {nslots} buffers ({naive} bytes without reuse).
Each line of forward() calls one kernel (K: kernels/common.py, KC: kernels/conv.py) that writes
into a preallocated buffer b[i]; w holds the weights (weights.npz) and nt is numba's thread count.
"""

import math
import os
import sys

import numpy as np

try:  # inside a saved package
    from .kernels import common as K
    from .kernels import conv as KC
    from .kernels import int8 as KQ
    from .kernels import runtime
except ImportError:  # compiled in-process, inside the slimgraph repository
    from backends.numba.kernels import common as K
    from backends.numba.kernels import conv as KC
    from backends.numba.kernels import int8 as KQ
    from backends.numba.kernels import runtime

INF = math.inf
GRAPH = {name!r}
INPUTS = {inputs!r}
OUTPUTS = {outputs!r}
SLOTS = {slots!r}
VIEWS = {views!r}
PEAK_BYTES = {peak}
'''


def render(graph: Graph, gen: Codegen, slots: list[int]) -> str:
    """The generated module's source: header constants, forward(), then the shared runtime."""
    roots = [v for v in gen.views if v.root is None]
    header = HEADER.format(
        name=graph.name,
        inputs=tuple((v.name, v.shape, v.dtype) for v in graph.inputs),
        outputs=tuple((v.name, v.shape, v.dtype) for v in graph.outputs),
        slots=tuple(slots),
        views=tuple((v.slot, v.shape, v.dtype) for v in gen.views),
        peak=sum(slots),
        nslots=len(slots),
        naive=sum(v.nbytes for v in roots),
    )
    params = "".join(f", x{i}" for i in range(len(graph.inputs)))
    body = "\n".join(f"    {line}" for line in gen.lines)
    forward = f"\n\ndef forward(w, b, nt{params}):\n{body}\n"
    tables = "".join(f'\n    w["{k}"] = {e}' for k, e in gen.derived_exprs.items()) or "\n    pass"
    prepare = (f'\n\ndef prepare(w):\n    """Add the derived constants to the weights w (once, at '
               f'construction)."""{tables}\n')
    bind = ""
    if gen.chains:
        tables = "".join(
            f'\n    w["_chain.{k}"] = KC.chain_table(['
            + "".join(f"\n        {fmt(tuple(layer))}," for layer in layers) + "\n    ])"
            for k, layers in enumerate(gen.chains))
        bind = (f'\n\ndef bind(w, b):\n    """Add the tables of the conv chains (their layers\' '
                f'arrays by address) to w, once the buffers b exist."""{tables}\n')
    return header + prepare + bind + forward + LOADER


class NumbaModel:
    """A compiled graph: generated ``source``, ``weights``, and the module that runs them.

    Attributes:
        source: the generated module (``model.py`` of a saved package).
        weights: name -> array, as stored in ``weights.npz``.
        peak_bytes: bytes of the activation arena (after buffer reuse).
    """

    def __init__(self, source: str, weights: dict[str, np.ndarray], module=None) -> None:
        self.source, self.weights = source, weights
        if module is None:
            module = types.ModuleType("slimgraph_numba_model")
            exec(compile(source, "<slimgraph numba model>", "exec"), module.__dict__)
        self.module = module
        self.model = module.runtime.Model(module, weights)
        self.peak_bytes = module.PEAK_BYTES

    def run(self, *arrays: np.ndarray) -> list[np.ndarray]:
        """Run on one array per graph input; returns the outputs (fresh arrays)."""
        return self.model.run(*arrays)

    __call__ = run

    def save(self, path: str | os.PathLike) -> Path:
        """Write a package folder (``__init__.py``, ``model.py``, kernel copies, ``weights.npz``)
        atomically: staged in a temporary folder beside ``path``, then renamed over it."""
        path = Path(path).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
        try:
            self._write_package(tmp)
            old = None
            if path.exists():
                old = path.parent / f".{path.name}.old-{os.getpid()}"
                os.replace(path, old)
            os.replace(tmp, path)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path

    def _write_package(self, folder: Path) -> None:
        (folder / "model.py").write_text(self.source)
        # the kernels travel as they are: one subpackage whose modules import each other relatively
        shutil.copytree(KERNELS, folder / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
        (folder / "__init__.py").write_text(PACKAGE_INIT)
        with open(folder / "weights.npz", "wb") as f:
            np.savez(f, **self.weights)


def compile_numba(graph: Graph, chains: bool = True) -> NumbaModel:
    """Generate, plan and load the numba forward of ``graph`` (the graph is not kept).

    Args:
        chains: run runs of consecutive convs in one parallel region each (:func:`chain_convs`).

    Raises:
        BackendError: a node's op or attribute pattern has no emitter.
    """
    import backends.numba.emitters  # noqa: F401  (registers the emitters)

    gen = generate(graph)
    if chains:
        chain_convs(gen)
    slots = plan_memory(gen.views, len(gen.lines) - 1)
    return NumbaModel(render(graph, gen, slots), gen.weights)


def load_numba(path: str | os.PathLike) -> NumbaModel:
    """Load a package written by :meth:`NumbaModel.save`.

    The package is imported under its folder's name (as ``import NAME`` would): numba's cache
    records the kernels' module names, so a cache written under one name is read under the same.
    Two packages with the same folder name cannot be loaded into one process.
    """
    path = Path(path).resolve()
    if not (path / "model.py").exists():
        raise BackendError(
            f"{path} is not a saved numba package",
            hint="pass the folder written by NumbaModel.save()",
        )
    name = re.sub(r"\W", "_", path.name)
    loaded = sys.modules.get(name)
    if loaded is not None and Path(getattr(loaded, "__file__", "")).parent != path:
        raise BackendError(
            f"another module named {name!r} is already imported",
            hint="give the saved package a folder name of its own",
        )
    if loaded is None:
        spec = importlib.util.spec_from_file_location(
            name, path / "__init__.py", submodule_search_locations=[str(path)]
        )
        loaded = importlib.util.module_from_spec(spec)
        sys.modules[name] = loaded
        spec.loader.exec_module(loaded)
    with np.load(path / "weights.npz") as f:
        weights = {k: f[k] for k in f.files}
    return NumbaModel((path / "model.py").read_text(), weights, module=loaded.model)
