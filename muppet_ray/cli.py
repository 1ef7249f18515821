"""`muppet-ray`: the command line.

    muppet-ray prefinetune [--config FILE] [--set section.key=value ...]
    muppet-ray tasks list [--family FAMILY]

Bad input (config, tasks, data) prints one line naming what is wrong and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys

from muppet_ray.config import load_config
from muppet_ray.errors import MuppetError


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="muppet-ray", description=__doc__.split("\n")[0])
    commands = root.add_subparsers(dest="command", required=True)
    run = commands.add_parser("prefinetune", help="pre-finetune a model on a task mixture")
    run.add_argument("--config", help="YAML config file (default: the built-in defaults)")
    run.add_argument("--set", dest="overrides", action="append", default=[],
                     metavar="SECTION.KEY=VALUE", help="override one config value (repeatable)")
    tasks = commands.add_parser("tasks", help="the task catalog")
    listing = tasks.add_subparsers(dest="action", required=True).add_parser(
        "list", help="print the catalog: name, type, labels, families, source, size")
    listing.add_argument("--family", help="only this family (e.g. glue, commonsense, span)")
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "tasks":
        from muppet_ray.catalog import families, table

        if args.family and args.family not in families():
            print(f"muppet-ray: error: unknown family {args.family!r}; families are "
                  f"{sorted(families())}", file=sys.stderr)
            return 2
        print(table(args.family))
        return 0
    try:
        config = load_config(args.config, args.overrides)
        if args.command == "prefinetune":
            from muppet_ray.prefinetune import prefinetune  # imports Ray: only when running

            prefinetune(config)
    except MuppetError as e:
        print(f"muppet-ray: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
