"""On-policy distillation in your own loop: the student samples, the teacher scores every token.

Offline on the demo model (the teacher: the demo model with the adapter of `python -m
minidistill.train`, if you give it; without one the student's LoRA starts perturbed, so that
the two differ):
    python examples/on_policy_loop.py --steps 20 [--teacher-adapter runs/demo/adapter]
or with real models of one tokenizer:
    python examples/on_policy_loop.py --model qwen2.5-0.5b --teacher Qwen/Qwen2.5-7B-Instruct --data prompts.jsonl --device cuda
"""

import argparse
import json
from pathlib import Path

import torch

import minidistill as md

DEMO_DATA = Path(__file__).resolve().parent / "data" / "arithmetic.jsonl"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo", help="student: preset, repo id or folder (default: %(default)s)")
    p.add_argument("--teacher", default="demo", help="teacher, same tokenizer (default: %(default)s)")
    p.add_argument("--teacher-adapter", help="a LoRA adapter folded into the teacher (e.g. runs/demo/adapter)")
    p.add_argument("--data", default=str(DEMO_DATA), help="JSONL records with `messages` (default: %(default)s)")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps (default: %(default)s)")
    p.add_argument("--rollout-tokens", type=int, default=48, help="new tokens per rollout (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="default: %(default)s")
    p.add_argument("--output", default="runs/on-policy-loop", help="adapter folder parent (default: %(default)s)")
    args = p.parse_args()
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32

    tok = md.load_tokenizer(args.model)
    teacher = md.load_model(args.teacher, dtype=dtype, device=args.device)
    if args.teacher_adapter:
        md.load_adapter(teacher, args.teacher_adapter)
        md.merge_lora(teacher)
    teacher.requires_grad_(False).eval()
    student = md.load_model(args.model, dtype=dtype, device=args.device)
    md.apply_lora(student, md.LoraConfig(r=16, alpha=16, targets="all-linear"))
    if not args.teacher_adapter and args.teacher == args.model:  # same weights: the KL would start at 0
        with torch.no_grad():
            for name, w in student.named_parameters():
                if name.endswith("lora_B.weight"):
                    w.normal_(0, 0.2)
    opt = torch.optim.AdamW([w for w in student.parameters() if w.requires_grad], lr=1e-3)
    prompts = [json.loads(line)["messages"][:1] for line in open(args.data, encoding="utf-8")][:256]

    for step in range(args.steps):
        chunk = [prompts[(4 * step + j) % len(prompts)] for j in range(4)]
        rollouts = md.rollout(student, tok, chunk, max_new_tokens=args.rollout_tokens, temperature=1.0, seed=4 * step)
        batch = md.rollout_batch(rollouts, pad_id=tok.pad_id or 0)  # labels: the sampled tokens only
        inputs = batch.model_inputs(args.device)
        hidden = student(**inputs, return_hidden=True)
        with torch.no_grad():
            t_hidden = teacher(**inputs, return_hidden=True)
        out = md.on_policy_kd_loss(hidden, student.head_weight, t_hidden, teacher.head_weight,
                                   batch.labels.to(args.device), positions=batch.label_index.to(args.device))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        print(f"step {step:3d}  reverse KL {out.reverse_kl_sum.item() / out.num_tokens:.4f}  "
              f"finished {sum(rollouts.finished)}/{len(rollouts)}")
    md.save_adapter(student, Path(args.output) / "adapter")


if __name__ == "__main__":
    main()
