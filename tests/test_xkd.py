"""Cross-tokenizer KD (minidistill.xkd): the mapped forward KL and the ULD term against dense autograd
references (values and gradients, chunked, with a temperature, padded heads and unmapped ids), the
reduction to today's KD with one tokenizer, and end to end: `make_kd` with a teacher of another
tokenizer (online, and from a mapped top-k cache) and a tiny `train --teacher` run that reports
coverage through KDOutput."""

import json

import numpy as np
import pytest
import torch

import minidistill as md
from minidistill.batches import make_batches
from minidistill.demo import build_demo_model, make_records
from minidistill.kd import chunked_kd_loss
from minidistill.samples import DataConfig, prepare_data
from minidistill.teacher import cross_plan, make_kd
from minidistill.teacher_cache import TeacherCache, cache_logits
from minidistill.train_config import DistillConfig, TrainConfig
from minidistill.xkd import map_index, mapped_kd_loss, uld_loss, xkd_reference
from model_fixtures import write_tiny_model
from tok_fixtures import write_tokenizer

CPU, F32 = torch.device("cpu"), torch.float32


def inputs(seed=0, Vs=40, Vt=56, Hs=8, Ht=6, rows=2, T=9, n=11):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(rows, T, Hs, generator=g, requires_grad=True)
    ws = (torch.randn(Vs, Hs, generator=g) * 0.7).requires_grad_(True)
    ht = torch.randn(3, T + 2, Ht, generator=g)
    wt = torch.randn(Vt, Ht, generator=g)
    s_pos = torch.randperm(rows * T, generator=g)[:n]
    t_pos = torch.randint(0, 3 * (T + 2), (n,), generator=g)
    return hs, ws, ht, wt, s_pos, t_pos


def vmap(Vt_real, Vs, seed=0):
    g = np.random.default_rng(seed)
    m = g.integers(0, Vs - 4, Vt_real)  # many teacher ids onto one student id; the last student rows unused
    m[g.random(Vt_real) < 0.2] = -1  # unmapped teacher ids
    return m


def dense_inputs(hs, ws, ht, wt, s_pos, t_pos, Vt_real):
    zs = hs.reshape(-1, hs.shape[-1])[s_pos] @ ws.t()
    zt = (ht.reshape(-1, ht.shape[-1])[t_pos] @ wt.t())[:, :Vt_real]
    return zs, zt


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_mapped_kl_matches_the_dense_reference(T):
    hs, ws, ht, wt, s_pos, t_pos = inputs()
    m = vmap(50, 40)  # the teacher's head has 6 padding rows past its 50 real ids
    got = mapped_kd_loss(hs, ws, ht, wt, torch.as_tensor(m), s_pos, t_pos, temperature=T, num_items=20, chunk_size=4)
    got.loss.backward()
    g_h, g_w = hs.grad.clone(), ws.grad.clone()
    hs.grad = ws.grad = None
    zs, zt = dense_inputs(hs, ws, ht, wt, s_pos, t_pos, 50)
    want = xkd_reference(zs, zt, torch.as_tensor(m), kind="forward", temperature=T) / 20
    want.backward()
    torch.testing.assert_close(got.loss, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_h, hs.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g_w, ws.grad, rtol=1e-4, atol=1e-6)
    assert got.loss.item() > 0.05 and got.num_tokens == 11
    # A MapIndex built once gives the same loss (the training path: no host sync per step).
    again = mapped_kd_loss(hs, ws, ht, wt, map_index(m, 40), s_pos, t_pos, temperature=T, num_items=20, chunk_size=5)
    torch.testing.assert_close(again.loss, got.loss, rtol=1e-6, atol=1e-7)


def test_per_pair_maps_match_the_reference_on_each_group():
    """Prefix-conditioned maps (one per pair, through map_ids): each group of pairs against the dense
    reference with its own map."""
    hs, ws, ht, wt, s_pos, t_pos = inputs(seed=7, n=13)
    maps = [vmap(50, 40, seed=1), vmap(50, 40, seed=2), vmap(50, 40, seed=3)]
    map_ids = np.random.default_rng(4).integers(0, 3, 13)
    got = mapped_kd_loss(hs, ws, ht, wt, [torch.as_tensor(m) for m in maps], s_pos, t_pos, temperature=1.5,
                         num_items=13, chunk_size=4, map_ids=map_ids)
    got.loss.backward()
    g_h = hs.grad.clone()
    hs.grad = None
    zs, zt = dense_inputs(hs, ws, ht, wt, s_pos, t_pos, 50)
    want = sum(xkd_reference(zs[torch.as_tensor(map_ids == g)], zt[torch.as_tensor(map_ids == g)],
                             torch.as_tensor(maps[g]), temperature=1.5) for g in range(3)) / 13
    want.backward()
    torch.testing.assert_close(got.loss, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_h, hs.grad, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="map_ids has 12 entries for 13 position pairs"):
        mapped_kd_loss(hs, ws, ht, wt, [maps[0]], s_pos, t_pos, map_ids=map_ids[1:])


