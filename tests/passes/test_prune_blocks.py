"""prune-blocks: residual branches found on the IR (not behind projection shortcuts), removed
exactly where the branch is zero, the least harmful one chosen, targets met, composition with
prune-channels, transformer blocks, clear errors that leave the graph as it was, and the result in
every backend."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from torch import nn

from compiler import compile
from compiler.errors import InputError, OptionError
from compiler.frontend import trace
from compiler.ir.graph import Graph
from compiler.ir.interpreter import run
from compiler.pass_manager import PassManager, deviation
from compiler.report import graph_stats
from passes.pruning.blocks import PruneBlocks
from passes.pruning.prune import PruneChannels
from passes.pruning.residual import find_blocks
from tests.graph_strategies import graphs_with_inputs


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The graphs here are tiny: the torch modules the pass runs them with (the criteria, the
    proof) are fastest on one thread, and steady on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Basic(nn.Module):
    """conv bn relu conv bn (+ shortcut) relu; a 1x1 strided projection when the shape changes."""

    def __init__(self, c_in, c_out, stride=1, scale=1.0):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False))
        with torch.no_grad():  # the branch's output scale: 0 makes it contribute nothing
            self.bn2.weight.mul_(scale)
            self.bn2.bias.mul_(scale)

    def forward(self, x):
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(y + self.shortcut(x))


class Net(nn.Module):
    def __init__(self, scales=(1.0, 1.0, 1.0, 1.0)):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.layer1 = nn.Sequential(*[Basic(8, 8, scale=s) for s in scales[:2]])
        self.down = Basic(8, 16, stride=2)
        self.layer2 = nn.Sequential(*[Basic(16, 16, scale=s) for s in scales[2:]])
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        y = self.layer2(self.down(self.layer1(torch.relu(self.stem(x)))))
        return self.head(y.mean((2, 3)))


def net(scales=(1.0, 1.0, 1.0, 1.0), fuse=True, batch=2):
    torch.manual_seed(0)
    model = Net(scales).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.running_var, 0.5, 1.5)
            nn.init.uniform_(m.running_mean, -0.2, 0.2)
    graph = trace(model, torch.randn(batch, 3, 8, 8))
    if fuse:
        PassManager(passes=["fuse"]).run(graph)
    return graph


def data(n=32, seed=0, shape=(3, 8, 8)):
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)


def pruned(graph, **options):
    """Prune a copy through the pass manager (verify after the pass) and return it."""
    g = graph.clone()
    PassManager(passes=[PruneBlocks(**options)], example_inputs=[data(2, seed=9)]).run(g)
    return g


def removed(graph):
    return [r["block"] for r in graph.meta["prune_blocks"]["removed"]]


# -- finding and removing blocks -------------------------------------------------------------------


def test_golden_remove_fused_block():
    g = Graph("block")
    x = g.add_input("x", (1, 2, 4, 4))
    rng = np.random.default_rng(0)

    def w(name, o, i):
        return g.constant(rng.standard_normal((o, i, 1, 1)).astype(np.float32), name)

    c1 = g.add_node("conv2d", [x, w("w1", 2, 2)], {"activation": "relu"}, name="c1")
    c2 = g.add_node("conv2d", [c1.outputs[0], w("w2", 3, 2)], {"activation": "relu"}, name="c2")
    c3 = g.add_node(
        "conv2d", [c2.outputs[0], w("w3", 2, 3), None, c1.outputs[0]], {"activation": "relu"}
    )
    c4 = g.add_node("conv2d", [c3.outputs[0], w("w4", 2, 2)], name="c4")
    g.outputs = [c4.outputs[0]]
    [block] = find_blocks(g)
    assert block.nodes == ("c2", c3.name) and block.stream == 3
    PassManager(passes=[PruneBlocks(blocks=1)]).run(g)
    attrs = "dilation=[1, 1], groups=1, padding=[0, 0], stride=[1, 1]"
    assert str(g).splitlines()[-4:] == [
        f"  %c1: float32[1,2,4,4] = conv2d(%x, $w1) {{activation='relu', {attrs}}}",
        f"  %c4: float32[1,2,4,4] = conv2d(%c1, $w4) {{{attrs}}}",
        "  return %c4",
        "}",
    ]


def test_golden_non_idempotent_activation_is_kept():
    g = Graph("block")
    x = g.add_input("x", (1, 2, 4, 4))  # the stream is not a relu output: relu(x) stays
    w = g.constant(np.ones((2, 2, 1, 1), np.float32), "w")
    c = g.add_node("conv2d", [x, w, None, x], {"activation": "relu"}, name="c")
    g.outputs = [c.outputs[0]]
    PassManager(passes=[PruneBlocks(blocks=1)], example_inputs=[data(1, shape=(2, 4, 4))]).run(g)
    assert str(g).splitlines()[-3:] == [
        "  %c_act: float32[1,2,4,4] = relu(%x)",
        "  return %c_act",
        "}",
    ]


@pytest.mark.parametrize("fuse", [True, False])
def test_identity_blocks_found_projection_shortcuts_kept(fuse):
    blocks = find_blocks(net(fuse=fuse))
    assert [b.name for b in blocks] == ["layer1.0", "layer1.1", "layer2.0", "layer2.1"]
    ops = {b.node.split("_")[0] for b in blocks}
    assert ops == ({"conv2d"} if fuse else {"add"})
    if fuse:  # a stage of twice the channels at half the size: every block costs the same
        assert len({b.macs for b in blocks}) == 1


@pytest.mark.parametrize("fuse", [True, False])
def test_removing_a_zero_branch_is_exact(fuse):
    graph = net(scales=(1.0, 0.0, 1.0, 1.0), fuse=fuse)
    x = data(16)
    for criterion in ("output", "entropy", "noise", "weight"):
        options = {"calibration_data": x, "reconstruct": False} if criterion != "noise" else {}
        g = pruned(graph, blocks=1, criterion=criterion, **options)
        assert removed(g) == ["layer1.1"]
        held_out = data(2, seed=5)
        assert deviation(run(graph, [held_out]), run(g, [held_out])) <= 1e-5
        assert graph_stats(g).macs < graph_stats(graph).macs
        assert g.meta["prune_blocks"]["removed"][0]["score"] <= 1e-6


def test_the_least_harmful_block_goes_first():
    graph = net(scales=(1.0, 0.3, 0.05, 1.0))  # layer2.0's branch is small, layer1.1's smaller
    x = data(32)
    for criterion in ("output", "entropy"):
        g = pruned(graph, blocks=1, criterion=criterion, calibration_data=x, reconstruct=False)
        assert removed(g) == ["layer2.0"]
    g = pruned(graph, blocks=2, criterion="output", calibration_data=x, reconstruct=False)
    assert removed(g) == ["layer2.0", "layer1.1"]
    scores = [r["score"] for r in g.meta["prune_blocks"]["removed"]]
    assert 0 < scores[0] < scores[1]  # the second is measured with the first removed
    one_shot = pruned(graph, blocks=2, criterion="output", calibration_data=x, greedy=False)
    assert sorted(removed(one_shot)) == ["layer1.1", "layer2.0"]


def test_target_is_met_and_recorded():
    graph = net()
    base = graph_stats(graph).macs
    g = pruned(graph, target=0.7, calibration_data=data(32))
    info = g.meta["prune_blocks"]
    assert graph_stats(g).macs <= 0.7 * base
    assert info["macs_kept"] == pytest.approx(graph_stats(g).macs / base)
    assert info["candidates"] == 4 and info["criterion"] == "output"  # the default with data
    assert info["mask_deviation"] <= 1e-4
    assert any(n.startswith("prune-blocks: removed") for n in g.meta["notes"])
    no_data = pruned(graph, target=0.7)
    assert no_data.meta["prune_blocks"]["criterion"] == "weight"  # the default without data
    assert "reconstruction" not in no_data.meta["prune_blocks"]
    assert pruned(graph, target=1.0).meta.get("prune_blocks") is None  # nothing to do


def test_reconstruction_refits_the_layers_after_removed_blocks():
    graph = net()
    x, held_out = data(64), data(8, seed=3)
    plain = pruned(graph, blocks=2, calibration_data=x, reconstruct=False)
    refit = pruned(graph, blocks=2, calibration_data=x)
    assert removed(plain) == removed(refit)
    info = refit.meta["prune_blocks"]["reconstruction"]
    assert info["layers"] >= 3 and info["samples"] == 64
    assert info["deviation_after"] < info["deviation_before"]
    reference = np.concatenate([run(graph, [held_out[i : i + 2]])[0] for i in range(0, 8, 2)])

    def dev(g):
        out = np.concatenate([run(g, [held_out[i : i + 2]])[0] for i in range(0, 8, 2)])
        return deviation([reference], [out])

    assert dev(refit) < dev(plain)
    assert [v.shape for v in plain.constants()] == [v.shape for v in refit.constants()]


def test_entropy_and_weight_criteria_and_ignore():
    graph = net()
    x = data(32)
    g = pruned(graph, blocks=2, criterion="entropy", calibration_data=x, ignore=("layer1.*",))
    assert all(name.startswith("layer2.") for name in removed(g))
    assert all(r["score"] >= 0 for r in g.meta["prune_blocks"]["removed"])
    for criterion in ("weight", "noise"):
        g = pruned(graph, blocks=1, criterion=criterion)
        assert len(removed(g)) == 1 and g.meta["prune_blocks"]["criterion"] == criterion


@settings(max_examples=25, deadline=None)
@given(case=graphs_with_inputs())
def test_random_graphs_prune_verify_and_prove(case):
    graph, inputs = case
    for fused in (False, True):
        g = graph.clone()
        if fused:
            PassManager(passes=["fuse"]).run(g)
        blocks = find_blocks(g)
        if not blocks:
            continue
        PassManager(passes=[PruneBlocks(blocks=len(blocks))], example_inputs=inputs).run(g)
        assert g.meta["prune_blocks"]["mask_deviation"] <= 1e-4
        assert [o.shape for o in run(g, inputs)] == [v.shape for v in graph.outputs]
        assert not find_blocks(g)


# -- transformers, composition, backends -----------------------------------------------------------


class Encoder(nn.Module):
    def __init__(self, layers=2, zero=None):
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.layers = nn.Sequential(
            *[
                nn.TransformerEncoderLayer(16, 4, 32, 0.0, batch_first=True, norm_first=True)
                for _ in range(layers)
            ]
        )
        self.head = nn.Linear(16, 3)
        if zero is not None:  # the attention of layer `zero` adds nothing to the stream
            attn = self.layers[zero].self_attn.out_proj
            nn.init.zeros_(attn.weight)
            nn.init.zeros_(attn.bias)

    def forward(self, x):
        return self.head(self.layers(self.embed(x)).mean(1))


def encoder_graph(**kwargs):
    torch.manual_seed(0)
    graph = trace(Encoder(**kwargs).eval(), torch.randn(2, 5, 6))
    PassManager(passes=["fuse"]).run(graph)
    return graph


def test_transformer_attention_and_mlp_blocks():
    graph = encoder_graph(zero=1)
    blocks = find_blocks(graph)
    assert [b.name for b in blocks] == ["layers.0"] * 2 + ["layers.1"] * 2
    assert [graph.node(b.node).op for b in blocks] == ["add", "linear"] * 2
    x = data(16, shape=(5, 6))
    g = pruned_tokens(graph, blocks=1, calibration_data=x, reconstruct=False)
    assert g.meta["prune_blocks"]["removed"][0]["node"] == blocks[2].node
    held_out = data(2, seed=4, shape=(5, 6))
    assert deviation(run(graph, [held_out]), run(g, [held_out])) <= 1e-5
    g = pruned_tokens(graph, target=0.5, calibration_data=data(64, shape=(5, 6)))
    assert graph_stats(g).macs <= 0.5 * graph_stats(graph).macs
    info = g.meta["prune_blocks"]["reconstruction"]
    assert info["layers"] >= 1 and info["deviation_after"] < info["deviation_before"]


def pruned_tokens(graph, **options):
    g = graph.clone()
    PassManager(passes=[PruneBlocks(**options)], example_inputs=[data(2, shape=(5, 6))]).run(g)
    return g


def test_composes_with_prune_channels_both_ways():
    model = Net().eval()
    x = torch.randn(2, 3, 8, 8)
    calib = data(64)
    base = graph_stats(compile(model, x, passes=["fuse"]).graph).macs
    for passes in (
        ["fuse", PruneBlocks(target=0.8), PruneChannels(target=0.6)],
        ["fuse", PruneChannels(ratio=0.5), PruneBlocks(blocks=2)],
    ):
        compiled = compile(model, x, passes=passes, calibration_data=calib)
        assert compiled.graph.meta["prune_blocks"]["removed"]
        assert compiled.graph.meta["pruning"]["mask_deviation"] <= 1e-4
        assert graph_stats(compiled.graph).macs < 0.6 * base
        assert compiled(x).shape == (2, 5)


def test_model_and_pass_are_not_mutated():
    model = Net().eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    option = PruneBlocks(blocks=1)
    compiled = compile(
        model, torch.randn(2, 3, 8, 8), passes=["fuse", option], calibration_data=data(8)
    )
    assert compiled.graph.meta["prune_blocks"]["criterion"] == "output"  # compile's data used
    assert option.calibration_data is None
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    graph = net()
    text = str(graph)
    compile(graph, passes=[PruneBlocks(blocks=2)])
    assert str(graph) == text


@pytest.mark.parametrize("backend", ["torch", "onnx", "numba"])
def test_pruned_model_runs_in_backends(backend):
    x = torch.randn(2, 3, 8, 8)
    compiled = compile(
        Net().eval(),
        x,
        passes=["fuse", PruneBlocks(target=0.6)],
        backend=backend,
        calibration_data=data(16),
    )
    want = run(compiled.graph, [x.numpy()])[0]
    assert deviation([want], [compiled(x).numpy()]) <= 1e-4


# -- errors ----------------------------------------------------------------------------------------


def test_bad_options_have_clear_errors():
    with pytest.raises(OptionError, match="exactly one of"):
        PruneBlocks()
    with pytest.raises(OptionError, match="exactly one of"):
        PruneBlocks(target=0.5, blocks=2)
    for bad in (0, 1.5, -0.2, "half"):
        with pytest.raises(OptionError, match=r"outside \(0, 1\]"):
            PruneBlocks(target=bad)
    for bad in (0, 1.5, True):
        with pytest.raises(OptionError, match="whole number"):
            PruneBlocks(blocks=bad)
    with pytest.raises(OptionError, match="unknown criterion 'l1'"):
        PruneBlocks(blocks=1, criterion="l1")
    with pytest.raises(OptionError, match="score_samples"):
        PruneBlocks(blocks=1, score_samples=0)
    with pytest.raises(OptionError, match="has no option 'blocs'"):
        compile(net(), passes=["prune-blocks(blocs=2)"])


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"blocks": 1, "criterion": "output"}, OptionError, "needs calibration data"),
        ({"blocks": 1, "reconstruct": True}, OptionError, "needs calibration data"),
        ({"blocks": 9}, OptionError, "only 4 residual block"),
        ({"target": 0.1}, OptionError, "unreachable"),
        ({"blocks": 1, "ignore": ("nothing.*",)}, OptionError, "match no removable block"),
        ({"blocks": 1, "calibration_data": data(4, shape=(3, 9, 9))}, InputError, "shape"),
        ({"blocks": 1, "calibration_data": data(1)}, InputError, "at least 2"),
        ({"blocks": 1, "calibration_data": data(4) * np.nan}, InputError, "NaN"),
    ],
)
def test_bad_input_leaves_the_graph_as_it_was(options, error, match):
    graph = net()
    text = str(graph)
    with pytest.raises(error, match=match):
        PassManager(passes=[PruneBlocks(**options)]).run(graph)
    assert str(graph) == text and "prune_blocks" not in graph.meta
    graph.verify()


def test_graph_without_blocks_and_data_checked_before_tracing():
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 2)).eval()
    with pytest.raises(OptionError, match="no removable residual block"):
        compile(plain, torch.randn(1, 3, 8, 8), passes=["fuse", PruneBlocks(blocks=1)])
    with pytest.raises(OptionError, match="criterion 'entropy' needs calibration data"):
        compile(None, None, passes=[PruneBlocks(blocks=1, criterion="entropy")])


def test_a_failure_midway_restores_the_graph(monkeypatch):
    import passes.pruning.blocks as blocks

    graph = net()
    text = str(graph)

    def broken(*args, **kwargs):
        raise RuntimeError("refit failed")

    monkeypatch.setattr(blocks, "refit_layers", broken)
    with pytest.raises(Exception, match="refit failed"):
        PassManager(passes=[PruneBlocks(blocks=2, calibration_data=data(8))]).run(graph)
    assert str(graph) == text
    graph.verify()
