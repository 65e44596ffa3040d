"""backends/numba."""
