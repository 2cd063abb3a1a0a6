"""What a training run keeps besides the model: checkpoints, metrics, samples, processes.

A checkpoint folder `checkpoints/step_NNNNNN/` holds the adapter (PEFT layout), the
trainable tensors (safetensors), the optimizer state and `state.pt` (step, data position,
RNG states, counters). It is written under a temporary name and renamed, so a crash never
leaves half a checkpoint; `state.pt` is loaded with `weights_only=True`.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

_STEP_DIR = re.compile(r"^step_(\d{6})$")


# ---- processes ---------------------------------------------------------------------------
def init_distributed() -> tuple[int, int]:
    """(rank, world size); under torchrun, joins the process group (NCCL on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size()


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class CtrlC:
    """Turns the first Ctrl-C into a request that the loop honours at the next step boundary
    (save, then exit); a second Ctrl-C stops at once. Only the main thread can take signals."""

    def __init__(self):
        self.requested, self._old = False, None

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: finishing this step, then saving a checkpoint (Ctrl-C again to stop at once)",
              file=sys.stderr)

    def __enter__(self) -> "CtrlC":
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


# ---- checkpoints -------------------------------------------------------------------------
def checkpoint_dirs(out: Path) -> list[Path]:
    """Complete checkpoints (a state.pt inside), oldest first."""
    root = Path(out) / "checkpoints"
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / "state.pt").exists()]
    return sorted(dirs, key=lambda p: p.name)


def latest_checkpoint(out: Path) -> Path | None:
    dirs = checkpoint_dirs(out)
    return dirs[-1] if dirs else None


def checkpoint_to_resume(out: Path, resume: bool) -> Path | None:
    latest = latest_checkpoint(out)
    if resume and latest is None:
        raise SystemExit(f"--resume: no complete checkpoint under {Path(out) / 'checkpoints'}; "
                         "start without --resume")
    if not resume and latest is not None:
        raise SystemExit(f"{out} already holds checkpoints of an earlier run (newest: {latest.name}); "
                         "add --resume to continue it, or choose another --output")
    return latest if resume else None


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(),
            "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:])}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    random.setstate(s["python"])
    n = s["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


@contextmanager
def full_params(model, fsdp: bool):
    """Inside, every parameter is whole on every rank (FSDP blocks all-gathered; a collective,
    so all ranks enter). Without FSDP it does nothing."""
    blocks = list(model.model.layers) if fsdp else []
    for b in blocks:
        b.unshard()
    try:
        yield
    finally:
        for b in blocks:
            b.reshard()


def _full_optimizer_state(model, opt):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_checkpoint(out: Path, step: int, model, opt, stream, scaler, counters: dict, keep_last: int, *,
                    main: bool = True, fsdp: bool = False) -> Path:
    """Write checkpoints/step_NNNNNN atomically and prune to the newest keep_last. With FSDP all
    ranks call it (gathering is collective) and the main rank writes."""
    from .lora import save_adapter

    root = Path(out) / "checkpoints"
    final = root / f"step_{step:06d}"
    tmp = root / f".{final.name}.tmp"
    if main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    with full_params(model, fsdp):
        if main:
            save_adapter(model, tmp / "adapter")
            save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
    # FSDP: the full state keyed by parameter name, so any number of ranks can load it back.
    opt_state = _full_optimizer_state(model, opt) if fsdp else opt.state_dict()
    if not main:
        return final
    torch.save(opt_state, tmp / "optimizer.pt")
    state = {"step": step, "epoch": stream.epoch, "index": stream.index, "counters": counters,
             "rng": _rng_state(), "scaler": scaler.state_dict() if scaler else None, "fsdp": fsdp}
    torch.save(state, tmp / "state.pt")  # written last: its presence marks a complete checkpoint
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in checkpoint_dirs(out)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old)
    return final


def load_trainable(path: Path, model) -> None:
    """Restore the trainable weights (before the model is sharded or wrapped)."""
    tensors = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    wanted = {n for n, p in params.items() if p.requires_grad}
    if set(tensors) != wanted:
        raise SystemExit(f"{path} was written for other trainable weights (LoRA settings differ?): "
                         f"missing {sorted(wanted - set(tensors))[:5]}, extra {sorted(set(tensors) - wanted)[:5]}")
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t)


def load_training_state(path: Path, model, opt, stream, scaler, fsdp: bool = False) -> tuple[int, dict]:
    """Restore optimizer, data position, scaler and RNG; return (step, counters)."""
    state = torch.load(path / "state.pt", weights_only=True)
    if bool(state.get("fsdp")) != fsdp:
        raise SystemExit(f"{path} was written {'with' if state.get('fsdp') else 'without'} --fsdp; resume the "
                         "same way")
    opt_state = torch.load(path / "optimizer.pt", weights_only=True)
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, opt, opt_state, options=StateDictOptions(full_state_dict=True))
    else:
        opt.load_state_dict(opt_state)
    stream.epoch, stream.index, stream._list = state["epoch"], state["index"], None
    if scaler and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    _set_rng_state(state["rng"])
    return state["step"], state["counters"]


# ---- metrics and progress ----------------------------------------------------------------
class MetricsLog:
    """metrics.jsonl (always), plus TensorBoard or Weights & Biases when asked for."""

    def __init__(self, out: Path, sink: str, cfg, enabled: bool, resume_step: int = 0):
        self.enabled, self.tb, self.wandb = enabled, None, None
        if not enabled:
            return
        self.path = Path(out) / "metrics.jsonl"
        if resume_step and self.path.exists():  # drop rows logged after the checkpoint we resume from
            rows = [r for r in self.path.read_text().splitlines() if json.loads(r)["step"] <= resume_step]
            self.path.write_text("".join(r + "\n" for r in rows))
        self.file = open(self.path, "a", encoding="utf-8")
        if sink == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise SystemExit("--log tensorboard needs the tensorboard package: pip install tensorboard") from None
            self.tb = SummaryWriter(str(Path(out) / "tensorboard"))
        elif sink == "wandb":
            try:
                import wandb
            except ImportError:
                raise SystemExit("--log wandb needs the wandb package: pip install wandb") from None
            self.wandb = wandb.init(project="minidistill", config=asdict(cfg), dir=str(out))

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


# ---- sample answers ----------------------------------------------------------------------
def sample_prompts(path: str | None, data, n: int = 3) -> list[str]:
    """Prompts answered before and after training: a file (one per line) or the data's first."""
    if path:
        lines = [l.strip() for l in Path(path).read_text(encoding="utf-8").splitlines() if l.strip()]
        if not lines:
            raise SystemExit(f"--sample-prompts {path} holds no prompt")
        return lines
    return data.prompts(n)


@torch.no_grad()
def answer_prompts(model, tok, prompts: list[str], max_new_tokens: int, amp) -> list[str]:
    from .generate import generate

    was_training = model.training
    model.eval()
    with amp:
        answers = [generate(model, tok, p, max_new_tokens=max_new_tokens) for p in prompts]
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
