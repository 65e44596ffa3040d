"""share-weights: golden IR, 1-D k-means properties, bit packing, backends against the
interpreter, the centroid gradient rule, a fine-tune round trip, errors, two zoo models, and the
output-aware codebooks fit on calibration data (exact centroid solve, lower output error than
weight-only, bad data leaving the graph as it was, every backend running the result)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import backends.numba.codebook as numba_codebook
from backends.numba.backend import compile_numba
from backends.onnx.backend import compile_onnx
from backends.torch.backend import compile_torch, mean_centroid_gradients, to_graph
from compiler.analysis.reconstruct import LayerProblem
from compiler.errors import InputError, OptionError, PassError
from compiler.ir.graph import Graph
from compiler.ir.interpreter import run
from compiler.ops.codebook import pack_indices, packed_size, unpack_indices
from compiler.pass_manager import PassManager, deviation
from passes.cleanup import FoldConstants
from passes.weight_sharing import ShareWeights, kmeans_1d, layer_matrix, solve_centroids

rng = np.random.default_rng(0)


def randn(*shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def conv_net(out1: int = 8, with_bn: bool = False) -> Graph:
    """x -> conv(3->out1, 3x3, relu) [-> batch_norm] -> conv(out1->4, 3x3) -> mean -> linear(4->5)."""
    g = Graph("net")
    x = g.add_input("x", (2, 3, 6, 6))
    c1 = g.add_node(
        "conv2d",
        [
            x,
            g.constant(randn(out1, 3, 3, 3), "conv1.weight"),
            g.constant(randn(out1), "conv1.bias"),
        ],
        {"padding": (1, 1), "activation": None if with_bn else "relu"},
        name="conv1",
        meta={"source": "conv1"},
    )
    y = c1.outputs[0]
    if with_bn:
        bn = g.add_node(
            "batch_norm",
            [
                y,
                *(
                    g.constant(np.abs(randn(out1)) + 0.5, f"bn.{n}")
                    for n in ("scale", "shift", "mean", "var")
                ),
            ],
        )
        y = bn.outputs[0]
    c2 = g.add_node(
        "conv2d",
        [y, g.constant(randn(4, out1, 3, 3), "conv2.weight")],
        {"padding": (1, 1)},
        name="conv2",
        meta={"source": "block.conv2"},
    )
    m = g.add_node("mean", [c2.outputs[0]], {"axes": (2, 3)})
    fc = g.add_node(
        "linear",
        [m.outputs[0], g.constant(randn(5, 4), "fc.weight")],
        name="fc",
        meta={"source": "fc"},
    )
    g.outputs = [fc.outputs[0]]
    g.verify()
    return g


def share(graph: Graph, **options) -> Graph:
    graph = graph.clone()
    PassManager(passes=[ShareWeights(**options)]).run(graph)
    return graph


# -- golden IR ------------------------------------------------------------------------------------

GOLDEN = """\
graph net(
    %x: float32[2,3,6,6],
) {
  $conv1.weight.codebook: float32[1,4]
  $conv1.weight.indices: uint8[54]
  $conv1.bias: float32[8]
  $conv2.weight.codebook: float32[2,4]
  $conv2.weight.indices: uint8[72]
  $fc.weight: float32[5,4]
  %conv1.weight.shared: float32[8,3,3,3] = codebook_lookup($conv1.weight.codebook, $conv1.weight.indices) {bits=2, shape=[8, 3, 3, 3]}
  %conv1: float32[2,8,6,6] = conv2d(%x, %conv1.weight.shared, $conv1.bias) {activation='relu', dilation=[1, 1], groups=1, padding=[1, 1], stride=[1, 1]}
  %conv2.weight.shared: float32[4,8,3,3] = codebook_lookup($conv2.weight.codebook, $conv2.weight.indices) {bits=2, shape=[4, 8, 3, 3]}
  %conv2: float32[2,4,6,6] = conv2d(%conv1, %conv2.weight.shared) {dilation=[1, 1], groups=1, padding=[1, 1], stride=[1, 1]}
  %mean: float32[2,4] = mean(%conv2) {axes=[2, 3], keepdims=False}
  %fc: float32[2,5] = linear(%mean, $fc.weight)
  return %fc
}"""  # noqa: E501


def test_golden_share_small_net():
    # conv1 (216 weights, one codebook), conv2 (288, two groups of 2 output channels), fc (20 < 100)
    shared = conv_net()
    PassManager(
        passes=[
            ShareWeights(bits=2, min_weights=100, ignore=("block.*",)),
            ShareWeights(bits=2, groups=2, min_weights=100),
        ]
    ).run(shared)
    assert str(shared) == GOLDEN
    meta = shared.meta["weight_sharing"]
    assert meta["shared"] == 1 and ("fc.weight", "20 weights < min_weights=100") in meta["skipped"]


def test_shared_weights_are_the_nearest_centroids():
    graph = conv_net()
    shared = share(graph, bits=3, min_weights=0)
    for node in shared.find("codebook_lookup"):
        dense = graph.constants()[
            [c.name for c in graph.constants()].index(node.outputs[0].name.removesuffix(".shared"))
        ].data
        codebook = node.inputs[0].data[0]
        got = run_lookup(node)
        nearest = codebook[np.abs(dense[..., None] - codebook).argmin(-1)]
        np.testing.assert_allclose(got, nearest, rtol=0, atol=1e-6)


def run_lookup(node) -> np.ndarray:
    from compiler.ops.table import get_op

    return get_op("codebook_lookup").run([v.data for v in node.inputs], node.attrs)[0]


# -- k-means ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("init", ["linear", "density", "kmeans++"])
def test_kmeans_sorted_deterministic_nearest(init):
    x = rng.standard_normal(5000) ** 3
    c1, a1 = kmeans_1d(x, 16, init=init, seed=3)
    c2, a2 = kmeans_1d(x, 16, init=init, seed=3)
    np.testing.assert_array_equal(c1, c2)
    np.testing.assert_array_equal(a1, a2)
    assert np.all(np.diff(c1) >= 0)
    distance = np.abs(x[:, None] - c1[None, :])
    assert np.all(distance[np.arange(x.size), a1] <= distance.min(axis=1) + 1e-12)
    # a Lloyd fixed point: each non-empty centroid is the mean of its members
    for j in range(16):
        if np.any(a1 == j):
            assert abs(c1[j] - x[a1 == j].mean()) < 1e-9 * max(1.0, abs(c1[j]))


def test_kmeans_error_decreases_with_bits_and_8_bits_is_near_lossless():
    w = randn(32, 16, 3, 3)  # 4608 weights
    errors = []
    for bits in range(1, 9):
        c, a = kmeans_1d(w, 1 << bits)
        errors.append(float(np.mean((w.reshape(-1) - c[a]) ** 2)))
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    c, a = kmeans_1d(w, 256)
    # 256 centroids for 4608 values: every weight within 1 % of the range of the weights
    assert np.abs(w.reshape(-1) - c[a]).max() <= 0.01 * float(w.max() - w.min())


def test_kmeans_importance_pulls_centroids_to_important_weights():
    x = rng.standard_normal(4000)
    important = np.abs(x) > 2  # the tails, 5 % of the weights
    plain_c, plain_a = kmeans_1d(x, 4)
    weights = np.where(important, 100.0, 1.0)
    c, a = kmeans_1d(x, 4, weights=weights)
    err = lambda cc, aa: float(np.mean((x - cc[aa])[important] ** 2))  # noqa: E731
    assert err(c, a) < 0.5 * err(plain_c, plain_a)


def test_kmeans_errors():
    with pytest.raises(OptionError, match="1 <= k"):
        kmeans_1d(np.zeros(3), 4)
    with pytest.raises(OptionError, match="unknown init"):
        kmeans_1d(np.zeros(8), 2, init="random")
    with pytest.raises(OptionError, match="importance"):
        kmeans_1d(np.zeros(8), 2, weights=-np.ones(8))


# -- packing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_unpack_round_trip(bits):
    for count in (1, 7, 8, 9, 1001):
        idx = rng.integers(0, 1 << bits, count).astype(np.uint8)
        packed = pack_indices(idx, bits)
        assert packed.dtype == np.uint8 and packed.size == packed_size(count, bits)
        np.testing.assert_array_equal(unpack_indices(packed, bits, count), idx)


@pytest.mark.parametrize("opset", [18, 26])
@pytest.mark.parametrize("bits", range(1, 9))
def test_onnx_decode_function_is_exact_at_every_width(bits, opset):
    """Each width's decode function rebuilds the weight exactly in ONNX Runtime (odd counts pad
    the last group of 8; two groups index two codebook rows)."""
    count, groups = 2 * 45, 2
    idx = rng.integers(0, 1 << bits, count).astype(np.uint8)
    g = Graph("decode")
    x = g.add_input("x", (1, count))
    book = g.constant(randn(groups, 1 << bits), "w.codebook")
    node = g.add_node(
        "codebook_lookup",
        [book, g.constant(pack_indices(idx, bits), "w.indices")],
        {"shape": (groups, 45), "bits": bits},
    )
    flat = g.add_node("reshape", [node.outputs[0]], {"shape": (1, count)})
    g.outputs = [g.add_node("add", [x, flat.outputs[0]]).outputs[0]]
    want = np.take_along_axis(book.data, idx.reshape(groups, 45).astype(np.int64), 1)
    model = compile_onnx(g, opset=opset)
    assert {f.name for f in model.model.functions} == {f"CodebookDecode{bits}"}
    (got,) = model.run(np.zeros((1, count), np.float32))
    np.testing.assert_array_equal(got.reshape(groups, 45), want)


def test_pack_layout_is_little_endian_low_bits_first():
    np.testing.assert_array_equal(
        pack_indices(np.array([1, 2, 3, 4, 0, 0, 0, 15]), 4), [0x21, 0x43, 0x00, 0xF0]
    )
    np.testing.assert_array_equal(pack_indices(np.array([1, 2, 3, 0]), 2), [0b00111001, 0])
    with pytest.raises(ValueError, match="does not fit"):
        pack_indices(np.array([4]), 2)


# -- backends --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits, groups", [(2, 1), (3, 2), (4, 4), (8, 1)])
def test_backends_match_the_interpreter(bits, groups):
    graph = share(conv_net(), bits=bits, groups=groups, min_weights=0, ignore=("fc",))
    assert_backends_match_the_interpreter(graph, bits)


def assert_backends_match_the_interpreter(graph: Graph, bits: int) -> None:
    """torch, ONNX Runtime and numba (weights decoded at load and per call) run ``graph`` and
    match the interpreter; each shared layer is one call of the ONNX decode function."""
    x = randn(2, 3, 6, 6)
    (want,) = run(graph, [x])
    with torch.no_grad():
        got_torch = compile_torch(graph)(torch.from_numpy(x)).numpy()
    onnx_model = compile_onnx(graph)
    # each shared layer is one call of the bit width's model-local decode function
    calls = [n for n in onnx_model.model.graph.node if n.domain == "slimgraph"]
    lookups = sum(n.op == "codebook_lookup" for n in graph.nodes)  # at 8 bits conv1 stays dense
    assert lookups >= 1 and [n.op_type for n in calls] == [f"CodebookDecode{bits}"] * lookups
    (function,) = onnx_model.model.functions
    body = {n.op_type for n in function.node}
    unpack = {1: "BitShift", 2: "BitShift", 3: "MatMul", 4: "BitShift", 8: "Cast"}[bits]
    assert unpack in body and "GatherElements" in body
    results = {"torch": got_torch, "onnx": onnx_model.run(x)[0]}
    for mode in ("load", "call"):
        numba_codebook.CODEBOOK_DECODE = mode
        try:
            model = compile_numba(graph)
            results[f"numba-{mode}"] = model.run(x)[0]
            results[f"numba-{mode}-again"] = model.run(x)[0]
        finally:
            numba_codebook.CODEBOOK_DECODE = "load"
    for name, got in results.items():
        assert deviation([want], [got]) <= 1e-5, name


def test_onnx_file_shrinks_and_numba_package_stays_packed(tmp_path):
    g = Graph("big")
    x = g.add_input("x", (1, 64, 4, 4))
    node = g.add_node("conv2d", [x, g.constant(randn(64, 64, 3, 3), "w")], {"padding": (1, 1)})
    g.outputs = [node.outputs[0]]
    dense = compile_onnx(g).model.ByteSize()
    shared = share(g, bits=4)
    assert compile_onnx(shared).model.ByteSize() < dense / 7
    model = compile_numba(shared)
    # the decoded weight is packed for the fp32 micro-kernel on the first call, not at compile time
    assert "KC.pack_weight(" in model.source and "KC.conv2d_planned(" in model.source
    path = model.save(tmp_path / "shared_conv_pkg")  # a module name no other test imports
    with np.load(path / "weights.npz") as f:
        assert {"w.codebook", "w.indices"} <= set(f.files) and "w" not in f.files
        assert not any("packed" in k for k in f.files)
        assert sum(f[k].nbytes for k in f.files) < 64 * 64 * 9 * 4 / 7
    from backends.numba.backend import load_numba

    xs = np.random.default_rng(3).standard_normal((1, 64, 4, 4)).astype(np.float32)
    (want,) = run(shared, [xs])
    for _ in range(2):  # the second call reuses the packed weight
        assert deviation([want], load_numba(path).run(xs)) < 1e-5
        assert deviation([want], model.run(xs)) < 1e-5
    # once packed, the decoded weight (read by this conv alone) is not kept resident
    assert model.model.w["_decoded.w.shared"] is None and "_packed.w.shared" in model.model.w


def test_fold_constants_leaves_the_lookup_alone():
    graph = share(conv_net(), bits=2, min_weights=0)
    before = str(graph)
    assert not FoldConstants().run(graph)
    assert str(graph) == before


# -- fine-tuning the centroids ---------------------------------------------------------------------


def test_centroid_gradient_is_the_sum_over_members():
    graph = share(conv_net(), bits=3, groups=2, min_weights=0)
    lookup = graph.find("codebook_lookup")[1]  # conv2's
    module = compile_torch(graph)
    x = torch.from_numpy(randn(2, 3, 6, 6))
    probe = torch.from_numpy(randn(2, 5))
    (module(x) * probe).sum().backward()
    name = "conv2_weight_codebook"
    got = getattr(module, name).grad.numpy()
    # the same graph with conv2's weight dense (a parameter): its gradient, summed per centroid
    dense = graph.clone()
    dense_lookup = dense.node(lookup.name)
    weight = dense.constant(run_lookup(lookup), "conv2.dense")
    dense.replace_all_uses(dense_lookup.outputs[0], weight)
    dense.erase_node(dense_lookup)
    dense_module = compile_torch(dense)
    (dense_module(x) * probe).sum().backward()
    w_grad = dense_module.conv2_dense.grad.numpy().reshape(2, -1)
    index = unpack_indices(lookup.inputs[1].data, 3, w_grad.size).reshape(2, -1)
    want = np.zeros((2, 8))
    for g in range(2):
        np.add.at(want[g], index[g], w_grad[g])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert isinstance(getattr(module, name), torch.nn.Parameter)
    assert not any("indices" in n for n, _ in module.named_parameters())


def test_mean_centroid_gradients_divides_by_member_counts():
    graph = share(conv_net(), bits=3, groups=2, min_weights=0)
    x = torch.from_numpy(randn(2, 3, 6, 6))
    grads = []
    for scaled in (False, True):
        module = compile_torch(graph)
        if scaled:
            assert len(mean_centroid_gradients(module)) == 3
        module(x).sum().backward()
        grads.append(module.conv2_weight_codebook.grad.numpy())
    lookup = graph.find("codebook_lookup")[1]
    index = unpack_indices(lookup.inputs[1].data, 3, 288).reshape(2, -1)
    members = np.stack([np.bincount(index[g], minlength=8) for g in range(2)])
    np.testing.assert_allclose(grads[1], grads[0] / np.maximum(members, 1), rtol=1e-5, atol=1e-7)


def test_fine_tune_round_trips_into_the_ir():
    graph = share(conv_net(), bits=2, min_weights=0)
    module = compile_torch(graph)
    optimizer = torch.optim.SGD(module.parameters(), lr=1e-3)  # 0.05 diverged to NaN
    x = torch.from_numpy(randn(2, 3, 6, 6))
    for _ in range(3):
        optimizer.zero_grad()
        module(x).square().mean().backward()
        optimizer.step()
    tuned = to_graph(module)
    assert all(np.isfinite(p.detach().numpy()).all() for p in module.parameters())
    assert len(tuned.find("codebook_lookup")) == 3
    before = {c.name: c.data for c in graph.constants()}
    after = {c.name: c.data for c in tuned.constants()}
    assert not np.array_equal(before["conv1.weight.codebook"], after["conv1.weight.codebook"])
    np.testing.assert_array_equal(before["conv1.weight.indices"], after["conv1.weight.indices"])
    np.testing.assert_allclose(
        after["conv1.weight.codebook"], module.conv1_weight_codebook.detach().numpy()
    )
    with torch.no_grad():
        want = module(x).numpy()
    assert deviation([want], run(tuned, [x.numpy()])) <= 1e-5


# -- options, skips and errors ---------------------------------------------------------------------


def test_groups_fall_back_to_a_divisor_of_the_output_channels():
    # conv1 has 8 output channels, conv2 4, fc 5: groups=4 gives 4, 4 and 1 codebooks
    graph = share(conv_net(), bits=1, groups=4, min_weights=0)
    rows = {n.name: n.inputs[0].shape[0] for n in graph.find("codebook_lookup")}
    assert rows == {"conv1.weight.shared": 4, "conv2.weight.shared": 4, "fc.weight.shared": 1}


def test_skips_are_recorded_with_reasons():
    graph = share(conv_net(), bits=5, min_weights=0, skip_first=True, skip_last=True)
    skipped = dict(graph.meta["weight_sharing"]["skipped"])
    assert skipped == {"conv1.weight": "first layer", "fc.weight": "last layer"}
    # conv2 has 288 weights: at 8 bits (256 clusters) one group fits, two groups of 144 do not
    graph = share(conv_net(), bits=8, groups=2, min_weights=0)
    skipped = dict(graph.meta["weight_sharing"]["skipped"])
    assert skipped["conv2.weight"] == "144 weights per group < 256 clusters"
    assert skipped["fc.weight"] == "20 weights per group < 256 clusters"  # 5 rows: 1 group


@pytest.mark.parametrize(
    "options, message",
    [
        ({"bits": 0}, "outside 1..8"),
        ({"bits": 9}, "outside 1..8"),
        ({"groups": 0}, "groups"),
        ({"init": "uniform"}, "unknown init"),
        ({"importance": 3}, "importance"),
    ],
)
def test_bad_options(options, message):
    with pytest.raises(OptionError, match=message):
        ShareWeights(**options)


def test_errors_name_the_layer_and_the_fix():
    with pytest.raises(OptionError, match=r"ignore pattern\(s\) \['nope'\]"):
        share(conv_net(), ignore=("nope",))
    with pytest.raises(OptionError, match="importance for 'conv1.weight' has shape"):
        share(conv_net(), bits=2, min_weights=0, importance={"conv1.weight": np.ones(3)})
    with pytest.raises(PassError, match="run 'fuse' before 'share-weights'"):
        share(conv_net(with_bn=True), bits=2, min_weights=0)
    shared = share(conv_net(with_bn=True), bits=2, min_weights=0, allow_unfused=True)
    assert len(shared.find("batch_norm")) == 1


def test_importance_by_module_path_and_function():
    graph = conv_net()
    w = next(c for c in graph.constants() if c.name == "conv2.weight").data
    by_path = share(graph, bits=2, min_weights=0, importance={"block.conv2": np.abs(w)})
    by_fn = share(graph, bits=2, min_weights=0, importance=lambda node, w: np.abs(w))
    a = next(c for c in by_path.constants() if c.name == "conv2.weight.codebook").data
    b = next(c for c in by_fn.constants() if c.name == "conv2.weight.codebook").data
    plain = next(
        c
        for c in share(graph, bits=2, min_weights=0).constants()
        if c.name == "conv2.weight.codebook"
    ).data
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, plain)


# -- zoo models ------------------------------------------------------------------------------------


@pytest.mark.zoo
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_zoo_model_shared_at_4_bits(name):
    from benchmarks.harness.zoo import check_model

    result = check_model(name, checks=("shared",))
    assert "error" not in result, result["error"]
    r = result["sharing"]
    assert r["shared"] and r["layers"] > 10, r
    assert r["backend_deviation"] <= 1e-4
    assert r["weight_bytes"][1] < r["weight_bytes"][0] / 6
    assert 0 < r["sharing_deviation"] < 1  # lossy, but the same function


def test_the_docs_example_runs():
    """The first Python snippet of docs/weight_sharing.md, as written."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "weight_sharing.md").read_text()
    snippet = text.split("```python\n", 1)[1].split("```", 1)[0]
    scope: dict = {}
    exec(compile(snippet, "docs/weight_sharing.md", "exec"), scope)  # noqa: S102
    assert scope["compiled"].graph.meta["weight_sharing"]["shared"] == 26
    assert scope["y"].shape == (1, 1000)
    assert any(n.endswith("_codebook") for n, _ in scope["module"].named_parameters())


