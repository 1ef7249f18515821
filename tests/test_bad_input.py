"""Bad input through the command line: exit status 2, exactly one line `muppet-ray: error: …`
naming the setting, task, file or row, and nothing written to storage.

The commands run in this process (`cli.main`), so that 50 cases fit the suite's time; cases
whose data is read by Ray Data use the session's local Ray cluster. test_cli.py runs the
command as a real subprocess for one data error (the console as a user sees it)."""

import json
import os

import pytest

from muppet_ray import cli
from tests.test_real_data import MINILM

# (id, command, expected in the error line, needs Ray)
CASES = []


def case(name, args, expected, ray=False, command="prefinetune"):
    CASES.append(pytest.param(command, args, expected, ray, id=name))


def custom(spec: dict) -> list[str]:
    return ["--set", f"tasks.custom=[{json.dumps(spec)}]",
            "--set", f"tasks.include=[{spec['name']}]"]


# ---------------------------------------------------------------- settings (--set)
case("workers-zero", ["--set", "scaling.num_workers=0"],
     "scaling.num_workers: expected a count >= 1")
case("zero-stage", ["--set", "deepspeed.zero_stage=4"],
     "deepspeed.zero_stage: Input should be 'auto', 0, 1, 2 or 3 (got 4)")
case("unknown-key", ["--set", "training.nonsense=1"], "training.nonsense: unknown setting")
case("unknown-section", ["--set", "nonsense.key=1"], "nonsense: unknown setting")
case("no-equals", ["--set", "training"], "--set 'training': expected section.key=value")
case("not-a-section", ["--set", "training.max_steps.x=1"],
     "training.max_steps: Input should be a valid integer (got {'x': 1})")
case("secret-not-echoed", ["--set", "training.max_steps=${MUPPET_TEST_SECRET}"],
     "training.max_steps: Input should be a valid integer, unable to parse string as an integer "
     "(got '${MUPPET_TEST_SECRET}')")
case("steps-text", ["--set", "training.max_steps=abc"],
     "training.max_steps: Input should be a valid integer")
case("lr-negative", ["--set", "training.learning_rate=-1"],
     "training.learning_rate: Input should be greater than 0")
case("lr-inf", ["--set", "training.learning_rate=.inf"],
     "training.learning_rate: Input should be a finite number")
case("decay-nan", ["--set", "training.weight_decay=.nan"],
     "training.weight_decay: Input should be a finite number")
case("micro-batch-zero", ["--set", "batching.micro_batch_size=0"],
     "batching.micro_batch_size: Input should be greater than or equal to 1")
case("mixed-divides", ["--set", "batching.strategy=mixed", "--set",
                       "batching.tasks_per_micro_batch=3"],
     "batching.tasks_per_micro_batch (3) must divide batching.micro_batch_size (16)")
case("max-length-small", ["--set", "model.max_length=8"], "model.max_length: Input should be")
case("doc-stride", ["--set", "model.doc_stride=100"], "model.doc_stride")
case("mixture-rule", ["--set", "mixture.rule=ranked"], "mixture.rule: Input should be")
case("explicit-no-weights", ["--set", "mixture.rule=explicit"],
     "mixture.weights: rule=explicit needs a weight per task")
case("weights-zero", ["--set", "mixture.rule=explicit", "--set",
                      "mixture.weights={sentiment: 0, entailment: 0}", "--set",
                      "tasks.include=[sentiment, entailment]"],
     "mixture.weights: all weights are 0")
case("weights-negative", ["--set", "mixture.rule=explicit", "--set",
                          "mixture.weights={sentiment: -1, entailment: 2}"],
     "mixture.weights: weights must be >= 0")
case("weights-missing-task", ["--set", "mixture.rule=explicit", "--set",
                              "mixture.weights={sentiment: 1}", "--set",
                              "tasks.include=[sentiment, entailment]"],
     "mixture.weights: needs exactly the run's tasks; missing ['entailment']")
case("variable-unset", ["--set", "run.name=${MUPPET_TEST_UNSET}"],
     "run.name: environment variable MUPPET_TEST_UNSET is not set")
