"""The offline demo: its data (deterministic, dolphin-r1 fields, answers that add up), and the tiny
checkpoint it writes, which the real loader and tokenizer read; "demo" as a model name."""

import json
import re

import torch

import minidistill as md
from minidistill import hub
from minidistill.demo import DEMO_VERSION, build_demo_model, make_records, write_demo_data


def test_records_are_deterministic_per_seed_and_correct():
    a, b = make_records(50, seed=4), make_records(50, seed=4)
    assert a == b and make_records(50, seed=5) != a
    assert make_records(10, seed=4) == a[:10]  # a longer run extends, not reshuffles
    for r in a:
        assert set(r) == {"messages", "reasoning", "answer"}  # the dolphin-r1 layout
        assert [m["role"] for m in r["messages"]] == ["user"]
        x, op, y, z = re.search(r"(\d+) ([+-]) (\d+) = (\d+)\.$", r["reasoning"]).groups()
        assert int(z) == (int(x) + int(y) if op == "+" else int(x) - int(y)) > 0
        assert r["answer"].endswith(f"The answer is {z}.")
        unit = re.search(r"has \d+ (\w+)\.", r["answer"]).group(1)
        assert unit.endswith("s") == (z != "1")  # "1 card", "2 cards"
    assert {"+", "-"} <= {re.search(r" ([+-]) ", r["reasoning"]).group(1) for r in a}  # both kinds appear


def test_write_demo_data_is_jsonl_of_the_records(tmp_path):
    path = write_demo_data(tmp_path / "sub" / "data.jsonl", n=7, seed=2)
    assert [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] == make_records(7, seed=2)


def test_the_checkpoint_is_read_by_the_real_loader_and_tokenizer(tmp_path):
    folder = build_demo_model(tmp_path / "m", hidden=64, layers=2)
    config = json.loads((folder / "config.json").read_text())
    model, tok = md.load_model(folder, dtype=torch.float32), md.load_tokenizer(str(folder))
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers, c.vocab_size) == (64, 2, config["vocab_size"])
    assert config["vocab_size"] % 64 == 0 and len(tok) <= config["vocab_size"]
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied head
    think, end = tok.token_to_id("<think>"), tok.token_to_id("</think>")
    assert tok.encode("<think>") == [think] and tok.encode("</think>") == [end]  # atomic, as in the R1 tokenizers
    assert tok.encode("<think>12</think>")[0] == think and tok.encode("<think>12</think>")[-1] == end
    assert tok.eos_id == tok.token_to_id("<|im_end|>") == config["eos_token_id"]
    text = tok.render_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"  # ChatML
    with torch.no_grad():
        logits = model(torch.tensor([tok.encode("Ana has 3 pens.")]))
    assert logits.shape[-1] == config["vocab_size"] and torch.isfinite(logits).all()
    # Near-uniform at the start (the init's final norm of 0.2), so training has room to show.
    assert 0.5 < logits.std().item() < 4.0


def test_weights_follow_init_seed_and_the_tokenizer_follows_seed(tmp_path):
    a = build_demo_model(tmp_path / "a", hidden=64, layers=1)
    twin = build_demo_model(tmp_path / "twin", hidden=64, layers=1, init_seed=7)
    again = build_demo_model(tmp_path / "again", hidden=64, layers=1)
    assert (a / "tokenizer.json").read_bytes() == (twin / "tokenizer.json").read_bytes()
    wa, wt, wg = (md.load_model(f, dtype=torch.float32).model.embed_tokens.weight for f in (a, twin, again))
    assert torch.equal(wa, wg) and not torch.equal(wa, wt)
    other = build_demo_model(tmp_path / "other", seed=5, hidden=64, layers=1)
    assert (other / "tokenizer.json").read_bytes() != (a / "tokenizer.json").read_bytes()
    # An existing checkpoint is kept, whatever the arguments now say.
    stamp = (a / "model.safetensors").stat().st_mtime_ns
    assert build_demo_model(a, hidden=128) == a and (a / "model.safetensors").stat().st_mtime_ns == stamp


def test_demo_is_a_model_name(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIDISTILL_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # no folder called "demo" here to shadow the name
    folder = hub.resolve_model_dir("demo")
    assert folder == tmp_path / "cache" / "demo" / f"model-v{DEMO_VERSION}"
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert hub.resolve_model_dir("demo") == folder  # built once, then found
