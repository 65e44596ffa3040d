"""The command line: ``slimgraph compress MODEL --passes fuse --emit onnx --out build/``."""

from __future__ import annotations

import argparse
import json
import os
import sys

from compiler.errors import SlimgraphError

EXTENSIONS = {"onnx": ".onnx", "torch": ".pt", "numba": ""}


def _shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(d) for d in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad shape {text!r}; write e.g. 1,3,224,224") from None


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="slimgraph", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compress", help="trace a model, run passes, print the report, emit")
    c.add_argument("model", help="torchvision:NAME, timm:NAME, package.module:factory or FILE.pt2")
    c.add_argument(
        "--passes", default="fuse", help="comma-separated pass names or presets (default: fuse)"
    )
    c.add_argument("--emit", default="onnx", choices=sorted(EXTENSIONS), help="backend")
    c.add_argument("--out", default="build", help="output folder (default: build/)")
    c.add_argument(
        "--input-shape",
        type=_shape,
        default=None,
        help="example input shape, e.g. 1,3,224,224 (default: 1,3,224,224)",
    )
    c.add_argument("--no-check", action="store_true", help="skip the numeric check after passes")
    c.add_argument(
        "--calibration",
        default=None,
        metavar="FILE.npy",
        help="calibration inputs stacked along the batch axis, for quantize etc.",
    )
    c.add_argument("--json", action="store_true", help="also write the report as JSON")
    c.add_argument(
        "--bench",
        action="store_true",
        help="measure the emitted artifact's latency against the original model (torch eager)",
    )
    c.add_argument("--print-ir", action="store_true", help="print the final IR")
    g = sub.add_parser("groups", help="print the prunable channel groups of a model")
    g.add_argument("model", help="same specs as compress")
    g.add_argument("--input-shape", type=_shape, default=None)
    g.add_argument("--no-fuse", action="store_true", help="analyse the graph before fusion")
    p = sub.add_parser("passes", help="list the registered passes and presets")
    p.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        help="also each pass's options: type, default and meaning",
    )
    p.set_defaults(command="passes")
    one = sub.add_parser("pass", help="describe one pass: what it rewrites and its options")
    one.add_argument("name", help="a pass or preset name, e.g. prune-channels")
    o = sub.add_parser("ops", help="list the ops in the op table")
    o.set_defaults(command="ops")
    return ap


def _read_calibration(path: str):
    import numpy as np

    from compiler.errors import InputError

    try:
        return np.load(path, allow_pickle=False)  # a .npy from elsewhere runs no code
    except (OSError, ValueError) as e:
        raise InputError(
            f"cannot read calibration data {path!r}: {e}",
            hint="give a .npy file saved with numpy.save",
        ) from e


def _check_writable(folder: str) -> None:
    """Create ``folder`` and write a probe file in it, so a bad --out fails before the work."""
    import tempfile

    from compiler.errors import InputError

    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".slimgraph-probe-"):
            pass
    except OSError as e:
        raise InputError(
            f"cannot write to the output folder {folder!r}: {e.strerror or e}",
            hint="give --out a folder you can write to (it is created if missing)",
        ) from e


def _compress(args: argparse.Namespace) -> int:
    import torch

    from compiler.api import check_passes, compile
    from compiler.frontend.models import load_model

    # every check that needs no model first: a typo costs a second, not a trace
    passes = check_passes(args.passes, has_data=bool(args.calibration))
    calibration = _read_calibration(args.calibration) if args.calibration else None
    _check_writable(args.out)
    model = load_model(args.model)
    shape = args.input_shape or (1, 3, 224, 224)
    example = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    compiled = compile(
        model,
        example,
        passes=passes,
        backend=args.emit,
        check=not args.no_check,
        progress=sys.stderr.isatty(),
        calibration_data=calibration,
    )
    print(compiled.report)
    latency = None
    if args.bench:
        from compiler.api import compare_latency

        latency = compare_latency(model, compiled, example)
        print(
            f"latency at batch {shape[0]}, median of {latency['repeats']} calls, interleaved: "
            f"original (torch eager) {latency['original_ms']:.2f} ms, emitted {args.emit} "
            f"{latency['compiled_ms']:.2f} ms = {latency['ratio']:.2f}x its time"
        )
    if args.print_ir:
        print(compiled.graph)
    name = args.model.split(":")[-1]
    path = os.path.join(args.out, name + EXTENSIONS[args.emit])
    compiled.save(path)
    print(f"wrote {path}")
    if args.json:
        from compiler.api import atomic_write

        def write(tmp: str) -> None:
            with open(tmp, "w") as f:
                json.dump({**compiled.report.to_dict(), "latency": latency}, f, indent=1)

        atomic_write(os.path.join(args.out, name + ".report.json"), write)
    return 0


def _groups(args: argparse.Namespace) -> int:
    import torch

    from compiler.api import compile
    from compiler.frontend.models import load_model
    from passes.pruning.groups import ChannelGroups

    model = load_model(args.model)
    example = torch.randn(*(args.input_shape or (1, 3, 224, 224)))
    graph = compile(model, example, passes=[] if args.no_fuse else ["fuse"], check=False).graph
    print(ChannelGroups(graph).describe())
    return 0


def _format_options(cls) -> list[str]:
    import textwrap

    from compiler.pass_manager import pass_options

    lines = []
    for o in pass_options(cls):
        lines.append(f"    {o.name}: {o.type} = {o.default}")
        if o.meaning:
            lines += textwrap.wrap(o.meaning, 96, initial_indent=" " * 8, subsequent_indent=" " * 8)
    return lines


def _list_passes(verbose: bool = False) -> int:
    from compiler.pass_manager import PASSES, PRESETS, load_passes, pass_summary

    load_passes()
    for name, cls in sorted(PASSES.items()):
        print(f"{name:24s} {'exact' if cls.exact else 'lossy'}  {pass_summary(cls)}")
        if verbose:
            print("\n".join(_format_options(cls) or ["    (no options)"]))
    for name, seq in sorted(PRESETS.items()):
        print(f"{name:24s} preset: {', '.join(seq)}")
    return 0


def _show_pass(name: str) -> int:
    import inspect

    from compiler.pass_manager import PASSES, PRESETS, _unknown_pass, load_passes

    load_passes()
    if name in PRESETS:
        print(f"{name}: preset, runs {', '.join(PRESETS[name])}")
        return 0
    if name not in PASSES:
        raise _unknown_pass(name)
    cls = PASSES[name]
    print(f"{name} ({'exact' if cls.exact else 'lossy'}, {cls.__module__}.{cls.__name__})\n")
    print(inspect.getdoc(cls) or "")
    print("\noptions (write them as " + name + "(option=value, ...)):")
    print("\n".join(_format_options(cls) or ["    (no options)"]))
    return 0


def _list_ops() -> int:
    from compiler.ops.table import OPS, get_op

    get_op("relu")
    for name, op in sorted(OPS.items()):
        print(f"{name:22s} {op.doc}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "compress":
            return _compress(args)
        if args.command == "groups":
            return _groups(args)
        if args.command == "passes":
            return _list_passes(args.verbose)
        if args.command == "pass":
            return _show_pass(args.name)
        return _list_ops()
    except SlimgraphError as e:
        print(f"slimgraph: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