def test_position_with_only_unmapped_teacher_mass_gets_nothing():
    hs, ws, ht, wt, s_pos, t_pos = inputs(n=3)
    wt = torch.zeros_like(wt)
    wt[:, 0] = 0.0
    m = np.full(56, -1)
    got = mapped_kd_loss(hs, ws, ht, wt, m, s_pos, t_pos, chunk_size=2)
    got.loss.backward()
    assert got.loss.item() == 0.0 and hs.grad.abs().max().item() == 0.0
    none = torch.zeros(0, dtype=torch.long)  # a batch without any aligned pair: zero, not an error
    assert mapped_kd_loss(hs, ws, ht, wt, np.arange(56) % 40, none, none, num_items=5).loss.item() == 0.0
    assert uld_loss(hs, ws, ht, wt, none, none, num_items=5).loss.item() == 0.0
    with pytest.raises(ValueError, match="points at student id 40 but the student head has 40 rows"):
        mapped_kd_loss(hs, ws, ht, wt, np.full(56, 40), s_pos, t_pos)


def test_uld_matches_the_dense_reference():
    hs, ws, ht, wt, s_pos, t_pos = inputs(seed=3)
    got = uld_loss(hs, ws, ht, wt, s_pos, t_pos, temperature=1.5, teacher_vocab=50, chunk_size=3)
    got.loss.backward()
    g_h, g_w = hs.grad.clone(), ws.grad.clone()
    hs.grad = ws.grad = None
    zs, zt = dense_inputs(hs, ws, ht, wt, s_pos, t_pos, 50)
    want = xkd_reference(zs, zt, None, kind="uld", temperature=1.5) / 11
    want.backward()
    torch.testing.assert_close(got.loss, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_h, hs.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g_w, ws.grad, rtol=1e-4, atol=1e-6)
    assert got.loss.item() > 0.05


