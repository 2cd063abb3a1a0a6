"""The output folder of a training run belongs to one run at a time.

- A lock (`.lock`: an flock held for the whole run, with the holder's pid and host written in
  it) stops a second run into the same folder at once, naming the holder. The lock dies with
  its process, so the lock of a killed run is taken over (with a note).
- A fresh run into a folder that already holds a run refuses, and says to pass `--resume` or
  `--overwrite`, so metrics of two runs are never mixed.
- The folder is checked for writing before anything slow (loading a model) happens.
- `writing(...)`: a write that fails for want of disk space or permission becomes one error
  line saying where and how much, after removing what it left half-written.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path

from .errors import MinidistillError

# What a run writes into its folder (all of it removed by --overwrite; nothing else is touched).
RUN_FILES = ("config.json", "metrics.jsonl", "samples.md", "samples_before.json", "adapter", "checkpoints",
             "merged", "tensorboard")


def holds_a_run(out: Path) -> list[str]:
    """The names of earlier run outputs in `out`."""
    return [n for n in RUN_FILES if (out / n).exists()]


def check_writable(out: Path) -> None:
    """Create `out` if needed and prove it can be written, before the model loads."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise MinidistillError(f"--output {out} cannot be written ({e.strerror or e}); choose a folder you can "
                               "write to, or fix its permissions") from None


def prepare_output(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse a fresh run into a folder holding another run's outputs (unless --overwrite, which
    removes them); resuming needs no check here (the checkpoints decide). The folder exists
    and is writable (`check_writable`, called first by the trainer, before it takes the lock)."""
    found = holds_a_run(out)
    if resume or not found:
        return
    if not overwrite:
        raise MinidistillError(f"{out} already holds a run ({', '.join(found)}); add --resume to continue it, "
                               "--overwrite to replace it, or choose another --output")
    for name in found:
        p = out / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()


class RunLock:
    """An exclusive lock on a run folder for the life of the run (see the module docstring)."""

    def __init__(self, out: Path):
        self.path = Path(out) / ".lock"
        self.file = None
        self.note: str | None = None  # set when a dead run's lock was taken over

    def acquire(self) -> "RunLock":
        f = open(self.path, "a+", encoding="utf-8")
        f.seek(0)
        previous = f.read().strip()
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise MinidistillError(f"{self.path.parent} is in use by another run ({previous or 'holder unknown'}); "
                                   "wait for it to finish, or choose another --output") from None
        if previous:
            self.note = f"note: took over the lock of an earlier run that is no longer running ({previous})"
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}")
        f.flush()
        self.file = f
        return self

    def release(self) -> None:
        if self.file is not None:
            self.file.seek(0)
            self.file.truncate()  # an empty lock file: nothing was interrupted
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
            self.file = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


@contextmanager
def writing(what: str, path: Path, *, cleanup: Path | None = None):
    """Turn a failed write of `what` into one error line; remove `cleanup` (the partial output)
    first. A full disk says how much had been written and where."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        written = _size(cleanup) if cleanup is not None else 0
        if cleanup is not None and cleanup.exists():
            shutil.rmtree(cleanup, ignore_errors=True) if cleanup.is_dir() else cleanup.unlink(missing_ok=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            free = shutil.disk_usage(path.parent if not path.exists() else path).free
            raise MinidistillError(f"disk full while writing {what} to {path} ({written / 2**20:.1f} MiB written, "
                                   f"{free / 2**20:.1f} MiB free); free some space and run again"
                                   f"{' with --resume' if what.startswith('checkpoint') else ''}; nothing earlier "
                                   "was removed") from None
        raise MinidistillError(f"cannot write {what} to {path} ({e.strerror}); fix the permissions or choose "
                               "another --output") from None
