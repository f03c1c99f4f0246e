"""User-facing errors.

Every error a user can cause (bad config, missing file, malformed data) is raised as an
``LrxError`` whose message is one line naming the problem and the fix. ``launch/train.py``
prints it without a traceback and exits non-zero.
"""


class LrxError(Exception):
    """A problem with the user's input: printed as one line, exit code 2."""


class ConfigError(LrxError):
    """Invalid configuration: unknown key, wrong type, bad value."""


class DataError(LrxError):
    """Missing or malformed data files."""


class ModelError(LrxError):
    """Missing or unloadable model."""
