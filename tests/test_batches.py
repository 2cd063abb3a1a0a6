"""Batches: best-fit decreasing packing, collation, positions, document ids, the attention layout (cu_seqlens,
lengths, padding), label indices, model inputs, and the split across ranks."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from minidistill.attention import layout_from_document_ids
from minidistill.batches import EpochBatches, make_batches
from minidistill.config import ModelConfig
from minidistill.loss import IGNORE_INDEX as IGN
from minidistill.model import Transformer


def data(lengths, seed=0, weighted=False):
    """Samples (make_batches reads .samples, each with ids / labels / weights) of the given lengths:
    ids unique per sample, never the pad id 0; the first token untrained, the last label -100."""
    rng = np.random.default_rng(seed)
    samples = []
    for n in lengths:
        ids = rng.integers(3, 96, n)
        lab = np.full(n, IGN)
        lab[1:-1] = ids[2:]
        w = np.where(lab != IGN, 0.5, 0.0).astype(np.float32) if weighted else None
        samples.append(SimpleNamespace(ids=ids, labels=lab, weights=w))
    return SimpleNamespace(samples=samples)


def test_packed_batch_values():
    # Best fit, longest first: 7 opens row 0, 5 row 1; 3 fills row 1; 2 fits neither and opens
    # row 2; 1 fills row 0.
    d = data([5, 3, 1, 7, 2])
    batches = make_batches(d, 2, 8, shuffle=False)
    assert isinstance(batches, EpochBatches) and len(batches) == 2 and batches.plan == [[[3, 2], [0, 1]], [[4]]]
    b = batches[0]
    s = d.samples
    assert b.input_ids.tolist() == [list(s[3].ids) + list(s[2].ids), list(s[0].ids) + list(s[1].ids)]
    assert b.labels.tolist() == [list(s[3].labels) + list(s[2].labels), list(s[0].labels) + list(s[1].labels)]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 6, 0], [0, 1, 2, 3, 4, 0, 1, 2]]
    assert b.document_ids.tolist() == [[0] * 7 + [1], [0] * 5 + [1] * 3]
    lay = b.layout
    assert lay.shape == (2, 8) and lay.lengths == (7, 1, 5, 3) and lay.max_seqlen == 7 and lay.num_tokens == 16
    assert lay.cu_seqlens.dtype == torch.int32 and lay.cu_seqlens.tolist() == [0, 7, 8, 13, 16]
    assert lay.token_index is None and not lay.one_per_row  # rows full: nothing to drop
    assert lay.doc_index.tolist() == [0] * 7 + [1] + [2] * 5 + [3] * 3
    assert lay.doc_len.tolist() == [[7] * 7 + [1], [5] * 5 + [3] * 3]
    assert b.rows == [[3, 2], [0, 1]] and b.num_input_tokens == 16
    want = np.flatnonzero(np.concatenate([s[3].labels, s[2].labels, s[0].labels, s[1].labels]) != IGN)
    assert b.label_index.dtype == torch.int64 and b.label_index.tolist() == want.tolist()
    assert b.num_tokens == len(want) == int((b.labels != IGN).sum())
    last = batches[1]
    assert last.input_ids.shape == (1, 2) and last.layout.one_per_row and last.layout.lengths == (2,)


def test_packing_takes_the_longest_samples_first():
    # In this order, best fit would put the three 2s in one row and give each 6 a row of its own
    # (4 rows); longest first, every row is full.
    plan = make_batches(data([2, 2, 2, 6, 6, 6]), 1, 8, shuffle=False).plan
    rows = [r for (r,) in plan]
    assert len(rows) == 3 and sorted(i for r in rows for i in r) == list(range(6))
    assert all(sorted(r)[1] >= 3 and sorted(r)[0] < 3 for r in rows)  # a 6 and a 2 in each
    # Within best-fit decreasing's bound (11/9 of the fewest rows, plus one), every sample once,
    # no row over seq_len; the shuffle still decides which samples go together (seed, epoch).
    lengths = list(np.random.default_rng(7).integers(60, 380, 500))
    d = data(lengths)
    plans = {}
    for seed in (0, 1):
        batches = make_batches(d, 2, 512, seed=seed)
        rows = [r for step in batches.plan for r in step]
        assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
        assert max(sum(lengths[i] for i in r) for r in rows) <= 512
        assert len(rows) <= 11 / 9 * -(-sum(lengths) // 512) + 1
        plans[seed] = batches.plan
    assert plans[0] != plans[1]


def test_padding_is_left_out_of_the_layout():
    d = data([5, 3, 6], weighted=True)
    b = make_batches(d, 3, 8, packing=False, shuffle=False, pad_id=0)[0]
    # length-grouped: longest first; rows padded to the longest (6), padding positions from 0
    assert b.rows == [[2], [0], [1]] and b.document_ids is None and b.input_ids.shape == (3, 6)
    assert b.input_ids[1, 5] == 0 and b.input_ids[2, 3:].tolist() == [0, 0, 0]
    assert (b.labels[2, 3:] == IGN).all() and (b.weights[2, 3:] == 0).all()
    assert b.position_ids.tolist() == [list(range(6)), list(range(5)) + [0], list(range(3)) + [0, 1, 2]]
    lay = b.layout
    assert lay.lengths == (6, 5, 3) and lay.cu_seqlens.tolist() == [0, 6, 11, 14] and lay.one_per_row
    assert lay.token_index.tolist() == list(range(6)) + list(range(6, 11)) + list(range(12, 15))
    assert lay.doc_len.tolist() == [[6] * 6, [5] * 5 + [0], [3] * 3 + [0] * 3]
    assert b.num_input_tokens == lay.num_tokens == 14


def test_packed_rows_with_padding_tail():
    b = make_batches(data([6, 2, 3]), 2, 8, shuffle=False)[0]
    assert b.rows == [[0, 1], [2]] and b.input_ids.shape == (2, 8)
    assert b.document_ids[1].tolist() == [0, 0, 0, 1, 1, 1, 1, 1]  # padding: an id of its own
    assert b.layout.lengths == (6, 2, 3) and b.layout.token_index.tolist() == list(range(8)) + [8, 9, 10]
    # Callers that pass document_ids alone: runs of ids are documents, the padding one of them.
    derived = layout_from_document_ids(b.document_ids)
    assert derived.lengths == (6, 2, 3, 5) and derived.token_index is None and not derived.one_per_row
    assert derived.cu_seqlens.tolist() == [0, 6, 8, 11, 16] and derived.doc_len[1].tolist() == [3] * 3 + [5] * 5


@pytest.mark.parametrize("packing", [True, False])
def test_rank_split_is_a_round_robin_of_the_global_order(packing):
    d = data(list(np.random.default_rng(3).integers(2, 20, 23)))
    everyone = make_batches(d, 2, 32, packing=packing, seed=5, epoch=1)
    for world in (2, 3):
        ranks = [make_batches(d, 2, 32, packing=packing, seed=5, epoch=1, rank=r, world_size=world)
                 for r in range(world)]
        assert len({len(r) for r in ranks}) == 1
        for r, mine in enumerate(ranks):
            want = [everyone.plan[k] if k < len(everyone) else [] for k in range(r, len(mine) * world, world)]
            assert mine.plan == want
    # The filler batches of the last round: one padding token, nothing to attend or learn.
    filler = [b for r in range(3) for b in make_batches(d, 2, 32, packing=packing, seed=5, epoch=1, rank=r,
                                                         world_size=3) if not b.rows]
    assert len(filler) == -len(everyone) % 3
    for b in filler:
        assert b.input_ids.shape == (1, 1) and b.num_tokens == 0 and b.label_index.numel() == 0
        assert b.layout.num_tokens == 0 and b.layout.lengths == ()


def tiny_model(window=None):
    torch.manual_seed(0)
    return Transformer(ModelConfig(model_type="llama", vocab_size=96, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                   sliding_window=window))


@pytest.mark.parametrize("window", [None, 4])
def test_model_inputs_give_each_sample_what_it_gets_alone(window):
    d = data([5, 3, 1, 7, 2, 6])
    model = tiny_model(window)
    with torch.no_grad():
        for packing in (True, False):
            for b in make_batches(d, 2, 12, packing=packing, shuffle=False):
                inputs = b.model_inputs("cpu")
                assert set(inputs) == {"input_ids", "position_ids", "layout"}
                out = model(**inputs)
                for r, row in enumerate(b.rows):
                    t = 0
                    for i in row:
                        x = torch.as_tensor(d.samples[i].ids)[None]
                        assert torch.allclose(out[r, t: t + x.shape[1]], model(x)[0], atol=1e-5)
                        t += x.shape[1]


@pytest.mark.parametrize("packing", [True, False])
def test_rows_rounded_to_a_multiple_change_no_output(packing):
    d = data([5, 3, 1, 7, 2, 6])
    model = tiny_model(window=4)
    plain = make_batches(d, 2, 12, packing=packing, shuffle=False)
    rounded = make_batches(d, 2, 12, packing=packing, shuffle=False, pad_to_multiple=8)
    with torch.no_grad():
        for a, b in zip(plain, rounded):
            T = a.input_ids.shape[1]
            assert b.input_ids.shape[1] == -(-T // 8) * 8 and b.rows == a.rows
            assert b.num_tokens == a.num_tokens and b.num_input_tokens == a.num_input_tokens
            assert torch.equal(b.labels[:, :T], a.labels) and (b.labels[:, T:] == IGN).all()
            real = torch.arange(T)[None] < torch.tensor([sum(len(d.samples[i].ids) for i in r) for r in a.rows])[:, None]
            assert torch.allclose(model(**b.model_inputs("cpu"))[:, :T][real], model(**a.model_inputs("cpu"))[real],
                                  atol=1e-6)
    with pytest.raises(ValueError, match="pad_to_multiple must be >= 1"):
        make_batches(d, 2, 12, pad_to_multiple=0)


def test_empty_filler_batch_runs_forward_and_backward():
    d = data([4, 4, 4])
    b = make_batches(d, 1, 4, shuffle=False, rank=1, world_size=2)[1]  # 3 batches over 2 ranks
    assert not b.rows
    model = tiny_model(window=4)
    out = model(**b.model_inputs("cpu"))
    assert out.shape == (1, 1, 96) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in model.model.layers[0].parameters())


def test_pin_without_cuda_is_the_same_batch():
    b = make_batches(data([5, 3]), 2, 8)[0]
    if torch.cuda.is_available():
        pytest.skip("covered by the gpu test")
    assert b.pin() is b


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pinned_batch_copies_to_cuda():
    b = make_batches(data([5, 3, 9]), 2, 12)[0].pin()
    assert b.input_ids.is_pinned() and b.layout.cu_seqlens.is_pinned()
    got = b.model_inputs("cuda")
    torch.cuda.synchronize()
    assert got["input_ids"].is_cuda and torch.equal(got["input_ids"].cpu(), b.input_ids)
    assert got["layout"].cu_seqlens.is_cuda and got["layout"].lengths == b.layout.lengths


@pytest.mark.parametrize("packing", [True, False])
def test_fill_is_the_share_of_row_tokens_that_samples_hold(packing):
    assert make_batches(data([5, 3, 6]), 3, 8, packing=False, shuffle=False).fill() == 14 / 18
    assert make_batches(data([5, 3, 1, 7, 2]), 2, 8, shuffle=False, pad_to_multiple=4).fill() == 18 / 20
    d = data(list(np.random.default_rng(4).integers(2, 30, 41)))
    batches = make_batches(d, 3, 32, packing=packing, seed=2, pad_to_multiple=8, rank=1, world_size=2)
    collated = list(batches)
    assert any(not b.rows for b in collated) == packing  # a filler batch: one padding row, counted
    want = sum(b.num_input_tokens for b in collated) / sum(b.input_ids.numel() for b in collated)
    assert batches.fill() == pytest.approx(want, rel=1e-12) and 0 < want < 1
