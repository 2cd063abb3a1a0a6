"""What a run shows and keeps besides checkpoints: metrics.jsonl (and TensorBoard / W&B), the
progress bar, the sample answers before and after training, and the closing summary."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from .errors import MinidistillError


class MetricsLog:
    """metrics.jsonl (always), plus TensorBoard or Weights & Biases when asked for."""

    def __init__(self, out: Path, sink: str, cfg, enabled: bool, resume_step: int = 0):
        self.enabled, self.tb, self.wandb, self.note = enabled, None, None, None
        if not enabled:
            return
        if sink == "tensorboard":  # the optional packages first: nothing is touched if one is missing
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise MinidistillError("--log tensorboard needs the tensorboard package: pip install tensorboard") from None
        elif sink == "wandb":
            try:
                import wandb
            except ImportError:
                raise MinidistillError("--log wandb needs the wandb package: pip install wandb") from None
        self.path = Path(out) / "metrics.jsonl"
        if resume_step and self.path.exists():
            self._cut_back(resume_step)
        self.file = open(self.path, "a", encoding="utf-8")
        if sink == "tensorboard":
            self.tb = SummaryWriter(str(Path(out) / "tensorboard"))
        elif sink == "wandb":
            self.wandb = wandb.init(project="minidistill", config=asdict(cfg), dir=str(out))

    def _cut_back(self, step: int) -> None:
        """Drop the rows logged after the checkpoint we resume from (and a half-written last
        line), so the file reads as one uninterrupted run."""
        kept, dropped = [], 0
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                dropped += 1
                continue
            if row.get("step", 0) <= step:
                kept.append(line)
            else:
                dropped += 1
        self.path.write_text("".join(r + "\n" for r in kept), encoding="utf-8")
        if dropped:
            self.note = f"metrics.jsonl: {dropped} row(s) logged after step {step} (or cut short) dropped"

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        scalars = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        if self.tb:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, row["step"])
        if self.wandb:
            self.wandb.log(scalars, step=row["step"])

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb:
                self.tb.close()
            if self.wandb:
                self.wandb.finish()


def progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm  # a dependency of huggingface_hub

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True,
                file=sys.stdout)


def sample_prompts(path: str | None, data, n: int = 3) -> list[str]:
    """Prompts answered before and after training: a file (one per line) or the data's first."""
    if path:
        lines = [l.strip() for l in Path(path).read_text(encoding="utf-8").splitlines() if l.strip()]
        if not lines:
            raise ValueError(f"--sample-prompts {path} holds no prompt")
        return lines
    return data.prompts(n)


@torch.no_grad()
def answer_prompts(model, tok, prompts: list[str], max_new_tokens: int, amp, plain_text: bool = False) -> list[str]:
    """Greedy answers to the sample prompts, decoded together. plain_text: the prompts are raw
    text (a prompt template's prompt part, or --format text) rather than user messages."""
    from .replies import generate_batch
    from .sampling import generate_ids_batch

    was_training = model.training
    model.eval()
    with amp:
        if plain_text:
            ids = [tok.encode(p, add_bos=tok.prepends_bos) for p in prompts]
            out = generate_ids_batch(model, ids, max_new_tokens=max_new_tokens, stop_ids=tok.stop_ids,
                                     batch_size=max(1, len(prompts)))
            answers = [tok.decode(o) for o in out]
        else:
            answers = generate_batch(model, tok, prompts, max_new_tokens=max_new_tokens, batch_size=max(1, len(prompts)))
    model.train(was_training)
    return answers


def shown(text: str) -> str:
    """An answer for display: an untrained model often emits only newlines or spaces."""
    return text if text.strip() else f"(whitespace only: {text[:20]!r}{'…' if len(text) > 20 else ''})"


def write_samples(path: Path, prompts: list[str], before: list[str], after: list[str]) -> None:
    parts = ["# Sample answers, before and after training\n"]
    for i, (p, b, a) in enumerate(zip(prompts, before, after), 1):
        parts.append(f"## {i}. {p}\n\n**Before**\n\n```\n{shown(b)}\n```\n\n**After**\n\n```\n{shown(a)}\n```\n")
    path.write_text("\n".join(parts), encoding="utf-8")


def report_samples(out: Path, prompts: list[str], after: list[str]) -> None:
    """samples.md from the answers before training (samples_before.json, written at the start)
    and `after`; the first pair is printed."""
    from .run_folder import writing

    before_file = out / "samples_before.json"
    before = json.loads(before_file.read_text()) if before_file.exists() else ["(not recorded)"] * len(after)
    with writing("the sample answers", out / "samples.md"):
        write_samples(out / "samples.md", prompts, before, after)
    if prompts:
        print(f"\nsample: {prompts[0]}\n--- before training:\n{shown(before[0])}\n"
              f"--- after training:\n{shown(after[0])}")


def print_summary(summary: dict, out: Path, merged: bool) -> None:
    def fmt(v):
        return "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))

    print(f"\ndone: {summary['steps']} steps in {summary['time_s']} s "
          f"({summary['skipped_steps']} skipped), final loss {fmt(summary['final_loss'])}, "
          f"eval loss final {fmt(summary['final_eval_loss'])} / best {fmt(summary['best_eval_loss'])}")
    print(f"  adapter      {out / 'adapter'}\n  metrics      {out / 'metrics.jsonl'}\n"
          f"  samples      {out / 'samples.md'}\n  checkpoints  {out / 'checkpoints'}")
    if merged:
        print(f"  merged model {out / 'merged'}")
    if summary.get("kd_coverage") is not None:
        print(f"  kd coverage  {100 * summary['kd_coverage']:.1f}% of trained tokens had a teacher target "
              "(the rest trained on CE only)")
    share = summary.get("rollouts_finished")
    if share is not None:
        print(f"  rollouts     {summary['rollouts']:,}, {100 * share:.1f}% ended with a stop token")
        if share < 0.5:
            print(f"warning: only {100 * share:.1f}% of the rollouts finished (the rest hit --rollout-tokens): raise "
                  "--rollout-tokens, or the student is learning not to stop (check its samples)")
