"""The one exception type for user errors: bad names, values or files. The CLI prints its message as `Error: ...`."""


class KfsimError(ValueError):
    """A user error carrying a one-line message that names the bad value and what is allowed."""


def first_line(exc: BaseException) -> str:
    """The first line of `exc`'s message (its type's name where it has none): a library's error, fit for a
    one-line message."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
