"""The one exception type the CLI turns into a one-line message and exit code 2."""


class UserError(ValueError):
    """Bad input from the user: shape, preset, file, flag. Never a bug in this package."""
