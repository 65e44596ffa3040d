"""What only the numba backend has: its kernels (the GEMMs, max pooling, the linear kernel's
threads), the memory plan and generated source, the saved standalone package. The cases every
backend runs are in test_conformance.py; the conv kernels, chains and int8 kernels have files of
their own (test_numba_*.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from backends.numba.backend import compile_numba, load_numba
from compiler.ir.graph import Graph
from compiler.ir.interpreter import run
from tests.backends.cases import chain_graph, randn
from tests.numerics import relative_error

RTOL = 1e-4


def assert_matches(graph: Graph, *inputs: np.ndarray):
    """numba output == reference output: shapes, dtypes, values within RTOL of max|ref|."""
    model = compile_numba(graph)
    got, want = model.run(*inputs), run(graph, inputs)
    assert len(got) == len(want) == len(graph.outputs)
    for value, a, b in zip(graph.outputs, got, want, strict=True):
        assert a.shape == b.shape == value.shape, value.name
        assert a.dtype == np.dtype(value.dtype), value.name
        if a.dtype.kind in "biu":
            np.testing.assert_array_equal(a, b)
        else:
            assert relative_error(a, b) <= RTOL, (value.name, relative_error(a, b))
    return model


# -- kernels --------------------------------------------------------------------------------------


@pytest.mark.parametrize("m", [1, 7, 20, 300])
def test_linear_kernel_splits_rows_or_columns_among_threads(m):
    """Few rows: blocks of output columns (1003: not whole vectors) per thread; many: rows (300
    rows: two row blocks of the GEMM, the last tile partial). Both kernels: the weight as it is
    (packed per call) and packed at compile time; K = 2048 runs in 8 passes."""
    from backends.numba.kernels import common as K
    from backends.numba.kernels import conv as KC

    x, w, b, r = randn(m, 2048), randn(1003, 2048), randn(1003), randn(m, 1003)
    want = np.maximum(x.astype(np.float64) @ w.T.astype(np.float64) + b + r, 0)
    packed, bias16 = KC.pack_weight(w.reshape(1003, 2048, 1, 1), 1), KC.pack_bias(b, 1003, 1)
    for nthreads in (1, 2, 3):
        out = np.full((m, 1003), np.nan, np.float32)
        KC.linear(x, w, b, r, out, K.RELU, 0.0, 0.0, nthreads)
        assert relative_error(out, want) < 1e-5, nthreads
        out = np.full((m, 1003), np.nan, np.float32)
        KC.linear_packed(x, packed, bias16, r, out, K.RELU, 0.0, 0.0, nthreads)
        assert relative_error(out, want) < 1e-5, nthreads


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gemm_without_blas(dtype):
    """The kernels' GEMM (no BLAS: numba's np.dot needs SciPy) against float64 numpy, on shapes
    around the micro-kernel's sizes (tiles of 5/6 or 7/8 rows, 16 columns, passes of 256 over K)
    and on strided views of both operands; 1-4 rows run row by row (_gemv_block), K = 1001 leaves
    a remainder past its 4 chains."""
    from numba import njit

    from backends.numba.kernels import gemm as G

    @njit
    def both(a, b, bt, c, ct):
        G.gemm(a, b, c)
        G.gemm_t(a, bt, ct)

    rng = np.random.default_rng(0)
    for m, k, n in [
        (1, 3, 1),
        (3, 1001, 20),
        (4, 4, 16),
        (5, 256, 16),
        (6, 257, 17),
        (9, 40, 33),
        (250, 600, 48),
    ]:
        a = rng.standard_normal((m, 2 * k)).astype(dtype)[:, ::2]
        b = rng.standard_normal((k, n)).astype(dtype)
        c, ct = np.full((m, n), np.nan, dtype), np.full((m, n), np.nan, dtype)
        both(a, b, b.T, c, ct)
        want = a.astype(np.float64) @ b.astype(np.float64)
        assert relative_error(c, want) < 1e-5 and relative_error(ct, want) < 1e-5, (m, k, n)


@pytest.mark.parametrize("kernel", [(3, 3), (2, 3), (3, 1), (4, 2)])
def test_max_pool_paths_against_torch(kernel):
    """Every path of the max-pool kernel (the fused 3-row and 3-column loops, stride 2 and any
    other, the general ones) on planes from 1 to 9 wide, with padding, dilation, ceil mode and
    a NaN, which a window must propagate, against torch bit for bit."""
    import torch

    from backends.numba.kernels import conv as KC

    torch_pool = torch.nn.functional.max_pool2d
    rng = np.random.default_rng(0)
    kh, kw = kernel
    checked = 0
    for h in (1, 2, 5, 7, 9):
        for w in (1, 3, 6, 9):
            for s in (1, 2, 3):
                for p in range(kw // 2 + 1):
                    for d in (1, 2):
                        for ceil in (False, True):
                            x = rng.standard_normal((1, 2, h, w), dtype=np.float32)
                            x[0, 1, h // 2, w // 2] = np.nan
                            pads = (min(p, kh // 2), p)
                            try:
                                want = torch_pool(
                                    torch.from_numpy(x), kernel, s, pads, d, ceil_mode=ceil
                                ).numpy()
                            except RuntimeError:  # torch: the output would be empty
                                continue
                            got = np.empty_like(want)
                            KC.max_pool2d(x, got, kh, kw, s, s, *pads, d, d)
                            assert np.array_equal(got, want, equal_nan=True), (
                                kernel,
                                (h, w),
                                s,
                                pads,
                                d,
                                ceil,
                            )
                            checked += 1
    assert checked > 100


# -- memory planning -------------------------------------------------------------------------------


def test_derived_tables_of_names_that_sanitise_alike_stay_apart():
    """Two convs named 'a/b' and 'a_b' (both 'a_b' once sanitised) keep their own padded bias."""
    g = Graph("names")
    h = g.add_input("x", (1, 4, 6, 6))
    for name in ("a/b", "a_b"):
        w, b = g.constant(randn(4, 4, 3, 3), f"{name}.w"), g.constant(randn(4) * 5, f"{name}.b")
        h = g.add_node("conv2d", [h, w, b], {"padding": (1, 1)}, name=name).outputs[0]
    g.outputs = [h]
    model = assert_matches(g, randn(1, 4, 6, 6))
    prepare = model.source.split("def prepare")[1].split("def forward")[0]
    assert prepare.count("KC.pack_bias(") == 2 and prepare.count("KC.tap_offsets(") == 1


def test_buffers_are_reused_and_results_stay_right():
    g = chain_graph()
    model = assert_matches(g, randn(1, 8, 12, 12))
    one, padded = 8 * 12 * 12 * 4, 8 * 14 * 14 * 4
    # 10 intermediate values of this size, at most 3 alive, and 6 zero-padded conv inputs (the
    # micro-kernel's scratch), one alive at a time
    assert model.peak_bytes <= 3 * one + padded
    assert "Activation memory" in model.source
    x = randn(1, 8, 12, 12)
    first = model.run(x)[0]
    model.run(randn(1, 8, 12, 12))
    np.testing.assert_array_equal(model.run(x)[0], first)  # outputs are copies, buffers reset


def test_source_has_one_kernel_line_per_node():
    g = chain_graph(2)
    body = compile_numba(g).source.split("def forward")[1].split("def load")[0]
    calls = [line for line in body.splitlines() if "= conv2d(" in line or "= add(" in line]
    assert len(calls) == 3 and all("KC.conv2d_planned(" in c or "K.binary(" in c for c in calls)


# -- saved packages --------------------------------------------------------------------------------

# a saved package needs numpy and numba only: torch, SciPy (whose BLAS numba's np.dot calls) and
# this repository are blocked
BLOCK_TORCH = textwrap.dedent("""
    import importlib.abc, sys
    class NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name in ("torch", "scipy") or name.startswith(
                    ("torch.", "scipy.", "compiler", "backends")):
                raise ImportError(f"{name} is blocked in this test")
    sys.meta_path.insert(0, NoTorch())
