"""Resuming, per worker (checkpoint.py): each worker fetches only the files it loads, each checked
against the manifests as it arrives; a checkpoint to reshard is made universal by worker 0 alone
while the others wait for its word. On a local file system; against a bucket and with real
DeepSpeed shards in test_multinode.py. And a resumed run trains as the uninterrupted one did: its
engine is built in training mode (real DeepSpeed, one process)."""

import hashlib
import json
import threading
import time

import pyarrow.fs as pafs

from muppet_ray import checkpoint as checkpoints
from muppet_ray.checkpoint import UNIVERSAL_DONE, damage, fetch, fetch_universal

FILES = {"checkpoint.json": json.dumps({"step": 8, "world_size": 2, "nodes": ["a", "b"]}),
         "deepspeed/mp_rank_00_model_states.pt": "weights",
         "deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt": "moments of worker 0",
         "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt": "moments of worker 1"}
WRITTEN_BY = {0: list(FILES)[:3], 1: list(FILES)[3:]}


def checkpoint(tmp_path):
    """A checkpoint of two workers as checkpoint.save writes one (each its files, manifest)."""
    path = tmp_path / "checkpoint_000008"
    for relative, text in FILES.items():
        (path / relative).parent.mkdir(parents=True, exist_ok=True)
        (path / relative).write_text(text)
    for rank, names in WRITTEN_BY.items():
        manifest = {n: [len(FILES[n]), hashlib.sha256(FILES[n].encode()).hexdigest()]
                    for n in names}
        (path / f"manifest-rank{rank:03d}.json").write_text(json.dumps(manifest))
    return path


def fetched(local):
    return sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())


def test_each_worker_fetches_and_checks_only_what_it_loads(tmp_path):
    path, fs = checkpoint(tmp_path), pafs.LocalFileSystem()
    assert fetch(fs, str(path), str(tmp_path / "w1"), rank=1) is None
    assert fetched(tmp_path / "w1") == sorted(["checkpoint.json",
                                              "deepspeed/mp_rank_00_model_states.pt",
                                              "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt"])
    # Worker 0's partition altered: worker 1 never reads it, worker 0 finds it, so does a check
    # of the whole checkpoint.
    (path / "deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt").write_text("moments of worker ?")
    assert fetch(fs, str(path), str(tmp_path / "again"), rank=1) is None
    expected = "deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt does not match its " \
               "manifest's SHA-256"
    assert fetch(fs, str(path), str(tmp_path / "w0"), rank=0) == expected
    assert damage(fs, str(path)) == expected
    (path / "deepspeed/mp_rank_00_model_states.pt").unlink()
    assert fetch(fs, str(path), str(tmp_path / "w1b"), rank=1) == (
        "deepspeed/mp_rank_00_model_states.pt is missing")
    (path / "checkpoint.json").write_text('{"step": 8, "world_si')  # (cut short)
    assert damage(fs, str(path)) == "checkpoint.json is unreadable"


def test_the_others_wait_for_worker_0s_word_on_a_checkpoint_to_reshard(tmp_path):
    path, fs = checkpoint(tmp_path), pafs.LocalFileSystem()
    # (a file only worker 0 reads: what worker 1 says of it can only be worker 0's word)
    (path / "deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt").write_text("moments, altered")
    # Worker 1 of the new world waits (polling, not in a collective) until worker 0 has looked:
    # the checkpoint is damaged, which both then say.
    answer = {}
    waiting = threading.Thread(target=lambda: answer.update(
        w1=fetch_universal(fs, str(path), str(tmp_path / "w1"), rank=1, poll_s=0.05)))
    waiting.start()
    time.sleep(0.3)  # (several of its polls)
    assert waiting.is_alive() and not answer
    answer["w0"] = fetch_universal(fs, str(path), str(tmp_path / "w0"), rank=0)
    waiting.join(timeout=30)
    problem = ("deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt has 16 bytes, its "
               "manifest says 19")
    assert answer == {"w0": problem, "w1": problem}
    assert json.loads((path / UNIVERSAL_DONE).read_text()) == {"problem": problem}
    # Without worker 0's word, a worker gives up after its deadline, in one line.
    (path / UNIVERSAL_DONE).unlink()
    assert fetch_universal(fs, str(path), str(tmp_path / "w2"), rank=1, poll_s=0.05,
                           timeout_s=0.3) == "worker 0 did not make it universal within 0.3 s"


