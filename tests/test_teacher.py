"""The distillation term of a TrainConfig (`make_kd`): none without a teacher; from a top-k cache
(checked against online forward KL when k covers the vocabulary) with its refusals; online from a
teacher model, and across tokenizers when it tokenizes differently from the student (xkd.py)."""

import json

import numpy as np
import pytest
import torch
from torch import nn

import minidistill as md
from minidistill.batches import make_batches
from minidistill.demo import build_demo_model, make_records
from minidistill.kd import chunked_kd_loss
from minidistill.samples import DataConfig, DataSummary, Sample, SFTData, prepare_data
from minidistill.teacher import make_kd
from minidistill.teacher_cache import cache_logits
from minidistill.train_config import DistillConfig, TrainConfig

CPU, F32 = torch.device("cpu"), torch.float32


def labelled(ids: list[int]) -> Sample:
    """A sample trained on its second half (labels[t] = ids[t + 1])."""
    L = len(ids)
    return Sample(list(ids), [-100] * (L // 2) + list(ids[L // 2 + 1:]) + [-100])


def random_data(n=6, vocab=32, seed=0) -> SFTData:
    g = np.random.default_rng(seed)
    return SFTData([labelled(g.integers(0, vocab, int(g.integers(6, 12))).tolist()) for _ in range(n)], DataSummary())


class EmbeddingTeacher(nn.Module):
    """A context-free teacher: its hidden state at a position is the embedding of that token, so
    the same tokens give the same targets alone or packed into a row."""

    def __init__(self, vocab: int, hidden: int = 8, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = nn.Parameter(torch.randn(vocab, hidden, generator=g))
        self.head_weight = nn.Parameter(torch.randn(vocab, hidden, generator=g))

    def forward(self, ids, return_hidden=True):
        return self.embed[ids]  # (B, T, H)


def kd_config(**distill) -> TrainConfig:
    return TrainConfig(model="student", data="d", loss_chunk_mb=0.01, distill=DistillConfig(**distill))


def student_inputs(batch, vocab=32, hidden=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    B, T = batch.input_ids.shape
    return torch.randn(B, T, hidden, generator=g, requires_grad=True), torch.randn(vocab, hidden, generator=g)


def test_no_teacher_no_term():
    logged = []
    assert make_kd(TrainConfig(), None, None, CPU, F32, logged.append) is None and logged == []


def test_cache_with_every_token_equals_online_forward_kl(tmp_path):
    data = random_data()
    teacher = EmbeddingTeacher(32)
    cache = cache_logits(teacher, data, tmp_path / "cache", top_k=32, dtype="fp32", temperature=2.0,
                         positions_per_shard=10)  # several shards
    kd = make_kd(kd_config(teacher_cache=str(cache), kd_temperature=2.0), None, data, CPU, F32, print)
    batch = make_batches(data, batch_size=2, seq_len=24, shuffle=True, seed=3)[0]
    assert len(batch.rows[0]) > 1  # packed rows, shuffled: the cache rows must follow batch.rows
    hidden, head = student_inputs(batch)
    got = kd(hidden, head, batch.labels, batch.label_index, batch, 40)
    want = chunked_kd_loss(hidden, head, teacher(batch.input_ids), teacher.head_weight.detach(), batch.labels,
                           kind="forward", temperature=2.0, num_items=40, positions=batch.label_index)
    assert got.num_tokens == batch.num_tokens == want.num_tokens
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    assert got.loss.item() > 0.1  # a real divergence, not a trivial zero


def test_cache_refusals_name_what_differs(tmp_path):
    data = random_data()
    wide = cache_logits(EmbeddingTeacher(48), data, tmp_path / "wide", top_k=4, dtype="fp32")
    kd = make_kd(kd_config(teacher_cache=str(wide)), None, data, CPU, F32, print)
    batch = make_batches(data, batch_size=2, seq_len=24, shuffle=False)[0]
    hidden, head = student_inputs(batch)  # a 32-row head
    with pytest.raises(ValueError, match=f"--teacher-cache {wide} holds ids of a 48-token vocabulary; the "
                                         r"student's head has 32 rows \(another tokenizer\?\)"):
        kd(hidden, head, batch.labels, batch.label_index, batch, None)
    hot = cache_logits(EmbeddingTeacher(32), data, tmp_path / "hot", top_k=4, temperature=2.0)
    with pytest.raises(ValueError, match="--teacher-cache was made at temperature 2.0; pass --kd-temperature 2.0"):
        make_kd(kd_config(teacher_cache=str(hot), kd_temperature=1.0), None, data, CPU, F32, print)
    with pytest.raises(ValueError, match="data fingerprint .* but these 5 samples give"):
        make_kd(kd_config(teacher_cache=str(hot), kd_temperature=2.0), None, random_data(5), CPU, F32, print)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher")
    student = build_demo_model(root / "student", hidden=64, layers=1)
    twin = build_demo_model(root / "twin", hidden=64, layers=1, init_seed=7)  # same tokenizer, other weights
    other = build_demo_model(root / "other", seed=5, hidden=64, layers=1)  # a tokenizer trained on other text
    tok = md.load_tokenizer(str(student))
    texts = [r["messages"][0]["content"] + " " + r["reasoning"] for r in make_records(4, seed=2)]
    data = SFTData([labelled(tok.encode(t)) for t in texts], DataSummary())
    return student, twin, other, tok, data


def test_online_teacher_gives_the_kd_of_its_own_forward(demo):
    student, twin, _, tok, data = demo
    logged = []
    cfg = kd_config(teacher=str(twin), kd_loss="reverse", kd_temperature=1.5)
    kd = make_kd(cfg, tok, data, CPU, F32, logged.append)
    teacher = md.load_model(twin, dtype=F32)
    assert logged == [f"teacher {twin}: {teacher.num_parameters():,} parameters, frozen"]
    model = md.load_model(student, dtype=F32)
    batch = make_batches(data, batch_size=2, seq_len=128, shuffle=False)[0]
    hidden = model(**batch.model_inputs(CPU), return_hidden=True)
    got = kd(hidden, model.head_weight, batch.labels, batch.label_index, batch, None)
    with torch.no_grad():
        t_hidden = teacher(**batch.model_inputs(CPU), return_hidden=True)
    want = chunked_kd_loss(hidden, model.head_weight, t_hidden, teacher.head_weight, batch.labels, kind="reverse",
                           temperature=1.5, positions=batch.label_index)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    assert got.loss.item() > 0.01
    assert got.coverage == 1.0 and got.num_covered is None  # the shared-tokenizer fast path, as before
    # The student as its own teacher: the same forward on the same batch, nothing to distil.
    own = make_kd(kd_config(teacher=str(student)), tok, data, CPU, F32, lambda *a: None)
    assert abs(own(hidden, model.head_weight, batch.labels, batch.label_index, batch, None).loss.item()) < 1e-6


def test_teacher_with_another_tokenizer_goes_across_tokenizers(demo, tmp_path, monkeypatch):
    student, _, other, tok, _ = demo
    monkeypatch.setenv("MINIDISTILL_CACHE", str(tmp_path))
    assert md.load_tokenizer(str(other)).encode("Ana has 12 pens") != tok.encode("Ana has 12 pens")
    records = tmp_path / "d.jsonl"
    records.write_text("".join(json.dumps(r) + "\n" for r in make_records(4, seed=2)))
    dc = DataConfig(cache_dir=str(tmp_path / "data"))
    data = prepare_data(str(records), tok, dc, log=lambda *a: None)
    logged = []
    cfg = TrainConfig(model=str(student), data=str(records), data_config=dc, distill=DistillConfig(teacher=str(other)))
    kd = make_kd(cfg, tok, data, CPU, F32, logged.append)
    assert logged[0].startswith("cross-tokenizer KD: 4 samples, 0 not found in the data files")
    model = md.load_model(student, dtype=F32)
    batch = make_batches(data, batch_size=2, seq_len=256, shuffle=False)[0]
    out = kd(model(**batch.model_inputs(CPU), return_hidden=True), model.head_weight, batch.labels,
             batch.label_index, batch, None)
    # Two BPEs trained on like text (other merges, other ids) split these words alike: nearly all aligned.
    assert out.num_tokens == batch.num_tokens and 0.9 * out.num_tokens <= out.num_covered <= out.num_tokens
    assert out.coverage == out.num_covered / out.num_tokens and out.loss.item() > 0.01
    cfg.distill.kd_loss = "jsd"
    with pytest.raises(ValueError, match=f"--kd-loss jsd needs a shared tokenizer; teacher {other} tokenizes "
                                         f"differently from {student}, which supports --kd-loss forward or uld"):
        make_kd(cfg, tok, data, CPU, F32, print)
