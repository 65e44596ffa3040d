"""Benchmark tools: the zoo runs' process isolation (one model that kills its process fails alone)
and the layer benchmark's run of one fused layer in both backends."""

import os
import signal

from benchmarks.isolated import map_isolated


def square_or_die(n: int) -> int:
    if n == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # what the kernel's out-of-memory killer does
    if n == 3:
        raise ValueError("bad model")
    return n * n


def test_a_killed_worker_fails_only_its_item():
    results = {
        item: (status, value) for item, status, value in map_isolated(square_or_die, range(6))
    }
    assert results[2][0] == "died" and "SIGKILL" in results[2][1]
    assert results[3] == ("error", "ValueError: bad model")
    assert {k: v for k, v in results.items() if k not in (2, 3)} == {
        0: ("ok", 0),
        1: ("ok", 1),
        4: ("ok", 16),
        5: ("ok", 25),
    }


def test_layer_benchmark_runs_a_fused_layer_in_both_backends():
    # benchmarks/layers.py: a conv with its residual and relu, traced and fused, in numba and in
    # ONNX Runtime; bench_layer itself compares the two outputs before timing them
    from benchmarks.layers import bench_layer, parse

    (spec,) = parse("8,16,10,3,2,1,res")
    result = bench_layer(*spec, threads=1, repeats=3)
    assert result["layer"] == "8->16 3x3/2 g1 @10 +res"
    assert result["macs"] == 16 * 5 * 5 * 8 * 9
    assert result["numba"] > 0 and result["ort"] > 0
