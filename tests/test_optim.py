import torch

from muppet_ray.config import Config, load_config
from muppet_ray.optim import build_optimizer, deepspeed_config


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
    ds = deepspeed_config(config, world_size=4, bf16=True)
    # one DeepSpeed micro-step per optimizer step: the workers accumulate (train.py)
    assert ds["train_batch_size"] == 8 * 3 * 4 and ds["gradient_accumulation_steps"] == 1
    assert ds["checkpoint"] == {"load_universal": False}
    assert ds["zero_optimization"] == {"stage": 3, "overlap_comm": True}
    assert ds["bf16"] == {"enabled": True}
    assert deepspeed_config(Config(), 2, False)["bf16"] == {"enabled": False}
