"""Torch backend: an IR graph as a trainable ``nn.Module``, and a fine-tuned module back to the IR.

:func:`compile_torch` turns a :class:`~compiler.ir.graph.Graph` into a :class:`GraphModule` whose
weights are ``nn.Parameter``s, so a compressed model can be fine-tuned with any torch optimizer;
:func:`to_graph` returns the graph with the tuned weights. Each IR op runs through one small emitter
in :data:`EMITTERS`, keyed by the op table's names; adding an op is one ``@emitter("name")``
function.

In eval mode (the default) it computes exactly what the graph does. In training mode
(``.train()``), ``batch_norm`` nodes normalize with batch statistics and update their running
statistics (buffers), as ``nn.BatchNorm`` does, which keeps fine-tuning a pruned network stable;
``dropout`` stays the identity so fine-tuning is deterministic. Batch norms already folded into
convs by ``fuse`` are gone: prune (and fine-tune) before fusing to keep them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from compiler.errors import BackendError, InputError, SlimgraphError
from compiler.ir.graph import Graph, Node

Emitter = Callable[..., Any]

#: IR op name -> ``fn(*tensors, **attrs)`` (``None`` for an omitted optional input), returning a
#: tensor or a tuple of tensors, exactly like the op table's reference implementation.
EMITTERS: dict[str, Emitter] = {}


def emitter(*names: str) -> Callable[[Emitter], Emitter]:
    """Decorator registering ``fn`` as the torch emitter of the IR ops ``names``."""

    def wrap(fn: Emitter) -> Emitter:
        for name in names:
            EMITTERS[name] = fn
        return fn

    return wrap


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a numpy dtype name ('float32' -> torch.float32)."""
    return torch.from_numpy(np.empty(0, dtype=name)).dtype


# -- elementwise -----------------------------------------------------------------------------------

# Ops without attributes map straight onto a torch function.
EMITTERS.update(
    {
        "relu": F.relu,
        "hardswish": F.hardswish,
        "hardsigmoid": F.hardsigmoid,
        "silu": F.silu,
        "sigmoid": torch.sigmoid,
        "tanh": torch.tanh,
        "neg": torch.neg,
        "exp": torch.exp,
        "sqrt": torch.sqrt,
        "rsqrt": torch.rsqrt,
        "abs": torch.abs,
        "log": torch.log,
        "add": torch.add,
        "sub": torch.sub,
        "mul": torch.mul,
        "div": torch.div,  # true division, like numpy
        "pow": torch.pow,
        "maximum": torch.maximum,
        "minimum": torch.minimum,
        "eq": torch.eq,
        "ne": torch.ne,
        "lt": torch.lt,
        "gt": torch.gt,
        "matmul": torch.matmul,
        "concat": lambda *xs, axis: torch.cat(xs, dim=axis),
        "einsum": lambda *xs, equation: torch.einsum(equation, *xs),
        "softmax": lambda x, *, axis: F.softmax(x, dim=axis),
        "log_softmax": lambda x, *, axis: F.log_softmax(x, dim=axis),
        "identity": lambda x, *, origin: x,
        "dropout": lambda x, *, p: x,  # eval-mode semantics, see the module docstring
        "permute": lambda x, *, perm: x.permute(*perm),
        "cast": lambda x, *, dtype: x.to(torch_dtype(dtype)),
        "where": lambda cond, a, b: torch.where(cond.bool(), a, b),
        "gelu": lambda x, *, approximate: F.gelu(x, approximate=approximate),
    }
)


@emitter("clip")
def _clip(x, *, min_val, max_val):
    if min_val is None and max_val is None:
        return x  # torch.clamp refuses two missing bounds; numpy returns x
    return torch.clamp(x, min_val, max_val)


# -- data movement ---------------------------------------------------------------------------------


@emitter("reshape")
def _reshape(x, *, shape):
    # The attr holds the traced shape; a different runtime batch is absorbed by the leading dim.
    if x.numel() != math.prod(shape) and shape:
        shape = (-1, *shape[1:])
    return x.reshape(shape)


