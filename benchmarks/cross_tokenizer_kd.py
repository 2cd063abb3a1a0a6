"""Cross-tokenizer logit distillation against SFT alone, at the same steps, on the CPU.

Two different real-format tokenizers, both trained here on the bundled arithmetic corpus (the
real SmolLM2 tokenizer is not available offline, so the student's is *SmolLM2-style*, built the
way SmolLM2's tokenizer.json is laid out, not SmolLM2's own vocabulary):
  teacher: the demo model's own byte-level BPE (GPT-2 pre-tokenizer: a number and its leading
           space can be one token, " 12"), plain ChatML, `<think>` / `</think>` atomic added
           tokens; the demo architecture (hidden 128, 4 layers), SFT on the traces
           (`--teacher-steps`), then merged;
  student: a SmolLM2-style byte-level BPE (digits split one by one, SmolLM2's ChatML template
           with its default system prompt, no `<think>` token: the tags are characters), a
           smaller random Llama-layout model (hidden 96, 2 layers) built with the demo's recipe.
From the same student start, with LoRA and the same data, steps and seed:
  (a) SFT: cross-entropy on the traces;
  (b) SFT + cross-tokenizer KD: `--teacher` the merged teacher, loss (1 - w) CE + w KL on the
      mapped support at aligned positions (minidistill.xkd), `--kd-weight` w;
  (c) with --uld, as (b) plus the ULD term at positions without a mapped target (`kd_loss="uld"`).
Score: exact match of the final answer on held-out problems, greedy, averaged over `--seeds`
(the student's LoRA init and data order). The run prints the share of trained tokens with a KD
target (kd_coverage). There is no transformers / TRL counterpart to compare with in the same run:
TRL's distillation trainers refuse teacher and student vocabularies that differ.

    python benchmarks/cross_tokenizer_kd.py            # the full run (several minutes on 2 cores)
    python benchmarks/cross_tokenizer_kd.py --quick    # a smoke run in seconds (numbers mean nothing)

Prints a table, then one line of JSON.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import time
from pathlib import Path

import torch

import minidistill as md
from minidistill.answers import score_answer, think_stats
from minidistill.chat import SMOLLM2_SYSTEM
from minidistill.demo import DEMO_DATA, build_demo_model, make_records, write_demo_checkpoint, write_demo_data

LORA = md.LoraConfig(r=32, alpha=32, targets="all-linear")
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    + SMOLLM2_SYSTEM + "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def build_student(folder: Path, hidden: int, layers: int, seed: int = 0) -> Path:
    """A SmolLM2-style tokenizer (Digits(individual) then ByteLevel, ChatML with SmolLM2's system
    prompt) trained on the arithmetic corpus, and a random model with the demo's init recipe."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if (folder / "model.safetensors").exists():
        return folder
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    texts = [SMOLLM2_SYSTEM]
    for r in make_records(2000, seed=seed + 11):
        texts += [r["messages"][0]["content"], r["reasoning"], r["answer"], "user assistant system"]
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=448, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return write_demo_checkpoint(folder, tok, {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                                               "pad_token": "<|im_end|>", "chat_template": SMOLLM2_TEMPLATE},
                                 hidden=hidden, layers=layers, seed=seed)


