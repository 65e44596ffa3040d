"""The test suite, a package: helpers import as ``tests.numerics``, ``tests.graph_strategies``...,
and test files in different folders may share a basename."""
