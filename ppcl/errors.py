"""The one exception type users see.

A :class:`PPCLError` is bad input or an impossible request: the CLI prints its message as a single line
(``ppcl <command>: error: <message>``) and exits with status 2. Anything else is a bug and keeps its traceback.
"""


class PPCLError(Exception):
    """A user-facing error: the message names the problem and where (file, field, sample, setting)."""

    def __init__(self, message: str):
        # One line, always: multi-line messages break the "one-line error" contract of the CLI.
        super().__init__(" ".join(str(message).split()))


def first_field_error(error) -> tuple[str, str]:
    """``(where, message)`` of the first error of a pydantic ``ValidationError``: the dotted field path
    (``"(top level)"`` for the document itself) and the message without pydantic's ``"Value error, "`` prefix.
    Every validated artifact and settings block reports bad input through this, so messages read alike."""
    err = error.errors()[0]
    where = ".".join(str(x) for x in err["loc"]) or "(top level)"
    return where, str(err["msg"]).removeprefix("Value error, ")