def test_report_counts_a_shared_weight_as_its_weights_and_its_bytes_as_packed():
    from compiler.report import graph_stats

    dense = conv_net(out1=16)
    shared = share(dense, bits=3)
    before, after = graph_stats(dense), graph_stats(shared)
    lookups = shared.find("codebook_lookup")
    codebook_entries = sum(n.inputs[0].numel for n in lookups)
    # same weight count (plus the centroids), not the packed index byte count
    assert after.params == before.params + codebook_entries
    assert after.weight_bytes < before.weight_bytes / 4


def test_pruning_after_sharing_says_why_the_shared_layers_stay():
    from compiler.api import compile
    from passes.pruning.prune import PruneChannels

    shared = share(conv_net(out1=16), bits=4)
    result = compile(shared, passes=[PruneChannels(ratio=0.5)], check=False)
    assert len(result.graph.find("codebook_lookup")) == 2
    assert any(
        "prune-channels: 2 layer(s) with shared weights are not pruned" in n
        and "before share-weights" in n
        for n in result.report.notes
    )


# -- output-aware codebooks (calibration data) -------------------------------------------------------


def anisotropic_inputs(n: int, seed: int) -> np.ndarray:
    """(n, 32) samples whose features differ in scale by 300x and are correlated."""
    r = np.random.default_rng(seed)
    scales = np.logspace(-1.5, 1, 32)
    mix = np.eye(32) + 0.3 * np.random.default_rng(7).standard_normal((32, 32))
    return ((r.standard_normal((n, 32)) @ mix) * scales).astype(np.float32)


