"""TrainConfig: its consistency checks (each message names the flag, the value and what to do),
the learning-rate schedule, the device / precision choice, and the note on changed flags when
resuming. The command-line parsing (`parse_args`) is tested in test_train.py."""

import json
from dataclasses import asdict, replace

import pytest
import torch

from minidistill.lora import LoraConfig
from minidistill.samples import DataConfig
from minidistill.train_config import (
    DistillConfig,
    OnPolicyConfig,
    TrainConfig,
    check_config,
    lr_at,
    note_changed_flags,
    resolve_precision,
)


def test_schedule():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=4, schedule="cosine")
    lrs = [lr_at(s, 20, cfg) for s in range(20)]
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lrs[4] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    lin = TrainConfig(lr=1e-3, min_lr=0.0, warmup_steps=0, schedule="linear")
    assert lr_at(0, 11, lin) == pytest.approx(1e-3) and lr_at(10, 11, lin) == pytest.approx(0.0)


def test_schedule_midpoints_and_constant():
    cos = TrainConfig(lr=1e-3, min_lr=0.0, warmup_steps=0, schedule="cosine")
    assert lr_at(5, 11, cos) == pytest.approx(5e-4)  # halfway: (1 + cos(pi / 2)) / 2
    assert lr_at(0, 1, cos) == 1e-3  # a one-step run: no room to decay
    lin = TrainConfig(lr=1e-3, min_lr=2e-4, warmup_steps=0, schedule="linear")
    assert lr_at(5, 11, lin) == pytest.approx(6e-4)  # halfway between lr and min_lr
    const = TrainConfig(lr=1e-3, warmup_steps=2, schedule="constant")
    assert [lr_at(s, 10, const) for s in (0, 1, 2, 9)] == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3])


def base(**kw) -> TrainConfig:
    return TrainConfig(model="m", data="d", **kw)


def test_defaults_and_the_demo_pass():
    assert check_config(TrainConfig()) == []  # no --model and no --data: the offline demo
    assert check_config(base()) == []


@pytest.mark.parametrize("cfg,problems", [
    (TrainConfig(model="m"), ["give both --model and --data (or neither, for the offline demo)"]),
    (base(eval_data="e", eval_split=0.1), ["use either --eval-data or --eval-split, not both"]),
    (base(eval_split=1.0), ["--eval-split must be in [0, 1), got 1.0"]),
    (base(eval_every=5), ["--eval-every needs --eval-data or --eval-split"]),
    (base(batch_size=0, grad_accum=-1), ["--batch-size must be >= 1, got 0", "--grad-accum must be >= 1, got -1"]),
    (base(lora=LoraConfig(r=0)), ["--lora-r must be >= 1, got 0"]),
    (base(checkpoint_every=0, pad_to_multiple=0, log_every=0),
     ["--log-every must be >= 1, got 0", "--checkpoint-every must be >= 1, got 0",
      "--pad-to-multiple must be >= 1, got 0"]),
    (base(epochs=0), ["--max-steps must be >= 0 and --epochs > 0"]),
    (base(max_steps=-1), ["--max-steps must be >= 0 and --epochs > 0"]),
    (base(distill=DistillConfig(teacher="t", teacher_cache="c")),
     ["use either --teacher (online) or --teacher-cache (offline), not both"]),
    (base(distill=DistillConfig(kd_weight=1.5)), ["--kd-weight must be in [0, 1], got 1.5"]),
    (base(distill=DistillConfig(teacher_cache="c", kd_loss="jsd")),
     ["--teacher-cache holds the teacher's top-k only, which supports --kd-loss forward"]),
    (base(distill=DistillConfig(teacher_cache="c"), eval_split=0.1),
     ["--teacher-cache was made from the whole --data: hold out with --eval-data, not --eval-split"]),
    (base(fsdp=True, quantize="nf4"),
     ["--fsdp works with 16-bit LoRA: drop --quantize/--merge (merge afterwards with md.merge_lora)"]),
    (base(fsdp=True, merge=True),
     ["--fsdp works with 16-bit LoRA: drop --quantize/--merge (merge afterwards with md.merge_lora)"]),
    (base(lr=1e-4, min_lr=1e-3), ["--min-lr 0.001 is above --lr 0.0001"]),
    (base(resume=True, overwrite=True),
     ["use either --resume (continue the run in --output) or --overwrite (replace it), not both"]),
    (base(lr=float("nan")), ["--lr must be a finite number, got nan", "--lr must be > 0, got nan"]),
    (base(lr=-1.0, min_lr=-2.0), ["--lr must be > 0, got -1.0", "--min-lr must be >= 0, got -2.0"]),
    (base(distill=DistillConfig(kd_weight=float("inf"))),
     ["--kd-weight must be in [0, 1], got inf", "--kd-weight must be a finite number, got inf"]),
    (base(lora=LoraConfig(alpha=-1.0, dropout=1.0)),
     ["--lora-alpha must be >= 0, got -1.0", "--lora-dropout must be in [0, 1), got 1.0"]),
    (base(weight_decay=-0.1, max_grad_norm=-1.0, warmup_steps=-1, save_every=-1),
     ["--weight-decay must be >= 0, got -0.1", "--max-grad-norm must be >= 0, got -1.0",
      "--warmup-steps must be >= 0, got -1", "--save-every must be >= 0, got -1"]),
    (base(eval_every=-1, eval_data="e"), ["--eval-every must be >= 0, got -1"]),
    (base(loss_chunk_mb=0.0), ["--loss-chunk-mb must be > 0, got 0.0"]),
    (base(embedding_on_host=True, fsdp=True),
     ["--embedding-on-host keeps a whole embedding on each process's host, which --fsdp shards: drop one"]),
    (base(embedding_on_host=True, add_tokens=("<think>",)),
     ["--embedding-on-host needs a frozen embedding; --add-tokens trains rows of it: drop one"]),
    (base(distill=DistillConfig(kd_temperature=0.0)), ["--kd-temperature must be > 0, got 0.0"]),
])
def test_check_config_names_each_problem(cfg, problems):
    assert check_config(cfg) == problems


