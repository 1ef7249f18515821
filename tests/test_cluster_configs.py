"""The cluster files (cluster/) and the example job configs for real scales (jobs/configs/).

Nothing here starts Ray or reaches a cloud. The runtime environment goes through Ray's
RuntimeEnv, the cluster-launcher configs through the autoscaler's own prepare_config and
validate_config (ray-schema.json), GPU capacity through the autoscaler's bin packing, and the
KubeRay manifests through a focused check of the fields the operator requires. Every validator
is also shown rejecting a broken input, so that a pass means something.
"""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from ray.autoscaler._private.resource_demand_scheduler import get_bin_pack_residual
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.runtime_env import RuntimeEnv

from muppet_ray import suite
from muppet_ray.catalog import catalog, families
from muppet_ray.config import load_config
from muppet_ray.errors import ConfigError
from muppet_ray.tasks import resolve_tasks

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
CONFIGS = ROOT / "jobs" / "configs"
LAUNCHER = ["aws.yaml", "gcp.yaml"]
RAYCLUSTER = CLUSTER / "kuberay" / "raycluster.yaml"
RAYJOB = CLUSTER / "kuberay" / "rayjob.yaml"
CLUSTER_JOBS = ["roberta-base.yaml", "roberta-large.yaml", "bart-large.yaml",
                "sweep-tasks-cluster.yaml"]


def load(path: Path):
    return yaml.safe_load(path.read_text())


def requirement(text: str) -> str:
    """One spelling per requirement, so that lists written differently compare equal."""
    return str(Requirement(text))


def pyproject_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"]]


def ray_version() -> str:
    (ray,) = [r for r in pyproject_requirements() if r.name == "ray"]
    (pin,) = ray.specifier
    assert pin.operator == "==", "pyproject.toml must pin Ray exactly: the images follow it"
    return pin.version


def runtime_requirements() -> set[str]:
    """What cluster nodes install on top of the Ray image: pyproject's dependencies but Ray."""
    return {str(r) for r in pyproject_requirements() if r.name != "ray"}


def pinned(image: str, version: str) -> bool:
    return re.fullmatch(rf"rayproject/ray:{re.escape(version)}(-[\w.-]+)?", image) is not None


def images(node) -> list[str]:
    """Every container image named anywhere in a launcher config or a Kubernetes manifest."""
    if isinstance(node, dict):
        found = [v for k, v in node.items()
                 if k in ("image", "head_image", "worker_image") and isinstance(v, str)]
        return found + [i for v in node.values() for i in images(v)]
    if isinstance(node, list):
        return [i for v in node for i in images(v)]
    return []


def submit_command(path: Path) -> list[str]:
    """The `ray job submit ...` command in a job config's header comment, as argv."""
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line[1:].strip())
    found = re.search(r"ray job submit(?:[^\n]*\\\n)*[^\n]*", "\n".join(header))
    assert found, f"{path.name}: no `ray job submit` command in the header comment"
    return shlex.split(found.group(0).replace("\\\n", " "))


def entrypoint_options(argv: list[str]) -> tuple[str, dict[str, str], list[str]]:
    """(script, --option values, --set overrides) of `python SCRIPT --option value ...`."""
    assert argv[0] == "python", argv
    options, overrides = {}, []
    for flag, value in zip(argv[2::2], argv[3::2]):
        if flag == "--set":
            overrides.append(value)
        else:
            options[flag] = value
    return argv[1], options, overrides


# ----------------------------------------------------------------------------- images


def test_every_image_is_the_ray_of_pyproject():
    version = ray_version()
    files = sorted(CLUSTER.rglob("*.yaml"))
    found = {path.name: images(load(path)) for path in files}
    assert {"aws.yaml", "gcp.yaml", "raycluster.yaml", "rayjob.yaml"} <= {
        name for name, named in found.items() if named}
    unpinned = {name: i for name, named in found.items() for i in named
                if not pinned(i, version)}
    assert not unpinned, f"images not on rayproject/ray:{version}: {unpinned}"
    assert load(RAYCLUSTER)["spec"]["rayVersion"] == version
    assert load(RAYJOB)["spec"]["rayClusterSpec"]["rayVersion"] == version
    # The check itself: a neighbouring version, an unpinned tag, another image.
    assert pinned(f"rayproject/ray:{version}-py311-gpu", version)
    assert not pinned(f"rayproject/ray:{version}1-py311-gpu", version)
    assert not pinned("rayproject/ray:latest-gpu", version)
    assert not pinned(f"rayproject/ray-ml:{version}-gpu", version)


