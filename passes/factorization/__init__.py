"""passes/factorization."""
