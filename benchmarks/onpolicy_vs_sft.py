"""On-policy distillation against SFT on teacher traces, at equal student compute, on the CPU.

Teacher: the demo model (a tiny random Llama-layout model) after SFT on the bundled arithmetic
traces (`--teacher-steps`, the demo's 500 by default). Student start: the same run's checkpoint
at `--start-steps` (the demo model at fewer steps: same tokenizer, weaker). From that start:
  (a) SFT on teacher traces: the teacher's greedy replies to the training prompts, trained with
      cross-entropy; (a') the same on the verified traces only (the replies whose answer is
      right: a check on-policy distillation does not get);
  (b) on-policy distillation: the student samples replies to the same prompts, the teacher
      scores every sampled token, loss = per-token reverse KL (exact, full vocabulary).
Both stop once they have run the same number of student forward+backward tokens (the packed
batches' input tokens; the rollouts' own sampling is forward-only and reported apart).
Score: exact match of the final answer on held-out problems, greedy. "gain_points" in the JSON is
(b) - (a), the comparison of the issue (both see only the teacher); "gain_points_vs_verified" is
(b) - (a').

    python benchmarks/onpolicy_vs_sft.py            # the full run (a few minutes on 2 cores)
    python benchmarks/onpolicy_vs_sft.py --quick    # a smoke run in seconds (numbers mean nothing)

Knobs for a sweep (the defaults are the best of one sweep at the 120k budget): --start-steps
(any multiple of 50 of the teacher run), --samples-per-prompt (a step then samples
--batch // it prompts, so rollouts per step stay --batch), --temperature, --estimator
(full / sampled), --lr-sft / --lr-on-policy, --lr-schedule (both arms), --arms (run a subset).

Prints a table, then one line of JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import torch

import minidistill as md
from minidistill.answers import score_answer, think_stats
from minidistill.demo import build_demo_model, make_records, write_demo_data
from minidistill.onpolicy import on_policy_kd_loss
from minidistill.rollout import rollout, rollout_batch

LORA = md.LoraConfig(r=32, alpha=32, targets="all-linear")


def train_teacher(work: Path, model_dir: Path, data: Path, steps: int, start: int) -> tuple[Path, Path]:
    """SFT the demo model with the trainer (as the demo does); returns the adapters at `start`
    steps (the student's starting point) and at the end (the teacher)."""
    out = work / "teacher-run"
    if not (out / "adapter" / "adapter_model.safetensors").exists():
        cfg = md.TrainConfig(model=str(model_dir), data=str(data), output=str(out), max_steps=steps, batch_size=8,
                             grad_accum=1, lr=3e-3, min_lr=3e-4, warmup_steps=min(10, steps // 5),
                             grad_checkpointing=False, save_every=50 if start % 50 == 0 else start, keep_last=1000,
                             sample_max_tokens=8, device="cpu", overwrite=True, lora=LORA,
                             data_config=md.DataConfig(max_seq_len=128, cache_dir=str(work / "cache")))
        md.train(cfg)
    begin = out / "checkpoints" / f"step_{start:06d}" / "adapter"
    if not begin.exists():
        raise FileNotFoundError(f"no checkpoint at step {start} in {out} (it saves every 50 steps, or at --start-steps "
                                f"when that is no multiple of 50): choose another --start-steps or a new --work")
    return begin, out / "adapter"


def load(model_dir: Path, adapter: Path, *, frozen: bool) -> md.Transformer:
    model = md.load_model(str(model_dir), dtype=torch.float32, device="cpu")
    md.load_adapter(model, adapter, verbose=False)
    if frozen:
        md.merge_lora(model)
        model.requires_grad_(False).eval()
    return model


def accuracy(model, tok, problems: list[dict], max_new_tokens: int) -> float:
    """Share of problems whose greedy answer (after </think>) ends with the right number."""
    replies = md.generate_batch(model, tok, [p["messages"] for p in problems], max_new_tokens=max_new_tokens,
                                batch_size=64)
    refs = [p["answer"].rsplit(" ", 1)[-1].rstrip(".") for p in problems]
    return sum(score_answer(think_stats(r).answer, ref) for r, ref in zip(replies, refs)) / len(problems)


def teacher_traces(teacher, tok, prompts: list[dict], max_new_tokens: int, work: Path) -> int:
    """The teacher's greedy replies to the training prompts as SFT records: all of them
    (traces.jsonl), and those whose answer is right (verified.jsonl; all of them when none is,
    as with --quick's barely trained teacher). Returns the verified count."""
    replies = md.generate_batch(teacher, tok, [p["messages"] for p in prompts], max_new_tokens=max_new_tokens,
                                batch_size=64)
    right = [score_answer(think_stats(r).answer, p["answer"].rsplit(" ", 1)[-1].rstrip("."))
             for p, r in zip(prompts, replies)]
    for name, keep in (("traces.jsonl", [True] * len(right)), ("verified.jsonl", right if any(right) else None)):
        with open(work / name, "w", encoding="utf-8") as f:
            for p, r, ok in zip(prompts, replies, keep or [True] * len(right)):
                if ok:
                    f.write(json.dumps({"messages": p["messages"] + [{"role": "assistant", "content": r}]}) + "\n")
    return sum(right)


def set_lr(opt, lr: float, schedule: str, used: int, budget: int) -> None:
    """Constant, or linear decay to 0 by the share of the token budget spent (the arms take
    different step counts for the same budget, so the schedule follows tokens, not steps)."""
    for g in opt.param_groups:
        g["lr"] = lr if schedule == "constant" else lr * max(0.0, 1 - used / budget)


def run_sft(model, tok, traces: Path, work: Path, budget: int, lr: float, batch: int,
            schedule: str = "constant", seed: int = 0) -> dict:
    data = md.prepare_data(str(traces), tok, md.DataConfig(max_seq_len=128, cache_dir=str(work / "cache")),
                           log=lambda *a: None)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    used, steps, epoch, t0 = 0, 0, 0, time.time()
    model.train()
    while used < budget:
        for b in md.make_batches(data, batch, 128, seed=seed, epoch=epoch):
            hidden = model(**b.model_inputs("cpu"), return_hidden=True)
            out = md.chunked_cross_entropy(hidden, model.head_weight, b.labels, positions=b.label_index)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            set_lr(opt, lr, schedule, used, budget)
            opt.step()
            opt.zero_grad(set_to_none=True)
            used, steps = used + b.num_input_tokens, steps + 1
            if used >= budget:
                break
        epoch += 1
    return {"tokens": used, "steps": steps, "time_s": time.time() - t0, "sample_tokens": 0}


def run_on_policy(model, teacher, tok, prompts: list[dict], budget: int, lr: float, batch: int,
                  max_new_tokens: int, temperature: float, samples_per_prompt: int = 1,
                  schedule: str = "constant", estimator: str = "full", seed: int = 0) -> dict:
    """Per step: batch // samples_per_prompt prompts, each sampled samples_per_prompt times (so
    about `batch` rollouts a step whatever the split, as SFT's `batch` rows)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    used, steps, sampled, t0, kls, finished = 0, 0, 0, time.time(), [], []
    n_prompts = max(1, batch // samples_per_prompt)
    if seed:  # another prompt order and other samples, as SFT's seed reorders its traces
        prompts = random.Random(seed).sample(prompts, len(prompts))
    while used < budget:
        chunk = [prompts[(steps * n_prompts + j) % len(prompts)]["messages"] for j in range(n_prompts)]
        n = n_prompts * samples_per_prompt
        r = rollout(model, tok, chunk, max_new_tokens=max_new_tokens, temperature=temperature,
                    samples_per_prompt=samples_per_prompt,
                    seed=[seed * 1_000_003 + steps * n + j for j in range(n)])
        b = rollout_batch(r, pad_id=tok.pad_id or 0)
        model.train()
        hidden = model(**b.model_inputs("cpu"), return_hidden=True)
        with torch.no_grad():
            t_hidden = teacher(**b.model_inputs("cpu"), return_hidden=True)
        out = on_policy_kd_loss(hidden, model.head_weight, t_hidden, teacher.head_weight, b.labels,
                                positions=b.label_index, estimator=estimator)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        set_lr(opt, lr, schedule, used, budget)
        opt.step()
        opt.zero_grad(set_to_none=True)
        used, steps, sampled = used + b.num_input_tokens, steps + 1, sampled + sum(r.lengths)
        kls.append(float(out.reverse_kl_sum) / max(out.num_tokens, 1))
        finished.append(sum(r.finished) / len(r))
    k = max(1, len(kls) // 10)
    return {"tokens": used, "steps": steps, "time_s": time.time() - t0, "sample_tokens": sampled,
            "reverse_kl_first": sum(kls[:k]) / k, "reverse_kl_last": sum(kls[-k:]) / k,
            "finished_last": sum(finished[-k:]) / k}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, seconds")
    p.add_argument("--work", default="runs/onpolicy-vs-sft", help="work folder (the teacher run is reused)")
    p.add_argument("--teacher-steps", type=int, default=500)
    p.add_argument("--start-steps", type=int, default=200,
                   help="the student's starting point in the teacher run (a multiple of 50)")
    p.add_argument("--budget", type=int, default=120_000, help="student forward+backward tokens per method")
    # Both from one sweep at the defaults (120k, start 200, 400 held-out): SFT 1e-4..3e-3, on-policy 3e-4..3e-3.
    # A fresh AdamW on a trained adapter wants a much smaller lr than the teacher run's 3e-3.
    p.add_argument("--lr-sft", type=float, default=3e-4, help="AdamW, constant (the best of the sweep above)")
    p.add_argument("--lr-on-policy", type=float, default=5e-4, help="AdamW, constant (the best of the sweep above)")
    p.add_argument("--batch", type=int, default=8, help="packed rows (SFT) / prompts (on-policy) per step")
    p.add_argument("--rollout-tokens", type=int, default=80)
    p.add_argument("--temperature", type=float, default=1.0, help="rollout sampling temperature")
    p.add_argument("--samples-per-prompt", type=int, default=1,
                   help="rollouts per prompt; a step samples --batch // this many prompts")
    p.add_argument("--lr-schedule", default="constant", choices=["constant", "linear"],
                   help="both arms: constant, or linear decay to 0 over the token budget")
    p.add_argument("--estimator", default="full", choices=["full", "sampled"],
                   help="on-policy reverse KL: exact over the vocabulary, or the sampled-token estimator")
    p.add_argument("--seed", type=int, default=0, help="SFT's trace order; on-policy's prompt order and samples")
    p.add_argument("--arms", default="sft,verified,on-policy",
                   help="comma list of the arms to run (sft, verified, on-policy)")
    p.add_argument("--eval", type=int, default=400, help="held-out problems")
    p.add_argument("--prompts", type=int, default=1000, help="training prompts (traces and rollouts)")
    args = p.parse_args()
    arms = set(args.arms.split(","))
    if arms - {"sft", "verified", "on-policy"}:
        p.error(f"--arms takes a comma list of sft, verified, on-policy; got {args.arms!r}")
    if args.quick:
        args.teacher_steps, args.start_steps, args.budget, args.eval, args.prompts = 30, 10, 3000, 8, 32
        args.rollout_tokens = 24
    torch.manual_seed(0)
    work = Path(args.work) / ("quick" if args.quick else "full")
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MINIDISTILL_CACHE", str(work / "cache"))
    model_dir = build_demo_model(work / "model", hidden=64 if args.quick else 128, layers=2 if args.quick else 4)
    data = write_demo_data(work / "arithmetic.jsonl", n=400 if args.quick else 2000, seed=0)
    train_q = {json.loads(line)["messages"][0]["content"] for line in data.read_text().splitlines()}
    held_out = [r for r in make_records(4 * args.eval, seed=12345) if r["messages"][0]["content"] not in train_q]
    held_out = held_out[:args.eval]
    prompts = [json.loads(line) for line in data.read_text().splitlines()][:args.prompts]

    t0 = time.time()
    start_adapter, teacher_adapter = train_teacher(work, model_dir, data, args.teacher_steps, args.start_steps)
    teacher_s = time.time() - t0
    tok = md.load_tokenizer(str(model_dir))
    teacher = load(model_dir, teacher_adapter, frozen=True)
    start = load(model_dir, start_adapter, frozen=False)
    rows = [("teacher", accuracy(teacher, tok, held_out, args.rollout_tokens), {}),
            ("student start", accuracy(start, tok, held_out, args.rollout_tokens), {})]
    kept = teacher_traces(teacher, tok, prompts, args.rollout_tokens, work)
    for arm, name, traces in (("sft", "(a) SFT, all teacher traces", "traces.jsonl"),
                              ("verified", "(a') SFT, verified traces", "verified.jsonl")):
        if arm not in arms:
            continue
        torch.manual_seed(1)
        sft = load(model_dir, start_adapter, frozen=False)
        info = run_sft(sft, tok, work / traces, work, args.budget, args.lr_sft, args.batch, args.lr_schedule,
                       args.seed)
        rows.append((name, accuracy(sft, tok, held_out, args.rollout_tokens), info))
    if "on-policy" in arms:
        torch.manual_seed(1)
        onp = load(model_dir, start_adapter, frozen=False)
        info = run_on_policy(onp, teacher, tok, prompts, args.budget, args.lr_on_policy, args.batch,
                             args.rollout_tokens, args.temperature, args.samples_per_prompt, args.lr_schedule,
                             args.estimator, args.seed)
        rows.append(("(b) on-policy distillation", accuracy(onp, tok, held_out, args.rollout_tokens), info))

    print(f"\nheld-out exact match, {len(held_out)} problems; teacher SFT {args.teacher_steps} steps "
          f"({teacher_s:.0f} s{', reused' if teacher_s < 5 else ''}), student start = step {args.start_steps}; "
          f"{kept}/{len(prompts)} teacher traces verified; lr SFT {args.lr_sft:g}, on-policy {args.lr_on_policy:g}; "
          f"lr {args.lr_schedule}; seed {args.seed}; {args.estimator} reverse KL; rollouts: "
          f"{args.samples_per_prompt} per prompt, T {args.temperature:g}, {args.rollout_tokens} tokens")
    print(f"{'model':28s} {'exact match':>11s} {'fwd+bwd tokens':>15s} {'steps':>6s} {'sampled tokens':>15s} "
          f"{'time s':>7s}")
    for name, acc, i in rows:
        print(f"{name:28s} {100 * acc:10.1f}% {i.get('tokens', 0):15,d} {i.get('steps', 0):6d} "
              f"{i.get('sample_tokens', 0):15,d} {i.get('time_s', 0):7.1f}")
    acc = {name[:4].strip(): a for name, a, _ in rows}  # "(a)", "(a')", "(b)"
    if "(b)" in acc:
        o = rows[-1][2]
        print(f"on-policy reverse KL {o['reverse_kl_first']:.4f} -> {o['reverse_kl_last']:.4f}; "
              f"rollouts finished (last tenth) {100 * o['finished_last']:.0f}%")
    gain = {key: round(100 * (acc["(b)"] - acc[ref]), 1) if "(b)" in acc and ref in acc else None
            for key, ref in (("gain_points", "(a)"), ("gain_points_vs_verified", "(a')"))}
    result = {"bench": "onpolicy_vs_sft", "quick": args.quick, "held_out": len(held_out),
              "machine": "2-core CPU container (shared, noisy)", "budget_tokens": args.budget,
              "lr_sft": args.lr_sft, "lr_on_policy": args.lr_on_policy, "rollout_temperature": args.temperature,
              "samples_per_prompt": args.samples_per_prompt, "lr_schedule": args.lr_schedule,
              "estimator": args.estimator, "seed": args.seed, "rollout_tokens": args.rollout_tokens,
              "batch": args.batch,
              "teacher_steps": args.teacher_steps, "start_steps": args.start_steps, "verified_traces": kept,
              "rows": [{"model": n, "exact_match": round(a, 4), **{k: (round(v, 4) if isinstance(v, float) else v)
                                                                    for k, v in i.items()}} for n, a, i in rows],
              **gain}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
