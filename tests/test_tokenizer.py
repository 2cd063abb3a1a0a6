"""tokenizer.py without transformers: special ids from the files, encode/decode, chat offsets, add_tokens, save/reload."""

from __future__ import annotations

import json
import pickle

import pytest
from tokenizers import Tokenizer as HFTokenizer

from minidistill.tokenizer import Tokenizer, tokenizer_from_state, tokenizer_state
from tok_fixtures import CORPUS, FAMILIES, write_tokenizer

CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "<think>\n2 + 2 = 4.\n</think>\nThe answer is 4."},
        {"role": "user", "content": "Thanks!"}, {"role": "assistant", "content": "You are welcome."}]
TERMINATOR = {"phi-4-mini": "<|end|>", "phi-3": "<|end|>", "llama-3.1": "<|eot_id|>",
              "r1-distill-qwen": "<｜end▁of▁sentence｜>", "smollm2": "<|im_end|>", "qwen3": "<|im_end|>"}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("toks")
    return {f: write_tokenizer(f, root / f) for f in TERMINATOR}


def vocab_id(folder, token: str) -> int:
    """The id of `token` read straight from tokenizer.json (added tokens first, then the model vocab)."""
    js = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    added = {t["content"]: t["id"] for t in js["added_tokens"]}
    return added[token] if token in added else js["model"]["vocab"][token]


@pytest.mark.parametrize("family", sorted(TERMINATOR))
def test_special_ids_from_files(family, dirs):
    folder, spec = dirs[family], FAMILIES[family]
    tok = Tokenizer.from_dir(folder)
    assert tok.eos_id == vocab_id(folder, spec["eos"]) and tok.eos_token == spec["eos"]
    assert tok.bos_id == (vocab_id(folder, spec["bos"]) if spec["bos"] else None)
    assert tok.pad_id == (vocab_id(folder, spec["pad"]) if spec["pad"] else None)
    gen = json.loads((folder / "generation_config.json").read_text())["eos_token_id"]
    gen = gen if isinstance(gen, list) else [gen]
    assert tok.stop_ids == list(dict.fromkeys([tok.eos_id] + gen))
    assert tok.chat_format == spec["format"]
    assert len(tok) == json.loads((folder / "config.json").read_text())["vocab_size"]


@pytest.mark.parametrize("family", sorted(TERMINATOR))
def test_encode_decode_round_trip(family, dirs):
    tok = Tokenizer.from_dir(dirs[family])
    ref = HFTokenizer.from_file(str(dirs[family] / "tokenizer.json"))
    for text in CORPUS + ["  Ünïcödé — 中文 🙂\n\n tabs\tand  spaces ", TERMINATOR[family] + "x" + TERMINATOR[family]]:
        ids = tok.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False).ids  # never a BOS of the post-processor
        if family != "phi-3":  # Metaspace drops a leading space on decode, by design of the format
            assert tok.decode(ids) == text
    assert tok.encode(TERMINATOR[family]) == [tok.token_to_id(TERMINATOR[family])]  # specials are atomic
    if tok.bos_id is not None:
        assert tok.encode("hi", add_bos=True) == [tok.bos_id] + tok.encode("hi")
        with_bos = tok.encode(tok.bos_token + "hi", add_bos=True)
        assert with_bos == tok.encode(tok.bos_token + "hi") and with_bos.count(tok.bos_id) == 1  # no double BOS
    assert tok.decode(tok.encode("a" + TERMINATOR[family]), skip_special_tokens=True) == \
        ("a" if tok.backend.get_added_tokens_decoder()[tok.token_to_id(TERMINATOR[family])].special
         else "a" + TERMINATOR[family])


@pytest.mark.parametrize("family", sorted(TERMINATOR))
def test_chat_mask_from_character_offsets(family, dirs):
    tok = Tokenizer.from_dir(dirs[family])
    segments = tok.chat_segments(CONV)
    text = tok.render_chat(CONV)
    assert "".join(t for t, _ in segments) == text
    ids, mask = tok.encode_chat(CONV)
    assert ids == tok.encode(text) and len(mask) == len(ids)
    # Independent: each trained segment's char range, and the offsets of the plain encoding.
    enc = tok.backend.encode(text, add_special_tokens=False)
    pos, spans = 0, []
    for t, train in segments:
        if train:
            spans.append((pos, pos + len(t)))
        pos += len(t)
    assert len(spans) == 2  # one per assistant turn, each ending with the terminator
    for a, b in spans:
        assert text[a:b].endswith(TERMINATOR[family])
    want = [any(a <= s < b for a, b in spans) for s, _ in enc.offsets]
    assert mask == want
    # The trained tokens spell the trained segments (spaces aside: Metaspace decodes word starts alone).
    got = "".join(tok.decode([i]) for i, m in zip(ids, mask) if m)
    assert got.replace(" ", "") == "".join(text[a:b] for a, b in spans).replace(" ", "")
    gen_ids, gen_mask = tok.encode_chat(CONV[:2], add_generation_prompt=True)
    assert not any(gen_mask) and gen_ids == tok.encode(tok.render_chat(CONV[:2], add_generation_prompt=True))


