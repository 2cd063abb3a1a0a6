"""Cross-tokenizer alignment (minidistill.align) on hand-made strings and hand-made tokenizers whose
splits are known: digits split differently (Llama-3 1-3 digits vs one digit), leading spaces and
SentencePiece `▁` vs byte-level `Ġ`, a character split into bytes, `<think>` as an added token on
one side and as characters on the other; each expectation written out by hand."""

import numpy as np
import pytest
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from minidistill.align import align_conversation, match_tokens, sample_targets
from minidistill.tokenizer import Tokenizer, load_tokenizer
from minidistill.vocab_map import PrefixMaps, build_vocab_map
from tok_fixtures import write_tokenizer

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")


def hand_tok(merges=(), added=(), split=None) -> Tokenizer:
    """A byte-level BPE with the 256 byte symbols and exactly `merges` (pairs of symbols), ChatML."""
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=list(merges)))
    if split:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<|im_start|>", "<|im_end|>")])
    tok.add_tokens([AddedToken(t, normalized=False) for t in added])
    return Tokenizer(tok, {"eos_token": "<|im_end|>"}, {}, {}, None, chat_format="chatml")


def conv(answer: str) -> list[dict]:
    return [{"role": "user", "content": "q"}, {"role": "assistant", "content": answer}]


def pairs(student, teacher, answer):
    """Per student position: (its next token, the partner teacher position's next token or None, how:
    True strict / False loose only / the prefix bytes of an inner target / None)."""
    al = align_conversation(student, teacher, conv(answer))
    out = []
    for p in range(len(al.student_ids) - 1):
        s_next = student.id_to_token(al.student_ids[p + 1])
        if p in al.inner:
            q, prefix = al.inner[p]
            out.append((s_next, teacher.id_to_token(al.teacher_ids[q + 1]), prefix))
            continue
        q = al.loose.get(p)
        out.append((s_next, None if q is None else teacher.id_to_token(al.teacher_ids[q + 1]),
                    None if q is None else p in al.strict))
    return al, out


def test_match_tokens_on_hand_offsets():
    # Student "12","3" | teacher "1","23" over "123", then both "4": common boundaries 0, 3, 4.
    strict, loose, inner = match_tokens(np.array([0, 2, 3]), np.array([2, 3, 4]), np.array([True, True, True]),
                                        np.array([0, 1, 3]), np.array([1, 3, 4]), np.array([True, True, True]))
    assert loose.tolist() == [0, -1, 2]  # "12" and "1" start together; "3" starts inside the teacher's "23"
    assert strict.tolist() == [-1, -1, 2]  # the teacher's "1" ends inside the student's "12": no target
    # "3" lies inside the teacher's "23", which ends at a student boundary: the teacher's distribution
    # before "23" (after "1"), given the "2" the student has written, targets it.
    assert inner.tolist() == [-1, 1, -1]
    # Student "1","2","3" | teacher "123": targets inside the teacher token, conditioned on what was written.
    strict, loose, inner = match_tokens(np.array([0, 1, 2]), np.array([1, 2, 3]), np.array([True, True, True]),
                                        np.array([0]), np.array([3]), np.array([True]))
    assert strict.tolist() == [0, -1, -1] and inner.tolist() == [-1, 0, 0]


def test_digits_split_differently():
    one_digit = hand_tok()  # Qwen / SmolLM2 style: every digit its own token
    three = hand_tok(merges=[("1", "2"), ("12", "3")], split=LLAMA3_SPLIT)  # Llama-3 style: up to 3 digits
    # Llama-3-style teacher, one-digit student: a target before "1" (the teacher's "123" starts there and
    # ends at a student boundary), none inside the number.
    al, got = pairs(one_digit, three, "x 123 y")
    content = [g for g in got if g[0] in ("1", "2", "3")]
    # Before "1": the teacher's distribution before "123"; before "2" and "3" the same distribution,
    # conditioned on the "1" / "12" the student has written.
    assert content == [("1", "123", True), ("2", "123", b"1"), ("3", "123", b"12")]
    m = build_vocab_map(three, one_digit)
    assert one_digit.id_to_token(int(m[three.token_to_id("123")])) == "1"  # its mass goes to the student's "1"
    src, dst = PrefixMaps(three, one_digit).get(b"12")
    assert {three.id_to_token(int(t)): one_digit.id_to_token(int(s)) for t, s in zip(src, dst)} == {"123": "3"}
    # One-digit teacher, Llama-3-style student: its "1" says nothing about the student's "123" (loose only).
    al, got = pairs(three, one_digit, "x 123 y")
    assert [g for g in got if g[0] == "123"] == [("123", "1", False)]
    assert not al.inner  # nothing of the student's lies inside a teacher token
    # Both sides close the turn together: the end-of-turn tokens pair up.
    assert (one_digit.token_to_id("<|im_end|>"), three.token_to_id("<|im_end|>")) in al.turn_ends


