"""Backends: turn an IR graph into something a user runs (torch module, ONNX file, Numba module)."""
