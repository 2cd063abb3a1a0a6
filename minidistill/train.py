"""`python -m minidistill.train`: LoRA / QLoRA supervised fine-tuning on reasoning traces.

The CLI is the TrainConfig: every field is a --flag. `train(cfg)` reads top to bottom:
data -> model -> LoRA -> optimizer -> (resume) -> loop [lr, micro-steps, clip, step, log,
eval, save] -> adapter, samples, merge. With no arguments it runs the offline demo.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

from . import runstate
from .batches import make_batches
from .cli import add_config_flags, flag_field
from .data import DataConfig, prepare_data, split_eval
from .loss import chunked_cross_entropy

SEVEN = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


@dataclass
class TrainConfig:
    model: str | None = flag_field(None, "preset name, hub repo id or local folder (none: the offline demo)")
    data: str | None = flag_field(None, "JSONL/JSON/Parquet file, folder, or hub dataset org/name[:config]")
    format: str = flag_field("auto", "data schema", choices=["auto", "messages", "sharegpt", "dolphin-r1", "medical-o1", "magpie", "alpaca"])
    output: str = flag_field("runs/minidistill", "output folder (adapter, metrics, checkpoints, samples)")
    max_steps: int = flag_field(0, "optimizer steps; 0 = as many as --epochs take")
    epochs: float = flag_field(1.0, "passes over the data when --max-steps is 0")
    batch_size: int = flag_field(2, "rows per micro-batch (per process)")
    grad_accum: int = flag_field(4, "micro-batches per optimizer step")
    max_seq_len: int = flag_field(2048, "tokens per sample / packed row")
    packing: bool = flag_field(True, "pack samples into full rows (document-masked attention)")
    lr: float = flag_field(2e-4, "peak learning rate")
    min_lr: float = flag_field(0.0, "learning rate at the end of the schedule")
    warmup_steps: int = flag_field(5, "linear warm-up steps")
    schedule: str = flag_field("cosine", "decay after warm-up", choices=["cosine", "linear", "constant"])
    weight_decay: float = flag_field(0.0, "AdamW weight decay")
    max_grad_norm: float = flag_field(1.0, "gradient clipping norm (0 = off)")
    lora_r: int = flag_field(16, "LoRA rank")
    lora_alpha: float = flag_field(16.0, "LoRA alpha (scale = alpha / r)")
    lora_dropout: float = flag_field(0.0, "dropout on the LoRA input")
    lora_targets: str = flag_field(SEVEN, "comma-separated module names, or all-linear")
    use_rslora: bool = flag_field(False, "rank-stabilised LoRA: scale = alpha / sqrt(r)")
    quantize: str | None = flag_field(None, "4-bit base weights (QLoRA)", choices=[None, "nf4"])
    dtype: str = flag_field("auto", "compute dtype; auto = bf16 (fp16 if unsupported) on GPU, fp32 on CPU", choices=["auto", "bf16", "fp16", "fp32"])
    device: str = flag_field("auto", "cuda, cuda:N, cpu; auto = cuda when available")
    grad_checkpointing: bool = flag_field(True, "recompute each block in backward to save memory")
    fsdp: bool = flag_field(False, "under torchrun: shard the blocks across processes (FSDP2) instead of replicating (DDP)")
    system_prompt: str | None = flag_field(None, "system message added to samples that have none")
    think_weight: float = flag_field(1.0, "loss weight of tokens in <think>...</think>")
    answer_weight: float = flag_field(1.0, "loss weight of the answer tokens")
    last_turn_only: bool = flag_field(False, "train on the last assistant turn only")
    strip_history_reasoning: bool = flag_field(False, "drop <think>...</think> from earlier assistant turns")
    limit: int | None = flag_field(None, "read at most this many records of --data")
    on_truncation: str = flag_field("drop", "sample whose answer or </think> is cut by --max-seq-len", choices=["drop", "truncate", "error"])
    on_bad_record: str = flag_field("skip", "malformed records", choices=["skip", "error"])
    eval_data: str | None = flag_field(None, "evaluation data (same forms as --data)")
    eval_split: float = flag_field(0.0, "fraction of --data held out for evaluation (instead of --eval-data)")
    eval_every: int = flag_field(0, "evaluate every N steps (0 = only at the end)")
    save_every: int = flag_field(100, "write a resumable checkpoint every N steps (0 = only at the end)")
    keep_last: int = flag_field(2, "checkpoints kept (older ones are deleted)")
    resume: bool = flag_field(False, "continue from the newest complete checkpoint in --output")
    seed: int = flag_field(0, "seed for data order, LoRA init and dropout")
    sample_prompts: str | None = flag_field(None, "text file, one prompt per line, answered before and after training")
    sample_max_tokens: int = flag_field(256, "new tokens per sample answer")
    teacher: str | None = flag_field(None, "online logit distillation from this model (same tokenizer as --model)")
    teacher_quantize: str | None = flag_field(None, "load the teacher in 4-bit", choices=[None, "nf4"])
    teacher_cache: str | None = flag_field(None, "offline distillation from a top-k logit cache (python -m minidistill.distill cache-logits)")
    kd_weight: float = flag_field(0.5, "loss = (1 - w) * CE + w * KD, with a teacher or teacher cache")
    kd_temperature: float = flag_field(1.0, "softmax temperature of the KD term (loss scaled by T^2)")
    kd_loss: str = flag_field("forward", "divergence: forward KL(teacher||student), reverse KL, or JSD", choices=["forward", "reverse", "jsd"])
    merge: bool = flag_field(False, "also write merged/ (HF layout, LoRA folded in)")
    log: str = flag_field("jsonl", "metrics sink besides metrics.jsonl", choices=["jsonl", "tensorboard", "wandb"])
    log_every: int = flag_field(1, "steps between metric rows")


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    p = argparse.ArgumentParser(prog="python -m minidistill.train", allow_abbrev=False,
                                description="LoRA/QLoRA fine-tuning on reasoning traces. No arguments: the offline demo.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_flags(p, TrainConfig)
    args = p.parse_args(argv)
    cfg = TrainConfig(**vars(args))
    problems = check_config(cfg)
    if problems:
        p.error("; ".join(problems))
    return cfg


def check_config(cfg: TrainConfig) -> list[str]:
    """Inconsistent combinations, each with what to do instead."""
    out = []
    if (cfg.model is None) != (cfg.data is None):
        out.append("give both --model and --data (or neither, for the offline demo)")
    if cfg.eval_data and cfg.eval_split:
        out.append("use either --eval-data or --eval-split, not both")
    if not 0 <= cfg.eval_split < 1:
        out.append(f"--eval-split must be in [0, 1), got {cfg.eval_split}")
    if cfg.eval_every and not (cfg.eval_data or cfg.eval_split):
        out.append("--eval-every needs --eval-data or --eval-split")
    for name in ("batch_size", "grad_accum", "max_seq_len", "lora_r", "log_every"):
        if getattr(cfg, name) < 1:
            out.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.max_steps < 0 or cfg.epochs <= 0:
        out.append("--max-steps must be >= 0 and --epochs > 0")
    if cfg.teacher and cfg.teacher_cache:
        out.append("use either --teacher (online) or --teacher-cache (offline), not both")
    if not 0 <= cfg.kd_weight <= 1:
        out.append(f"--kd-weight must be in [0, 1], got {cfg.kd_weight}")
    if cfg.teacher_cache and cfg.kd_loss != "forward":
        out.append("--teacher-cache holds the teacher's top-k only, which supports --kd-loss forward")
    if cfg.teacher_cache and cfg.eval_split:
        out.append("--teacher-cache was made from the whole --data: hold out with --eval-data, not --eval-split")
    if cfg.fsdp and (cfg.quantize or cfg.merge):
        out.append("--fsdp works with 16-bit LoRA: drop --quantize/--merge (merge afterwards with md.merge_lora)")
    if cfg.min_lr > cfg.lr:
        out.append(f"--min-lr {cfg.min_lr} is above --lr {cfg.lr}")
    return out


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up to lr, then cosine / linear decay to min_lr (or constant)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant" or total <= cfg.warmup_steps:
        return cfg.lr
    t = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps - 1)
    decay = 0.5 * (1 + math.cos(math.pi * t)) if cfg.schedule == "cosine" else 1 - t
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * decay


def resolve_precision(cfg: TrainConfig) -> tuple[torch.device, torch.dtype, bool]:
    """(device, compute dtype, needs a gradient scaler)."""
    name = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if cfg.dtype == "auto":
        if device.type != "cuda":
            return device, torch.float32, False
        return (device, torch.bfloat16, False) if torch.cuda.is_bf16_supported() else (device, torch.float16, True)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[cfg.dtype]
    return device, dtype, dtype == torch.float16


class Batches:
    """The endless stream of micro-batches for this rank; its position is (epoch, index)."""

    def __init__(self, data, cfg: TrainConfig, rank: int, world: int, pad_id: int):
        self.data, self.cfg, self.rank, self.world, self.pad_id = data, cfg, rank, world, pad_id
        self.epoch, self.index, self._list = 0, 0, None

    def epoch_batches(self, epoch: int) -> list:
        c = self.cfg
        return make_batches(self.data, c.batch_size, c.max_seq_len, packing=c.packing, shuffle=True, seed=c.seed,
                            epoch=epoch, rank=self.rank, world_size=self.world, pad_id=self.pad_id)

    def next(self):
        if self._list is None:
            self._list = self.epoch_batches(self.epoch)
        if self.index >= len(self._list):
            self.epoch, self.index, self._list = self.epoch + 1, 0, self.epoch_batches(self.epoch + 1)
        self.index += 1
        return self._list[self.index - 1]


def model_inputs(batch, device) -> dict:
    return batch.model_inputs(device)


def forward_loss(model, batch, device, num_items, amp, kd=None, kd_weight: float = 0.0):
    """Loss of one micro-batch, normalised by the accumulated token count: masked chunked CE,
    mixed with a distillation term `kd(hidden, head, labels, batch, num_items)` when given.
    Returns (loss to backward, detached CE sum, detached KD sum or None)."""
    with amp:
        hidden = model(**model_inputs(batch, device), return_hidden=True)
        head = (model.module if hasattr(model, "module") else model).head_weight
        labels = batch.labels.to(device)
        weights = None if batch.weights is None else batch.weights.to(device)
        ce = chunked_cross_entropy(hidden, head, labels, weights=weights, num_items=num_items)
        if kd is None:
            return ce.loss, ce.loss_sum, None
        d = kd(hidden, head, labels, batch, num_items)
        return (1 - kd_weight) * ce.loss + kd_weight * d.loss, ce.loss_sum, d.loss_sum


def make_kd(cfg: TrainConfig, tok, data, device, dtype, log):
    """The distillation term for forward_loss: online from a teacher model, or offline from a
    top-k cache; None without either."""
    from .loader import load_model
    from .distill import TeacherCache
    from .kd import chunked_kd_loss, kd_from_topk
    from .tokenizer import load_tokenizer

    if cfg.teacher_cache:
        cache = TeacherCache(cfg.teacher_cache)
        cache.check(data)  # same samples, same order as the cache was made from
        if abs(cache.temperature - cfg.kd_temperature) > 1e-9:
            raise SystemExit(f"--teacher-cache was made at temperature {cache.temperature}; pass "
                             f"--kd-temperature {cache.temperature} or re-run cache-logits")

        def from_cache(hidden, head, labels, batch, num_items):
            ids, logprobs, tail = cache.gather([i for row in batch.rows for i in row])
            return kd_from_topk(hidden, head, labels, ids.to(device), logprobs.to(device), tail.to(device),
                                temperature=cfg.kd_temperature, num_items=num_items)
        return from_cache
    if not cfg.teacher:
        return None
    # Teacher and student must tokenize alike: the KD targets are the teacher's next-token
    # distributions over the student's ids.
    t_tok = load_tokenizer(cfg.teacher)
    for s in data.samples[:3]:
        text = tok.decode(s.ids)
        if t_tok.encode(text) != tok.encode(text):
            raise SystemExit(f"teacher {cfg.teacher} and student {cfg.model} tokenize differently; online KD "
                             "needs a shared tokenizer (use traces from the teacher instead: "
                             "python -m minidistill.generate --prompts ... --output traces.jsonl)")
    teacher = load_model(cfg.teacher, dtype=dtype, device=device, quantize=cfg.teacher_quantize).requires_grad_(False)
    log(f"teacher {cfg.teacher}: {teacher.num_parameters():,} parameters, frozen")

    def online(hidden, head, labels, batch, num_items):
        with torch.no_grad():
            t_hidden = teacher(**model_inputs(batch, device), return_hidden=True)
        return chunked_kd_loss(hidden, head, t_hidden, teacher.head_weight, labels, kind=cfg.kd_loss,
                               temperature=cfg.kd_temperature, num_items=num_items)
    return online


@torch.no_grad()
def evaluate(model, batches: list, device, amp, world: int) -> float:
    """Cross-entropy of the eval batches, per trained token, over every process's share."""
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # CE sum, trained tokens
    for b in batches:
        sums[0] += forward_loss(model, b, device, 1, amp)[1]
        sums[1] += b.num_tokens
    if world > 1:
        dist.all_reduce(sums)
    model.train()
    return float(sums[0] / sums[1].clamp(min=1))


