"""Task models in plain `transformers` form: the Auto classes load them and they give the same
outputs as muppet-ray's own heads on the same inputs (no Ray)."""

import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForMultipleChoice,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
)

from muppet_ray.batch import collate, to_torch
from muppet_ray.config import ModelConfig
from muppet_ray.errors import ConfigError
from muppet_ray.export import to_transformers, write_export
from muppet_ray.model import MuppetModel, build_backbone
from muppet_ray.storage import RunDir
from tests.test_task_types import LIMITS, suite_tokenizer
from tests.test_task_types import task as suite_task

TASKS = ["sentiment", "topic", "rating", "needs", "what_has"]


@pytest.fixture(scope="module")
def tokenizer():
    return suite_tokenizer()


def exported(tokenizer, tmp_path, arch):
    torch.manual_seed(0)
    config = ModelConfig(arch=arch, hidden_size=32, num_layers=1, num_heads=2, ffn_size=64)
    tasks = [suite_task(name) for name in TASKS]
    model = MuppetModel(build_backbone(config, tokenizer), [t.layout() for t in tasks], 0.1)
    with torch.no_grad():  # trained-looking heads: no zero biases that could hide a mix-up
        for p in model.heads.parameters():
            p.normal_(0, 0.5)
    write_export(model, tokenizer, RunDir(str(tmp_path)), 0, "{}")
    return model.eval(), tasks, str(tmp_path / "export")


def batch_of(task, index, tokenizer, n=6):
    features = task.task_type.featurize(task, task.source.sample("validation", n), tokenizer,
                                        LIMITS)
    return to_torch(collate(features, index, tokenizer.pad_token_id), torch.device("cpu"))


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_task_models_match_our_heads(tokenizer, tmp_path, arch):
    model, tasks, export = exported(tokenizer, tmp_path, arch)
    assert type(AutoModel.from_pretrained(export)).__name__ == f"{arch.capitalize()}Model"
    for index, task in enumerate(tasks):
        out_dir = str(tmp_path / task.name)
        name = to_transformers(export, task.name, out_dir)
        batch = batch_of(task, index, tokenizer)
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}
        with torch.no_grad():
            prepared = model.prepare(batch)
            ours = model.head_outputs(prepared, model.encode(prepared))
            if task.type in ("classification", "regression"):
                hf = AutoModelForSequenceClassification.from_pretrained(out_dir).eval()
                theirs = hf(**inputs).logits
                expected = ours["class_logits"][:, : task.num_outputs]
                if task.labels:
                    assert hf.config.id2label == dict(enumerate(task.labels))
            elif task.type == "multiple_choice":
                hf = AutoModelForMultipleChoice.from_pretrained(out_dir).eval()
                choices = len(batch["row_example"]) // len(batch["example_task"])
                theirs = hf(**{k: v.view(-1, choices, v.shape[-1]) for k, v in inputs.items()}
                            ).logits
                expected = ours["choice_scores"].view(-1, choices)
            else:
                hf = AutoModelForQuestionAnswering.from_pretrained(out_dir).eval()
                result = hf(**inputs)
                # (at real tokens: at padding, the packed encoder's logits are the head's bias)
                real = inputs["attention_mask"].bool()
                theirs = torch.stack([result.start_logits, result.end_logits], -1)[real]
                expected = ours["span_logits"][real]
        assert type(hf).__name__ == name
        torch.testing.assert_close(theirs, expected, atol=1e-4, rtol=1e-4)
        if task.type not in ("regression", "span"):  # the same predictions
            assert torch.equal(theirs.argmax(1), expected.argmax(1))


def test_a_task_without_a_matching_model_is_refused(tokenizer, tmp_path):
    _, _, export = exported(tokenizer, tmp_path, "bert")
    with pytest.raises(ConfigError, match="'summarize' is not in the export"):
        to_transformers(export, "summarize", str(tmp_path / "out"))
