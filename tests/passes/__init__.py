"""Tests of the passes (passes/): fusion, pruning, factorization, quantization, weight sharing."""
