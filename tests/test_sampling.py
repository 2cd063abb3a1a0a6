"""The sampler and the ragged batched decoder: greedy equality with full recomputation over mixed
lengths (a 1-token prompt, LongRoPE's switch, a sliding window), rows leaving and joining the
batch, seeded sampling whatever the batch, the cache never read outside a row, stop strings,
max_new_tokens counted, the progress line."""

import copy
import gc
import sys
import weakref

import pytest
import torch

import minidistill as md
from minidistill import quant, replies, sampling
from minidistill.demo import build_demo_model
from minidistill.lora import NF4LoRALinear
from minidistill.progress import Progress
from minidistill.quant import NF4Linear
from minidistill.sampling import Completion, generate_ids, generate_ids_batch, iter_generate, sample_next
from model_fixtures import randomise_lora, write_checkpoint


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


def test_greedy_picks_the_first_of_tied_maxima_as_argmax_does():
    g = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.bfloat16):
        logits = torch.randint(0, 4, (64, 300), generator=g).to(dtype)  # many ties for the top
        logits[5, 17] = float("nan")  # a NaN wins, as in argmax
        got = sample_next(logits, 0.0)
        assert got.tolist() == logits.argmax(-1).tolist() and got[5] == 17
        assert all(int(logits[r].eq(logits[r].max()).nonzero()[0]) == int(got[r]) for r in range(64) if r != 5)


# phi4-mini: original context 32; prompts of 20 and 31 tokens cross it while generating, 40 starts past it.
# phi3-window: sliding window 7, shorter than every longer prompt.
@pytest.mark.parametrize("packed", [True, False], ids=["packed-prefill", "padded-prefill"])
@pytest.mark.parametrize("name, lengths", [("llama3-tied", [1, 9, 3, 17, 6]), ("phi4-mini", [1, 20, 40, 7, 31]),
                                           ("phi3-window", [1, 12, 5, 9, 2]), ("qwen2", [4, 1, 11, 6, 8])])
def test_batched_greedy_equals_recompute_over_mixed_lengths(tmp_path, monkeypatch, name, lengths, packed):
    monkeypatch.setattr(sampling, "_packed_prefill", lambda model: packed)  # padded: CUDA fp32's prefill
    model = load(tmp_path, name)
    prompts = prompts_of(lengths)
    want = [recompute_greedy(model, p, 14) for p in prompts]
    assert [generate_ids(model, p, max_new_tokens=14) for p in prompts] == want
    assert generate_ids_batch(model, prompts, max_new_tokens=14, batch_size=2) == want
    calls = forward_batches(model)
    assert generate_ids_batch(model, prompts, max_new_tokens=14, batch_size=8) == want
    if name == "phi4-mini" and packed:  # 40 (long factors) alone, 31 + 20 + 7 + 1 in one row, and the
        # two crossing rows again, whole (32 + 1 tokens)
        assert sorted((b, t) for b, t in calls if t > 1) == [(1, 33), (1, 33), (1, 40), (1, 59)]
    elif name == "phi4-mini":  # padded chunks (31 and 20 together; widths from 16 up a multiple of 16)
        assert sorted((b, t) for b, t in calls if t > 1) == [(1, 7), (1, 48), (1, 48), (1, 48), (2, 32)]
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
    assert {c.index: c.stop_id for c in done} == {i: None if len(w) == 12 else greedy[i][len(w)]
                                                  for i, w in enumerate(want)}  # the stop id that ended it
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


@pytest.mark.parametrize("packed", [True, False], ids=["packed-prefill", "padded-prefill"])
def test_cache_is_never_read_outside_a_row(tmp_path, monkeypatch, packed):
    monkeypatch.setattr(sampling, "_packed_prefill", lambda model: packed)
    model = load(tmp_path, "qwen2")
    prompts = prompts_of([1, 13, 4, 9, 2, 7])
    want = [recompute_greedy(model, p, 10) for p in prompts]
    real = model.new_cache

    def poisoned(batch_size, max_len, zeroed=True):  # every slot holds large garbage until written
        cache = real(batch_size, max_len, zeroed)
        for t in cache.k + cache.v:  # an uninitialised (prefill) cache may hold anything: NaN
            t.normal_(0, 1).add_(1e4) if zeroed else t.fill_(float("nan"))
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
    want = [replies.generate(model, tok, c, max_new_tokens=12) for c in chats]
    assert replies.generate_batch(model, tok, chats, max_new_tokens=12, batch_size=2) == want
    text = want[0]
    stop = text[4:7] if len(text) >= 7 else text[-2:]
    pieces = []
    cut = replies.generate(model, tok, chats[0], max_new_tokens=12, stop_strings=[stop], stream=pieces.append)
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