def shard_blocks(model, dtype: torch.dtype, device: torch.device) -> None:
    """FSDP2: each block's parameters sharded across the processes (fully_shard moves a block
    to `device` as it shards it). Embeddings, final norm and head stay whole on every rank:
    they are frozen, and the chunked loss reads the head outside the model's forward. Mixed
    precision keeps fp32 LoRA weights and reduces gradients in fp32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    for part in (model.model.embed_tokens, model.model.norm, model.lm_head):
        part.to(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype != torch.float32 else None
    kw = {"mesh": mesh, **({"mp_policy": mp} if mp else {})}
    for block in model.model.layers:
        fully_shard(block, **kw)
    # A root over the blocks (owning none of the whole parts) makes the blocks non-roots, which
    # reshard after every forward; a block left as its own root would stay gathered.
    whole = {p for part in (model.model.embed_tokens, model.model.norm, model.lm_head) for p in part.parameters()}
    fully_shard(model, ignored_params=whole, **kw)


def grad_sync(model, on: bool, fsdp: bool) -> None:
    """FSDP: reduce-scatter gradients only on the last micro-batch of a step."""
    if fsdp:
        model.set_requires_gradient_sync(on)  # recurses into the blocks


def train(cfg: TrainConfig) -> dict:
    """Run one training job; returns the closing summary (also printed)."""
    from .loader import load_model
    from .export import save_model
    from .lora import LoraConfig, apply_lora, merge_lora, save_adapter
    from .tokenizer import load_tokenizer

    rank, world = runstate.init_distributed()
    main = rank == 0
    log = print if main else (lambda *a, **k: None)
    device, dtype, use_scaler = resolve_precision(cfg)
    out = Path(cfg.output)
    resume_dir = runstate.checkpoint_to_resume(out, cfg.resume)
    torch.manual_seed(cfg.seed)
    t0 = time.time()

    # Data: tokenized once (cached on disk), verified, summarised.
    tok = load_tokenizer(cfg.model)
    dcfg = DataConfig(format=cfg.format, max_seq_len=cfg.max_seq_len, system_prompt=cfg.system_prompt,
                      think_weight=cfg.think_weight, answer_weight=cfg.answer_weight,
                      last_turn_only=cfg.last_turn_only, strip_history_reasoning=cfg.strip_history_reasoning,
                      on_truncation=cfg.on_truncation, on_bad_record=cfg.on_bad_record, limit=cfg.limit)
    data = prepare_data(cfg.data, tok, dcfg, log=log)
    eval_data = None
    if cfg.eval_split:
        data, eval_data = split_eval(data, cfg.eval_split, seed=cfg.seed)
    elif cfg.eval_data:
        eval_data = prepare_data(cfg.eval_data, tok, replace(dcfg, limit=None), log=log)
    pad_id = tok.pad_id if tok.pad_id is not None else (tok.eos_id or 0)
    eval_batches = [] if eval_data is None else make_batches(eval_data, cfg.batch_size, cfg.max_seq_len, packing=cfg.packing,
                                                             shuffle=False, rank=rank, world_size=world, pad_id=pad_id)

    # Model: frozen base (bf16 or NF4), LoRA weights in fp32.
    # FSDP: read on the CPU; sharding moves each block to the GPU in turn (a model too big for one).
    model = load_model(cfg.model, dtype=dtype, device="cpu" if cfg.fsdp else device, quantize=cfg.quantize)
    torch.manual_seed(cfg.seed)
    apply_lora(model, LoraConfig(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                                 targets=tuple(t.strip() for t in cfg.lora_targets.split(",")),
                                 use_rslora=cfg.use_rslora), verbose=main)
    model.gradient_checkpointing = cfg.grad_checkpointing
    if cfg.fsdp and (world == 1 or use_scaler):
        raise SystemExit("--fsdp needs torchrun with several processes, and bf16 or fp32 (not fp16)")
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None
    amp = (torch.autocast(device.type, dtype=dtype) if device.type == "cuda" and dtype != torch.float32 else nullcontext())
    stream = Batches(data, cfg, rank, world, pad_id)
    per_epoch = len(stream.epoch_batches(0)) // cfg.grad_accum
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * per_epoch))
    if per_epoch == 0 and not cfg.max_steps:
        raise SystemExit(f"{len(stream.epoch_batches(0))} micro-batches per epoch is fewer than --grad-accum "
                         f"{cfg.grad_accum}: lower --grad-accum/--batch-size or add data")

    prompts = runstate.sample_prompts(cfg.sample_prompts, eval_data or data)
    step, counters = 0, {"skipped_steps": 0, "best_eval_loss": None}
    if resume_dir is not None:
        runstate.load_trainable(resume_dir, model)
    if cfg.fsdp:
        shard_blocks(model, dtype, device)  # replaces the block parameters: the optimizer comes after
    if resume_dir is None:
        if main:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
        if main or cfg.fsdp:  # a sharded forward is collective: with FSDP every rank answers (greedy, alike)
            before = runstate.answer_prompts(model, tok, prompts, cfg.sample_max_tokens, amp)
        if main:
            (out / "samples_before.json").write_text(json.dumps(before))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                            fused=device.type == "cuda" and not cfg.fsdp)
    if resume_dir is not None:
        step, counters = runstate.load_training_state(resume_dir, model, opt, stream, scaler, cfg.fsdp)
        log(f"resumed from {resume_dir} at step {step}")
        saved = json.loads((out / "config.json").read_text()) if (out / "config.json").exists() else {}
        changed = {k: (saved[k], v) for k, v in asdict(cfg).items() if k in saved and k != "resume" and saved[k] != v}
        if changed:  # allowed (e.g. more --max-steps), but the run is no longer the one interrupted
            log("note: flags differ from the interrupted run: " +
                ", ".join(f"--{k.replace('_', '-')} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
            if main:
                (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    kd = make_kd(cfg, tok, data, device, dtype, log)
    ddp = model
    if world > 1 and not cfg.fsdp:
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    metrics = runstate.MetricsLog(out, cfg.log, cfg, enabled=main, resume_step=step)

    log(f"training {total} steps ({per_epoch} per epoch), each of {cfg.grad_accum} micro-batch(es) x "
        f"{cfg.batch_size} rows x {world} process(es), on {device} in {str(dtype).removeprefix('torch.')}")
    bar = runstate.progress(total, step, enabled=main)
    model.train()
    bad_in_row, last_eval, row, interrupted = 0, None, None, False
    with runstate.CtrlC() as ctrl_c:
        while step < total:
            if interrupted:  # at a step boundary: weights, optimizer, data position and RNG agree
                bar.close()
                path = runstate.save_checkpoint(out, step, model, opt, stream, scaler, counters, cfg.keep_last,
                                                main=main, fsdp=cfg.fsdp)
                if main:
                    print(f"\ninterrupted: saved {path}; continue with the same command plus --resume")
                runstate.shutdown_distributed()
                raise SystemExit(130)
            lr = lr_at(step, total, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            t_step = time.time()
            micro = [stream.next() for _ in range(cfg.grad_accum)]
            counts = torch.tensor([sum(b.num_tokens for b in micro), sum(b.num_input_tokens for b in micro)],
                                  dtype=torch.float64, device=device)
            if world > 1:
                dist.all_reduce(counts)
            num_items = float(counts[0])
            sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, CE, KD sums; Ctrl-C flag
            for i, b in enumerate(micro):
                sync = world == 1 or i == len(micro) - 1
                grad_sync(model, sync, cfg.fsdp)
                with nullcontext() if sync or cfg.fsdp else ddp.no_sync():
                    loss, ce_sum, kd_sum = forward_loss(ddp, b, device, num_items, amp, kd, cfg.kd_weight)
                    # DDP averages gradients over ranks; the loss is already normalised by the
                    # global token count, so undo the average.
                    (scaler.scale(loss * world) if scaler else loss * world).backward()
                sums[0] += loss.detach() * num_items
                sums[1] += ce_sum
                if kd_sum is not None:
                    sums[2] += kd_sum
            if scaler:
                scaler.unscale_(opt)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
            if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor over the shards
                grad_norm = grad_norm.full_tensor()
            sums[3] = float(ctrl_c.requested)
            if world > 1:
                dist.all_reduce(sums)  # every rank learns of a Ctrl-C on any rank and stops at the same step
            interrupted = bool(sums[3] > 0)
            step_loss, ce_loss, kd_loss = (float(x) / max(num_items, 1) for x in sums[:3])
            if not (math.isfinite(step_loss) and math.isfinite(float(grad_norm))):
                opt.zero_grad(set_to_none=True)
                if scaler:
                    scaler.update()  # lowers the scale; fp16 overflow is expected now and then
                counters["skipped_steps"] += 1
                bad_in_row += 1
                log(f"step {step + 1}: non-finite loss or gradient, step skipped ({counters['skipped_steps']} so far)")
                if bad_in_row >= 5:
                    last = runstate.latest_checkpoint(out)
                    raise SystemExit(f"5 steps in a row had a non-finite loss or gradient; stopping. Last good "
                                     f"checkpoint: {last or 'none'}. Lower --lr or use --dtype bf16/fp32.")
                continue
            bad_in_row = 0
            if scaler:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            elapsed = time.time() - t_step
            row = {"step": step, "loss": step_loss, "lr": lr, "grad_norm": float(grad_norm),
                   "tokens": int(num_items), "tokens_per_s": float(counts[1]) / elapsed, "elapsed_s": time.time() - t0}
            if kd is not None:
                row.update(ce_loss=ce_loss, kd_loss=kd_loss)
            if step % cfg.log_every == 0 or step == total:
                metrics.write(row)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
            if eval_batches and (step == total or (cfg.eval_every and step % cfg.eval_every == 0)):
                last_eval = evaluate(ddp, eval_batches, device, amp, world)
                if counters["best_eval_loss"] is None or last_eval < counters["best_eval_loss"]:
                    counters["best_eval_loss"] = last_eval
                metrics.write({"step": step, "eval_loss": last_eval, "elapsed_s": time.time() - t0})
                bar.write(f"step {step}: eval_loss {last_eval:.4f}")
            if (main or cfg.fsdp) and (step == total or (cfg.save_every and step % cfg.save_every == 0)):
                runstate.save_checkpoint(out, step, model, opt, stream, scaler, counters, cfg.keep_last,
                                         main=main, fsdp=cfg.fsdp)
    bar.close()

    summary = {"steps": step, "skipped_steps": counters["skipped_steps"], "time_s": round(time.time() - t0, 1),
               "final_loss": row["loss"] if row else None,
               "final_eval_loss": last_eval, "best_eval_loss": counters["best_eval_loss"]}
    with runstate.full_params(model, cfg.fsdp):
        if main:
            save_adapter(model, out / "adapter")
    if main or cfg.fsdp:  # a sharded forward is collective: with FSDP every rank answers (greedy, alike)
        after = runstate.answer_prompts(model, tok, prompts, cfg.sample_max_tokens, amp)
    if main:
        before_file = out / "samples_before.json"
        before = json.loads(before_file.read_text()) if before_file.exists() else ["(not recorded)"] * len(after)
        runstate.write_samples(out / "samples.md", prompts, before, after)
        if prompts:
            print(f"\nsample: {prompts[0]}\n--- before training:\n{runstate.shown(before[0])}\n"
                  f"--- after training:\n{runstate.shown(after[0])}")
        if cfg.merge:
            merge_lora(model)
            save_model(model, out / "merged", tokenizer=tok)
        metrics.close()
        summary.update(data=data.summary.to_dict(), output=str(out))
        runstate.print_summary(summary, out, cfg.merge)
    runstate.shutdown_distributed()
    return summary


def demo_config() -> TrainConfig:
    """The offline demo: a tiny random model and the bundled arithmetic reasoning data."""
    from .demo import demo_cache, demo_data_path, demo_model_dir

    return TrainConfig(model=str(demo_model_dir()), data=str(demo_data_path(demo_cache())), output="runs/demo", max_steps=500,
                       batch_size=8, grad_accum=1, max_seq_len=128, lr=3e-3, min_lr=3e-4, warmup_steps=10,
                       lora_r=32, lora_alpha=32, lora_targets="all-linear", grad_checkpointing=False,
                       eval_split=0.02, eval_every=100, save_every=250, sample_max_tokens=60, device="cpu")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("no arguments: running the offline demo (a tiny random model learns arithmetic reasoning "
              "traces on CPU; see --help for a real run)")
        cfg = demo_config()
        if Path(cfg.output).exists():
            import shutil

            shutil.rmtree(cfg.output)  # the demo always starts fresh
    else:
        cfg = parse_args(argv)
    train(cfg)


if __name__ == "__main__":
    from .cli import run

    run(main)
