"""The training loop's phases on a tiny model: setup, train_step, eval and checkpoints, and the
promise of no host sync inside a step."""

from __future__ import annotations

import pytest
import torch

from minidistill.demo import build_demo_model, write_demo_data
from minidistill.errors import MinidistillError
from minidistill.lora import LoraConfig
from minidistill.samples import DataConfig
from minidistill.train_config import TrainConfig
from minidistill.trainer import setup, train, train_step
from sync_count import CountSyncs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer")
    return root, build_demo_model(root / "model", hidden=64, layers=2), write_demo_data(root / "data.jsonl", n=120, seed=4)


def config(tiny, out, **kw) -> TrainConfig:
    root, model, data = tiny
    base = dict(model=str(model), data=str(data), output=str(out), max_steps=3, batch_size=2, grad_accum=3,
                lr=1e-3, warmup_steps=1, grad_checkpointing=False, sample_max_tokens=2, device="cpu", save_every=0,
                data_config=DataConfig(max_seq_len=128, cache_dir=str(root / "cache")), lora=LoraConfig(r=4))
    base.update(kw)
    return TrainConfig(**base)


def step_watched(run, micro, monkeypatch) -> tuple[dict, list[str], list]:
    """train_step(run, micro) with its sync ops (CountSyncs) and its Tensor.tolist reads recorded:
    (the metrics row, the syncs seen, the shapes read)."""
    reads = []
    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t.shape) or real_tolist(t))
    with CountSyncs() as c:
        row = train_step(run, micro)
    monkeypatch.setattr(torch.Tensor, "tolist", real_tolist)
    run.stream.close()
    return row, c.seen, reads


@pytest.mark.parametrize("recompute", [False, "block", "mlp"])
def test_a_step_has_one_host_read_and_no_sync_inside(tiny, tmp_path, monkeypatch, recompute):
    run = setup(config(tiny, tmp_path / "run", grad_checkpointing=bool(recompute), checkpoint_part=recompute or "block"))
    assert (run.model.gradient_checkpointing, run.model.checkpoint_part) == (bool(recompute), recompute or "block")
    micro = run.stream.take(run.state, 3)
    row, seen, reads = step_watched(run, micro, monkeypatch)
    assert seen == [], seen  # nothing in the step waits for the device...
    assert len(reads) == 1  # ...but the one read of the step's scalars
    assert row["step"] == 1 and row["tokens"] == sum(b.num_tokens for b in micro) > 0
    assert run.state.step == 1 and run.state.index == 3


def test_train_raises_on_bad_input_instead_of_exiting(tiny, tmp_path):
    with pytest.raises(ValueError, match="--eval-every needs --eval-data or --eval-split"):
        train(config(tiny, tmp_path / "a", eval_every=2))
    with pytest.raises(FileNotFoundError):
        train(config(tiny, tmp_path / "b", data=str(tmp_path / "missing.jsonl")))
    (tmp_path / "c" / "checkpoints" / "step_000001").mkdir(parents=True)
    (tmp_path / "c" / "checkpoints" / "step_000001" / "state.pt").write_bytes(b"")
    with pytest.raises(MinidistillError, match="add --resume"):
        train(config(tiny, tmp_path / "c"))


def test_stream_prefetch_gives_the_batches_of_the_position(tiny, tmp_path):
    from minidistill.batches import BatchStream

    run = setup(config(tiny, tmp_path / "run", grad_accum=2))
    run.stream = BatchStream(run.data, run.cfg, 0, 1, run.stream.pad_id, ahead=True)  # as on a GPU
    steps = len(run.stream.epoch_batches(0)) // 2 + 3  # into the second epoch
    ahead = [b for _ in range(steps) for b in run.stream.take(run.state, 2)]  # the thread collates ahead
    epoch, index, direct = 0, 0, []
    for _ in range(steps):
        got, epoch, index = run.stream._collate(epoch, index, 2)
        direct += got
    run.stream.close()
    assert run.state.epoch == epoch == 1
    assert run.state.index == index
    assert all(torch.equal(a.input_ids, b.input_ids) and a.rows == b.rows for a, b in zip(ahead, direct))


def test_rope_scaling_reaches_the_model_the_merged_config_and_the_adapter_readme(tiny, tmp_path):
    import json

    out = tmp_path / "run"
    summary = train(config(tiny, out, max_steps=1, grad_accum=1, rope_scaling="linear:2", merge=True))
    assert summary["steps"] == 1
    merged = json.loads((out / "merged" / "config.json").read_text())
    assert merged["rope_scaling"]["factor"] == 2.0 and merged["rope_scaling"]["rope_type"] == "linear"
    base = json.loads((tiny[1] / "config.json").read_text())
    assert merged["max_position_embeddings"] == 2 * base["max_position_embeddings"]
    assert "linear:2" in (out / "adapter" / "README.md").read_text()
    with pytest.raises(ValueError, match="rope"):
        train(config(tiny, tmp_path / "bad", rope_scaling="cubic:2"))


def test_compile_flag_compiles_the_blocks_and_trains_as_eager(tiny, tmp_path, monkeypatch):
    from minidistill.model import Transformer

    real, called = Transformer.compile_blocks, []

    def fast(self, backend="inductor", **kw):  # aot_eager: the same graphs, no C++ build on 2 cores
        called.append(backend)
        return real(self, backend="aot_eager", **kw)
    monkeypatch.setattr(Transformer, "compile_blocks", fast)
    eager = train(config(tiny, tmp_path / "eager", max_steps=2, grad_accum=1))
    compiled = train(config(tiny, tmp_path / "compiled", max_steps=2, grad_accum=1, compile=True))
    assert called == ["inductor"]
    assert compiled["final_loss"] == pytest.approx(eager["final_loss"], rel=1e-4)
