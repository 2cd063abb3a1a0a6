"""What the commands share: flags generated from config dataclasses, and how user errors
are reported: one line naming the problem, no traceback.

Bad input (a missing folder, an unknown preset, a malformed dataset, a checkpoint that does
not match its config) raises FileNotFoundError or ValueError with a message that says what to
do; a traceback adds nothing there. MINIDISTILL_TRACEBACK=1 shows it anyway.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import field, fields
from typing import Callable


def run(main: Callable[[], object]) -> None:
    try:
        main()
    except (FileNotFoundError, ValueError) as e:
        if os.environ.get("MINIDISTILL_TRACEBACK"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def flag_field(default, help: str, **kw):
    """A config dataclass field that is also a command-line flag: its help (and choices) ride
    in the field's metadata, read by `add_config_flags`."""
    return field(default=default, metadata={"help": help, **kw})


def add_config_flags(parser: argparse.ArgumentParser, cls, *, skip: tuple[str, ...] = (),
                     help_suffix: str = "") -> None:
    """One --flag per field of a config dataclass (booleans as --x/--no-x), so the CLI is the
    config: TrainConfig for train, DataConfig for the data and distill commands."""
    for f in fields(cls):
        if f.name in skip:
            continue
        flag, meta = "--" + f.name.replace("_", "-"), f.metadata
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                                help=meta["help"] + help_suffix)
            continue
        typ = {"int": int, "float": float}.get(str(f.type).split("|")[0].strip(), str)  # "int | None" -> int
        choices = [c for c in meta.get("choices", []) if c is not None] or None
        parser.add_argument(flag, type=typ, default=f.default, choices=choices, help=meta["help"] + help_suffix)