def mlp(seed: int = 0) -> Graph:
    """x[8, 32] -> linear(32 -> 24, relu) -> linear(24 -> 6), weights seeded by ``seed``."""
    r = np.random.default_rng(seed)

    def weight(*shape: int) -> np.ndarray:
        return r.standard_normal(shape).astype(np.float32)

    g = Graph("mlp")
    x = g.add_input("x", (8, 32))
    h = g.add_node(
        "linear",
        [x, g.constant(weight(24, 32), "fc1.weight"), g.constant(weight(24), "fc1.bias")],
        {"activation": "relu"},
        name="fc1",
    )
    y = g.add_node(
        "linear",
        [h.outputs[0], g.constant(weight(6, 24), "fc2.weight"), g.constant(weight(6), "fc2.bias")],
        name="fc2",
    )
    g.outputs = [y.outputs[0]]
    return g


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_output_aware_codebooks_beat_weight_only_on_anisotropic_inputs(seed):
    graph = mlp(seed)
    calib, held_out = anisotropic_inputs(256, 0), anisotropic_inputs(256, 1)
    shared = {
        "weight-only": share(graph, bits=2, min_weights=0),
        "output-aware": share(graph, bits=2, min_weights=0, calibration_data=calib),
    }
    want = np.concatenate([run(graph, [b])[0] for b in np.split(held_out, 32)])
    error = {}
    for name, g in shared.items():
        got = np.concatenate([run(g, [b])[0] for b in np.split(held_out, 32)])
        error[name] = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    assert error["output-aware"] < 0.65 * error["weight-only"], error  # 0.54-0.59 measured
    info = shared["output-aware"].meta["weight_sharing"]["reconstruction"]
    assert info["layers"] == 2 and info["samples"] == 256 and not info["skipped"]
    assert info["deviation_after"] < 0.7 * info["deviation_before"]
    for before, after in info["per_layer"].values():
        assert after < before
    assert any(
        n.startswith("share-weights: fit 2 codebook(s)")
        for n in shared["output-aware"].meta["notes"]
    )
    # still codebooks: sorted centroids, 4 per layer, indices packed in 2 bits
    for node in shared["output-aware"].find("codebook_lookup"):
        book = node.inputs[0].data
        assert book.shape == (1, 4) and np.all(np.diff(book[0]) >= 0)
        assert node.inputs[1].data.size == node.outputs[0].numel * 2 // 8


