"""The runnable examples and the benchmarks' CPU smoke modes keep working."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(args, tmp_path, timeout=300):
    env = dict(os.environ, MINIDISTILL_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_custom_loop_example(tmp_path):
    out = run([str(ROOT / "examples" / "custom_loop.py"), "--steps", "3", "--output", str(tmp_path / "run")], tmp_path)
    losses = [float(l.split()[3]) for l in out.splitlines() if l.startswith("step")]
    assert len(losses) == 2 and all(x > 0 for x in losses)
    cfg = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 32


def test_bench_train_smoke(tmp_path):
    out = run([str(ROOT / "benchmarks" / "bench_train.py"), "--smoke", "--impls", "ours-lora,ours-qlora", "--ckpt", "on",
               "--no-bf16-saved"], tmp_path)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["bench"] == "train" and len(result["rows"]) == 4
    assert all(r["status"] == "ok" and r["tokens_per_s"] > 0 for r in result["rows"])
    # Packed and padded rows hold the same samples: the same loss.
    by = {(r["impl"], r["layout"]): r["loss"] for r in result["rows"]}
    assert abs(by["ours-lora", "padded"] - by["ours-lora", "packed"]) < 1e-4


def test_bench_data_smoke(tmp_path):
    out = run([str(ROOT / "benchmarks" / "bench_data.py"), "--n", "300"], tmp_path)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["bench"] == "data" and result["kept"] == 300
    assert result["cold_samples_per_s"] > 0 and result["warm_samples_per_s"] > 0
