"""Greedy generation with the KV cache equals full recomputation and transformers' generate."""

import pytest
import torch

import minidistill as md
import importlib

gen = importlib.import_module("minidistill.generate")
from minidistill.generate import _next_token, generate_ids
from model_fixtures import write_checkpoint

transformers = pytest.importorskip("transformers")


def greedy_by_recompute(model, prompt, n):
    """Greedy tokens and each step's logits, recomputing the whole sequence every step."""
    seq, logits = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logits.append(model(torch.tensor([seq]))[0, -1])
            seq.append(int(logits[-1].argmax()))
    return seq[len(prompt):], torch.stack(logits)


# phi4-mini: a 20-token prompt and 30 new tokens cross original_max_position_embeddings (32),
# where LongRoPE switches factors and the cache must be rebuilt; phi3-window: sliding window 7.
@pytest.mark.parametrize("name", ["llama3-tied", "phi4-mini", "phi3-window", "qwen2"])
def test_greedy_cache_equals_recompute_and_reference(tmp_path, name, monkeypatch):
    ref = write_checkpoint(tmp_path, name)
    model = md.load_model(tmp_path, dtype=torch.float32)
    prompt = torch.randint(3, 96, (20,), generator=torch.Generator().manual_seed(5)).tolist()
    seen = []  # the logits each cached step samples from, not only the argmax
    monkeypatch.setattr(gen, "_next_token", lambda logits, *a: seen.append(logits) or int(logits.argmax()))
    got = generate_ids(model, prompt, max_new_tokens=30)
    want_ids, want_logits = greedy_by_recompute(model, prompt, 30)
    assert got == want_ids
    err = ((torch.stack(seen) - want_logits).abs().max() / want_logits.abs().max()).item()
    assert err <= 1e-5
    want = ref.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False, eos_token_id=None,
                        pad_token_id=0)[0, 20:].tolist()
    assert got == want


def test_stop_ids_and_sampling_seed(tmp_path):
    write_checkpoint(tmp_path, "llama3")
    model = md.load_model(tmp_path, dtype=torch.float32)
    prompt = [5, 6, 7]
    greedy = generate_ids(model, prompt, max_new_tokens=8)
    stopped = generate_ids(model, prompt, max_new_tokens=8, stop_ids=[greedy[3]])
    assert stopped == greedy[:greedy.index(greedy[3])]
    a = generate_ids(model, prompt, max_new_tokens=8, temperature=1.0, seed=3)
    b = generate_ids(model, prompt, max_new_tokens=8, temperature=1.0, seed=3)
    assert a == b and len(a) == 8


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    g = torch.Generator().manual_seed(0)
    picks = {_next_token(logits, 1.0, 0.7, g) for _ in range(200)}
    assert picks == {0, 1}
    assert _next_token(logits, 0.0, 1.0, None) == 0
