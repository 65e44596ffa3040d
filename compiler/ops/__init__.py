"""Built-in op definitions; importing this package registers them all in the op table."""

from compiler.ops import codebook, elementwise, nn, tensor  # noqa: F401
from compiler.ops import quant  # noqa: F401
