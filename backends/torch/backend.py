"""Torch backend: an IR graph as a trainable ``nn.Module``, and a fine-tuned module back to the IR.

:func:`compile_torch` turns a :class:`~compiler.ir.graph.Graph` into a :class:`GraphModule` whose
weights are ``nn.Parameter``s, so a compressed model can be fine-tuned with any torch optimizer;
:func:`to_graph` returns the graph with the tuned weights. Each IR op runs through an entry of
:data:`EMITTERS` (``backends/torch/core.py``), keyed by the op table's names and registered by
``emitters.py`` (float ops), ``quant.py`` and ``codebook.py``, which this module imports; adding
an op is one ``@emitter("name")`` function.

Weights keep the names they have in the user's model (``layer1.0.conv1.weight``, on nested
submodules), so ``state_dict()`` reads like the original's; tensors a pass made get names beside
them (``conv1.bias`` for a folded batch norm's bias, ``conv1.weight_f0`` for a factor,
``conv1.weight_codebook``; ``backends/torch/names.py``). :meth:`GraphModule.user_state_dict`
gives the weights that still are the user's, keyed as the user's own module keys them.
:func:`save_torch` writes the module as a graph and a state dict that :func:`load_torch` reads
with ``torch.load(weights_only=True)``: no pickled code runs when loading.

In eval mode (the default) it computes exactly what the graph does. In training mode
(``.train()``), ``batch_norm`` nodes normalize with batch statistics and update their running
statistics (buffers), as ``nn.BatchNorm`` does, which keeps fine-tuning a pruned network stable;
``dropout`` stays the identity so fine-tuning is deterministic. Batch norms already folded into
convs by ``fuse`` are gone: prune (and fine-tune) before fusing to keep them.
"""

from __future__ import annotations

import math
import os
import pickle
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

# importing the emitter modules registers their entries in EMITTERS; GraphModule lives here, in
# the module that imports them all, so unpickling one (torch.load) brings the whole table too
from backends.batch import batch_attrs, batch_flow, with_batch
from backends.torch import quant  # noqa: F401
from backends.torch.codebook import unpack_indices
from backends.torch.core import EMITTERS, emitter, torch_dtype
from backends.torch.emitters import batch_norm_train
from backends.torch.names import ROLES, flat_name, is_user_tensor, place, state_key
from compiler.errors import BackendError, InputError, SlimgraphError
from compiler.ir.graph import Graph, Node, Value
from compiler.ir.serialize import graph_from_plain, graph_to_plain

# -- the module ------------------------------------------------------------------------------------


@dataclass
class _Step:
    """One node, resolved to slots of the value table that ``forward`` fills."""

    node: Node
    inputs: tuple[int | None, ...]
    outputs: tuple[int, ...]
    casts: tuple[torch.dtype | None, ...]  # IR dtype for integer/bool outputs, None for floats
    free: tuple[int, ...]  # slots read for the last time here


def _check_emitters(graph: Graph) -> None:
    """Every node has an emitter, and every fused activation a general one (at compile time, so
    a missing one is not found mid-forward)."""
    for node in graph.nodes:
        EMITTERS.lookup(node)  # raises a BackendError that says how to register one
        activation = node.attrs.get("activation") if node.op in ("conv2d", "linear") else None
        if activation is not None and EMITTERS.general(activation) is None:
            raise BackendError(
                f"the torch backend has no emitter for fused activation '{activation}' of op "
                f"'{node.op}'",
                node=node.name,
                op=node.op,
                source=node.source,
                hint=EMITTERS.register_hint(activation),
            )


def _running_stats(graph: Graph) -> set[int]:
    """Constants read only as batch_norm running mean/var: statistics, not weights to train."""
    return {
        id(v)
        for v in graph.constants()
        if v.uses and all(n.op == "batch_norm" and i in (3, 4) for n, i in v.uses)
    }


@dataclass
class _BatchPlan:
    """How a module runs a batch other than its traced one (plain data: it pickles)."""

    static: str  # why the graph keeps its traced batch ('' when it does not)
    attrs: list[tuple[str, int, int] | None]  # per step: the attribute naming the batch size
    repeats: list[tuple[tuple[int, ...], int | None]]  # per step: unbatched concat inputs, axis

    def adapt(self, i: int, attrs: dict, args: list, batch: int) -> tuple[dict, list]:
        """Step ``i``'s attributes and arguments for a run of ``batch`` samples."""
        if self.attrs[i] is not None:
            attrs = with_batch(attrs, self.attrs[i], batch)
        indices, axis = self.repeats[i]
        for k in indices:  # a class token: the same for every sample
            x = args[k]
            args[k] = x.expand(*[batch if d == axis else -1 for d in range(x.dim())])
        return attrs, args


