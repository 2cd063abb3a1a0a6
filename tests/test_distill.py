"""`python -m minidistill.distill`: the cache-logits command on a tiny demo model, its flags, its errors."""

import json
import os
import subprocess
import sys

import pytest
import torch

import minidistill as md
from minidistill.demo import build_demo_model, write_demo_data
from minidistill.distill import main
from minidistill.kd import topk_targets
from minidistill.samples import DataConfig, prepare_data
from minidistill.teacher_cache import TeacherCache
from minidistill.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    return root, build_demo_model(root / "teacher", hidden=32, layers=1), write_demo_data(root / "data.jsonl", n=12)


def test_cache_logits_writes_the_cache_of_the_prepared_data(setup, tmp_path, monkeypatch, capsys):
    root, teacher, data = setup
    monkeypatch.setenv("MINIDISTILL_CACHE", str(tmp_path / "mdcache"))
    out = tmp_path / "kd-cache"
    main(["cache-logits", "--teacher", str(teacher), "--data", str(data), "--top-k", "4", "--output", str(out),
          "--device", "cpu", "--max-seq-len", "96", "--limit", "7", "--store-dtype", "fp32", "--temperature", "2"])
    printed = capsys.readouterr().out
    meta = json.loads((out / "meta.json").read_text())
    tok = load_tokenizer(teacher)
    prepared = prepare_data(str(data), tok, DataConfig(max_seq_len=96, limit=7), log=lambda *a: None)
    assert meta["num_samples"] == len(prepared.samples) == 7  # --limit, a DataConfig flag, reached the data
    assert meta["top_k"] == 4 and meta["temperature"] == 2.0 and meta["vocab_size"] == len(tok)
    assert f"cached top-4 of {teacher} for 7 samples" in printed and meta["fingerprint"] in printed
    cache = TeacherCache(out)
    cache.check(prepared)  # same samples, same options: accepted
    with pytest.raises(ValueError, match="fingerprint"):
        cache.check(prepare_data(str(data), tok, DataConfig(max_seq_len=96, limit=6), log=lambda *a: None))
    model = md.load_model(teacher, dtype=torch.float32)
    s = prepared.samples[1]
    with torch.no_grad():
        logits = model(torch.tensor([list(s.ids)]))[0][torch.tensor(list(s.labels)) != -100][:, :len(tok)]
    _, lp, tail = topk_targets(logits, 4, temperature=2.0)
    got_ids, got_lp, got_tail = cache.lookup(1)
    # Compared by value: a near tie may order two ids differently when the head runs in chunks.
    torch.testing.assert_close(got_lp, lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_tail, tail, rtol=1e-5, atol=1e-5)
    logq = torch.log_softmax(logits / 2.0, -1)
    torch.testing.assert_close(logq.gather(1, got_ids.long()), got_lp, rtol=1e-5, atol=1e-5)


def test_no_subcommand_lists_the_subcommands(capsys):
    main([])
    out = capsys.readouterr().out
    assert "cache-logits" in out and "usage: python -m minidistill.distill" in out


def test_bad_input_raises_in_main_and_exits_2_from_the_command(setup, tmp_path):
    root, teacher, data = setup
    args = ["cache-logits", "--teacher", str(tmp_path / "nope"), "--data", str(data), "--output", str(tmp_path / "o"),
            "--device", "cpu"]
    with pytest.raises(FileNotFoundError):
        main(args)
    env = dict(os.environ, MINIDISTILL_CACHE=str(tmp_path / "mdcache"))
    env.pop("MINIDISTILL_TRACEBACK", None)
    r = subprocess.run([sys.executable, "-m", "minidistill.distill", *args], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    assert str(tmp_path / "nope") in r.stderr


def test_cache_logits_with_a_student_tokenizer_of_another_family(setup, tmp_path, monkeypatch, capsys):
    """--tokenizer naming a student whose tokenizer differs: the teacher reads its own rendering and the
    cache holds its distributions mapped onto the student's ids, flagged where there is no target."""
    from model_fixtures import write_tiny_model
    from tok_fixtures import write_tokenizer

    root, student, data = setup  # the demo model (ChatML, byte-level BPE) is the student here
    monkeypatch.setenv("MINIDISTILL_CACHE", str(tmp_path / "mdcache"))
    teacher = write_tiny_model(write_tokenizer("llama-3.2", tmp_path / "llama"), hidden=32)
    out = tmp_path / "mapped"
    main(["cache-logits", "--teacher", str(teacher), "--tokenizer", str(student), "--data", str(data), "--top-k",
          "4", "--output", str(out), "--device", "cpu", "--max-seq-len", "96", "--limit", "5"])
    printed = capsys.readouterr().out
    meta = json.loads((out / "meta.json").read_text())
    tok = load_tokenizer(student)
    prepared = prepare_data(str(data), tok, DataConfig(max_seq_len=96, limit=5), log=lambda *a: None)
    cache = TeacherCache(out)
    cache.check(prepared)  # made on the student's samples: `train --teacher-cache` reads it as it is
    assert meta["vocab_size"] == len(tok) and 0.2 < meta["mapped"]["coverage"] < 1.0
    assert "cross-tokenizer KD: 5 samples, 0 not found" in printed and "mapped onto the student's vocabulary" in printed
    ids, _, _ = cache.lookup(0)
    cov = cache.covered(0)
    assert 0 < int(cov.sum()) < len(cov) and int(ids.max()) < len(tok)
