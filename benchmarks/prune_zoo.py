"""Prune every torchvision classifier (uniform 30 %, uniform 50 %, global 50 % MAC target) and print
`N/80 pruned`, `N/80 mask-equivalent` and `N/80 runs` (interpreter, torch, ONNX Runtime) per config.

    python benchmarks/prune_zoo.py [--models resnet18,vit_b_16] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks.harness.zoo import PRUNE_CONFIGS, check_pruning, zoo_names  # noqa: E402
from benchmarks.isolated import map_isolated  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", default="build/prune_zoo.json")
    args = ap.parse_args()
    names = [m for m in args.models.split(",") if m] or zoo_names()
    from tqdm import tqdm

    results = []
    start = time.perf_counter()
    jobs = map_isolated(check_pruning, names, workers=args.workers)
    for name, status, value in tqdm(jobs, total=len(names), desc="prune zoo", file=sys.stderr):
        r = value if status == "ok" else {"model": name, "error": value}
        results.append(r)
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:  # after every model, so a cut-short run keeps its data
            json.dump(results, f, indent=1)
        errors = [
            f"{k}: {v['error']}" for k, v in r.items() if isinstance(v, dict) and "error" in v
        ]
        if "error" in r:
            errors.append(r["error"])
        for e in errors:
            tqdm.write(f"{r['model']}: {e[:300]}", file=sys.stderr)
    results.sort(key=lambda r: r["model"])
    total = len(results)
    for config in PRUNE_CONFIGS:
        rows = [r.get(config, {}) for r in results]
        for key in ("pruned", "mask-equivalent", "runs"):
            failed = sorted(r["model"] for r in results if not r.get(config, {}).get(key))
            tail = f"; failed: {', '.join(failed)}" if failed else ""
            print(f"{total - len(failed)}/{total} {key} ({config}){tail}")
        macs = [r["macs"] for r in rows if "macs" in r]
        if macs:
            print(
                f"    {config}: median MACs kept {statistics.median(macs):.2f}, "
                f"range {min(macs):.2f}-{max(macs):.2f}"
            )
    print(f"prune_zoo: {total} models in {time.perf_counter() - start:.0f} s")
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