def _plan_batches(graph: Graph) -> _BatchPlan:
    flow = batch_flow(graph)
    return _BatchPlan(
        static=flow.why_static(),
        attrs=[batch_attrs(n, flow) for n in graph.nodes],
        repeats=[
            (tuple(flow.repeats.get(id(n), ())), flow.axis(n.outputs[0])) for n in graph.nodes
        ],
    )


class GraphModule(nn.Module):
    """An IR graph run by torch, with its floating-point weights as trainable parameters.

    Every floating-point constant with more than one element becomes an ``nn.Parameter``, except
    batch_norm running statistics; the other constants (running statistics, integer indices,
    scalars) are buffers. Each is registered under its :func:`state_key`, on nested submodules
    (``module.layer1[0].conv1.weight``; ``getattr(module, "layer1.0.conv1.weight")`` works too).
    The module copies the graph's arrays, so training never changes the graph it was built from;
    :meth:`export_graph` returns a copy of the graph with the current weights.

    ``forward(*inputs)`` takes one tensor (or array) per graph input and returns a tensor, or a
    tuple for a graph with several outputs. The batch may differ from the traced one where the
    samples flow through the graph without mixing (``backends/batch.py``): the attributes that
    name the batch size (reshapes, expands, whole-batch slices) follow it. Where a node mixes
    them, another batch raises an ``InputError`` naming that node.

    Floating-point results keep the module's precision (after ``.double()``, for instance);
    integer and bool results are cast to the IR's dtype where torch's promotion differs (int sum).
    """

    def __init__(self, graph: Graph) -> None:
        super().__init__()
        _check_emitters(graph)
        self._graph = graph.clone()
        slots = {id(v): i for i, v in enumerate(self._graph.values())}
        self._input_slots = [slots[id(v)] for v in self._graph.inputs]
        self._output_slots = [slots[id(v)] for v in self._graph.outputs]
        self._const_slots = [slots[id(v)] for v in self._graph.constants()]
        self._num_slots = len(slots)
        first = self._graph.inputs[0].shape if self._graph.inputs else ()
        self._traced_batch = first[0] if first else None
        self._const_attrs = self._register_constants(self._graph)
        self._steps = self._plan(slots)
        self._batch = _plan_batches(self._graph)
        self.eval()

    def _register_constants(self, graph: Graph) -> list[str]:
        """Register each constant as a parameter or buffer; returns their dotted paths."""
        stats = _running_stats(graph)
        names = []
        for value in graph.constants():
            owner, leaf, path = place(self, state_key(value))
            tensor = torch.from_numpy(np.array(value.data, copy=True))
            if tensor.is_floating_point() and tensor.numel() > 1 and id(value) not in stats:
                owner.register_parameter(leaf, nn.Parameter(tensor))
            else:
                owner.register_buffer(leaf, tensor)
            names.append(path)
            # The clone needs only the constant's shape and dtype (export fills in the values): a
            # zero-stride placeholder keeps the module from holding a second copy of the weights.
            value.data = np.broadcast_to(np.zeros((), value.dtype), value.shape)
        return names

    def _plan(self, slots: dict[int, int]) -> list[_Step]:
        last_use: dict[int, int] = {}
        for i, node in enumerate(self._graph.nodes):
            for v in node.inputs:
                if v is not None:
                    last_use[slots[id(v)]] = i
        kept = set(self._output_slots) | set(self._const_slots)
        steps = []
        for i, node in enumerate(self._graph.nodes):
            ins = tuple(None if v is None else slots[id(v)] for v in node.inputs)
            free = {s for s in ins if s is not None and last_use[s] == i and s not in kept}
            casts = tuple(
                None if np.dtype(v.dtype).kind == "f" else torch_dtype(v.dtype)
                for v in node.outputs
            )
            steps.append(
                _Step(
                    node,
                    ins,
                    tuple(slots[id(v)] for v in node.outputs),
                    casts,
                    tuple(free),
                )
            )
        return steps

    def _bind_inputs(self, inputs: Sequence[Any]) -> list[torch.Tensor]:
        """Check the inputs against the graph's (all dims but the batch) and make them tensors."""
        values = self._graph.inputs
        if len(inputs) != len(values):
            raise InputError(
                f"graph '{self._graph.name}' takes {len(values)} input(s), got {len(inputs)}",
                hint="pass one tensor per graph input, in order: "
                + ", ".join(v.type_str() for v in values),
            )
        device = next((t.device for t in self.buffers()), None)
        device = next((p.device for p in self.parameters()), device)
        tensors = []
        for value, x in zip(values, inputs, strict=True):
            if not isinstance(x, torch.Tensor):
                x = torch.as_tensor(np.asarray(x, dtype=value.dtype), device=device)
            if x.dim() != len(value.shape) or tuple(x.shape[1:]) != value.shape[1:]:
                raise InputError(
                    f"input '{value.name}' expects shape {value.shape} (any batch), "
                    f"got {tuple(x.shape)}",
                    hint="compile again from a graph traced with inputs of this shape",
                )
            tensors.append(x)
        return tensors

    def forward(self, *inputs: Any) -> torch.Tensor | tuple[torch.Tensor, ...]:
        env: list[Any] = [None] * self._num_slots
        for slot, tensor in zip(self._input_slots, self._bind_inputs(inputs), strict=True):
            env[slot] = tensor
        for slot, path in zip(self._const_slots, self._const_attrs, strict=True):
            env[slot] = self._constant(path)
        batch = env[self._input_slots[0]].shape[0] if self._traced_batch is not None else None
        plan = None
        if batch != self._traced_batch:
            plan = self._batch_plan()
            if plan.static:
                raise InputError(
                    f"graph '{self._graph.name}' runs only at the batch it was traced with "
                    f"({self._traced_batch}), got {batch}: {plan.static}",
                    hint=f"run batches of {self._traced_batch}, or trace with example inputs of "
                    "the batch you will run",
                )
        for i, step in enumerate(self._steps):
            attrs = step.node.attrs
            args = [None if s is None else env[s] for s in step.inputs]
            if plan is not None:
                attrs, args = plan.adapt(i, attrs, args, batch)
            if self.training and step.node.op == "batch_norm":
                results = (batch_norm_train(*args, **attrs),)
            else:
                results = self._run_step(step, args, attrs)
            for slot, result, cast in zip(step.outputs, results, step.casts, strict=True):
                env[slot] = result if cast is None or result.dtype == cast else result.to(cast)
            for slot in step.free:
                env[slot] = None
        outputs = tuple(env[s] for s in self._output_slots)
        return outputs[0] if len(outputs) == 1 else outputs

    def _batch_plan(self) -> _BatchPlan:
        plan = self.__dict__.get("_batch")
        if plan is None:  # a module pickled before the plan existed
            plan = self.__dict__["_batch"] = _plan_batches(self._graph)
        return plan

    def _constant(self, path: str) -> torch.Tensor:
        """The parameter or buffer at dotted ``path`` (one of :attr:`_const_attrs`)."""
        owner: nn.Module = self
        *mods, leaf = path.split(".")
        for part in mods:
            owner = owner._modules[part]
        return getattr(owner, leaf)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            # a dotted path, getattr(module, "layer1.0.conv1.weight"), or the flat name earlier
            # versions registered a constant under (module.layer1_0_conv1_weight)
            path = name if "." in name else self._legacy_names().get(name)
            if path is None:
                raise
            try:
                return self._constant(path)
            except (KeyError, AttributeError):
                raise AttributeError(f"'GraphModule' object has no attribute '{name}'") from None

    def _legacy_names(self) -> dict[str, str]:
        names = self.__dict__.get("_flat_names")
        if names is None and "_const_attrs" in self.__dict__:  # (not while constructing)
            names = self.__dict__["_flat_names"] = {
                flat_name(v.name, nn.Module()): path
                for v, path in zip(self._graph.constants(), self._const_attrs, strict=True)
            }
        return names or {}

    @staticmethod
    def _run_step(step: _Step, args: list[Any], attrs: dict[str, Any]) -> Sequence[torch.Tensor]:
        try:
            # Looked up per call, not stored, so the module pickles (torch.save) with lambdas here.
            result = EMITTERS.lookup(step.node)(*args, **attrs)
        except SlimgraphError:
            raise
        except Exception as e:
            node = step.node
            raise BackendError(
                f"torch failed to run the node: {e}",
                node=node.name,
                op=node.op,
                source=node.source,
                hint="check the input shapes and dtypes against the graph's, and the emitter in "
                "backends.torch.backend.EMITTERS for this op",
            ) from e
        return result if isinstance(result, (tuple, list)) else (result,)

    def export_graph(self) -> Graph:
        """A copy of the compiled graph whose constants hold this module's current values."""
        graph = self._graph.clone()
        for value, name in zip(graph.constants(), self._const_attrs, strict=True):
            tensor = self._constant(name).detach().to("cpu", torch_dtype(value.dtype))
            if tuple(tensor.shape) != value.shape:
                raise BackendError(
                    f"module attribute '{name}' has shape {tuple(tensor.shape)}, but constant "
                    f"'{value.name}' has shape {value.shape}",
                    hint="change shapes with IR passes, then compile again; the torch module "
                    "only tunes values",
                )
            value.data = tensor.numpy().copy()  # a copy: later training must not reach the graph
        return graph

    def save(self, path: str | os.PathLike) -> Path:
        """Write the module as :func:`save_torch` does (load it with :func:`load_torch`)."""
        return save_torch(self, path)

    def user_state_dict(self, strict: bool = True) -> dict[str, torch.Tensor]:
        """The weights that are still the user's, keyed as the user's own model keys them.

        A model compressed without changing what its tensors mean (pruned, refit, equalized:
        narrower, not rewritten) loads them into a fresh instance of the user's class built with
        the new widths: ``MyNet(widths=...).load_state_dict(module.user_state_dict())``. Batch
        norms get ``num_batches_tracked`` 0 (an eval-mode graph never reads it).

        Args:
            strict: raise when a layer's tensors are no longer the user's (a batch norm folded
                into a conv, a factorized, shared or quantized weight); False leaves them out.

        Raises:
            BackendError: with ``strict``, naming each such layer.
        """
        changed: dict[str, str] = {}  # layer -> how it is no longer the user's
        for node in self._graph.nodes:
            roles = ROLES.get(node.op, ())
            layer = node.source or node.name
            folded = [f"{op} '{src}'" for op, src in node.meta.get("fused", ()) if op in ROLES]
            if folded:
                changed.setdefault(layer, f"{', '.join(folded)} folded into it")
            for value, role in zip(node.inputs[1:], roles):
                if value is not None and not is_user_tensor(value):
                    changed.setdefault(layer, f"its {role} is new ({_made_by(value)})")
        if changed and strict:
            shown = "; ".join(f"{k}: {v}" for k, v in list(changed.items())[:5])
            more = f"; and {len(changed) - 5} more" if len(changed) > 5 else ""
            raise BackendError(
                f"{len(changed)} layer(s) of this graph are no longer the user's model's: "
                f"{shown}{more}",
                hint="compress without the passes that rewrite layers (fuse's fold-batch-norm, "
                "factorize-rank, share-weights, quantize) to keep the model's structure, or "
                "call user_state_dict(strict=False) for the tensors that still are its own",
            )
        out: dict[str, torch.Tensor] = {}
        for value, path in zip(self._graph.constants(), self._const_attrs, strict=True):
            readers = [n for n, _ in value.uses]
            if not is_user_tensor(value) or any((n.source or n.name) in changed for n in readers):
                continue
            out[value.name] = self._constant(path).detach()
            if value.name.endswith(".running_var") and any(n.op == "batch_norm" for n in readers):
                tracked = value.name.removesuffix("running_var") + "num_batches_tracked"
                out[tracked] = torch.tensor(0)
        return out

    def extra_repr(self) -> str:
        return f"graph='{self._graph.name}', nodes={len(self._graph.nodes)}"