def config(model: Path, data: Path, out: Path, work: Path, steps: int, lr: float, limit: int | None = None,
           seed: int = 0, **distill) -> md.TrainConfig:
    kd_loss = distill.pop("kd_loss", "forward")
    cfg = md.TrainConfig(model=str(model), data=str(data), output=str(out), max_steps=steps, batch_size=8,
                         grad_accum=1, lr=lr, min_lr=lr / 10, warmup_steps=min(10, steps // 5),
                         grad_checkpointing=False, save_every=0, sample_max_tokens=8, device="cpu", overwrite=True,
                         seed=seed, lora=LORA, data_config=md.DataConfig(max_seq_len=160, limit=limit,
                                                                   cache_dir=str(work / "cache")),
                         distill=md.train_config.DistillConfig(**distill))
    cfg.distill.kd_loss = kd_loss  # "uld": set past the CLI choices (see minidistill/xkd.py)
    return cfg


def train_run(cfg: md.TrainConfig, coverage: list | None = None) -> tuple[float, dict]:
    """md.train, timed; `coverage` collects each KD call's KDOutput.coverage."""
    import minidistill.trainer as trainer_mod

    real = trainer_mod.make_kd

    def recording(*a, **k):
        kd = real(*a, **k)
        if kd is None or coverage is None:
            return kd

        def wrapped(*b):
            out = kd(*b)
            coverage.append(out.coverage)
            return out
        return wrapped
    trainer_mod.make_kd = recording
    try:
        t0 = time.time()
        summary = md.train(cfg)
        return time.time() - t0, summary
    finally:
        trainer_mod.make_kd = real


def accuracy(model_dir: Path, adapter: Path | None, problems: list[dict], max_new_tokens: int) -> float:
    """Share of problems whose greedy answer (after </think>) ends with the right number."""
    model = md.load_model(str(model_dir), dtype=torch.float32, device="cpu")
    if adapter is not None:
        md.load_adapter(model, adapter, verbose=False)
    model.eval()
    tok = md.load_tokenizer(str(model_dir))
    replies = md.generate_batch(model, tok, [p["messages"] for p in problems], max_new_tokens=max_new_tokens,
                                batch_size=64)
    refs = [re.findall(r"-?\d+", p["answer"])[-1] for p in problems]
    return sum(score_answer(think_stats(r).answer, ref) for r, ref in zip(replies, refs)) / len(problems)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, seconds")
    p.add_argument("--work", default="runs/cross-tokenizer-kd", help="work folder (the teacher run is reused)")
    p.add_argument("--teacher-steps", type=int, default=500)
    p.add_argument("--steps", type=int, default=300, help="student steps, every method")
    p.add_argument("--kd-weight", type=float, default=0.5)
    p.add_argument("--kd-temperature", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval", type=int, default=400, help="held-out problems")
    p.add_argument("--seeds", default="0,1,2", help="student seeds (LoRA init, data order), comma-separated")
    p.add_argument("--uld", action="store_true", help="also a run with the ULD term (it adds nothing where every "
                                                      "position has a mapped target, as in this pair)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared 2-core machine two threads ran a step ~9x slower)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    limit = None
    if args.quick:
        args.teacher_steps, args.steps, args.eval, limit, args.seeds = 6, 4, 8, 64, "0"
    torch.manual_seed(0)
    work = Path(args.work) / ("quick" if args.quick else "full")
    work.mkdir(parents=True, exist_ok=True)
    data = DEMO_DATA if DEMO_DATA.exists() else write_demo_data(work / "arithmetic.jsonl")
    held = make_records(args.eval, seed=424242)
    new_tokens = 72

    t_base = build_demo_model(work / "teacher-base", hidden=128, layers=4)
    t_out = work / "teacher-run"
    t_time = 0.0
    if not (t_out / "merged" / "model.safetensors").exists():
        cfg = config(t_base, data, t_out, work, args.teacher_steps, args.lr, limit)
        cfg.merge = True
        t_time, _ = train_run(cfg)
    teacher = t_out / "merged"
    shutil.copy(t_base / "generation_config.json", teacher / "generation_config.json")
    s_base = build_student(work / "student-base", hidden=96, layers=2)

    rows, coverage = [], {}
    kd = dict(teacher=str(teacher), kd_weight=args.kd_weight, kd_temperature=args.kd_temperature)
    methods = [("sft", {}), ("sft+xkd", kd)]
    if args.uld:
        methods.append(("sft+xkd+uld", dict(kd, kd_loss="uld")))
    seeds = [int(x) for x in args.seeds.split(",")]
    for name, distill in methods:
        cov: list[float] = []
        secs, scores = 0.0, []
        for seed in seeds:
            run = work / f"student-{name}-seed{seed}"
            t, _ = train_run(config(s_base, data, run, work, args.steps, args.lr, limit, seed, **distill), cov)
            secs += t
            scores.append(accuracy(s_base, run / "adapter", held, new_tokens))
        coverage[name] = sum(cov) / len(cov) if cov else None
        rows.append({"method": name, "steps": args.steps, "time_s": round(secs / len(seeds), 1),
                     "kd_coverage": None if not cov else round(coverage[name], 4),
                     "exact_match": sum(scores) / len(scores), "per_seed": scores})
    teacher_acc = accuracy(teacher, None, held, new_tokens)

    print(f"teacher: demo BPE + ChatML, hidden 128 x 4 layers, SFT {args.teacher_steps} steps "
          f"({t_time:.0f} s; 0 = reused), held-out exact match {teacher_acc:.3f}")
    print(f"student: SmolLM2-style BPE + SmolLM2 ChatML, hidden 96 x 2 layers, LoRA r 32; "
          f"{args.eval} held-out problems")
    print(f"{'method':<14}{'steps':>6}{'time s':>9}{'kd_coverage':>13}{'exact match':>13}  per seed {seeds}")
    for r in rows:
        cov = "-" if r["kd_coverage"] is None else f"{r['kd_coverage']:.3f}"
        per = ", ".join(f"{x:.3f}" for x in r["per_seed"])
        print(f"{r['method']:<14}{r['steps']:>6}{r['time_s']:>9.1f}{cov:>13}{r['exact_match']:>13.3f}  {per}")
    print(json.dumps({"benchmark": "cross_tokenizer_kd", "quick": args.quick, "teacher_steps": args.teacher_steps,
                      "teacher_exact_match": teacher_acc, "eval_problems": args.eval, "kd_weight": args.kd_weight,
                      "kd_temperature": args.kd_temperature, "steps": args.steps, "seeds": seeds,
                      "threads": args.threads, "rows": rows, "machine": "2-core CPU container (shared, noisy)"}))


if __name__ == "__main__":
    main()
