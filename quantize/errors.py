"""Expected failures. `Error` is the base of every one of them, quantize's and the runtime's: the CLI
prints its message as one line and exits 1 (localmix/cli.py, the one place that does). It lives here,
at the bottom of the import graph, because quantize/ never imports the runtime."""

from __future__ import annotations


class Error(Exception):
    """An expected failure: bad input, a missing file, a model that does not fit. The message is one
    line, written for the user."""


class QuantizeError(Error):
    """A checkpoint that cannot be converted, or an output that cannot be written."""


def shown(value: object, limit: int = 80) -> str:
    """A value read from a checkpoint (a tensor name, a config value) as it may appear in a message: one
    line, non-printing characters escaped, cut to `limit` characters. (localmix.text.shown is the
    runtime's fuller version; quantize/ cannot import it.)"""
    text = value if isinstance(value, str) else repr(value)
    out = "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text[:limit])
    return out + "..." if len(text) > limit else out
