"""Greedy generation with the KV cache equals full recomputation and transformers' generate;
the `python -m minidistill.generate` command (one prompt, streamed)."""

import runpy

import pytest
import torch

import minidistill as md
from minidistill import replies, sampling
from minidistill.demo import build_demo_model
from minidistill.sampling import generate_ids
from model_fixtures import write_checkpoint

transformers = pytest.importorskip("transformers")

def cli_main(name: str):
    """The main() of `python -m minidistill.<name>`, loaded without binding the module as the package
    attribute (importing minidistill.generate would hide the function md.generate)."""
    return runpy.run_module(f"minidistill.{name}")["main"]



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
    real = sampling.sample_next
    monkeypatch.setattr(sampling, "sample_next", lambda logits, *a: seen.append(logits[0]) or real(logits, *a))
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
    assert generate_ids(model, prompt, max_new_tokens=8, temperature=1.0, seed=4) != a
    with pytest.raises(ValueError, match="at least one prompt token"):
        generate_ids(model, [])


def test_cli_streams_one_reply(tmp_path, capsys):
    folder = build_demo_model(tmp_path / "demo")
    model, tok = md.load_model(folder, dtype=torch.float32).eval(), md.load_tokenizer(str(folder))
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Ana has 3 pens."}]
    want = replies.generate(model, tok, msgs, max_new_tokens=10)
    cli_main("generate")(["--model", str(folder), "--prompt", "Ana has 3 pens.", "--system", "be brief",
                  "--max-new-tokens", "10", "--device", "cpu"])
    assert capsys.readouterr().out == want + "\n"


def test_cli_refuses_bad_flag_combinations(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli_main("generate")(["--model", str(tmp_path), "--prompts", "p.jsonl"])
    assert "--prompts needs --output FILE" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main("generate")(["--model", str(tmp_path), "--prompt", "x", "--num-samples", "0"])
    assert "--num-samples must be >= 1, got 0" in capsys.readouterr().err
