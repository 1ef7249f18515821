"""Storage at a URI (storage.py) against a real S3-protocol server (moto's, on 127.0.0.1): a
model stored in a bucket comes into a node's cache once, whole, however many processes ask at
once, and again when it changes."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from muppet_ray.storage import RunDir, local_copy
from tests.conftest import ROOT

FILL = """
import sys
import pyarrow.fs as pafs
from muppet_ray.storage import local_copy

download = pafs.copy_files
def counted(*args, **kwargs):  # (each download noted in the file argv[2])
    with open(sys.argv[2], "a") as f:
        f.write("download\\n")
    return download(*args, **kwargs)
pafs.copy_files = counted
print(local_copy(sys.argv[1]))
"""


def test_a_stored_model_comes_into_a_nodes_cache_whole_once_for_all_and_again_if_changed(
        s3, tmp_path):
    model = RunDir("s3://muppet/models/tiny")
    model.write_bytes("config.json", b'{"model_type": "bert"}')
    model.write_bytes("weights/model.safetensors", os.urandom(3 << 20))
    cache = tmp_path / "cache"
    env = {**os.environ, "MUPPET_CACHE_DIR": str(cache), "PYTHONPATH": str(ROOT)}
    downloads = tmp_path / "downloads"
    fillers = [subprocess.Popen([sys.executable, "-c", FILL, model.root, str(downloads)],
                                env=env, stdout=subprocess.PIPE, text=True) for _ in range(4)]
    paths = {filler.communicate(timeout=120)[0].strip() for filler in fillers}
    assert all(filler.returncode == 0 for filler in fillers)
    assert len(paths) == 1  # one copy, which all four processes load
    assert downloads.read_text().splitlines() == ["download"]  # (made by one of them)
    copy = paths.pop()
    with model.open_input("weights/model.safetensors") as f:
        assert (Path(copy) / "weights" / "model.safetensors").read_bytes() == f.read()
    # nothing half-made left beside it: the copy and its lock only
    assert sorted(p.name for p in cache.iterdir()) == sorted([os.path.basename(copy),
                                                             os.path.basename(copy) + ".lock"])
    os.environ["MUPPET_CACHE_DIR"] = str(cache)
    try:
        assert local_copy(model.root) == copy  # (found: no second download)
        time.sleep(1.1)  # (S3 keeps modification times in seconds)
        model.write_bytes("config.json", b'{"model_type": "roberta"}')
        changed = local_copy(model.root)
        assert changed != copy
        assert (Path(changed) / "config.json").read_text() == '{"model_type": "roberta"}'
    finally:
        del os.environ["MUPPET_CACHE_DIR"]
    # local paths and Hub ids are left as they are
    assert local_copy(str(tmp_path)) == str(tmp_path)
    assert local_copy("bert-base-uncased") == "bert-base-uncased"
    fs, _ = pafs.FileSystem.from_uri("s3://muppet")
    fs.delete_dir("muppet/models")


def test_a_staged_directory_replaces_its_target_whole_in_place_or_in_a_bucket(s3, tmp_path,
                                                                              monkeypatch):
    run = RunDir(str(tmp_path / "run"))
    run.write_text("export/old.txt", "old")
    with run.staged("export") as local:
        # local storage: written beside the target (the same disk), renamed into place
        assert Path(local).parent == tmp_path / "run"
        Path(local, "model.bin").write_bytes(b"new")
        assert run.read_text("export/old.txt") == "old"  # (the old one, until the end)
    assert sorted(run.list("export")) == ["model.bin"]
    try:
        with run.staged("export") as local:
            Path(local, "half.bin").write_bytes(b"ha")
            raise OSError("disk full")
    except OSError:
        pass
    assert sorted(os.listdir(tmp_path / "run")) == ["export"]  # nothing half-made is left
    killed = tmp_path / "run" / ".export.0123abcd.tmp"
    at_work = tmp_path / "run" / ".export.4567.tmp"
    killed.mkdir()  # (as a writer killed midway leaves it, an hour ago)
    os.utime(killed, (time.time() - 3601,) * 2)
    at_work.mkdir()  # (another command's, writing the same export now)
    with run.staged("export") as local:
        Path(local, "model.bin").write_bytes(b"new")
    assert sorted(os.listdir(tmp_path / "run")) == [".export.4567.tmp", "export"]
    assert sorted(run.list("export")) == ["model.bin"]
    bucket = RunDir("s3://muppet/runs/staged")
    with bucket.staged("export") as local:
        Path(local, "model.bin").write_bytes(b"in a bucket")
    with bucket.open_input("export/model.bin") as f:
        assert f.read() == b"in a bucket"
    # In a bucket, the file that says it is complete goes last: an upload that fails midway
    # leaves an export without it, which is never taken as complete.
    copy_files = pafs.copy_files

    def connection_lost(*args, **kwargs):  # (the files are in; the answer never comes)
        copy_files(*args, **kwargs)
        raise OSError("connection reset by peer")

    monkeypatch.setattr(pafs, "copy_files", connection_lost)
    with pytest.raises(OSError), bucket.staged("export", last="muppet.json") as local:
        Path(local, "muppet.json").write_text("{}")
        Path(local, "model.bin").write_bytes(b"more")
    monkeypatch.undo()
    assert not bucket.exists("export/muppet.json")
    with bucket.staged("export", last="muppet.json") as local:
        Path(local, "muppet.json").write_text("{}")
    assert bucket.read_text("export/muppet.json") == "{}"
    bucket.remove()
