"""`muppet-ray`: the command line.

    muppet-ray prefinetune [--config FILE] [--set section.key=value ...]
    muppet-ray finetune --from MODEL --task TASK [--fractions F,...] [--seeds S,...]
                        [--baseline auto|MODEL] [--head auto|reuse|new] [--config] [--set]
    muppet-ray evaluate --from MODEL --tasks TASK,... [--config FILE] [--set ...]
    muppet-ray export --from MODEL --task TASK --out DIR
    muppet-ray sweep tasks --counts N,... --eval-tasks TASK,... [--fractions] [--seeds]
                           [--task-seed S,...] [--prefinetune-seeds S,...] [--ablate K=V ...]
    muppet-ray sweep report --from SWEEP_DIR [--report FILE.md]
    muppet-ray sweep ablation --axis batching|loss-scaling|mixing --eval-tasks TASK,... [...]
    muppet-ray sweep finetune --from MODEL --task TASK --search KEY=SPACE ... [--samples N]
    muppet-ray tasks list [--family FAMILY]

MODEL: a run directory, a checkpoint, an export, a model directory or a Hub id.

Bad input (config, tasks, data) prints one line naming what is wrong and exits with status 2.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from muppet_ray.config import load_config
from muppet_ray.errors import ConfigError, MuppetError


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="muppet-ray", description=__doc__.split("\n")[0])
    commands = root.add_subparsers(dest="command", required=True)
    run = commands.add_parser("prefinetune", help="pre-finetune a model on a task mixture")
    _config_options(run)
    tune = commands.add_parser("finetune", help="fine-tune on one task (and compare with a "
                               "baseline over fractions and seeds)")
    _config_options(tune)
    tune.add_argument("--from", dest="source", required=True, metavar="MODEL")
    tune.add_argument("--task", required=True)
    tune.add_argument("--fractions", default="1", help="training fractions in (0, 1], comma "
                      "separated (nested subsets; default 1)")
    tune.add_argument("--seeds", default="0", help="seeds, comma separated (default 0)")
    tune.add_argument("--baseline", metavar="auto|MODEL", help="also fine-tune this model the "
                      "same way; auto: the backbone MODEL was pre-finetuned from")
    tune.add_argument("--head", default="auto", help="auto (reuse a trained head where there "
                      "is one), reuse (require one) or new")
    score = commands.add_parser("evaluate", help="validation metrics of a model, no training")
    _config_options(score)
    score.add_argument("--from", dest="source", required=True, metavar="MODEL")
    score.add_argument("--tasks", required=True, help="task names, comma separated")
    export = commands.add_parser("export", help="write one task as a transformers task model")
    export.add_argument("--from", dest="source", required=True, metavar="MODEL")
    export.add_argument("--task", required=True)
    export.add_argument("--out", required=True, help="output directory (a path or a URI)")
    _sweep_parsers(commands.add_parser("sweep", help="Ray Tune sweeps: task count, ablations, "
                                       "fine-tuning hyperparameters"))
    tasks = commands.add_parser("tasks", help="the task catalog")
    listing = tasks.add_subparsers(dest="action", required=True).add_parser(
        "list", help="print the catalog: name, type, labels, families, source, size")
    listing.add_argument("--family", help="only this family (e.g. glue, commonsense, span)")
    return root


def _sweep_parsers(command: argparse.ArgumentParser) -> None:
    sweep = command.add_subparsers(dest="sweep", required=True)
    counts = sweep.add_parser("tasks", help="downstream quality vs number of pre-finetuning "
                              "tasks (nested task sets; 0 = the plain backbone)")
    counts.add_argument("--counts", required=True, help="task counts, e.g. 0,2,4,8")
    counts.add_argument("--task-seed", default="0", help="seeds the order in which "
                        "tasks join the nested sets (recorded in task_order.json); several, "
                        "comma separated: each further order's nested sets again at every count "
                        "between 0 and the pool (points 'N tasks, order S')")
    counts.add_argument("--prefinetune-seeds", help="training.seed of the largest count's "
                        "pre-finetuning, comma separated, one of them training.seed: each "
                        "other seed adds that point again (points 'N tasks, seed S')")
    counts.add_argument("--ablate", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="also the largest count with this one pre-finetuning setting "
                        "changed, compared with it (repeatable; points 'N tasks, KEY=VALUE')")
    report = sweep.add_parser("report", help="rewrite a sweep's results, summary, plots and "
                              "report from what its points stored (no Ray; a running sweep: "
                              "its finished points)")
    report.add_argument("--from", dest="source", required=True, metavar="SWEEP_DIR",
                        help="the sweep's directory (<run.storage_path>/<run.name>)")
    report.add_argument("--report", metavar="FILE.md", help="also write the report to this "
                        "markdown file (its plots beside it)")
    ablation = sweep.add_parser("ablation", help="the same over batching, loss scaling or "
                                "mixing")
    ablation.add_argument("--axis", required=True, choices=["batching", "loss-scaling",
                                                            "mixing"])
    ablation.add_argument("--values", help="values of the axis, comma separated (default: "
                          "all)")
    for command in (counts, ablation):
        _config_options(command)
        command.add_argument("--eval-tasks", required=True, help="tasks to fine-tune on, "
                             "never in any mixture (comma separated)")
        command.add_argument("--fractions", default="1")
        command.add_argument("--seeds", default="0")
        command.add_argument("--max-concurrent", type=int, help="trials at once (default: as "
                             "many as the cluster's CPUs hold)")
        command.add_argument("--report", metavar="FILE.md", help="also write the summary, "
                             "dated, with the commit and this command, to this markdown file "
                             "(its plot beside it), e.g. docs/results.md")
    search = sweep.add_parser("finetune", help="fine-tuning hyperparameter search with ASHA")
    _config_options(search)
    search.add_argument("--from", dest="source", required=True, metavar="MODEL")
    search.add_argument("--task", required=True)
    search.add_argument("--search", action="append", required=True, metavar="KEY=SPACE",
                        help="e.g. training.learning_rate=loguniform(1e-5,1e-3), "
                        "batching.micro_batch_size=choice(8,16) (repeatable)")
    search.add_argument("--samples", type=int, default=4, help="trials (default 4)")
    search.add_argument("--grace-steps", type=int, help="steps before ASHA may stop a trial")
    search.add_argument("--max-concurrent", type=int)


def _config_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--config", help="YAML config file (default: the built-in defaults)")
    command.add_argument("--set", dest="overrides", action="append", default=[],
                         metavar="SECTION.KEY=VALUE", help="override one config value "
                         "(repeatable)")
    command.add_argument("--verbose", action="store_true", help="also show what Ray, Ray "
                         "Train, Ray Tune, Ray Data and DeepSpeed print (default: only in Ray's "
                         "log files)")


def _numbers(option: str, text: str, kind: type) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise ConfigError(f"{option}: expected comma-separated {kind.__name__} values, got "
                          f"{text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "tasks":
            return _list_tasks(args.family)
        if args.command == "export":
            return _export(args.source, args.task, args.out)
        if args.command == "sweep" and args.sweep == "report":
            from muppet_ray import sweep

            sweep.report_from(args.source, args.report)
            return 0
        config = load_config(args.config, args.overrides)
        if args.verbose:  # (read where Ray starts, and by the sweep's trial drivers)
            from muppet_ray.runtime import set_verbose

            set_verbose()
        if args.command == "prefinetune":
            from muppet_ray.prefinetune import prefinetune  # imports Ray: only when running

            prefinetune(config)
        elif args.command == "finetune":
            from muppet_ray.finetune import compare

            fractions = _numbers("--fractions", args.fractions, float)
            seeds = _numbers("--seeds", args.seeds, int)
            compare(config, args.source, args.task, fractions, seeds, args.baseline, args.head)
        elif args.command == "sweep":
            _sweep(config, args, shlex.join(["muppet-ray", *(argv or sys.argv[1:])]))
        elif args.command == "evaluate":
            from muppet_ray.finetune import evaluate

            evaluate(config, args.source, _numbers("--tasks", args.tasks, str))
    except MuppetError as e:
        print(f"muppet-ray: error: {e}", file=sys.stderr)
        return 2
    return 0


def _list_tasks(family: str | None) -> int:
    from muppet_ray.catalog import families, table

    if family and family not in families():
        raise ConfigError(f"unknown family {family!r}; families are {sorted(families())}")
    print(table(family))
    return 0


def _export(given: str, task: str, out: str) -> int:
    from muppet_ray.export import to_transformers
    from muppet_ray.model_source import resolve_source
    from muppet_ray.storage import normalize

    source = resolve_source(given, normalize(out) + ".work")
    if source.manifest is None:
        raise ConfigError(f"--from {given!r}: not a muppet-ray export (no trained heads to "
                          "export)")
    name = to_transformers(source.model, task, out)
    print(f"[muppet-ray] {out}: {name} (loads with transformers' Auto classes)")
    return 0


def _sweep(config, args: argparse.Namespace, command: str) -> None:
    from muppet_ray import sweep

    if args.sweep == "finetune":
        sweep.sweep_finetune(config, args.source, args.task, args.search, args.samples,
                             args.grace_steps, args.max_concurrent)
        return
    common = dict(eval_tasks=_numbers("--eval-tasks", args.eval_tasks, str),
                  fractions=_numbers("--fractions", args.fractions, float),
                  seeds=_numbers("--seeds", args.seeds, int),
                  max_concurrent=args.max_concurrent, report=args.report, command=command)
    if args.sweep == "tasks":
        seeds = (_numbers("--prefinetune-seeds", args.prefinetune_seeds, int)
                 if args.prefinetune_seeds else None)
        sweep.sweep_points(config, "tasks", counts=_numbers("--counts", args.counts, int),
                           task_seed=_numbers("--task-seed", args.task_seed, int),
                           prefinetune_seeds=seeds, ablate=args.ablate, **common)
    else:
        values = None
        if args.values:
            values = [sweep.parse_value(v) for v in args.values.split(",")]
        sweep.sweep_points(config, args.axis, values=values, **common)


if __name__ == "__main__":
    sys.exit(main())
