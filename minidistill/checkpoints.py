"""Run checkpoints: what `--resume` needs to continue a run exactly where it stopped.

`checkpoints/step_NNNNNN/` holds the adapter (PEFT layout, usable on its own), the trainable
tensors (safetensors), the optimizer state and `state.pt`: the loop state (`LoopState`, saved
whole, with the fingerprint of the data it was trained on), the RNG states and the gradient
scaler. A checkpoint is written under a temporary name and renamed, so a crash never leaves
half of one; `manifest.json` (each file's size and sha256) is written last and marks a
complete checkpoint. `--resume` verifies the newest against its manifest and falls back past
a damaged one, naming it; older checkpoints are pruned only once a new one is verified.
Everything loads with `weights_only=True`.

(The model's own weights, read by `loader.load_model`, are not called checkpoints here.)
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .distributed import full_optimizer_state, full_params, load_full_optimizer_state
from .errors import MinidistillError
from .run_folder import writing

_STEP_DIR = re.compile(r"^step_(\d{6})$")


@dataclass
class LoopState:
    """What the training loop carries from step to step; a checkpoint saves and loads it whole."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0  # data position: the epoch, and the micro-batches of it already used
    index: int = 0
    skipped_steps: int = 0  # non-finite steps skipped in all
    bad_in_row: int = 0  # ... and in a row (five stop the run)
    best_eval_loss: float | None = None
    last_eval_loss: float | None = None
    data: dict | None = None  # what the run trains on: {"fingerprint", "records", "format", "steps_per_epoch"}
    on_policy_batches: int = 0  # --on-policy: rollout micro-batches taken (the position in the prompts)
    rollouts: int = 0  # ... rollouts sampled, on all processes, and those that ended with a stop token
    rollouts_finished: int = 0
    kd_covered: int = 0  # with a teacher: trained tokens (of this process) that had a KD target, of kd_trained
    kd_trained: int = 0


def checkpoint_dirs(out: str | Path) -> list[Path]:
    """Checkpoints that finished writing (a manifest inside), oldest first; not yet verified."""
    root = Path(out) / "checkpoints"
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / "manifest.json").exists()]
    return sorted(dirs, key=lambda p: p.name)


def latest_checkpoint(out: str | Path) -> Path | None:
    dirs = checkpoint_dirs(out)
    return dirs[-1] if dirs else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_manifest(folder: Path) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    entries = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    (folder / "manifest.json").write_text(json.dumps({"files": entries}, indent=1))


def verify_checkpoint(path: Path) -> str | None:
    """None when every file of the manifest is there with its size and hash; else what is wrong."""
    try:
        entries = json.loads((path / "manifest.json").read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"manifest.json is unreadable ({e})"
    for name, want in entries.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != want["bytes"]:
            return f"{name} is truncated or altered ({f.stat().st_size} bytes, manifest says {want['bytes']})"
        if _sha256(f) != want["sha256"]:
            return f"{name} is damaged (its sha256 differs from the manifest)"
    return None


def checkpoint_to_resume(out: str | Path, resume: bool, log=print) -> Path | None:
    """The checkpoint `--resume` continues from: the newest one that verifies (a damaged one is
    named and skipped). None for a fresh run, which must not find checkpoints."""
    dirs = checkpoint_dirs(out)
    if not resume:
        if dirs:
            raise MinidistillError(f"{out} already holds checkpoints of an earlier run (newest: {dirs[-1].name}); "
                                   "add --resume to continue it, --overwrite to replace it, or choose another --output")
        return None
    for path in reversed(dirs):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        log(f"note: checkpoint {path} is damaged ({problem}); skipped, trying the one before")
    raise MinidistillError(f"--resume: no complete checkpoint under {Path(out) / 'checkpoints'}"
                           f"{' that verifies' if dirs else ''}; start without --resume (or --overwrite)")


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


def save_checkpoint(out: str | Path, state: LoopState, model, opt, *, scaler=None, keep_last: int = 2,
                    main: bool = True, fsdp: bool = False) -> Path:
    """Write checkpoints/step_NNNNNN atomically and prune to the newest `keep_last`. With FSDP
    every rank calls it (gathering is collective) and the main rank writes."""
    from .adapter import save_adapter

    root = Path(out) / "checkpoints"
    final = root / f"step_{state.step:06d}"
    tmp = root / f".{final.name}.tmp"
    with writing("checkpoint", final, cleanup=tmp if main else None):
        if main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        with full_params(model, fsdp):
            if main:
                save_adapter(model, tmp / "adapter")
                save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        opt_state = full_optimizer_state(model, opt) if fsdp else opt.state_dict()
        if not main:
            return final
        torch.save(opt_state, tmp / "optimizer.pt")
        torch.save({"loop": asdict(state), "rng": _rng_state(), "scaler": scaler.state_dict() if scaler else None,
                    "fsdp": fsdp}, tmp / "state.pt")
        _write_manifest(tmp)  # last: its presence marks a complete checkpoint
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    problem = verify_checkpoint(final)
    if problem is not None:  # keep the older ones: they may be all that is left
        raise MinidistillError(f"checkpoint {final} did not verify after writing ({problem}); the disk may be "
                               "failing. Earlier checkpoints were kept")
    for old in checkpoint_dirs(out)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old)
    return final


