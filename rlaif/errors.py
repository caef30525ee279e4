"""The one exception type for user errors: the CLI prints its message as one line and exits non-zero."""


class RlaifError(Exception):
    """A problem with the user's input or environment, with a message that says what to do."""
