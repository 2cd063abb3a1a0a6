"""new_tokens.py: trainable rows for added tokens, saved as PEFT's trainable tokens (PEFT and
transformers as the oracle)."""

import json

import pytest
import torch

import minidistill as md
from minidistill import prepacked
from minidistill.new_tokens import TokenRowsEmbedding, has_token_rows, merge_token_rows
from model_fixtures import CONFIGS, ids, ours, randomise_lora, rel_err, write_checkpoint

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


THINK = ["<think>", "</think>"]


def model_and_tok(tmp_path, name: str, family: str, pad: int = 0):
    """A checkpoint whose vocabulary fits the family's test tokenizer (plus `pad` spare rows)."""
    tok_fixtures = pytest.importorskip("tok_fixtures")
    from minidistill.tokenizer import Tokenizer

    tok_fixtures.write_tokenizer(family, tmp_path / "base")
    n = len(Tokenizer.from_dir(tmp_path / "base"))
    ref = write_checkpoint(tmp_path / "base", name, vocab_size=n + pad)
    return ref, ours(tmp_path / "base"), Tokenizer.from_dir(tmp_path / "base")


def think_ids(tok, n: int = 10) -> torch.Tensor:
    x = ids(n, vocab=50)
    x[:, 2], x[:, 6] = tok.token_to_id("<think>"), tok.token_to_id("</think>")
    return x


@pytest.mark.parametrize("name,family", [("llama3", "llama-3.1"), ("llama3-tied", "llama-3.2")])
def test_add_tokens_grows_and_trains_only_new_rows(tmp_path, name, family):
    _, model, tok = model_and_tok(tmp_path, name, family)
    rows = model.model.embed_tokens.weight.shape[0]
    mean = model.model.embed_tokens.weight[:rows].mean(0)
    assert md.add_tokens(model, tok, THINK) == THINK
    assert md.add_tokens(model, tok, THINK) == []  # already there: nothing added
    new = [tok.token_to_id(t) for t in THINK]
    assert model.model.embed_tokens.weight.shape[0] == len(tok) == rows + 2 == model.config.vocab_size
    assert model.config.raw["vocab_size"] == len(tok) and model.lm_head.weight.shape[0] == len(tok)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == CONFIGS[name]["tie_word_embeddings"]
    assert torch.allclose(model.model.embed_tokens.new_rows, mean.expand(2, -1), atol=1e-6)
    md.apply_lora(model, md.LoraConfig(r=4), verbose=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "model.embed_tokens.new_rows" in trainable
    assert all("lora_" in n or n.endswith("new_rows") for n in trainable)
    model(think_ids(tok)).logsumexp(-1).sum().backward()
    assert model.model.embed_tokens.weight.grad is None
    assert model.model.embed_tokens.new_rows.grad.abs().sum(-1).gt(0).all()
    assert model(think_ids(tok)).shape[-1] == len(tok) and max(new) == len(tok) - 1


def test_add_tokens_only_absent_and_reuses_padded_rows(tmp_path):
    _, model, tok = model_and_tok(tmp_path, "phi4-mini", "phi-4-mini", pad=8)  # Phi-4-mini: 200064 rows > tokens
    rows = model.model.embed_tokens.weight.shape[0]
    assert md.add_tokens(model, tok, ["<|end|>", *THINK]) == THINK  # <|end|> exists already
    assert model.model.embed_tokens.weight.shape[0] == rows == model.config.vocab_size
    assert len(tok) == rows - 6


@pytest.mark.parametrize("name,family", [("llama3", "llama-3.1"), ("llama3-tied", "llama-3.2"), ("phi4-mini", "phi-4-mini")])
def test_new_tokens_round_trip_and_peft(tmp_path, name, family):
    ref, model, tok = model_and_tok(tmp_path, name, family)
    md.add_tokens(model, tok, THINK)
    md.apply_lora(model, md.LoraConfig(r=4, alpha=8), verbose=False)
    randomise_lora(model)
    with torch.no_grad():  # trained rows differ from their mean initialisation
        model.model.embed_tokens.new_rows.normal_(0, 0.2)
        if model.lm_head.new_rows is not model.model.embed_tokens.new_rows:
            model.lm_head.new_rows.normal_(0, 0.2)
    md.save_adapter(model, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    new = [tok.token_to_id(t) for t in THINK]
    assert cfg["trainable_token_indices"]["embed_tokens"] == new
    x = think_ids(tok)
    with torch.no_grad():
        want = model(x)
    # Into a base model that has never seen the tokens: the rows grow on load.
    again = md.load_adapter(ours(tmp_path / "base"), tmp_path / "adapter")
    with torch.no_grad():
        assert rel_err(again(x), want) <= 1e-6
    # PEFT, after the usual resize_token_embeddings of the base model.
    ref.resize_token_embeddings(len(tok))
    peft_model = peft.PeftModel.from_pretrained(ref, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert rel_err(peft_model(x).logits, want) <= 1e-4
    # Merged export: vocab_size updated, tokenizer written, transformers agrees.
    md.merge_lora(again)
    md.save_model(again, tmp_path / "merged", tokenizer=tok)
    out = tmp_path / "merged"
    assert json.loads((out / "config.json").read_text())["vocab_size"] == len(tok)
    assert (out / "tokenizer.json").exists()
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert rel_err(hf(x).logits, want) <= 1e-4


def test_merge_token_rows_writes_rows_and_restores_plain_modules(tmp_path):
    _, model, tok = model_and_tok(tmp_path, "llama3", "llama-3.1")
    md.add_tokens(model, tok, THINK)
    assert has_token_rows(model) and isinstance(model.model.embed_tokens, TokenRowsEmbedding)
    with torch.no_grad():
        model.model.embed_tokens.new_rows.normal_(0, 0.2)
        model.lm_head.new_rows.normal_(0, 0.2)
    x = think_ids(tok)
    with torch.no_grad():
        want = model(x)
    rows = model.model.embed_tokens.new_rows.detach().clone()
    head_rows = model.lm_head.new_rows.detach().clone()
    merge_token_rows(model)
    assert not has_token_rows(model) and type(model.model.embed_tokens) is torch.nn.Embedding
    assert type(model.lm_head) is prepacked.Linear  # the model's own class again
    new = [tok.token_to_id(t) for t in THINK]
    assert torch.equal(model.model.embed_tokens.weight[new], rows)
    assert torch.equal(model.lm_head.weight[new], head_rows)
    with torch.no_grad():
        got = model(x)
    # The same sums, but the new rows' logits now come out of the full head's matmul rather than a
    # 2-row one: on some CPUs (an AMD EPYC here) a column's bits then depend on the matmul's width.
    assert torch.equal(got[..., :min(new)], want[..., :min(new)])
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-6)