case("run-name-dots", ["--set", "run.name=.."], "run.name: expected a directory name, got '..'")
case("storage-below-file", ["--set", "run.storage_path={tmp}/afile/runs"],
     "run.storage_path: '{tmp}/afile/runs' is below '{tmp}/afile', which is a file")

# ---------------------------------------------------------------- tasks
case("unknown-task", ["--set", "tasks.include=[sentiment, poetry]"],
     "tasks.include: unknown task or family 'poetry'")
case("task-twice", ["--set", "tasks.include=[sentiment, sentiment]"],
     "tasks.include: tasks listed twice: ['sentiment']")
case("generation-encoder", ["--set", "model.arch=roberta"],
     "tasks ['summarize'] are generation tasks, which need an encoder-decoder backbone")
case("custom-type", custom({"name": "x", "type": "ranking", "train": "x.jsonl"}),
     "tasks.custom.0.type: Input should be 'classification'")
case("custom-no-train", custom({"name": "x", "type": "span"}),
     "tasks.custom.0.train: Field required")
case("custom-fields", custom({"name": "x", "type": "span", "train": "x.jsonl",
                              "fields": {"passage": "p"}}),
     "task 'x': fields ['passage'] are not fields of span tasks")
case("custom-no-labels", custom({"name": "x", "type": "classification", "train": "x.jsonl"}),
     "task 'x': classification needs `labels`")
case("custom-format", custom({"name": "x", "type": "span", "train": "x.xml", "format": "xml"}),
     "tasks.custom.0.format: Input should be")
case("custom-name", custom({"name": "a b", "type": "span", "train": "x.jsonl"}),
     "tasks.custom.0.name: String should match pattern")
case("custom-missing-file", custom({"name": "x", "type": "span", "train": "{tmp}/none.jsonl"}),
     "task 'x': file '{tmp}/none.jsonl' does not exist")
case("custom-duplicate", ["--set", "tasks.custom=[{name: x, type: span, train: a.jsonl}, "
                                   "{name: x, type: span, train: b.jsonl}]"],
     "tasks.custom: task names must be unique, repeated: ['x']")

# ---------------------------------------------------------------- config files and models
case("config-missing", ["--config", "{tmp}/none.yaml"],
     "config file '{tmp}/none.yaml': cannot read")
case("config-not-yaml", ["--config", "{tmp}/bad.yaml"], "config file '{tmp}/bad.yaml': not valid "
                                                        "YAML at line 3")
case("config-a-list", ["--config", "{tmp}/list.yaml"],
     "config file '{tmp}/list.yaml': expected a mapping of sections")
case("config-not-text", ["--config", "{tmp}/binary.yaml"],
     "config file '{tmp}/binary.yaml': not UTF-8 text (byte 0xff")
case("model-missing", ["--set", "model.pretrained={tmp}/no-model"],
     "model.pretrained: cannot load '{tmp}/no-model'")
if os.path.isdir(MINILM):
    case("max-length-beyond-model", ["--set", f"model.pretrained={MINILM}", "--set",
                                     "model.max_length=1024", "--set", "tasks.include=[sentiment]"],
         f"model.max_length: 1024 is more than '{MINILM}' takes (512 positions)")

# ---------------------------------------------------------------- other commands
case("finetune-from-missing", ["--from", "{tmp}/nothing", "--task", "sentiment"],
     "{tmp}/nothing", command="finetune")
case("finetune-fraction", ["--from", "{tmp}/nothing", "--task", "sentiment", "--fractions", "2"],
     "--fractions", command="finetune")
case("finetune-no-such-directory", ["--from", "/nonexistent/run", "--task", "review"],
     "--from '/nonexistent/run': no such directory", command="finetune")
case("finetune-from-empty", ["--from", "{tmp}/empty", "--task", "review"],
     "not an export, run, checkpoint or model directory", command="finetune")
case("finetune-fraction-text", ["--from", "{tmp}", "--task", "review", "--fractions", "half"],
     "--fractions: expected comma-separated float values", command="finetune")
