"""The training job: LoRA / QLoRA fine-tuning on reasoning traces, with optional distillation.

`train(cfg)` reads as its phases over one `Run`:

    run = setup(cfg)          # data, model + LoRA, sharding or wrapping, optimizer, resume
    while steps remain:
        train_step(run, micro_batches)   # lr, forward/backward per micro-batch, clip, step, log
        maybe_eval(run); maybe_save(run)
    finish(run)               # adapter, sample answers, merged model, summary

The loop state (step, data position, counters) is one `LoopState` that a checkpoint saves
whole; `TrainConfig` nests the data, LoRA and distillation configs, and every field is a flag
of `python -m minidistill.train` (see train.py).
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from .batches import BatchStream, make_batches
from .checkpoints import (LoopState, check_same_data, checkpoint_to_resume, latest_checkpoint, load_checkpoint,
                          read_loop_state, save_checkpoint)
from .distributed import (CtrlC, all_reduce, full_params, grad_sync, init_distributed, shard_blocks,
                          shutdown_distributed)
from .errors import MinidistillError, TrainingInterrupted
from .loss import chunked_cross_entropy
from .metrics import MetricsLog, answer_prompts, print_summary, progress, report_samples, sample_prompts
from .onpolicy import OnPolicy, RolloutBatch, finished_summary, on_policy_row, rollout_counts
from .run_folder import RunLock, check_writable, prepare_output, writing
from .samples import prepare_data, split_eval
from .teacher import make_kd
from .teacher_cache import samples_fingerprint
from .train_config import TrainConfig, check_config, lr_at, note_changed_flags, resolve_precision


@dataclass
class Run:
    """Everything one training job holds; built by `setup`, advanced by `train_step`."""

    cfg: TrainConfig
    out: Path
    rank: int
    world: int
    device: torch.device
    dtype: torch.dtype
    amp: object  # autocast context (or nullcontext)
    scaler: torch.amp.GradScaler | None
    tok: object
    data: object
    eval_batches: list
    stream: BatchStream
    total_steps: int
    steps_per_epoch: int
    model: torch.nn.Module  # the Transformer with LoRA (sharded in place under FSDP)
    forward_model: torch.nn.Module  # what forward passes call: the model, or its DDP wrapper
    params: list
    opt: torch.optim.Optimizer
    kd: Callable | None
    prompts: list[str]
    metrics: MetricsLog
    state: LoopState
    t0: float
    onpolicy: OnPolicy | None = None  # --on-policy: the teacher, the prompts, the rollout micro-batches
    stop: bool = False  # a Ctrl-C on any rank: save at this step boundary and stop

    @property
    def main(self) -> bool:
        return self.rank == 0

    def log(self, *a) -> None:
        if self.main:
            print(*a)


def setup(cfg: TrainConfig) -> Run:
    """Data, model + LoRA, sharding or wrapping, optimizer, then resume: in that order."""
    from .lora import apply_lora
    from .loader import load_model
    from .new_tokens import add_tokens
    from .tokenizer import load_tokenizer

    rank, world = init_distributed()
    log = print if rank == 0 else (lambda *a, **k: None)
    device, dtype, use_scaler = resolve_precision(cfg)
    if cfg.fsdp and (world == 1 or use_scaler):
        raise ValueError("--fsdp needs torchrun with several processes, and bf16 or fp32 (not fp16)")
    out = Path(cfg.output)
    resume_from = checkpoint_to_resume(out, cfg.resume, log=log)
    torch.manual_seed(cfg.seed)
    t0 = time.time()

    # Data: tokenized once (cached on disk), verified, summarised.
    tok = load_tokenizer(cfg.model)
    if cfg.add_tokens:  # before the data, which is tokenized with them
        tok.add_tokens(list(cfg.add_tokens))
    onp = OnPolicy(cfg, tok, device, dtype, rank, world, log) if cfg.on_policy.enabled else None
    data = prepare_data(cfg.data, tok, cfg.data_config, log=log) if onp is None else onp.train_data(log)
    eval_data = None
    if cfg.eval_split:
        data, eval_data = split_eval(data, cfg.eval_split, seed=cfg.seed)
    elif cfg.eval_data:
        eval_data = prepare_data(cfg.eval_data, tok, replace(cfg.data_config, limit=None), log=log)
    pad_id = tok.pad_id if tok.pad_id is not None else (tok.eos_id or 0)
    eval_batches = [] if eval_data is None else make_batches(
        eval_data, cfg.batch_size, cfg.data_config.max_seq_len, packing=cfg.packing, shuffle=False, rank=rank,
        world_size=world, pad_id=pad_id, pad_to_multiple=cfg.pad_to_multiple)
    stream = BatchStream(data, cfg, rank, world, pad_id, ahead=device.type == "cuda")
    if onp is None or onp.sft_needed:
        first = stream.epoch_batches(0)
        n_micro = len(first)
        log(f"batches: {n_micro} micro-batches an epoch, {first.fill():.1%} of their row tokens are samples' "
            f"({'packed' if cfg.packing else 'padded'}; the rest is padding)")
    else:
        n_micro = onp.micro_per_epoch
    per_epoch = n_micro // cfg.grad_accum
    if per_epoch == 0 and not cfg.max_steps:
        raise ValueError(f"{n_micro} micro-batches per epoch is fewer than --grad-accum {cfg.grad_accum}: "
                         "lower --grad-accum/--batch-size or add data")
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * per_epoch))
    data_id = {"fingerprint": samples_fingerprint(data), "records": data.summary.read, "format": data.summary.detected_format,
               "steps_per_epoch": per_epoch}
    if resume_from is not None:
        check_same_data(read_loop_state(resume_from).data, data_id, cfg.allow_data_change, log)

    # Model: frozen base (bf16 or NF4), LoRA weights in fp32. FSDP reads on the CPU and
    # sharding moves each block to the GPU in turn (for a model too big for one).
    model = load_model(cfg.model, dtype=dtype, device="cpu" if cfg.fsdp else device, quantize=cfg.quantize,
                       rope_scaling=cfg.rope_scaling)
    if cfg.add_tokens:  # a fresh tokenizer gives the new tokens the ids `tok` gave them
        add_tokens(model, load_tokenizer(cfg.model), list(cfg.add_tokens))
    torch.manual_seed(cfg.seed)
    apply_lora(model, cfg.lora, verbose=rank == 0)
    model.gradient_checkpointing, model.checkpoint_every = cfg.grad_checkpointing, cfg.checkpoint_every
    model.checkpoint_part = cfg.checkpoint_part
    if cfg.fsdp:
        shard_blocks(model, dtype, device)  # replaces the block parameters: the optimizer comes after
    if cfg.compile:
        model.compile_blocks()  # after sharding: FSDP2's hooks stay outside the compiled graphs
    host_embedding = cfg.embedding_on_host and device.type == "cuda"
    if host_embedding:
        try:
            model.embedding_on_host()
        except ValueError as e:
            raise ValueError(f"--embedding-on-host: {e}") from None
        log(f"input embedding in host memory ({model.model.embed_tokens.weight.nbytes / 2**30:.2f} GiB off the GPU)")
    forward_model = model
    if world > 1 and not cfg.fsdp:
        if host_embedding:  # frozen, on the host: out of DDP's checks and broadcasts
            torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                model, ["model.embed_tokens.weight"])
        # device_ids would move every input to the GPU, the host input_ids too
        forward_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" and not host_embedding else None)
    kd = make_kd(cfg, tok, data, device, dtype, log) if onp is None else None
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                            fused=device.type == "cuda" and not cfg.fsdp)
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None
    amp = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    prompts = sample_prompts(cfg.sample_prompts, eval_data or data)

    # Resume, in one place: weights, optimizer, scaler, RNG and loop state from the checkpoint.
    state = LoopState(data=data_id)
    if resume_from is not None:
        state = load_checkpoint(resume_from, model, opt, scaler=scaler, fsdp=cfg.fsdp)
        state.data = data_id  # --allow-data-change: the checkpoints from now on know the new data
        log(f"resumed from {resume_from} at step {state.step}")
        note_changed_flags(cfg, out, rank == 0)
    elif rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    run = Run(cfg=cfg, out=out, rank=rank, world=world, device=device, dtype=dtype, amp=amp, scaler=scaler, tok=tok,
              data=data, eval_batches=eval_batches, stream=stream, total_steps=total, steps_per_epoch=per_epoch,
              model=model, forward_model=forward_model, params=params, opt=opt, kd=kd, prompts=prompts, onpolicy=onp,
              metrics=MetricsLog(out, cfg.log, cfg, enabled=rank == 0, resume_step=state.step), state=state, t0=t0)
    if run.metrics.note:
        log(run.metrics.note)
    if resume_from is None:
        before = _answer(run)
        if run.main:
            (out / "samples_before.json").write_text(json.dumps(before))
    return run


def _answer(run: Run) -> list[str]:
    """The sample prompts answered by the model as it is now (every rank under FSDP: a sharded
    forward is collective, and greedy answers are alike)."""
    if run.main or run.cfg.fsdp:
        return answer_prompts(run.model, run.tok, run.prompts, run.cfg.sample_max_tokens, run.amp,
                              plain_text=run.cfg.data_config.plain_text)
    return []


def forward_loss(run: Run, batch, num_items, *, distill: bool = True):
    """Loss of one micro-batch, normalised by the accumulated token count: masked chunked CE,
    mixed with the distillation term when the run has one (and `distill`); a RolloutBatch gets
    the on-policy loss instead. Returns (loss to backward, detached CE sum, KDOutput or None,
    OnPolicyOutput or None)."""
    cfg, device = run.cfg, run.device
    offload = (torch.autograd.graph.save_on_cpu(pin_memory=True)
               if cfg.activation_offload and device.type == "cuda" and torch.is_grad_enabled() else nullcontext())
    with run.amp, offload:
        hidden = run.forward_model(**batch.model_inputs(device, host_ids=run.model.host_embedding),
                                   return_hidden=True)
        head = run.model.head_weight
        labels = batch.labels.to(device, non_blocking=True)
        positions = batch.label_index.to(device, non_blocking=True)  # the collator's: no nonzero here
        if isinstance(batch, RolloutBatch):  # the teacher scores the student's own tokens
            d = run.onpolicy.loss(hidden, head, labels, positions, batch, num_items)
            return d.loss, 0.0, None, d
        weights = None if batch.weights is None else batch.weights.to(device, non_blocking=True)
        ce = chunked_cross_entropy(hidden, head, labels, weights=weights, num_items=num_items, positions=positions,
                                   chunk_budget_mb=cfg.loss_chunk_mb)
        if run.kd is None or not distill:
            return ce.loss, ce.loss_sum, None, None
        d = run.kd(hidden, head, labels, positions, batch, num_items)
        w = cfg.distill.kd_weight
        return (1 - w) * ce.loss + w * d.loss, ce.loss_sum, d, None


def train_step(run: Run, micro: list, stop_requested: bool = False) -> dict | None:
    """One optimizer step over `micro` (this rank's micro-batches). Returns the metrics row, or
    None when the step was skipped for a non-finite loss or gradient. Sets `run.stop` when any
    rank asked to stop (`stop_requested`: a Ctrl-C here).

    The host waits for the device once per step, to read the step's scalars (losses, grad
    norm, token counts, stop flag) in one transfer; nothing inside a micro-batch syncs."""
    cfg, state, device, world = run.cfg, run.state, run.device, run.world
    lr = lr_at(state.step, run.total_steps, cfg)
    for g in run.opt.param_groups:
        g["lr"] = lr
    t_step = time.time()
    n_local = sum(b.num_tokens for b in micro)  # this process's trained tokens
    n_trained, n_input = n_local, sum(b.num_input_tokens for b in micro)
    # Token counts over every process (the loss normaliser), and a step with rollouts counts them.
    roll = rollout_counts(micro)
    counts = all_reduce(torch.tensor([n_trained, n_input, *roll], dtype=torch.float64, device=device), world)
    num_items = counts[0] if world > 1 else float(n_trained)
    # loss, CE, KD sums; stop flag; with rollouts the reverse KL, student and teacher log-prob sums
    sums = torch.zeros(4 + len(roll), dtype=torch.float64, device=device)
    covered = 0  # trained tokens with a KD target (cross-tokenizer KD leaves some without)
    for i, b in enumerate(micro):
        sync = world == 1 or i == len(micro) - 1
        grad_sync(run.model, sync, cfg.fsdp)
        with nullcontext() if sync or cfg.fsdp else run.forward_model.no_sync():
            loss, ce_sum, kd, onp = forward_loss(run, b, num_items)
            # DDP averages gradients over ranks; the loss is already normalised by the global
            # token count, so undo the average.
            (run.scaler.scale(loss * world) if run.scaler else loss * world).backward()
        sums[0] += loss.detach() * num_items
        sums[1] += ce_sum
        if kd is not None:
            sums[2] += kd.loss_sum
            covered += b.num_tokens if kd.num_covered is None else kd.num_covered  # host ints: no sync
        if onp is not None:
            sums[4:] += onp.stats
    if run.scaler:
        run.scaler.unscale_(run.opt)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, cfg.max_grad_norm or float("inf"))
    if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor over the shards
        grad_norm = grad_norm.full_tensor()
    sums[3] = float(stop_requested)
    all_reduce(sums, world)  # every rank learns of a Ctrl-C on any rank and stops at the same step
    # The one host sync of the step.
    loss_sum, ce_sum, kd_sum, stop, norm, n_trained, n_input, *extra = torch.cat(
        [sums[:4], grad_norm.detach().reshape(1).to(sums), counts[:2], sums[4:], counts[2:]]).tolist()
    run.stop = stop > 0
    onp_row = on_policy_row(extra, micro, state) if extra else {}
    step_loss, ce_loss, kd_loss = (x / max(n_trained, 1) for x in (loss_sum, ce_sum, kd_sum))
    if not (math.isfinite(step_loss) and math.isfinite(norm)):
        run.opt.zero_grad(set_to_none=True)
        if run.scaler:
            run.scaler.update()  # lowers the scale; fp16 overflow is expected now and then
        state.skipped_steps += 1
        state.bad_in_row += 1
        run.log(f"step {state.step + 1}: non-finite loss or gradient, step skipped ({state.skipped_steps} so far)")
        if state.bad_in_row >= 5:
            raise MinidistillError(f"5 steps in a row had a non-finite loss or gradient; stopping. Last good "
                                   f"checkpoint: {latest_checkpoint(run.out) or 'none'}. Lower --lr or use --dtype bf16/fp32.")
        return None
    state.bad_in_row = 0
    if run.scaler:
        run.scaler.step(run.opt)
        run.scaler.update()
    else:
        run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    state.step += 1
    row = {"step": state.step, "loss": step_loss, "lr": lr, "grad_norm": norm, "tokens": int(n_trained),
           "tokens_per_s": n_input / (time.time() - t_step), "elapsed_s": time.time() - run.t0, **onp_row}
    if run.kd is not None:
        # this process's share, as `covered` is (n_trained is the global count by now)
        row.update(ce_loss=ce_loss, kd_loss=kd_loss, kd_coverage=covered / max(n_local, 1))
        state.kd_covered += covered
        state.kd_trained += n_local
    if state.step % cfg.log_every == 0 or state.step == run.total_steps:
        run.metrics.write(row)
    return row


@torch.no_grad()
def eval_loss(run: Run) -> float:
    """Cross-entropy of the eval batches, per trained token, over every process's share."""
    run.forward_model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=run.device)  # CE sum, trained tokens
    for b in run.eval_batches:
        sums[0] += forward_loss(run, b, 1, distill=False)[1]
        sums[1] += b.num_tokens
    all_reduce(sums, run.world)
    run.forward_model.train()
    return float(sums[0] / sums[1].clamp(min=1))


