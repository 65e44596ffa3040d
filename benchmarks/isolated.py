"""Run a function once per item, each call in a fresh process, so that a crash or an out-of-memory
kill fails only that item (with a ProcessPoolExecutor one killed worker breaks the pool and every
model still queued is reported as failed: the first full prune-zoo run lost 43 models that way)."""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable, Iterable, Iterator
from multiprocessing.connection import wait
from typing import Any


def _child(conn, fn: Callable[[Any], Any], item: Any) -> None:
    try:
        conn.send(("ok", fn(item)))
    except BaseException as e:  # noqa: BLE001 - every failure goes back to the parent as a value
        conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        conn.close()


def died(exitcode: int | None) -> str:
    why = "killed (SIGKILL: out of memory?)" if exitcode == -9 else "crashed"
    return f"worker {why}, exit code {exitcode}"


def map_isolated(
    fn: Callable[[Any], Any], items: Iterable[Any], workers: int = 2
) -> Iterator[tuple[Any, str, Any]]:
    """Yield ``(item, status, value)`` as calls finish, at most ``workers`` at a time.

    ``status`` is "ok" (``value`` is ``fn(item)``), "error" (``value`` is the exception's text) or
    "died" (the process ended without answering; ``value`` says how). ``fn`` must be importable
    (processes are spawned, not forked: torch does not survive a fork with live threads).
    """
    ctx = mp.get_context("spawn")
    pending = list(items)
    running: dict[Any, tuple[Any, Any]] = {}
    while pending or running:
        while pending and len(running) < max(1, workers):
            item = pending.pop(0)
            receiver, sender = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_child, args=(sender, fn, item), daemon=True)
            proc.start()
            sender.close()
            running[receiver] = (proc, item)
        for conn in wait(list(running)):
            proc, item = running.pop(conn)
            try:
                status, value = conn.recv()
            except EOFError:
                proc.join()
                status, value = "died", died(proc.exitcode)
            conn.close()
            proc.join()
            yield item, status, value