case("finetune-fraction-range", ["--from", "{tmp}", "--task", "review", "--fractions", "0.5,1.5"],
     "--fractions: each fraction must be in (0, 1], got 1.5", command="finetune")
case("evaluate-from-missing", ["--from", "{tmp}/nothing", "--tasks", "sentiment"],
     "{tmp}/nothing", command="evaluate")


# ---------------------------------------------------------------- data files (read by Ray Data)
def data_case(name, spec, content: bytes, expected, row_format="jsonl"):
    spec = {"name": "mine", "train": f"{{tmp}}/mine.{row_format}", "format": row_format, **spec}
    CASES.append(pytest.param("prefinetune", custom(spec), expected, True,
                              id=f"data-{name}", marks=pytest.mark.integration))
    FILES[f"data-{name}"] = (f"mine.{row_format}", content)


FILES: dict[str, tuple[str, bytes]] = {}  # case id -> (file name, content)
CLS = {"type": "classification", "labels": ["no", "yes"]}


def jsonl(rows) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


good = [{"text": f"row {i}", "label": "yes" if i % 3 else "no"} for i in range(30)]
data_case("json-line", CLS, jsonl(good[:2]) + b"{not json\n" + jsonl(good[3:]),
          "task 'mine', {tmp}/mine.jsonl, row 3: not valid JSON")
data_case("jsonl-not-utf8", CLS, jsonl(good[:4]) + b'{"text": "caf\xe9", "label": "no"}\n'
          + jsonl(good[5:]), "task 'mine', {tmp}/mine.jsonl, line 5: not UTF-8 text (byte 0xe9)")
data_case("label-space", CLS, jsonl(good[:7] + [{"text": "x", "label": "maybe"}] + good[8:]),
          "task 'mine', {tmp}/mine.jsonl, row 8: label 'maybe' is not in the label space")
data_case("missing-text", CLS, jsonl(good[:5] + [{"label": "no"}] + good[6:]),
          "task 'mine', {tmp}/mine.jsonl, row 6: missing field 'text'")
numbers = [{"text": f"r{i}", "label": i / 10} for i in range(30)]
data_case("regression-nan", {"type": "regression"},
          jsonl(numbers[:9] + [{"text": "r", "label": "nan"}] + numbers[10:]),
          "task 'mine', {tmp}/mine.jsonl, row 10: label should be a finite number, got 'nan'")
data_case("regression-text", {"type": "regression"},
          jsonl(numbers[:11] + [{"text": "r", "label": "high"}] + numbers[12:]),
          "row 12: label should be a finite number, got 'high'")
mc = [{"context": f"q{i}", "choices": ["a", "b", "c"], "label": i % 3} for i in range(30)]
data_case("choice-out-of-range", {"type": "multiple_choice"},
          jsonl(mc[:3] + [{**mc[3], "label": 7}] + mc[4:]), "task 'mine', {tmp}/mine.jsonl, row 4")
span = [{"question": "who?", "context": f"alice met bob {i}", "answer": "bob", "answer_start": 10}
        for i in range(30)]
data_case("answer-start-outside", {"type": "span"},
          jsonl(span[:2] + [{**span[2], "answer_start": 9000}] + span[3:]),
          "task 'mine', {tmp}/mine.jsonl, row 3: answer_start 9000 is outside its context")
data_case("answer-not-in-context", {"type": "span"},
          jsonl(span[:2] + [{**span[2], "answer": "carol"}] + span[3:]),
          "row 3: answer 'carol' does not occur in the context")
csv_rows = "text,label\n" + "".join(f"row {i},{'yes' if i % 2 else 'no'}\n" for i in range(30))
data_case("csv-not-utf8", CLS, csv_rows.encode() + b"caf\xe9,no\n",
          "task 'mine', {tmp}/mine.csv, line 32: not UTF-8 text (byte 0xe9)", row_format="csv")
data_case("csv-short-row", CLS, csv_rows.replace("row 5,yes\n", "row 5\n").encode(),
          "task 'mine', {tmp}/mine.csv, row 7: missing field 'label'", row_format="csv")
