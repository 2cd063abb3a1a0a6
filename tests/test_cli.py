"""Flags from nested config dataclasses, and the one error policy of the commands."""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass

import pytest

from minidistill.cli import add_config_flags, config_from_args, flag_field, flag_values, flags_of_dict, nested, run
from minidistill.errors import MinidistillError, TrainingInterrupted


@dataclass
class Inner:
    r: int = flag_field(8, "rank", flag="--inner-r")
    names: tuple[str, ...] = flag_field(("a", "b"), "names")
    on: bool = flag_field(False, "switch")


@dataclass
class Outer:
    lr: float = flag_field(1e-3, "learning rate")
    limit: int | None = flag_field(None, "records")
    inner: Inner = nested(Inner)


def parse(argv):
    p = argparse.ArgumentParser()
    add_config_flags(p, Outer)
    return config_from_args(Outer, p.parse_args(argv))


def test_nested_fields_become_flags_with_their_own_names():
    cfg = parse(["--lr", "0.5", "--inner-r", "4", "--names", "q_proj, v_proj", "--on", "--limit", "3"])
    assert cfg == Outer(lr=0.5, limit=3, inner=Inner(r=4, names=("q_proj", "v_proj"), on=True))
    assert parse([]) == Outer()  # defaults, the tuple included, survive the round trip through text
    with pytest.raises(SystemExit):
        parse(["--r", "4"])  # the nested field answers only to its own flag


def test_flag_values_name_what_a_user_types_for_saved_and_live_configs():
    cfg = Outer(inner=Inner(r=2))
    assert flag_values(cfg) == {"--lr": 1e-3, "--limit": None, "--inner-r": 2, "--names": ["a", "b"], "--on": False}
    saved = asdict(cfg)
    del saved["inner"]["on"]  # a config written before a field existed
    assert flags_of_dict(saved, Outer) == {"--lr": 1e-3, "--limit": None, "--inner-r": 2, "--names": ("a", "b")}


@pytest.mark.parametrize("exc,code", [(ValueError("bad --lr"), 2), (FileNotFoundError("no such file"), 2),
                                      (MinidistillError("stopped"), 2), (TrainingInterrupted("saved"), 130)])
def test_run_turns_errors_into_one_line_and_an_exit_code(exc, code, capsys, monkeypatch):
    monkeypatch.delenv("MINIDISTILL_TRACEBACK", raising=False)

    def main():
        raise exc

    with pytest.raises(SystemExit) as e:
        run(main)
    assert e.value.code == code
    assert capsys.readouterr().err == f"error: {exc}\n"


def test_mutable_defaults_are_refused():
    with pytest.raises(TypeError):
        flag_field(["a"], "a list")