ON = DistillConfig(teacher="t")


@pytest.mark.parametrize("cfg,problems", [
    (base(on_policy=OnPolicyConfig(enabled=True)), ["--on-policy needs --teacher (the model that scores the rollouts)"]),
    (base(on_policy=OnPolicyConfig(enabled=True), distill=DistillConfig(teacher_cache="c")),
     ["--on-policy needs --teacher (the model that scores the rollouts)",
      "--on-policy scores new rollouts online: use --teacher, not --teacher-cache"]),
    (base(distill=ON, on_policy=OnPolicyConfig(enabled=True, on_policy_mix=1.5)),
     ["--on-policy-mix must be in [0, 1], got 1.5"]),
    (base(distill=ON, on_policy=OnPolicyConfig(enabled=True, rollout_tokens=0)),
     ["--rollout-tokens and --samples-per-prompt must be >= 1, got 0, 1"]),
    (base(distill=ON, on_policy=OnPolicyConfig(enabled=True, rollout_temperature=0.0, on_policy_estimator="sampled")),
     ["--rollout-temperature must be >= 0 (> 0 for --on-policy-estimator sampled), got 0.0"]),
    (base(distill=ON, on_policy=OnPolicyConfig(enabled=True), eval_split=0.1),
     ["--on-policy reads every prompt of --data: hold out with --eval-data (records with answers)"]),
    (base(distill=ON, on_policy=OnPolicyConfig(enabled=True), fsdp=True),
     ["--on-policy samples on each process alone, which a sharded model cannot: drop --fsdp"]),
    (base(distill=ON, on_policy=OnPolicyConfig(enabled=True), data_config=DataConfig(format="text")),
     ["--on-policy renders prompts with the chat format: drop --template / --format text"]),
])
def test_check_config_on_policy(cfg, problems):
    assert check_config(cfg) == problems
    on = replace(cfg, on_policy=replace(cfg.on_policy, enabled=False))
    assert not set(problems) & set(check_config(on))  # the on-policy checks only apply with --on-policy


def test_on_policy_flags_and_defaults():
    from minidistill.train import parse_args

    cfg = parse_args(["--model", "m", "--data", "d", "--teacher", "t", "--on-policy", "--rollout-tokens", "64",
                      "--rollout-temperature", "0.7", "--samples-per-prompt", "2", "--on-policy-mix", "0.25",
                      "--on-policy-estimator", "sampled"])
    assert cfg.on_policy == OnPolicyConfig(enabled=True, rollout_tokens=64, rollout_temperature=0.7,
                                           samples_per_prompt=2, on_policy_mix=0.25, on_policy_estimator="sampled")
    assert asdict(TrainConfig())["on_policy"] == {"enabled": False, "rollout_tokens": 256, "rollout_temperature": 1.0,
                                                 "samples_per_prompt": 1, "on_policy_mix": 1.0,
                                                 "on_policy_estimator": "full"}


def test_check_config_reads_the_nested_data_config():
    cfg = base(data_config=DataConfig(max_seq_len=64))
    assert check_config(cfg) == []
    cfg.data_config.max_seq_len = 0  # DataConfig itself refuses < 2 when built; a later change is caught here
    assert check_config(cfg) == ["--max-seq-len must be >= 1, got 0"]


def test_resolve_precision_on_the_cpu():
    assert resolve_precision(TrainConfig(device="cpu")) == (torch.device("cpu"), torch.float32, False)
    assert resolve_precision(TrainConfig(device="cpu", dtype="bf16")) == (torch.device("cpu"), torch.bfloat16, False)
    # fp16 needs a gradient scaler: its range loses small gradients (chunked.py's docstring).
    assert resolve_precision(TrainConfig(device="cpu", dtype="fp16")) == (torch.device("cpu"), torch.float16, True)
    if not torch.cuda.is_available():
        assert resolve_precision(TrainConfig()) == (torch.device("cpu"), torch.float32, False)  # auto


def test_changed_flags_are_named_and_recorded_on_resume(tmp_path, capsys):
    old = base(max_steps=10, lora=LoraConfig(r=8))
    (tmp_path / "config.json").write_text(json.dumps(asdict(old), indent=2))
    new = replace(old, max_steps=20, resume=True)  # --resume itself is no change worth a note
    note_changed_flags(new, tmp_path, main=False)  # other ranks say nothing and write nothing
    assert capsys.readouterr().out == "" and json.loads((tmp_path / "config.json").read_text())["max_steps"] == 10
    note_changed_flags(new, tmp_path, main=True)
    assert capsys.readouterr().out == "note: flags differ from the interrupted run: --max-steps 10 -> 20\n"
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["max_steps"] == 20 and saved["lora"]["r"] == 8  # the config as it is now, nested
    note_changed_flags(new, tmp_path, main=True)
    assert capsys.readouterr().out == ""  # the same flags again: nothing to say
