"""The entry point: ``compile(model, example_inputs, passes=[...], backend=...)``."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

import passes as _builtin_passes  # noqa: F401  (adds the built-in passes, loaded on first lookup)
from compiler.errors import InputError, OptionError
from compiler.ir.graph import Graph
from compiler.ir.inputs import _to_numpy, calibration_inputs
from compiler.pass_manager import (
    Pass,
    PassContext,
    PassManager,
    pass_context,
    resolve_passes,
    set_pass_context,
)
from compiler.report import Report

BACKENDS = ("torch", "onnx", "numba")
__all__ = [
    "BACKENDS",
    "CompiledModel",
    "atomic_write",
    "calibration_inputs",
    "compile",
    "load",
]


def _torch_module(graph: Graph) -> Any:
    from backends.torch.backend import compile_torch

    return compile_torch(graph)


# The API is the composition root: it lends passes that run the model (Taylor scores, layer
# sensitivity) a torch module builder, so no pass imports a backend.
set_pass_context(PassContext(torch_module=_torch_module))


def _backend_compiler(backend: str) -> Callable[[Graph], Any]:
    if backend == "torch":
        from backends.torch.backend import compile_torch

        return compile_torch
    if backend == "onnx":
        from backends.onnx.backend import compile_onnx

        return compile_onnx
    if backend == "numba":
        try:
            from backends.numba.backend import compile_numba
        except ImportError as e:  # numba (or its llvmlite) missing or broken in this environment
            raise OptionError(
                f"the numba backend cannot be imported: {e}",
                hint="pip install numba (it is a dependency of slimgraph), or use "
                "backend='torch' or backend='onnx'",
            ) from e
        return compile_numba
    raise OptionError(f"unknown backend {backend!r}", hint=f"use one of {BACKENDS}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers never see a half-written file."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=folder)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes the file 0600; the artifact gets the mode any new file of the user's gets
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class CompiledModel:
    """What :func:`compile` returns.

    Attributes:
        graph: the compressed IR graph.
        report: per-pass statistics (params, MACs, weight bytes, seconds, max deviation).
        backend: the backend's name.
        artifact: the backend's object (a torch ``nn.Module``, an ``OnnxModel``, ...).
    """

    def __init__(self, graph: Graph, report: Report, backend: str, artifact: Any) -> None:
        self.graph, self.report, self.backend, self.artifact = graph, report, backend, artifact

    def __call__(self, *inputs: Any) -> Any:
        """Run on torch tensors or numpy arrays; returns the same kind (a tuple if several).

        The batch may differ from the example input's where the graph lets the samples flow
        through without mixing (``docs/backends.md``, "Any batch")."""
        use_torch = any(hasattr(x, "detach") for x in inputs)
        arrays = [_to_numpy(x) for x in inputs]
        if self.backend == "torch":
            import torch

            with torch.no_grad():
                outs = self.artifact(*[torch.as_tensor(x) for x in arrays])
            outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
            outs = [o.numpy() for o in outs]
        else:  # the artifact checks its inputs (the batch is free where the graph allows)
            try:
                outs = self.artifact.run(*arrays)
            except getattr(self.artifact, "input_error", ()) as e:  # a numba package's own
                text, _, fix = str(e).partition(" Fix: ")
                raise InputError(text, hint=fix or None) from e
        if use_torch:
            import torch

            outs = [torch.from_numpy(np.asarray(o)) for o in outs]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def save(self, path: str | os.PathLike) -> None:
        """Write the backend's artifact atomically: an ``.onnx`` file, a numba package folder,
        or a ``.pt`` file holding the graph and a state dict, which :func:`load` reads without
        unpickling code (``docs/backends.md``, "Saving and loading")."""
        self.artifact.save(path)

    def to_torch(self):
        """A trainable ``nn.Module`` of the compressed graph, for fine-tuning.

        Its parameters and buffers keep the user's module paths (``layer1.0.conv1.weight``);
        tensors made by passes are named beside them (``backends/torch/names.py``)."""
        from backends.torch.backend import compile_torch

        return compile_torch(self.graph)

    def user_state_dict(self, strict: bool = True) -> dict:
        """The compressed weights keyed as the user's own model keys them, for loading into a
        fresh instance of the user's class with the new widths (a pruned, unfused model):
        ``MyNet(widths=...).load_state_dict(compiled.user_state_dict())``.

        Args:
            strict: raise (a ``BackendError`` naming the layers) when some tensors are no
                longer the model's own (a folded batch norm, factorized, shared or quantized
                weights); False returns those that are.
        """
        return self.to_torch().user_state_dict(strict=strict)

    def __repr__(self) -> str:
        return f"<CompiledModel backend={self.backend}>\n{self.report}"


def load(path: str | os.PathLike, **options: Any) -> Any:
    """Load a saved artifact, running no pickled code: a ``.pt`` file written by ``save`` (a
    trainable ``GraphModule``; ``map_location=`` as for ``torch.load``), an ``.onnx`` file (an
    ``OnnxModel``; ``threads=``) or a numba package folder (a ``NumbaModel``).

    Raises:
        InputError: the path does not exist or is none of these.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        from backends.numba.backend import load_numba

        return load_numba(path, **options)
    if not os.path.isfile(path):
        raise InputError(f"{path} does not exist", hint="pass a file or folder written by save()")
    if path.endswith(".onnx"):
        from backends.onnx.backend import OnnxModel

        return OnnxModel.load(path, **options)
    if path.endswith((".pt", ".pth")):
        from backends.torch.backend import load_torch

        return load_torch(path, **options)
    raise InputError(
        f"cannot tell what {path} holds from its name",
        hint="load a .pt, .onnx or numba package folder written by CompiledModel.save",
    )


