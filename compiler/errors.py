"""The one error type users catch, and its subclasses, each saying what failed, where and how to
fix it."""

from __future__ import annotations


class SlimgraphError(Exception):
    """Base class of every error a user of slimgraph can cause.

    Args:
        message: what failed.
        node: name of the IR node involved, if any.
        op: op name involved, if any.
        source: where the node came from in the user's model (module path), if known.
        hint: what the user can do about it.
    """

    def __init__(
        self,
        message: str,
        *,
        node: str | None = None,
        op: str | None = None,
        source: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.node, self.op, self.source, self.hint = node, op, source, hint
        parts = [message]
        where = []
        if node:
            where.append(f"node '{node}'")
        if op:
            where.append(f"op '{op}'")
        if source:
            where.append(f"from module '{source}'")
        if where:
            parts.append("at " + ", ".join(where))
        text = " ".join(parts)
        if hint:
            text += f". Fix: {hint}"
        super().__init__(text)


class UnsupportedOpError(SlimgraphError):
    """The model uses an op that slimgraph has no entry for."""


class TraceError(SlimgraphError):
    """The model could not be traced into the IR."""


class VerificationError(SlimgraphError):
    """The IR broke one of its invariants (order, use-lists, shapes, dtypes)."""


class PassError(SlimgraphError):
    """A pass failed, or its result did not match the graph it was given."""


class InputError(SlimgraphError):
    """Inputs given at run time or to compile() have the wrong count, shape or dtype."""


class OptionError(SlimgraphError):
    """A pass or compile option is outside the range it accepts."""


class BackendError(SlimgraphError):
    """A backend cannot emit or run the graph."""


def did_you_mean(word: str, choices) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices`` to a misspelt ``word``, else ``""``:
    the tail every "unknown name" message in the project ends with."""
    import difflib

    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