def test_leading_spaces_and_sentencepiece_spaces(tmp_path):
    merged = hand_tok(merges=[("Ġ", "a")])  # " a" one token
    split = hand_tok()  # " ", "a"
    _, got = pairs(merged, split, "b a")
    assert ("Ġa", "Ġ", False) in got  # the teacher's space alone ends inside the student's " a"
    _, got = pairs(split, merged, "b a")
    assert ("Ġ", "Ġa", True) in got and ("a", "Ġa", b" ") in got  # " a" -> " " first, then "a" after " "
    # SentencePiece (Phi-3) teacher, byte-level (Llama 3) student that strips the content: aligned on the
    # stripped text, "▁answer" opposite "Ġanswer".
    phi3 = load_tokenizer(str(write_tokenizer("phi-3", tmp_path / "phi3")))
    llama = load_tokenizer(str(write_tokenizer("llama-3.2", tmp_path / "llama")))
    def named(answer):
        al = align_conversation(llama, phi3, conv(answer))
        return {(llama.id_to_token(al.student_ids[p + 1]), phi3.id_to_token(al.teacher_ids[q + 1]))
                for p, q in al.strict.items()}, al.turn_ends

    got, ends = named("  The answer is 4.")
    assert {("The", "The"), ("Ġanswer", "▁answer"), ("<|eot_id|>", "<|end|>")} <= got
    assert ends == {(phi3.token_to_id("<|end|>"), llama.token_to_id("<|eot_id|>"))}
    # Trailing spaces the student strips and the teacher keeps: no end-of-turn pair, none invented.
    got, ends = named("  The answer is 4.  ")
    assert ("Ġanswer", "▁answer") in got and not ends and not any(s == "<|eot_id|>" for s, _ in got)
    m = build_vocab_map(phi3, llama)
    assert llama.id_to_token(int(m[phi3.token_to_id("▁answer")])) == "Ġanswer"


def test_a_character_split_into_bytes():
    bytes_ = hand_tok()  # "é" is two byte tokens "Ã", "©" sharing one character's offsets
    whole = hand_tok(merges=[("Ã", "©")])  # "é" one token
    _, got = pairs(bytes_, bytes_, "café")
    assert ("Ã", "Ã", True) in got and ("©", "©", True) in got  # split alike: aligned byte by byte
    _, got = pairs(whole, bytes_, "café")
    assert ("Ã©", "Ã", False) in got  # the teacher's first byte is only a prefix of the student's "é"
    _, got = pairs(bytes_, whole, "café")
    assert ("Ã", "Ã©", True) in got and ("©", "Ã©", b"\xc3") in got
    m = build_vocab_map(whole, bytes_)
    assert m[whole.token_to_id("Ã©")] == bytes_.token_to_id("Ã")  # "é" -> its first byte on the student


def test_think_as_added_token_on_one_side():
    chars = hand_tok(merges=[("i", "n"), ("in", "k")])  # "<", "t", "h", "ink", ">"
    atomic = hand_tok(added=["<think>", "</think>"])
    answer = "<think>\nok\n</think>\n4"
    _, got = pairs(atomic, chars, answer)
    assert got[[g[0] for g in got].index("<think>")] == ("<think>", "<", False)  # characters say nothing of it
    assert ("Ċ", "Ċ", True) in got
    _, got = pairs(chars, atomic, answer)
    inside = [g for g in got if g[1] == "<think>"]
    # The teacher's <think> covers whole student tokens: the first, then each conditioned on the text so far.
    assert inside == [("<", "<think>", True), ("t", "<think>", b"<"), ("h", "<think>", b"<t"),
                      ("ink", "<think>", b"<th"), (">", "<think>", b"<think")]
    m = build_vocab_map(atomic, chars)
    assert chars.id_to_token(int(m[atomic.token_to_id("<think>")])) == "<"
    assert build_vocab_map(atomic, atomic)[atomic.token_to_id("<think>")] == atomic.token_to_id("<think>")


def test_sample_targets_follow_the_labelled_positions():
    tok = hand_tok()
    al = align_conversation(tok, tok, conv("ab"))
    ids, mask = tok.encode_chat(conv("ab"))
    assert ids == al.student_ids
    labels = np.full(len(ids), -100)
    labels[:-1] = np.where(mask[1:], np.asarray(ids[1:]), -100)  # as samples.py shifts them
    trained = [i for i in range(len(ids) - 1) if mask[i + 1]]
    assert [tok.id_to_token(ids[i + 1]) for i in trained] == ["a", "b", "<|im_end|>"]
    strict, loose, prefix = sample_targets(al, labels)
    # The same tokenizer on both sides: every labelled position is its own teacher position.
    assert strict.tolist() == loose.tolist() == trained and prefix == [b""] * 3


@pytest.mark.parametrize("answer", ["", "   "])
def test_turn_without_shared_text_is_skipped(answer):
    tok = hand_tok()
    al = align_conversation(tok, tok, conv(answer))
    assert al.turns_skipped == 1 and not al.strict
