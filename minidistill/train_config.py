"""The training job's configuration: `TrainConfig` (every field a flag of `python -m
minidistill.train`, with the data, LoRA and distillation configs nested), its consistency
checks, the learning-rate schedule and the device / precision choice."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .cli import flag_field, flag_values, flags_of_dict, nested
from .lora import LoraConfig
from .rope import parse_rope_scaling
from .samples import DataConfig


@dataclass
class DistillConfig:
    """Logit distillation: online from a teacher model, or offline from a top-k cache."""

    teacher: str | None = flag_field(None, "online logit distillation from this model (another tokenizer: cross-tokenizer KD on aligned positions)")
    teacher_quantize: str | None = flag_field(None, "load the teacher in 4-bit", choices=[None, "nf4"])
    teacher_cache: str | None = flag_field(None, "offline distillation from a top-k logit cache (python -m minidistill.distill cache-logits)")
    kd_weight: float = flag_field(0.5, "loss = (1 - w) * CE + w * KD, with a teacher or teacher cache")
    kd_temperature: float = flag_field(1.0, "softmax temperature of the KD term (loss scaled by T^2)")
    kd_loss: str = flag_field("forward", "divergence: forward KL(teacher||student), reverse KL, or JSD; with another tokenizer: forward, or uld (forward + sorted-probability ULD where no mapped target)", choices=["forward", "reverse", "jsd", "uld"])


@dataclass
class OnPolicyConfig:
    """On-policy distillation: the student samples completions of the --data prompts, --teacher
    scores each sampled token, the loss is the per-token reverse KL (see onpolicy.py)."""

    enabled: bool = flag_field(False, "on-policy distillation from --teacher (records may be prompt-only)", flag="--on-policy")
    rollout_tokens: int = flag_field(256, "new tokens per rollout; a rollout cut there is trained up to the cut")
    rollout_temperature: float = flag_field(1.0, "sampling temperature of the rollouts (0 = greedy)")
    samples_per_prompt: int = flag_field(1, "rollouts per prompt (an on-policy micro-batch is --batch-size prompts)")
    on_policy_mix: float = flag_field(1.0, "share of micro-batches that are on-policy; the rest are SFT batches of --data (0 = plain SFT)")
    on_policy_estimator: str = flag_field("full", "reverse KL: exact over the vocabulary, or the sampled-token estimator", choices=["full", "sampled"])


@dataclass
class TrainConfig:
    model: str | None = flag_field(None, "preset name, hub repo id or local folder (none: the offline demo)")
    data: str | None = flag_field(None, "JSONL/JSON/Parquet file, folder, or hub dataset org/name[:config]")
    output: str = flag_field("runs/minidistill", "output folder (adapter, metrics, checkpoints, samples)")
    max_steps: int = flag_field(0, "optimizer steps; 0 = as many as --epochs take")
    epochs: float = flag_field(1.0, "passes over the data when --max-steps is 0")
    batch_size: int = flag_field(2, "rows per micro-batch (per process)")
    grad_accum: int = flag_field(4, "micro-batches per optimizer step")
    packing: bool = flag_field(True, "pack samples into full rows (attention stays within each sample)")
    lr: float = flag_field(2e-4, "peak learning rate")
    min_lr: float = flag_field(0.0, "learning rate at the end of the schedule")
    warmup_steps: int = flag_field(5, "linear warm-up steps")
    schedule: str = flag_field("cosine", "decay after warm-up", choices=["cosine", "linear", "constant"])
    weight_decay: float = flag_field(0.0, "AdamW weight decay")
    max_grad_norm: float = flag_field(1.0, "gradient clipping norm (0 = off)")
    quantize: str | None = flag_field(None, "4-bit base weights (QLoRA)", choices=[None, "nf4"])
    add_tokens: tuple[str, ...] = flag_field((), "tokens added to the vocabulary, comma-separated (e.g. '<think>,</think>'): one id each, their embedding (and untied head) rows trained")
    rope_scaling: str | None = flag_field(None, "extend the context with RoPE scaling: linear:F, dynamic:F or yarn:F[:ORIGINAL_CONTEXT] (written into the merged config.json, noted in the adapter README)")
    dtype: str = flag_field("auto", "compute dtype (bf16 / fp16: base weights in it, autocast, LoRA weights fp32); auto = bf16 (fp16 if unsupported) on GPU, fp32 on CPU", choices=["auto", "bf16", "fp16", "fp32"])
    device: str = flag_field("auto", "cuda, cuda:N, cpu; auto = cuda when available")
    grad_checkpointing: bool = flag_field(True, "recompute each block (but the last) in backward to save memory")
    checkpoint_every: int = flag_field(1, "with --grad-checkpointing: recompute every k-th block only (the others keep their activations: faster, more memory)")
    checkpoint_part: str = flag_field("block", "with --grad-checkpointing: what a checkpointed block recomputes: block (all of it) or mlp (its MLP only: attention keeps its activations and never runs twice, for long rows)", choices=["block", "mlp"])
    pad_to_multiple: int = flag_field(64, "round each batch's row length up to a multiple of this (fewer shapes, less allocator fragmentation)")
    activation_offload: bool = flag_field(False, "CUDA: keep the activations saved for backward (the block inputs, with --grad-checkpointing) in pinned host memory")
    embedding_on_host: bool = flag_field(False, "CUDA: keep the frozen input embedding of an untied model in host memory and copy each batch's rows over (frees vocab x hidden weights: 1 GB for Llama-3.1-8B)")
    compile: bool = flag_field(False, "torch.compile each block (inductor); the first steps pay the compilation (minutes on a CPU)")
    loss_chunk_mb: float = flag_field(256.0, "memory for the loss's chunk x vocab logits; the chunk rows follow from it and the vocabulary")
    fsdp: bool = flag_field(False, "under torchrun: shard the blocks across processes (FSDP2) instead of replicating (DDP)")
    eval_data: str | None = flag_field(None, "evaluation data (same forms as --data)")
    eval_split: float = flag_field(0.0, "fraction of --data held out for evaluation (instead of --eval-data)")
    eval_every: int = flag_field(0, "evaluate every N steps (0 = only at the end)")
    save_every: int = flag_field(100, "write a resumable checkpoint every N steps (0 = only at the end)")
    keep_last: int = flag_field(2, "checkpoints kept (older ones are deleted)")
    resume: bool = flag_field(False, "continue from the newest complete checkpoint in --output")
    overwrite: bool = flag_field(False, "replace the run already in --output (its metrics, checkpoints, adapter, ...)")
    allow_data_change: bool = flag_field(False, "with --resume: go on although the prepared data differs from the run's")
    seed: int = flag_field(0, "seed for data order, LoRA init and dropout")
    sample_prompts: str | None = flag_field(None, "text file, one prompt per line, answered before and after training")
    sample_max_tokens: int = flag_field(256, "new tokens per sample answer")
    merge: bool = flag_field(False, "also write merged/ (HF layout, LoRA folded in)")
    log: str = flag_field("jsonl", "metrics sink besides metrics.jsonl", choices=["jsonl", "tensorboard", "wandb"])
    log_every: int = flag_field(1, "steps between metric rows")
    data_config: DataConfig = nested(DataConfig)  # how records become samples: --format, --max-seq-len, ...
    lora: LoraConfig = nested(LoraConfig)  # --lora-r, --lora-alpha, --lora-dropout, --lora-targets, --use-rslora
    distill: DistillConfig = nested(DistillConfig)  # --teacher, --teacher-cache, --kd-*
    on_policy: OnPolicyConfig = nested(OnPolicyConfig)  # --on-policy, --rollout-*, --samples-per-prompt, --on-policy-*


def check_config(cfg: TrainConfig) -> list[str]:
    """Inconsistent combinations, each with what to do instead."""
    out, d = [], cfg.distill
    if (cfg.model is None) != (cfg.data is None):
        out.append("give both --model and --data (or neither, for the offline demo)")
    if cfg.eval_data and cfg.eval_split:
        out.append("use either --eval-data or --eval-split, not both")
    if not 0 <= cfg.eval_split < 1:
        out.append(f"--eval-split must be in [0, 1), got {cfg.eval_split}")
    if cfg.eval_every and not (cfg.eval_data or cfg.eval_split):
        out.append("--eval-every needs --eval-data or --eval-split")
    for name, value in (("batch_size", cfg.batch_size), ("grad_accum", cfg.grad_accum),
                        ("max_seq_len", cfg.data_config.max_seq_len), ("lora_r", cfg.lora.r), ("log_every", cfg.log_every),
                        ("checkpoint_every", cfg.checkpoint_every), ("pad_to_multiple", cfg.pad_to_multiple)):
        if value < 1:
            out.append(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if cfg.max_steps < 0 or cfg.epochs <= 0:
        out.append("--max-steps must be >= 0 and --epochs > 0")
    if d.teacher and d.teacher_cache:
        out.append("use either --teacher (online) or --teacher-cache (offline), not both")
    if not 0 <= d.kd_weight <= 1:
        out.append(f"--kd-weight must be in [0, 1], got {d.kd_weight}")
    if d.teacher_cache and d.kd_loss != "forward":
        out.append("--teacher-cache holds the teacher's top-k only, which supports --kd-loss forward")
    if d.teacher_cache and cfg.eval_split:
        out.append("--teacher-cache was made from the whole --data: hold out with --eval-data, not --eval-split")
    if cfg.fsdp and (cfg.quantize or cfg.merge):
        out.append("--fsdp works with 16-bit LoRA: drop --quantize/--merge (merge afterwards with md.merge_lora)")
    if cfg.fsdp and cfg.embedding_on_host:
        out.append("--embedding-on-host keeps a whole embedding on each process's host, which --fsdp shards: drop one")
    if cfg.embedding_on_host and cfg.add_tokens:
        out.append("--embedding-on-host needs a frozen embedding; --add-tokens trains rows of it: drop one")
    if cfg.min_lr > cfg.lr:
        out.append(f"--min-lr {cfg.min_lr} is above --lr {cfg.lr}")
    if cfg.resume and cfg.overwrite:
        out.append("use either --resume (continue the run in --output) or --overwrite (replace it), not both")
    for flag, value in flag_values(cfg).items():
        if isinstance(value, float) and not math.isfinite(value):
            out.append(f"{flag} must be a finite number, got {value}")
    if not cfg.lr > 0:
        out.append(f"--lr must be > 0, got {cfg.lr}")
    if cfg.lora.alpha < 0:
        out.append(f"--lora-alpha must be >= 0, got {cfg.lora.alpha}")
    if not 0 <= cfg.lora.dropout < 1:
        out.append(f"--lora-dropout must be in [0, 1), got {cfg.lora.dropout}")
    for flag, value in (("--min-lr", cfg.min_lr), ("--weight-decay", cfg.weight_decay),
                        ("--max-grad-norm", cfg.max_grad_norm), ("--warmup-steps", cfg.warmup_steps),
                        ("--save-every", cfg.save_every), ("--eval-every", cfg.eval_every)):
        if value < 0:
            out.append(f"{flag} must be >= 0, got {value}")
    if cfg.loss_chunk_mb <= 0:
        out.append(f"--loss-chunk-mb must be > 0, got {cfg.loss_chunk_mb}")
    if cfg.rope_scaling:
        try:
            parse_rope_scaling(cfg.rope_scaling)
        except ValueError as e:
            out.append(str(e))
    if d.kd_loss == "uld" and not d.teacher:
        out.append("--kd-loss uld is for a --teacher with another tokenizer")
    if cfg.distill.kd_temperature <= 0:
        out.append(f"--kd-temperature must be > 0, got {cfg.distill.kd_temperature}")
    return out + _check_on_policy(cfg)


def _check_on_policy(cfg: TrainConfig) -> list[str]:
    o, out = cfg.on_policy, []
    if not o.enabled:
        return out
    if not cfg.distill.teacher:
        out.append("--on-policy needs --teacher (the model that scores the rollouts)")
    if cfg.distill.teacher_cache:
        out.append("--on-policy scores new rollouts online: use --teacher, not --teacher-cache")
    if not 0 <= o.on_policy_mix <= 1:
        out.append(f"--on-policy-mix must be in [0, 1], got {o.on_policy_mix}")
    if o.rollout_tokens < 1 or o.samples_per_prompt < 1:
        out.append(f"--rollout-tokens and --samples-per-prompt must be >= 1, got {o.rollout_tokens}, {o.samples_per_prompt}")
    if o.rollout_temperature < 0 or (o.on_policy_estimator == "sampled" and o.rollout_temperature == 0):
        out.append(f"--rollout-temperature must be >= 0 (> 0 for --on-policy-estimator sampled), got {o.rollout_temperature}")
    if cfg.fsdp:
        out.append("--on-policy samples on each process alone, which a sharded model cannot: drop --fsdp")
    if cfg.eval_split:
        out.append("--on-policy reads every prompt of --data: hold out with --eval-data (records with answers)")
    if cfg.data_config.plain_text:
        out.append("--on-policy renders prompts with the chat format: drop --template / --format text")
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


def note_changed_flags(cfg: TrainConfig, out: Path, main: bool) -> None:
    """Resuming with other flags is allowed (e.g. more --max-steps), but the run is no longer the
    one interrupted: name what changed and record the new config."""
    path = out / "config.json"
    saved = flags_of_dict(json.loads(path.read_text()), TrainConfig) if path.exists() else {}
    now = flag_values(cfg)
    changed = {f: (saved[f], v) for f, v in now.items() if f in saved and f != "--resume" and saved[f] != v}
    if changed and main:
        print("note: flags differ from the interrupted run: " +
              ", ".join(f"{f} {a!r} -> {b!r}" for f, (a, b) in changed.items()))
        path.write_text(json.dumps(asdict(cfg), indent=2))
