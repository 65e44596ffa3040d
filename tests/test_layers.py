"""The import layering (docs/architecture.md): the contract holds, breaks when a forbidden import is
added, and no two library modules import each other in a circle."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import networkx as nx
import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("compiler", "passes", "backends")


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    script = "import sys; from importlinter.cli import lint_imports_command; lint_imports_command()"
    return subprocess.run(
        [sys.executable, "-c", script, "--no-cache"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)},
    )


def test_the_contract_is_kept():
    proc = _lint_imports(ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout


@pytest.mark.parametrize(
    "module, forbidden",
    [
        ("passes/cleanup.py", "import backends.torch.backend"),  # a pass reaching up to a backend
        ("compiler/ir/graph.py", "import passes"),  # the core reaching up to the passes
        ("backends/onnx/backend.py", "import backends.numba.backend"),  # backends stay apart
        ("compiler/report.py", "import benchmarks.harness.zoo"),  # the harness stays out
    ],
)
def test_a_forbidden_import_breaks_the_contract(tmp_path, module, forbidden):
    for name in (*PACKAGES, "benchmarks"):
        shutil.copytree(
            ROOT / name,
            tmp_path / name,
            ignore=shutil.ignore_patterns("__pycache__", "*.npz", "build"),
        )
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    path = tmp_path / module
    path.write_text(path.read_text() + f"\n{forbidden}  # noqa\n")
    proc = _lint_imports(tmp_path)
    assert proc.returncode != 0, proc.stdout
    assert "BROKEN" in proc.stdout
    assert module.removesuffix(".py").replace("/", ".") in proc.stdout


def test_no_import_cycles_between_library_modules():
    graph = grimp.build_graph(*PACKAGES, exclude_type_checking_imports=True, cache_dir=None)
    edges = nx.DiGraph()
    for module in graph.modules:
        for imported in graph.find_modules_directly_imported_by(module):
            if imported.split(".")[0] in PACKAGES:
                edges.add_edge(module, imported)
    cycles = [c for c in nx.strongly_connected_components(edges) if len(c) > 1]
    assert not cycles, f"import cycles: {[sorted(c) for c in cycles]}"


def test_the_contract_quoted_in_the_docs_is_the_one_checked():

    text = (ROOT / "docs" / "architecture.md").read_text()
    quoted = re.search(r"```toml\n(.*?)```", text, re.S).group(1)
    checked = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    assert tomllib.loads(quoted)["tool"]["importlinter"]["contracts"] == checked["contracts"]
