"""The zoo benchmarks' process isolation: one model that kills its process fails alone."""

import os
import signal

from benchmarks.isolated import map_isolated


def square_or_die(n: int) -> int:
    if n == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # what the kernel's out-of-memory killer does
    if n == 3:
        raise ValueError("bad model")
    return n * n


def test_a_killed_worker_fails_only_its_item():
    results = {item: (status, value) for item, status, value in map_isolated(square_or_die, range(6))}
    assert results[2][0] == "died" and "SIGKILL" in results[2][1]
    assert results[3] == ("error", "ValueError: bad model")
    assert {k: v for k, v in results.items() if k not in (2, 3)} == {
        0: ("ok", 0), 1: ("ok", 1), 4: ("ok", 16), 5: ("ok", 25)}
