"""The one exception type for user errors: the CLI prints its message as one line and exits non-zero."""


class RlaifError(Exception):
    """A problem with the user's input or environment, with a message that says what to do."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message for a one-line error; its type's name when it has none."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
