"""Built-in passes, one pass family per module or subpackage.

Importing this package registers a loader with the pass manager; the pass modules themselves are
imported the first time a pass is looked up by name (``compile(..., passes=["fuse"])``).
"""

from compiler.pass_manager import add_pass_source


def load() -> None:
    """Import every built-in pass module (each registers its passes and presets)."""
    import passes.cleanup
    import passes.factorization.factorize
    import passes.fusion
    import passes.pruning.blocks
    import passes.pruning.prune
    import passes.quantization.equalization
    import passes.quantization.quantize
    import passes.weight_sharing  # noqa: F401


add_pass_source(load)
