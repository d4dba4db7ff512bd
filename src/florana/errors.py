"""The one exception florana raises for bad user input: its message names the file, client or module at fault."""


class FloranaError(Exception):
    """A user-facing error: the CLI prints its message without a traceback."""
