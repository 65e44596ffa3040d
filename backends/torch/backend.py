"""Torch backend: an IR graph as a trainable ``nn.Module``, and a fine-tuned module back to the IR.

:func:`compile_torch` turns a :class:`~compiler.ir.graph.Graph` into a :class:`GraphModule` whose
weights are ``nn.Parameter``s, so a compressed model can be fine-tuned with any torch optimizer;
:func:`to_graph` returns the graph with the tuned weights. Each IR op runs through an entry of
:data:`EMITTERS` (``backends/torch/core.py``), keyed by the op table's names and registered by
``emitters.py`` (float ops), ``quant.py`` and ``codebook.py``, which this module imports; adding
an op is one ``@emitter("name")`` function.

In eval mode (the default) it computes exactly what the graph does. In training mode
(``.train()``), ``batch_norm`` nodes normalize with batch statistics and update their running
statistics (buffers), as ``nn.BatchNorm`` does, which keeps fine-tuning a pruned network stable;
``dropout`` stays the identity so fine-tuning is deterministic. Batch norms already folded into
convs by ``fuse`` are gone: prune (and fine-tune) before fusing to keep them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

# importing the emitter modules registers their entries in EMITTERS; GraphModule lives here, in
# the module that imports them all, so unpickling one (torch.load) brings the whole table too
from backends.torch import quant  # noqa: F401
from backends.torch.codebook import unpack_indices
from backends.torch.core import EMITTERS, emitter, torch_dtype
from backends.torch.emitters import batch_norm_train
from compiler.errors import BackendError, InputError, SlimgraphError
from compiler.ir.graph import Graph, Node

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


def _attr_name(value_name: str, module: nn.Module, taken: set[str]) -> str:
    """A readable, unique attribute name: 'layer1.0.conv.weight' -> 'layer1_0_conv_weight'."""
    base = re.sub(r"\W", "_", value_name) or "const"
    if base[0].isdigit():
        base = f"c_{base}"
    name, i = base, 1
    while name in taken or hasattr(module, name):
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


def _expand_to_batch(attrs: dict[str, Any], traced: int, batch: int) -> dict[str, Any]:
    """An expand to the traced batch expands to the runtime batch instead (class tokens)."""
    shape = attrs["shape"]
    if not shape or shape[0] != traced:
        return attrs
    return {**attrs, "shape": (batch, *shape[1:])}


class GraphModule(nn.Module):
    """An IR graph run by torch, with its floating-point weights as trainable parameters.

    Every floating-point constant with more than one element becomes an ``nn.Parameter`` named
    after its IR value (dots become underscores), except batch_norm running statistics; the other
    constants (running statistics, integer indices, scalars) are buffers. The module copies the
    graph's arrays, so training never changes the graph it was built from; :meth:`export_graph`
    returns a copy of the graph with the current weights.

    ``forward(*inputs)`` takes one tensor (or array) per graph input and returns a tensor, or a
    tuple for a graph with several outputs. The batch may differ from the traced one: a ``reshape``
    lets its leading dim absorb it, and an ``expand`` whose leading target dim equals the traced
    batch (the batch of the first graph input) expands to the runtime batch instead. Other attrs
    that name a batch-sized extent (a slice or split along axis 0) stay static.

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
        self.eval()

    def _register_constants(self, graph: Graph) -> list[str]:
        stats = _running_stats(graph)
        taken: set[str] = set()
        names = []
        for value in graph.constants():
            name = _attr_name(value.name, self, taken)
            tensor = torch.from_numpy(np.array(value.data, copy=True))
            if tensor.is_floating_point() and tensor.numel() > 1 and id(value) not in stats:
                self.register_parameter(name, nn.Parameter(tensor))
            else:
                self.register_buffer(name, tensor)
            names.append(name)
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
        for slot, name in zip(self._const_slots, self._const_attrs, strict=True):
            env[slot] = getattr(self, name)
        batch = env[self._input_slots[0]].shape[0] if self._traced_batch is not None else None
        for step in self._steps:
            attrs = step.node.attrs
            if step.node.op == "expand" and batch != self._traced_batch:
                attrs = _expand_to_batch(attrs, self._traced_batch, batch)
            args = [None if s is None else env[s] for s in step.inputs]
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
            tensor = getattr(self, name).detach().to("cpu", torch_dtype(value.dtype))
            if tuple(tensor.shape) != value.shape:
                raise BackendError(
                    f"module attribute '{name}' has shape {tuple(tensor.shape)}, but constant "
                    f"'{value.name}' has shape {value.shape}",
                    hint="change shapes with IR passes, then compile again; the torch module "
                    "only tunes values",
                )
            value.data = tensor.numpy().copy()  # a copy: later training must not reach the graph
        return graph

    def extra_repr(self) -> str:
        return f"graph='{self._graph.name}', nodes={len(self._graph.nodes)}"


def compile_torch(graph: Graph) -> GraphModule:
    """Compile ``graph`` to a trainable :class:`GraphModule` (the graph is copied, not kept).

    Raises:
        BackendError: a node's op (or fused activation) has no emitter in :data:`EMITTERS`.
    """
    return GraphModule(graph)


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
        codebook = getattr(module, attrs[id(node.inputs[0])])
        if not codebook.requires_grad:  # an int8 codebook (quantized after sharing) is fixed
            continue
        indices = getattr(module, attrs[id(node.inputs[1])])
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
    "mean_centroid_gradients",
    "to_graph",
    "torch_dtype",
]
