"""The runnable examples keep working: the custom loop, the benchmarks' data smoke mode, and each seed
recipe in examples/*.sh, whose first steps run on the CPU on a tiny model of the recipe's family with
a tiny data file in the recipe's schema (the real runs need the hub and a GPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from model_fixtures import write_family_model

ROOT = Path(__file__).resolve().parent.parent
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def run(args, tmp_path, timeout=300, env=None):
    env = dict(os.environ, MINIDISTILL_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1", **(env or {}))
    r = subprocess.run([*args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_custom_loop_example(tmp_path):
    out = run([sys.executable, str(ROOT / "examples" / "custom_loop.py"), "--steps", "3", "--output",
               str(tmp_path / "run")], tmp_path)
    losses = [float(l.split()[3]) for l in out.splitlines() if l.startswith("step")]
    assert len(losses) == 2 and all(x > 0 for x in losses)
    cfg = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 32


def test_bench_data_smoke(tmp_path):
    out = run([sys.executable, str(ROOT / "benchmarks" / "bench_data.py"), "--n", "300"], tmp_path)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["bench"] == "data" and result["kept"] == 300
    assert result["cold_samples_per_s"] > 0 and result["warm_samples_per_s"] > 0


# ---------------------------------------------------------------------------- the seeds' recipes

def dolphin(k: int) -> dict:  # dolphin-r1 reasoning-deepseek: the prompt turns, the trace, the answer
    return {"messages": [{"role": "user", "content": f"What is {k} + {k}?"}], "reasoning": f"{k} + {k} = {2 * k}.",
            "answer": f"The answer is {2 * k}.", "model": "deepseek-r1"}


def magpie(k: int) -> dict:  # Magpie-Reasoning-150K's fields (the template uses instruction and response)
    return {"uuid": f"u{k}", "instruction": f"What is {k} + {k}?", "response": f"Step by step: {k} + {k} = {2 * k}.",
            "conversations": [{"from": "human", "value": f"What is {k} + {k}?"}], "difficulty": "easy"}


def medical(k: int) -> dict:  # medical-o1-reasoning-SFT (en): a JSON array of these
    return {"Question": f"A patient has symptom {k}. What is the cause?", "Complex_CoT": f"Symptom {k} means cause {k}.",
            "Response": f"The cause is {k}."}


# script, model shape (model_fixtures.CONFIGS), tokenizer family, data file, records, the recipe's settings
RECIPES = {
    "phi4_dolphin_r1.sh": ("phi4", "phi-4", "d.jsonl", dolphin, dict(
        lora=dict(r=8, alpha=32.0, dropout=0.1, targets=["q_proj", "k_proj", "v_proj", "o_proj"]),
        add_tokens=["<think>", "</think>"], data="dolphin-r1")),
    "phi3_mini_magpie.sh": ("phi3-window", "phi-3", "m.jsonl", magpie, dict(
        lora=dict(r=8, alpha=16.0, dropout=0.2), template="phi3_magpie.txt", data="template")),
    "r1_llama8b_medical_o1.sh": ("llama3", "r1-distill-llama", "med.json", medical, dict(
        lora=dict(r=16, alpha=16.0, dropout=0.0, targets=SEVEN), quantize="nf4", lr=2e-4, batch_size=2, grad_accum=4,
        template="medical_o1.txt", data="template")),
    "phi4_mini_reasoning_medical_o1.sh": ("phi4-mini", "phi-4-mini-reasoning", "med.json", medical, dict(
        lora=dict(r=16, alpha=16.0, dropout=0.0, targets=SEVEN), quantize=None, lr=2e-4, batch_size=2, grad_accum=4,
        data="medical-o1")),
}


@pytest.mark.parametrize("script", sorted(RECIPES))
def test_recipe_first_steps_on_cpu(script, tmp_path):
    shape, family, data_name, make, want = RECIPES[script]
    model = write_family_model(tmp_path / "model", shape, family)
    rows = [make(k) for k in range(6)]
    data = tmp_path / data_name
    data.write_text(json.dumps(rows, indent=2) if data_name.endswith(".json")
                    else "".join(json.dumps(r) + "\n" for r in rows))
    out = run(["bash", str(ROOT / "examples" / script), "--device", "cpu", "--sample-max-tokens", "1"], tmp_path,
              env=dict(MODEL=str(model), DATA=str(data), MAX_STEPS="2", OUTPUT=str(tmp_path / "run"),
                       PYTHON=sys.executable))
    run_dir = tmp_path / "run"
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if "loss" in s] == [1, 2] and all(s["loss"] > 0 for s in steps if "loss" in s)
    cfg = json.loads((run_dir / "config.json").read_text())
    for k, v in want["lora"].items():
        assert cfg["lora"][k] == v, (k, cfg["lora"])
    for k in ("quantize", "lr", "batch_size", "grad_accum", "add_tokens"):
        if k in want:
            assert cfg[k] == want[k], (k, cfg[k])
    template = cfg["data_config"]["template"]
    assert (template and Path(template).name) == want.get("template"), template
    assert f"format {want['data']}, 6 records read" in out and "kept 6, dropped 0" in out
    adapter = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"]) == (want["lora"]["r"], want["lora"]["alpha"])
    if "add_tokens" in want:  # two new ids, past the tiny vocabulary, with rows of their own
        from minidistill.tokenizer import Tokenizer

        new = adapter["trainable_token_indices"]["embed_tokens"]
        assert len(new) == 2 and min(new) >= len(Tokenizer.from_dir(model))
