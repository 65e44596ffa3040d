"""Least-squares reconstruction (compiler/analysis/reconstruct.py) and its use by prune-channels:
exact recovery where least squares can reach zero error, a lower deviation after pruning a small
residual CNN, and clear errors."""

import numpy as np
import pytest
import torch
from torch import nn

from compiler.analysis.reconstruct import reconstruct
from compiler.errors import InputError, OptionError
from compiler.frontend import trace
from compiler.ir.graph import Graph
from compiler.ir.interpreter import run
from compiler.pass_manager import PassManager, deviation
from passes.pruning.prune import PruneChannels


def redundant_chain(batch=4):
    """x -> c1 (1x1, 4 channels, channels 2 and 3 linear combinations of 0 and 1) -> c2 (3x3,
    relu) -> c3 (1x1): removing c1's channels 2, 3 loses nothing that c2 cannot recover."""
    rng = np.random.default_rng(0)
    g = Graph("redundant")
    x = g.add_input("x", (batch, 3, 6, 6))
    w1 = rng.standard_normal((4, 3, 1, 1))
    b1 = rng.standard_normal(4)
    mix = np.array([[0.5, -1.0], [2.0, 0.3]])
    w1[2:] = np.einsum("kj,jchw->kchw", mix, w1[:2])
    b1[2:] = mix @ b1[:2]
    c1 = g.add_node(
        "conv2d",
        [x, g.constant(w1.astype(np.float32), "w1"), g.constant(b1.astype(np.float32), "b1")],
        name="c1",
    )
    w2 = g.constant(rng.standard_normal((5, 4, 3, 3)).astype(np.float32), "w2")
    b2 = g.constant(rng.standard_normal(5).astype(np.float32), "b2")
    c2 = g.add_node(
        "conv2d", [c1.outputs[0], w2, b2], {"padding": (1, 1), "activation": "relu"}, name="c2"
    )
    w3 = g.constant(rng.standard_normal((2, 5, 1, 1)).astype(np.float32), "w3")
    c3 = g.add_node("conv2d", [c2.outputs[0], w3], name="c3")
    g.outputs = [c3.outputs[0]]
    return g


def drop_c1_channels(graph):
    """The compressed graph: c1 keeps channels 0 and 1, c2 simply loses the matching inputs."""
    g = graph.clone()
    c1, c2 = g.node("c1"), g.node("c2")
    c1.inputs[1].data = c1.inputs[1].data[:2].copy()
    c1.inputs[2].data = c1.inputs[2].data[:2].copy()
    c2.inputs[1].data = c2.inputs[1].data[:, :2].copy()
    for node in g.nodes:
        g.reinfer(node)
    g.verify()
    return g


def test_exact_recovery_when_removed_channels_are_combinations_of_kept_ones():
    original = redundant_chain()
    compressed = drop_c1_channels(original)
    x = np.random.default_rng(1).standard_normal((16, 3, 6, 6)).astype(np.float32)
    plain = deviation(run(original, [x[:4]]), run(compressed, [x[:4]]))
    assert plain > 0.05  # dropping the channels without refitting is far off
    result = reconstruct(original, compressed, [x], ["c2"], ridge=0.0)
    [fit] = result.layers
    assert fit.name == "c2" and fit.features == 2 * 9 + 1 and fit.rows == 16 * 36
    assert fit.before > 0.05 and fit.after < 1e-5
    assert result.deviation_before > 0.05 and result.deviation_after < 1e-5
    held_out = np.random.default_rng(2).standard_normal((4, 3, 6, 6)).astype(np.float32)
    assert deviation(run(original, [held_out]), run(compressed, [held_out])) < 1e-4
    assert result.samples == 16 and result.seconds > 0


def test_refit_with_dropped_output_channels_uses_kept_indices():
    original = redundant_chain()
    compressed = drop_c1_channels(original)
    c2, c3 = compressed.node("c2"), compressed.node("c3")
    c2.inputs[1].data = c2.inputs[1].data[[0, 2, 4]].copy()
    c2.inputs[2].data = c2.inputs[2].data[[0, 2, 4]].copy()
    c3.inputs[1].data = c3.inputs[1].data[:, [0, 2, 4]].copy()
    for node in compressed.nodes:
        compressed.reinfer(node)
    x = np.random.default_rng(1).standard_normal((16, 3, 6, 6)).astype(np.float32)
    result = reconstruct(original, compressed, [x], {"c2": [0, 2, 4]}, ridge=0.0)
    assert result.layers[0].after < 1e-5
    with pytest.raises(InputError, match="kept"):
        reconstruct(original, drop_c1_channels(original), [x], {"c2": [0, 1]})


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(16, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(24, 16, 3, padding=1), nn.BatchNorm2d(16))
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        y = self.stem(x)
        y = torch.relu(y + self.b(self.a(y)))
        return self.head(y.mean((2, 3)))


