"""The shared budget allocator (compiler/analysis/allocate.py) and its three call sites: rank
selection, mixed precision and pruning to a target."""

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from compiler.analysis import allocate as shared
from compiler.analysis.allocate import BudgetError, Option, allocate, bisect_budget
from compiler.errors import OptionError
from compiler.frontend import trace
from compiler.pass_manager import PassManager
from compiler.report import graph_stats
from passes.factorization import ranks as rs
from passes.factorization.factorize import FactorizeRank
from passes.pruning import prune as prune_module
from passes.pruning.prune import PruneChannels
from passes.quantization import quantize as quantize_module


def brute_force(layers, budget=None, max_error=None):
    """(least error within budget) or (least cost within max_error), over every combination."""
    best = None
    for pick in itertools.product(*[range(len(options)) for options in layers]):
        cost = sum(layers[i][k][0] for i, k in enumerate(pick))
        error = sum(layers[i][k][1] for i, k in enumerate(pick))
        if budget is not None and cost <= budget + 1e-9:
            best = error if best is None else min(best, error)
        if max_error is not None and error <= max_error + 1e-12:
            best = cost if best is None else min(best, cost)
    return best


def random_layers(rng, integral=True):
    layers = []
    for _ in range(rng.integers(1, 5)):
        scale = 1 if integral else 1.37
        layers.append(
            [
                (int(rng.integers(1, 20)) * scale, float(rng.random()))
                for _ in range(rng.integers(1, 6))
            ]
        )
    return layers


def total(layers, picks, column):
    return sum(layers[i][k][column] for i, k in enumerate(picks))


