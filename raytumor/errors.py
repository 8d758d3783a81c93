"""Errors meant for users: the CLI prints their message on one line, without a traceback."""


class RaytumorError(Exception):
    """A problem the user can fix (bad input, bad config, missing dataset).

    The message names the file or field and what is wrong.
    """


class DatasetError(RaytumorError):
    """A dataset directory, manifest or class table is missing or malformed."""


class ConfigError(RaytumorError):
    """A config or search-space file has an unknown key, a wrong type or a value out of range."""