@emitter("expand")
def _expand(x, *, shape):
    # Dims that x already has (size != 1) keep their runtime size, so a batch that differs from the
    # traced one passes through; GraphModule.forward fixes the leading dim of size-1 inputs.
    offset = len(shape) - x.dim()
    sizes = [-1 if i >= offset and x.shape[i - offset] != 1 else d for i, d in enumerate(shape)]
    return x.expand(sizes)


@emitter("slice")
def _slice(x, *, axis, start, end, step):
    index = [slice(None)] * x.dim()
    index[axis] = slice(start, end, step)
    return x[tuple(index)]


@emitter("split")
def _split(x, *, axis, sizes):
    return tuple(torch.split(x, list(sizes), dim=axis))


@emitter("pad")
def _pad(x, *, pads, value):
    # IR: (before, after) per axis, outermost first; F.pad wants them innermost first. Both crop
    # for negative amounts.
    flat = [amount for before, after in reversed(pads) for amount in (before, after)]
    return F.pad(x, flat, value=value)


@emitter("roll")
def _roll(x, *, shifts, axes):
    as_tuple = lambda v: tuple(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
    return torch.roll(x, as_tuple(shifts), as_tuple(axes))


@emitter("take")
def _take(x, indices, *, axis):
    # Advanced indexing is numpy.take for one index tensor: n-d indices, negative indices wrap.
    return x[(slice(None),) * (axis % x.dim()) + (indices.long(),)]


def _reduction(fn: Callable[..., torch.Tensor]) -> Emitter:
    def emit(x, *, axes, keepdims, **kwargs):
        if not axes:  # numpy reduces nothing over axes=(); torch would reduce everything
            return x
        return fn(x, dim=tuple(axes), keepdim=keepdims, **kwargs)

    return emit


EMITTERS["mean"] = _reduction(torch.mean)
EMITTERS["sum"] = _reduction(torch.sum)
EMITTERS["norm"] = _reduction(torch.linalg.vector_norm)


# -- neural-network ops ----------------------------------------------------------------------------


def _epilogue(y, residual, activation, activation_attrs):
    """The fused tail of conv2d and linear: ``act(y + residual)`` with the activation's emitter."""
    if residual is not None:
        y = y + residual
    if activation is None:
        return y
    return EMITTERS[activation](y, **(activation_attrs or {}))


@emitter("conv2d")
def _conv2d(
    x, w, b=None, residual=None, *, stride, padding, dilation, groups, activation, activation_attrs
):
    bias = None if b is None else b.reshape(-1)
    y = F.conv2d(x, w, bias, tuple(stride), tuple(padding), tuple(dilation), groups)
    return _epilogue(y, residual, activation, activation_attrs)


@emitter("linear")
def _linear(x, w, b=None, residual=None, *, activation, activation_attrs):
    flat_bias = b is None or b.dim() == 1
    y = F.linear(x, w, b if flat_bias else None)
    if not flat_bias:  # the IR allows any bias that broadcasts against the output
        y = y + b
    return _epilogue(y, residual, activation, activation_attrs)


@emitter("max_pool2d")
def _max_pool2d(x, *, kernel, stride, padding, dilation, ceil_mode):
    return F.max_pool2d(
        x, tuple(kernel), tuple(stride), tuple(padding), tuple(dilation), ceil_mode=ceil_mode
    )


@emitter("avg_pool2d")
def _avg_pool2d(x, *, kernel, stride, padding, ceil_mode, count_include_pad):
    return F.avg_pool2d(
        x,
        tuple(kernel),
        tuple(stride),
        tuple(padding),
        ceil_mode=ceil_mode,
        count_include_pad=count_include_pad,
    )


EMITTERS["adaptive_avg_pool2d"] = lambda x, *, output_size: F.adaptive_avg_pool2d(
    x, tuple(output_size)
)
EMITTERS["adaptive_max_pool2d"] = lambda x, *, output_size: F.adaptive_max_pool2d(
    x, tuple(output_size)
)


@emitter("batch_norm")
def _batch_norm(x, scale, bias, mean, var, *, eps):
    flat = [t.reshape(-1) for t in (scale, bias, mean, var)]
    return F.batch_norm(x, flat[2], flat[3], flat[0], flat[1], training=False, eps=eps)


def _batch_norm_train(x, scale, bias, mean, var, *, eps):
    """Training-mode batch norm: batch statistics, and the running ones (buffers) updated in place,
    as nn.BatchNorm does; fine-tuning a pruned network without it is unstable."""
    return F.batch_norm(x, mean.view(-1), var.view(-1), scale.reshape(-1), bias.reshape(-1),
                        training=True, momentum=0.1, eps=eps)


@emitter("layer_norm")
def _layer_norm(x, scale=None, bias=None, *, axes, eps):
    axes = sorted(a % x.dim() for a in axes)
    trailing = tuple(x.shape[x.dim() - len(axes) :])
    if axes == list(range(x.dim() - len(axes), x.dim())) and all(
        t is None or tuple(t.shape) == trailing for t in (scale, bias)
    ):
        return F.layer_norm(x, trailing, scale, bias, eps)
    # Non-trailing axes, or scale/bias that only broadcast: the reference formula, spelled out.
    mean = x.mean(dim=axes, keepdim=True)
    var = (x - mean).pow(2).mean(dim=axes, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps)
    if scale is not None:
        y = y * scale
    return y if bias is None else y + bias


@emitter("group_norm")
def _group_norm(x, scale=None, bias=None, *, groups, eps):
    flat = [None if t is None else t.reshape(-1) for t in (scale, bias)]
    return F.group_norm(x, groups, flat[0], flat[1], eps)


@emitter("attention")
def _attention(q, k, v, mask=None, *, scale, causal):
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(q.dtype)  # an additive mask; SDPA wants the query's dtype
    if causal and mask is not None:  # SDPA takes one or the other, the IR applies both
        keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        mask = mask & keep if mask.dtype == torch.bool else torch.where(keep, mask, -math.inf)
        causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)