def _to_graph(model: Any, example_inputs: Any) -> Graph:
    """A private graph to rewrite: a copy of a given Graph, or a fresh trace of a torch model."""
    if isinstance(model, Graph):
        return model.clone()
    if example_inputs is None:
        raise InputError(
            "compile() needs example_inputs to trace a torch model",
            hint="pass e.g. torch.randn(1, 3, 224, 224)",
        )
    from compiler.frontend import trace

    return trace(model, example_inputs)


def _check_inputs(graph: Graph, example_inputs: Any) -> list[np.ndarray]:
    """The arrays each pass's outputs are compared on (seeded random when none are given)."""
    if example_inputs is None:
        rng = np.random.default_rng(0)
        return [rng.standard_normal(v.shape).astype(v.dtype) for v in graph.inputs]
    ex = example_inputs if isinstance(example_inputs, (list, tuple)) else [example_inputs]
    return [_to_numpy(x) for x in ex]


def check_passes(passes: Any, has_data: bool) -> list[Pass]:
    """Resolve ``passes`` and check what can be checked before any work: names, options, and that
    every pass needing calibration data gets some."""
    resolved = resolve_passes(passes)
    if not has_data:
        for p in resolved:
            missing = p.missing_data()
            if missing:
                raise OptionError(
                    f"pass '{p.name}': {missing}",
                    hint="pass compile(..., calibration_data=[x1, x2, ...]) (the CLI's "
                    "--calibration FILE.npy), or the pass's own calibration_data=",
                )
    return resolved


def _with_calibration(passes: Sequence[Any], data: list[np.ndarray] | None) -> list[Pass]:
    """Pass instances; each dataclass pass with a ``calibration_data`` field left at None gets a
    copy with ``data`` (the user's instance is not changed)."""
    instances = resolve_passes(passes)
    if data is None:
        return instances
    out = []
    for p in instances:
        names = {f.name for f in dataclasses.fields(p)} if dataclasses.is_dataclass(p) else set()
        if "calibration_data" in names and p.calibration_data is None:
            p = dataclasses.replace(p, calibration_data=data)
        out.append(p)
    return out


