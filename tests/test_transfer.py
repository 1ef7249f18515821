"""Task-transfer diagnostics (transfer.py): the sketched gradient similarities match the exact
cosines of the full gradients, and measuring them leaves training untouched."""

import numpy as np
import torch

from muppet_ray import batch as mb
from muppet_ray.transfer import GradientSimilarity, heat_map
from tests.test_accumulation import TASKS, build_model
from tests.test_task_types import featurize, suite_tokenizer

CPU = torch.device("cpu")


def exact_gradient(model, batch, params):
    model.eval()
    loss = model(mb.to_torch(batch, CPU))["loss"]
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])


def test_sketched_similarities_match_the_exact_ones_and_leave_training_alone():
    tokenizer = suite_tokenizer()
    model = build_model(tokenizer)
    batches = {name: mb.collate(featurize(name, tokenizer, 4), TASKS.index(name),
                                tokenizer.pad_token_id) for name in TASKS}
    similarity = GradientSimilarity(model, len(TASKS))
    for batch in batches.values():
        similarity.remember(batch)
    model.train()
    for p in model.parameters():  # gradients already accumulated by training
        p.grad = torch.full_like(p, 0.5)
    tasks, cosine = similarity.similarities(model, CPU, rank=0, world=1)

    assert tasks == [0, 1, 2] and model.training
    assert all(bool((p.grad == 0.5).all()) for p in model.parameters())
    full = torch.stack([exact_gradient(model, batches[n], similarity.params) for n in TASKS])
    full = full / full.norm(dim=1, keepdim=True)
    exact = (full @ full.T).numpy()
    assert np.allclose(np.diag(cosine), 1.0)
    assert np.abs(cosine - exact).max() < 0.02, (cosine, exact)
    # (not a trivial matrix: the tasks' gradients differ)
    assert exact[np.triu_indices(3, 1)].max() < 0.99
    # Nothing is measured again until tasks are trained on again.
    assert similarity.similarities(model, CPU, rank=0, world=1) is None
    assert heat_map(TASKS, cosine, 10)[:8] == b"\x89PNG\r\n\x1a\n"
