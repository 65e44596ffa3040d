"""The PyTorch frontend: torch.export -> functional ATen graph -> our IR.

Parameters and buffers become constants; every node remembers the module path it came from
(``node.meta["source"]``) and the Python line (``node.meta["stack"]``). Subgraphs that depend only
on constants and use ops we have no converter for (mask construction in Swin, ``full``,
``arange``...) are evaluated with torch at import time, since with static shapes their result is a
constant.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from compiler.errors import SlimgraphError, TraceError, UnsupportedOpError
from compiler.frontend.aten import CONVERTERS, Converter, Ctx, is_value, torch_dtype_name
from compiler.ir.graph import Graph, Value

aten = torch.ops.aten

# High-level ops that torch's default decompositions would lower; we keep them because the IR has
# direct equivalents (fewer, bigger nodes that passes and backends understand).
PRESERVED_OPS = [
    aten.conv2d.default,
    aten.linear.default,
    aten.layer_norm.default,
    aten.group_norm.default,
    aten.scaled_dot_product_attention.default,
    aten.dropout.default,
    aten.flatten.using_ints,
    aten.adaptive_avg_pool2d.default,
    aten.hardswish.default,
    aten.hardsigmoid.default,
    aten.silu.default,
    aten.gelu.default,
    aten.hardtanh.default,
    aten.matmul.default,
    aten.einsum.default,
    aten.softmax.int,
    aten.log_softmax.int,
    aten.max_pool2d.default,
    aten.avg_pool2d.default,
    aten.pad.default,
    aten.chunk.default,
    aten.linalg_vector_norm.default,
    aten.roll.default,
    aten.unflatten.int,
    aten.mean.dim,
    aten.expand_as.default,
    aten.swapaxes.default,
    aten.reshape.default,
    aten.contiguous.default,
    aten.masked_fill.Scalar,
    aten.relu6.default,
    aten.adaptive_max_pool2d.default,
]


def to_tensor_args(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(example_inputs, (torch.Tensor, np.ndarray)):
        example_inputs = (example_inputs,)
    return tuple(
        torch.as_tensor(np.asarray(x)) if isinstance(x, np.ndarray) else x for x in example_inputs
    )


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Put every submodule in eval mode and restore each one's flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def export_program(model: torch.nn.Module, args: tuple[torch.Tensor, ...]):
    """torch.export in eval mode, then functionalize with our preserved-op table."""
    with eval_mode(model), torch.no_grad():
        try:
            program = torch.export.export(model, args)
        except Exception as e:
            raise TraceError(
                f"torch.export could not trace {type(model).__name__}: {type(e).__name__}: "
                f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}",
                hint="make the forward traceable (no data-dependent Python control flow, no "
                "untraceable libraries); torch's full reason is chained below",
            ) from e
        table = torch.export.default_decompositions()
        for op in PRESERVED_OPS:
            table.pop(op, None)
        return program.run_decompositions(table)


def module_path(fx_node: torch.fx.Node) -> str | None:
    stack = fx_node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    # export prefixes paths with "L['self']." style names in some versions
    return path.replace("L['self'].", "").replace("L__self___", "") or None


def import_program(program, name: str = "graph") -> Graph:
    """Convert an ExportedProgram into an IR Graph."""
    graph = Graph(name)
    sig = program.graph_signature
    kinds = {spec.arg.name: spec for spec in sig.input_specs}
    env: dict[str, Any] = {}
    for fx_node in program.graph.nodes:
        if fx_node.op == "placeholder":
            env[fx_node.name] = _import_placeholder(graph, program, kinds[fx_node.name], fx_node)
        elif fx_node.op == "call_function":
            env[fx_node.name] = _import_call(graph, fx_node, env)
        elif fx_node.op == "output":
            outs = torch.utils._pytree.tree_leaves(fx_node.args[0])
            graph.outputs = [_as_output(graph, env[o.name]) for o in outs]
    return graph


def _as_output(graph: Graph, value: Any) -> Value:
    if isinstance(value, Value):
        return value
    return graph.constant(np.asarray(value), "output_const")


def _import_placeholder(graph: Graph, program, spec, fx_node) -> Value:
    from torch.export.graph_signature import InputKind

    val = fx_node.meta.get("val")
    if spec.kind == InputKind.USER_INPUT:
        return graph.add_input(fx_node.name, tuple(val.shape), torch_dtype_name(val.dtype))
    if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
        tensor = program.state_dict.get(spec.target)
        if tensor is None:
            tensor = program.constants[spec.target]
    else:
        tensor = program.constants[spec.target]
    data = tensor.detach().cpu().contiguous().numpy().copy()
    value = graph.constant(data, spec.target or fx_node.name)
    value.meta["source"] = spec.target
    return value


def _import_call(graph: Graph, fx_node, env: dict[str, Any]) -> Any:
    args = torch.fx.node.map_arg(fx_node.args, lambda n: env[n.name])
    kwargs = torch.fx.node.map_arg(fx_node.kwargs, lambda n: env[n.name])
    target = fx_node.target
    if target is __import__("operator").getitem:
        return args[0][args[1]]
    converter: Converter | None = CONVERTERS.get(target)
    leaves = [x for x in torch.utils._pytree.tree_leaves((args, kwargs)) if is_value(x)]
    if converter is None or not leaves:
        if all(_is_input_free(v) for v in leaves):
            args, kwargs = torch.utils._pytree.tree_map(
                lambda x: _materialize(graph, x) if is_value(x) else x, (args, kwargs)
            )
            return _evaluate_constant(graph, fx_node, target, args, kwargs)
        raise UnsupportedOpError(
            f"ATen op '{target}' has no converter",
            node=fx_node.name,
            op=str(target),
            source=module_path(fx_node),
            hint="add a converter with compiler.frontend.aten.register_aten(torch.ops.aten.X) "
            "mapping it to IR ops (and register a new IR op with compiler.ops.table.register_op "
            "if none fits); see docs/architecture.md",
        )
    ctx = Ctx(graph, fx_node, module_path(fx_node))
    try:
        result = converter(ctx, *args, **kwargs)
    except SlimgraphError:
        raise
    except Exception as e:
        raise TraceError(
            f"converting '{target}' failed: {type(e).__name__}: {e}",
            node=fx_node.name,
            op=str(target),
            source=module_path(fx_node),
            hint="this is a bug in the converter; please report it with the model",
        ) from e
    _check_shapes(fx_node, result)
    return result


def _is_input_free(value: Value) -> bool:
    """True when ``value`` depends on constants only (not on any graph input)."""
    if "input_free" not in value.meta:
        node = value.producer
        value.meta["input_free"] = (
            node is None
            and value.is_constant
            or node is not None
            and all(v is None or _is_input_free(v) for v in node.inputs)
        )
    return value.meta["input_free"]


def _materialize(graph: Graph, value: Value) -> Value:
    """The constant that an input-free value computes (via the reference interpreter)."""
    if value.is_constant:
        return value
    from compiler.ir import interpreter

    needed: set[int] = set()
    stack = [value.producer]
    while stack:
        node = stack.pop()
        if node is not None and id(node) not in needed:
            needed.add(id(node))
            stack.extend(v.producer for v in node.inputs if v is not None)
    sub = Graph("constant_subgraph")  # a read-only view of the ancestors, in graph order
    sub.nodes = [n for n in graph.nodes if id(n) in needed]
    sub.outputs = [value]
    (array,) = interpreter.run(sub, [])
    return graph.constant(array, value.name + "_folded")


def _check_shapes(fx_node, result: Any) -> None:
    """Our inferred shapes must equal torch's: a mismatch is a converter bug, caught here."""
    val = fx_node.meta.get("val")
    pairs = (
        zip(result, val)
        if isinstance(result, (list, tuple)) and isinstance(val, (list, tuple))
        else [(result, val)]
    )
    for value, fake in pairs:
        if isinstance(value, Value) and isinstance(fake, torch.Tensor):
            if value.shape != tuple(fake.shape):
                raise TraceError(
                    f"converted shape {value.shape} differs from torch's {tuple(fake.shape)}",
                    node=fx_node.name,
                    op=str(fx_node.target),
                    source=module_path(fx_node),
                    hint="this is a bug in the converter; please report it with the model",
                )