def test_a_save_kept_waiting_for_the_last_upload_says_so_until_it_ends(caplog):
    # (one local copy waits for its upload at a time: an upload that never began would
    # otherwise hold the run without a word)
    class EndsInThirdWait:  # (threading.Event's wait, without the waiting)
        def __init__(self):
            self.waits = []

        def wait(self, timeout: float) -> bool:
            self.waits.append(timeout)
            return len(self.waits) == 3

    upload = EndsInThirdWait()
    checkpoints.wait_for_upload(upload, "checkpoint_000020", "checkpoint_000010")
    assert upload.waits == [checkpoints.UPLOAD_NOTICE_S] * 3
    said = [r.getMessage() for r in caplog.records if "still waits" in r.getMessage()]
    assert said == [f"[muppet-ray] checkpoint_000020 still waits for the upload of "
                    f"checkpoint_000010 to end ({s} s so far; one local copy waits for its "
                    "upload at a time)" for s in ("300", "600")]
    caplog.clear()
    ended = threading.Event()
    ended.set()
    checkpoints.wait_for_upload(ended, "checkpoint_000030", "checkpoint_000020")
    assert not [r for r in caplog.records if "still waits" in r.getMessage()]


def test_a_checkpoints_recorded_stage_and_workers_are_read_only_when_well_formed():
    assert checkpoints.zero_stage_in({"zero_stage": 3}) == 3
    assert [checkpoints.zero_stage_in(s) for s in ({}, {"zero_stage": "3"},
                                                  {"zero_stage": 7}, {"zero_stage": True})] == [
        None] * 4
    assert checkpoints.world_size_in({"world_size": 2}) == 2
    assert checkpoints.world_size_in({"world_size": "two"}) is None


def test_a_resume_passes_over_a_damaged_checkpoint_to_the_newest_intact_one(tmp_path, caplog):
    # Three checkpoints Ray Train registered (its snapshot names them); the newest has a byte of
    # its model states altered after it was written. A fourth, intact, was never registered (as
    # when a run is killed before Ray Train takes it): never read. Worker 0 of a run of one
    # resumes from the middle one, saying so.
    import shutil

    import ray.train
    import torch

    from muppet_ray.checkpoint import Checkpointer
    from muppet_ray.storage import CHECKPOINT_SNAPSHOT, RunDir
    from muppet_ray.workers import Workers

    made = checkpoint(tmp_path)  # checkpoint_000008
    for name in ("checkpoint_000016", "checkpoint_000020", "checkpoint_000024"):
        shutil.copytree(made, tmp_path / name)
    (tmp_path / CHECKPOINT_SNAPSHOT).write_text(json.dumps({"checkpoint_results": [
        {"checkpoint_dir_name": f"checkpoint_{s:06d}"} for s in (8, 16, 24)]}))
    states = tmp_path / "checkpoint_000024" / "deepspeed/mp_rank_00_model_states.pt"
    states.write_text("weightz")  # (same size, another byte)
    checkpointer = Checkpointer(RunDir(str(tmp_path)), Workers(0, 1, 1, torch.device("cpu")),
                                sharded=False, per_step=4)
    newest = ray.train.Checkpoint(str(tmp_path / "checkpoint_000024"))
    with caplog.at_level("WARNING", logger="muppet_ray"):
        found = checkpointer._newest_intact(newest, str(tmp_path / "local"))
    assert found.name == "checkpoint_000016" and not found.resharded
    assert "checkpoint_000024 is damaged (deepspeed/mp_rank_00_model_states.pt does not match " \
           "its manifest's SHA-256): not resuming from it" in caplog.text
    assert "resuming from checkpoint_000016, the newest intact checkpoint" in caplog.text
    assert "checkpoint_000020" not in caplog.text


def build_from_pretrained(rank: int, pretrained: str, storage: str, port: int) -> None:
    import os

    import torch

    from muppet_ray.engine import build_engine
    from muppet_ray.workers import Workers
    from tests.conftest import make_config
    from tests.test_task_types import suite_tokenizer, task

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0",
                      WORLD_SIZE="1", DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    config = make_config(storage, f"model.pretrained={pretrained}", "deepspeed.zero_stage=2")
    engine, _ = build_engine(config, suite_tokenizer(), [task("sentiment").layout()],
                             Workers(0, 1, 1, torch.device("cpu")))
    off = [name or "the model" for name, module in engine.module.named_modules()
           if not module.training]
    assert not off, f"built in eval mode: {off[:3]}"


def test_the_engine_is_built_to_train_even_from_a_pretrained_backbone(tmp_path):
    # from_pretrained returns its model in eval mode. A fresh run's step-0 evaluation ended in
    # train(); a resumed run starts without one, and trained the backbone without dropout: not
    # what the uninterrupted run computed (seen on a real online-mixture run: its decisions
    # after the resume differed). Real DeepSpeed, in a process of its own (gloo).
    import torch.multiprocessing as mp
    from transformers import BertConfig, BertModel

    from tests.services import free_port
    from tests.test_task_types import suite_tokenizer

    BertModel(BertConfig(vocab_size=len(suite_tokenizer()), hidden_size=16, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=32)
              ).save_pretrained(tmp_path / "pretrained")
    mp.spawn(build_from_pretrained, args=(str(tmp_path / "pretrained"), str(tmp_path),
                                          free_port()), nprocs=1)