def test_add_tokens_atomic_and_idempotent(dirs):
    tok = Tokenizer.from_dir(dirs["phi-4-mini"])
    n = len(tok)
    before = tok.encode("a<think>b</think>c")
    assert len(before) > 5  # the tags are BPE pieces in this vocabulary
    assert tok.add_tokens(["<think>", "</think>", "<think>"]) == ["<think>", "</think>"]
    assert len(tok) == n + 2 and tok.token_to_id("<think>") == n and tok.token_to_id("</think>") == n + 1
    ids = tok.encode("a<think>b</think>c")
    assert ids[1] == n and ids[3] == n + 1 and len(ids) == 5 and tok.decode(ids) == "a<think>b</think>c"
    assert tok.add_tokens(["<think>", "<|end|>"]) == []  # present already: nothing added


def test_save_and_reload_identical(dirs, tmp_path):
    tok = Tokenizer.from_dir(dirs["llama-3.1"])
    tok.add_tokens(["<think>", "</think>"])
    tok.save(tmp_path / "saved")
    back = Tokenizer.from_dir(tmp_path / "saved")
    for text in CORPUS + ["<think>x</think>y"]:
        assert back.encode(text) == tok.encode(text)
    assert back.encode_chat(CONV) == tok.encode_chat(CONV)
    assert (back.bos_id, back.eos_id, back.pad_id, back.stop_ids, back.chat_format, len(back)) == \
        (tok.bos_id, tok.eos_id, tok.pad_id, tok.stop_ids, tok.chat_format, len(tok))
    cfg = json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == tok.chat_template
    assert {v["content"] for v in cfg["added_tokens_decoder"].values()} >= {"<think>", "</think>", "<|eot_id|>"}
    gen = json.loads((tmp_path / "saved" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.stop_ids


def test_state_round_trip_and_identity(dirs):
    a, b = Tokenizer.from_dir(dirs["r1-distill-qwen"]), Tokenizer.from_dir(dirs["r1-distill-qwen"])
    assert tokenizer_state(a) == tokenizer_state(b)  # the cache key part is stable across loads
    back = tokenizer_from_state(tokenizer_state(a))
    assert type(back) is Tokenizer and back.chat_format == a.chat_format == "deepseek-r1"
    assert back.encode_chat(CONV) == a.encode_chat(CONV) and back.stop_ids == a.stop_ids
    b.add_tokens(["<new>"])
    assert tokenizer_state(a) != tokenizer_state(b)  # a changed vocabulary is another tokenizer
    forced = Tokenizer.from_dir(dirs["r1-distill-qwen"], chat_format="deepseek-r1-nothink")
    assert tokenizer_state(forced) != tokenizer_state(a)
    assert tokenizer_from_state(tokenizer_state(forced)).chat_format == "deepseek-r1-nothink"
    other = {"any": "object"}  # a tokenizer-like object that is not ours is pickled as it is
    assert tokenizer_from_state(tokenizer_state(other)) == other and tokenizer_state(other) == pickle.dumps(other)


def test_errors_name_the_problem(dirs, tmp_path):
    with pytest.raises(FileNotFoundError, match="has no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(ValueError, match="unknown chat format 'chatgpt'; supported formats: deepseek-r1"):
        Tokenizer.from_dir(dirs["phi-4-mini"], chat_format="chatgpt")
    with pytest.raises(ValueError, match=r"needs the tokens \['<\|im_start\|>', '<\|im_end\|>'\]"):
        Tokenizer.from_dir(dirs["phi-4-mini"], chat_format="chatml")
    cfg_path = dirs["phi-3"] / "tokenizer_config.json"
    folder = tmp_path / "plain"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes((dirs["phi-3"] / "tokenizer.json").read_bytes())
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("chat_template")
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    plain = Tokenizer.from_dir(folder)
    assert plain.chat_format == "none"
    with pytest.raises(ValueError, match="has no chat template; pass chat_format=NAME"):
        plain.encode_chat(CONV)
    with pytest.raises(ValueError, match="message 1 is"):
        Tokenizer.from_dir(dirs["phi-3"]).encode_chat([CONV[0], {"role": "bot", "content": "x"}])


def test_prepends_bos_follows_the_post_processor(dirs, tmp_path):
    want = {"llama-3.1": True, "r1-distill-qwen": False, "phi-4-mini": False, "phi-3": False, "smollm2": False}
    got = {f: Tokenizer.from_dir(dirs[f]).prepends_bos for f in want}
    assert got == want
    r1_llama = write_tokenizer("r1-distill-llama", tmp_path / "r1l")  # its tokenizer.json adds BOS too
    assert Tokenizer.from_dir(r1_llama).prepends_bos
    transformers = pytest.importorskip("transformers")
    for f in want:  # the oracle: does transformers' tokenizer(text) start with BOS?
        tok = Tokenizer.from_dir(dirs[f])
        ids = transformers.AutoTokenizer.from_pretrained(dirs[f])("a")["input_ids"]
        assert (tok.bos_id is not None and ids[0] == tok.bos_id) == want[f], f
