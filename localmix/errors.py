"""Expected failures: the CLI prints their message as one line and exits non-zero, no traceback."""


class UserError(Exception):
    pass
