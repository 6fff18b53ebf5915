"""The one exception type users see.

A :class:`PPCLError` is bad input or an impossible request: the CLI prints its message as a single line
(``ppcl <command>: error: <message>``) and exits with status 2. Anything else is a bug and keeps its traceback.
"""


class PPCLError(Exception):
    """A user-facing error: the message names the problem and where (file, field, sample, setting)."""

    def __init__(self, message: str):
        # One line, always: multi-line messages break the "one-line error" contract of the CLI.
        super().__init__(" ".join(str(message).split()))
