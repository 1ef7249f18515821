"""User-facing errors: each carries one line that names what is wrong and what was expected.

The CLI prints the line and exits with status 2; anything else is a bug and keeps its traceback.
"""


class MuppetError(Exception):
    """Bad input from the user (config, data, paths)."""


class ConfigError(MuppetError):
    """An invalid configuration value, found before Ray starts."""


class TrainingError(MuppetError):
    """A run that stopped itself (non-finite steps): names the step, the tasks and the setting."""


class DataError(MuppetError):
    """Task data that cannot be turned into features: names task, file and row."""


def unwrap_data_error(error: BaseException) -> BaseException:
    """The DataError inside an exception from a Ray task (which arrives wrapped), else `error`."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, DataError):
            lines = str(seen).strip().splitlines()
            return DataError(next((m for m in reversed(lines) if "task " in m), lines[-1]))
        seen = seen.__cause__ or seen.__context__
    marker = "muppet_ray.errors.DataError: "
    if marker in str(error):
        return DataError(str(error).split(marker, 1)[1].strip().splitlines()[0])
    return error