# ----------------------------------------------------------------------- runtime env


def test_runtime_env_is_valid_and_matches_pyproject():
    raw = load(CLUSTER / "runtime_env.yaml")
    # RuntimeEnv passes unknown keys through, so a misspelled field would be silently ignored.
    assert set(raw) <= RuntimeEnv.known_fields, set(raw) - RuntimeEnv.known_fields
    env = RuntimeEnv(**raw)
    assert env["env_vars"]["RAY_TRAIN_V2_ENABLED"] == "1"
    assert env["env_vars"]["TOKENIZERS_PARALLELISM"] == "false"
    assert {"runs/", ".venv/", ".git/"} <= set(raw["excludes"])
    assert "working_dir" not in raw  # given by `ray job submit --working-dir .`
    assert {requirement(p) for p in raw["pip"]["packages"]} == runtime_requirements()
    # Ray's validation rejects what YAML makes easy to write: an unquoted number as a value.
    with pytest.raises(TypeError, match="env_vars"):
        RuntimeEnv(**{**raw, "env_vars": {"RAY_TRAIN_V2_ENABLED": 1}})
    # ... but not a misspelled field, which only the known-fields check above catches.
    misspelled = {**raw, "env_var": raw["env_vars"]}
    RuntimeEnv(**misspelled)
    assert set(misspelled) - RuntimeEnv.known_fields == {"env_var"}


# ------------------------------------------------------------------ cluster launcher


def prepared(name: str) -> dict:
    """The config as `ray up` sees it: merged with the provider's defaults, then validated."""
    config = prepare_config(load(CLUSTER / name))
    validate_config(config)
    return config


def gpu_types(config: dict) -> dict[str, dict]:
    head = config["head_node_type"]
    return {name: t for name, t in config["available_node_types"].items() if name != head}


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_config_passes_ray_validation(name):
    config = prepared(name)
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "no training on the head"
    assert head["max_workers"] == 0
    workers = gpu_types(config)
    assert workers
    for node_type, spec in workers.items():
        assert spec["resources"]["GPU"] >= 1, node_type
        assert 0 <= spec["min_workers"] <= spec["max_workers"] <= config["max_workers"]
    assert config["idle_timeout_minutes"] > 0
    assert config["docker"]["container_name"]
    # setup_commands install exactly pyproject's dependencies (Ray comes with the image).
    (install,) = [shlex.split(c) for c in config["setup_commands"] if "pip install" in c]
    assert {requirement(a) for a in install[2:] if not a.startswith("-")} \
        == runtime_requirements()


