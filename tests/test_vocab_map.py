"""The teacher -> student vocabulary map (minidistill.vocab_map) on the tiny real-format tokenizers of
tok_fixtures (Llama-3, Qwen2, Phi-3 SentencePiece-style, Phi-4-mini / SmolLM2 BPE, R1-Distill): tokens
compared by the bytes they stand for (`Ġ` / `▁` spaces, byte tokens), specials by content, the first-token
fallback, and the on-disk cache (a .npy keyed by both tokenizers)."""

import numpy as np
import pytest
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

import minidistill.vocab_map as vocab_map_mod
from minidistill.tokenizer import Tokenizer, load_tokenizer
from minidistill.vocab_map import build_vocab_map, token_bytes, vocab_map
from tok_fixtures import write_tokenizer

FAMILIES = ["llama-3.2", "qwen2.5", "phi-3", "phi-4-mini", "smollm2", "r1-distill-qwen"]


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    root = tmp_path_factory.mktemp("vm")
    return {f: load_tokenizer(str(write_tokenizer(f, root / f))) for f in FAMILIES}


def text_of(tok, tid):
    b = token_bytes(tok)[0][tid]
    return None if b is None else b.decode("utf-8", errors="replace")


def test_token_bytes_reads_each_convention(toks):
    llama, phi3 = toks["llama-3.2"], toks["phi-3"]
    b, added, special = token_bytes(llama)
    assert b[llama.token_to_id("Ġanswer")] == b" answer"  # byte-level: Ġ is the space byte
    assert b[llama.token_to_id("Ã")] == b"\xc3"  # the first byte of a two-byte character
    eot = llama.token_to_id("<|eot_id|>")
    assert b[eot] == b"<|eot_id|>" and added[eot] and special[eot]
    b, added, _ = token_bytes(phi3)
    assert b[phi3.token_to_id("▁answer")] == b" answer"  # SentencePiece: ▁ is the space
    assert b[phi3.token_to_id("<unk>")] is None  # stands for no text
    # SentencePiece byte fallback: <0xNN> is the byte NN.
    fb = HFTokenizer(models.BPE(vocab={"<unk>": 0, "<0xC3>": 1, "▁a": 2, "▁": 3, "a": 4}, merges=[("▁", "a")],
                                unk_token="<unk>", byte_fallback=True))
    fb.pre_tokenizer = pre_tokenizers.Metaspace()
    fb.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback()])
    assert token_bytes(Tokenizer(fb, {}, {}, {}, None))[0][:3] == [None, b"\xc3", b" a"]


@pytest.mark.parametrize("teacher,student", [("llama-3.2", "phi-3"), ("phi-3", "smollm2"), ("qwen2.5", "smollm2"),
                                             ("r1-distill-qwen", "phi-4-mini"), ("phi-4-mini", "llama-3.2")])
def test_equal_text_maps_across_families(toks, teacher, student):
    t, s = toks[teacher], toks[student]
    m = build_vocab_map(t, s)
    assert m.shape == (len(t),) and m.dtype == np.int64
    t_bytes, t_added, t_special = token_bytes(t)
    s_bytes, s_added, _ = token_bytes(s)
    s_text = {b for b, a in zip(s_bytes, s_added) if b is not None and not a}
    for tid, b in enumerate(t_bytes):
        if b is None or t_added[tid]:
            continue
        if b in s_text:  # rule 2: same bytes, same text
            assert s_bytes[m[tid]] == b, (t.id_to_token(tid), s.id_to_token(int(m[tid])))
        elif m[tid] >= 0:  # rule 3: the student's token is a prefix of the teacher's text
            assert b.startswith(s_bytes[m[tid]]) and len(s_bytes[m[tid]]) < len(b)
    # Mapped normal tokens are nearly all of them (every byte-level vocab holds the 256 bytes).
    normal = [tid for tid in range(len(t)) if not t_added[tid] and t_bytes[tid] is not None]
    assert (m[normal] >= 0).mean() > 0.5


def test_specials_map_by_content_only(toks):
    qwen, smol, llama = toks["qwen2.5"], toks["smollm2"], toks["llama-3.2"]
    m = build_vocab_map(qwen, smol)
    for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert m[qwen.token_to_id(t)] == smol.token_to_id(t)  # the same special on both sides
    m = build_vocab_map(llama, smol)
    assert m[llama.token_to_id("<|eot_id|>")] == -1  # no prefix fallback for specials ("<" would be wrong)
    extra = {llama.token_to_id("<|eot_id|>"): smol.token_to_id("<|im_end|>")}
    assert build_vocab_map(llama, smol, extra)[llama.token_to_id("<|eot_id|>")] == smol.token_to_id("<|im_end|>")
    # <think>: an added token on the R1 teacher, characters on Phi-4-mini -> the student's first token "<".
    r1, phi = toks["r1-distill-qwen"], toks["phi-4-mini"]
    m = build_vocab_map(r1, phi)
    assert phi.id_to_token(int(m[r1.token_to_id("<think>")])) == "<"


def test_added_token_on_both_sides_maps_to_itself():
    def tok(extra):
        t = HFTokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))},
                                   merges=[]))
        t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        t.add_tokens([AddedToken(x, normalized=False) for x in extra])
        return Tokenizer(t, {}, {}, {}, None)
    a, b = tok(["<think>", "</think>"]), tok(["</think>", "<think>"])  # other ids
    m = build_vocab_map(a, b)
    assert m[a.token_to_id("<think>")] == b.token_to_id("<think>") != a.token_to_id("<think>")
    assert m[a.token_to_id("</think>")] == b.token_to_id("</think>")


def test_identical_tokenizers_map_to_the_identity(toks):
    for f in ("llama-3.2", "phi-3", "r1-distill-qwen"):
        t = toks[f]
        m = build_vocab_map(t, t)
        b = token_bytes(t)[0]
        has_text = np.array([x is not None for x in b])
        assert (m[has_text] == np.arange(len(t))[has_text]).all(), f


def test_map_is_cached_on_disk_per_pair(toks, tmp_path, monkeypatch):
    t, s = toks["qwen2.5"], toks["phi-3"]
    first = vocab_map(t, s, cache_dir=tmp_path)
    files = list(tmp_path.glob("*.npy"))
    assert len(files) == 1 and np.array_equal(np.load(files[0], allow_pickle=False), first)

    def fail(*a, **k):
        raise AssertionError("rebuilt instead of read from the cache")
    monkeypatch.setattr(vocab_map_mod, "build_vocab_map", fail)
    again = vocab_map(t, s, cache_dir=tmp_path, extra={0: 5})
    assert np.array_equal(again[1:], first[1:]) and again[0] == 5  # extra pairs on top, not stored
    assert np.array_equal(np.load(files[0], allow_pickle=False), first)
    monkeypatch.undo()
    other = vocab_map(s, t, cache_dir=tmp_path)  # the other direction is another pair
    assert len(list(tmp_path.glob("*.npy"))) == 2 and other.shape == (len(s),)
