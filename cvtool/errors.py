"""Exceptions that carry the exit status the CLI reports.

Exit codes (see README): 0 all done, 1 finished but some inputs failed,
2 usage error, 3 a model or data set that cannot be used.
"""

EXIT_OK = 0
EXIT_SOME_FAILED = 1
EXIT_USAGE = 2
EXIT_UNUSABLE = 3


class CvtoolError(Exception):
    """An error with a one-line message meant for the user."""

    exit_code = EXIT_UNUSABLE


class UsageError(CvtoolError):
    """Bad option, missing folder, refusing to overwrite: exit 2."""

    exit_code = EXIT_USAGE


class UnusableError(CvtoolError):
    """A model or data set that cannot be used: exit 3."""

    exit_code = EXIT_UNUSABLE


class ImageError(Exception):
    """One input file could not be read as an image; the batch goes on."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM: stop cleanly, keep what was done; exit 128 + the signal number (130, 143)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
        self.exit_code = 128 + signum


def env_int(name: str, default: int, minimum: int = 0) -> int:
    """An integer setting from the environment variable ``name``; a bad value is a usage error (exit 2)."""
    import os

    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        number = int(value)
    except ValueError:
        raise UsageError(f"environment variable {name}={value!r} is not an integer") from None
    if number < minimum:
        raise UsageError(f"environment variable {name}={value!r} must be at least {minimum}")
    return number


def first_line(error: BaseException | str, limit: int = 300) -> str:
    """The first line of an error message, for one-line reports (the exception's type if it has no text)."""
    text = str(error).strip().splitlines()
    line = text[0][:limit] if text else ""
    if not line and isinstance(error, BaseException):
        return type(error).__name__
    return line or "unknown error"
