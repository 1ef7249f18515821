"""User-facing errors: each carries one line that names what is wrong and what was expected.

The CLI prints the line and exits with status 2; anything else is a bug and keeps its traceback.
"""


class MuppetError(Exception):
    """Bad input from the user (config, data, paths)."""


class ConfigError(MuppetError):
    """An invalid configuration value, found before Ray starts."""


class DataError(MuppetError):
    """Task data that cannot be turned into features: names task, file and row."""
