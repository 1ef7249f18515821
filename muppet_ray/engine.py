"""The model in DeepSpeed's engine: backbone and heads (model.py), optimizer and learning-rate
schedule (optim.py), and the ZeRO stage, chosen here when it is `auto`."""

from __future__ import annotations

import logging

import psutil
import torch

from muppet_ray import runtime
from muppet_ray.config import Config
from muppet_ray.errors import ConfigError
from muppet_ray.model import MuppetModel, build_backbone, hidden_size
from muppet_ray.optim import (
    activation_memory,
    build_optimizer,
    choose_zero_stage,
    deepspeed_config,
)
from muppet_ray.step import uses_bf16
from muppet_ray.storage import local_copy
from muppet_ray.task_types.denoising import pretrained_head
from muppet_ray.tasks import HeadLayout
from muppet_ray.workers import Workers

log = logging.getLogger("muppet_ray")


def build_engine(config: Config, tokenizer, layouts: list[HeadLayout], workers: Workers,
                 initial_heads: dict | None = None, load_universal: bool = False,
                 saved_stage: int | None = None) -> tuple:
    """(DeepSpeed's engine, its ZeRO stage). `initial_heads`: trained head tensors to start
    from (fine-tuning); `load_universal`: a universal checkpoint will be loaded into it;
    `saved_stage`: the ZeRO stage of the checkpoint to be loaded (a resumed run keeps it)."""
    runtime.use_deepspeed_accelerator(workers.on_gpu)
    import deepspeed  # after DS_ACCELERATOR: it picks its accelerator at import

    bf16 = uses_bf16(config, workers.device)
    torch.manual_seed(config.training.seed)  # identical initial weights everywhere
    model = MuppetModel(
        build_backbone(config.model, tokenizer), layouts, config.model.dropout,
        config.training.loss_scaling, config.model.max_target_length, tokenizer,
    )
    if "denoising" in model.heads and config.model.pretrained:
        # the backbone's own masked-LM head, where its checkpoint has one
        taken = model.heads["denoising"].load_pretrained(
            pretrained_head(local_copy(config.model.pretrained)))
        if workers.rank == 0:
            log.info("[muppet-ray] denoising's masked-LM head: "
                     + ("the checkpoint's own" if taken else "new (the checkpoint has none)"))
    if initial_heads:
        # strict: every tensor handed over must land (a wrong name would silently be lost)
        missing = set(initial_heads) - set(model.heads.state_dict())
        if missing:
            raise RuntimeError(f"initial heads {sorted(missing)} are not heads of the model")
        model.heads.load_state_dict(initial_heads, strict=False)
    # from_pretrained hands the backbone back in eval mode. A fresh run's step-0 evaluation ends
    # in train(), but a resumed run starts without one: it trained the backbone without dropout.
    model.train()
    if config.training.compile:
        model.backbone.compile(dynamic=True)  # (every micro-batch has its own shape)
    zero_stage = config.deepspeed.zero_stage
    if zero_stage == "auto":
        zero_stage = saved_stage if saved_stage is not None else _fitting_stage(
            config, model, bf16, workers)
    if zero_stage == 3:
        whole = fetch_layers_whole(model, deepspeed)
        if workers.rank == 0:
            log.info(f"[muppet-ray] ZeRO-3 gathers each {', '.join(whole) or 'module'} whole")
    optimizer, scheduler = build_optimizer(model, config, fused=workers.on_gpu)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(config, workers.world, bf16, zero_stage, load_universal),
    )
    if zero_stage and not runtime.reduces_once_per_step(engine.optimizer):
        raise ConfigError(
            f"deepspeed.config: DeepSpeed wraps the optimizer in "
            f"{type(engine.optimizer).__name__}, which cannot reduce gradients once per "
            "step (remove data_types.grad_accum_dtype, or use another zero_stage)")
    return engine, zero_stage


def fetch_layers_whole(model: MuppetModel, deepspeed) -> list[str]:
    """ZeRO-3 gathers a module's weights before it runs and frees them after, with hooks around
    every module, forward and backward: on a model of BERT's shape that host work is most of
    what ZeRO-3 costs on one GPU (0.42 of ZeRO-2's speed; bench/zero3_hooks.py). Each of the
    backbone's layers (the entries of its layer lists) is gathered and freed as one unit
    instead, as FSDP wraps one unit per transformer block. Returns the layer classes' names
    (none where the backbone has no layer list: every module is then hooked as before)."""
    containers = (torch.nn.ModuleList, torch.nn.ModuleDict, torch.nn.Sequential)
    layers = {type(layer) for stack in model.backbone.modules()
              if isinstance(stack, torch.nn.ModuleList) for layer in stack
              if not isinstance(layer, containers) and any(True for _ in layer.parameters())}
    layers = sorted(layers, key=lambda c: c.__name__)
    if layers:
        deepspeed.utils.set_z3_leaf_modules(model, layers)
    return [c.__name__ for c in layers]


def _fitting_stage(config: Config, model: MuppetModel, bf16: bool, workers: Workers) -> int:
    """The stage that fits the smallest worker's memory (optim.choose_zero_stage), said once."""
    if workers.on_gpu:
        memory = torch.cuda.get_device_properties(workers.device).total_memory
    else:  # (the node's memory, shared by the workers on it)
        memory = psutil.virtual_memory().total // workers.local_world
    memory = int(workers.all_reduce(torch.tensor([float(memory)], dtype=torch.float64),
                                    "min").item())
    backbone = model.backbone.config
    layers = (getattr(backbone, "num_hidden_layers", 0) if not backbone.is_encoder_decoder
              else backbone.encoder_layers + backbone.decoder_layers)
    batching = config.batching
    tokens = (batching.max_tokens_per_pass or batching.tokens_per_micro_batch
              or batching.micro_batch_size * config.model.max_length)
    stage, reason = choose_zero_stage(
        sum(p.numel() for p in model.parameters()), workers.world, memory, bf16,
        activation_memory(tokens, layers, hidden_size(model.backbone), bf16))
    if workers.rank == 0:
        log.info(f"[muppet-ray] deepspeed.zero_stage auto: ZeRO-{stage} ({reason})")
    return stage