""")


def package_graph() -> Graph:
    """chain_graph(2), then a linear layer and a matmul: every kind of GEMM a package runs."""
    g = chain_graph(2)
    h = g.outputs[0]
    h = g.add_node(
        "linear",
        [h, g.constant(randn(6, 8), "fc.w"), g.constant(randn(6), "fc.b")],
        {"activation": "relu"},
    ).outputs[0]
    g.outputs = [g.add_node("matmul", [h, g.constant(randn(6, 3), "proj")]).outputs[0]]
    return g


def test_saved_package_runs_without_torch_and_checks_inputs(tmp_path):
    g = package_graph()
    model = compile_numba(g)
    x = randn(1, 8, 12, 12)
    want = model.run(x)[0]
    (tmp_path / "pkg").mkdir()  # an existing folder is replaced whole
    (tmp_path / "pkg" / "stale.txt").write_text("old")
    path = model.save(tmp_path / "pkg")
    assert sorted(os.listdir(path)) == ["__init__.py", "kernels", "model.py", "weights.npz"]
    assert sorted(os.listdir(path / "kernels")) == sorted(  # a copy of backends/numba/kernels/
        [
            "__init__.py",
            "chain.py",
            "common.py",
            "conv.py",
            "depthwise.py",
            "f32.py",
            "f32_tile.py",
            "gemm.py",
            "int8.py",
            "pointwise.py",
            "runtime.py",
        ]
    )
    assert [p.name for p in tmp_path.iterdir()] == ["pkg"]  # no temporary folder left behind
    np.save(tmp_path / "x.npy", x)
    x3 = randn(3, 8, 12, 12)  # another batch: chunks of the compiled one, each exactly as alone
    np.save(tmp_path / "x3.npy", x3)
    script = BLOCK_TORCH + textwrap.dedent(f"""
        import numpy as np
        import pkg  # found through PYTHONPATH
        m = pkg.load({str(path)!r})
        np.save({str(tmp_path / "y.npy")!r}, m.run(np.load({str(tmp_path / "x.npy")!r}))[0])
        np.save({str(tmp_path / "y3.npy")!r}, m.run(np.load({str(tmp_path / "x3.npy")!r}))[0])
        for bad in (np.zeros((1, 8, 12, 13), "float32"), np.zeros((1, 8, 12, 12), "complex64")):
            try:
                m.run(bad)
            except pkg.InputError as e:
                print("InputError:", e)
        assert "torch" not in sys.modules and "scipy" not in sys.modules
    """)
    for _ in range(2):  # the second process loads the kernels from the package's numba cache
        done = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(tmp_path)},
        )
        assert done.returncode == 0, done.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), want)
    y3 = np.load(tmp_path / "y3.npy")
    for i in range(3):
        np.testing.assert_array_equal(y3[i : i + 1], model.run(x3[i : i + 1])[0])
    errors = [line for line in done.stdout.splitlines() if line.startswith("InputError")]
    assert "expects shape (1, 8, 12, 12), got (1, 8, 12, 13)" in errors[0] and "Fix:" in errors[0]
    assert "expects dtype float32, got complex64" in errors[1] and ".astype" in errors[1]
    assert list((path / "kernels" / "__pycache__").glob("f32*.nbi"))  # numba's cache index
    np.testing.assert_array_equal(load_numba(path).run(x)[0], want)
