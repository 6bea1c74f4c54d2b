"""The one exception type the command line turns into a one-line message and exit code 2."""


class UserError(Exception):
    """Bad input from the user: a file, a key or a value. The message names it and what would be right."""


class TrainingError(Exception):
    """Training had to stop (non-finite values, a failed checkpoint); the message says where and what is kept."""
