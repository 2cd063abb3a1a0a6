"""The training job end to end on a tiny model: learning, resume after SIGKILL, DDP, outputs, flags."""

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import minidistill as md
from minidistill.demo import build_demo_model, write_demo_data
from minidistill.checkpoints import latest_checkpoint
from minidistill.train import main, parse_args
from minidistill.trainer import train


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    model = build_demo_model(root / "model", hidden=64, layers=2)
    data = write_demo_data(root / "data.jsonl", n=400, seed=3)
    return root, model, data


def env(root: Path) -> dict:
    return dict(os.environ, MINIDISTILL_CACHE=str(root / "cache"), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def adapter(out: Path) -> dict:
    """The adapter tensors a run wrote to out/adapter."""
    return load_file(out / "adapter" / "adapter_model.safetensors")


def metrics(out: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "minidistill.train"]


def one_and_two_processes(root: Path, one: Path, two: Path, one_args: list[str], two_args: list[str], *,
                          atol: float, rtol: float) -> tuple[dict, dict]:
    """Train with one process (one_args), then with two under torchrun (two_args); asserts the two
    runs' adapters have the same keys and agree within atol / rtol; returns both adapters."""
    subprocess.run([sys.executable, "-m", "minidistill.train", *one_args], check=True, env=env(root),
                   capture_output=True, timeout=300)
    r = subprocess.run([*TORCHRUN, *two_args], env=env(root), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = adapter(one), adapter(two)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=rtol), k
    return a, b


def common(model, data, out, steps=8) -> list[str]:
    return ["--model", str(model), "--data", str(data), "--output", str(out), "--max-steps", str(steps),
            "--batch-size", "2", "--grad-accum", "2", "--max-seq-len", "128", "--lr", "5e-3", "--warmup-steps", "2",
            "--lora-r", "8", "--lora-dropout", "0.1", "--no-grad-checkpointing", "--sample-max-tokens", "4",
            "--device", "cpu", "--seed", "1"]


def test_learns_and_writes_outputs(setup, monkeypatch):
    root, model, data = setup
    monkeypatch.setenv("MINIDISTILL_CACHE", str(root / "cache"))
    out = root / "run"
    cfg = parse_args(common(model, data, out, steps=40) + ["--eval-split", "0.05", "--eval-every", "20",
                                                            "--save-every", "20", "--merge"])
    summary = train(cfg)
    rows = metrics(out)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 41))
    for r in train_rows:
        assert set(r) == {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s"}
        assert r["tokens"] > 0 and r["tokens_per_s"] > 0 and r["grad_norm"] > 0
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [20, 40]
    first, last = sum(r["loss"] for r in train_rows[:5]) / 5, sum(r["loss"] for r in train_rows[-5:]) / 5
    assert last < 0.6 * first, (first, last)
    assert evals[-1]["eval_loss"] < first
    assert summary["steps"] == 40 and summary["best_eval_loss"] == min(r["eval_loss"] for r in evals)
    assert (out / "adapter" / "adapter_config.json").exists()
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000020", "step_000040"]
    assert json.loads((out / "config.json").read_text())["lora"]["r"] == 8
    samples = (out / "samples.md").read_text()
    assert "**Before**" in samples and "**After**" in samples
    assert (out / "merged" / "config.json").exists()


def test_resume_after_sigkill_is_bit_identical(setup):
    root, model, data = setup
    straight, killed = root / "straight", root / "killed"
    args = common(model, data, straight) + ["--save-every", "2"]
    subprocess.run([sys.executable, "-m", "minidistill.train", *args], check=True, env=env(root),
                   capture_output=True, timeout=300)
    args_k = common(model, data, killed) + ["--save-every", "2"]
    proc = subprocess.Popen([sys.executable, "-m", "minidistill.train", *args_k], env=env(root),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = killed / "checkpoints" / "step_000004" / "state.pt"
    deadline = time.time() + 240
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert marker.exists(), "the run never wrote its step-4 checkpoint"
    assert not (killed / "adapter").exists(), "the run finished before it was killed; nothing was resumed"
    # A second start without --resume refuses to mix runs; with it, the run continues.
    refused = subprocess.run([sys.executable, "-m", "minidistill.train", *args_k], env=env(root),
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "--resume" in refused.stderr
    resumed = subprocess.run([sys.executable, "-m", "minidistill.train", *args_k, "--resume"], check=True,
                             env=env(root), capture_output=True, text=True, timeout=300)
    assert "note: flags differ" not in resumed.stdout
    a = adapter(straight)
    b = adapter(killed)
    assert a.keys() == b.keys() and len(a) > 0
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [r["step"] for r in metrics(killed)]
    assert steps == list(range(1, 9))  # rows past the checkpoint were logged once, not twice
    # Extending a finished run: allowed, and the changed flag is named.
    longer = subprocess.run([sys.executable, "-m", "minidistill.train", *args_k, "--resume", "--max-steps", "10"],
                            check=True, env=env(root), capture_output=True, text=True, timeout=300)
    assert "note: flags differ from the interrupted run: --max-steps 8 -> 10" in longer.stdout
    assert [r["step"] for r in metrics(killed)] == list(range(1, 11))


def test_ctrl_c_saves_at_a_step_boundary_and_resumes_identically(setup):
    root, model, data = setup
    straight, stopped = root / "straight-30", root / "ctrl-c"
    args = common(model, data, straight, steps=30) + ["--save-every", "0"]
    subprocess.run([sys.executable, "-m", "minidistill.train", *args], check=True, env=env(root),
                   capture_output=True, timeout=300)
    args_c = common(model, data, stopped, steps=30) + ["--save-every", "0"]
    proc = subprocess.Popen([sys.executable, "-m", "minidistill.train", *args_c], env=env(root),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log_file = stopped / "metrics.jsonl"
    deadline = time.time() + 240
    while (not log_file.exists() or len(log_file.read_text().splitlines()) < 3) and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted: saved" in err and "--resume" in err
    saved = latest_checkpoint(stopped)
    assert saved is not None and 3 <= int(saved.name.split("_")[1]) < 30
    subprocess.run([sys.executable, "-m", "minidistill.train", *args_c, "--resume"], check=True, env=env(root),
                   capture_output=True, timeout=300)
    a = adapter(straight)
    b = adapter(stopped)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ddp_two_processes_match_one(setup):
    root, model, data = setup
    one, two = root / "one", root / "two"
    base = common(model, data, one, steps=4) + ["--lora-dropout", "0.0", "--batch-size", "1"]
    ddp = common(model, data, two, steps=4) + ["--lora-dropout", "0.0", "--batch-size", "1", "--grad-accum", "1"]
    one_and_two_processes(root, one, two, base, ddp, atol=1e-6, rtol=1e-5)
    ra = metrics(one)
    rb = metrics(two)
    assert [r["loss"] for r in ra] == pytest.approx([r["loss"] for r in rb], rel=1e-6)
    # Adam hides a gradient scaled by the world size; the norm does not.
    assert [r["grad_norm"] for r in ra] == pytest.approx([r["grad_norm"] for r in rb], rel=1e-5)


def test_on_policy_ddp_two_processes_match_one(setup):
    # Each rollout's seed comes from its place in the prompt stream: two processes sample what one does.
    root, model, data = setup
    teacher = build_demo_model(root / "teacher", hidden=64, layers=2, init_seed=7)
    one, two = root / "onp-one", root / "onp-two"
    extra = ["--teacher", str(teacher), "--on-policy", "--rollout-tokens", "8", "--rollout-temperature", "2.0",
             "--lora-dropout", "0.0", "--batch-size", "1"]
    one_and_two_processes(root, one, two, [*common(model, data, one, steps=3), *extra],
                          [*common(model, data, two, steps=3), *extra, "--grad-accum", "1"], atol=1e-6, rtol=1e-5)
    ra = metrics(one)
    rb = metrics(two)
    assert [r["rollout_len_mean"] for r in ra] == [r["rollout_len_mean"] for r in rb]
    assert [r["reverse_kl"] for r in ra] == pytest.approx([r["reverse_kl"] for r in rb], rel=1e-5)


def test_fsdp_two_processes_match_one_and_resume(setup):
    root, model, data = setup
    one, two = root / "fsdp-one", root / "fsdp-two"
    base = common(model, data, one, steps=6) + ["--lora-dropout", "0.0", "--batch-size", "1", "--save-every", "3",
                                                "--eval-split", "0.05", "--eval-every", "3"]
    shard = common(model, data, two, steps=6) + ["--lora-dropout", "0.0", "--batch-size", "1", "--grad-accum", "1",
                                                 "--save-every", "3", "--eval-split", "0.05", "--eval-every", "3",
                                                 "--fsdp"]
    # fp32 sums in another order (reduce-scatter across two processes); Adam normalises each
    # update, which magnifies that noise on near-zero gradients to ~1e-5. A sharding or data bug
    # moves weights by ~lr (5e-3); a gradient-scale bug shows in grad_norm below.
    a, b = one_and_two_processes(root, one, two, base, shard, atol=2e-5, rtol=1e-4)
    rows_a = metrics(one)
    rows_b = metrics(two)
    train_a, train_b = [r for r in rows_a if "loss" in r], [r for r in rows_b if "loss" in r]
    assert len(train_a) == len(train_b) == 6
    assert [r["loss"] for r in train_a] == pytest.approx([r["loss"] for r in train_b], rel=1e-6)
    assert [r["grad_norm"] for r in train_a] == pytest.approx([r["grad_norm"] for r in train_b], rel=1e-5)
    # The eval loss covers both processes' shares of the held-out data: equal to one process's.
    assert [r["eval_loss"] for r in rows_a if "eval_loss" in r] == pytest.approx(
        [r["eval_loss"] for r in rows_b if "eval_loss" in r], rel=1e-6)
    # Resume a sharded run from its step-3 checkpoint (full-state optimizer) to the same adapter.
    import shutil
    shutil.rmtree(two / "checkpoints" / "step_000006")
    (two / "adapter" / "adapter_model.safetensors").unlink()
    r = subprocess.run([*TORCHRUN, *shard, "--resume"], env=env(root), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    c = adapter(two)
    for k in a:
        assert torch.equal(b[k], c[k]), k  # same processes, same reductions: bit for bit


@pytest.mark.parametrize("argv,msg", [
    (["--model", "x", "--data", "y", "--lora-rank", "8"], "unrecognized arguments: --lora-rank"),
    (["--model", "x"], "give both --model and --data"),
    (["--model", "x", "--data", "y", "--eval-every", "5"], "--eval-every needs --eval-data or --eval-split"),
    (["--model", "x", "--data", "y", "--schedule", "step"], "invalid choice: 'step'"),
    (["--model", "x", "--data", "y", "--grad-accum", "0"], "--grad-accum must be >= 1"),
    (["--model", "x", "--data", "y", "--lr", "0"], "--lr must be > 0, got 0.0"),
    (["--model", "x", "--data", "y", "--lr", "nan"], "--lr must be a finite number, got nan"),
    (["--model", "x", "--data", "y", "--kd-weight", "inf"], "--kd-weight must be a finite number"),
    (["--model", "x", "--data", "y", "--lora-alpha", "-1"], "--lora-alpha must be >= 0, got -1.0"),
    (["--model", "x", "--data", "y", "--lora-dropout", "1"], "--lora-dropout must be in [0, 1), got 1.0"),
    (["--model", "x", "--data", "y", "--resume", "--overwrite"], "use either --resume"),
])
def test_flag_errors(argv, msg, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert msg in capsys.readouterr().err


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--model", "--data", "--lora-targets", "--resume", "--grad-checkpointing", "--no-grad-checkpointing",
                 "--eval-split", "--keep-last", "--merge", "--log", "--quantize", "--on-policy", "--rollout-tokens",
                 "--rollout-temperature", "--samples-per-prompt", "--on-policy-mix", "--on-policy-estimator"):
        assert flag in text


@pytest.mark.parametrize("mode", ["online", "cache"])
def test_distillation_lowers_kd_loss(setup, mode):
    root, model, data = setup
    teacher = build_demo_model(root / "teacher", hidden=64, layers=2, init_seed=7)  # same tokenizer, other weights
    out = root / f"kd-{mode}"
    args = common(model, data, out, steps=16) + ["--kd-weight", "0.9", "--lora-dropout", "0.0"]
    if mode == "online":
        args += ["--teacher", str(teacher), "--kd-loss", "reverse"]
    else:
        cache = root / "teacher-cache"
        subprocess.run([sys.executable, "-m", "minidistill.distill", "cache-logits", "--teacher", str(teacher),
                        "--data", str(data), "--max-seq-len", "128", "--top-k", "8", "--output", str(cache),
                        "--device", "cpu"], check=True, env=env(root), capture_output=True, timeout=300)
        args += ["--teacher-cache", str(cache)]
    subprocess.run([sys.executable, "-m", "minidistill.train", *args], check=True, env=env(root),
                   capture_output=True, timeout=300)
    rows = metrics(out)
    assert all({"kd_loss", "ce_loss"} <= set(r) for r in rows)
    for r in rows:  # the reported loss is the 0.1 / 0.9 mix of its parts
        assert r["loss"] == pytest.approx(0.1 * r["ce_loss"] + 0.9 * r["kd_loss"], rel=1e-5)
    first, last = sum(r["kd_loss"] for r in rows[:3]) / 3, sum(r["kd_loss"] for r in rows[-3:]) / 3
    assert last < 0.8 * first, (first, last)


def test_on_policy_teacher_with_another_tokenizer_is_refused(setup, tmp_path):
    # (Online KD across tokenizers is cross-tokenizer KD's, tested with it; on-policy needs one tokenizer.)
    root, model, data = setup
    other = build_demo_model(tmp_path / "other", seed=5, hidden=64, layers=2)  # tokenizer trained on other data
    r = subprocess.run([sys.executable, "-m", "minidistill.train", *common(model, data, tmp_path / "o"),
                        "--teacher", str(other), "--on-policy"], env=env(root), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and "tokenize differently; on-policy distillation needs a shared tokenizer" in r.stderr


def test_flags_parse_to_config_types():
    cfg = parse_args(["--model", "m", "--data", "d", "--limit", "3", "--lr", "1e-3", "--no-packing",
                      "--quantize", "nf4", "--lora-targets", "all-linear"])
    assert cfg.data_config.limit == 3 and cfg.lr == 1e-3 and cfg.packing is False and cfg.quantize == "nf4"
    assert cfg.distill.teacher is None and cfg.max_steps == 0 and cfg.lora.targets == ("all-linear",)


def test_flags_without_model_and_data_change_the_demo(tmp_path, monkeypatch):
    from minidistill.train import _parse, demo_config

    monkeypatch.setenv("MINIDISTILL_CACHE", str(tmp_path))  # the demo model is built here
    cfg, demo = _parse(["--dtype", "bf16", "--max-steps", "7", "--lora-r", "4"])
    base = demo_config()
    assert demo and cfg.dtype == "bf16" and cfg.max_steps == 7 and cfg.lora.r == 4
    assert (cfg.model, cfg.data, cfg.batch_size, cfg.lr, cfg.data_config.max_seq_len) == (
        base.model, base.data, base.batch_size, base.lr, base.data_config.max_seq_len)
    assert cfg.lora.targets == ("all-linear",) and base.lora.targets == "all-linear"
    assert base.max_steps != 7 and base.lora.r != 4 and base.dtype != "bf16"  # the flags did change something
    assert _parse(["--model", "m", "--data", "d"]) == (parse_args(["--model", "m", "--data", "d"]), False)


def test_the_demo_folder_starts_fresh_unless_resumed(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MINIDISTILL_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # the demo writes runs/demo here
    quick = ["--max-steps", "2", "--save-every", "2", "--eval-every", "0", "--eval-split", "0", "--sample-max-tokens", "2"]
    main(quick)
    assert [r["step"] for r in metrics(tmp_path / "runs/demo")] == [1, 2]
    capsys.readouterr()
    main(quick[:1] + ["3"] + quick[2:] + ["--resume"])  # continues: the folder is kept
    assert "resumed from runs/demo/checkpoints/step_000002 at step 2" in capsys.readouterr().out
    assert [r["step"] for r in metrics(tmp_path / "runs/demo")] == [1, 2, 3]
    main(quick)  # not resumed: a fresh run in a fresh folder
    assert [r["step"] for r in metrics(tmp_path / "runs/demo")] == [1, 2]
    adapter = tmp_path / "runs/demo/adapter"  # what `generate --model demo --adapter ...` (printed) loads
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == "demo"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "adapter was trained on <the demo's folder>" warning
        md.load_adapter(md.load_model("demo"), adapter, verbose=False)


def test_bad_input_is_one_line_not_a_traceback(setup, tmp_path):
    root, model, data = setup
    r = subprocess.run([sys.executable, "-m", "minidistill.train", "--model", str(tmp_path / "nope"), "--data",
                        str(data)], env=env(root), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == f"error: model folder '{tmp_path / 'nope'}' does not exist"


def test_non_finite_steps_are_skipped_then_stop_the_run(setup, tmp_path):
    root, model, data = setup
    args = common(model, data, tmp_path / "nan", steps=30) + ["--lr", "1e30", "--warmup-steps", "0",
                                                              "--max-grad-norm", "0", "--save-every", "1"]
    r = subprocess.run([sys.executable, "-m", "minidistill.train", *args], env=env(root), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode != 0
    assert "non-finite loss or gradient, step skipped (1 so far)" in r.stdout
    assert "5 steps in a row had a non-finite loss or gradient; stopping. Last good checkpoint:" in r.stderr
    last = latest_checkpoint(tmp_path / "nan")
    assert last is not None and str(last) in r.stderr  # it names the checkpoint to go back to


def test_one_run_per_output_folder(setup, tmp_path):
    from minidistill.run_folder import RunLock

    root, model, data = setup
    out = tmp_path / "busy"
    out.mkdir()
    with RunLock(out):  # a run in progress holds the folder
        r = subprocess.run([sys.executable, "-m", "minidistill.train", *common(model, data, out, steps=1)],
                           env=env(root), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and f"{out} is in use by another run (pid {os.getpid()} on " in r.stderr
    assert not (out / "config.json").exists()
    done = tmp_path / "done"
    subprocess.run([sys.executable, "-m", "minidistill.train", *common(model, data, done, steps=1)], check=True,
                   env=env(root), capture_output=True, timeout=120)
    rows = (done / "metrics.jsonl").read_text()
    again = subprocess.run([sys.executable, "-m", "minidistill.train", *common(model, data, done, steps=1)],
                           env=env(root), capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "already holds" in again.stderr and "--overwrite" in again.stderr
    assert (done / "metrics.jsonl").read_text() == rows  # nothing of the first run was touched
    subprocess.run([sys.executable, "-m", "minidistill.train", *common(model, data, done, steps=2), "--overwrite"],
                   check=True, env=env(root), capture_output=True, timeout=120)
    assert [r["step"] for r in metrics(done)] == [1, 2]


def test_resume_with_other_data_is_refused(setup, tmp_path):
    root, model, data = setup
    out = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "minidistill.train", *common(model, data, out, steps=2)], check=True,
                   env=env(root), capture_output=True, timeout=120)
    r = subprocess.run([sys.executable, "-m", "minidistill.train", *common(model, data, out, steps=3), "--resume",
                        "--limit", "300"], env=env(root), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "the data differs from the run's (records 400 -> 300" in r.stderr
    ok = subprocess.run([sys.executable, "-m", "minidistill.train", *common(model, data, out, steps=3), "--resume",
                         "--limit", "300", "--allow-data-change"], env=env(root), capture_output=True, text=True,
                        timeout=120)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "--allow-data-change: training goes on with other data" in ok.stdout
    assert json.loads((out / "config.json").read_text())["allow_data_change"] is True