data_case("json-not-array", CLS, b'{"rows": []}', "task 'mine', {tmp}/mine.json: expected a JSON "
          "array", row_format="json")
data_case("json-not-utf8", CLS, b'[{"text": "caf\xe9", "label": "no"}]',
          "task 'mine', {tmp}/mine.json, line 1: not UTF-8 text", row_format="json")
squad = {"data": [{"title": "t", "paragraphs": [{"context": "alice met bob", "qas": [
    {"id": f"q{i}", "question": "who?", "answers": [{"text": "bob", "answer_start": 10}]}
    for i in range(30)]}]}]}
data_case("squad-not-utf8", {"type": "span"},
          json.dumps(squad).encode().replace(b"who?", b"wh\xffo?", 1),
          "task 'mine', {tmp}/mine.squad, line 1: not UTF-8 text (byte 0xff)", row_format="squad")
bigbench = {"examples": [{"input": f"is {i} odd?", "target_scores": {"yes": i % 2, "no": 1 - i % 2}}
                         for i in range(30)]}
data_case("bigbench-not-utf8", {}, json.dumps(bigbench).encode().replace(b"is 3", b"is \xfe3"),
          "task 'mine', {tmp}/mine.bigbench, line 1: not UTF-8 text (byte 0xfe)",
          row_format="bigbench")


@pytest.fixture
def workspace(tmp_path):
    (tmp_path / "afile").write_text("not a directory\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.yaml").write_text("training:\n  max_steps: [1\n")
    (tmp_path / "list.yaml").write_text("- training\n")
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00training")
    return tmp_path


@pytest.mark.parametrize(("command", "args", "expected", "needs_ray"), CASES)
def test_bad_input(command, args, expected, needs_ray, workspace, request, capsys, monkeypatch):
    monkeypatch.setenv("MUPPET_TEST_SECRET", "tok-5ecret")
    if needs_ray:
        request.getfixturevalue("ray_cluster")
        name, content = FILES[request.node.callspec.id]
        (workspace / name).write_bytes(content)
    tmp = str(workspace)
    storage = workspace / "runs"
    args = [a.replace("{tmp}", tmp) for a in args]
    if not any(a.startswith("run.storage_path=") for a in args):
        args += ["--set", f"run.storage_path={storage}"]
    code = cli.main([command, *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    errors = [line for line in err if line.startswith("muppet-ray: error: ")]
    assert len(errors) == 1 and errors[0] == err[-1], err
    if not needs_ray:  # (where Ray started, its own lines may come first)
        assert err == errors, err
    assert not any("Traceback" in line for line in ours(err)), "\n".join(err)
    assert expected.replace("{tmp}", tmp) in errors[0], errors[0]
    assert "5ecret" not in "\n".join(err)
    assert not storage.exists() or not any(storage.iterdir())


def ours(err: list[str]) -> list[str]:
    """The lines of stderr but the "--- Logging error ---" reports of loggers that still write
    to an earlier test's captured stream, closed since (Ray's, set up once a session)."""
    kept, reporting = [], False
    for line in err:
        if line == "--- Logging error ---":
            reporting = True
        elif reporting and line.startswith("Arguments: "):  # (a report's last line)
            reporting = False
        elif not reporting:
            kept.append(line)
    return kept


def test_there_are_at_least_40_cases():
    assert len(CASES) >= 40


def test_storage_and_sources_in_a_bucket_are_named_in_one_line(s3, tmp_path, capsys):
    def error(*args: str) -> str:
        assert cli.main(list(args)) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("muppet-ray: error: "), lines
        return lines[0]

    line = error("prefinetune", "--set", "run.storage_path=s3://no-such-bucket/runs")
    assert line.startswith("muppet-ray: error: run.storage_path: cannot write to "
                           "'s3://no-such-bucket/runs' (") and "NO_SUCH_BUCKET" in line, line
    assert error("finetune", "--from", "s3://muppet/nothing-here", "--task", "review", "--set",
                 f"run.storage_path={tmp_path}") == (
        "muppet-ray: error: --from 's3://muppet/nothing-here': nothing is stored there")
    assert not any(tmp_path.iterdir())
