"""Expected failures. `Error` is the base of every one of them, quantize's and the runtime's: the CLI
prints its message as one line and exits 1 (localmix/cli.py, the one place that does). It lives here,
at the bottom of the import graph, because quantize/ never imports the runtime."""


class Error(Exception):
    """An expected failure: bad input, a missing file, a model that does not fit. The message is one
    line, written for the user."""


class QuantizeError(Error):
    """A checkpoint that cannot be converted, or an output that cannot be written."""
