"""Channel groups and the prune-channels pass: coupled channels found as groups, pruned graphs match
their masked originals, bad options get clear errors."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from torch import nn

from compiler import compile
from compiler.errors import OptionError
from compiler.frontend import trace
from compiler.ir.graph import Graph
from compiler.ir.interpreter import run
from compiler.pass_manager import PassManager
from passes.pruning.groups import ChannelGroups, refine
from passes.pruning.prune import PruneChannels
from tests.graph_strategies import graphs_with_inputs


def traced(model, *shape):
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    graph = trace(model.eval(), torch.randn(*shape))
    PassManager(passes=["fuse"]).run(graph)
    return graph


def prune(graph, **options):
    """Prune a copy (the pass proves mask equivalence itself) and return it."""
    pruned = graph.clone()
    PassManager(passes=[PruneChannels(**options)]).run(pruned)
    return pruned


def sizes(graph):
    return sorted(len(g) for g in ChannelGroups(graph).groups)


def test_refine_factorizations():
    assert refine((768,), (12, 64)) == (12, 64)
    assert refine((3, 768), (3, 12, 64)) == (3, 12, 64)
    assert refine((2, 3), (3, 2)) is None


def test_golden_prune_small_chain():
    g = Graph("chain")
    x = g.add_input("x", (1, 2, 4, 4))
    rng = np.random.default_rng(0)
    w1 = g.constant(rng.standard_normal((4, 2, 1, 1)).astype(np.float32), "w1")
    w1.data = w1.data * np.array([1, 0.01, 2, 0.02], np.float32)[:, None, None, None]
    w2 = g.constant(rng.standard_normal((3, 4, 1, 1)).astype(np.float32), "w2")
    c1 = g.add_node("conv2d", [x, w1], {"activation": "relu"}, name="c1")
    c2 = g.add_node("conv2d", [c1.outputs[0], w2], name="c2")
    g.outputs = [c2.outputs[0]]
    PassManager(passes=[PruneChannels(ratio=0.5, criterion="l1")]).run(g)
    assert (
        str(g)
        == """graph chain(
    %x: float32[1,2,4,4],
) {
  $w1: float32[2,2,1,1]
  $w2: float32[3,2,1,1]
  %c1: float32[1,2,4,4] = conv2d(%x, $w1) {activation='relu', dilation=[1, 1], groups=1, padding=[0, 0], stride=[1, 1]}
  %c2: float32[1,3,4,4] = conv2d(%c1, $w2) {dilation=[1, 1], groups=1, padding=[0, 0], stride=[1, 1]}
  return %c2
}"""
    )
    assert g.meta["pruning"]["mask_deviation"] <= 1e-4


class Residual(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.a = nn.Sequential(
            nn.Conv2d(c, 12, 3, padding=1),
            nn.BatchNorm2d(12),
            nn.ReLU(),
            nn.Conv2d(12, c, 3, padding=1),
            nn.BatchNorm2d(c),
        )
        self.b = nn.Sequential(nn.Conv2d(c, 6, 1), nn.ReLU(), nn.Conv2d(6, c, 1))
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.a(x))
        x = x + self.b(x)
        return self.head(x.mean((2, 3)))


def test_residual_stream_is_one_group():
    g = traced(Residual(), 1, 3, 8, 8)
    # stream (stem + both blocks' outputs), block a's inner 12, block b's inner 6
    assert sizes(g) == [6, 8, 12]
    pruned = prune(g, ratio=0.5)
    assert sizes(pruned) == [3, 4, 6]
    inner = prune(g, ratio=0.5, shortcut=False)
    assert sizes(inner) == [3, 6, 8]  # the stream (8) kept


class Mixed(nn.Module):
    """Concat, depthwise and grouped convs, channel shuffle, SE gate, option-A pad, flatten->linear."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(3, 4, 3, padding=1)
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.gc = nn.Conv2d(12, 12, 1, groups=3)
        self.se1 = nn.Conv2d(12, 4, 1)
        self.se2 = nn.Conv2d(4, 12, 1)
        self.down = nn.Conv2d(12, 24, 3, stride=2, padding=1)
        self.fc = nn.Linear(24 * 4 * 4, 10)

    def forward(self, x):
        y = torch.cat([torch.relu(self.c1(x)), torch.relu(self.c2(x))], 1)
        y = self.gc(self.dw(y))
        n, c, h, w = y.shape
        y = y.view(n, 3, c // 3, h, w).transpose(1, 2).reshape(n, c, h, w)  # shuffle
        y = y * torch.sigmoid(self.se2(torch.relu(self.se1(y.mean((2, 3), keepdim=True)))))
        short = nn.functional.pad(y[:, :, ::2, ::2], (0, 0, 0, 0, 6, 6))
        y = torch.relu(self.down(y) + short)
        return self.fc(torch.flatten(y, 1))


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_mixed_couplings_prune_and_stay_equivalent(ratio):
    g = traced(Mixed(), 1, 3, 8, 8)
    groups = ChannelGroups(g)
    assert len(groups.groups) >= 4
    pruned = prune(g, ratio=ratio)
    assert pruned.meta["pruning"]["mask_deviation"] <= 1e-4
    assert pruned.outputs[0].shape == g.outputs[0].shape
    assert sum(c.numel for c in pruned.constants()) < sum(c.numel for c in g.constants())


def test_attention_heads_and_hidden_units():
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    g = traced(layer, 1, 5, 16)
    pruned = prune(g, ratio=0.5)
    assert pruned.meta["pruning"]["mask_deviation"] <= 1e-4
    lin = [n for n in pruned.nodes if n.op == "linear"]
    assert lin[0].inputs[1].shape[0] < 48  # in_proj lost rows (heads or head dims)
    assert any(n.inputs[1].shape[0] == 16 for n in lin)  # hidden 32 -> 16
    att = pruned.find("attention")[0]
    assert att.attrs["scale"] == pytest.approx(1 / np.sqrt(4))  # the original head dim's scale


def test_layer_scale_and_layer_norm():
    class Block(nn.Module):  # ConvNeXt-style: the stream goes through a layer norm (blocked)
        def __init__(self):
            super().__init__()
            self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.norm = nn.LayerNorm(8)
            self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(32, 8)
            self.gamma = nn.Parameter(torch.rand(8, 1, 1))

        def forward(self, x):
            y = self.norm(self.dw(x).permute(0, 2, 3, 1))
            y = self.fc2(nn.functional.gelu(self.fc1(y))).permute(0, 3, 1, 2)
            return x + self.gamma * y

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.block, self.head = nn.Conv2d(3, 8, 1), Block(), nn.Linear(8, 4)

        def forward(self, x):
            return self.head(self.block(self.stem(x)).mean((2, 3)))

    g = traced(Net(), 1, 3, 6, 6)
    assert sizes(g) == [32]  # only the MLP hidden units: the stream feeds a layer norm
    pruned = prune(g, ratio=0.5)
    assert sizes(pruned) == [16]


@settings(max_examples=25, deadline=None)
@given(case=graphs_with_inputs())
def test_random_graphs_prune_verify_and_prove(case):
    graph, inputs = case
    for ratio in (0.3, 0.6):
        pruned = graph.clone()
        PassManager(passes=[PruneChannels(ratio=ratio)]).run(pruned)  # verifies and proves
        assert pruned.outputs[0].shape == graph.outputs[0].shape
        assert run(pruned, inputs)[0].shape == graph.outputs[0].shape


@pytest.mark.parametrize(
    "criterion", ["l1", "l2", "fpgm", "random", "activation", "apoz", "di", "taylor", "energy"]
)
def test_criteria_run(criterion):
    g = traced(Residual(), 2, 3, 8, 8)
    data = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)
    pruned = prune(
        g, ratio=0.5, criterion=criterion, calibration_data=data, labels=np.array([0, 1, 0, 1])
    )
    assert sizes(pruned) == [3, 4, 6]