def layer_problem(xs: list[np.ndarray], ys: list[np.ndarray], bias: bool) -> LayerProblem:
    """The accumulated problem of a layer whose conv group ``g`` maps inputs ``xs[g]`` (rows, d)
    to targets ``ys[g]`` (rows, outputs of the group)."""
    cols = [np.concatenate([x, np.ones((len(x), 1))], axis=1) if bias else x for x in xs]
    return LayerProblem(
        node=None,
        groups=len(xs),
        features=xs[0].shape[1],
        bias=bias,
        xtx=np.stack([c.T @ c for c in cols]),
        xty=np.stack([c.T @ y for c, y in zip(cols, ys)]),
        yty=np.concatenate([np.sum(y * y, axis=0) for y in ys]),
        rows=len(xs[0]),
    )


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("conv_groups", [1, 2])
def test_centroid_solve_is_the_least_squares_solution(bias, conv_groups):
    """For fixed indices, the centroids (and biases) are exactly the least-squares fit of the
    layer's outputs: the same as lstsq on the explicit design matrix over (centroids, biases).
    Two codebooks (output rows 0-2 and 3-5); with two conv groups each sees its own inputs."""
    r = np.random.default_rng(0)
    rows, d, outputs, k, groups = 300, 10, 6, 4, 2
    xs = [r.standard_normal((rows, d)) * np.logspace(-1, 1, d) for _ in range(conv_groups)]
    y = r.standard_normal((rows, outputs))
    ys = np.split(y, conv_groups, axis=1)
    index = r.integers(0, k, (outputs, d))
    row_group = np.arange(outputs) // (outputs // groups)
    problem = layer_problem(xs, ys, bias)
    books = solve_centroids(problem, index, row_group, np.zeros((groups, k)))
    m = layer_matrix(problem, books, index, row_group)
    # the explicit problem: y[:, o] = sum_k c[g(o), k] * (x_o @ (index[o] == k)) + b[o]
    design = np.zeros((rows * outputs, groups * k + outputs * bias))
    for o in range(outputs):
        x = xs[o // (outputs // conv_groups)]
        for j in range(k):
            design[o * rows : (o + 1) * rows, row_group[o] * k + j] = x @ (index[o] == j)
        if bias:
            design[o * rows : (o + 1) * rows, groups * k + o] = 1
    solution = np.linalg.lstsq(design, y.T.reshape(-1), rcond=None)[0]
    np.testing.assert_allclose(books.reshape(-1), solution[: groups * k], rtol=1e-8, atol=1e-10)
    if bias:
        np.testing.assert_allclose(m[:, -1], solution[groups * k :], rtol=1e-8, atol=1e-10)
    residual = design @ solution - y.T.reshape(-1)
    expected = np.linalg.norm(residual) / np.linalg.norm(y)
    assert abs(problem.error(m) - expected) < 1e-9


def test_centroid_solve_recovers_a_codebook_exactly():
    """Outputs made by a codebook layer are reproduced exactly from its indices (error ~ 0),
    and a centroid no weight uses keeps its previous value."""
    r = np.random.default_rng(1)
    x = r.standard_normal((200, 12)) * np.logspace(-1, 1, 12)
    book = np.array([[-0.7, -0.1, 0.2, 0.9]])
    index = r.integers(0, 3, (5, 12))  # centroid 3 unused
    b = r.standard_normal(5)
    y = x @ book[0][index].T + b
    problem = layer_problem([x], [y], bias=True)
    got = solve_centroids(problem, index, np.zeros(5, np.int64), np.array([[0.0, 0.0, 0.0, 5.0]]))
    np.testing.assert_allclose(got[0, :3], book[0, :3], atol=1e-9)
    assert got[0, 3] == 5.0
    m = layer_matrix(problem, got, index, np.zeros(5, np.int64))
    np.testing.assert_allclose(m[:, -1], b, atol=1e-9)
    assert problem.error(m) < 1e-9


def test_calibration_data_from_compile_turns_it_on():
    from compiler.api import compile

    graph = conv_net()
    calib = randn(8, 3, 6, 6)
    on = compile(graph, passes=[ShareWeights(bits=2, min_weights=0)], calibration_data=calib)
    info = on.graph.meta["weight_sharing"]["reconstruction"]
    assert info["layers"] == 3 and info["samples"] == 8
    assert any(n.startswith("share-weights: fit 3 codebook(s)") for n in on.report.notes)
    off = compile(
        graph,
        passes=[ShareWeights(bits=2, min_weights=0, reconstruct=False)],
        calibration_data=calib,
    )
    assert "reconstruction" not in off.graph.meta["weight_sharing"]
    plain = share(graph, bits=2, min_weights=0)
    for a, b in zip(off.graph.constants(), plain.constants()):
        np.testing.assert_array_equal(a.data, b.data)


def test_output_aware_result_runs_in_every_backend():
    graph = share(conv_net(), bits=3, groups=2, min_weights=0, calibration_data=randn(8, 3, 6, 6))
    assert graph.meta["weight_sharing"]["reconstruction"]["layers"] == 3
    assert_backends_match_the_interpreter(graph, 3)


def test_too_few_rows_auto_skips_and_explicit_raises():
    # fc (4 inputs, no bias) sees one row per sample: 2 samples are too few for 4 unknowns
    calib = randn(2, 3, 6, 6)
    graph = share(conv_net(), bits=2, min_weights=0, calibration_data=calib)
    info = graph.meta["weight_sharing"]["reconstruction"]
    assert info["layers"] == 2 and "needs at least" in info["skipped"]["fc"]
    assert "1 left weight-only (e.g. fc:" in graph.meta["notes"][-1]
    with pytest.raises(InputError, match="at least 4 calibration samples"):
        share(conv_net(), bits=2, min_weights=0, calibration_data=calib, reconstruct=True)


def test_tied_weights_keep_their_weight_only_codebook():
    """A weight read by two layers has one codebook: no single layer's output may decide it, so
    it stays weight-only (the engine says why) and the other layers are still fit."""
    g = Graph("tied")
    x = g.add_input("x", (4, 16))
    w = g.constant(randn(16, 16), "tied.weight")
    a = g.add_node("linear", [x, w], {"activation": "relu"}, name="a")
    b = g.add_node("linear", [a.outputs[0], w], name="b")
    c = g.add_node("linear", [b.outputs[0], g.constant(randn(8, 16), "c.weight")], name="c")
    g.outputs = [c.outputs[0]]
    shared = share(g, bits=2, min_weights=0, calibration_data=randn(64, 16))
    info = shared.meta["weight_sharing"]["reconstruction"]
    assert info["layers"] == 1 and set(info["skipped"]) == {"a", "b"}
    assert "read by this layer only" in info["skipped"]["a"]
    assert len(shared.find("codebook_lookup")) == 2


@pytest.mark.parametrize(
    "data, error, message",
    [
        (lambda x: x[:, :2], InputError, "has shape"),
        (lambda x: x.astype(np.complex64), InputError, "dtype"),
        (lambda x: np.where(np.arange(x.size).reshape(x.shape) == 5, np.nan, x), InputError, "NaN"),
        (lambda x: np.where(np.arange(x.size).reshape(x.shape) == 5, np.inf, x), InputError, "inf"),
        (lambda x: x[:1], InputError, "batch is 2"),
        (lambda x: x[:0], InputError, "empty|no samples|0 samples"),
    ],
)
def test_bad_calibration_data_leaves_the_graph_untouched(data, error, message):
    graph = conv_net()
    before = str(graph)
    weights = {c.name: c.data.copy() for c in graph.constants()}
    with pytest.raises(error, match=message) as e:
        ShareWeights(bits=2, min_weights=0, calibration_data=data(randn(8, 3, 6, 6))).run(graph)
    assert e.value.hint
    assert str(graph) == before and "weight_sharing" not in graph.meta
    for c in graph.constants():
        np.testing.assert_array_equal(c.data, weights[c.name])


def test_reconstruction_option_errors():
    with pytest.raises(OptionError, match="reconstruct=True needs calibration data"):
        share(conv_net(), bits=2, reconstruct=True)
    assert ShareWeights(reconstruct=True).missing_data()
    with pytest.raises(OptionError, match="importance= weighs the weight-only k-means"):
        share(
            conv_net(),
            bits=2,
            importance=lambda n, w: np.abs(w),
            calibration_data=randn(8, 3, 6, 6),
        )
    with pytest.raises(OptionError, match="reconstruct_ridge"):
        ShareWeights(reconstruct_ridge=0.0)
    with pytest.raises(OptionError, match="reconstruct_iterations"):
        ShareWeights(reconstruct_iterations=-1)


def test_grouped_conv_and_several_codebooks_per_layer():
    """A grouped conv (each conv group of outputs sees its own input channels) with two
    codebooks, each spanning two conv groups: solved per conv group and per codebook."""
    r = np.random.default_rng(3)
    g = Graph("grouped")
    x = g.add_input("x", (4, 4, 6, 6))
    w, b = r.standard_normal((8, 1, 3, 3)), r.standard_normal(8)
    c = g.add_node(
        "conv2d",
        [x, g.constant(w.astype(np.float32), "dw.weight"), g.constant(b.astype(np.float32), "b")],
        {"padding": (1, 1), "groups": 4},
        name="dw",
    )
    g.outputs = [c.outputs[0]]
    scale = np.array([0.1, 1.0, 3.0, 0.3])[:, None, None]
    calib = (r.standard_normal((16, 4, 6, 6)) * scale).astype(np.float32)
    shared = share(g, bits=2, groups=2, min_weights=0, calibration_data=calib)
    info = shared.meta["weight_sharing"]["reconstruction"]
    ((before, after),) = info["per_layer"].values()
    assert info["layers"] == 1 and after < before
    (lookup,) = shared.find("codebook_lookup")
    assert lookup.inputs[0].shape == (2, 4)
