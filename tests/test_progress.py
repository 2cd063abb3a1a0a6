"""The progress display of long generation work, on a fake clock: the plain line without tqdm
(counts, tokens/s, ETA, at most every `every_s`), and the tqdm bar when it is installed."""

import sys
from types import SimpleNamespace

import pytest

from minidistill import progress as progress_mod
from minidistill.progress import Progress


@pytest.fixture
def clock(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(progress_mod, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    return now


def test_plain_line_without_tqdm_every_s_and_at_the_end(monkeypatch, capsys, clock):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # `from tqdm import tqdm` now fails
    p = Progress(4, "traces", unit="sample", every_s=10)
    assert p.bar is None
    clock[0] = 105.0
    p.update(done=1, tokens=50)
    assert capsys.readouterr().err == ""  # 5 s in: not yet
    clock[0] = 112.0
    p.update(done=1, tokens=70)  # 120 tokens in 12 s; 2 done in 12 s, so 12 s for the other 2
    assert capsys.readouterr().err == "traces: 2/4 samples, 10.0 tok/s, ETA 12 s\n"
    clock[0] = 113.0
    p.update(tokens=10)
    assert capsys.readouterr().err == ""  # 1 s after the last line, and nothing finished
    p.update(done=2)  # the last one: shown at once
    assert capsys.readouterr().err == "traces: 4/4 samples, 10.0 tok/s, ETA 0 s\n"
    p.close()
    assert capsys.readouterr().err == ""


def test_tqdm_bar_counts_and_shows_the_rate(clock, capsys):
    pytest.importorskip("tqdm")
    p = Progress(3, "eval")
    assert p.bar is not None and p.bar.total == 3 and p.bar.desc == "eval"
    clock[0] = 101.0
    p.update(done=2, tokens=40)
    assert p.bar.n == 2 and p.bar.postfix == "40.0 tok/s"  # 0.5 s or more since the last postfix
    clock[0] = 101.2
    p.update(tokens=8)
    assert p.bar.postfix == "40.0 tok/s"  # at most twice a second
    clock[0] = 102.0
    p.update(done=1, tokens=12)
    p.close()
    assert p.bar.n == 3 and p.bar.postfix == "30.0 tok/s" and p.done == 3 and p.tokens == 60
    capsys.readouterr()
