"""The one exception type the CLI turns into a clean message instead of a traceback."""


class UserError(Exception):
    """Bad input or environment the user can fix: the message names the file or option and what to do."""
