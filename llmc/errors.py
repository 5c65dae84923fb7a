"""The one exception type users see: its message names the problem and the fix."""


class LlmcError(Exception):
    """A user-facing error. The CLI prints its message (no traceback) and exits non-zero."""
