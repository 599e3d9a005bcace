"""Errors the CLI turns into a clear message and exit code 2 (bad input, nothing was run)."""


class ConfigError(ValueError):
    """A bad value in the configuration or on the command line. The message names the value
    and the valid choices."""


class DataMissingError(FileNotFoundError):
    """A dataset is not on disk and cannot be downloaded. The message says where to put it."""
