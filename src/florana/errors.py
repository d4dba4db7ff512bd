"""The one exception florana raises for bad user input: its message names the file, client or module at fault."""


class FloranaError(Exception):
    """A user-facing error: the CLI prints its message without a traceback."""


def listing(names: list[str], most: int = 5) -> str:
    """Names for an error message: the first `most`, then '...'."""
    return ", ".join(names[:most]) + (", ..." if len(names) > most else "")
