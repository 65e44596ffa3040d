"""CPU latency of torch eager, ONNX Runtime and slimgraph's numba backend, side by side in one run.

    python benchmarks/latency.py       # resnet18, resnet50, mobilenet_v2, resnet56, pruned too
    python benchmarks/latency.py --models resnet18 --threads 1 --batches 1 --repeats 30 --prune 0
    python benchmarks/latency.py --quick   # resnet18, mobilenet_v2, resnet56 at batch 1, 2 threads

For every model, batch and thread count the three backends take turns in blocks of 4 calls over as
many rounds as the repeats need (so drift on a shared machine hits all three alike) and the medians
are printed with their ratios. A peak SGEMM GFLOP/s is measured in the same process (the best of
numpy's and torch's BLAS on a large square product) and each backend's achieved GFLOP/s is given as
a fraction of it. The numba package is also saved and loaded in fresh processes: the first compiles
the kernels (JIT), the second loads them from numba's cache (its time is split into importing numpy
and numba, which every numba program pays, and the package's own import, load and first run), a
third where SciPy cannot be imported (numpy and numba only; where SciPy is installed numba imports
it on first use, 0.25-0.4 s, though the kernels never call BLAS). All
models use random weights and the ``fuse`` preset; with ``--prune F`` each model is also run pruned
by ``prune-channels`` to F of its MACs (global L1 ranking, shortcut-coupled groups, widths rounded
to 8), where torch eager is the pruned model's torch module (``backends/torch/backend.py``)."""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numba  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import backends.numba.kernels.common  # noqa: E402,F401  (picks numba's threading layer before any launch)

BACKENDS = ("torch", "ort", "numba")
# --quick: the batch-1, 2-thread rows that the numba/ORT target is read on, without the
# fresh-process load timings (a few minutes on 2 cores)
QUICK = (
    "--models",
    "resnet18,mobilenet_v2,resnet56",
    "--threads",
    "2",
    "--batches",
    "1",
    "--repeats",
    "10",
    "--no-load",
)


def build(name: str, size: int):
    """(model, input size) for a torchvision name or ``resnet56`` (CIFAR, 32x32); None if absent."""
    if name == "resnet56":
        try:
            from benchmarks.harness.cifar import cifar_resnet
        except ImportError:
            return None
        torch.manual_seed(0)
        return cifar_resnet(56).eval(), 32
    from benchmarks.harness.zoo import build as build_zoo

    return build_zoo(name), size


def blas_threads(n: int) -> None:
    """Set every BLAS in the process to ``n`` threads (torch's MKL, numpy's OpenBLAS)."""
    import ctypes
    import glob

    torch.set_num_threads(n)
    libs = os.path.join(os.path.dirname(os.path.dirname(np.__file__)), "numpy.libs")
    for path in glob.glob(os.path.join(libs, "libscipy_openblas*.so*")):
        lib = ctypes.CDLL(path)
        for fn in ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads"):
            if hasattr(lib, fn):
                getattr(lib, fn)(n)


def threading_layer() -> str:
    """The layer numba launches parallel regions on (it is chosen at the first launch)."""

    @numba.njit(parallel=True)
    def launch(a):
        for i in numba.prange(a.shape[0]):
            a[i] = i

    launch(np.zeros(2))
    return numba.threading_layer()


def peak_sgemm(threads: int, n: int = 2048, repeats: int = 5) -> float:
    """Best fp32 GFLOP/s of numpy's and torch's matmul on n x n matrices."""
    blas_threads(threads)
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    best = 0.0
    ta = torch.from_numpy(a)
    for mm in (lambda: a @ a, lambda: torch.mm(ta, ta)):
        mm()
        t = min(timed(mm) for _ in range(repeats))
        best = max(best, 2 * n**3 / t / 1e9)
    return best


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def ort_session(graph, threads: int):
    import onnxruntime as ort

    from backends.onnx.backend import emit_onnx

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    model = emit_onnx(graph).SerializeToString()
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def runners(model, graph, numba_model, x: torch.Tensor, threads: int) -> dict:
    """One zero-argument callable per backend, for ``threads`` threads."""
    session = ort_session(graph, threads)
    feed = {session.get_inputs()[0].name: x.numpy()}
    xn = x.numpy()

    def run_torch():
        with torch.inference_mode():
            model(x)

    return {
        "torch": run_torch,
        "ort": lambda: session.run(None, feed),
        "numba": lambda: numba_model.run(xn),
    }


