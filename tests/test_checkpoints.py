"""Run checkpoints: written whole, verified against their manifest, damaged ones skipped on
resume, older ones pruned only after a new one verifies, a full disk loses nothing."""

from __future__ import annotations

import errno

import pytest
import torch

from minidistill.checkpoints import (LoopState, check_same_data, checkpoint_dirs, checkpoint_to_resume,
                                     load_checkpoint, read_loop_state, save_checkpoint, verify_checkpoint)
from minidistill.config import ModelConfig
from minidistill.errors import MinidistillError
from minidistill.lora import LoraConfig, apply_lora
from minidistill.model import Transformer

CFG = dict(model_type="llama", vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
           num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, rms_norm_eps=1e-5,
           rope_theta=10000.0, tie_word_embeddings=False, hidden_act="silu")


def tiny_run(seed: int = 0):
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_hf(CFG))
    apply_lora(model, LoraConfig(r=2, targets=("q_proj", "v_proj")), verbose=False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    model(torch.randint(0, 64, (1, 8))).sum().backward()
    opt.step()
    return model, opt


def test_round_trip_restores_weights_optimizer_state_and_rng(tmp_path):
    model, opt = tiny_run()
    state = LoopState(step=3, epoch=1, index=7, skipped_steps=1, best_eval_loss=0.5, data={"fingerprint": "ab"})
    path = save_checkpoint(tmp_path, state, model, opt)
    assert path.name == "step_000003" and verify_checkpoint(path) is None
    expected_next = torch.rand(3)  # the RNG stream right after the save
    fresh, fresh_opt = tiny_run(seed=1)
    loaded = load_checkpoint(path, fresh, fresh_opt)
    assert loaded == state
    assert torch.equal(torch.rand(3), expected_next)
    for (n, a), b in zip(model.named_parameters(), fresh.parameters()):
        if a.requires_grad:
            assert torch.equal(a, b), n
    sa, sb = opt.state_dict()["state"], fresh_opt.state_dict()["state"]
    assert all(torch.equal(sa[k]["exp_avg"], sb[k]["exp_avg"]) for k in sa)
    assert read_loop_state(path) == state


def test_damaged_newest_checkpoint_is_named_and_skipped(tmp_path):
    model, opt = tiny_run()
    for step in (2, 4):
        save_checkpoint(tmp_path, LoopState(step=step), model, opt, keep_last=5)
    newest = tmp_path / "checkpoints" / "step_000004" / "trainable.safetensors"
    newest.write_bytes(newest.read_bytes()[:-10])  # truncated
    notes = []
    chosen = checkpoint_to_resume(tmp_path, True, log=notes.append)
    assert chosen.name == "step_000002"
    assert len(notes) == 1 and "step_000004" in notes[0] and "trainable.safetensors is truncated" in notes[0]
    (tmp_path / "checkpoints" / "step_000002" / "optimizer.pt").unlink()
    with pytest.raises(MinidistillError, match="no complete checkpoint .* that verifies"):
        checkpoint_to_resume(tmp_path, True, log=notes.append)
    assert "optimizer.pt is missing" in notes[-1]


def test_a_flipped_byte_is_found_by_the_hash(tmp_path):
    model, opt = tiny_run()
    path = save_checkpoint(tmp_path, LoopState(step=1), model, opt)
    f = path / "state.pt"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    assert "state.pt is damaged" in verify_checkpoint(path)


def test_keep_last_prunes_only_after_the_new_one_verifies(tmp_path, monkeypatch):
    model, opt = tiny_run()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, LoopState(step=step), model, opt, keep_last=2)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step_000002", "step_000003"]
    import minidistill.checkpoints as ck

    monkeypatch.setattr(ck, "verify_checkpoint", lambda p: "a.bin is damaged" if p.name == "step_000004" else None)
    with pytest.raises(MinidistillError, match="did not verify"):
        save_checkpoint(tmp_path, LoopState(step=4), model, opt, keep_last=2)
    assert {"step_000002", "step_000003"} <= {p.name for p in checkpoint_dirs(tmp_path)}


def test_full_disk_during_a_checkpoint_keeps_the_earlier_ones(tmp_path, monkeypatch):
    model, opt = tiny_run()
    save_checkpoint(tmp_path, LoopState(step=1), model, opt)
    real_save = torch.save

    def full(obj, f, *a, **k):
        if str(f).endswith("state.pt"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(MinidistillError, match=r"disk full while writing checkpoint to .*step_000002 \(.* MiB written"):
        save_checkpoint(tmp_path, LoopState(step=2), model, opt)
    left = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert left == ["step_000001"]  # the partial temp folder is gone, the earlier checkpoint intact
    assert verify_checkpoint(tmp_path / "checkpoints" / "step_000001") is None


def test_fresh_run_refuses_checkpoints_and_resume_needs_one(tmp_path):
    with pytest.raises(MinidistillError, match="no complete checkpoint"):
        checkpoint_to_resume(tmp_path, True)
    assert checkpoint_to_resume(tmp_path, False) is None
    model, opt = tiny_run()
    save_checkpoint(tmp_path, LoopState(step=1), model, opt)
    with pytest.raises(MinidistillError, match="add --resume"):
        checkpoint_to_resume(tmp_path, False)


def test_changed_data_is_refused_unless_allowed():
    saved = {"fingerprint": "aa", "records": 100, "format": "messages", "steps_per_epoch": 12}
    check_same_data(saved, dict(saved), False, print)
    with pytest.raises(MinidistillError, match=r"records 100 -> 90; steps_per_epoch 12 -> 11.*--allow-data-change"):
        check_same_data(saved, dict(saved, fingerprint="bb", records=90, steps_per_epoch=11), False, print)
    with pytest.raises(MinidistillError, match="the samples' tokens"):
        check_same_data(saved, dict(saved, fingerprint="bb"), False, print)
    notes = []
    check_same_data(saved, dict(saved, fingerprint="bb", format="alpaca"), True, notes.append)
    assert "format 'messages' -> 'alpaca'" in notes[0]
    # The same samples cut into other batches (another --batch-size, or another packing): the
    # saved position would not continue the same epoch.
    with pytest.raises(MinidistillError, match=r"batches differ.*12 steps per epoch, 11 when saved.*--allow-data-change"):
        check_same_data(dict(saved, steps_per_epoch=11), dict(saved), False, print)
    check_same_data(dict(saved, steps_per_epoch=11), dict(saved), True, notes.append)
    assert "other batches" in notes[1]
    check_same_data({k: v for k, v in saved.items() if k != "steps_per_epoch"}, dict(saved), False, print)
