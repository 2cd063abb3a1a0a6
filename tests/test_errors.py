"""The error classes: the exit code each carries to the command line, and what a caller catches."""

import pytest

import minidistill as md
from minidistill.cli import run
from minidistill.errors import MinidistillError, TrainingInterrupted


def test_exit_codes_and_hierarchy():
    assert MinidistillError.exit_code == 2 and TrainingInterrupted.exit_code == 130  # 130: 128 + SIGINT
    assert issubclass(TrainingInterrupted, MinidistillError) and issubclass(MinidistillError, Exception)
    # Not SystemExit (nor KeyboardInterrupt): `except Exception` around train() in a notebook catches both.
    assert not issubclass(MinidistillError, (SystemExit, KeyboardInterrupt))
    assert md.MinidistillError is MinidistillError and md.TrainingInterrupted is TrainingInterrupted


def test_message_and_code_travel_with_the_instance():
    msg = "stopped at step 4; checkpoint runs/x/checkpoints/step_000004 saved, continue with --resume"
    with pytest.raises(MinidistillError) as caught:  # the base class catches the interruption too
        raise TrainingInterrupted(msg)
    assert type(caught.value) is TrainingInterrupted
    assert str(caught.value) == msg and caught.value.exit_code == 130


def test_a_subclass_brings_its_own_exit_code_to_the_command_line(capsys, monkeypatch):
    monkeypatch.delenv("MINIDISTILL_TRACEBACK", raising=False)

    class DiskFull(MinidistillError):
        exit_code = 28

    def main():
        raise DiskFull("disk full while writing checkpoint")

    with pytest.raises(SystemExit) as e:
        run(main)
    assert e.value.code == 28 and capsys.readouterr().err == "error: disk full while writing checkpoint\n"
