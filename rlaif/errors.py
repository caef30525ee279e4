"""The one exception type for user errors: the CLI prints its message as one line and exits non-zero."""


class RlaifError(Exception):
    """A problem with the user's input or environment, with a message that says what to do."""


def exception_text(exc: BaseException) -> str:
    """An exception's message, or its type's name when it has none."""
    return str(exc).strip() or type(exc).__name__


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (``exception_text``), for a one-line error."""
    return exception_text(exc).splitlines()[0]


def hub_unavailable(exc: BaseException, fetch: str) -> str | None:
    """Why a Hugging Face Hub file that ``exc`` failed to load is neither cached nor downloadable, and what to do,
    when the cause is the hub and not the name: "HF_HUB_OFFLINE is set: ..." or "the Hugging Face Hub cannot be
    reached (...): ..."; ``fetch`` says how to get the file ("fetch it with `hf download ORG/NAME`"). None when the
    hub answered (a wrong name, a gated repository) or the fault lies elsewhere.
    """
    from huggingface_hub.constants import is_offline_mode
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    chain = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    missing = [i for i, seen in enumerate(chain) if isinstance(seen, LocalEntryNotFoundError | OfflineModeIsEnabled)]
    if not missing:
        return None
    if is_offline_mode():
        return f"HF_HUB_OFFLINE is set: {fetch} while online (or unset HF_HUB_OFFLINE)"
    causes = chain[missing[0] + 1:]
    if not causes:  # not offline, nothing underneath: the hub answered, not the network
        return None
    return (f"the Hugging Face Hub cannot be reached ({first_line(causes[-1])}): check the connection and "
            f"HF_ENDPOINT / proxy settings, or {fetch} where the hub is reachable and set HF_HUB_OFFLINE=1 here")
