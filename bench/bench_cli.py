"""Bad input to a bench script, as the muppet-ray CLI treats it: one line that names the argument
and what was expected, exit status 2, and nothing run. (`python bench/X.py` puts this folder on
the path, so every script imports this module by its name.)"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NoReturn


def fail(message: str) -> NoReturn:
    print(f"bench: {message}", file=sys.stderr)
    sys.exit(2)


def run(main: Callable[[], None]) -> None:
    """`main()`, a muppet-ray error in it (a config, task or run directory that will not do)
    ending it as that error's one line, not a traceback."""
    from muppet_ray.errors import MuppetError

    try:
        main()
    except MuppetError as e:
        fail(str(e))


def checkouts(paths: list[str]) -> list[Path]:
    """`--code`'s folders as checkouts of muppet-ray (whose package a run is to import)."""
    for given in paths:
        if not (Path(given) / "muppet_ray").is_dir():
            fail(f"--code {given}: expected a checkout of muppet-ray (a folder holding "
                 "muppet_ray/)")
    return [Path(given).resolve() for given in paths]


def positive(**values: float) -> None:
    """Each option (given by its name with _ for -) above 0: a count of steps, repeats, ..."""
    for name, value in values.items():
        if not value > 0:
            fail(f"--{name.replace('_', '-')} {value}: expected a number above 0")


def listed(option: str, text: str, allowed: Iterable[str]) -> None:
    """Each of a comma-separated option's items one of `allowed`."""
    allowed = list(allowed)
    for item in text.split(","):
        if item not in allowed:
            fail(f"{option} {text}: {item!r} is not one of {', '.join(allowed)}")


def numbers(option: str, text: str, kind: type = float) -> list:
    """A comma-separated option's items as numbers of `kind` (int or float)."""
    try:
        return [kind(item) for item in text.split(",")]
    except ValueError:
        fail(f"{option} {text}: expected comma-separated {kind.__name__} values")
