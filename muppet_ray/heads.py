"""Which trained head a fine-tuning run starts from, and moving its tensors into the new model.

    head of the task type       reused when ("auto")
    classification/regression   the task itself was in the source's mixture, same labels
    multiple choice, span       the source trained the shared head (any task of that type)
    denoising                   on an encoder, the source trained the masked-LM head; on an
                                encoder-decoder always (its LM head, as generation)
    generation                  always: the LM head is part of the backbone

`--head reuse` demands a trained head (an error if there is none); `--head new` starts fresh.
"""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from muppet_ray.errors import ConfigError
from muppet_ray.model_source import Source
from muppet_ray.task_types import TASK_TYPES
from muppet_ray.tasks import Task

HEAD_CHOICES = ("auto", "reuse", "new")


def initial_heads(source: Source, tasks: list[Task], choice: str, asked_by: str = "--head reuse"
                  ) -> tuple[dict, dict[str, str]]:
    """The trained head tensors to start `tasks` from (keyed as `MuppetModel.heads`), and for
    each task where its head comes from ('new', or the source task that trained it)."""
    origin = head_origins(source, tasks, choice, asked_by)
    reused = [t for t in tasks if is_reused(t, origin)]
    if not reused:
        return {}, origin
    return _head_tensors(source, tasks, reused), origin


LM_HEAD = " (LM head)"  # an origin that is the backbone's own LM head


def is_reused(task: Task, origin: dict[str, str]) -> bool:
    """Whether `task` starts from a head a pre-finetuning trained (the LM head of an
    encoder-decoder is part of the backbone: not counted)."""
    return origin[task.name] != "new" and not origin[task.name].endswith(LM_HEAD)


def head_origins(source: Source, tasks: list[Task], choice: str, asked_by: str = "--head reuse"
                 ) -> dict[str, str]:
    """For each task, where its head comes from: 'new', or the source task that trained it."""
    if choice not in HEAD_CHOICES:
        raise ConfigError(f"--head: expected one of {list(HEAD_CHOICES)}, got {choice!r}")
    trained = source.trained_heads()
    trained_as = {layout.name: layout for layout in source.layouts()}
    origin: dict[str, str] = {}
    for task in tasks:
        head = task.task_type.head
        if head == "generation" or (head == "denoising" and (source.manifest or {}).get(
                "encoder_decoder")):
            origin[task.name] = f"{source.given}{LM_HEAD}"
            continue
        key = task.name if head == "classification" else head
        reason = None
        if key not in trained:
            reason = (f"{source.given!r} has no trained {head.replace('_', ' ')} head"
                      + (f" for task {task.name!r}" if head == "classification" else ""))
        elif head == "classification" and trained_as[task.name] != task.layout():
            was = trained_as[task.name]
            reason = (f"task {task.name!r} was trained in {source.given!r} with another type "
                      f"or labels ({was.type}, {list(was.labels)})")
        if reason and choice == "reuse":
            raise ConfigError(f"{asked_by}: {reason}")
        origin[task.name] = "new" if reason or choice == "new" else trained[key]
    return origin


def _head_tensors(source: Source, tasks: list[Task], reused: list[Task]) -> dict:
    heads = load_file(source.heads_file())
    out: dict[str, torch.Tensor] = {}
    for shared in ("multiple_choice", "span", "denoising"):
        if any(t.task_type.head == shared for t in reused):
            out.update({k: v for k, v in heads.items() if k.startswith(f"{shared}.")})
    class_tasks = [t for t in tasks if t.task_type.head == "classification"]
    if any(t in class_tasks for t in reused):
        # The new model stacks the heads of its own classification tasks: copy each reused one
        # into its slot (all of them are reused when any is: see `finetune` and `evaluate`).
        source_index = [s["name"] for s in source.manifest["tasks"]
                        if TASK_TYPES[s["type"]].head == "classification"]
        width = max(t.num_outputs for t in class_tasks)
        rows = [source_index.index(t.name) for t in class_tasks]
        out["classification.dense_weight"] = heads["classification.dense_weight"][rows]
        out["classification.dense_bias"] = heads["classification.dense_bias"][rows]
        out["classification.out_weight"] = _fit(heads["classification.out_weight"][rows], width)
        out["classification.out_bias"] = _fit(heads["classification.out_bias"][rows], width)
    return {k: v.to(torch.float32).contiguous() for k, v in out.items()}


def _fit(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Cut or zero-pad the last dimension (the stacked heads are as wide as the widest)."""
    if tensor.shape[-1] >= width:
        return tensor[..., :width]
    return torch.nn.functional.pad(tensor, (0, width - tensor.shape[-1]))
