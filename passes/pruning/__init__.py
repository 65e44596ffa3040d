"""passes/pruning."""
