"""Long reasoning traces, end to end: `python -m minidistill.train` with --max-seq-len 16384 on
packed multi-thousand-token samples, on the CPU, in bounded memory.

The model has SmolLM2-135M's block shape (hidden 576, 9 query / 3 key-value heads of 64,
MLP 1536) with fewer layers and the demo's small tokenizer (random weights); the data are
synthetic arithmetic traces of 1.5k-6k tokens, packed into 16k rows. The command is the real
one (packing, LoRA r 16 on the seven projections, gradient checkpointing, default loss chunking);
the script reports the step time from metrics.jsonl and the peak resident memory of the
training process (getrusage of the child).

    python benchmarks/bench_long_trace.py                  # 16k rows, 4 layers, 3 steps
    python benchmarks/bench_long_trace.py --seq 32768 --layers 2

Prints a table, then one line of JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from minidistill.config import ModelConfig
from minidistill.demo import build_demo_model, make_problem
from minidistill.model import Transformer


def write_model(folder: Path, layers: int, seq: int) -> Path:
    """SmolLM2-135M's block shape with the demo tokenizer and random weights."""
    demo = build_demo_model(folder / "demo-tok", hidden=64, layers=1)
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(demo / name, folder / name)
    config = json.loads((demo / "config.json").read_text())
    config.update(hidden_size=576, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=9,
                  num_key_value_heads=3, max_position_embeddings=max(8192, seq), rope_theta=100000.0)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_hf(config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0, 0.02)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def write_data(path: Path, n: int, seed: int = 0) -> Path:
    """dolphin-r1-style records whose reasoning chains many worked problems: about 1.5k-6k tokens each."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            parts = [make_problem(rng) for _ in range(rng.randint(80, 320))]
            reasoning = "\n".join(p["reasoning"] for p in parts)
            f.write(json.dumps({"messages": [{"role": "user", "content": parts[-1]["messages"][0]["content"]}],
                                "reasoning": reasoning, "answer": parts[-1]["answer"]}) + "\n")
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=16384, help="--max-seq-len (default: %(default)s)")
    p.add_argument("--layers", type=int, default=4, help="blocks (default: %(default)s)")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps (default: %(default)s)")
    p.add_argument("--records", type=int, default=40, help="samples written (default: %(default)s)")
    p.add_argument("--keep", help="work folder to keep (default: a temporary one)")
    args = p.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="long-trace-"))
    model = write_model(work / "model", args.layers, args.seq)
    data = write_data(work / "data.jsonl", args.records)
    out = work / "run"
    cmd = [sys.executable, "-m", "minidistill.train", "--model", str(model), "--data", str(data), "--output", str(out),
           "--max-seq-len", str(args.seq), "--batch-size", "1", "--grad-accum", "1", "--max-steps", str(args.steps),
           "--save-every", "0", "--sample-max-tokens", "1", "--device", "cpu", "--overwrite"]
    env = dict(os.environ, MINIDISTILL_CACHE=str(work / "cache"))
    t0 = time.time()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if r.returncode != 0:
        sys.exit(f"train failed ({r.returncode}):\n{r.stderr[-3000:]}")
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    summary = next(l for l in r.stdout.splitlines() if l.strip().startswith("length p50"))
    step_s = sorted(b["elapsed_s"] - a["elapsed_s"] for a, b in zip(rows, rows[1:])) or [None]
    tok_s = [r_["tokens_per_s"] for r_ in rows]
    print(f"model: SmolLM2-135M block shape, {args.layers} layers; data: {summary.strip()}")
    print(f"{'seq':>6s} {'steps':>5s} {'median step s':>13s} {'input tok/s':>11s} {'peak RSS MiB':>12s} {'wall s':>7s}")
    med = step_s[len(step_s) // 2]
    print(f"{args.seq:6d} {len(rows):5d} {med if med is None else format(med, '13.1f'):>13} "
          f"{sorted(tok_s)[len(tok_s) // 2]:11.0f} {peak_mib:12.0f} {wall:7.1f}")
    print(json.dumps({"bench": "long_trace", "device": "cpu", "seq": args.seq, "layers": args.layers,
                      "steps": len(rows), "median_step_s": med, "tokens_per_s": tok_s, "peak_rss_mib": peak_mib,
                      "losses": [r_["loss"] for r_ in rows], "wall_s": wall, "command": " ".join(cmd[1:])}))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
