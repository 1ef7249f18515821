"""Storage faults as one line (no Ray): the shapes in which a failed write reaches the driver."""

import errno

import pytest

from muppet_ray.errors import StorageError, storage_faults


@pytest.mark.parametrize("raised, expected", [
    # raised in this process
    (OSError(errno.ENOSPC, "No space left on device"),
     "cannot write /runs/a: No space left on device (errno 28)"),
    (PermissionError(errno.EACCES, "Permission denied", "/runs/a/config.yaml"),
     "cannot write /runs/a/config.yaml: Permission denied (errno 13)"),
    # a worker's, passed on by Ray Train as text (pyarrow spells it "[errno N]")
    (RuntimeError("Training failed due to worker errors:\nOSError: [Errno 30] Read-only file "
                  "system: '/runs/a/metrics.jsonl'"),
     "cannot write /runs/a/metrics.jsonl: Read-only file system (errno 30)"),
    (RuntimeError("OSError: [Errno 28] Error writing bytes to file. Detail: [errno 28] No space "
                  "left on device"), "cannot write /runs/a: No space left on device (errno 28)"),
])
def test_a_failed_write_becomes_one_line(raised, expected):
    with pytest.raises(StorageError) as caught, storage_faults("/runs/a"):
        raise raised
    assert str(caught.value).startswith(expected + "; free space or fix its permissions")
    assert "\n" not in str(caught.value)


def test_other_errors_keep_their_traceback():
    with pytest.raises(FileNotFoundError), storage_faults("/runs/a"):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "/runs/a/x")