def test_aws_workers_are_spot_and_the_head_is_not():
    config = prepared("aws.yaml")
    for node_type, spec in gpu_types(config).items():
        assert spec["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot", node_type
    head = config["available_node_types"][config["head_node_type"]]
    assert "InstanceMarketOptions" not in head["node_config"]
    assert config["provider"]["cache_stopped_nodes"] is False  # spot nodes cannot be stopped


def test_gcp_workers_are_spot_and_the_head_is_not():
    config = prepared("gcp.yaml")
    for node_type, spec in gpu_types(config).items():
        scheduling = spec["node_config"]["scheduling"]
        # An object in the Compute API (some of Ray's own examples write a list).
        assert isinstance(scheduling, dict), node_type
        assert scheduling.get("provisioningModel") == "SPOT" or scheduling.get("preemptible")
        assert scheduling["onHostMaintenance"] == "TERMINATE"  # GPUs cannot live-migrate
    head = config["available_node_types"][config["head_node_type"]]
    assert "scheduling" not in head["node_config"]


@pytest.mark.parametrize("name", LAUNCHER)
def test_ray_validation_rejects_broken_launcher_configs(name):
    misspelled = load(CLUSTER / name)
    misspelled["idle_timeout_minute"] = misspelled.pop("idle_timeout_minutes")
    with pytest.raises(jsonschema.ValidationError, match="idle_timeout_minute"):
        validate_config(prepare_config(misspelled))
    fractional = load(CLUSTER / name)
    next(iter(gpu_types(fractional).values()))["resources"]["GPU"] = 0.5
    with pytest.raises(jsonschema.ValidationError, match="integer"):
        validate_config(prepare_config(fractional))
    too_many = load(CLUSTER / name)
    for spec in gpu_types(too_many).values():
        spec["min_workers"] = too_many["max_workers"]
    with pytest.raises(ValueError, match="min_workers"):
        validate_config(prepare_config(too_many))


# ------------------------------------------------------------------------- capacity


def nodes(resources: dict, count: int) -> list[dict]:
    # One dict per node: the bin packing subtracts in place, and a list of one shared dict
    # would be a single node.
    return [dict(resources) for _ in range(count)]


def gpu_shapes() -> dict[str, list[dict]]:
    """Every way the cluster files can grow: one GPU node type (or worker group) at its
    largest, as the nodes' Ray resources."""
    shapes = {}
    for name in LAUNCHER:
        config = prepared(name)
        for node_type, spec in gpu_types(config).items():
            count = min(spec["max_workers"], config["max_workers"])
            shapes[f"{name}:{node_type}"] = nodes(spec["resources"], count)
    for path in (RAYCLUSTER, RAYJOB):
        spec = load(path)["spec"]
        spec = spec.get("rayClusterSpec", spec)
        for group in spec["workerGroupSpecs"]:
            limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
            node = {"CPU": int(limits["cpu"]), "GPU": int(limits["nvidia.com/gpu"])}
            shapes[f"{path.name}:{group['groupName']}"] = nodes(node, group["maxReplicas"])
    return shapes


def fits(nodes: list[dict], workers: int, cpus_per_worker: float) -> bool:
    """Whether the autoscaler's bin packing places `workers` Ray Train workers on `nodes`."""
    unplaced, _ = get_bin_pack_residual(nodes, [{"CPU": cpus_per_worker, "GPU": 1}] * workers)
    return not unplaced


@pytest.mark.parametrize("name", CLUSTER_JOBS)
def test_every_cluster_shape_holds_the_example_jobs(name, monkeypatch):
    monkeypatch.setenv("MUPPET_STORAGE", "s3://test-bucket/runs")
    config = load_config(CONFIGS / name)
    argv = submit_command(CONFIGS / name)
    _, options, _ = entrypoint_options(argv[argv.index("--") + 1:])
    trials = int(options.get("--max-concurrent", 1))  # sweeps run trials side by side
    demand = config.scaling.max_workers * trials
    shapes = gpu_shapes()
    assert len(shapes) == 6
    for shape, cluster in shapes.items():
        assert fits(cluster, demand, config.scaling.cpus_per_worker), (shape, demand)
    # The packing is a real constraint: one GPU too many, or too few CPUs per GPU, fails.
    assert fits(nodes({"CPU": 48, "GPU": 4}, 16), 64, 4)
    assert not fits(nodes({"CPU": 48, "GPU": 4}, 16), 65, 4)
    assert not fits(nodes({"CPU": 8, "GPU": 4}, 1), 4, 4)


# --------------------------------------------------------------------------- KubeRay


def cluster_spec_problems(spec: dict) -> list[str]:
    """What the KubeRay operator (ray.io/v1) would refuse or run wrongly in a RayCluster spec;
    field names from ray-operator/apis/ray/v1/raycluster_types.go."""
    problems = []

    def containers(where: str, group: dict) -> list[dict]:
        found = (group.get("template") or {}).get("spec", {}).get("containers") or []
        if not found:
            problems.append(f"{where}: template.spec.containers is empty")
        for i, container in enumerate(found):
            for field in ("name", "image"):
                if not container.get(field):
                    problems.append(f"{where}: containers[{i}] has no {field}")
        return found

    head = spec.get("headGroupSpec") or {}
    if not isinstance(head.get("rayStartParams"), dict):
        problems.append("headGroupSpec: rayStartParams missing (may be {})")
    containers("headGroupSpec", head)
    groups = spec.get("workerGroupSpecs") or []
    if not groups:
        problems.append("workerGroupSpecs: none")
    for i, group in enumerate(groups):
        where = f"workerGroupSpecs[{i}]"
        if not group.get("groupName"):
            problems.append(f"{where}: no groupName")
        if not isinstance(group.get("rayStartParams"), dict):
            problems.append(f"{where}: rayStartParams missing (may be {{}})")
        low, n, high = (group.get(k) for k in ("minReplicas", "replicas", "maxReplicas"))
        if not all(isinstance(v, int) for v in (low, n, high)) or not low <= n <= high:
            problems.append(f"{where}: needs minReplicas <= replicas <= maxReplicas, got "
                            f"{low}, {n}, {high}")
        for container in containers(where, group):
            gpus = container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
            if not gpus or int(gpus) < 1:
                problems.append(f"{where}: no nvidia.com/gpu limit")
    if spec.get("enableInTreeAutoscaling") is not True:
        problems.append("enableInTreeAutoscaling is not true")
    idle = (spec.get("autoscalerOptions") or {}).get("idleTimeoutSeconds")
    if not isinstance(idle, int) or idle <= 0:
        problems.append("autoscalerOptions.idleTimeoutSeconds: expected seconds > 0")
    return problems


def test_raycluster_manifest():
    manifest = load(RAYCLUSTER)
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayCluster")
    assert manifest["metadata"]["name"]
    assert cluster_spec_problems(manifest["spec"]) == []
    # The check itself: each broken field is reported.
    broken = copy.deepcopy(manifest["spec"])
    del broken["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    del broken["workerGroupSpecs"][0]["groupName"]
    broken["workerGroupSpecs"][0]["replicas"] = broken["workerGroupSpecs"][0]["maxReplicas"] + 1
    del broken["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]
    assert len(cluster_spec_problems(broken)) == 4


def test_rayjob_manifest(monkeypatch):
    manifest = load(RAYJOB)
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayJob")
    spec = manifest["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int)
    # The job's own cluster is raycluster.yaml's.
    assert cluster_spec_problems(spec["rayClusterSpec"]) == []
    assert spec["rayClusterSpec"] == load(RAYCLUSTER)["spec"]
    # The entrypoint runs a script and a config of this repository, and its --set gives the
    # storage (no MUPPET_STORAGE on the cluster).
    script, options, overrides = entrypoint_options(shlex.split(spec["entrypoint"]))
    assert (ROOT / script).is_file()
    assert (ROOT / options["--config"]).is_file()
    monkeypatch.delenv("MUPPET_STORAGE", raising=False)
    config = load_config(ROOT / options["--config"], overrides)
    assert config.run.storage_path.startswith(("s3://", "gs://"))
    # The runtime env is cluster/runtime_env.yaml's, with the code from an archive.
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert set(runtime_env) <= RuntimeEnv.known_fields
    RuntimeEnv(**runtime_env)
    assert re.fullmatch(r"(https|s3|gs)://\S+\.zip", runtime_env.pop("working_dir"))
    local = load(CLUSTER / "runtime_env.yaml")
    del local["excludes"]  # only for uploads from a local working dir
    assert runtime_env == local
    # Ray refuses a remote working_dir that is not an archive.
    with pytest.raises(ValueError, match="working_dir"):
        RuntimeEnv(working_dir="https://github.com/org/repo/tree/main")


# ------------------------------------------------------------------------ job configs


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_job_config_loads_and_names_known_tasks(path, monkeypatch, tmp_path):
    monkeypatch.setenv("MUPPET_STORAGE", "s3://test-bucket/runs")
    monkeypatch.setenv("MUPPET_SHARED", str(tmp_path))  # file tasks are not read here
    config = load_config(path)
    if not config.tasks.custom:  # built-in and catalog tasks resolve without reading data
        assert resolve_tasks(config)
        return
    known = ({t.name for t in config.tasks.custom} | set(catalog()) | set(suite.SUITE)
             | set(families()))
    assert set(config.tasks.include) <= known, set(config.tasks.include) - known


@pytest.mark.parametrize("name", CLUSTER_JOBS)
def test_cluster_job_header_command_runs_as_written(name, monkeypatch):
    path = CONFIGS / name
    argv = submit_command(path)
    split = argv.index("--")
    submit = dict(zip(argv[3:split:2], argv[4:split:2]))
    assert argv[:3] == ["ray", "job", "submit"]
    assert submit == {"--runtime-env": "cluster/runtime_env.yaml", "--working-dir": "."}
    script, options, overrides = entrypoint_options(argv[split + 1:])
    assert (ROOT / script).is_file()
    assert options["--config"] == f"jobs/configs/{name}"
    # Storage comes from --set on the cluster; without it (or MUPPET_STORAGE) loading fails
    # rather than falling back to a directory on one node.
    monkeypatch.delenv("MUPPET_STORAGE", raising=False)
    config = load_config(path, overrides)
    assert config.run.storage_path.startswith(("s3://", "gs://"))
    with pytest.raises(ConfigError, match="MUPPET_STORAGE"):
        load_config(path)
    assert "${MUPPET_STORAGE}" in path.read_text()


def test_cluster_jobs_scale_and_precision(monkeypatch):
    monkeypatch.setenv("MUPPET_STORAGE", "s3://test-bucket/runs")
    configs = {name: load_config(CONFIGS / name) for name in CLUSTER_JOBS}
    generation = {n for n, e in catalog().items() if e.spec.type == "generation"}
    encoder_tasks = set(catalog()) - generation
    expected = {  # model, ZeRO stage, workers, tasks
        "roberta-base.yaml": ("roberta-base", 2, 32, encoder_tasks),
        "roberta-large.yaml": ("roberta-large", 3, 64, encoder_tasks),
        "bart-large.yaml": ("facebook/bart-large", 3, 64, set(catalog())),
    }
    for name, (model, stage, workers, tasks) in expected.items():
        config = configs[name]
        assert config.model.pretrained == model, name
        assert config.deepspeed.zero_stage == stage, name
        assert config.scaling.num_workers == workers, name  # fixed counts, not ranges
        assert {t.name for t in resolve_tasks(config)} == tasks, name
    for name, config in configs.items():
        assert config.deepspeed.precision == "bf16", name
        assert config.scaling.use_gpu is True, name
        assert config.run.max_failures >= 3, name  # spot workers get reclaimed


def test_sweep_header_counts_and_eval_tasks(monkeypatch):
    monkeypatch.setenv("MUPPET_STORAGE", "s3://test-bucket/runs")
    path = CONFIGS / "sweep-tasks-cluster.yaml"
    argv = submit_command(path)
    assert argv[argv.index("--") + 2] == "jobs/sweep_tasks.py"
    _, options, _ = entrypoint_options(argv[argv.index("--") + 1:])
    counts = [int(c) for c in options["--counts"].split(",")]
    eval_tasks = options["--eval-tasks"].split(",")
    config = load_config(path)
    # What `muppet-ray sweep tasks` checks before it starts Ray (sweep.sweep_points and
    # nested_task_sets; not imported here: muppet_ray.sweep pulls in transformers, seconds).
    pool = [t.name for t in resolve_tasks(config)]
    assert not set(eval_tasks) & set(pool), "an eval task must never be pre-finetuned on"
    assert set(eval_tasks) <= set(catalog())
    assert len(set(counts)) == len(counts) and min(counts) >= 0 and max(counts) <= len(pool)
    # The header gives the same command for `muppet-ray sweep tasks` on the head.
    words = " ".join(w for w in path.read_text().split() if w != "#")
    assert (f"muppet-ray sweep tasks --config jobs/configs/{path.name} --counts "
            f"{options['--counts']} --eval-tasks {options['--eval-tasks']}") in words
