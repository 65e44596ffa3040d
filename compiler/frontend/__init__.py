"""Frontends: get user models into the IR (PyTorch via torch.export today)."""

from compiler.frontend.aten import register_aten
from compiler.frontend.torch_export import trace

__all__ = ["register_aten", "trace"]
