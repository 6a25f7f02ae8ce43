"""Command-line overrides checked against the config groups and keys before Hydra reads them,
so that a misspelt option or key is one line naming the closest ones ("did you mean ...?")
instead of Hydra's page of text."""

from __future__ import annotations

import difflib
import typing
from dataclasses import fields, is_dataclass
from pathlib import Path

from trainer.config import Config


def suggestion(word: str, choices: list[str], prefix: str = "") -> str:
    """``"; did you mean X?"`` with the closest of ``choices`` (``prefix`` before it), or
    nothing when none is close."""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"; did you mean {prefix}{close[0]}?" if close else ""


def check_group(group: str, value: str, config_dir: Path) -> str | None:
    """``group=value``: every option named (a sweep's ``a,b`` too) is a file of the group."""
    options = sorted(p.stem for p in (config_dir / group).glob("*.yaml"))
    for option in value.split(","):
        if option not in options:
            return (
                f"{group}={option} is not one of {', '.join(options)}"
                f"{suggestion(option, options, f'{group}=')}"
            )
    return None


def check_key(key: str) -> str | None:
    """``a.b.c``: each part is a field of the config section before it (``Config``'s)."""
    node: type = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        where = ".".join(parts[:i])
        if not is_dataclass(node):
            return f"{key} is not a key: {where} is a value, not a section"
        names = [f.name for f in fields(node)]
        if part not in names:
            prefix = f"{where}." if where else ""
            return f"{key} is not a key of {where or 'the config'}{suggestion(part, names, prefix)}"
        node = typing.get_type_hints(node)[part]
    return None


def check_overrides(args: list[str], config_dir: Path) -> str | None:
    """The first problem with the overrides in ``args`` (``train.py``'s command line), as one
    line, or ``None``. Hydra's own flags and ``hydra.*`` keys are left to Hydra."""
    groups = {p.name for p in config_dir.iterdir() if p.is_dir()}
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, _, value = arg.partition("=")
        key = key.lstrip("+~")
        if key == "hydra" or key.startswith("hydra.") or "/" in key:
            continue
        problem = check_group(key, value, config_dir) if key in groups else check_key(key)
        if problem:
            return problem
    return None