# ---- a 4-bit model decodes each layer once per call (quant.DecodedWeights) --------------------
def nf4_model(tmp_path, name="llama3", lora=False):
    write_checkpoint(tmp_path, name)
    model = md.load_model(tmp_path, dtype=torch.float32, quantize="nf4")
    if lora:
        md.apply_lora(model, md.LoraConfig(r=4, alpha=8), verbose=False)
        randomise_lora(model)
    return model.eval()


def nf4_layers(model):
    return [m for m in model.modules() if isinstance(m, (NF4Linear, NF4LoRALinear))]


def recording(monkeypatch):
    """Weak references to every weight a DecodedWeights keeps, and the caches built, from now on."""
    kept, caches, real = [], [], quant.dequantize_nf4

    def dequantize(packed, state, dtype=None):
        w = real(packed, state, dtype)
        kept.append(weakref.ref(w))
        return w

    class Recorded(quant.DecodedWeights):
        def __init__(self, budget_mb=None):
            super().__init__(budget_mb)
            caches.append(self)

        def close(self):
            self.at_close = (len(self.kept), self.kept_bytes, self.decodes, len(self.step_bufs))
            super().close()

    monkeypatch.setattr(quant, "dequantize_nf4", dequantize)
    monkeypatch.setattr(sampling, "DecodedWeights", Recorded)
    return kept, caches


def test_nf4_generation_equals_dequantized_weights_and_decodes_once(tmp_path, monkeypatch):
    model = nf4_model(tmp_path, "phi4-mini")  # fused qkv / gate_up, LongRoPE rows prefilled again
    dense = md.merge_lora(copy.deepcopy(model))  # every NF4 linear -> nn.Linear holding dequant(W)
    assert not nf4_layers(dense) and len(nf4_layers(model)) == 8
    prompts = prompts_of([1, 20, 9, 31])
    want = generate_ids_batch(dense, prompts, max_new_tokens=12, batch_size=3)
    kept, caches = recording(monkeypatch)
    assert generate_ids_batch(model, prompts, max_new_tokens=12, batch_size=3) == want
    (cache,) = caches
    n_kept, n_bytes, decodes, n_bufs = cache.at_close
    assert n_kept == decodes == 8 and n_bufs == 0  # each layer once, whatever the number of steps
    assert cache.budget == quant.DECODE_BUDGET_MB * 2**20  # the default on the CPU
    assert n_bytes == sum(m.in_features * m.out_features * 4 for m in nf4_layers(model))
    gc.collect()
    assert len(kept) == 8 and all(r() is None for r in kept)  # freed when the call ends
    assert cache.kept == {} and cache.kept_bytes == 0


def test_nf4_decode_budget_and_per_step_path(tmp_path, monkeypatch):
    model = nf4_model(tmp_path, "llama3", lora=True)  # NF4LoRALinear: the LoRA function's base
    prompts = prompts_of([3, 11, 6])
    want = [recompute_greedy(model, p, 10) for p in prompts]  # no cache active: decode per matmul
    sizes = [m.in_features * m.out_features * 4 for m in nf4_layers(model)]  # fp32 bytes, forward order
    _, caches = recording(monkeypatch)
    for budget_mb, n_fit in ((0, 0), ((sizes[0] + sizes[1] + 1) / 2**20, 2), (1e6, len(sizes))):
        got = list(iter_generate(model, prompts, max_new_tokens=10, batch_size=2, decode_budget_mb=budget_mb))
        assert {c.index: c.ids for c in got} == dict(enumerate(want)), budget_mb
        n_kept, n_bytes, decodes, n_bufs = caches[-1].at_close
        assert n_kept == n_fit and n_bytes == sum(sizes[:n_fit]) <= caches[-1].budget
        assert n_bufs == (n_fit < len(sizes))  # past the budget: one reused buffer (one dtype)
        assert decodes > len(sizes) if n_fit < len(sizes) else decodes == len(sizes)  # per step past it
    with pytest.raises(ValueError, match="budget_mb must be >= 0"):
        quant.DecodedWeights(-1)


def test_decoded_weights_never_seen_by_training(tmp_path):
    model = nf4_model(tmp_path, "llama3", lora=True)
    with pytest.raises(RuntimeError, match="under torch.no_grad"):
        with quant.DecodedWeights():
            pass
    seen = []
    gen = iter_generate(model, prompts_of([2, 9]), max_new_tokens=6, batch_size=1,
                        on_token=lambda i, t: seen.append(len(quant._scratch.active)))
    next(gen)  # suspended between yields: a training step here must decode afresh
    assert seen and all(n == 1 for n in seen) and not quant._scratch.active
    model(torch.randint(0, 96, (1, 5))).float().sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)
    assert len(list(gen)) == 1 and not quant._scratch.active
