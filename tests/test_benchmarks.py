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
    for part in ("setup", "pytest_gpu", "bench_nf4", "bench_attention", "bench_train_2048", "memory_plan",
                 "bench_train_memory", "bench_train_8192"):
        assert f"[{part}, timeout " in out
    assert "-m gpu" in out and "--find-links" in out and "--seqs 8192" in out
    assert "--full-length --impls ours-qlora,ours-qlora-offload,ours-qlora-offload-hostemb" in out
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


def _bench_module(name):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import importlib
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_memory_plan_counts_what_a_real_quantized_model_owns():
    import torch

    import minidistill as md
    from minidistill.config import ModelConfig
    from minidistill.model import Transformer

    bt, mp = _bench_module("bench_train"), _bench_module("memory_plan")
    shape = bt.shape_config("tiny")
    for quantized in (True, False):
        torch.manual_seed(0)
        model = Transformer(ModelConfig.from_hf(dict(shape, hidden_act="silu"))).to(torch.bfloat16)
        model.requires_grad_(False)
        if quantized:
            bt.quantize_blocks_ours(model)
        md.apply_lora(model, md.LoraConfig(r=16, alpha=16), verbose=False)
        # What the real tensors hold (the rotary tables and the NF4 map all layers share left out).
        tensors = [*model.parameters(), *(b for n, b in model.named_buffers()
                                          if not n.startswith("rotary.") and not n.endswith("nested_code"))]
        held = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())
        lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
        got = mp.plan(shape, quantized, rows=2, seq=128)
        assert got["weights"] + 4 * lora == held  # the LoRA weights are fp32
        assert got["lora_and_adam"] == 12 * lora
        assert got["checkpoints"] == (shape["num_hidden_layers"] - 1) * 2 * 128 * shape["hidden_size"] * 2
        assert got["bound"] == got["weights"] + got["lora_and_adam"] + got["checkpoints"] + got["loss_chunk"]
        emb = model.model.embed_tokens.weight  # untied here: --embedding-on-host moves it off the GPU
        assert got["bound_offload_host"] == got["bound"] - got["checkpoints"] - emb.numel() * emb.element_size()


def test_gpu_targets_are_judged_from_the_rows():
    bt = _bench_module("bench_train")
    base = dict(model="llama-3.1-8b", seq=2048, ckpt=True, full_length=False, tokens=4096)
    rows = [dict(base, impl="ours-lora", layout="packed", tokens_per_s=2100.0, peak_mib=9000.0, mfu=0.45),
            dict(base, impl="hf-peft-lora", layout="packed", tokens_per_s=1000.0, peak_mib=20000.0),
            dict(base, impl="hf-peft-lora", layout="padded", tokens_per_s=1100.0, peak_mib=17000.0),
            dict(base, impl="ours-qlora", layout="packed", tokens_per_s=1800.0, peak_mib=6000.0),
            dict(base, impl="ours-qlora", layout="padded", tokens_per_s=1800.0, peak_mib=6000.0, full_length=True),
            dict(base, impl="ours-qlora-offload", layout="padded", tokens_per_s=1500.0, peak_mib=7000.0,
                 full_length=True)]
    got = {(g["target"], g["where"].split()[3]): (round(g["value"], 3), g["met"]) for g in bt.targets(rows, [], cuda=True)}
    assert got == {
        ("tokens/s ours packed / hf packed >= 2", "packed"): (2.1, True),
        ("peak memory ours packed / hf packed <= 0.5", "packed"): (0.45, True),
        ("tokens/s ours packed / hf padded >= 2", "packed"): (round(2100 / 1100, 3), False),
        ("peak memory ours packed / hf padded <= 0.5", "packed"): (round(9000 / 17000, 3), False),
        ("MFU >= 40%", "packed"): (0.45, True),
        ("QLoRA tokens/s / LoRA tokens/s >= 0.9", "packed"): (round(1800 / 2100, 3), False),
        # only full-length rows decide the memory targets
        ("ours-qlora peak GiB at 2 x 2048 <= 6.5", "padded"): (round(6000 / 1024, 3), True),
        ("ours-qlora-offload peak GiB at 2 x 2048 <= 6.5", "padded"): (round(7000 / 1024, 3), False),
    }
    assert not any("saved" in g["target"] for g in bt.targets(rows, [], cuda=True))  # the CPU's targets: not on CUDA
