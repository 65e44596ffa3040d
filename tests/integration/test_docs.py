"""Every fenced ```python block of README.md and docs/*.md runs (docs/history.md excepted).

Each block is a test case with the id ``<file>:<line of its fence>``, e.g. ``docs/pruning.md:9``.
It runs in-process in a fresh namespace, with the working directory set to a temporary folder (so
snippets that save files write there, never into the repository). Registries a snippet adds to (the
op table, passes, coupling rules, attribute updates, backend emitters) are restored afterwards.
Other fences (```bash, ```text, ```toml, bare ```) are not run.

A snippet is self-contained: it imports and builds what it uses. Markers, as HTML comments (GitHub
does not render them) on the line(s) right above the fence, change that:

- ``<!-- continues -->``: the block goes on from the previous ```python block of the same file and
  runs after it in its namespace. The chain is one test case; its id lists every fence line
  (``docs/writing_a_pass.md:12+42``).
- ``<!-- needs: data -->``: the block reads the real CIFAR-10 data or the pretrained checkpoints
  (``benchmarks.harness.cifar``); skipped, saying why, when ``cifar.data_available(*cifar.DATA_FILES)``
  is false. Such test cases also carry pyproject's ``data`` mark.
- ``<!-- needs: long -->``: the block takes minutes; skipped unless ``SLIMGRAPH_DOCS_LONG=1``.

A ``needs`` marker holds for its block and every block continuing it; the blocks of the chain before
it still run. Several markers go in one comment, separated by ``;`` (``<!-- continues; needs: long
-->``), or in comments on consecutive lines. Where the markers are used now:

- docs/backends.md: the saved numba package block ``continues`` the compile_numba block and is
  ``needs: long`` (its first run compiles every kernel into the fresh package folder, ~45 s);
- docs/writing_a_pass.md: the "use it" block ``continues`` the RoundWeights block;
- ``needs: data``: docs/pruning.md (calibration_batch), docs/quantization.md (ResNet-56 calibrated
  on 256 images), docs/weight_sharing.md (centroid fine-tuning).

Figures stated in a snippet's ``print(...)`` comment in double quotes (``print(q.report)  # ...
"quantize: 56 layer(s) quantized"``) must appear in what that block prints (docs/quantization.md,
docs/weight_sharing.md). Figures the prose states
about a documented command are checked where cheap (``test_weight_sharing_cli_size``). Numba's
kernels compile on their first run (cached in ``backends/__pycache__``), so a cold cache makes the
numba and quantization snippets several times slower.

The README's two bash commands at the top are checked by ``test_readme_commands`` (their Python
parts point at real things) and smoke-tested with a small ``slimgraph compress`` run.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC_FILES = [ROOT / "README.md"] + sorted(
    p for p in (ROOT / "docs").glob("*.md") if p.name != "history.md"
)
FENCE = re.compile(r"^```(\w*)\s*$")
MARKER = re.compile(r"^<!--\s*(.*?)\s*-->\s*$")
KNOWN_MARKERS = {"continues", "needs: data", "needs: long"}


@dataclass
class Block:
    path: str  # relative to the repository root
    line: int  # 1-based line of the opening fence
    code: str
    markers: set[str]


@dataclass
class Chain:
    blocks: list[Block] = field(default_factory=list)

    @property
    def id(self) -> str:
        first = self.blocks[0]
        return f"{first.path}:" + "+".join(str(b.line) for b in self.blocks)

    @property
    def markers(self) -> set[str]:
        return set().union(*(b.markers for b in self.blocks))


def python_blocks(path: Path) -> list[Block]:
    """The ```python blocks of one markdown file, with the markers right above each."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        if m.group(1) == "python":
            markers, k = set(), i - 1
            while k >= 0 and (mk := MARKER.match(lines[k])):
                markers.update(s.strip() for s in mk.group(1).split(";"))
                k -= 1
            rel = path.relative_to(ROOT).as_posix()
            blocks.append(Block(rel, i + 1, "\n".join(lines[i + 1 : end]) + "\n", markers))
        i = end + 1
    return blocks


def printed_figures(code: str) -> list[str]:
    """The double-quoted strings in the comments of top-level ``print(...)`` lines."""
    return [
        text
        for line in code.splitlines()
        if line.startswith("print(") and "  # " in line
        for text in re.findall(r'"([^"]+)"', line.split("  # ", 1)[1])
    ]


def chains() -> list[Chain]:
    out: list[Chain] = []
    for path in DOC_FILES:
        previous = None
        for block in python_blocks(path):
            if "continues" in block.markers:
                assert previous is not None, f"{block.path}:{block.line}: nothing to continue"
                previous.blocks.append(block)
            else:
                previous = Chain([block])
                out.append(previous)
    return out


CHAINS = chains()


def test_markers_are_known():
    assert len(CHAINS) >= 10, f"found only {len(CHAINS)} ```python blocks: is the extractor broken?"
    for chain in CHAINS:
        unknown = chain.markers - KNOWN_MARKERS
        assert not unknown, f"{chain.id}: unknown marker(s) {unknown}; known: {KNOWN_MARKERS}"


