"""Tests of the backends (backends/): the conformance suite every backend runs, then what is
specific to one backend (torch training, ONNX files, numba kernels, chains and int8)."""
