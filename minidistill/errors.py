"""The one error class of minidistill, for problems that are neither a bad value (ValueError)
nor a missing file (FileNotFoundError): a run that cannot go on, with a message that says what
to do. The command-line layer (`cli.run`) prints the message and exits with `exit_code`."""

from __future__ import annotations


class MinidistillError(Exception):
    """A run stopped for a reason the user can act on; the message says how."""

    exit_code = 2


class TrainingInterrupted(MinidistillError):
    """Ctrl-C: the run saved a checkpoint at a step boundary and stopped (resume with --resume)."""

    exit_code = 130
