"""model.attention=packed: the encoder on the real tokens only, rows end to end, gives the padded
path's losses, gradients and evaluation statistics, per task type and backbone (no Ray)."""

import numpy as np
import pytest
import torch
from transformers import AutoModel

from muppet_ray import packing
from muppet_ray.batch import collate, to_torch
from muppet_ray.config import ModelConfig
from muppet_ray.model import MuppetModel, build_backbone
from tests.test_task_types import featurize, suite_tokenizer, task

CPU = torch.device("cpu")
CASES = [("bert", "entailment"), ("bert", "next_number"), ("bert", "rating"),
         ("roberta", "what_has"), ("roberta", "needs"), ("roberta", "sentiment"),
         ("bart", "summarize"), ("bart", "topic"), ("bart", "what_has")]


@pytest.fixture(scope="module")
def tokenizer():
    return suite_tokenizer()


def build(arch, names, attention, tokenizer):
    torch.manual_seed(0)
    config = ModelConfig(arch=arch, hidden_size=32, num_layers=2, num_heads=4, ffn_size=64,
                         max_length=64, dropout=0.0, attention=attention)
    return MuppetModel(build_backbone(config, tokenizer), [task(n).layout() for n in names], 0.0,
                       tokenizer=tokenizer)


def train_pass(arch, name, attention, tokenizer, batch):
    model = build(arch, [name], attention, tokenizer)
    out = model(to_torch(batch, CPU))
    out["loss"].backward()
    return out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def padded_further(batch, pad_id, max_length=64):
    """Every row with a few more padding tokens (rows of some tasks are all as long)."""
    columns = min(3, max_length - batch["input_ids"].shape[1])
    more = {"input_ids": pad_id, "attention_mask": 0, "token_type_ids": 0}
    return {**batch, **{key: np.pad(batch[key], ((0, 0), (0, columns)), constant_values=value)
                        for key, value in more.items() if key in batch}}


@pytest.mark.parametrize("arch,name", CASES)
def test_packed_passes_give_the_padded_losses_and_gradients(tokenizer, arch, name):
    batch = padded_further(collate(featurize(name, tokenizer, 6), 0, tokenizer.pad_token_id),
                           tokenizer.pad_token_id)
    assert (batch["attention_mask"] == 0).any(), "a batch without padding tests nothing"
    padded, padded_grads = train_pass(arch, name, "padded", tokenizer, batch)
    packed, packed_grads = train_pass(arch, name, "packed", tokenizer, batch)
    assert torch.allclose(packed["loss"], padded["loss"], atol=1e-5)
    assert torch.allclose(packed["task_loss_sum"], padded["task_loss_sum"], atol=1e-4)
    assert packed_grads.keys() == padded_grads.keys() and len(packed_grads) > 10
    for key, grad in padded_grads.items():
        assert torch.allclose(packed_grads[key], grad, atol=1e-5, rtol=1e-4), key


@pytest.mark.parametrize("arch", ["bert", "bart"])
def test_packed_evaluation_gives_the_padded_statistics(tokenizer, arch):
    names = ["entailment", "next_number", "what_has"] + (["summarize"] if arch == "bart" else [])
    stats = {}
    for attention in ("padded", "packed"):
        model = build(arch, names, attention, tokenizer).eval()
        stats[attention] = [
            model.evaluate(to_torch(collate(featurize(name, tokenizer, 5), i,
                                            tokenizer.pad_token_id, keep_text=True), CPU))
            for i, name in enumerate(names)]
    for padded, packed in zip(stats["padded"], stats["packed"]):
        assert torch.allclose(packed, padded, atol=1e-4)


def test_a_packed_backbone_saves_as_a_plain_transformers_model(tokenizer, tmp_path):
    model = build("roberta", ["sentiment"], "packed", tokenizer)
    assert packing.is_packed(model.backbone)
    model.backbone.save_pretrained(tmp_path)
    assert packing.ATTENTION not in (tmp_path / "config.json").read_text()
    assert AutoModel.from_pretrained(tmp_path).config._attn_implementation != packing.ATTENTION


GPU_ONLY = pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU's path (PyTorch's "
                              "CUDA build asks the CUDA driver even for jagged CPU tensors)")


@pytest.mark.parametrize("attend", [pytest.param(packing.jagged_attention, marks=GPU_ONLY),
                                    packing.repadded_attention])
def test_each_attention_keeps_every_row_to_itself(attend):
    device = "cuda" if attend is packing.jagged_attention else "cpu"
    torch.manual_seed(0)
    lengths = [5, 1, 9, 3]
    starts = torch.tensor([0, 5, 6, 15, 18], device=device)
    query, key, value = (torch.randn(1, 2, 18, 4, device=device, requires_grad=True)
                         for _ in range(3))
    out = attend(query, key, value, starts, max(lengths), 0.0, None)
    assert out.shape == (1, 18, 2, 4)
    for a, b in zip(starts[:-1].tolist(), starts[1:].tolist()):
        alone = torch.nn.functional.scaled_dot_product_attention(
            query[:, :, a:b], key[:, :, a:b], value[:, :, a:b])
        assert torch.allclose(out[:, a:b], alone.transpose(1, 2), atol=1e-5)
    out.sum().backward()
    assert all(x.grad is not None and x.grad.isfinite().all() for x in (query, key, value))


def test_a_compiled_packed_backbone_trains_as_the_eager_one(tokenizer):
    # training.compile: torch.compile traces the packed encoder (dynamic shapes: every
    # micro-batch its own); aot_eager runs the traced graphs without generating kernels, which
    # is what the CPU suite can afford.
    eager = build("bert", ["entailment"], "packed", tokenizer)
    compiled = build("bert", ["entailment"], "packed", tokenizer)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled.backbone.compile(dynamic=True, backend="aot_eager")
    for n in (6, 4):
        batch = to_torch(collate(featurize("entailment", tokenizer, n), 0,
                                 tokenizer.pad_token_id), CPU)
        losses = [model(batch)["loss"] for model in (eager, compiled)]
        for loss in losses:
            loss.backward()
        assert torch.allclose(losses[1], losses[0], atol=1e-5)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        assert torch.allclose(b.grad, a.grad, atol=1e-5), name
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # (it was traced)