def test_energy_criterion_weighs_weights_by_the_activations_they_multiply():
    """c1's channel 0 has the largest weights downstream but is almost never active: l2 keeps it,
    energy (E[x_c^2] |W[:, c]|^2) removes it."""
    g = Graph("energy")
    x = g.add_input("x", (2, 2, 4, 4))
    w1 = np.zeros((4, 2, 1, 1), np.float32)
    w1[:, 0, 0, 0] = [1e-3, 1.0, 1.0, 1.0]  # channel 0 barely responds
    c1 = g.add_node("conv2d", [x, g.constant(w1, "w1")], {"activation": "relu"}, name="c1")
    w2 = np.ones((3, 4, 1, 1), np.float32)
    w2[:, 0] = 5.0  # ... but c2 weighs it heavily
    w2[:, 3] = 0.5
    c2 = g.add_node("conv2d", [c1.outputs[0], g.constant(w2, "w2")], name="c2")
    g.outputs = [c2.outputs[0]]
    data = np.abs(np.random.default_rng(0).standard_normal((4, 2, 4, 4))).astype(np.float32)
    by_energy = prune(
        g, ratio=0.25, criterion="energy", calibration_data=data, reconstruct=False, prove=False
    )
    by_l2 = prune(g, ratio=0.25, criterion="l2", prove=False)
    kept = by_energy.node("c2").inputs[1].data[0, :, 0, 0]
    assert sorted(kept.tolist()) == [0.5, 1.0, 1.0]  # channel 0 went
    assert 5.0 in by_l2.node("c2").inputs[1].data  # l2 kept it


