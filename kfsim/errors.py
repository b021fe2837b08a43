"""The one exception type for user errors: bad names, values or files. The CLI prints its message as `Error: ...`."""


class KfsimError(ValueError):
    """A user error carrying a one-line message that names the bad value and what is allowed."""
