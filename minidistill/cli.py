"""What the commands share: flags generated from (nested) config dataclasses, and how errors
reach the user: one line naming the problem, no traceback.

Library code raises FileNotFoundError, ValueError or a `MinidistillError` with a message that
says what to do; `run` (used only by the `python -m minidistill.X` entry points) turns those
into `error: ...` on stderr and the error's exit code (2 for bad input). A traceback adds
nothing there; MINIDISTILL_TRACEBACK=1 shows it anyway.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import field, fields
from typing import Any, Callable

from .errors import MinidistillError


def run(main: Callable[[], object]) -> None:
    """Call a command's main(); bad input becomes one line on stderr and a non-zero exit."""
    try:
        main()
    except (FileNotFoundError, ValueError, MinidistillError) as e:
        if os.environ.get("MINIDISTILL_TRACEBACK"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 2))


def flag_field(default, help: str, **kw):
    """A config dataclass field that is also a command-line flag: its help (and `choices`, and
    `flag` when the flag is not `--field-name`) ride in the field's metadata."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("flag_field defaults must be immutable (use a tuple)")
    return field(default=default, metadata={"help": help, **kw})


def nested(cls):
    """A config field holding another config dataclass; its fields become flags of their own."""
    return field(default_factory=cls, metadata={"nested": cls})


def _flags(cls, prefix: str = ""):
    """(dest, flag, dataclass field) for every flag of `cls`, nested configs included; dest is the
    dotted path of the field ("lora.r")."""
    for f in fields(cls):
        if "nested" in f.metadata:
            yield from _flags(f.metadata["nested"], f"{prefix}{f.name}.")
        elif "help" in f.metadata:
            yield prefix + f.name, f.metadata.get("flag", "--" + f.name.replace("_", "-")), f


def _parse_names(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def add_config_flags(parser: argparse.ArgumentParser, cls, *, skip: tuple[str, ...] = (),
                     help_suffix: str = "") -> None:
    """One --flag per field of a config dataclass (booleans as --x/--no-x, tuples of names as a
    comma-separated list), recursing into nested configs: the CLI is the config. `skip` names
    dotted field paths to leave out."""
    for dest, flag, f in _flags(cls):
        if dest in skip:
            continue
        meta = f.metadata
        if f.type in (bool, "bool"):
            parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=f.default,
                                help=meta["help"] + help_suffix)
            continue
        default, typ = f.default, {"int": int, "float": float}.get(str(f.type).split("|")[0].strip(), str)
        if isinstance(default, tuple):  # ("q_proj", "k_proj") <-> "q_proj,k_proj"
            default, typ = ",".join(default), _parse_names
        choices = [c for c in meta.get("choices", []) if c is not None] or None
        parser.add_argument(flag, dest=dest, type=typ, default=default, choices=choices,
                            metavar=None if choices else flag.lstrip("-").replace("-", "_").upper(),
                            help=meta["help"] + help_suffix)


def config_from_args(cls, args: argparse.Namespace | dict, *, prefix: str = ""):
    """The config dataclass (nested ones built too) from parsed flags; fields without a flag, or
    skipped, keep their defaults."""
    values = vars(args) if isinstance(args, argparse.Namespace) else args
    kw: dict[str, Any] = {}
    for f in fields(cls):
        if "nested" in f.metadata:
            kw[f.name] = config_from_args(f.metadata["nested"], values, prefix=f"{prefix}{f.name}.")
        elif prefix + f.name in values:
            kw[f.name] = values[prefix + f.name]
    return cls(**kw)


def config_values(cfg) -> dict[str, Any]:
    """{dest: value} of a config, nested ones flattened (dest as in `_flags`); as
    `parser.set_defaults(**config_values(cfg))` it makes cfg's values the flags' defaults."""
    out = {}
    for dest, _, _ in _flags(type(cfg)):
        v = cfg
        for part in dest.split("."):
            v = getattr(v, part)
        out[dest] = v
    return out


def flag_values(cfg) -> dict[str, Any]:
    """{--flag: value} of a config, nested ones flattened: what a user would type to get it."""
    flag = {dest: f for dest, f, _ in _flags(type(cfg))}
    return {flag[d]: list(v) if isinstance(v, tuple) else v for d, v in config_values(cfg).items()}


def flags_of_dict(d: dict, cls) -> dict[str, Any]:
    """The same as `flag_values` for a config saved with `dataclasses.asdict` (e.g. config.json);
    fields missing from the file are left out."""
    out = {}
    for dest, flag, _ in _flags(cls):
        v: Any = d
        for part in dest.split("."):
            if not isinstance(v, dict) or part not in v:
                break
            v = v[part]
        else:
            out[flag] = v
    return out
