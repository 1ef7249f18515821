import pytest
import torch

from muppet_ray.config import Config, load_config
from muppet_ray.optim import (
    GIB,
    activation_memory,
    build_optimizer,
    choose_zero_stage,
    deepspeed_config,
    worker_memory,
)


def test_warmup_then_linear_decay():
    config = load_config(None, ["training.max_steps=10", "training.warmup_steps=4",
                                "training.learning_rate=1.0"])
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
    optimizer, schedule = build_optimizer(model, config)
    rates = []
    for _ in range(10):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates == [0.2, 0.4, 0.6, 0.8, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6]
    decayed = {id(p) for p in optimizer.param_groups[0]["params"]}
    assert decayed == {id(model[0].weight)}  # no weight decay on biases and norms


def test_deepspeed_config():
    config = load_config(None, ["batching.micro_batch_size=8", "batching.grad_accum_steps=3",
                                "deepspeed.zero_stage=3", "scaling.num_workers=4",
                                "deepspeed.config={zero_optimization: {overlap_comm: true}}"])
    ds = deepspeed_config(config, world_size=4, bf16=True, zero_stage=config.deepspeed.zero_stage)
    # one DeepSpeed micro-step per optimizer step: the workers accumulate (train.py)
    assert ds["train_batch_size"] == 8 * 3 * 4 and ds["gradient_accumulation_steps"] == 1
    assert ds["checkpoint"] == {"load_universal": False}
    assert ds["zero_optimization"] == {"stage": 3, "overlap_comm": True}
    assert ds["bf16"] == {"enabled": True}
    assert deepspeed_config(Config(), 2, False, 2)["bf16"] == {"enabled": False}


def test_what_each_zero_stage_keeps_on_a_worker():
    # bf16: weights 2 bytes a parameter, fp32 gradients 4, fp32 master weights and moments 12
    assert [worker_memory(s, 1000, 4, True, 0) for s in range(4)] == [
        18000, 2000 + 4000 + 12000 // 4, 2000 + 16000 // 4, 18000 // 4]
    assert [worker_memory(s, 1000, 4, False, 7) for s in (0, 3)] == [16007, 4007]
    assert activation_memory(8192, 24, 1024, bf16=True) == 8192 * 24 * 1024 * 34


@pytest.mark.parametrize("parameters,workers,memory_gib,tokens,stage", [
    (355e6, 1, 141, 8192, 2),   # RoBERTa-large on one H200
    (355e6, 8, 16, 8192, 2),    # ... on eight 16 GB GPUs
    (7e9, 8, 24, 2048, 3),      # 7B on 24 GB GPUs: ZeRO-2's weights and gradients take 26 GiB
    (1.5e9, 1, 24, 2048, 3),    # fits nowhere on one worker: ZeRO-3, and says so
])
def test_auto_takes_zero_2_where_it_fits_with_headroom(parameters, workers, memory_gib, tokens,
                                                       stage):
    activations = activation_memory(tokens, 24, 1024, bf16=True)
    chosen, reason = choose_zero_stage(int(parameters), workers, int(memory_gib * GIB), True,
                                       activations)
    assert chosen == stage
    assert f"{memory_gib:.1f} GiB a worker" in reason and f"{workers} workers" in reason
    assert ("neither fits" in reason) == (parameters == 1.5e9)
