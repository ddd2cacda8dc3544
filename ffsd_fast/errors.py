"""The one exception type that the command-line tools turn into a one-line error."""


class UserError(Exception):
    """Bad input from the user (a flag, a path, a file): reported as one line, exit status 2, no traceback."""