# -- the allocator ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_knapsack_and_best_are_optimal_on_small_cases_and_meet_the_budget(seed):
    rng = np.random.default_rng(seed)
    for trial in range(40):
        layers = random_layers(rng, integral=trial % 2 == 0)
        low = sum(min(c for c, _ in options) for options in layers)
        high = sum(max(c for c, _ in options) for options in layers)
        budget = float(rng.uniform(low, high))
        optimum = brute_force(layers, budget=budget)
        for method in ("greedy", "knapsack", "best"):
            for steps in (None, 3):  # 3 units: the axis rounds, the pick must still fit
                got = allocate(layers, budget, method=method, steps=steps)
                assert got.cost <= budget + 1e-9
                assert got.cost == pytest.approx(total(layers, got.picks, 0))
                assert got.error == pytest.approx(total(layers, got.picks, 1))
                assert got.error >= optimum - 1e-12
                if method != "greedy" and steps is None:
                    assert got.error == pytest.approx(optimum, abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_max_error_gives_the_least_cost_within_it(seed):
    rng = np.random.default_rng(100 + seed)
    for _ in range(40):
        layers = random_layers(rng)
        max_error = float(rng.uniform(0, len(layers)))
        optimum = brute_force(layers, max_error=max_error)
        if optimum is None:
            with pytest.raises(BudgetError, match="max_error=.* is out of reach"):
                allocate(layers, max_error=max_error)
            continue
        for method in ("greedy", "knapsack", "best"):
            got = allocate(layers, max_error=max_error, method=method)
            assert got.error <= max_error + 1e-12
            assert got.cost >= optimum
            if method != "greedy":
                assert got.cost == optimum


def test_greedy_and_knapsack_agree_on_convex_curves():
    rng = np.random.default_rng(7)
    # unit cost steps and convex errors: marginal allocation (the greedy walk) is exact
    layers = [
        [(r, float(np.exp(-a * r))) for r in range(1, 33)] for a in rng.uniform(0.05, 0.5, 12)
    ]
    for budget in (12, 50, 100, 200, 300, 384):
        greedy = allocate(layers, budget, method="greedy")
        knapsack = allocate(layers, budget, method="knapsack")
        assert greedy.error == pytest.approx(knapsack.error, rel=1e-12, abs=1e-15)
        assert greedy.cost <= budget and knapsack.cost <= budget
    # per-layer cost scales: the greedy's last step may leave slack, both stay within 0.1 %
    layers = [
        [(int(s * r), float(r**-p)) for r in range(1, 65)]
        for s, p in zip(rng.integers(10, 1000, 30), rng.uniform(0.5, 2, 30))
    ]
    top = sum(options[-1][0] for options in layers)
    for share in (0.2, 0.5, 0.8):
        greedy = allocate(layers, share * top, method="greedy")
        knapsack = allocate(layers, share * top, method="knapsack")
        assert greedy.error == pytest.approx(knapsack.error, rel=1e-3)


def test_best_is_never_worse_than_greedy_on_non_convex_curves():
    rng = np.random.default_rng(3)
    layers = [
        [(int(s * r), float(1 / (1 + np.exp((r - mid) / 4)))) for r in range(1, 65)]
        for s, mid in zip(rng.integers(10, 1000, 30), rng.uniform(10, 50, 30))
    ]
    top = sum(options[-1][0] for options in layers)
    for share in (0.2, 0.4, 0.6, 0.8):
        greedy = allocate(layers, share * top, method="greedy")
        best = allocate(layers, share * top)
        assert best.cost <= share * top and best.error <= greedy.error


def test_picks_index_the_callers_lists_and_carry_payloads():
    layers = [
        [
            Option(10, 0.0, "full"),
            Option(4, 0.5, "dominated"),
            Option(4, 0.3, "r4"),
            Option(6, 0.3, "worse-than-r4"),
            Option(2, 0.9, "r2"),
        ],
        [(5, 0.0), (3, 0.2), (1, 0.7)],  # tuples: no payload
    ]
    got = allocate(layers, 9)
    assert got.picks == (2, 0) and got.payloads == ("r4", None)
    assert (got.cost, got.error) == (9.0, pytest.approx(0.3))


def test_infeasible_budgets_and_bad_arguments_have_clear_errors():
    layers = [[(4, 0.0), (2, 0.5)], [(3, 0.0), (1, 0.4)]]
    with pytest.raises(
        BudgetError,
        match=r"budget=2 is out of reach.*least summed cost.* is 3"
        r".*Fix: raise budget to at least 3",
    ) as info:
        allocate(layers, 2)
    assert isinstance(info.value, OptionError) and info.value.least == 3
    with pytest.raises(OptionError, match="exactly one of budget= or max_error="):
        allocate(layers)
    with pytest.raises(OptionError, match="exactly one of"):
        allocate(layers, 5, max_error=1.0)
    with pytest.raises(OptionError, match="unknown method 'dp'"):
        allocate(layers, 5, method="dp")
    with pytest.raises(OptionError, match="layer 1 offers no option"):
        allocate([[(1, 0.0)], []], 5)
    with pytest.raises(OptionError, match="non-finite"):
        allocate([[(1, float("nan"))]], 5)
    with pytest.raises(OptionError, match="steps=0"):
        allocate(layers, 5, steps=0)


def test_bisect_budget_finds_the_least_parameter_that_fits():
    def cost(x):  # a non-increasing step function, like a pruned model's MACs vs its ratio
        return 100 - 10 * int(x * 10)

    x = bisect_budget(cost, 65, 0.0, 1.0, steps=20)
    assert cost(x) <= 65 and cost(x - 1e-5) > 65
    assert x == pytest.approx(0.4, abs=1e-5)
    with pytest.raises(BudgetError, match="out of reach") as info:
        bisect_budget(cost, 5, 0.0, 0.99)
    assert info.value.least == 10


# -- the call sites --------------------------------------------------------------------------------


class Spy:
    """Wraps a function and counts its calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 32, 3, padding=1, stride=2)
        self.c3 = nn.Conv2d(32, 32, 3, padding=1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        y = torch.relu(self.c2(torch.relu(self.c1(x))))
        y = torch.relu(y + self.c3(y))
        return self.fc(y.mean((2, 3)))


def net_graph():
    torch.manual_seed(0)
    graph = trace(Net().eval(), torch.randn(1, 3, 16, 16))
    PassManager(passes=["fuse"]).run(graph)
    return graph


@pytest.mark.parametrize("metric", ["macs", "params"])
def test_factorize_reaches_its_budget_through_the_shared_allocator(monkeypatch, metric):
    spy = Spy(shared.allocate)
    monkeypatch.setattr(shared, "allocate", spy)
    g = net_graph()
    out = g.clone()
    PassManager(passes=[FactorizeRank(target=0.5, target_metric=metric)]).run(out)
    assert spy.calls == 1
    ratio = getattr(graph_stats(out), metric) / getattr(graph_stats(g), metric)
    assert 0.45 <= ratio <= 0.5
    with pytest.raises(OptionError, match=r"target 0.01 of macs is unreachable.*keeps 0\.\d+"):
        PassManager(passes=[FactorizeRank(target=0.01)]).run(g.clone())


def test_rank_adapter_is_optimal_where_the_hull_walk_is_not():
    # the walk takes a's steep-but-cheap step first and overshoots; saving 30 in b and c instead
    # costs less error, and no single swap gets there from a's step
    a = [rs.Choice("channel", (1,), 10, 10, 0.5)]
    b = [rs.Choice("channel", (1,), 85, 85, 0.1)]
    c = [rs.Choice("channel", (1,), 85, 85, 0.1)]
    chosen, reached = rs.allocate([a, b, c], [100, 100, 100], 0, 270)
    assert reached == 270 and chosen == [None, b[0], c[0]]
    greedy, reached = rs.allocate([a, b, c], [100, 100, 100], 0, 270, method="greedy")
    assert reached == 210 and greedy == [a[0], None, None]


def test_mixed_precision_allocates_through_the_shared_allocator(monkeypatch):
    spy = Spy(shared.allocate)
    monkeypatch.setattr(shared, "allocate", spy)
    rng = np.random.default_rng(5)
    sizes = [int(n) for n in rng.integers(50, 5000, 7)]
    errors = [[e8, e8 * rng.uniform(5, 30), 0.0] for e8 in rng.lognormal(-6, 1, 7)]
    layers = [[(n * b, e) for b, e in zip((8, 4, 32), row)] for n, row in zip(sizes, errors)]
    for average in (4.5, 6, 9, 20):
        pick = quantize_module.allocate(sizes, errors, (8, 4, None), average_bits=average)
        assert total(layers, pick, 0) <= average * sum(sizes)
        assert total(layers, pick, 1) == pytest.approx(
            brute_force(layers, budget=average * sum(sizes))
        )
    assert spy.calls == 4
    with pytest.raises(OptionError, match="no assignment fits average_bits=3"):
        quantize_module.allocate(sizes, errors, (8, 4, None), average_bits=3)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.a = nn.Sequential(
            nn.Conv2d(16, 24, 3, padding=1), nn.ReLU(), nn.Conv2d(24, 16, 3, padding=1)
        )
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.a(x))
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("scope", ["uniform", "global"])
def test_pruning_to_a_target_bisects_through_the_shared_helper(monkeypatch, scope):
    spy = Spy(bisect_budget)
    monkeypatch.setattr(prune_module, "bisect_budget", spy)
    torch.manual_seed(0)
    g = trace(Residual().eval(), torch.randn(1, 3, 8, 8))
    out = g.clone()
    PassManager(passes=[PruneChannels(target=0.5, scope=scope)]).run(out)
    assert spy.calls == 1
    assert graph_stats(out).macs <= 0.5 * graph_stats(g).macs
    with pytest.raises(
        OptionError,
        match=r"target 0.01 of macs is unreachable: pruning every "
        r"group to its minimum keeps 0\.\d+",
    ):
        PassManager(passes=[PruneChannels(target=0.01, min_channels=4)]).run(g.clone())
