"""A new user's first hour (issue "first hour"): each item has a test named for it."""

import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import torch

from compiler.api import compile

ROOT = Path(__file__).resolve().parents[2]

FACTORY = (
    "import torch\n"
    "def make():\n"
    "    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),\n"
    "                               torch.nn.ReLU()).eval()\n"
)


def _run_in_pty(argv: list[str], cwd: Path, env: dict, timeout: float = 240.0) -> tuple[int, str]:
    """Run ``argv`` with stdin, stdout and stderr on a pseudo-terminal, as a shell would."""
    leader, follower = pty.openpty()
    # a real terminal has a size (a new pty is 0x0, on which tqdm draws an empty bar)
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))
    proc = subprocess.Popen(
        argv, cwd=cwd, env=env, stdin=follower, stdout=follower, stderr=follower, close_fds=True
    )
    os.close(follower)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.5)
            if ready:
                try:
                    data = os.read(leader, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(leader)
    return code, b"".join(chunks).decode(errors="replace")


def test_first_hour_1_cli_runs_in_a_pseudo_terminal(tmp_path):
    # The README's command crashed in every real terminal (`if bar` on a tqdm without a total)
    # while piped runs, and so the tests, passed: run the console entry on a pty.
    (tmp_path / "mynet.py").write_text(FACTORY)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]), "TERM": "xterm"}
    code, out = _run_in_pty(
        [
            sys.executable,
            "-m",
            "compiler.cli",
            "compress",
            "mynet:make",
            "--passes",
            "fuse",
            "--emit",
            "onnx",
            "--out",
            str(tmp_path / "build"),
            "--input-shape",
            "1,3,8,8",
        ],
        cwd=tmp_path,
        env=env,
    )
    assert code == 0, out
    assert "Traceback" not in out, out
    assert "passes:" in out  # the bar was drawn on the terminal
    assert (tmp_path / "build" / "make.onnx").exists()


def test_first_hour_1_compile_with_progress_bar(capsys):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    compiled = compile(model, torch.randn(1, 3, 8, 8), passes=["fuse"], progress=True)
    assert compiled.report.rows
    assert "passes" in capsys.readouterr().err
