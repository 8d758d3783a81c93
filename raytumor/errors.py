"""Errors meant for users: the CLI prints their message on one line, without a traceback."""


class RaytumorError(Exception):
    """A problem the user can fix (bad input, bad config, missing dataset).

    The message names the file or field and what is wrong.
    """


class DatasetError(RaytumorError):
    """A dataset directory, manifest or class table is missing or malformed."""


class ConfigError(RaytumorError):
    """A config or search-space file has an unknown key, a wrong type or a value out of range."""


def short_reason(exc: BaseException) -> str:
    """The first informative sentence of an error from a library such as torch, whose messages
    run to many lines: for a one-line error message that quotes it."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip() and not line.strip().endswith(":")]
    return lines[0].split(". ")[0][:200] if lines else type(exc).__name__