def test_identity_map_reduces_exactly_to_todays_kd():
    g = torch.Generator().manual_seed(5)
    hs = torch.randn(2, 7, 8, generator=g, requires_grad=True)
    ws = torch.randn(30, 8, generator=g)
    ht = torch.randn(2, 7, 6, generator=g)
    wt = torch.randn(30, 6, generator=g)
    labels = torch.full((2, 7), -100)
    labels[:, 2:6] = 1
    pos = (labels.reshape(-1) != -100).nonzero().squeeze(1)
    want = chunked_kd_loss(hs, ws, ht, wt, labels, kind="forward", temperature=2.0, num_items=9, chunk_size=3)
    gw = torch.autograd.grad(want.loss, hs)[0]
    got = mapped_kd_loss(hs, ws, ht, wt, np.arange(30), pos, pos, temperature=2.0, num_items=9, chunk_size=3)
    gg = torch.autograd.grad(got.loss, hs)[0]
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gg, gw, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The demo student (byte-level BPE, ChatML, atomic <think>) and a tiny teacher with the Llama-3
    fixture tokenizer and chat format; records and their prepared samples."""
    root = tmp_path_factory.mktemp("xkd")
    student = build_demo_model(root / "student", hidden=32, layers=1)
    teacher = write_tiny_model(write_tokenizer("llama-3.2", root / "teacher"), hidden=32)
    data_file = root / "d.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in make_records(8, seed=1)))
    tok = md.load_tokenizer(str(student))
    dc = DataConfig(cache_dir=str(root / "datacache"))
    data = prepare_data(str(data_file), tok, dc, log=lambda *a: None)
    return root, student, teacher, data_file, tok, dc, data


def cfg_of(student, data_file, dc, **distill):
    kd_loss = distill.pop("kd_loss", "forward")
    cfg = TrainConfig(model=str(student), data=str(data_file), data_config=dc, loss_chunk_mb=0.01,
                      distill=DistillConfig(**distill))
    cfg.distill.kd_loss = kd_loss  # "uld" is not yet among the CLI choices (train_config.py)
    return cfg


def test_online_kd_with_another_tokenizer(pair, monkeypatch, tmp_path):
    monkeypatch.setenv("MINIDISTILL_CACHE", str(tmp_path))  # the vocabulary map's cache
    root, student, teacher, data_file, tok, dc, data = pair
    logged = []
    kd = make_kd(cfg_of(student, data_file, dc, teacher=str(teacher), kd_temperature=2.0), tok, data, CPU, F32,
                 logged.append)
    assert logged[0].startswith("cross-tokenizer KD: 8 samples, 0 not found in the data files")
    plan = cross_plan(str(data_file), dc, tok, md.load_tokenizer(str(teacher)), data, lambda *a: None)
    model, t_model = md.load_model(student, dtype=F32), md.load_model(teacher, dtype=F32)
    batch = make_batches(data, batch_size=2, seq_len=256, shuffle=True, seed=2)[0]
    hidden = model(**batch.model_inputs(CPU), return_hidden=True)
    out = kd(hidden, model.head_weight, batch.labels, batch.label_index, batch, 50)
    # The same loss by hand: the teacher on its own rows, the plan's pairs, the map.
    order = [i for row in batch.rows for i in row]
    rows, _ = plan.teacher_rows(order, 0)
    sel, flat, map_ids = plan.pairs(order, rows.shape[1])
    with torch.no_grad():
        th = t_model(rows, return_hidden=True)
    want = mapped_kd_loss(hidden, model.head_weight, th, t_model.head_weight, plan.maps(model.head_weight.shape[0]),
                          batch.label_index[sel], flat, temperature=2.0, num_items=50, map_ids=map_ids)
    torch.testing.assert_close(out.loss, want.loss, rtol=1e-5, atol=1e-6)
    assert out.num_tokens == batch.num_tokens and out.num_covered == len(sel)
    assert 0.2 < out.coverage == len(sel) / batch.num_tokens < 1.0  # aligned where the tokenizers agree
    out.loss.backward()
    # ULD adds the loose-only positions.
    kd_u = make_kd(cfg_of(student, data_file, dc, teacher=str(teacher), kd_loss="uld"), tok, data, CPU, F32,
                   lambda *a: None)
    u = kd_u(hidden.detach(), model.head_weight, batch.labels, batch.label_index, batch, 50)
    assert u.num_covered > out.num_covered and u.loss.item() > 0
    with pytest.raises(ValueError, match="--kd-loss reverse needs a shared tokenizer"):
        make_kd(cfg_of(student, data_file, dc, teacher=str(teacher), kd_loss="reverse"), tok, data, CPU, F32, print)


def test_mapped_cache_equals_online_when_k_covers_the_vocabulary(pair, monkeypatch, tmp_path):
    monkeypatch.setenv("MINIDISTILL_CACHE", str(tmp_path))
    root, student, teacher, data_file, tok, dc, data = pair
    t_tok = md.load_tokenizer(str(teacher))
    plan = cross_plan(str(data_file), dc, tok, t_tok, data, lambda *a: None)
    t_model = md.load_model(teacher, dtype=F32)
    model = md.load_model(student, dtype=F32)
    Vs = model.head_weight.shape[0]
    folder = cache_logits(t_model, data, tmp_path / "cache", top_k=Vs, dtype="fp32", vocab_size=Vs, plan=plan,
                          positions_per_shard=60)
    cache = TeacherCache(folder)
    assert cache.meta["mapped"]["coverage"] == pytest.approx(plan.coverage()) and len(cache.meta["shards"]) > 1
    kd_cache = make_kd(cfg_of(student, data_file, dc, teacher_cache=str(folder)), tok, data, CPU, F32, print)
    kd_online = make_kd(cfg_of(student, data_file, dc, teacher=str(teacher)), tok, data, CPU, F32, lambda *a: None)
    batch = make_batches(data, batch_size=2, seq_len=256, shuffle=True, seed=4)[0]
    hidden = model(**batch.model_inputs(CPU), return_hidden=True)
    a = kd_cache(hidden, model.head_weight, batch.labels, batch.label_index, batch, None)
    b = kd_online(hidden, model.head_weight, batch.labels, batch.label_index, batch, None)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-4, atol=1e-5)
    assert a.num_covered == b.num_covered and a.coverage == b.coverage < 1.0
    assert a.loss.item() > 0.05


def test_train_with_a_teacher_of_another_tokenizer(pair, monkeypatch, tmp_path):
    """A tiny `train --teacher` run end to end; coverage reaches the trainer through KDOutput."""
    import minidistill.trainer as trainer_mod
    from minidistill.train import parse_args

    monkeypatch.setenv("MINIDISTILL_CACHE", str(tmp_path / "cache"))
    root, student, teacher, data_file, tok, dc, data = pair
    seen = []
    real = trainer_mod.make_kd

    def recording(*a, **k):
        kd = real(*a, **k)

        def wrapped(*b):
            out = kd(*b)
            seen.append(out.coverage)
            return out
        return wrapped
    monkeypatch.setattr(trainer_mod, "make_kd", recording)
    out = tmp_path / "run"
    cfg = parse_args(["--model", str(student), "--data", str(data_file), "--output", str(out), "--max-steps", "3",
                      "--batch-size", "2", "--grad-accum", "1", "--max-seq-len", "256", "--lr", "5e-3",
                      "--warmup-steps", "1",
                      "--no-grad-checkpointing", "--sample-max-tokens", "2", "--device", "cpu",
                      "--teacher", str(teacher), "--kd-weight", "0.5"])
    summary = trainer_mod.train(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["kd_loss"] > 0 for r in rows)
    assert len(seen) == 3 and all(0.2 < c < 1.0 for c in seen)
    assert [r["kd_coverage"] for r in rows] == pytest.approx(seen)
    assert summary["kd_coverage"] == pytest.approx(sum(seen) / 3, abs=0.05)  # token-weighted over the run
