"""Conv chains of the numba backend (backends/numba/kernels/chain.py): a run of convs in one
parallel region gives the bits of the separate calls, at any thread count, and with more chunks
than the threading layer gives threads."""

from __future__ import annotations

import numba
import numpy as np
import pytest

from backends.numba.backend import compile_numba, load_numba
from compiler.ir.graph import Graph
from compiler.ir.interpreter import run
from tests.numerics import relative_error

rng = np.random.default_rng(3)


def randn(*shape):
    return rng.standard_normal(shape).astype("float32")


def conv(g, h, o, k, name, res=None, **attrs):
    c = h.shape[1] // attrs.get("groups", 1)
    w = g.constant(randn(o, c, k, k) / np.float32(np.sqrt(c * k * k)), f"{name}.w")
    b = g.constant(randn(o) * np.float32(0.1), f"{name}.b")
    return g.add_node("conv2d", [h, w, b, res], attrs, name=name).outputs[0]


def chained_graph(n: int = 2) -> Graph:
    """Two runs of convs, split by a 1x1 conv on a 6x6 plane (read channel-last from a copy
    where the pixel-vector kernel exists: never chained). They take every way a chained layer
    is split: depthwise planes, the pixel tiles of a 1x1 conv, bands of rows, and channel blocks
    of one shared padded input (weights larger than the input); strides, dilation, groups,
    residuals and every kind of epilogue; a chained value is also read after its chain."""
    g = Graph("chained")
    x = g.add_input("x", (n, 8, 20, 20))
    relu = {"activation": "relu"}
    c1 = conv(g, x, 16, 3, "c1", padding=(1, 1), **relu)
    d1 = conv(
        g,
        c1,
        16,
        3,
        "d1",
        groups=16,
        padding=(1, 1),
        activation="clip",
        activation_attrs={"min_val": 0.0, "max_val": 6.0},
    )
    q1 = conv(g, d1, 16, 1, "q1", res=c1, **relu)  # 400 pixels: the pixel-vector kernel
    c2 = conv(g, q1, 16, 3, "c2", res=q1, padding=(1, 1), **relu)
    c3 = conv(g, c2, 24, 3, "c3", stride=(2, 2), padding=(1, 1), activation="hardswish")
    c4 = conv(
        g,
        c3,
        24,
        3,
        "c4",
        groups=2,
        padding=(1, 1),
        activation="clip",
        activation_attrs={"min_val": 0.0, "max_val": 6.0},
    )
    c5 = conv(g, c4, 24, 3, "c5", res=c3, padding=(2, 2), dilation=(2, 2))
    c6 = conv(g, c5, 64, 5, "c6", **relu)  # 10x10 -> 6x6 without padding, 150 KB of weights
    c7 = conv(g, c6, 64, 3, "c7", padding=(1, 1), activation="silu")
    p = conv(g, c7, 32, 1, "p", **relu)
    c8 = conv(g, p, 32, 3, "c8", padding=(1, 1), **relu)
    c9 = conv(g, c8, 32, 3, "c9", res=p, padding=(1, 1), **relu)
    g.outputs = [c9, c2]
    return g


@pytest.fixture(scope="module")
def models():
    g = chained_graph()
    return g, compile_numba(g), compile_numba(g, chains=False)


def test_chains_replace_the_runs_of_convs_and_keep_their_lines_as_comments(models):
    _, chained, plain = models
    body = chained.source.split("def forward")[1]
    assert body.count("KC.run_chain(") == 2
    # c1 reads the graph input, which a call is passed: it stays a call; d1, q1, c2..c7, then
    # c8, c9
    assert body.count("# KC.conv2d_planned(") == 9
    assert body.count("# KC.conv2d_depthwise(") == 1
    assert "\n    KC.conv2d_planned(x0, " in body
    assert "KC.run_chain(" not in plain.source and "def bind" not in plain.source
    assert chained.source.count("KC.chain_table([") == 2


@pytest.mark.parametrize("nthreads", [1, 2])
def test_a_chain_gives_the_bits_of_the_separate_calls(models, nthreads):
    g, chained, plain = models
    x = randn(*g.inputs[0].shape)
    before = numba.get_num_threads()
    numba.set_num_threads(min(nthreads, numba.config.NUMBA_NUM_THREADS))
    try:
        got, want = chained.run(x), plain.run(x)
    finally:
        numba.set_num_threads(before)
    for a, b, r in zip(got, want, run(g, [x]), strict=True):
        np.testing.assert_array_equal(a, b)
        assert relative_error(a, r) <= 1e-4


@pytest.mark.parametrize("chunks", [2, 3, 5])
def test_a_chain_with_more_chunks_than_threads_finishes(models, chunks):
    """One thread runs every chunk of the region in turn: tasks are claimed, never owned, so
    the first chunk runs them all and no chunk waits for one that has not started."""
    g, chained, plain = models
    x = randn(*g.inputs[0].shape)
    want = plain.run(x)
    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        spec, m = chained.module, chained.model
        got = spec.forward(m.w, m.b, chunks, x)
    finally:
        numba.set_num_threads(before)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_saved_chained_model_binds_its_tables_when_loaded(models, tmp_path):
    g, chained, _ = models
    x = randn(*g.inputs[0].shape)
    path = chained.save(tmp_path / "chained_numba_pkg")  # a name no other test loads
    assert (path / "kernels" / "chain.py").exists()  # a copy of backends/numba/kernels/
    loaded = load_numba(path)
    for a, b in zip(loaded.run(x), chained.run(x), strict=True):
        np.testing.assert_array_equal(a, b)
