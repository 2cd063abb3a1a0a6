"""How fast does `prepare_data` turn dolphin-r1 style records into samples, cold and from the cache?

Generates N synthetic dolphin-r1 records (prompt messages + reasoning + answer, lengths varied),
then times prepare_data with an empty cache (read, convert, tokenize, verify, write cache) and
again with the cache warm. Tokenizer: a tiny realistic one from tests/tok_fixtures (default), or
a real checkpoint folder with --tokenizer. Prints a table, then one line of JSON.

    python benchmarks/bench_data.py --n 20000 [--tokenizer /path/to/Phi-4-mini] [--workers 0]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from minidistill.samples import DataConfig, prepare_data  # noqa: E402
from minidistill.tokenizer import Tokenizer  # noqa: E402

WORDS = ("the so we then check that value first next sum root step add multiply answer is "
         "x y equals because therefore let consider case hence 2 3 4 5 12 42").split()


def write_records(path: Path, n: int, seed: int = 0) -> int:
    """n dolphin-r1 records, reasoning 50-600 words, answer 10-80 words; returns the file size."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            words = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
            msgs = [{"role": "user", "content": f"Problem {i}: " + words(rng.randint(10, 60))}]
            if rng.random() < 0.3:
                msgs.insert(0, {"role": "system", "content": "You are a careful reasoner."})
            rec = {"messages": msgs, "reasoning": words(rng.randint(50, 600)),
                   "answer": words(rng.randint(10, 80)), "model": "deepseek-r1"}
            f.write(json.dumps(rec) + "\n")
    return path.stat().st_size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=20000, help="synthetic records to generate")
    p.add_argument("--tokenizer", default=None, help="checkpoint folder with tokenizer.json (default: a test fixture)")
    p.add_argument("--family", default="phi-4-mini", help="tests/tok_fixtures family when --tokenizer is not given")
    p.add_argument("--workers", type=int, default=0, help="DataConfig.num_workers (0 = auto)")
    p.add_argument("--max-seq-len", type=int, default=4096, help="DataConfig.max_seq_len")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.tokenizer:
            folder, name = Path(args.tokenizer), args.tokenizer
        else:
            from tok_fixtures import write_tokenizer

            folder, name = write_tokenizer(args.family, tmp / "tok"), f"fixture:{args.family}"
        tok = Tokenizer.from_dir(folder)
        data_path = tmp / "dolphin.jsonl"
        size = write_records(data_path, args.n)
        cfg = DataConfig(max_seq_len=args.max_seq_len, num_workers=args.workers, cache_dir=str(tmp / "cache"))
        rows = []
        for phase in ("cold", "warm"):
            t0 = time.perf_counter()
            data = prepare_data(str(data_path), tok, cfg, log=lambda *a: None)
            dt = time.perf_counter() - t0
            rows.append({"phase": phase, "seconds": round(dt, 3), "samples_per_s": round(len(data.samples) / dt, 1),
                         "tokens_per_s": round(data.summary.total_tokens / dt)})
        s = data.summary
    cpus = os.cpu_count() or 1
    workers = args.workers or (min(cpus - 1, 8) if cpus >= 4 else 1)  # DataConfig's auto rule
    print(f"prepare_data: {args.n:,} dolphin-r1 records ({size / 2**20:.1f} MiB), tokenizer {name}, "
          f"workers {workers}, cpus {os.cpu_count()}")
    print(f"kept {s.kept:,}, tokens {s.total_tokens:,}, length p50 {s.length_p50} max {s.length_max}")
    print(f"{'phase':<6} {'seconds':>9} {'samples/s':>11} {'tokens/s':>12}")
    for r in rows:
        print(f"{r['phase']:<6} {r['seconds']:>9.2f} {r['samples_per_s']:>11,.0f} {r['tokens_per_s']:>12,}")
    print(json.dumps({"bench": "data", "n": args.n, "tokenizer": name, "workers": workers, "cpus": os.cpu_count(),
                      "mib": round(size / 2**20, 1), "kept": s.kept, "tokens": s.total_tokens,
                      "cold_s": rows[0]["seconds"], "cold_samples_per_s": rows[0]["samples_per_s"],
                      "warm_s": rows[1]["seconds"], "warm_samples_per_s": rows[1]["samples_per_s"]}))


if __name__ == "__main__":
    main()
