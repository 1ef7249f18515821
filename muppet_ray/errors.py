"""User-facing errors: each carries one line that names what is wrong and what was expected.

The CLI prints the line and exits with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re

# What a full, read-only or forbidden storage raises; each is the user's to fix, not a bug.
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
# (how such an error reads in a worker's traceback, which Ray Train passes on as text)
_ERRNO_TEXT = re.compile(r"\[errno (\d+)\] [^\n:']+(?::\s*'([^'\n]+)')?", re.IGNORECASE)


class MuppetError(Exception):
    """Bad input from the user (config, data, paths)."""


class ConfigError(MuppetError):
    """An invalid configuration value, found before Ray starts."""


class TrainingError(MuppetError):
    """A run that stopped itself (non-finite steps: names the step, the tasks and the setting),
    or a sweep whose points failed (names them and their errors)."""


class RunStopped(Exception):
    """Raised on every worker at the same step when the run must end early (train.py): the
    per-worker function turns it into the run's last report, and the driver into a
    TrainingError (a raised worker error would have Ray Train restart the run instead)."""

    def __init__(self, step: int, reason: str):
        super().__init__(reason)
        self.step, self.reason = step, reason


class StorageError(MuppetError):
    """Storage a run cannot write (full, read-only, forbidden): names the path."""


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


@contextlib.contextmanager
def storage_faults(where: str):
    """Turns a failed write to storage, here or in a training worker (whose error arrives
    wrapped by Ray Train, after its retries), into one line naming the path."""
    try:
        yield
    except MuppetError:
        raise
    except Exception as error:
        found = _storage_failure(error)
        if found is None:
            raise
        code, path = found
        raise StorageError(f"cannot write {path or where}: {os.strerror(code)} (errno {code}); "
                           "free space or fix its permissions, then run the same command again "
                           "to resume from the last checkpoint") from error


def _storage_failure(error: BaseException) -> tuple[int, str | None] | None:
    pending, seen, texts = [error], set(), []
    while pending:
        e = pending.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        texts.append(str(e))
        if isinstance(e, OSError) and e.errno in STORAGE_ERRNOS:
            return e.errno, e.filename
        pending += [e.__cause__, e.__context__, getattr(e, "cause", None),
                    *getattr(e, "worker_failures", {}).values()]
    for match in (m for text in texts for m in _ERRNO_TEXT.finditer(text)):
        if int(match[1]) in STORAGE_ERRNOS:
            return int(match[1]), match[2]
    return None