def residual_graph():
    torch.manual_seed(0)
    graph = trace(Residual().eval(), torch.randn(8, 3, 8, 8))
    PassManager(passes=["fuse"]).run(graph)
    return graph


def pruned(graph, **options):
    g = graph.clone()
    PassManager(passes=[PruneChannels(**options)]).run(g)
    return g


def test_pruning_with_reconstruction_deviates_less():
    graph = residual_graph()
    rng = np.random.default_rng(0)
    calib = rng.standard_normal((128, 3, 8, 8)).astype(np.float32)
    test = rng.standard_normal((8, 3, 8, 8)).astype(np.float32)
    plain = pruned(graph, ratio=0.5)
    rebuilt = pruned(graph, ratio=0.5, calibration_data=calib)
    reference = run(graph, [test])
    dev_plain = deviation(reference, run(plain, [test]))
    dev_rebuilt = deviation(reference, run(rebuilt, [test]))
    assert dev_rebuilt < 0.7 * dev_plain
    info = rebuilt.meta["pruning"]["reconstruction"]
    assert info["layers"] >= 2 and info["samples"] == 128 and info["seconds"] > 0
    assert info["deviation_after"] < info["deviation_before"]
    assert any("least squares" in n for n in rebuilt.meta["notes"])
    assert "reconstruction" not in plain.meta["pruning"]
    # same structure: reconstruction changes weights only
    assert [v.shape for v in plain.constants()] == [v.shape for v in rebuilt.constants()]
    plain_y = pruned(graph, ratio=0.5, calibration_data=calib, reconstruct_residual=False)
    assert deviation(reference, run(plain_y, [test])) < 0.7 * dev_plain
    off = pruned(graph, ratio=0.5, calibration_data=calib, reconstruct=False)
    assert deviation(run(plain, [test]), run(off, [test])) == 0


def test_auto_mode_skips_underdetermined_layers_and_explicit_mode_raises():
    graph = residual_graph()
    calib = np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32)
    g = pruned(graph, ratio=0.5, calibration_data=calib)  # head: 8 rows for 9 unknowns
    info = g.meta["pruning"]["reconstruction"]
    assert any("needs at least 16 samples" in why for why in info["skipped"].values())
    with pytest.raises(InputError, match="at least 16 calibration samples"):
        pruned(graph, ratio=0.5, calibration_data=calib, reconstruct=True)


def test_errors():
    original = redundant_chain()
    compressed = drop_c1_channels(original)
    x = np.random.default_rng(1).standard_normal((16, 3, 6, 6)).astype(np.float32)
    bad = x.copy()
    bad[3, 0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN") as e:
        reconstruct(original, compressed, [bad], ["c2"])
    assert e.value.hint
    with pytest.raises(InputError, match=r"expected \(N, 3, 6, 6\)"):
        reconstruct(original, compressed, [x[:, :2]], ["c2"])
    with pytest.raises(InputError, match="batch is 4"):
        reconstruct(original, compressed, [x[:2]], ["c2"])
    with pytest.raises(OptionError, match="not a node"):
        reconstruct(original, compressed, [x], ["nope"])
    with pytest.raises(OptionError, match="ridge"):
        reconstruct(original, compressed, [x], ["c2"], ridge=-1.0)
    with pytest.raises(OptionError, match="needs calibration data"):
        pruned(residual_graph(), ratio=0.5, reconstruct=True)


def test_grouped_conv_is_refit_per_group():
    """A grouped conv whose weights were perturbed is recovered exactly, group by group."""
    rng = np.random.default_rng(0)
    g = Graph("grouped")
    x = g.add_input("x", (4, 4, 6, 6))
    w = g.constant(rng.standard_normal((6, 2, 3, 3)).astype(np.float32), "w")
    b = g.constant(rng.standard_normal(6).astype(np.float32), "b")
    c = g.add_node("conv2d", [x, w, b], {"padding": (1, 1), "groups": 2}, name="c")
    g.outputs = [c.outputs[0]]
    noisy = g.clone()
    wn = noisy.node("c").inputs[1]
    wn.data = (wn.data + 0.3 * rng.standard_normal(wn.shape)).astype(np.float32)
    data = rng.standard_normal((16, 4, 6, 6)).astype(np.float32)
    result = reconstruct(g, noisy, [data], ["c"], ridge=0.0)
    [fit] = result.layers
    assert fit.features == 2 * 9 + 1 and fit.before > 0.1 and fit.after < 1e-5
    np.testing.assert_allclose(noisy.node("c").inputs[1].data, w.data, atol=1e-4)
