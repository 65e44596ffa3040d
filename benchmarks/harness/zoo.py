"""The torchvision model zoo as test and benchmark material: every classifier through every check
(interpreter, torch, ONNX, numba, pruning, factorization, sharing, quantization) against torch
eager. Loading models lives in the library (compiler/frontend/models.py)."""

from __future__ import annotations

from compiler.errors import OptionError  # noqa: F401
from compiler.frontend.models import (  # noqa: F401  (the zoo's vocabulary, used by its callers)
    DEFAULT_SIZE,
    INPUT_SIZES,
    MIN_INPUT_DEPENDENCE,
    build,
    input_dependence,
    input_size,
    load_model,
    recalibrate_batch_norms,
    zoo_names,
)


def check_model(
    name: str,
    checks: tuple[str, ...] = ("interpreter", "torch", "onnx"),
    passes: tuple = ("fuse",),
    tolerance: float = 1e-4,
) -> dict:
    """Import one zoo model, run ``passes`` and compare each backend with torch eager.

    Returns a dict with ``imported``, ``fused`` and one boolean per check, the deviations
    (relative to the output's scale), seconds and the first error met. A model whose output does
    not depend on its input is an error (no check on it could fail); the tolerance is raised to
    ``NOISE_MARGIN`` times torch eager's own float32 error where that is larger (recorded as
    ``float32_noise`` and ``tolerance``).
    """
    import time

    import numpy as np
    import torch

    from compiler.api import compile
    from compiler.ir.interpreter import run
    from compiler.pass_manager import deviation

    result: dict = {"model": name, "imported": False, "fused": False, "deviation": {}}
    start = time.perf_counter()
    try:
        model = build(name)
        size = input_size(name)
        x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            reference = [model(x).numpy()]
        result["input_dependence"] = input_dependence(model, size)
        if result["input_dependence"] < MIN_INPUT_DEPENDENCE:
            raise ValueError(
                f"{name}'s output moves by {result['input_dependence']:.1e} of its scale between "
                "two inputs: a numeric check on it could not fail"
            )
        result["float32_noise"] = float32_noise(model, x, reference[0])
        tolerance = result["tolerance"] = max(tolerance, NOISE_MARGIN * result["float32_noise"])
        compiled = compile(model, x, passes=[], backend="torch", check=False)
        result["imported"] = True
        compiled = compile(
            compiled.graph, x, passes=list(passes), backend="torch", tolerance=tolerance
        )
        result["fused"] = True
        result["nodes"] = len(compiled.graph.nodes)
        graph = compiled.graph
        for check in checks:
            if check == "interpreter":
                outs = run(graph, [x.numpy()])
            elif check == "torch":
                outs = [compiled(x).numpy()]
            elif check == "onnx":
                from backends.onnx.backend import compile_onnx

                outs = compile_onnx(graph).run(x.numpy())
            elif check == "numba":
                from backends.numba.backend import compile_numba

                outs = compile_numba(graph).run(x.numpy())
            elif check == "factorized":
                r = check_factorization(graph, x.numpy(), tolerance)
                result["factorization"] = r
                result["deviation"][check] = r.get("full_rank_deviation", float("inf"))
                result[check] = r["factorized"]
                continue
            elif check == "factorized-numba":
                r = check_factorized_numba(graph, x.numpy(), tolerance)
                result["factorized-numba"] = r["matches"]
                result["deviation"][check] = r.get("deviation", float("inf"))
                if "error" in r:
                    result.setdefault("error", f"factorized-numba: {r['error']}")
                continue
            elif check == "quantized":
                r = check_quantization(graph, x.numpy())
                result["quantization"] = r
                result["deviation"][check] = r.get("deviation", float("inf"))
                result[check] = r["quantized"]
                continue
            elif check == "shared":
                r = check_sharing(graph, x.numpy(), tolerance)
                result["sharing"] = r
                result["deviation"][check] = r.get("backend_deviation", float("inf"))
                result[check] = r["shared"]
                if "error" in r:
                    result.setdefault("error", f"shared: {r['error']}")
                continue
            else:
                raise ValueError(f"unknown check {check!r}")
            dev = deviation(reference, [np.asarray(o) for o in outs])
            result["deviation"][check] = dev
            result[check] = bool(dev <= tolerance)
    except Exception as e:  # noqa: BLE001 - a zoo run reports every failure and goes on
        result["error"] = f"{type(e).__name__}: {str(e)[:500]}"
    result["seconds"] = time.perf_counter() - start
    return result


