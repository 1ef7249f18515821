"""Task-transfer diagnostics (transfer.py): the gradient similarities sketched while training
match the exact cosines of the full gradients, and measuring them leaves training untouched."""

import numpy as np
import torch

from muppet_ray import batch as mb
from muppet_ray.transfer import GradientSimilarity, hashed, heat_map
from tests.test_accumulation import TASKS, build_model
from tests.test_task_types import featurize, suite_tokenizer

CPU = torch.device("cpu")


def gradients(model, batch) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(mb.to_torch(batch, CPU))["loss"].backward()
    return [p.grad.clone() for p in model.parameters()]


def test_similarities_sketched_while_training_match_the_exact_ones():
    tokenizer = suite_tokenizer()
    model = build_model(tokenizer)
    model.eval()  # (no dropout: the same gradient every time)
    batches = {name: mb.collate(featurize(name, tokenizer, 4), TASKS.index(name),
                                tokenizer.pad_token_id) for name in TASKS}
    layers = [p for n, p in model.backbone.named_parameters() if "embed" not in n]
    exact = {}
    for name, batch in batches.items():
        plain = gradients(model, batch)
        exact[name] = torch.cat([p.grad.flatten() for p in layers])
        if name == TASKS[0]:
            before = plain
    similarity = GradientSimilarity(model, len(TASKS), CPU)
    trained = {}
    for name in [*TASKS, TASKS[0]]:  # (a task's second micro-batch is not measured)
        with similarity.measuring(batches[name]):
            trained[name] = gradients(model, batches[name])

    # The hooks leave the gradients as they were.
    assert all(torch.equal(a, b) for a, b in zip(before, trained[TASKS[0]]))
    tasks, cosine = similarity.similarities(world=1)
    full = torch.stack([exact[n] for n in TASKS])
    full = full / full.norm(dim=1, keepdim=True)
    truth = (full @ full.T).numpy()
    assert tasks == [0, 1, 2]
    assert np.allclose(np.diag(cosine), 1.0)
    assert np.abs(cosine - truth).max() < 0.02, (cosine, truth)
    assert truth[np.triu_indices(3, 1)].max() < 0.99  # (the tasks' gradients differ)
    # Nothing is measured again until tasks are trained on again.
    assert similarity.similarities(world=1) is None
    assert heat_map(TASKS, cosine, 0, 10)[:8] == b"\x89PNG\r\n\x1a\n"


def test_buckets_and_signs_are_spread_evenly():
    buckets, signs = hashed(0, 2**20, 0, CPU)
    counts = torch.bincount(buckets, minlength=2**16).double()
    assert counts.mean() == 16 and 3 < counts.std() < 5  # (Poisson: 4)
    assert abs(signs.mean()) < 0.01
    # The same weights hash the same way wherever a piece of them starts.
    assert torch.equal(hashed(1000, 10, 0, CPU)[0], buckets[1000:1010])
