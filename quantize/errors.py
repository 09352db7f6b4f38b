"""The one error type quantize raises for expected failures: its message is shown to the user as is."""


class QuantizeError(Exception):
    pass