def _registries() -> list[dict]:
    """The dicts that registration decorators write to, filled first (passes and emitters load on
    first use), so that restoring them leaves the built-in entries in place."""
    from backends.numba.backend import EMITTERS as NUMBA  # backend.py imports every emitter module
    from backends.onnx.backend import EMITTERS as ONNX
    from backends.torch.backend import EMITTERS as TORCH
    from compiler.ops.table import OPS
    from compiler.pass_manager import PASSES, PRESETS, load_passes
    from passes.pruning.apply import ATTR_UPDATES
    from passes.pruning.rules import RULES

    load_passes()
    tables = [TORCH, ONNX, NUMBA]
    return [OPS, PASSES, PRESETS, RULES, ATTR_UPDATES] + [t._entries for t in tables]


@pytest.fixture
def restored_registries():
    saved = [(table, dict(table)) for table in _registries()]
    yield
    for table, items in saved:
        table.clear()
        table.update(items)


def _skip_reason(markers: set[str]) -> str | None:
    if "needs: data" in markers:
        from benchmarks.harness import cifar

        if not cifar.data_available(*cifar.DATA_FILES):
            return f"needs the CIFAR-10 data and checkpoints in {cifar.data_dir()}"
    if "needs: long" in markers and os.environ.get("SLIMGRAPH_DOCS_LONG") != "1":
        return "a long snippet (minutes): set SLIMGRAPH_DOCS_LONG=1 to run it"
    return None


@pytest.mark.parametrize(
    "chain",
    [
        pytest.param(c, id=c.id, marks=[pytest.mark.data] if "needs: data" in c.markers else [])
        for c in CHAINS
    ],
)
def test_snippet_runs(chain, tmp_path, monkeypatch, capsys, restored_registries):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT))  # `from benchmarks.harness import ...` as from the root
    module = types.ModuleType("__docs__")  # a real module: @dataclass looks its module up
    monkeypatch.setitem(sys.modules, module.__name__, module)
    for i, block in enumerate(chain.blocks):
        # A marker holds for its block and the blocks continuing it; the blocks before it ran.
        reason = _skip_reason(set().union(*(b.markers for b in chain.blocks[: i + 1])))
        if reason:
            ran = f" (after {', '.join(str(b.line) for b in chain.blocks[:i])} ran)" if i else ""
            pytest.skip(f"{block.path}:{block.line}: {reason}{ran}")
        # Pad so that tracebacks give the markdown file's own line numbers.
        source = "\n" * block.line + block.code
        exec(compile(source, str(ROOT / block.path), "exec"), module.__dict__)  # noqa: S102
        printed = capsys.readouterr().out
        for expected in printed_figures(block.code):
            assert expected in printed, f"{block.path}:{block.line}: no {expected!r} in:\n{printed}"


# -- the README's bash commands ----------------------------------------------------------------


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    m = re.search(r"```bash\n(.*?)```", text, re.S)
    assert m, "README.md has no ```bash block"
    return [line for line in m.group(1).splitlines() if line.strip()]


def test_readme_commands():
    from compiler.api import check_passes
    from compiler.frontend.models import zoo_names

    tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11+")
    first, second = _readme_commands()
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    steps = [shlex.split(s) for s in first.split("&&")]
    compress = steps[-1]
    assert compress[:2] == ["slimgraph", "compress"], compress
    assert scripts["slimgraph"] == "compiler.cli:main"
    module, func = scripts["slimgraph"].split(":")
    assert callable(getattr(__import__(module, fromlist=[func]), func))
    spec = compress[2]
    where, name = spec.split(":")
    assert where == "torchvision" and name in zoo_names(), spec  # what load_model(spec) accepts
    passes = compress[compress.index("--passes") + 1]
    check_passes(passes, has_data=False)
    tests = [shlex.split(s) for s in second.split("&&")][-1]
    assert tests == ["python3", "-m", "pytest", "-q"], tests
    assert (
        "[test]" in second
        and "test"
        in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    )


def test_readme_compress_smoke(tmp_path):
    """The first command's tool on a small case: `slimgraph compress` writes its output."""
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "compiler.cli",
        "compress",
        "torchvision:resnet18",
        "--passes",
        "fuse",
        "--input-shape",
        "1,3,64,64",
        "--out",
        str(out),
    ]
    done = subprocess.run(
        cmd,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert any(out.iterdir()), done.stdout


def test_weight_sharing_cli_size(tmp_path):
    """docs/weight_sharing.md's CLI line writes a file of the size its prose states."""
    text = (ROOT / "docs" / "weight_sharing.md").read_text(encoding="utf-8")
    m = re.search(
        r"`slimgraph compress (torchvision:\S+) --passes \"([^\"]+)\"\s+--input-shape (\S+)`"
        r" \(writes `build/(\S+)`, (\d+) KB",
        text,
    )
    assert m, "docs/weight_sharing.md: the CLI example moved; update this test"
    spec, passes, shape, name, kb = m.groups()
    cmd = [
        sys.executable,
        "-m",
        "compiler.cli",
        "compress",
        spec,
        "--passes",
        passes,
        "--input-shape",
        shape,
    ]
    done = subprocess.run(
        cmd,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    size = (tmp_path / "build" / name).stat().st_size
    assert round(size / 1000) == int(kb), f"{name} is {size / 1000:.0f} KB, the doc says {kb} KB"
