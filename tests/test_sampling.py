"""The sampler and the ragged batched decoder: greedy equality with full recomputation over mixed
lengths (a 1-token prompt, LongRoPE's switch, a sliding window), rows leaving and joining the
batch, seeded sampling whatever the batch, the cache never read outside a row, stop strings,
max_new_tokens counted, the progress line."""

import sys

import pytest
import torch

import minidistill as md
from minidistill import sampling
from minidistill.demo import build_demo_model
from minidistill.progress import Progress
from minidistill.sampling import Completion, generate_ids, generate_ids_batch, iter_generate, sample_next
from model_fixtures import write_checkpoint


def recompute_greedy(model, prompt, n, stop=()):
    """Greedy tokens by a full forward over the whole sequence at every step (no cache)."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            t = int(model(torch.tensor([seq]))[0, -1].argmax())
            if t in stop:
                break
            seq.append(t)
    return seq[len(prompt):]


def load(tmp_path, name):
    write_checkpoint(tmp_path, name)
    return md.load_model(tmp_path, dtype=torch.float32)


def forward_batches(model):
    """Record (batch, length) of every forward of `model` from now on."""
    calls = []
    model.register_forward_pre_hook(lambda m, args, kw: calls.append(tuple(args[0].shape)), with_kwargs=True)
    return calls


def prompts_of(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 96, (n,), generator=g).tolist() for n in lengths]


def test_sample_next_inverse_cdf_and_nucleus():
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])
    logits = probs.log()[None].expand(6, 4)
    u = torch.tensor([0.0, 0.14, 0.16, 0.64, 0.66, 0.999])
    # Cumulative mass in token order: 0.15, 0.65, 0.70, 1.0.
    assert sample_next(logits, 1.0, 1.0, u).tolist() == [0, 0, 1, 1, 2, 3]
    # Nucleus 0.7: tokens 1 and 3 (0.5 + 0.3), renormalised to 0.625 / 0.375, in probability order.
    assert sample_next(logits, 1.0, 0.7, u).tolist() == [1, 1, 1, 3, 3, 3]
    assert sample_next(logits, 0.0).tolist() == [1] * 6
    uniforms = torch.rand(20000, generator=torch.Generator().manual_seed(0))
    many = sample_next(probs.log()[None].expand(20000, 4), 1.0, 1.0, uniforms)
    assert torch.allclose(torch.bincount(many, minlength=4) / 20000, probs, atol=0.015)
    with pytest.raises(ValueError, match="one uniform per row"):
        sample_next(logits, 0.7)


# phi4-mini: original context 32; prompts of 20 and 31 tokens cross it while generating, 40 starts past it.
# phi3-window: sliding window 7, shorter than every longer prompt.
@pytest.mark.parametrize("name, lengths", [("llama3-tied", [1, 9, 3, 17, 6]), ("phi4-mini", [1, 20, 40, 7, 31]),
                                           ("phi3-window", [1, 12, 5, 9, 2]), ("qwen2", [4, 1, 11, 6, 8])])
def test_batched_greedy_equals_recompute_over_mixed_lengths(tmp_path, name, lengths):
    model = load(tmp_path, name)
    prompts = prompts_of(lengths)
    want = [recompute_greedy(model, p, 14) for p in prompts]
    assert [generate_ids(model, p, max_new_tokens=14) for p in prompts] == want
    assert generate_ids_batch(model, prompts, max_new_tokens=14, batch_size=2) == want
    calls = forward_batches(model)
    assert generate_ids_batch(model, prompts, max_new_tokens=14, batch_size=8) == want
    if name == "phi4-mini":  # prefill chunks (31 and 20 together), and the two crossing rows again, whole
        assert sorted((b, t) for b, t in calls if t > 1) == [(1, 7), (1, 33), (1, 33), (1, 40), (2, 31)]
    assert max(b for b, t in calls if t == 1) >= 3  # rows of different lengths really shared forwards


def test_finished_rows_leave_and_waiting_prompts_join(tmp_path):
    model = load(tmp_path, "llama3")
    prompts = prompts_of([5, 5, 5, 5, 9, 2])
    greedy = [recompute_greedy(model, p, 12) for p in prompts]
    stop = {greedy[0][1], greedy[3][6]}
    want = [recompute_greedy(model, p, 12, stop) for p in prompts]
    assert sorted(map(len, want)) != [len(want[0])] * 6  # rows really end at different steps
    calls = forward_batches(model)
    done = list(iter_generate(model, prompts, max_new_tokens=12, stop_ids=stop, batch_size=4))
    assert {c.index: c.ids for c in done} == dict(enumerate(want))
    assert {c.index: c.reason for c in done} == {i: "length" if len(w) == 12 else "stop" for i, w in enumerate(want)}
    decode = [b for b, t in calls if t == 1]
    assert max(decode) == 4  # rows of any length together, never more than batch_size
    useful = sum(len(w) - 1 for w in want if w) + sum(1 for w in want if w and len(w) < 12)  # steps that made a token
    assert sum(decode) <= 1.34 * useful  # finished rows do not keep being decoded


def test_seeded_sampling_is_the_same_whatever_the_batch(tmp_path):
    model = load(tmp_path, "phi4-mini")
    prompts = prompts_of([3, 12, 1, 25, 8])
    kw = dict(max_new_tokens=12, temperature=1.0, top_p=0.9)
    alone = [generate_ids(model, p, seed=11 + i, **kw) for i, p in enumerate(prompts)]
    for bs in (1, 3, 8):
        assert generate_ids_batch(model, prompts, seed=11, batch_size=bs, **kw) == alone
    order = [3, 0, 4, 1, 2]
    got = generate_ids_batch(model, [prompts[i] for i in order], seed=[11 + i for i in order], batch_size=2, **kw)
    assert got == [alone[i] for i in order]
    assert generate_ids_batch(model, prompts, seed=12, batch_size=8, **kw) != alone
    with pytest.raises(ValueError, match="2 seeds for 5 prompts"):
        generate_ids_batch(model, prompts, seed=[1, 2], **kw)


def test_cache_is_never_read_outside_a_row(tmp_path, monkeypatch):
    model = load(tmp_path, "qwen2")
    prompts = prompts_of([1, 13, 4, 9, 2, 7])
    want = [recompute_greedy(model, p, 10) for p in prompts]
    real = model.new_cache

    def poisoned(batch_size, max_len):  # every slot holds large garbage until written
        cache = real(batch_size, max_len)
        for t in cache.k + cache.v:
            t.normal_(0, 1).add_(1e4)
        return cache

    monkeypatch.setattr(model, "new_cache", poisoned)
    assert generate_ids_batch(model, prompts, max_new_tokens=10, batch_size=4) == want


def test_stop_strings_end_rows_and_are_cut_from_replies(tmp_path):
    model = load(tmp_path, "llama3")
    prompts = prompts_of([4, 9, 6])
    want = [recompute_greedy(model, p, 10) for p in prompts]
    decode = lambda ids: "".join(chr(65 + t % 26) for t in ids)  # noqa: E731  one letter per token
    stop = decode(want[1][3:5])
    hits = [min((k + 2 for k in range(9) if decode(w[k:k + 2]) == stop), default=10) for w in want]
    got = generate_ids_batch(model, prompts, max_new_tokens=10, stop_strings=[stop], decode=decode, batch_size=3)
    assert got == [w[:h] for w, h in zip(want, hits)] and len(got[1]) <= 5  # the ids that make the string stay
    with pytest.raises(ValueError, match="need `decode`"):
        generate_ids_batch(model, prompts, stop_strings=["x"])


def test_chat_replies_batched_equal_one_by_one_and_stop_strings(tmp_path):
    folder = build_demo_model(tmp_path / "demo")
    model, tok = md.load_model(folder, dtype=torch.float32).eval(), md.load_tokenizer(str(folder))
    chats = ["Ana has 3 pens and gets 2 more. How many pens does Ana have now?", "Hi",
             [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Ben has 9 coins."}]]
    want = [sampling.generate(model, tok, c, max_new_tokens=12) for c in chats]
    assert sampling.generate_batch(model, tok, chats, max_new_tokens=12, batch_size=2) == want
    text = want[0]
    stop = text[4:7] if len(text) >= 7 else text[-2:]
    pieces = []
    cut = sampling.generate(model, tok, chats[0], max_new_tokens=12, stop_strings=[stop], stream=pieces.append)
    assert cut == text[:text.find(stop)] and "".join(pieces) == cut


def test_zero_new_tokens_and_bad_arguments(tmp_path):
    model = load(tmp_path, "llama3")
    assert list(iter_generate(model, [[5], [6, 7]], max_new_tokens=0)) == [Completion(0, [], "length"),
                                                                          Completion(1, [], "length")]
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate_ids_batch(model, [[5], []])
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        generate_ids_batch(model, [[5]], batch_size=0)


def test_progress_plain_line_without_tqdm(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # `from tqdm import tqdm` now fails
    p = Progress(4, "eval", every_s=3600)
    assert p.bar is None
    p.update(tokens=100)
    assert capsys.readouterr().err == ""  # nothing before every_s, or before the last prompt
    p.update(done=4)
    line = capsys.readouterr().err
    assert line.startswith("eval: 4/4 prompts, ") and "tok/s" in line and "ETA 0 s" in line
