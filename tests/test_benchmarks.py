"""bench_train.py's smoke mode measures what it says, and gpu.sh is a runnable script."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(args, cwd, timeout=120):
    env = dict(os.environ, MINIDISTILL_CACHE=str(cwd / "cache"), OMP_NUM_THREADS="1")
    r = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_bench_train_smoke_rows_agree_with_transformers(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    md = tmp_path / "train.md"
    out = run([sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--smoke", "--threads", "1",
               "--train-cmd", "--markdown", str(md)], tmp_path)
    result = json.loads(out.strip().splitlines()[-1])
    rows = result["rows"]
    assert result["bench"] == "train" and len(rows) == 3 * 2 * 2  # impls x layouts x checkpointing
    assert all(r["status"] == "ok" and r["tokens_per_s"] > 0 and r["peak_mib"] > 0 for r in rows)
    by = {(r["impl"], r["layout"], r["ckpt"]): r for r in rows}
    for layout in ("padded", "packed"):
        for ckpt in (False, True):
            ours, hf = by["ours-lora", layout, ckpt], by["hf-peft-lora", layout, ckpt]
            # Same weights, same tokens, B = 0: both compute the base model's CE.
            assert ours["loss"] == pytest.approx(hf["loss"], abs=1e-4)
            assert ours["syncs_per_step"] == 0
            # bf16 autocast: our LoRA saves no cast copies of its inputs, peft's does.
            assert ours["bf16_saved_b_per_tok_block"] <= hf["bf16_saved_b_per_tok_block"]
    # Packed and padded rows hold the same samples: the same loss.
    assert by["ours-lora", "packed", False]["loss"] == pytest.approx(by["ours-lora", "padded", False]["loss"], abs=1e-4)
    # With checkpointing a block keeps only its input: hidden 64 x 4 bytes (fp32), 2 bytes in bf16.
    assert by["ours-lora", "padded", True]["saved_b_per_tok_block"] == 64 * 4
    assert by["ours-lora", "padded", True]["bf16_saved_b_per_tok_block"] == 64 * 2
    assert by["ours-lora", "padded", False]["saved_b_per_tok_block"] > 10 * 64 * 4
    # The train command ran and was compared.
    train = {t["impl"]: t for t in result["train_command"]}
    assert train["minidistill train"]["tokens_per_s"] > 0 and train["hf-peft-lora"]["tokens_per_s"] > 0
    assert {g["target"] for g in result["targets"]} >= {"QLoRA step / LoRA step <= 2",
                                                         "train command tokens/s / hf-peft loop >= 1.5"}
    text = md.read_text()
    assert text.count("\n| tiny | 64 |") == len(rows) and "| minidistill train |" in text


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_script_dry_run_lists_every_part(tmp_path):
    script = ROOT / "benchmarks" / "gpu.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    out = run(["bash", str(script), "--dry-run", "--wheels", str(tmp_path / "wheels"), "--out", str(tmp_path / "o")],
              tmp_path, timeout=30)
    for part in ("setup", "pytest_gpu", "bench_nf4", "bench_attention", "bench_train_2048", "bench_train_8192"):
        assert f"[{part}, timeout " in out
    assert "-m gpu" in out and "--find-links" in out and "--seqs 8192" in out
    assert not (tmp_path / "o").exists()  # a dry run writes nothing


def test_cross_tokenizer_kd_quick_mode_trains_both_rows(tmp_path):
    out = run([sys.executable, str(ROOT / "benchmarks" / "cross_tokenizer_kd.py"), "--quick", "--work",
               str(tmp_path / "w")], tmp_path, timeout=300)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["benchmark"] == "cross_tokenizer_kd" and result["quick"] is True
    by = {r["method"]: r for r in result["rows"]}
    assert set(by) == {"sft", "sft+xkd"} and by["sft"]["kd_coverage"] is None
    assert 0 < by["sft+xkd"]["kd_coverage"] <= 1  # the two tokenizers differ, yet positions align
    assert all(0 <= r["exact_match"] <= 1 for r in by.values())