def _made_by(value: Value) -> str:
    if value.producer is not None:
        return f"computed by {value.producer.op} '{value.producer.name}'"
    return f"constant '{value.name}'"


def compile_torch(graph: Graph) -> GraphModule:
    """Compile ``graph`` to a trainable :class:`GraphModule` (the graph is copied, not kept).

    Raises:
        BackendError: a node's op (or fused activation) has no emitter in :data:`EMITTERS`.
    """
    return GraphModule(graph)


# -- saving and loading: a graph and a state dict, no pickled code --------------------------------

FORMAT = "slimgraph.torch/1"


def save_torch(module: GraphModule, path: str | os.PathLike) -> Path:
    """Write ``module`` to ``path`` (a ``.pt`` file) atomically, as plain data that
    ``torch.load(path, weights_only=True)`` reads: ``{"format", "graph", "constants",
    "state_dict"}``, the graph without its arrays (``compiler.ir.serialize``), each constant's
    state-dict key, and the weights as ``state_dict()`` keys them. :func:`load_torch` makes the
    module again."""
    payload = {
        "format": FORMAT,
        "graph": graph_to_plain(module._graph),
        "constants": {
            v.name: key
            for v, key in zip(module._graph.constants(), module._const_attrs, strict=True)
        },
        "state_dict": {k: t.detach().cpu() for k, t in module.state_dict().items()},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(payload, tmp)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp's 0600 -> the mode of any new file of the user's
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def load_torch(path: str | os.PathLike, map_location: Any = "cpu") -> GraphModule:
    """The module :func:`save_torch` wrote to ``path``, read with ``weights_only=True``.

    Raises:
        BackendError: the file is not one :func:`save_torch` wrote (a file from slimgraph
            before this format holds a pickled module: the message says how to load one you
            trust).
    """
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise BackendError(
            f"{path} holds pickled Python objects, not the plain data of a slimgraph torch file",
            hint="a .pt written by slimgraph before it saved graphs holds a pickled module: "
            "only if you trust the file, load it with torch.load(path, weights_only=False) "
            "and save it again with backends.torch.backend.save_torch",
        ) from e
    except Exception as e:
        raise BackendError(
            f"cannot read {path}: {type(e).__name__}: {e}",
            hint="pass a file written by CompiledModel.save or save_torch",
        ) from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise BackendError(
            f"{path} is not a slimgraph torch file (no format {FORMAT!r})",
            hint="pass a file written by CompiledModel.save or save_torch",
        )
    state, keys = payload["state_dict"], payload["constants"]
    # in the graph's dtypes (a module saved after .double() holds float64 tensors)
    dtypes = {v["name"]: v["dtype"] for v in payload["graph"]["values"] if v["kind"] == "constant"}
    graph = graph_from_plain(
        payload["graph"],
        lambda name: state[keys[name]].detach().cpu().to(torch_dtype(dtypes[name])).numpy(),
    )
    module = GraphModule(graph)  # its tensors are the graph's constants: the saved values
    return module.to(next(iter(state.values())).device) if state else module


def to_graph(module: GraphModule) -> Graph:
    """Return ``module``'s graph with its current (e.g. fine-tuned) weights as numpy constants."""
    return module.export_graph()


def mean_centroid_gradients(module: GraphModule) -> list[Any]:
    """Divide each shared weight's centroid gradients by the centroid's member count.

    A codebook's gradient is the sum over the weights that share each centroid, so an SGD step on
    it grows with the members per centroid (on ResNet-56, plain SGD at lr 1e-4 diverged at 5 bits,
    not at 8). With this hook a centroid moves as far as one of its weights would, so the learning
    rate of dense weights applies. Returns the hook handles (``handle.remove()`` undoes it).
    """
    attrs = {
        id(v): name for v, name in zip(module._graph.constants(), module._const_attrs, strict=True)
    }
    handles = []
    for node in module._graph.find("codebook_lookup"):
        codebook = module._constant(attrs[id(node.inputs[0])])
        if not codebook.requires_grad:  # an int8 codebook (quantized after sharing) is fixed
            continue
        indices = module._constant(attrs[id(node.inputs[1])])
        groups, k = codebook.shape
        index = unpack_indices(indices, node.attrs["bits"], math.prod(node.attrs["shape"]))
        group = torch.arange(groups, device=index.device).repeat_interleave(index.numel() // groups)
        members = torch.bincount(index + group * k, minlength=groups * k).reshape(groups, k)
        scale = 1.0 / members.clamp(min=1).to(codebook.dtype)
        handles.append(codebook.register_hook(lambda grad, scale=scale: grad * scale.to(grad)))
    return handles


__all__ = [
    "EMITTERS",
    "GraphModule",
    "compile_torch",
    "emitter",
    "load_torch",
    "mean_centroid_gradients",
    "save_torch",
    "to_graph",
    "torch_dtype",
]