def _due(step: int, every: int, total: int) -> bool:
    return step == total or bool(every and step % every == 0)


def maybe_eval(run: Run) -> float | None:
    """Evaluate when due (every --eval-every steps and at the end); returns the loss or None."""
    s = run.state
    if not run.eval_batches or not _due(s.step, run.cfg.eval_every, run.total_steps):
        return None
    s.last_eval_loss = eval_loss(run)
    if s.best_eval_loss is None or s.last_eval_loss < s.best_eval_loss:
        s.best_eval_loss = s.last_eval_loss
    run.metrics.write({"step": s.step, "eval_loss": s.last_eval_loss, "elapsed_s": time.time() - run.t0})
    return s.last_eval_loss


def save(run: Run) -> Path:
    return save_checkpoint(run.out, run.state, run.model, run.opt, scaler=run.scaler, keep_last=run.cfg.keep_last,
                           main=run.main, fsdp=run.cfg.fsdp)


def maybe_save(run: Run) -> None:
    """Write a checkpoint when due (every --save-every steps and at the end)."""
    if (run.main or run.cfg.fsdp) and _due(run.state.step, run.cfg.save_every, run.total_steps):
        save(run)


def finish(run: Run, last_row: dict | None) -> dict:
    """Adapter, sample answers after training, merged model, summary (returned and printed)."""
    from .adapter import save_adapter
    from .export import save_model
    from .lora import merge_lora

    cfg, out, s = run.cfg, run.out, run.state
    summary = {"steps": s.step, "skipped_steps": s.skipped_steps, "time_s": round(time.time() - run.t0, 1),
               "final_loss": last_row["loss"] if last_row else None,
               "final_eval_loss": s.last_eval_loss, "best_eval_loss": s.best_eval_loss, **finished_summary(s)}
    if s.kd_trained:
        summary["kd_coverage"] = round(s.kd_covered / s.kd_trained, 4)
    with full_params(run.model, cfg.fsdp):
        if run.main:
            with writing("the adapter", out / "adapter", cleanup=out / "adapter"):
                save_adapter(run.model, out / "adapter")
                if cfg.add_tokens:  # the adapter's token rows need the ids of this tokenizer
                    run.tok.save(out / "adapter")
    after = _answer(run)
    if run.main:
        report_samples(out, run.prompts, after)
        if cfg.merge:
            merge_lora(run.model)
            with writing("the merged model", out / "merged", cleanup=out / "merged"):
                save_model(run.model, out / "merged", tokenizer=run.tok)
        run.metrics.close()
        summary.update(data=run.data.summary.to_dict(), output=str(out))
        print_summary(summary, out, cfg.merge)
    shutdown_distributed()
    return summary