def read_loop_state(path: Path) -> LoopState:
    """The loop state of a checkpoint alone (cheap: for checks before the model loads)."""
    state = torch.load(path / "state.pt", weights_only=True)
    if "loop" not in state:
        raise MinidistillError(f"{path} was written by an older minidistill; start a new run (--overwrite)")
    names = {f.name for f in fields(LoopState)}
    return LoopState(**{k: v for k, v in state["loop"].items() if k in names})


def check_same_data(saved: dict | None, now: dict, allowed: bool, log) -> None:
    """--resume continues the same run: the same prepared samples cut into the same batches,
    unless --allow-data-change."""
    if saved is None:
        return
    if saved.get("fingerprint") == now["fingerprint"]:
        if saved.get("steps_per_epoch", now["steps_per_epoch"]) == now["steps_per_epoch"]:
            return
        # Same samples, other batches (--batch-size, --max-seq-len, --grad-accum, packing, or
        # another version's packing): the saved position would not continue the epoch it was in.
        what = f"the same samples make {now['steps_per_epoch']} steps per epoch, {saved['steps_per_epoch']} when saved"
        if not allowed:
            raise MinidistillError(f"--resume: the batches differ from the run's ({what}); resume with the same "
                                   "batch flags, or pass --allow-data-change to go on from the saved position "
                                   "in the new batches (some samples of this epoch then seen twice or not at all)")
        log(f"note: --allow-data-change: training goes on with other batches ({what})")
        return
    what = [f"{k} {saved.get(k)!r} -> {now[k]!r}" for k in ("records", "format", "steps_per_epoch")
            if saved.get(k) != now[k]] or ["the samples' tokens (same counts)"]
    if not allowed:
        raise MinidistillError(f"--resume: the data differs from the run's ({'; '.join(what)}); resume with the "
                               "same --data and data flags, or pass --allow-data-change to go on with the new data")
    log(f"note: --allow-data-change: training goes on with other data ({'; '.join(what)})")


def load_checkpoint(path: Path, model, opt, *, scaler=None, fsdp: bool = False) -> LoopState:
    """Restore the trainable weights, optimizer, scaler and RNG of a checkpoint into a run set up
    the same way (model wrapped or sharded, optimizer built); returns its loop state."""
    state = torch.load(path / "state.pt", weights_only=True)
    if bool(state.get("fsdp")) != fsdp:
        raise MinidistillError(f"{path} was written {'with' if state.get('fsdp') else 'without'} --fsdp; "
                               "resume the same way")
    loop = read_loop_state(path)
    tensors = load_file(str(path / "trainable.safetensors"))
    wanted = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(tensors) != wanted:
        raise MinidistillError(f"{path} was written for other trainable weights (LoRA settings differ?): "
                               f"missing {sorted(wanted - set(tensors))[:5]}, extra {sorted(set(tensors) - wanted)[:5]}")
    opt_state = torch.load(path / "optimizer.pt", weights_only=True)
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        # Every rank passes the whole tensors; each keeps its own shard of them.
        set_model_state_dict(model, tensors, options=StateDictOptions(full_state_dict=True, strict=False))
        load_full_optimizer_state(model, opt, opt_state)
    else:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n, t in tensors.items():
                params[n].copy_(t)
        opt.load_state_dict(opt_state)
    if scaler and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    _set_rng_state(state["rng"])
    return loop
