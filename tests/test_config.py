import pytest

from muppet_ray.config import Config, load_config, validate
from muppet_ray.errors import ConfigError


def test_defaults_are_the_main_job():
    config = Config()
    assert config.model.arch == "bart"  # encoder-decoder, so all four task types train
    assert config.scaling.num_workers == 2
    assert config.deepspeed.zero_stage == "auto"  # (ZeRO-2 wherever it fits)
    assert config.model.attention == "packed"
    assert config.batching.strategy == "heterogeneous"
    assert config.mixture.rule == "proportional"
    assert config.training.loss_scaling is True


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  max_steps: 7\nmixture:\n  rule: temperature\n")
    config = load_config(path, ["training.max_steps=9", "tasks.include=[topic, needs]",
                                "deepspeed.config={zero_optimization: {overlap_comm: false}}"])
    assert config.training.max_steps == 9
    assert config.mixture.rule == "temperature"
    assert config.tasks.include == ["topic", "needs"]
    assert config.deepspeed.config == {"zero_optimization": {"overlap_comm": False}}


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("deepspeed.zero_stage=4", "deepspeed.zero_stage: Input should be 'auto', 0, 1, 2 or 3 "
                                   "(got 4)"),
        ("scaling.num_workers=0", "scaling.num_workers: expected a count >= 1 or [min, max] "
                                  "with 1 <= min <= max, got 0"),
        ("scaling.num_workers=[3,2]", "scaling.num_workers: expected a count >= 1 or [min, max]"),
        ("scaling.num_workers=[1,4]", "scaling.num_workers [1, 4]: a step is 8 micro-batches "
                                      "(batching.grad_accum_steps x max workers), which 3 workers "
                                      "cannot share evenly"),
        ("training.max_steps=ten", "training.max_steps: Input should be a valid integer"),
        ("training.nonsense=1", "training.nonsense: unknown setting"),
        ("mixture.rule=random", "mixture.rule: Input should be 'proportional', 'temperature', "
                                "'uniform', 'explicit' or 'online'"),
        ("mixture.online_floor=2", "mixture.online_floor: Input should be less than or equal "
                                   "to 1"),
        ("mixture.online_every=0", "mixture.online_every: Input should be greater than or "
                                   "equal to 1"),
        ("mixture.online_rate=-1", "mixture.online_rate: Input should be greater than or equal "
                                   "to 0"),
        ("batching.strategy=mixed", "batching.tasks_per_micro_batch (3) must divide "
                                    "batching.micro_batch_size (16)"),
        ("model.num_heads=3", "model.hidden_size (128) must be a multiple of model.num_heads"),
        ("training", "--set 'training': expected section.key=value"),
    ],
)
def test_bad_values_name_the_field(override, expected):
    overrides = [override] + (["batching.micro_batch_size=16", "batching.tasks_per_micro_batch=3"]
                              if "mixed" in override else [])
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_custom_task_checks():
    with pytest.raises(ConfigError, match=r"tasks.custom.0.type: Input should be"):
        load_config(None, ["tasks.custom=[{name: x, type: ranking, train: a.jsonl}]"])
    with pytest.raises(ConfigError, match="classification needs `labels`"):
        load_config(None, ["tasks.custom=[{name: x, type: classification, train: a.jsonl}]"])
    with pytest.raises(ConfigError, match="tasks.custom.0.train: Field required"):
        load_config(None, ["tasks.custom=[{name: x, type: span}]"])


def test_unreadable_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_config(scalar)


def test_environment_variables_in_values(tmp_path, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  pretrained: ${MUPPET_TEST_ROOT}/models/m\n")
    monkeypatch.setenv("MUPPET_TEST_ROOT", "/data/shared")
    assert load_config(path).model.pretrained == "/data/shared/models/m"
    monkeypatch.delenv("MUPPET_TEST_ROOT")
    with pytest.raises(ConfigError, match="model.pretrained: environment variable "
                                          "MUPPET_TEST_ROOT is not set"):
        load_config(path)


def test_variables_are_expanded_for_use_and_saved_as_written(monkeypatch):
    from muppet_ray.config import parse_config, to_yaml

    monkeypatch.setenv("MUPPET_TEST_DATA", "/data/tok-5ecret")
    config = load_config(None, ["tasks.custom=[{name: x, type: classification, "
                                "labels: [a, b], train: '${MUPPET_TEST_DATA}/x.jsonl'}]",
                                "tasks.include=[x]"])
    assert config.tasks.custom[0].train == "/data/tok-5ecret/x.jsonl"
    saved = to_yaml(config)
    assert "5ecret" not in saved and "${MUPPET_TEST_DATA}/x.jsonl" in saved
    # configs derived from it (fine-tuning runs, sweep points) are saved the same way
    derived = validate({**config.model_dump(mode="json"), "training": {"max_steps": 3}})
    assert "5ecret" not in to_yaml(derived)
    assert parse_config(saved) == config
    monkeypatch.delenv("MUPPET_TEST_DATA")
    with pytest.raises(ConfigError, match="tasks.custom.0.train: environment variable "
                                          "MUPPET_TEST_DATA is not set"):
        parse_config(saved)


def test_the_config_reference_in_docs_is_generated_from_config_py():
    from pathlib import Path

    from muppet_ray.config_reference import reference

    written = (Path(__file__).parent.parent / "docs" / "config.md").read_text()
    assert written == reference(), ("docs/config.md is stale: run "
                                    "`python -m muppet_ray.config_reference > docs/config.md`")
    assert "| `learning_rates` | `[3e-05, 0.0001]` |" in written  # (every section is in it)


def test_a_derived_config_is_validated_like_a_loaded_one():
    base = Config()
    derived = base.replace({"training.seed": 3, "tasks.include": ["topic"]})
    assert (derived.training.seed, derived.tasks.include) == (3, ["topic"])
    assert base.training.seed == 0  # (a copy)
    with pytest.raises(ConfigError, match=r"^training.max_steps: Input should be greater than "
                                          r"or equal to 1 \(got 0\)"):
        base.replace({"training.max_steps": 0})
    with pytest.raises(ConfigError, match="^training.nonsense: unknown setting$"):
        base.replace({"training.nonsense": 1})


def test_a_token_budget_fits_a_row_and_is_not_for_mixed_batches():
    assert load_config(None, []).batching.tokens_per_micro_batch == 0  # off by default
    assert load_config(None, ["batching.tokens_per_micro_batch=128"]).batching \
        .tokens_per_micro_batch == 128  # (= model.max_length)
    for overrides, expected in [
        (["batching.tokens_per_micro_batch=100"],
         "batching.tokens_per_micro_batch (100): expected 0 (off) or at least model.max_length "
         "(128)"),
        (["batching.tokens_per_micro_batch=-1"],
         "batching.tokens_per_micro_batch: Input should be greater than or equal to 0"),
        (["batching.tokens_per_micro_batch=4096", "batching.strategy=mixed"],
         "batching.tokens_per_micro_batch: not with batching.strategy=mixed"),
    ]:
        with pytest.raises(ConfigError) as info:
            load_config(None, overrides)
        assert expected in str(info.value) and "\n" not in str(info.value)
