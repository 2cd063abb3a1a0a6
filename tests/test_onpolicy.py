"""On-policy distillation: the loss and its gradient against plain full-logit references (both
estimators, and the sampled one's expectation against the exact gradient), and the trainer's
--on-policy runs: the mix at 0 is SFT bit for bit, a run lowers the reverse KL, prompt-only
records, the per-step metrics, and a resume that continues bit for bit."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


from minidistill.demo import build_demo_model, make_records, write_demo_data
from minidistill.kd import chunked_kd_loss
from minidistill.lora import LoraConfig
from minidistill.loss import IGNORE_INDEX
from minidistill.onpolicy import on_policy_kd_loss
from minidistill.samples import DataConfig
from minidistill.train_config import DistillConfig, OnPolicyConfig, TrainConfig
from minidistill.trainer import setup, train


def _inputs(seed=0, B=2, T=7, Hs=16, Ht=12, Vs=40, Vt=44):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(B, T, Hs, generator=g, dtype=torch.float64).float().requires_grad_(True)
    ws = (torch.randn(Vs, Hs, generator=g) * 0.5).requires_grad_(True)
    ht, wt = torch.randn(B, T, Ht, generator=g), torch.randn(Vt, Ht, generator=g) * 0.5
    labels = torch.randint(0, min(Vs, Vt), (B, T), generator=g)
    labels[0, :2] = IGNORE_INDEX  # a prompt
    labels[1, -3:] = IGNORE_INDEX  # after a stop
    return hs, ws, ht, wt, labels


def _reference(hs, ws, ht, wt, labels, T, estimator, num_items):
    """Full logits, torch ops, autograd: the loss to backward and (KL, log p(y), log q(y)) sums."""
    V = min(ws.shape[0], wt.shape[0])
    mask = labels.reshape(-1) != IGNORE_INDEX
    y = labels.reshape(-1)[mask]
    logp = torch.log_softmax((hs @ ws.t())[..., :V].reshape(-1, V)[mask] / T, -1)
    logq = torch.log_softmax((ht @ wt.t())[..., :V].reshape(-1, V)[mask] / T, -1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    lp_y, lq_y = logp.gather(1, y[:, None]).squeeze(1), logq.gather(1, y[:, None]).squeeze(1)
    if estimator == "full":
        loss = kl.sum() * T * T / num_items
    else:  # REINFORCE: the advantage -(log p - log q) is a constant
        loss = ((lp_y - lq_y).detach() * lp_y).sum() * T * T / num_items
    return loss, torch.stack([kl.sum(), lp_y.sum(), lq_y.sum()]).detach(), ((lp_y - lq_y).sum() * T * T / num_items)


@pytest.mark.parametrize("estimator", ["full", "sampled"])
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_loss_and_gradient_match_the_full_logit_reference(estimator, T):
    hs, ws, ht, wt, labels = _inputs()
    n = int((labels != IGNORE_INDEX).sum())
    out = on_policy_kd_loss(hs, ws, ht, wt, labels, estimator=estimator, temperature=T, num_items=n + 3,
                            chunk_size=5)  # several chunks, a normaliser from the whole accumulated batch
    out.loss.backward()
    gh, gw = hs.grad.clone(), ws.grad.clone()
    hs.grad = ws.grad = None
    ref, stats, value = _reference(hs, ws, ht, wt, labels, T, estimator, n + 3)
    ref.backward()
    assert out.num_tokens == n
    assert torch.allclose(out.stats, stats, rtol=1e-5, atol=1e-5)
    # the reported value: the exact KL (full) or the sampled-token estimate (sampled)
    assert out.loss.item() == pytest.approx((ref if estimator == "full" else value).item(), rel=1e-5)
    assert torch.allclose(gh, hs.grad, rtol=1e-4, atol=1e-6)
    assert torch.allclose(gw, ws.grad, rtol=1e-4, atol=1e-6)
    assert gh[0, :2].abs().max() == 0 and gh[1, -3:].abs().max() == 0  # no loss on unlabelled positions


def test_full_estimator_is_kd_reverse_kl():
    hs, ws, ht, wt, labels = _inputs(seed=3)
    a = on_policy_kd_loss(hs, ws, ht, wt, labels, temperature=1.5)
    a.loss.backward()
    ga = hs.grad.clone()
    hs.grad = ws.grad = None
    b = chunked_kd_loss(hs, ws, ht, wt, labels, kind="reverse", temperature=1.5)
    b.loss.backward()
    assert torch.allclose(a.loss, b.loss, rtol=1e-6) and torch.allclose(ga, hs.grad, rtol=1e-5, atol=1e-7)
    assert a.reverse_kl_sum.item() * 1.5 ** 2 == pytest.approx(b.loss_sum.item(), rel=1e-5)


def test_sampled_gradient_is_unbiased_for_the_exact_one():
    """Averaged over y ~ p (exactly: every id, weighted by p(y)), the sampled estimator's
    gradient is the exact reverse-KL gradient."""
    hs, ws, ht, wt, _ = _inputs(seed=5, B=2, T=3)
    hs, ht = hs[:1], ht[:1]
    V = 40
    h = hs.detach()[0]  # (3, H)
    rows = h.repeat_interleave(V, 0).requires_grad_(True)  # (3V, H): every position once per candidate y
    y = torch.arange(V).repeat(3)
    out = on_policy_kd_loss(rows, ws.detach(), ht[0].repeat_interleave(V, 0), wt, y, estimator="sampled", num_items=1)
    out.loss.backward()
    p = torch.softmax(h @ ws.detach()[:V].t(), -1)  # (3, V)
    expected = (rows.grad.reshape(3, V, -1) * p[..., None]).sum(1)  # sum_y p(y) grad_y
    exact_rows = h.clone().requires_grad_(True)
    on_policy_kd_loss(exact_rows, ws.detach(), ht[0], wt, torch.zeros(3, dtype=torch.long), num_items=1).loss.backward()
    assert torch.allclose(expected, exact_rows.grad, rtol=1e-4, atol=1e-6)


def test_bad_inputs_are_named():
    hs, ws, ht, wt, labels = _inputs()
    with pytest.raises(ValueError, match="estimator must be one of"):
        on_policy_kd_loss(hs, ws, ht, wt, labels, estimator="exact")
    with pytest.raises(ValueError, match="teacher_hidden leading shape"):
        on_policy_kd_loss(hs, ws, ht[:1], wt, labels)
    with pytest.raises(ValueError, match="outside the vocabulary range"):
        on_policy_kd_loss(hs, ws, ht, wt, torch.full_like(labels, 41))


# ---------------------------------------------------------------------------- the trainer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("onpolicy")
    model = build_demo_model(root / "model", hidden=64, layers=2)
    teacher = build_demo_model(root / "teacher", hidden=64, layers=2, init_seed=7)  # same tokenizer
    return root, model, teacher, write_demo_data(root / "data.jsonl", n=80, seed=4)


def config(tiny, out, mix=1.0, **kw) -> TrainConfig:
    root, model, teacher, data = tiny
    base = dict(model=str(model), data=str(data), output=str(out), max_steps=4, batch_size=2, grad_accum=2,
                lr=1e-2, warmup_steps=1, grad_checkpointing=False, sample_max_tokens=2, device="cpu", save_every=0,
                data_config=DataConfig(max_seq_len=128, cache_dir=str(root / "cache")), lora=LoraConfig(r=4),
                distill=DistillConfig(teacher=str(teacher)),
                on_policy=OnPolicyConfig(enabled=True, rollout_tokens=12, rollout_temperature=2.0, on_policy_mix=mix))
    base.update(kw)
    return TrainConfig(**base)


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_mix_zero_is_plain_sft_bit_for_bit(tiny, tmp_path):
    on = config(tiny, tmp_path / "on", mix=0.0, lora=LoraConfig(r=4, dropout=0.1))
    off = config(tiny, tmp_path / "off", lora=LoraConfig(r=4, dropout=0.1), distill=DistillConfig(),
                 on_policy=OnPolicyConfig())
    train(on)
    train(off)
    a, b = load_file(tmp_path / "on" / "adapter" / "adapter_model.safetensors"), \
        load_file(tmp_path / "off" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in rows(tmp_path / "on")] == [r["loss"] for r in rows(tmp_path / "off")]
    assert "reverse_kl" not in rows(tmp_path / "on")[0]


def test_an_on_policy_run_lowers_the_reverse_kl_and_logs_its_metrics(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    summary = train(config(tiny, out, max_steps=12, lr=2e-2, warmup_steps=0, schedule="constant",
                           on_policy=OnPolicyConfig(enabled=True, rollout_tokens=12, rollout_temperature=0.0)))
    got = rows(out)
    keys = {"reverse_kl", "rollout_len_mean", "rollout_len_p90", "rollout_finished", "teacher_logprob",
            "student_logprob"}
    assert all(keys <= set(r) for r in got)
    for r in got:
        assert r["loss"] == pytest.approx(r["reverse_kl"], rel=1e-5)  # the exact estimator, T = 1, mix 1
        assert 0 < r["rollout_len_mean"] <= 12 and 0 <= r["rollout_finished"] <= 1
        assert r["student_logprob"] <= 0 and r["teacher_logprob"] <= 0
        assert r["tokens"] == 2 * 2 * r["rollout_len_mean"]  # 2 micro-batches x 2 prompts, every token trained
    first, last = sum(r["reverse_kl"] for r in got[:3]) / 3, sum(r["reverse_kl"] for r in got[-3:]) / 3
    assert last < 0.7 * first, (first, last)
    assert summary["rollouts"] == 12 * 4 and 0 <= summary["rollouts_finished"] <= 1
    assert "ended with a stop token" in capsys.readouterr().out


def test_prompt_only_records_train_and_sft_batches_need_answers(tiny, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in make_records(12, seed=9)))
    out = tmp_path / "p"
    summary = train(config(tiny, out, data=str(prompts), max_steps=2, on_policy=OnPolicyConfig(
        enabled=True, rollout_tokens=4, samples_per_prompt=2, on_policy_estimator="sampled")))
    assert summary["rollouts"] == 2 * 2 * 2 * 2  # steps x micro-batches x prompts x samples
    assert all(r["rollout_len_mean"] <= 4 for r in rows(out))
    with pytest.raises(ValueError, match="--on-policy-mix 0.5 < 1 trains SFT micro-batches on the answers"):
        train(config(tiny, tmp_path / "q", data=str(prompts), mix=0.5))


def test_mixed_steps_take_the_share_and_resume_bit_for_bit(tiny, tmp_path):
    kw = dict(max_steps=6, grad_accum=2, lora=LoraConfig(r=4, dropout=0.1))
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    train(config(tiny, straight, mix=0.5, **kw))
    train(config(tiny, killed, mix=0.5, save_every=3, **kw))
    shutil.rmtree(killed / "checkpoints" / "step_000006")  # as if killed after the step-3 checkpoint
    (killed / "adapter" / "adapter_model.safetensors").unlink()
    train(config(tiny, killed, mix=0.5, resume=True, save_every=3, **kw))
    a = load_file(straight / "adapter" / "adapter_model.safetensors")
    b = load_file(killed / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = rows(straight), rows(killed)
    assert [r["step"] for r in rb] == list(range(1, 7)) and [r["loss"] for r in ra] == [r["loss"] for r in rb]
    assert all(r["rollout_len_mean"] > 0 for r in ra)  # mix 0.5 of 2: one rollout micro-batch per step


def test_an_on_policy_step_has_one_host_read_and_no_sync_inside(tiny, tmp_path, monkeypatch):
    from test_trainer import step_watched

    run = setup(config(tiny, tmp_path / "run", mix=0.5))
    micro = run.onpolicy.take(run.model, run.state, run.stream, 2, run.amp)  # sampling reads ids: outside the step
    assert [type(b).__name__ for b in micro] == ["Batch", "RolloutBatch"] and run.state.on_policy_batches == 1
    row, seen, reads = step_watched(run, micro, monkeypatch)
    assert seen == [], seen
    assert len(reads) == 1
    assert row["tokens"] == sum(b.num_tokens for b in micro) and row["reverse_kl"] > 0


ROOT = Path(__file__).resolve().parent.parent


def _run(args, tmp_path):
    env = dict(os.environ, MINIDISTILL_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_on_policy_loop_example(tmp_path):
    out = _run([str(ROOT / "examples" / "on_policy_loop.py"), "--steps", "3", "--rollout-tokens", "8",
                "--output", str(tmp_path / "run")], tmp_path)
    kls = [float(line.split()[4]) for line in out.splitlines() if line.startswith("step")]
    assert len(kls) == 3 and all(k > 0 for k in kls)
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()


def test_benchmark_quick_mode(tmp_path):
    out = _run([str(ROOT / "benchmarks" / "onpolicy_vs_sft.py"), "--quick", "--work", str(tmp_path / "w")], tmp_path)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["bench"] == "onpolicy_vs_sft" and result["quick"] is True
    by = {r["model"]: r for r in result["rows"]}
    sft, onp = by["(a) SFT, all teacher traces"], by["(b) on-policy distillation"]
    # equal student compute: each stops at the first batch past the budget
    assert result["budget_tokens"] <= sft["tokens"] < 2 * result["budget_tokens"]
    assert result["budget_tokens"] <= onp["tokens"] < 2 * result["budget_tokens"]
    assert onp["sample_tokens"] > 0 and onp["reverse_kl_last"] < onp["reverse_kl_first"]
    assert all(0 <= r["exact_match"] <= 1 for r in result["rows"])