# Two float32 implementations of a model may differ by about twice the float32 error of either;
# a check's tolerance is at least this many times torch eager's own float32 error.
NOISE_MARGIN = 4
NOISE_MAX_PARAMS = 100_000_000  # above this the float64 copy is not made (noise taken as 0)


def float32_noise(model, x, reference) -> float:
    """Torch eager's own float32 error on ``x``: its deviation from the same model in float64,
    relative to the output's scale (0 for models above NOISE_MAX_PARAMS). Random-weight deep
    models can amplify rounding: Inception-v3's is 6e-5, ResNet-50's 6e-7."""
    import copy

    import torch

    from compiler.pass_manager import deviation

    if sum(p.numel() for p in model.parameters()) > NOISE_MAX_PARAMS:
        return 0.0
    with torch.no_grad():
        exact = copy.deepcopy(model).double()(x.double()).numpy()
    return deviation([exact], [reference])


PRUNE_CONFIGS = {
    "uniform30": {"ratio": 0.3},
    "uniform50": {"ratio": 0.5},
    "global-macs50": {"target": 0.5, "scope": "global"},
}


def check_pruning(name: str, configs: tuple[str, ...] = tuple(PRUNE_CONFIGS)) -> dict:
    """Fuse one zoo model, then prune it with each config: record whether it pruned (graph verified,
    output shape unchanged, fewer MACs), whether it matches its masked original (the pass's proof),
    and whether torch and ONNX Runtime run it (matching the interpreter)."""
    import gc
    import time

    import torch

    from backends.onnx.backend import compile_onnx
    from backends.torch.backend import compile_torch
    from compiler.api import compile
    from compiler.ir.interpreter import run
    from compiler.pass_manager import PassManager, deviation
    from compiler.report import graph_stats
    from passes.pruning.prune import PruneChannels

    result: dict = {"model": name}
    try:
        model = build(name)
        size = input_size(name)
        x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
        fused = compile(model, x, passes=["fuse"], check=False).graph
        base = graph_stats(fused)
        del model  # the largest models (regnet_y_128gf) need every copy of their weights freed
    except Exception as e:  # noqa: BLE001
        result["error"] = f"import: {type(e).__name__}: {str(e)[:400]}"
        return result
    for config in configs:
        start = time.perf_counter()
        r: dict = {"pruned": False, "mask-equivalent": False, "runs": False}
        try:
            graph = fused.clone()
            PassManager(passes=[PruneChannels(**PRUNE_CONFIGS[config])]).run(graph)
            stats = graph_stats(graph)
            r["macs"] = stats.macs / base.macs
            r["params"] = stats.params / base.params
            same_shape = [v.shape for v in graph.outputs] == [v.shape for v in fused.outputs]
            r["pruned"] = bool(same_shape and stats.macs < base.macs)
            dev = (graph.meta.get("pruning") or {}).get("mask_deviation")
            r["mask-equivalent"] = dev is not None and dev <= 1e-4
            ref = run(graph, [x.numpy()])
            with torch.no_grad():
                t_out = [compile_torch(graph)(x).numpy()]
            gc.collect()  # one backend's copy of the weights at a time
            o_out = compile_onnx(graph).run(x.numpy())
            r["runs"] = bool(deviation(ref, t_out) <= 1e-4 and deviation(ref, o_out) <= 1e-4)
        except Exception as e:  # noqa: BLE001 - a zoo run reports every failure and goes on
            r["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        r["seconds"] = time.perf_counter() - start
        result[config] = r
        graph = None
        gc.collect()
    return result


def check_factorization(graph, x, tolerance: float = 1e-4, energy: float = 0.6) -> dict:
    """Factorize a fused graph twice: at full rank in the channel form (forced even where MACs
    grow), which must match the graph within ``tolerance``, and at an ``energy`` threshold with
    ``form="auto"``, which must lower MACs and run in torch, ONNX Runtime and numba matching the
    interpreter. ``factorized`` is True when all of that holds (or the model has no conv2d/linear
    layer to factorize, counted as ``applicable: False``)."""
    import torch

    from backends.numba.backend import compile_numba
    from backends.onnx.backend import compile_onnx
    from backends.torch.backend import compile_torch
    from compiler.ir.interpreter import run
    from compiler.pass_manager import PassManager, deviation
    from compiler.report import graph_stats
    from passes.factorization.factorize import FactorizeRank

    r: dict = {"factorized": False}
    try:
        reference = run(graph, [x])
        full = graph.clone()
        PassManager(
            passes=[FactorizeRank(energy=1.0, form="channel", require_saving=False)],
            example_inputs=None,
        ).run(full)
        r["applicable"] = bool(full.meta["factorization"]["layers"])
        r["full_rank_deviation"] = deviation(reference, run(full, [x]))
        del full  # at full rank a layer's factors outweigh it: free them before the next graph
        low = graph.clone()
        PassManager(passes=[FactorizeRank(energy=energy)], example_inputs=None).run(low)
        r["layers"] = len(low.meta["factorization"]["layers"])
        r["macs"] = graph_stats(low).macs / max(graph_stats(graph).macs, 1)
        ref = run(low, [x])
        with torch.no_grad():
            t_out = [compile_torch(low)(torch.from_numpy(x)).numpy()]
        o_out = compile_onnx(low).run(x)
        n_out = compile_numba(low).run(x)
        r["backend_deviations"] = {
            "torch": deviation(ref, t_out),
            "onnx": deviation(ref, o_out),
            "numba": deviation(ref, n_out),
        }
        r["backend_deviation"] = max(r["backend_deviations"].values())
        lowered = r["layers"] > 0 and r["macs"] < 1
        r["factorized"] = bool(
            r["full_rank_deviation"] <= tolerance
            and r["backend_deviation"] <= tolerance
            and (lowered or not r["applicable"])
        )
    except Exception as e:  # noqa: BLE001 - a zoo run reports every failure and goes on
        r["error"] = f"{type(e).__name__}: {str(e)[:400]}"
    return r


def check_factorized_numba(graph, x, tolerance: float = 1e-4, energy: float = 0.6) -> dict:
    """The numba backend on the graph factorized as in :func:`check_factorization` (energy
    threshold, ``form="auto"``), against the torch backend on the same graph: the light form of
    that check's numba leg, for a zoo run whose interpreter legs were run before (the torch
    backend is checked against the interpreter there)."""
    import torch

    from backends.numba.backend import compile_numba
    from backends.torch.backend import compile_torch
    from compiler.pass_manager import PassManager, deviation
    from passes.factorization.factorize import FactorizeRank

    r: dict = {"matches": False}
    try:
        low = graph.clone()
        PassManager(passes=[FactorizeRank(energy=energy)], example_inputs=None).run(low)
        r["layers"] = len(low.meta["factorization"]["layers"])
        with torch.no_grad():
            ref = [compile_torch(low)(torch.from_numpy(x)).numpy()]
        r["deviation"] = deviation(ref, compile_numba(low).run(x))
        r["matches"] = bool(r["layers"] > 0 and r["deviation"] <= tolerance)
    except Exception as e:  # noqa: BLE001 - a zoo run reports every failure and goes on
        r["error"] = f"{type(e).__name__}: {str(e)[:400]}"
    return r


def check_sharing(graph, x, tolerance: float = 1e-4, bits: int = 4) -> dict:
    """Share a fused graph's conv2d/linear weights at ``bits`` (k-means, one codebook per layer)
    and run it in torch and ONNX Runtime: ``shared`` is True when at least one layer was shared and
    both match the interpreter on the shared graph within ``tolerance``. Also records the lossy
    deviation from the dense graph, the weight bytes before/after and the ONNX file bytes."""
    import torch

    from backends.onnx.backend import compile_onnx
    from backends.torch.backend import compile_torch
    from compiler.ir.interpreter import run
    from compiler.pass_manager import PassManager, deviation
    from compiler.report import graph_stats
    from passes.weight_sharing import ShareWeights

    r: dict = {"shared": False}
    try:
        dense = run(graph, [x])
        shared = graph.clone()
        PassManager(passes=[ShareWeights(bits=bits)], example_inputs=None).run(shared)
        meta = shared.meta["weight_sharing"]
        r["layers"], r["skipped"] = meta["shared"], len(meta["skipped"])
        r["weight_bytes"] = (graph_stats(graph).weight_bytes, graph_stats(shared).weight_bytes)
        ref = run(shared, [x])
        r["sharing_deviation"] = deviation(dense, ref)
        with torch.no_grad():
            t_out = [compile_torch(shared)(torch.from_numpy(x)).numpy()]
        onnx_model = compile_onnx(shared)
        o_out = onnx_model.run(x)
        r["onnx_bytes"] = onnx_model.model.ByteSize()
        r["backend_deviation"] = max(deviation(ref, t_out), deviation(ref, o_out))
        r["shared"] = bool(r["layers"] > 0 and r["backend_deviation"] <= tolerance)
    except Exception as e:  # noqa: BLE001 - a zoo run reports every failure and goes on
        r["error"] = f"{type(e).__name__}: {str(e)[:400]}"
    return r


def check_quantization(graph, x, samples: int = 4) -> dict:
    """Quantize a fused graph to int8 QDQ (calibrated on ``x`` and seeded noise like it) and run it
    in ONNX Runtime: ``quantized`` when ORT runs it with finite outputs and at least one layer was
    quantized; records the deviation from the float graph (the cost of int8), the deviation of
    ORT's integer kernels from the simulated graph, and the share of kernel time in integer
    kernels."""
    import numpy as np

    from backends.onnx.backend import compile_onnx
    from backends.onnx.quant import is_integer_kernel, kernel_profile
    from compiler.ir.interpreter import run
    from compiler.pass_manager import PassManager, deviation
    from passes.quantization.quantize import Quantize

    r: dict = {"quantized": False}
    try:
        rng = np.random.default_rng(0)
        calib = np.concatenate(
            [x] + [rng.standard_normal(x.shape).astype(x.dtype) for _ in range(samples - 1)]
        )
        q = graph.clone()
        PassManager(passes=[Quantize(calibration_data=calib)], example_inputs=None).run(q)
        meta = q.meta.get("quantization", {})
        r["layers"], r["float"] = len(meta.get("layers", ())), len(meta.get("float", ()))
        model = compile_onnx(q)
        (out,) = model.run(x)[:1]
        r["deviation"] = deviation(run(graph, [x])[:1], [out])
        r["backend_deviation"] = deviation(run(q, [x])[:1], [out])
        kernels = kernel_profile(model.model, [x], runs=3)  # the first run prepacks weights
        integer = sum(v for k, v in kernels.items() if is_integer_kernel(k))
        r["integer_share"] = integer / max(sum(kernels.values()), 1e-9)
        r["kernels"] = sorted(kernels)  # which kernel types ran: a fact, unlike the time share
        r["quantized"] = bool(np.isfinite(out).all() and r["layers"] > 0)
    except Exception as e:  # noqa: BLE001 - a zoo run reports every failure and goes on
        r["error"] = f"{type(e).__name__}: {str(e)[:400]}"
    return r
