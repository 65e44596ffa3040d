"""slimgraph's compiler core: the IR, op table, frontend, interpreter, verifier and pass manager.

The entry point is :func:`compile`::

    from compiler import compile
    compiled = compile(model, torch.randn(1, 3, 224, 224), passes=["fuse"], backend="onnx")
"""

from compiler.api import CompiledModel, compile
from compiler.errors import SlimgraphError
from compiler.ir.graph import Graph, Node, Value
from compiler.ops.table import register_op
from compiler.pass_manager import Pass, PassManager, register_pass, register_preset

__all__ = [
    "CompiledModel",
    "Graph",
    "Node",
    "Pass",
    "PassManager",
    "SlimgraphError",
    "Value",
    "compile",
    "register_op",
    "register_pass",
    "register_preset",
]
