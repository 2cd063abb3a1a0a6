"""One run per output folder: the lock, the refusal to mix runs, --overwrite, disk errors."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from minidistill.errors import MinidistillError
from minidistill.run_folder import RunLock, check_writable, prepare_output, writing


def test_second_lock_on_a_folder_names_the_holder(tmp_path):
    with RunLock(tmp_path) as first:
        assert first.note is None
        with pytest.raises(MinidistillError, match=r"in use by another run \(pid \d+ on "):
            RunLock(tmp_path).acquire()
    again = RunLock(tmp_path).acquire()  # released: free again, and nothing was interrupted
    assert again.note is None
    again.release()


def test_a_dead_runs_lock_is_taken_over_with_a_note(tmp_path):
    (tmp_path / ".lock").write_text("pid 999999 on elsewhere")  # written, but no process holds it
    lock = RunLock(tmp_path).acquire()
    assert "pid 999999 on elsewhere" in lock.note
    lock.release()


def test_fresh_run_into_a_used_folder_refuses_and_overwrite_replaces(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    (tmp_path / "checkpoints" / "step_000001").mkdir(parents=True)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(MinidistillError, match=r"already holds a run \(metrics.jsonl, checkpoints\).*--resume.*--overwrite"):
        prepare_output(tmp_path, resume=False, overwrite=False)
    prepare_output(tmp_path, resume=True, overwrite=False)  # resuming: the checkpoints decide
    prepare_output(tmp_path, resume=False, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # only the run's files went


def test_unwritable_output_is_found_before_anything_loads(tmp_path, monkeypatch):
    def refuse(self, data):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(Path, "write_bytes", refuse)
    with pytest.raises(MinidistillError, match="cannot be written \\(Permission denied\\)"):
        check_writable(tmp_path / "out")


def test_a_failed_write_removes_its_partial_output(tmp_path):
    part = tmp_path / "merged"
    with pytest.raises(MinidistillError, match=r"disk full while writing the merged model .* MiB free"):
        with writing("the merged model", part, cleanup=part):
            part.mkdir()
            (part / "model.safetensors").write_bytes(b"x" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
    assert not part.exists()
    with pytest.raises(OSError, match="other"):  # other errors pass through untouched
        with writing("x", part):
            raise OSError(errno.EIO, "other")
