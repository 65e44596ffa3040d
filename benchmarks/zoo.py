"""Run every torchvision classifier through slimgraph and print one `N/80 <check>` line per check.

    python benchmarks/zoo.py                       # all 80 models, all checks, 2 workers
    python benchmarks/zoo.py --models resnet18,vit_b_16 --checks interpreter,onnx
    python benchmarks/zoo.py --checks factorized --workers 1   # `N/80 factorized`

Each model runs in its own worker process (memory is returned after each model). Models use random
weights and the smallest input size the architecture accepts (benchmarks/harness/zoo.py). Results
also go to `--json` (default build/zoo.json), rewritten after every model; `--resume` runs only
the models missing from it.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks.harness.zoo import check_model, zoo_names  # noqa: E402
from benchmarks.isolated import map_isolated  # noqa: E402

# the largest models, spread over the run so that two never share the machine's memory
HEAVY = ("vit_h_14", "regnet_y_128gf", "vit_l_16", "vit_l_32", "regnet_y_32gf")


def sharing_summary(rows: list[dict]) -> str:
    """Median lossy deviation and weight/ONNX compression of the models shared at 4 bits."""
    import statistics

    devs = [r["sharing_deviation"] for r in rows]
    weights = [a / max(b, 1) for a, b in (r["weight_bytes"] for r in rows)]
    onnx = [r["weight_bytes"][0] / max(r["onnx_bytes"], 1) for r in rows]
    return (
        f"shared (4 bits): deviation from the dense graph median {statistics.median(devs):.3f} "
        f"(max {max(devs):.3f}); weight bytes {statistics.median(weights):.2f}x smaller "
        f"(median), ONNX file {statistics.median(onnx):.2f}x smaller than the dense weights"
    )


def factorization_summary(rows: list[dict]) -> str:
    """MACs kept at energy 0.6 and the full-rank deviation of the factorized models."""
    import statistics

    applied = [r for r in rows if r.get("applicable")]
    macs = [r["macs"] for r in applied]
    worst = max(r["full_rank_deviation"] for r in rows)
    return (
        f"factorized: {len(applied)} with conv/linear layers; energy 0.6 keeps "
        f"{statistics.median(macs):.2f} of the MACs (median, {min(macs):.2f}-{max(macs):.2f}); "
        f"full rank matches within {worst:.1e}"
    )


def quantization_summary(rows: list[dict]) -> str:
    """Which integer kernels ORT ran, the share of its time in them, and the int8 deviation."""
    import statistics

    from backends.onnx.quant import is_integer_kernel

    integer = [r for r in rows if any(is_integer_kernel(k) for k in r.get("kernels", ()))]
    shares = [r["integer_share"] for r in rows if "integer_share" in r]
    devs = [r["deviation"] for r in rows]
    return (
        f"quantized: {len(integer)}/{len(rows)} ran integer kernels (QLinear*, QGemm, "
        f"*Integer*), median {statistics.median(shares):.2f} of ORT's kernel time in them; "
        f"deviation from the float graph median {statistics.median(devs):.3f} "
        f"(max {max(devs):.3f})"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="", help="comma-separated subset (default: all 80)")
    ap.add_argument("--checks", default="interpreter,torch,onnx")
    ap.add_argument("--passes", default="fuse")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", default="build/zoo.json")
    ap.add_argument(
        "--resume",
        action="store_true",
        help="keep the results already in --json and run only the models missing",
    )
    args = ap.parse_args()
    names = [m for m in args.models.split(",") if m] or zoo_names()
    results = []
    if args.resume and os.path.exists(args.json):
        with open(args.json) as f:
            results = [r for r in json.load(f) if r["model"] in names]
        done = {r["model"] for r in results}
        names = [n for n in names if n not in done]
    light = [n for n in names if n not in HEAVY]
    heavy = [n for n in names if n in HEAVY]
    order = []
    for i, n in enumerate(light):
        order.append(n)
        if heavy and i % max(1, len(light) // (len(heavy) + 1)) == 0 and i:
            order.append(heavy.pop())
    order += heavy
    checks = tuple(c for c in args.checks.split(",") if c)
    passes = tuple(p for p in args.passes.split(",") if p)
    from tqdm import tqdm

    start = time.perf_counter()
    run_one = functools.partial(check_model, checks=checks, passes=passes)
    jobs = map_isolated(run_one, order, workers=args.workers)
    for name, status, value in tqdm(jobs, total=len(order), desc="zoo", file=sys.stderr):
        r = value if status == "ok" else {"model": name, "error": value, "deviation": {}}
        results.append(r)
        save(results, args.json)  # after every model: a long run that stops can --resume
        if "error" in r:
            tqdm.write(f"{r['model']}: {r['error'][:300]}", file=sys.stderr)
    results.sort(key=lambda r: r["model"])
    total = len(results)
    for key in ("imported", "fused", *checks):
        ok = [r for r in results if r.get(key)]
        devs = [r["deviation"][key] for r in ok if key in r.get("deviation", {})]
        worst = f", worst deviation {max(devs):.1e}" if devs else ""
        failed = sorted(r["model"] for r in results if not r.get(key))
        tail = f"; failed: {', '.join(failed)}" if failed else ""
        print(f"{len(ok)}/{total} {key}{worst}{tail}")
        if key == "shared" and ok:
            print("    " + sharing_summary([r["sharing"] for r in ok]))
        if key == "factorized" and ok:
            print("    " + factorization_summary([r["factorization"] for r in ok]))
        if key == "quantized" and ok:
            print("    " + quantization_summary([r["quantization"] for r in ok]))
    print(f"zoo: {total} models in {time.perf_counter() - start:.0f} s")
    save(results, args.json)
    return 0


def save(results: list[dict], path: str) -> None:
    """Write the results atomically (a reader or a --resume never sees half a file)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
