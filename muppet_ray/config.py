"""One typed config for a run, read from YAML with `--set section.key=value` overrides.

Every value is checked here, before Ray starts; a bad one raises ConfigError naming the field and
what is allowed. The README's config reference mirrors this file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from muppet_ray.errors import ConfigError

VERBOSE = "MUPPET_VERBOSE"  # set to 1 by `--verbose` (an environment variable: trials inherit it)
TaskTypeName = Literal["classification", "regression", "multiple_choice", "span", "generation",
                       "denoising"]


class Section(BaseModel):
    # (inf and nan are never a setting: `learning_rate: .inf` would train to nan)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False,
                              use_attribute_docstrings=True)  # (docs/config.md reads them)


class ModelConfig(Section):
    pretrained: str | None = None
    """Hub id or local directory of a pretrained backbone; None builds a small one from `arch`."""
    arch: Literal["bart", "roberta", "bert"] = "bart"
    """Backbone family built from scratch when `pretrained` is None (bart = encoder-decoder)."""
    hidden_size: int = Field(128, ge=8)
    """Width of a model built from scratch (with num_layers per stack, num_heads, ffn_size)."""
    num_layers: int = Field(2, ge=1)
    """Layers per stack of a model built from scratch."""
    num_heads: int = Field(4, ge=1)
    """Attention heads of a model built from scratch (must divide hidden_size)."""
    ffn_size: int = Field(256, ge=8)
    """Feed-forward width of a model built from scratch."""
    vocab_size: int = Field(2000, ge=64)
    """Upper bound for the tokenizer trained on the built-in suite (ignored with `pretrained`)."""
    max_length: int = Field(128, ge=16)
    """Input tokens per sequence (longer inputs are truncated)."""
    max_target_length: int = Field(32, ge=2)
    """Target tokens for generation tasks."""
    doc_stride: int = Field(32, ge=1)
    """Span tasks: contexts longer than max_length are cut into windows sharing this many
    tokens."""
    dropout: float = Field(0.1, ge=0, lt=1)
    """Dropout of the heads (and of a backbone built from scratch)."""
    attention: Literal["packed", "padded"] = "packed"
    """packed: the encoder runs on each micro-batch's real tokens only, its rows end to end
    with attention kept inside each row (packing.py); padded: on rows padded to the longest."""

    @model_validator(mode="after")
    def _sizes_fit(self) -> ModelConfig:
        if self.doc_stride > self.max_length // 2:
            raise ValueError(f"model.doc_stride ({self.doc_stride}) must be at most half of "
                             f"model.max_length ({self.max_length})")
        if self.pretrained is None and self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.hidden_size ({self.hidden_size}) must be a multiple of "
                f"model.num_heads ({self.num_heads})"
            )
        return self


class TaskSpec(Section):
    """A task read from files (local, s3://, gs://) or from a Hugging Face Hub dataset."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    """The task's name in tasks.include, logs and results."""
    type: TaskTypeName | None = None
    """Required, except for format=bigbench, where the file tells."""
    format: Literal["jsonl", "json", "csv", "parquet", "squad", "bigbench", "hub", "text"] = "jsonl"
    """File format; `hub` (implied by `hub`) reads the Hub's Parquet conversion; `text`: plain
    text, each non-empty line an example with the field `text` (for denoising tasks)."""
    hub: str | None = None
    """Hugging Face Hub dataset id; then `train` / `validation` are split names."""
    hub_config: str = "default"
    """The Hub dataset's config (subset)."""
    train: str
    """Path or URI of the training file (or a directory of files), or the Hub split."""
    validation: str | None = None
    """Validation file (or Hub split); without one, a seeded `validation_fraction` of `train`
    is held out."""
    validation_fraction: float = Field(0.1, gt=0, lt=1)
    """Without a validation file: this seeded share of the train file's rows (tasks.data_seed)
    is the validation split."""
    fields: dict[str, str | list[str]] = {}
    """Canonical field -> column in the file: a name, a dotted path into nested records
    (`answers.text.0`), or a list of columns (`choices: [sol1, sol2]`)."""
    labels: list[str] | None = None
    """Label space of a classification task, in head-output order (required for classification;
    read from the file for format=bigbench)."""
    label_map: dict[str, Any] = {}
    """Rewrites label values before use, e.g. answer letters to choice indices {A: 0, B: 1}."""
    skip_bad_rows: bool | None = None
    """Overrides tasks.skip_bad_rows for this task."""
    noise_density: float = Field(0.15, gt=0, lt=1)
    """For type=denoising: the share of each text's tokens masked (encoders: BERT's masked-token
    prediction) or cut out in spans (encoder-decoders: T5's span corruption)."""
    mean_span: float = Field(3.0, ge=1)
    """For type=denoising on an encoder-decoder: the mean length of the cut-out spans (T5: 3)."""
    decode_errors: Literal["strict", "replace"] = "strict"
    """Bytes that are not UTF-8: strict, an error naming file and line; replace, read as U+FFFD
    (for files known to hold a few mis-encoded bytes)."""

    def noise_settings(self) -> list[str]:
        """The denoising settings given other values than their defaults (a saved config
        writes out the defaults on every task)."""
        return sorted(key for key in ("noise_density", "mean_span")
                      if getattr(self, key) != type(self).model_fields[key].default)

    @model_validator(mode="after")
    def _labels_match_type(self) -> TaskSpec:
        if self.hub is not None:
            self.__dict__["format"] = "hub"
        elif self.format == "hub":
            raise ValueError(f"task {self.name!r}: format hub needs `hub` (a dataset id)")
        if self.type is None and self.format != "bigbench":
            raise ValueError(f"task {self.name!r}: `type` is required for format {self.format}")
        # (on another task they would do nothing)
        noise = self.noise_settings()
        if noise and self.type != "denoising":
            raise ValueError(f"task {self.name!r}: {', '.join(noise)}: only for type "
                             f"denoising (this task: {self.type or 'bigbench, typed by its file'})")
        if self.type is None:
            return self
        if self.type == "classification" and self.format == "bigbench" and not self.labels:
            return self
        if self.type == "classification":
            if not self.labels or len(self.labels) < 2:
                raise ValueError(f"task {self.name!r}: classification needs `labels` (2 or more)")
            if len(set(self.labels)) != len(self.labels):
                raise ValueError(f"task {self.name!r}: `labels` has duplicates")
        elif self.labels is not None:
            raise ValueError(f"task {self.name!r}: `labels` is only for classification tasks")
        return self


class TasksConfig(Section):
    include: list[str] = []
    """Tasks to pre-finetune on: custom, catalog or built-in task names, or catalog families
    (e.g. glue). Empty: the built-in suite's default mixture plus every custom task."""
    also: list[str] = []
    """Tasks mixed in besides `tasks.include` (named as there; e.g. a denoising task): in every
    run of this config, but not in a task-count sweep's pool, so that `sweep tasks --ablate
    tasks.also=[...]` adds them to one point."""
    custom: list[TaskSpec] = []
    """Tasks read from files or the Hub (see docs/tasks.md)."""
    suite_scale: float = Field(1.0, gt=0)
    """Multiplies the number of examples of every built-in task."""
    data_seed: int = 0
    """Seeds which examples the built-in suite generates and which rows a file without a
    validation split holds out; kept apart from training.seed so that runs with different seeds
    are scored on the same validation examples."""
    train_fraction: float = Field(1.0, gt=0, le=1)
    """Train on this fraction of every task's training examples: a subset drawn with
    training.seed, nested across fractions (the 10% subset lies inside the 20% one)."""
    test_fraction: float = Field(0.0, ge=0, lt=1)
    """Also hold out this seeded fraction of every file task's training rows as a test split,
    never trained on (the fine-tuning protocol scores on it); built-in tasks generate one."""
    skip_bad_rows: bool = False
    """Leave out rows that cannot become features (counted and reported) instead of stopping."""
    hub_mirror: str | None = None
    """Read Hub datasets from this mirror (local path or URI) instead of the Hub; it holds
    `<dataset id>/<config>/<split>/*.parquet`, as the Hub's Parquet conversion lays them out."""


class MixtureConfig(Section):
    rule: Literal["proportional", "temperature", "uniform", "explicit", "online"] = "proportional"
    """How often each task is drawn: proportional to its examples (the paper), temperature
    (T5), uniform, explicit weights, or online: proportional at first, then every online_every
    steps moved towards the tasks whose training loss (divided by log n) is highest
    (mixture.py, OnlineMixture)."""
    temperature: float = Field(2.0, gt=0)
    """For rule=temperature: weight ∝ size^(1/temperature) (T5)."""
    cap: int | None = Field(None, ge=1)
    """Examples counted per task at most, for proportional and temperature (T5's K)."""
    weights: dict[str, float] = {}
    """For rule=explicit: task -> weight (normalised; every included task needs one)."""
    online_every: int = Field(20, ge=1)
    """For rule=online: steps between weight updates (each interval's micro-batches are drawn
    with the weights decided at its start)."""
    online_rate: float = Field(1.0, ge=0)
    """For rule=online: the exponentiated-gradient step: a task's log-weight grows by this times
    its mean scaled training loss over an interval (0: weights stay proportional)."""
    online_floor: float = Field(0.25, ge=0, le=1)
    """For rule=online: every task keeps at least this share of its proportional weight (the
    weights are (1 - floor) x adapted + floor x proportional), so none is starved."""


class BatchingConfig(Section):
    strategy: Literal["heterogeneous", "homogeneous", "sequential", "mixed"] = "heterogeneous"
    """heterogeneous: each micro-batch one task, each update mixes the micro-batches of a step
    (the paper); homogeneous: each update from one task; sequential: tasks one after another;
    mixed: each micro-batch made of tasks_per_micro_batch single-task chunks."""
    micro_batch_size: int = Field(16, ge=1)
    """Examples per micro-batch on one worker."""
    tokens_per_micro_batch: int = Field(0, ge=0)
    """A token budget for training micro-batches instead of a fixed count: each holds as many of
    a task's similar-length examples as fit this many padded tokens (rows x longest row; a
    multiple-choice example counts a row per choice), at least one and at most
    8 x micro_batch_size, so short-example tasks fill the pass; the mixture then allots each
    task micro-batches so that its share of the examples follows its weight (each micro-batch's
    mean loss still counts equally in its step: docs/design.md). 0: off, micro_batch_size
    examples each. Otherwise at least model.max_length; not with strategy=mixed. Validation
    batches are unchanged."""
    grad_accum_steps: int = Field(2, ge=1)
    """Micro-batches per worker per optimizer step, at the full worker count: one step is
    always grad_accum_steps x max workers micro-batches, so with fewer workers (elastic
    training) each accumulates proportionally more and the global batch does not change."""
    tasks_per_micro_batch: int = Field(4, ge=1)
    """For strategy=mixed: the micro-batch is made of this many single-task chunks."""
    eval_batch_size: int = Field(64, ge=1)
    """Examples per validation batch."""
    max_tokens_per_pass: int = Field(8192, ge=0)
    """A micro-batch (training or validation) with more padded tokens than this runs through
    the model in several passes of whole examples, whose gradients add up to the same update:
    it bounds activation memory (a multiple-choice micro-batch holds a row per choice). 0: one
    pass per micro-batch."""
    group_by_length: bool = True
    """Chunk each task's examples by similar length (within windows of 64 micro-batches, after
    the seeded shuffle), so micro-batches carry little padding; false: in shuffled order."""

    @model_validator(mode="after")
    def _mixed_chunks_divide(self) -> BatchingConfig:
        if self.strategy == "mixed" and self.micro_batch_size % self.tasks_per_micro_batch:
            raise ValueError(
                f"batching.tasks_per_micro_batch ({self.tasks_per_micro_batch}) must divide "
                f"batching.micro_batch_size ({self.micro_batch_size})"
            )
        return self


class TrainingConfig(Section):
    max_steps: int = Field(300, ge=1)
    """Optimizer steps; the mixture schedule holds exactly steps x workers x accumulation
    micro-batches."""
    learning_rate: float = Field(1e-3, gt=0)
    """Peak learning rate of AdamW."""
    weight_decay: float = Field(0.01, ge=0)
    """AdamW weight decay (not on biases and norms)."""
    warmup_steps: int = Field(30, ge=0)
    """Linear warm-up, then linear decay to 0 at max_steps."""
    grad_clip: float = Field(1.0, ge=0)
    """Max gradient norm; 0 turns clipping off."""
    loss_scaling: bool = True
    """Divide each example's loss by log(n), n = size of its output space (Muppet §3.2)."""
    seed: int = 0
    """Model initialisation, data order, schedule and training subsets."""
    eval_every: int = Field(0, ge=0)
    """Validate every N steps (0: only before and after training)."""
    max_eval_examples: int | None = Field(None, ge=1)
    """Validation examples per task at most (None: all)."""
    checkpoint_every: int = Field(100, ge=1)
    """Steps between checkpoints (and always one at the end)."""
    log_every: int = Field(10, ge=1)
    """Steps between metrics records and progress lines."""
    compile: bool = False
    """torch.compile the backbone (in place: parameter names, checkpoints and exports
    unchanged); its first micro-batches wait for the compiler. On an H200 it took a padded
    RoBERTa-large backbone from 29.4% to 34.1% MFU (bench/README.md); not yet measured with
    packed attention or under ZeRO-3."""
    max_bad_steps: int = Field(10, ge=0)
    """A step whose loss or gradients are not finite is skipped on every worker (no update;
    logged with its tasks); after more than this many in a row the run stops with an error."""


class DeepSpeedConfig(Section):
    zero_stage: Literal["auto", 0, 1, 2, 3] = "auto"
    """DeepSpeed ZeRO stage, 0-3; auto: ZeRO-2 where it fits a worker's memory with headroom,
    else ZeRO-3 (optim.choose_zero_stage; said at start-up; a resumed run keeps its stage)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 on GPU, fp32 on CPU."""
    config: dict[str, Any] = {}
    """Extra keys merged into the generated DeepSpeed config (advanced)."""


class ScalingConfig(Section):
    num_workers: int | tuple[int, int] = 2
    """Training workers, or `[min, max]` for elastic training: the run starts with as many as
    the cluster holds (at least min), and after a failure or when nodes join it restarts from
    its latest checkpoint with a new count. The optimizer's batch stays the same (see
    BatchingConfig.grad_accum_steps)."""
    use_gpu: bool | None = None
    """None: GPUs when the cluster has them, or its autoscaler adds nodes that have them (the
    run then waits for those nodes: start_timeout_s)."""
    cpus_per_worker: float = Field(1.0, gt=0)
    """CPUs Ray reserves per worker; on CPU also the worker's torch threads (at least 1)."""
    resources_per_worker: dict[str, float] = {}
    """Further Ray resources each worker holds, e.g. a custom resource that nodes advertise once
    (`ray start --resources='{"trainer": 1}'`) to place one worker per node."""
    start_timeout_s: float = Field(1800.0, gt=0)
    """How long a run waits for the autoscaler to add the nodes its workers need, with a
    progress line every 30 s, before it fails."""
    resize_interval_s: float = Field(60.0, gt=0)
    """Elastic runs: how often Ray Train looks for room for more workers (growing the run
    restarts it from its latest checkpoint)."""

    @model_validator(mode="after")
    def _range(self) -> ScalingConfig:
        if self.min_workers < 1 or self.min_workers > self.max_workers:
            raise ValueError(f"scaling.num_workers: expected a count >= 1 or [min, max] with "
                             f"1 <= min <= max, got {self.num_workers}")
        return self

    @property
    def min_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[0]

    @property
    def max_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[1]

    @property
    def elastic(self) -> bool:
        return self.min_workers != self.max_workers


class RunConfig(Section):
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$")
    """Run directory name under storage_path (default: <job>-<timestamp>)."""
    storage_path: str = "runs"
    """Local path (made absolute) or s3:// / gs:// URI shared by all nodes."""
    ray_address: str | None = None
    """Ray cluster to join; None uses RAY_ADDRESS or starts a local cluster."""
    max_failures: int = Field(3, ge=0)
    """Worker-group restarts (from the latest checkpoint) before the run fails."""
    keep_checkpoints: int = Field(2, ge=1)
    """Checkpoints kept (the newest)."""
    fail_at_step: int | None = Field(None, ge=1)
    """Fault injection for tests: worker `fail_rank` is SIGKILLed once when it reaches this step
    (at a checkpoint step: halfway through uploading that checkpoint)."""
    fail_rank: int = Field(1, ge=0)
    """The worker that `fail_at_step` kills (the last one where there are fewer)."""
    fail_node_at_step: int | None = Field(None, ge=1)
    """Fault injection for tests: the last worker SIGKILLs its node's raylet (the node is lost,
    with every process on it) once when it reaches this step."""

    @field_validator("name")
    @classmethod
    def _a_directory_name(cls, name: str | None) -> str | None:
        if name in (".", ".."):  # (the storage root itself, or above it)
            raise ValueError(f"run.name: expected a directory name, got {name!r}")
        return name


class ProtocolConfig(Section):
    """How sweeps score a model on their eval tasks (protocol.py): short fine-tuning runs on a
    fixed train / validation / test split of each task, the learning rate chosen on validation,
    scores reported on test."""

    test_fraction: float = Field(0.2, gt=0, lt=1)
    """Each eval task's test split: this seeded fraction of its rows (tasks.data_seed)."""
    learning_rates: list[Annotated[float, Field(gt=0)]] = Field([3e-5, 1e-4], min_length=1)
    """Fine-tuning learning rates tried; each model and task keeps the best on validation."""
    epochs: int = Field(3, ge=1)
    """Fine-tuning epochs over the (fraction of the) train split."""
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    """Share of the fine-tuning steps spent warming up."""
    head: Literal["auto", "new"] = "auto"
    """Where each eval task's head starts: `auto` from the head the pre-finetuning trained, where
    there is one (the shared multiple-choice and span heads; the task's own classification head,
    same labels), `new` from a fresh one, so that only the encoder differs from the baseline."""


class Config(Section):
    model: ModelConfig = ModelConfig()
    """The backbone."""
    tasks: TasksConfig = TasksConfig()
    """The tasks and their data."""
    mixture: MixtureConfig = MixtureConfig()
    """How tasks are mixed."""
    batching: BatchingConfig = BatchingConfig()
    """Micro-batches and steps."""
    training: TrainingConfig = TrainingConfig()
    """The optimisation."""
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    """DeepSpeed."""
    scaling: ScalingConfig = ScalingConfig()
    """Workers and resources."""
    run: RunConfig = RunConfig()
    """Where the run lives and how it is supervised."""
    protocol: ProtocolConfig = ProtocolConfig()
    """How sweeps score models on eval tasks."""

    def replace(self, changes: dict[str, Any]) -> Config:
        """A copy with `section.key` settings changed, validated as a loaded config is (a bad
        value raises ConfigError naming it)."""
        raw = self.model_dump(mode="json")
        for key, value in changes.items():
            section, name = key.split(".", 1)
            if section not in raw or name not in raw[section]:
                raise ConfigError(f"{key}: unknown setting")
            raw[section][name] = value
        return validate(raw)

    @model_validator(mode="after")
    def _cross_section(self) -> Config:
        names = [t.name for t in self.tasks.custom]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"tasks.custom: task names must be unique, repeated: {dupes}")
        if self.mixture.rule == "explicit" and not self.mixture.weights:
            raise ValueError("mixture.weights: rule=explicit needs a weight per task")
        if any(w < 0 for w in self.mixture.weights.values()):
            raise ValueError("mixture.weights: weights must be >= 0")
        if self.mixture.weights and not any(self.mixture.weights.values()):
            raise ValueError("mixture.weights: all weights are 0; at least one task needs a "
                             "weight above 0")
        if self.mixture.rule == "online" and self.batching.strategy == "sequential":
            raise ValueError("mixture.rule=online: not with batching.strategy=sequential (its "
                             "tasks come one after another, not by weight); expected "
                             "heterogeneous, homogeneous or mixed")
        budget = self.batching.tokens_per_micro_batch
        if budget and budget < self.model.max_length:
            raise ValueError(f"batching.tokens_per_micro_batch ({budget}): expected 0 (off) or at "
                             f"least model.max_length ({self.model.max_length}), so that a "
                             "row of the longest length fits")
        if budget and self.batching.strategy == "mixed":
            raise ValueError("batching.tokens_per_micro_batch: not with batching.strategy=mixed "
                             "(its micro-batches are made of fixed-size chunks); expected 0")
        per_step = micro_batches_per_step(self)
        uneven = [w for w in range(self.scaling.min_workers, self.scaling.max_workers + 1)
                  if per_step % w]
        if uneven:
            raise ValueError(
                f"scaling.num_workers {list(self.scaling.num_workers)}: a step is "
                f"{per_step} micro-batches (batching.grad_accum_steps x max workers), which "
                f"{uneven[0]} workers cannot share evenly; choose a range whose every count "
                f"divides {per_step}, or a larger batching.grad_accum_steps")
        return self