def compile(  # noqa: A001 - the entry point's name is part of the user's design
    model: Any,
    example_inputs: Sequence[Any] | Any = None,
    passes: str | Sequence[str | Pass | type[Pass]] = (),
    backend: str = "torch",
    *,
    check: bool = True,
    tolerance: float = 1e-4,
    progress: bool = False,
    calibration_data: Any = None,
) -> CompiledModel:
    """Trace ``model``, run ``passes`` with verification and numeric checks, and emit ``backend``.

    Args:
        model: a ``torch.nn.Module`` (never modified) or an IR ``Graph`` (copied).
        example_inputs: a tensor/array or a tuple of them; fixes the static input shapes and is
            what each pass's output is compared on.
        passes: pass names, presets (e.g. ``"fuse"``), pass classes or configured instances;
            or one string, a comma-separated list as the CLI's ``--passes`` takes.
        backend: ``"torch"``, ``"onnx"`` or ``"numba"``.
        check: compare outputs before and after every pass (exact passes must match within
            ``tolerance``; lossy passes record their deviation in the report).
        tolerance: relative tolerance for exact passes.
        progress: print a progress bar over the passes.
        calibration_data: an iterable of example inputs (see :func:`calibration_inputs`) for
            passes that learn from data (``quantize``, data-driven pruning criteria): every
            pass with a ``calibration_data`` option left at None receives it.

    Returns:
        A :class:`CompiledModel`.
    """
    # everything that can be checked without the model is checked before tracing (seconds)
    _backend_compiler(backend)
    passes = check_passes(passes, has_data=calibration_data is not None)
    graph = _to_graph(model, example_inputs)
    inputs = _check_inputs(graph, example_inputs) if check else None
    calib = None if calibration_data is None else calibration_inputs(graph, calibration_data)
    passes = _with_calibration(passes, calib)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(passes), desc="passes", unit="pass")
    # ``bar is not None``, never ``if bar``: a tqdm's truth is its length, which raises for a bar
    # without a total and is 0 (False) for a bar that has not counted yet.
    manager = PassManager(
        passes=passes,
        example_inputs=inputs,
        tolerance=tolerance,
        progress=(lambda name: (bar.set_postfix_str(name), bar.update()))
        if bar is not None
        else None,
    )
    outer = pass_context()
    set_pass_context(dataclasses.replace(outer, progress=progress))
    try:
        manager.run(graph)
    finally:
        set_pass_context(outer)
        if bar is not None:
            bar.close()
    artifact = _backend_compiler(backend)(graph)
    return CompiledModel(graph, manager.report, backend, artifact)


def compare_latency(model: Any, compiled: CompiledModel, example: Any, repeats: int = 20) -> dict:
    """Median latency of the original torch model (eager, ``no_grad``) and of ``compiled`` on
    ``example``, measured in alternating blocks of 4 calls so that drift on a busy machine hits
    both alike (after one warm-up call each).

    Returns:
        ``{"original_ms", "compiled_ms", "ratio", "repeats", "backend"}``; ratio < 1: faster.
    """
    import statistics
    import time

    import torch

    inputs = example if isinstance(example, (tuple, list)) else (example,)

    def original() -> None:
        with torch.no_grad():
            model(*inputs)

    def emitted() -> None:
        compiled(*inputs)

    times: dict[str, list[float]] = {"original": [], "compiled": []}
    for fn in (original, emitted):
        fn()
    while len(times["compiled"]) < repeats:
        for key, fn in (("original", original), ("compiled", emitted)):
            for _ in range(4):
                start = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - start)
    med = {k: 1000 * statistics.median(v) for k, v in times.items()}
    return {
        "original_ms": med["original"],
        "compiled_ms": med["compiled"],
        "ratio": med["compiled"] / med["original"],
        "repeats": len(times["compiled"]),
        "backend": compiled.backend,
    }