def test_bn_scale_needs_batch_norms():
    g = traced(Residual(), 1, 3, 8, 8)
    with pytest.raises(OptionError, match="before the fuse passes"):
        prune(g, ratio=0.5, criterion="bn_scale")
    unfused = trace(Residual().eval(), torch.randn(1, 3, 8, 8))
    PassManager(passes=[PruneChannels(ratio=0.5, criterion="bn_scale")]).run(unfused)


def test_user_criterion_is_a_function():
    def widest_last(analysis, group, ctx):
        return np.arange(len(group), dtype=float)

    g = traced(Residual(), 1, 3, 8, 8)
    assert sizes(prune(g, ratio=0.5, criterion=widest_last)) == [3, 4, 6]


def test_target_round_to_and_ignore():
    g = traced(Residual(c=16), 1, 3, 8, 8)
    base = sum(1 for _ in g.nodes)
    pruned = prune(g, target=0.5, scope="global", round_to=4)
    from compiler.report import graph_stats

    assert graph_stats(pruned).macs <= 0.5 * graph_stats(g).macs
    assert all(n % 4 == 0 or n == 6 for n in sizes(pruned)) and base
    kept = prune(g, ratio=0.5, ignore=("a.*",))
    assert 12 in sizes(kept)


def test_bad_options_have_clear_errors():
    with pytest.raises(OptionError, match=r"outside \[0, 1\)"):
        PruneChannels(ratio=1.2)
    with pytest.raises(OptionError, match="exactly one of"):
        PruneChannels()
    g = traced(Residual(), 1, 3, 8, 8)
    with pytest.raises(OptionError, match="needs calibration data"):
        prune(g, ratio=0.5, criterion="activation")
    with pytest.raises(OptionError, match="needs labels"):
        prune(g, ratio=0.5, criterion="taylor", calibration_data=np.zeros((1, 3, 8, 8)))
    with pytest.raises(OptionError, match="match no prunable layer"):
        prune(g, ratio=0.5, ignore=("nothing.here",))
    with pytest.raises(OptionError, match="unreachable"):
        prune(g, target=0.01, min_channels=4)


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_pruned_model_runs_in_backends(backend):
    model = Residual().eval()
    x = torch.randn(1, 3, 8, 8)
    compiled = compile(model, x, passes=["fuse", PruneChannels(ratio=0.5)], backend=backend)
    out = compiled(x)
    assert out.shape == (1, 5)
    np.testing.assert_allclose(
        out.numpy(), run(compiled.graph, [x.numpy()])[0], rtol=1e-4, atol=1e-5
    )


def test_compile_hands_its_calibration_data_to_a_data_driven_criterion():
    model = Residual().eval()
    x = torch.randn(1, 3, 8, 8)
    calib = np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32)
    spec = "prune-channels(ratio=0.5, criterion='activation')"  # buildable without data
    compiled = compile(model, x, passes=["fuse", spec], calibration_data=calib)
    assert compiled.graph.meta["pruning"]["mask_deviation"] <= 1e-4
    with pytest.raises(OptionError, match="needs calibration data"):
        compile(model, x, passes=["fuse", spec])
