"""The exception types the command line turns into one-line messages, and how a library's error becomes one line."""


def printable(text: str) -> str:
    """`text` with line breaks and other control characters escaped: a quoted key or file name cannot split a line."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class UserError(Exception):
    """Bad input from the user: a file, a key or a value. The message names it and what would be right."""


class TrainingError(Exception):
    """Training had to stop (non-finite values, a failed checkpoint); the message says where and what is kept."""


def error_line(error: BaseException) -> str:
    """`Type: first line of the message`, cut to 200 characters: libraries' errors run to many lines."""
    lines = str(error).strip().splitlines()
    first = lines[0].strip()[:200] if lines else ""
    return f"{type(error).__name__}: {first}" if first else type(error).__name__
