"""The one exception type for user errors: the CLI prints its message as one line and exits non-zero."""


class RlaifError(Exception):
    """A problem with the user's input or environment, with a message that says what to do."""


def exception_text(exc: BaseException) -> str:
    """An exception's message, or its type's name when it has none."""
    return str(exc).strip() or type(exc).__name__


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (``exception_text``), for a one-line error."""
    return exception_text(exc).splitlines()[0]
