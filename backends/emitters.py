"""The emitter table all three backends share: per op, entries chosen by a pattern on the node.

Each backend has one :class:`EmitterTable` keyed by the op table's names. An op may have several
entries, each an ordinary emitter function: entries with a pattern (``when(node) -> bool``) are
tried first, highest ``priority`` first, and the op's one general entry (no pattern) last::

    EMITTERS = EmitterTable("numba", signature="fn(codegen, node)", home="backends/numba/...")

    @EMITTERS.register("add")                                 # the general entry
    def _add(gen, node): ...

    @EMITTERS.register("add", when=integer_add, priority=1)   # a specific pattern
    def _add_u8(gen, node): ...

    emit = EMITTERS.lookup(node)                              # the first entry that matches

The order never depends on which module registered first: two general entries of an op, or two
pattern entries of an op with the same priority, are refused when registered.

The table is also a mapping ``op -> tuple of entries`` (in lookup order): ``op in EMITTERS``,
``set(EMITTERS)``, ``del EMITTERS[op]``, and ``EMITTERS[op] = fn`` (one general entry in place of
all of the op's entries) work as on the dicts the backends used before.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from compiler.errors import BackendError

if TYPE_CHECKING:
    from compiler.ir.graph import Node

__all__ = ["EmitterTable", "Entry", "Pattern"]

Pattern = Callable[["Node"], bool]


def _qualname(fn: Callable[..., Any]) -> str:
    module = getattr(fn, "__module__", None) or "?"
    return f"{module}.{getattr(fn, '__qualname__', repr(fn))}"


@dataclass(frozen=True)
class Entry:
    """One way to emit an op: ``fn``, for the nodes ``when`` accepts (every node when None)."""

    fn: Callable[..., Any]
    when: Pattern | None = None
    priority: int = 0

    @property
    def general(self) -> bool:
        return self.when is None

    def matches(self, node: Node) -> bool:
        return self.when is None or bool(self.when(node))

    def describe(self) -> str:
        if self.when is None:
            return _qualname(self.fn)
        return f"{_qualname(self.fn)} (when={_qualname(self.when)}, priority={self.priority})"


def _lookup_order(entries: list[Entry]) -> tuple[Entry, ...]:
    # patterns first, by priority; registration checks keep (general, priority) unique per op
    return tuple(sorted(entries, key=lambda e: (e.general, -e.priority)))


class EmitterTable(MutableMapping[str, tuple[Entry, ...]]):
    """A backend's emitters: op name -> entries, looked up per node by pattern.

    Args:
        backend: the backend's name, for messages ("numba").
        signature: what an emitter takes and does, for the "how to register one" hints.
        home: where the backend's emitters live, for the same hints.
        decorator: how the hint names the registering decorator.
    """

    def __init__(
        self, backend: str, *, signature: str, home: str, decorator: str = "EMITTERS.register"
    ) -> None:
        self.backend, self.signature, self.home, self.decorator = (
            backend,
            signature,
            home,
            decorator,
        )
        self._entries: dict[str, tuple[Entry, ...]] = {}

    # -- registering ---------------------------------------------------------------------------
    def register(
        self, *ops: str, when: Pattern | None = None, priority: int = 0
    ) -> Callable[[Callable], Callable]:
        """Decorator adding ``fn`` as an entry of each op in ``ops`` (see :meth:`add`)."""

        def wrap(fn: Callable) -> Callable:
            for op in ops:
                self.add(op, fn, when=when, priority=priority)
            return fn

        return wrap

    def add(self, op: str, fn: Callable, *, when: Pattern | None = None, priority: int = 0) -> None:
        """Add ``fn`` as an entry of ``op``: the general one (``when`` None) or a pattern entry.

        Raises:
            BackendError: the op already has a general entry (for a general ``fn``), or a pattern
                entry of the same priority (for a pattern ``fn``): which one runs would depend on
                import order.
        """
        entry = Entry(fn, when, priority)
        entries = list(self._entries.get(op, ()))
        if entry in entries:
            return  # the same entry again (a module imported twice): nothing to add
        clash = next(
            (
                e
                for e in entries
                if e.general == entry.general and (entry.general or e.priority == priority)
            ),
            None,
        )
        if clash is not None:
            kind = "a general entry" if entry.general else f"a pattern entry of priority {priority}"
            fix = (
                "give one of them a pattern (when=...), or replace the op's entries with "
                f"EMITTERS['{op}'] = fn"
                if entry.general
                else "give each pattern entry of the op its own priority (higher runs first)"
            )
            raise BackendError(
                f"the {self.backend} backend already has {kind} for op '{op}' "
                f"({clash.describe()}); cannot add {entry.describe()}",
                op=op,
                hint=fix,
            )
        entries.append(entry)
        self._entries[op] = _lookup_order(entries)

    # -- looking up ----------------------------------------------------------------------------
    def lookup(self, node: Node) -> Callable:
        """The emitter of ``node``: its op's first entry whose pattern matches it.

        Raises:
            BackendError: the op has no entry, or none whose pattern matches the node.
        """
        entries = self._entries.get(node.op, ())
        for entry in entries:
            if entry.matches(node):
                return entry.fn
        register = self.register_hint(node.op)
        if not entries:
            message = f"the {self.backend} backend has no emitter for op '{node.op}'"
            hint = register
        else:
            tried = "; ".join(e.describe() for e in entries)
            message = (
                f"the {self.backend} backend has no emitter for op '{node.op}' whose "
                f"pattern matches this node (tried: {tried})"
            )
            hint = f"{register}; without when= it runs for every node the op's patterns miss"
        raise BackendError(message, node=node.name, op=node.op, source=node.source, hint=hint)

    def register_hint(self, op: str) -> str:
        """How to give ``op`` an emitter, for the hint of an error."""
        return (
            f"register one with @{self.decorator}('{op}') on {self.signature}, beside the "
            f"others in {self.home} (or set EMITTERS['{op}'] = fn)"
        )

    def general(self, op: str) -> Callable | None:
        """The op's general entry (no pattern), or None: for an op applied outside a node of its
        own, such as a conv's fused activation."""
        return next((e.fn for e in self._entries.get(op, ()) if e.general), None)

    # -- the mapping ---------------------------------------------------------------------------
    def __getitem__(self, op: str) -> tuple[Entry, ...]:
        return self._entries[op]

    def __setitem__(self, op: str, value: Callable | tuple[Entry, ...] | list[Entry]) -> None:
        """Replace all of ``op``'s entries: by one general entry ``fn``, or by entries read
        earlier from the table (what ``monkeypatch.setitem`` and ``delitem`` put back)."""
        if isinstance(value, (tuple, list)) and all(isinstance(e, Entry) for e in value):
            entries = list(value)
        elif callable(value):
            entries = [Entry(value)]
        else:
            raise TypeError(
                f"EMITTERS['{op}'] takes an emitter function or a tuple of Entry, "
                f"not {type(value).__name__}"
            )
        self._entries.pop(op, None)
        for entry in entries:
            self.add(op, entry.fn, when=entry.when, priority=entry.priority)

    def __delitem__(self, op: str) -> None:
        del self._entries[op]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"<EmitterTable {self.backend}: {len(self)} ops>"