def micro_batches_per_step(config: Config) -> int:
    """Micro-batches in one optimizer step, whatever the number of workers (elastic)."""
    return config.batching.grad_accum_steps * config.scaling.max_workers


def _format(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        return f"{where}: unknown setting"
    if first["type"] == "value_error" or not where:
        return message
    # (a value from a ${VAR} reference is shown as the reference: errors never echo a secret)
    return f"{where}: {message} (got {_as_written(first.get('input'))!r})"


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one `section.key=value` override in place; the value is parsed as YAML."""
    key, sep, value = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {assignment!r}: expected section.key=value")
    *parents, leaf = key.strip().split(".")
    node = raw
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {assignment!r}: {part!r} is not a section")
        node = child
    node[leaf] = yaml.safe_load(value) if value.strip() else None


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"config file {str(path)!r}: cannot read ({e.strerror})") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {str(path)!r}: not UTF-8 text (byte "
                              f"0x{e.object[e.start]:02x} at offset {e.start})") from None
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError(f"config file {str(path)!r}: not valid YAML{where}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {str(path)!r}: expected a mapping of sections")
    for assignment in overrides:
        apply_override(raw, assignment)
    return validate(expand_variables(raw))


# Text after expansion -> the text as written: saved configs (config.yaml, the export's
# manifest, Tune's state) keep the references, so a token passed as ${VAR} is never written.
_WRITTEN_AS: dict[str, str] = {}


def expand_variables(value: Any, where: str = "") -> Any:
    """Replace `${NAME}` in every text value by the environment variable NAME (so configs name
    data locations and credentials without hard-coding them); an unset variable is an error."""
    if isinstance(value, dict):
        return {k: expand_variables(v, f"{where}.{k}" if where else str(k))
                for k, v in value.items()}
    if isinstance(value, list):
        return [expand_variables(v, f"{where}.{i}") for i, v in enumerate(value)]
    if isinstance(value, str):
        def substitute(match: re.Match) -> str:
            name = match.group(1)
            if name not in os.environ:
                raise ConfigError(f"{where}: environment variable {name} is not set")
            return os.environ[name]

        expanded = re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", substitute, value)
        if expanded != value:
            _WRITTEN_AS[expanded] = value
        return expanded
    return value


def _as_written(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _as_written(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_written(v) for v in value]
    return _WRITTEN_AS.get(value, value) if isinstance(value, str) else value


def parse_config(text: str) -> Config:
    """A config saved by `to_yaml`, its `${VAR}` references expanded from this environment."""
    return validate(expand_variables(yaml.safe_load(text) or {}))


def validate(raw: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format(e)) from None


def to_yaml(config: Config) -> str:
    """The config to save: values that came from `${VAR}` references as those references."""
    return yaml.safe_dump(_as_written(config.model_dump(mode="json")), sort_keys=False)
