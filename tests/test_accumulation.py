"""A step's micro-batches run in several passes and reduced once (train.py) give the update of
the whole step, under every ZeRO stage (ZeRO-3 also with each layer gathered whole), and the
task-transfer sketches taken meanwhile (transfer.py) are those of the whole gradients: real
DeepSpeed in 2 processes on the CPU (gloo)."""

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from muppet_ray import batch as mb
from muppet_ray.config import ModelConfig
from muppet_ray.engine import fetch_layers_whole
from muppet_ray.model import MuppetModel, build_backbone
from muppet_ray.train import one_reduction
from muppet_ray.transfer import GradientSimilarity
from tests.test_task_types import featurize, suite_tokenizer, task

pytestmark = pytest.mark.integration
TASKS = ["next_number", "entailment", "what_has"]  # multiple choice, classification, span
LR = 0.5


def micro_batches(tokenizer):
    """The step: 4 single-task micro-batches (2 per worker), the first with 3-5 rows an
    example."""
    sizes = [("next_number", 6), ("entailment", 4), ("what_has", 2), ("next_number", 3)]
    return [mb.collate(featurize(name, tokenizer, n), TASKS.index(name), tokenizer.pad_token_id)
            for name, n in sizes]


def build_model(tokenizer, arch: str = "bert"):
    torch.manual_seed(0)
    config = ModelConfig(arch=arch, hidden_size=32, num_layers=2, num_heads=2, ffn_size=64,
                         max_length=64, dropout=0.0)
    specs = [task(name).layout() for name in TASKS]
    return MuppetModel(build_backbone(config, tokenizer), specs, 0.0, tokenizer=tokenizer)


def expected_weights(tokenizer, batches, arch: str = "bert"):
    """Plain PyTorch, one process: SGD on the mean of the micro-batches' mean losses."""
    model = build_model(tokenizer, arch)
    loss = sum(model(mb.to_torch(b, torch.device("cpu")))["loss"] for b in batches) / len(batches)
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= LR * p.grad
    return model.state_dict()


def expected_sketches(tokenizer, batches, arch: str, world: int) -> torch.Tensor:
    """Plain PyTorch, one process: the tasks' gradient sketches (transfer.py) summed over the
    workers, each worker's micro-batches trained whole, scaled as the step scales them."""
    model = build_model(tokenizer, arch)
    total = 0
    for rank in range(world):
        similarity = GradientSimilarity(model, len(TASKS), torch.device("cpu"))
        mine = batches[rank::world]
        for batch in mine:
            model.zero_grad(set_to_none=True)
            with similarity.measuring(batch):
                (model(mb.to_torch(batch, torch.device("cpu")))["loss"] / len(mine)).backward()
        total = total + similarity.sketches
    return total


def run_worker(rank: int, port: int, world: int):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world), DS_ACCELERATOR="cpu")
    import deepspeed

    torch.set_num_threads(1)
    tokenizer = suite_tokenizer()
    batches = micro_batches(tokenizer)
    expected = {arch: expected_weights(tokenizer, batches, arch) for arch in ("bert", "bart")}
    sketches = {arch: expected_sketches(tokenizer, batches, arch, world)
                for arch in ("bert", "bart")}
    mine = batches[rank::world]
    # ZeRO-3 as DeepSpeed hooks it by default, and as muppet-ray runs it (each layer one unit,
    # the encoder's and the decoder's on an encoder-decoder)
    for arch, stage, layers_whole in (("bert", 0, False), ("bert", 1, False), ("bert", 2, False),
                                      ("bert", 3, False), ("bert", 3, True), ("bart", 3, True)):
        model = build_model(tokenizer, arch)
        if layers_whole:
            whole = fetch_layers_whole(model, deepspeed)
            assert whole == (["BertLayer"] if arch == "bert" else
                             ["BartDecoderLayer", "BartEncoderLayer"])
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR),
            config={"train_batch_size": world, "gradient_accumulation_steps": 1,
                    # (every weight gathered and freed: these are all below the size DeepSpeed
                    # otherwise keeps whole on every worker)
                    "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
                    "zero_allow_untested_optimizer": True,
                    "gradient_clipping": 0.0})  # (DeepSpeed's default clips at 1.0)
        # (built on the engine's module, as train.py does: under ZeRO-3 its weights are shards)
        similarity = GradientSimilarity(engine.module, len(TASKS), torch.device("cpu"))
        with one_reduction(engine, stage):
            for batch in mine:
                # 3 passes each: the 2-example span micro-batch gets a share-0 third pass
                with similarity.measuring(batch):
                    for piece, share in mb.split(batch, 3):
                        out = engine(mb.to_torch(piece, torch.device("cpu")))
                        engine.backward(out["loss"] * (share / len(mine)))
        engine.step()
        # The sketches are the whole gradients' (each weight's hook saw all of its gradient of
        # each pass, not this worker's shard of it, at the same index as in the plain model).
        summed = similarity.sketches.clone()
        dist.all_reduce(summed)
        want = sketches[arch]
        assert (want.abs().sum(dim=1) > 0).all()  # (every task's gradient was sketched)
        assert torch.allclose(summed, want, rtol=1e-4, atol=1e-6 * float(want.abs().max())), (
            arch, stage, layers_whole, float((summed - want).abs().max()))
        # ... and the cosines logged are those of the sketches summed over the workers
        measured, cosine = similarity.similarities(world)
        unit = want / want.norm(dim=1, keepdim=True)
        assert measured == [0, 1, 2] and np.allclose(cosine, (unit @ unit.T).numpy(), atol=1e-4)
        params = list(engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            got = engine.module.state_dict()
            for name, value in expected[arch].items():
                assert torch.allclose(got[name], value, atol=1e-5), (arch, stage, layers_whole,
                                                                     name)


def test_passes_and_one_reduction_give_the_whole_steps_update():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(run_worker, args=(port, 2), nprocs=2)


def test_split_keeps_every_example_once():
    tokenizer = suite_tokenizer()
    batch = micro_batches(tokenizer)[0]  # 6 multiple-choice examples, 3-5 rows each
    pieces = mb.split(batch, 4)
    assert [share for _, share in pieces] == [2 / 6, 2 / 6, 1 / 6, 1 / 6]
    assert sum(len(p["input_ids"]) for p, _ in pieces) == len(batch["input_ids"])
    joined = torch.cat([torch.from_numpy(p["example_id"]) for p, _ in pieces])
    assert joined.tolist() == batch["example_id"].tolist()
    for piece, _ in pieces:  # each padded to its own longest row, rows still its own
        assert piece["attention_mask"][:, -1].any()
        assert piece["row_example"].min() == 0
        assert piece["row_example"].max() == mb.num_examples(piece) - 1
    filler = mb.split(batch, 8)
    assert [share for _, share in filler][-2:] == [0.0, 0.0]