def _evaluate_constant(graph: Graph, fx_node, target, args, kwargs) -> Any:
    def to_torch(x: Any) -> Any:
        return torch.from_numpy(np.array(x.data)) if is_value(x) else x

    t_args = torch.utils._pytree.tree_map(to_torch, args)
    t_kwargs = torch.utils._pytree.tree_map(to_torch, kwargs)
    with torch.no_grad():
        out = target(*t_args, **t_kwargs)

    def to_value(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            value = graph.constant(x.detach().cpu().contiguous().numpy().copy(), fx_node.name)
            value.meta["source"] = module_path(fx_node)
            return value
        return x

    return torch.utils._pytree.tree_map(to_value, out)


def trace(
    model: torch.nn.Module, example_inputs: Sequence[Any] | Any, *, name: str | None = None
) -> Graph:
    """Trace ``model`` on ``example_inputs`` into a verified IR graph.

    The model is not modified: its train/eval flags are restored after tracing.
    """
    if not isinstance(model, torch.nn.Module):
        raise TraceError(
            f"expected a torch.nn.Module, got {type(model).__name__}",
            hint="pass the model object itself (an ONNX file frontend is planned)",
        )
    args = to_tensor_args(example_inputs)
    program = export_program(model, args)
    graph = import_program(program, name or type(model).__name__)
    graph.verify()
    return graph