# -- shared weights (compiler/ops/codebook.py) -----------------------------------------------------


def unpack_indices(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The dense little-endian bit-packing of compiler.ops.codebook, undone in torch (int64)."""
    if bits == 8:
        return packed[:count].long()
    rows = packed.reshape(-1, bits).long()  # 8 indices in ``bits`` bytes: one int64 word per row
    byte_shifts = torch.arange(bits, device=packed.device) * 8
    words = (rows << byte_shifts).sum(dim=1, keepdim=True)
    shifts = torch.arange(8, device=packed.device) * bits
    return ((words >> shifts) & ((1 << bits) - 1)).reshape(-1)[:count]


@emitter("codebook_lookup")
def _codebook_lookup(codebook, indices, *, shape, bits):
    # gather's backward adds each element's gradient into its centroid: a centroid's gradient is
    # the sum over the weights that share it, so the codebook (an nn.Parameter) trains as itself.
    groups = codebook.shape[0]
    index = unpack_indices(indices, bits, math.prod(shape)).reshape(groups, -1)
    return torch.gather(codebook, 1, index).reshape(shape)


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
    hint = (
        "add an emitter to backends.torch.backend.EMITTERS, e.g. "
        "@backends.torch.backend.emitter('{op}') on a function taking the input tensors "
        "positionally and the node's attributes as keywords"
    )
    for node in graph.nodes:
        names = [node.op, node.attrs.get("activation") if node.op in ("conv2d", "linear") else None]
        for op in filter(None, names):
            if op not in EMITTERS:
                what = "op" if op == node.op else f"fused activation '{op}' of op"
                raise BackendError(
                    f"the torch backend has no emitter for {what} '{node.op}'",
                    node=node.name,
                    op=node.op,
                    source=node.source,
                    hint=hint.format(op=op),
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
                results = (_batch_norm_train(*args, **attrs),)
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
            result = EMITTERS[step.node.op](*args, **attrs)
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
    attrs = {id(v): name for v, name in zip(module._graph.constants(), module._const_attrs,
                                            strict=True)}
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

from backends.torch import quant as torch_quant  # noqa: E402,F401  (registers quantize/dequantize)
