"""backends/numba/kernels."""
