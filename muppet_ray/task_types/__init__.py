"""The task types of pre-finetuning; each module holds its features, head, loss, loss-scaling n
and metric."""

from muppet_ray.task_types.base import IGNORE, Features, Limits, TaskType
from muppet_ray.task_types.classification import Classification, Regression
from muppet_ray.task_types.denoising import Denoising
from muppet_ray.task_types.generation import Generation
from muppet_ray.task_types.multiple_choice import MultipleChoice
from muppet_ray.task_types.span import Span

TASK_TYPES: dict[str, TaskType] = {
    t.name: t for t in (Classification(), Regression(), MultipleChoice(), Span(), Generation(),
                        Denoising())
}

# Heads in the fixed order the model runs them on every micro-step.
HEADS = ("classification", "multiple_choice", "span", "generation", "denoising")

__all__ = ["HEADS", "IGNORE", "TASK_TYPES", "Features", "Limits", "TaskType"]
