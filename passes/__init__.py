"""Built-in passes, one pass family per module; importing this package registers them."""

from passes import cleanup, factorization, fusion, pruning  # noqa: F401  (registers the passes and the ``fuse`` preset)
from passes import weight_sharing  # noqa: F401  (share-weights)
from passes import equalization, quantization  # noqa: F401  (quantize, equalize-cross-layer)
