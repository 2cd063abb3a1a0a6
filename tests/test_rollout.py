"""Rollouts: sampled like the sampler samples (seeds per rollout), the model's mode kept, and the
training batch they become: labels on the sampled tokens only (the stop token included),
nothing on the prompt or after a stop, a cut rollout trained up to the cut."""

from __future__ import annotations

import pytest
import torch

from minidistill.demo import build_demo_model
from minidistill.loader import load_model
from minidistill.loss import IGNORE_INDEX
from minidistill.rollout import RolloutBatch, Rollouts, rollout, rollout_batch, rollout_samples
from minidistill.sampling import generate_ids
from minidistill.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = build_demo_model(tmp_path_factory.mktemp("rollout") / "model", hidden=64, layers=2)
    return load_model(folder, dtype=torch.float32), load_tokenizer(str(folder))


def test_labels_are_the_sampled_tokens_and_nothing_else():
    r = Rollouts(prompt_ids=[[5, 6, 7], [8, 9]], completion_ids=[[10, 11, 2], [12, 13, 14, 15]],
                 finished=[True, False], prompt_index=[0, 1])
    s = rollout_samples(r)
    # finished: prompt 5 6 7, sampled 10 11, stop 2 (labelled); the last position predicts nothing
    assert s[0].ids.tolist() == [5, 6, 7, 10, 11, 2]
    assert s[0].labels.tolist() == [IGNORE_INDEX, IGNORE_INDEX, 10, 11, 2, IGNORE_INDEX]
    # cut at the limit: every sampled token up to the cut is labelled, nothing after it exists
    assert s[1].labels.tolist() == [IGNORE_INDEX, 12, 13, 14, 15, IGNORE_INDEX]
    b = rollout_batch(r, seq_len=16, pad_id=0, pad_to_multiple=8)
    assert isinstance(b, RolloutBatch) and b.rollouts is r
    assert b.input_ids.shape == (1, 16)  # both packed into one row of 12 tokens, padded to 16
    assert b.num_tokens == 3 + 4 == sum(r.lengths) and b.num_input_tokens == 12
    flat_ids, flat_labels = b.input_ids.reshape(-1), b.labels.reshape(-1)
    assert torch.equal(b.label_index, (flat_labels != IGNORE_INDEX).nonzero().squeeze(1))
    labelled = flat_labels[b.label_index]
    assert labelled.tolist() == [10, 11, 2, 12, 13, 14, 15]
    # each label is the next input token of its own rollout: no label crosses into the next sample
    assert torch.equal(labelled, flat_ids[b.label_index + 1])
    assert b.position_ids[0, :12].tolist() == [0, 1, 2, 3, 4, 5] * 2


def test_rows_stay_within_seq_len_and_a_long_rollout_widens_it():
    r = Rollouts([[1, 2]] * 3, [[3] * 6] * 3, [False] * 3, [0, 1, 2])  # 8 tokens each
    b = rollout_batch(r, seq_len=10)
    assert b.input_ids.shape[0] == 3 and b.num_tokens == 18  # one per row: two would not fit in 10
    wide = rollout_batch(r[:1], seq_len=4)  # longer than seq_len: the row takes the rollout whole
    assert wide.input_ids.shape == (1, 8) and wide.num_tokens == 6


def test_rollout_samples_as_the_sampler_does_and_keeps_the_mode(tiny):
    model, tok = tiny
    model.train()
    prompts = ["Ana has 3 pens and gets 2 more. How many pens does Ana have now?", "Ben has 9 coins."]
    r = rollout(model, tok, prompts, max_new_tokens=6, temperature=5.0, samples_per_prompt=2, seed=40)
    assert model.training  # put back after sampling in eval mode
    assert len(r) == 4 and r.prompt_index == [0, 0, 1, 1]
    for j in range(4):
        ids = tok.encode_chat([{"role": "user", "content": prompts[j // 2]}], add_generation_prompt=True)[0]
        assert r.prompt_ids[j] == ids
        alone = generate_ids(model.eval(), ids, max_new_tokens=6, temperature=5.0, stop_ids=tok.stop_ids, seed=40 + j)
        model.train()
        assert r.completion_ids[j][:len(alone)] == alone  # rollout j draws from seed + j, whatever the batch
        assert r.finished[j] == (len(r.completion_ids[j]) == len(alone) + 1)
        assert len(r.completion_ids[j]) <= 6
    assert r.completion_ids[0] != r.completion_ids[1]  # two samples of one prompt differ
    again = rollout(model, tok, prompts, max_new_tokens=6, temperature=5.0, samples_per_prompt=2, seed=40)
    assert again.completion_ids == r.completion_ids


def test_a_stop_token_ends_the_rollout_and_is_kept(tiny):
    model, tok = tiny
    prompt = tok.encode_chat([{"role": "user", "content": "Hi"}], add_generation_prompt=True)[0]
    greedy = generate_ids(model.eval(), prompt, max_new_tokens=4)
    stop = greedy[2]  # make the third greedy token the stop id
    r = rollout(model, tok, [prompt], max_new_tokens=4, temperature=0.0, stop_ids=[10**6, stop])  # which one ended it
    first = greedy.index(stop)
    assert r.finished == [True] and r.completion_ids == [greedy[:first] + [stop]]
    b = rollout_batch(r)
    assert b.labels.reshape(-1)[b.label_index].tolist() == greedy[:first] + [stop]
    cut = rollout(model, tok, [prompt], max_new_tokens=2, temperature=0.0, stop_ids=[10**6])
    assert cut.finished == [False] and cut.lengths == [2]


def test_bad_arguments_say_what_to_do(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="3 seeds for 2 rollouts"):
        rollout(model, tok, ["a", "b"], max_new_tokens=2, seed=[1, 2, 3])
    with pytest.raises(ValueError, match="no stop id"):
        rollout(model, tok, ["a"], max_new_tokens=2, stop_ids=[])
    with pytest.raises(ValueError, match="samples_per_prompt must be >= 1"):
        rollout(model, tok, ["a"], samples_per_prompt=0)
