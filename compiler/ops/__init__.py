"""Built-in op definitions; importing this package registers them all in the op table."""

from compiler.ops import codebook, elementwise, nn, quant, tensor  # noqa: F401
