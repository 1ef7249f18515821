"""Fine-tuning and evaluation from pre-finetuned models: head reuse, nested fractions, results,
baselines, checkpoints as sources, transformers task models, and bad input. Integration tests
run real Ray, Ray Data, Ray Train workers and DeepSpeed on CPU."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForMultipleChoice

from muppet_ray import cli, data
from muppet_ray.config import parse_config
from muppet_ray.errors import ConfigError
from muppet_ray.export import load_exported
from muppet_ray.finetune import compare, evaluate
from muppet_ray.heads import initial_heads
from muppet_ray.model import build_backbone
from muppet_ray.model_source import resolve_source
from muppet_ray.prefinetune import prefinetune
from muppet_ray.storage import RunDir
from muppet_ray.task_types import Limits
from muppet_ray.tasks import resolve_tasks
from muppet_ray.tokenizer import load_tokenizer, texts_of, train_tokenizer
from tests.conftest import make_config

SOURCE_TASKS = "tasks.include=[sentiment, topic, needs, what_has]"


@pytest.fixture(scope="module")
def source_run(ray_cluster, tmp_path_factory):
    """A small pre-finetuned encoder (RoBERTa layout, so its heads map onto transformers')."""
    storage = tmp_path_factory.mktemp("source")
    # (its seed not the fine-tuning runs' 0: the baseline's initial weights must use its own)
    return prefinetune(make_config(storage, "model.arch=roberta", SOURCE_TASKS,
                                   "training.max_steps=16", "training.seed=3"))


def finetune_base(storage, *overrides):
    return make_config(storage, "training.max_steps=6", "training.warmup_steps=1",
                       "training.learning_rate=5e-4", "run.name=ft", "scaling.num_workers=1",
                       *overrides)


def tasks_named(*names, storage="unused"):
    return resolve_tasks(make_config(storage, f"tasks.include=[{', '.join(names)}]"))


# -------------------------------------------------------------------- heads (no training)


def test_heads_are_reused_where_the_source_trained_one(source_run, tmp_path):
    source = resolve_source(source_run.run_dir, str(tmp_path))
    trained = load_file(f"{source.model}/heads.safetensors")

    heads, origin = initial_heads(source, tasks_named("who_has"), "auto")
    assert origin == {"who_has": "needs"}  # the shared multiple-choice head
    assert set(heads) == {k for k in trained if k.startswith("multiple_choice.")}
    assert all(torch.equal(heads[k], trained[k]) for k in heads)

    heads, origin = initial_heads(source, tasks_named("topic"), "auto")
    assert origin == {"topic": "topic"}  # its own head, in the new model's only slot
    index = [t["name"] for t in source.manifest["tasks"]].index("topic")
    assert torch.equal(heads["classification.out_weight"][0],
                       trained["classification.out_weight"][index][:, :4])

    assert initial_heads(source, tasks_named("review"), "auto") == ({}, {"review": "new"})
    assert initial_heads(source, tasks_named("who_has"), "new")[1] == {"who_has": "new"}
    with pytest.raises(ConfigError, match="--head reuse: .* has no trained classification head "
                                          "for task 'review'"):
        initial_heads(source, tasks_named("review"), "reuse")
    with pytest.raises(ConfigError, match="--head: expected one of"):
        initial_heads(source, tasks_named("review"), "shared")


def test_fractions_are_nested_exact_and_seeded(ray_cluster, tmp_path):
    def ids(fraction, seed):
        settings = data.ChunkSettings(Limits(64, 16), 8, 32, seed, train_fraction=fraction)
        run_dir = RunDir(str(tmp_path / f"f{fraction}-s{seed}"))
        cache = data.prepare(tasks, run_dir, tokenizer, settings, ("train",))["review"]["train"]
        found = [int(i) for c in range(cache.chunks)
                 for i in data.ChunkReader.read(cache, c)["example_id"]]
        assert len(found) == len(set(found)) == cache.examples
        return set(found)

    tasks = tasks_named("review")
    tokenizer = train_tokenizer(texts_of(tasks[0].source.sample("train", 200)), 300, 64)
    total = tasks[0].source.num_examples("train")
    small, large, everything = ids(0.1, 0), ids(0.3, 0), ids(1.0, 0)
    assert (len(small), len(large), len(everything)) == (round(0.1 * total),
                                                         round(0.3 * total), total)
    assert small < large < everything
    other = ids(0.1, 1)
    assert len(other) == len(small) and other != small


# ------------------------------------------------------------------------- full runs


def test_finetune_compares_with_the_baseline(source_run, tmp_path):
    base = finetune_base(tmp_path)
    results = compare(base, source_run.run_dir, "who_has", [0.5], [0], baseline="auto")
    assert [(r.role, r.fraction, r.head) for r in results] == [
        ("pre-finetuned", 0.5, "needs"), ("baseline", 0.5, "new")]
    whole = tasks_named("who_has")[0].source.num_examples("train")
    assert all(r.train_examples == round(whole / 2) for r in results)
    assert all(r.metric == "accuracy" and 0 <= r.value <= 1 and r.steps == 6 for r in results)

    root = tmp_path / "ft"
    rows = json.loads((root / "results.json").read_text())
    assert len(rows) == 2 and rows[0]["task"] == "who_has" and rows[0]["seed"] == 0
    assert (root / "results.csv").read_text().count("\n") == 3
    assert "| baseline |" in (root / "summary.md").read_text()
    for r in results:
        saved = json.loads((root / f"{r.role}-f{r.fraction:g}-s0" / "results.json").read_text())
        assert saved["value"] == r.value
    # The same command again finds every run finished: nothing is trained again.
    logs = {r.run_dir: (Path(r.run_dir) / "metrics.jsonl").stat().st_mtime for r in results}
    again = compare(base, source_run.run_dir, "who_has", [0.5], [0], baseline="auto")
    assert again == results
    assert {r: (Path(r) / "metrics.jsonl").stat().st_mtime for r in logs} == logs

    # The baseline is the backbone the source started from: its seeded initial weights (built
    # from the source's own config and seed, as its workers built them), not the trained ones.
    trained = load_exported(source_run.export_dir)[0].backbone.state_dict()
    baseline = AutoModelForMultipleChoice.from_pretrained(root / "baseline-init").base_model
    config = parse_config(resolve_source(source_run.export_dir, str(tmp_path)).manifest["config"])
    assert config.training.seed == 3
    torch.manual_seed(config.training.seed)
    started = build_backbone(config.model, load_tokenizer(source_run.export_dir)).state_dict()
    got = baseline.state_dict()
    assert started.keys() <= got.keys()
    assert all(torch.equal(got[k], v) for k, v in started.items())
    assert not all(torch.equal(got[k], v) for k, v in trained.items() if k in got)

    # The pre-finetuned run started from the source's trained head: its step-0 score is what
    # `evaluate` gives for the source itself.
    scores = evaluate(make_config(tmp_path, "run.name=scores"), source_run.export_dir,
                      ["who_has", "needs"])
    first = [r for r in _log(results[0].run_dir) if r["kind"] == "eval"][0]["metrics"]
    assert first["who_has"]["accuracy"] == pytest.approx(scores["who_has"]["accuracy"])
    assert scores["needs"]["accuracy"] == pytest.approx(source_run.after["needs"]["accuracy"])

    # The run's transformers task model loads with the Auto class and carries its head.
    hf = AutoModelForMultipleChoice.from_pretrained(results[0].hf_model)
    assert type(hf).__name__ == "RobertaForMultipleChoice"


def _log(run_dir):
    from muppet_ray.metrics import read_log

    return read_log(RunDir(run_dir))


def test_a_checkpoint_is_a_source(source_run, tmp_path):
    steps = 16
    source = resolve_source(f"{source_run.run_dir}/checkpoint_{steps:06d}", str(tmp_path))
    converted, _, manifest = load_exported(source.model)
    final, _, _ = load_exported(source_run.export_dir)
    assert manifest["step"] == steps
    for name, tensor in final.state_dict().items():
        assert torch.allclose(tensor, converted.state_dict()[name], atol=1e-6), name

    # Only checkpoints Ray Train registered are read: a later directory it never registered
    # (a run killed while writing it) is passed over, and refused when named.
    run = tmp_path / "run"
    shutil.copytree(source_run.run_dir, run, ignore=shutil.ignore_patterns("export"))
    (run / "checkpoint_000099" / "deepspeed").mkdir(parents=True)
    (run / "checkpoint_000099" / "deepspeed" / "mp_rank_00_model_states.pt").write_bytes(b"PK")
    assert load_exported(resolve_source(str(run), str(tmp_path / "w")).model)[2]["step"] == steps
    with pytest.raises(ConfigError, match="Ray Train did not register it"):
        resolve_source(str(run / "checkpoint_000099"), str(tmp_path / "w"))


# ------------------------------------------------------------------------- bad input


def test_a_missing_head_is_refused(tmp_path, capsys):
    """Tasks whose head the source never trained: one line, exit 2, before Ray starts."""
    from muppet_ray.config import ModelConfig
    from muppet_ray.export import write_export
    from muppet_ray.model import MuppetModel, build_backbone

    tasks = tasks_named("sentiment", "needs")
    tokenizer = train_tokenizer(texts_of(tasks[0].source.sample("train", 100)), 200, 64)
    backbone = build_backbone(ModelConfig(arch="bert", hidden_size=16, num_layers=1,
                                          num_heads=2, ffn_size=32), tokenizer)
    write_export(MuppetModel(backbone, [t.layout() for t in tasks], 0.1), tokenizer,
                 RunDir(str(tmp_path)), 0, "{}")
    export = str(tmp_path / "export")
    for args, expected in [
        (["finetune", "--task", "review", "--head", "reuse"],
         f"--head reuse: {export!r} has no trained classification head for task 'review'"),
        (["evaluate", "--tasks", "needs,what_has"],
         f"evaluate: {export!r} has no trained span head"),
        (["export", "--task", "what_has", "--out", str(tmp_path / "hf")],
         "task 'what_has' is not in the export"),
    ]:
        code = cli.main([args[0], "--from", export, *args[1:],
                         *(["--set", f"run.storage_path={tmp_path / 'runs'}"]
                           if args[0] != "export" else [])])
        err = capsys.readouterr().err
        assert code == 2, err[-2000:]
        line = err.strip().splitlines()[-1]
        assert line == f"muppet-ray: error: {expected}" or expected in line, line
        assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
        assert not (tmp_path / "hf").exists()
