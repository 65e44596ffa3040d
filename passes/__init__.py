"""Built-in passes, one pass family per module; importing this package registers them."""

# registers the passes (prune-channels, factorize-rank, share-weights, quantize, ...) and the
# ``fuse`` preset
from passes import (  # noqa: F401
    cleanup,
    equalization,
    factorization,
    fusion,
    pruning,
    quantization,
    weight_sharing,
)
