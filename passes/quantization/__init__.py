"""passes/quantization."""
