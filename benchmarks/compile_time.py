"""How long tracing, fusing (with the per-pass numeric check) and emitting ONNX take, per stage.

    python benchmarks/compile_time.py                 # resnet50 at 224x224, 3 repeats
    python benchmarks/compile_time.py --model mobilenet_v2 --repeats 5

Prints a table of median seconds per stage and a one-line summary; the target is under 10 s in
total for resnet50 (issue: the spine).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

from backends.onnx.backend import compile_onnx  # noqa: E402
from benchmarks.harness.zoo import build  # noqa: E402
from compiler.frontend.torch_export import export_program, import_program  # noqa: E402
from compiler.pass_manager import PassManager  # noqa: E402


def one_run(model, x) -> dict[str, float]:
    times = {}
    t = time.perf_counter()
    program = export_program(model, (x,))
    times["export+decompose"] = time.perf_counter() - t
    t = time.perf_counter()
    graph = import_program(program)
    graph.verify()
    times["import"] = time.perf_counter() - t
    t = time.perf_counter()
    PassManager(passes=["fuse"], example_inputs=[x.numpy()]).run(graph)
    times["fuse (checked)"] = time.perf_counter() - t
    t = time.perf_counter()
    compile_onnx(graph)
    times["emit onnx"] = time.perf_counter() - t
    times["total"] = sum(times.values())
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    model = build(args.model)
    x = torch.randn(1, 3, args.size, args.size)
    one_run(model, x)  # warm-up: first calls into torch.export import lazily
    runs = [one_run(model, x) for _ in range(args.repeats)]
    for stage in runs[0]:
        print(f"{stage:18s} {statistics.median(r[stage] for r in runs):7.2f} s")
    total = statistics.median(r["total"] for r in runs)
    print(
        f"compile_time: {args.model} {args.size}x{args.size} trace+fuse+onnx median {total:.2f} s"
        " "
        f"over {args.repeats} runs (target < 10 s): {'OK' if total < 10 else 'OVER'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
