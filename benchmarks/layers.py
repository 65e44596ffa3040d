"""Single conv layers in slimgraph's numba backend against ONNX Runtime, side by side in one run.

    python benchmarks/layers.py                      # MobileNetV2's and ResNets' layer shapes
    python benchmarks/layers.py --layers 144,24,56,1,1,1,res --threads 2 --repeats 200

Each layer is a torch module (a conv, with ``res`` a residual input added, then a relu) traced by
slimgraph with the ``fuse`` preset, so both backends run what a model's layer becomes: numba's
generated forward (the fused conv kernel) and an ORT session of the emitted ONNX (all graph
optimizations). The two take turns in blocks of calls (``latency.measure``), and the medians are
printed with their ratio. A one-layer ORT session pays the reorders into and out of its blocked
NCHWc layout that a whole model pays once, so a ratio here is a bound on the kernel, not the
model's figure. Random weights; times include each backend's per-call overhead (~5-15 us)."""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import compiler  # noqa: E402
from benchmarks.latency import measure, ort_session  # noqa: E402

# (in channels, out channels, plane size, kernel, stride, groups, residual)
DEFAULT = (
    "32,16,112,1,1,1,-;16,96,112,1,1,1,-;96,96,112,3,2,96,-;144,24,56,1,1,1,res;"
    "144,144,56,3,1,144,-;24,144,56,1,1,1,-;192,32,28,1,1,1,res;576,96,14,1,1,1,res;"
    "960,160,7,1,1,1,res;320,1280,7,1,1,1,-;64,64,56,3,1,1,res;256,256,14,3,1,1,-;"
    "512,512,7,3,1,1,res;16,16,32,3,1,1,res;64,64,8,3,1,1,-"
)


class Layer(torch.nn.Module):
    def __init__(self, c: int, o: int, k: int, stride: int, groups: int, res: bool) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(c, o, k, stride, k // 2, groups=groups)
        self.res = res

    def forward(self, x, r=None):
        y = self.conv(x)
        return torch.relu(y + r if self.res else y)


def parse(spec: str) -> list[tuple]:
    layers = []
    for item in spec.split(";"):
        c, o, h, k, s, g, res = item.split(",")
        layers.append((int(c), int(o), int(h), int(k), int(s), int(g), res == "res"))
    return layers


def bench_layer(c, o, h, k, s, g, res, threads: int, repeats: int) -> dict:
    torch.manual_seed(0)
    layer = Layer(c, o, k, s, g, res).eval()
    x = torch.randn(1, c, h, h)
    oh = (h + 2 * (k // 2) - k) // s + 1
    inputs = (x, torch.randn(1, o, oh, oh)) if res else (x,)
    compiled = compiler.compile(layer, inputs, passes=["fuse"], backend="numba")
    graph, numba_model = compiled.graph, compiled.artifact
    session = ort_session(graph, threads)
    feed = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs, strict=True)}
    arrays = [t.numpy() for t in inputs]
    got, want = numba_model.run(*arrays)[0], session.run(None, feed)[0]
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * float(np.abs(want).max()))
    fns = {"ort": lambda: session.run(None, feed), "numba": lambda: numba_model.run(*arrays)}
    times = measure(fns, threads, repeats, per_block=8)
    return {
        "layer": f"{c}->{o} {k}x{k}/{s} g{g} @{h}{' +res' if res else ''}",
        "macs": o * oh * oh * c // g * k * k,
        **times,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--layers",
        default=DEFAULT,
        help="';'-separated c,o,h,k,stride,groups,res|- (default: %(default)s)",
    )
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--repeats", type=int, default=100)
    args = parser.parse_args()
    ratios = []
    print(f"{'layer':38s} thr   ort us  numba us  nb/ort  numba GMAC/s")
    for threads in (int(t) for t in args.threads.split(",")):
        for spec in parse(args.layers):
            r = bench_layer(*spec, threads, args.repeats)
            ratios.append(r["numba"] / r["ort"])
            print(
                f"{r['layer']:38s} {threads:3d} {r['ort'] * 1e6:8.1f} {r['numba'] * 1e6:9.1f} "
                f"{ratios[-1]:7.2f}  {r['macs'] / r['numba'] / 1e9:8.1f}",
                flush=True,
            )
    print(
        f"summary: numba takes {statistics.median(ratios):.2f}x a one-layer ORT session's time "
        f"(median; {min(ratios):.2f}-{max(ratios):.2f}) over {len(ratios)} layer runs"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