def measure(fns: dict, threads: int, repeats: int, per_block: int = 4) -> dict[str, float]:
    """Median seconds per backend. Backends take turns in blocks of ``per_block`` calls, in a
    rotated order each round; before each block a pause lets the previous backend's spinning pool
    threads (OpenMP, ONNX Runtime) fall asleep, since on 2 cores they would otherwise steal the
    next one's cores. Short blocks: on a shared host a slow spell lasts seconds, and three rounds
    of 7 calls let one land on a single backend (the same ratio moved 1.00-1.27 between runs)."""
    torch.set_num_threads(threads)
    numba.set_num_threads(threads)
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    rounds = max(3, -(-repeats // per_block))
    per_block = -(-repeats // rounds)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            time.sleep(0.3)
            fns[name]()
            times[name] += [timed(fns[name]) for _ in range(per_block)]
    return {k: statistics.median(v) for k, v in times.items()}


# a user's environment with numpy and numba only: SciPy blocked (numba imports it on first use when
# it is installed, to look for BLAS, which the kernels do not call)
NO_SCIPY = textwrap.dedent("""
    import sys
    class NoScipy:
        def find_spec(self, name, path=None, target=None):
            if name == "scipy" or name.startswith("scipy."):
                raise ImportError(name)
    sys.meta_path.insert(0, NoScipy())
""")
LOAD_SCRIPT = textwrap.dedent("""
    import sys, time
    start = time.perf_counter()
    sys.path.insert(0, {parent!r})
    import numpy as np
    import numba
    libraries = time.perf_counter() - start
    import {name} as pkg
    m = pkg.load()
    m.run(np.zeros({shape!r}, "float32"))
    print(time.perf_counter() - start, libraries)
""")


def load_times(numba_model, shape: tuple[int, ...]) -> tuple[float, float, float, float]:
    """Seconds to import, load and run a saved package in a fresh process: first (JIT compile of
    the package's kernels), second (kernels from numba's cache), the part of the second spent
    importing numpy and numba, and a third, cached, where SciPy cannot be imported."""
    with tempfile.TemporaryDirectory() as tmp:
        path = numba_model.save(os.path.join(tmp, "bench_pkg"))
        script = LOAD_SCRIPT.format(parent=tmp, name=path.name, shape=shape)
        times = []
        for prefix in ("", "", NO_SCIPY):
            done = subprocess.run(
                [sys.executable, "-c", prefix + script], capture_output=True, text=True, check=True
            )
            times.append([float(t) for t in done.stdout.split()[-2:]])
    return times[0][0], times[1][0], times[1][1], times[2][0]


def bench_model(name: str, args, peaks: dict[int, float]) -> list[dict]:
    """Rows (one per variant, batch and thread count) for one model; [] when it has no
    definition. The variants are the model and, with ``--prune``, its pruned version."""
    import compiler
    from passes.pruning.prune import PruneChannels

    built = build(name, args.size)
    if built is None:
        print(f"{name}: skipped, no definition in this repository", flush=True)
        return []
    model, size = built
    rows = []
    for batch in args.batches:
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
        dense = compiler.compile(model, x, passes=["fuse"], backend="torch", check=False)
        variants = [(name, model, dense.graph)]
        if args.prune:
            pruner = PruneChannels(target=args.prune, scope="global", criterion="l1", round_to=8)
            pruned = compiler.compile(
                model, x, passes=[pruner, "fuse"], backend="torch", check=False
            )
            variants.append((f"{name}-p{args.prune:g}", pruned.artifact.eval(), pruned.graph))
        for label, eager, graph in variants:
            load = args.load and batch == args.batches[0]
            rows += bench_variant(label, eager, graph, x, load, args, peaks)
    return rows


def bench_variant(label, eager, graph, x, load: bool, args, peaks) -> list[dict]:
    """Rows (one per thread count) for one graph and its torch eager module at one batch."""
    from backends.numba.backend import compile_numba
    from compiler.report import graph_stats

    gflop = 2 * graph_stats(graph).macs / 1e9
    start = time.perf_counter()
    numba_model = compile_numba(graph)
    numba_model.run(x.numpy())
    warm_compile = time.perf_counter() - start
    nan = float("nan")
    jit, cached, libraries, bare = load_times(numba_model, tuple(x.shape)) if load else (nan,) * 4
    rows = []
    for threads in args.threads:
        fns = runners(eager, graph, numba_model, x, threads)
        med = measure(fns, threads, args.repeats)
        row = {
            "model": label,
            "batch": x.shape[0],
            "threads": threads,
            "gflop": gflop,
            "peak": peaks[threads],
            "jit": jit,
            "cached": cached,
            "libraries": libraries,
            "bare": bare,
            "compile": warm_compile,
            **{k: v * 1e3 for k, v in med.items()},
        }
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


HEADER = (
    f"{'model':<19}{'b':>3}{'thr':>4}{'torch ms':>10}{'ort ms':>9}{'numba ms':>10}"
    f"{'nb/torch':>9}{'nb/ort':>8}   {'% of peak SGEMM: torch/ort/numba':<34}"
)


def format_row(r: dict) -> str:
    frac = "/".join(f"{100 * r['gflop'] / (r[k] / 1e3) / r['peak']:.0f}" for k in BACKENDS)
    return (
        f"{r['model']:<19}{r['batch']:>3}{r['threads']:>4}{r['torch']:>10.2f}{r['ort']:>9.2f}"
        f"{r['numba']:>10.2f}{r['numba'] / r['torch']:>9.2f}{r['numba'] / r['ort']:>8.2f}"
        f"   {frac:<34}"
    )


def summary(rows: list[dict]) -> str:
    vs_ort = [r["numba"] / r["ort"] for r in rows]
    vs_torch = [r["numba"] / r["torch"] for r in rows]
    jit = [r["jit"] for r in rows if r["jit"] == r["jit"]]
    cached = [r["cached"] for r in rows if r["cached"] == r["cached"]]
    own = [r["cached"] - r["libraries"] for r in rows if r["cached"] == r["cached"]]
    bare = [r["bare"] for r in rows if r["bare"] == r["bare"]]
    target = [
        f"{r['model']} {r['numba'] / r['ort']:.2f}"
        for r in rows
        if r["batch"] == 1 and r["threads"] == 2
    ]
    slower = sum(r["numba"] > r["torch"] for r in rows)
    loads = (
        f"; package load {statistics.median(jit):.1f} s with JIT, {statistics.median(cached):.2f} "
        f"s cached ({statistics.median(own):.2f} s past importing numpy and numba), "
        f"{statistics.median(bare):.2f} s cached without SciPy"
        if jit
        else ""
    )
    return (
        f"summary: numba takes {statistics.median(vs_ort):.2f}x ORT's time "
        f"({min(vs_ort):.2f}-{max(vs_ort):.2f}) and {statistics.median(vs_torch):.2f}x torch "
        f"eager's ({min(vs_torch):.2f}-{max(vs_torch):.2f}) over {len(rows)} configurations, "
        f"slower than torch in {slower}; numba/ORT at batch 1, 2 threads: "
        f"{', '.join(target) or 'not run'}{loads}"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet18,resnet50,mobilenet_v2,resnet56")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--size", type=int, default=224, help="input size of torchvision models")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument(
        "--prune",
        type=float,
        default=0.5,
        help="also run each model pruned to this fraction of its MACs (0: off)",
    )
    ap.add_argument(
        "--no-load",
        dest="load",
        action="store_false",
        help="skip timing the saved package's JIT and cached loads (fresh processes)",
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="a short run: " + " ".join(QUICK) + " (overrides those options)",
    )
    args = ap.parse_args()
    if args.quick:
        args = ap.parse_args([*sys.argv[1:], *QUICK])
    args.threads = [int(t) for t in args.threads.split(",")]
    args.batches = [int(b) for b in args.batches.split(",")]
    peaks = {t: peak_sgemm(t) for t in args.threads}
    print("peak SGEMM GFLOP/s: " + ", ".join(f"{t} thread(s) {p:.0f}" for t, p in peaks.items()))
    print(
        f"numba threading layer: {threading_layer()}; times are medians of "
        f"{args.repeats} calls in rotating blocks"
    )
    print(HEADER)
    rows = []
    for name in args.models.split(","):
        rows += bench_model(name, args, peaks)
    print(
        "\nJIT = first load of the saved package in a fresh process (compiles the kernels); "
        "cached = second load; without SciPy = a third, cached, where SciPy cannot be imported "
        "(numpy and numba only)"
    )
    for r in rows:
        if r["jit"] == r["jit"] and r["threads"] == args.threads[0]:
            print(
                f"{r['model']:<19} batch {r['batch']}: {r['gflop']:.2f} GFLOP, in-process "
                f"compile {r['compile']:.1f} s, package JIT {r['jit']:.1f} s, "
                f"cached {r['cached']:.2f} s ({r['libraries']:.2f} s of it importing numpy "
                f"and numba), {r['bare']:.2f} s without SciPy"
            )
    print(summary(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
