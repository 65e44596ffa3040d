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

Each op is emitted by entries of :data:`EMITTERS` (``backends/numba/core.py``) keyed by the op
table's names: the float emitters (``emitters.py``), the quantization ops and integer kernels
(``quant.py``) and the shared weights (``codebook.py``), each entry chosen by a pattern on the
node. Where a shape pattern has no kernel (a broadcast or permutation needing more than 4 merged
axes, einsum, a runtime attention mask) the line calls numpy instead; those lines read ``np.``.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import sys
import tempfile
import types
from pathlib import Path

import numpy as np

# the emitter modules register their entries in EMITTERS when imported; this entry module is
# what imports them all, so the table is complete wherever compile_numba can be called
from backends.batch import batch_flow
from backends.numba import codebook, emitters, quant  # noqa: F401
from backends.numba.core import EMITTERS, Codegen, View, emitter, fmt, generate
from compiler.errors import BackendError
from compiler.ir.graph import Graph, Node

__all__ = ["EMITTERS", "NumbaModel", "compile_numba", "emitter", "load_numba", "plan_memory"]

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
            gen.lines[first] = (
                f'KC.run_chain(w["_chain.{k}"], nt)  # the {len(run)} convs '
                f"below, in one parallel region\n    {gen.lines[first]}"
            )
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
# Other batches than the compiled one (axis 0 of INPUTS) run in chunks of it: per output, the
# (axis, outer, inner) that holds the batch (None: the output has none); None where the graph
# mixes the samples (STATIC_BATCH says where).
BATCH = {batch!r}
STATIC_BATCH = {static!r}
'''


def render(graph: Graph, gen: Codegen, slots: list[int]) -> str:
    """The generated module's source: header constants, forward(), then the shared runtime."""
    roots = [v for v in gen.views if v.root is None]
    flow = batch_flow(graph)
    header = HEADER.format(
        batch=tuple(flow.batch(v) for v in graph.outputs) if flow.dynamic else None,
        static=flow.why_static(),
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
    prepare = (
        f'\n\ndef prepare(w):\n    """Add the derived constants to the weights w (once, at '
        f'construction)."""{tables}\n'
    )
    bind = ""
    if gen.chains:
        tables = "".join(
            f'\n    w["_chain.{k}"] = KC.chain_table(['
            + "".join(f"\n        {fmt(tuple(layer))}," for layer in layers)
            + "\n    ])"
            for k, layers in enumerate(gen.chains)
        )
        bind = (
            f'\n\ndef bind(w, b):\n    """Add the tables of the conv chains (their layers\' '
            f'arrays by address) to w, once the buffers b exist."""{tables}\n'
        )
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
        self.input_error = module.runtime.InputError  # what run() raises for wrong inputs

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
            # mkdtemp makes the folder 0700; the package gets the mode of any new folder
            mask = os.umask(0)
            os.umask(mask)
            os.chmod(tmp, 0o777 & ~mask)
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