@contextmanager
def output_folder(cfg: TrainConfig):
    """The run folder, checked and locked (by the main process) for the whole run, before
    anything slow happens; released however the run ends."""
    rank, _ = init_distributed()
    if rank != 0:
        yield
        return
    out = Path(cfg.output)
    check_writable(out)
    with RunLock(out) as lock:  # first: a run in progress is named before anything else is said
        if lock.note:
            print(lock.note)
        prepare_output(out, resume=cfg.resume, overwrite=cfg.overwrite)
        yield


def train(cfg: TrainConfig) -> dict:
    """Run one training job; returns the closing summary (also printed). Bad input raises
    ValueError / FileNotFoundError / MinidistillError before anything is trained; Ctrl-C saves
    a checkpoint and raises TrainingInterrupted."""
    problems = check_config(cfg)
    if problems:
        raise ValueError("; ".join(problems))
    with output_folder(cfg):
        run = setup(cfg)
        try:
            row = _loop(run)
        finally:
            run.stream.close()
        return finish(run, row)


def _loop(run: Run) -> dict | None:
    """Steps until the last one (or a Ctrl-C); returns the last metrics row."""
    cfg = run.cfg
    run.log(f"training {run.total_steps} steps ({run.steps_per_epoch} per epoch), each of {cfg.grad_accum} "
            f"micro-batch(es) x {cfg.batch_size} rows x {run.world} process(es), on {run.device} in "
            f"{str(run.dtype).removeprefix('torch.')}")
    bar = progress(run.total_steps, run.state.step, enabled=run.main)
    run.model.train()
    row = None
    with CtrlC() as ctrl_c:
        while run.state.step < run.total_steps:
            micro = (run.stream.take(run.state, cfg.grad_accum) if run.onpolicy is None else
                     run.onpolicy.take(run.model, run.state, run.stream, cfg.grad_accum, run.amp))
            step_row = train_step(run, micro, stop_requested=ctrl_c.requested)
            if step_row is not None:
                row = step_row
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
                if maybe_eval(run) is not None:
                    bar.write(f"step {run.state.step}: eval_loss {run.state.last_eval_loss:.4f}")
                maybe_save(run)
            if run.stop and run.state.step < run.total_steps:  # at a step boundary: all state agrees
                bar.close()
                path = save(run)
                shutdown_distributed()
                raise TrainingInterrupted(f"interrupted: saved {path}; continue with the same command plus --resume")
    bar.close()
    return row
