"""Chat formats and the tokenizer against transformers' apply_chat_template on each family's real template."""

import json
import re

import pytest

import minidistill as md
from minidistill.chat import FORMATS, detect_chat_format
from minidistill.tokenizer import Tokenizer
from tok_fixtures import FAMILIES, write_tokenizer

transformers = pytest.importorskip("transformers")

TERMINATOR = {"phi-4-mini": "<|end|>", "phi-4-mini-reasoning": "<|end|>", "phi-4": "<|im_end|>",
              "phi-3": "<|end|>", "phi-3.5": "<|end|>", "llama3": "<|eot_id|>", "deepseek-r1": "<｜end▁of▁sentence｜>",
              "smollm2": "<|im_end|>", "qwen2.5": "<|im_end|>", "qwen3": "<|im_end|>"}
THINK = "<think>\nLet me think step by step. 2 + 2 = 4.\n</think>\n\nThe answer is 4."

CONVERSATIONS = {
    "single": [{"role": "user", "content": "What is 2 + 2?"}],
    "system": [{"role": "system", "content": "You are a helpful assistant."},
               {"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}],
    "multi_think": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2 + 2?"},
                    {"role": "assistant", "content": THINK}, {"role": "user", "content": "Thanks!"},
                    {"role": "assistant", "content": "You are welcome."}],
    "whitespace": [{"role": "user", "content": "  Hello there  \n"},
                   {"role": "assistant", "content": "  Hi!  \n\n"}, {"role": "user", "content": "\nBye"}],
    "empty_system": [{"role": "system", "content": ""}, {"role": "user", "content": "Hello"},
                     {"role": "assistant", "content": "\n\nHi"}, {"role": "user", "content": "x"},
                     {"role": "assistant", "content": ""}],
    "think_history": [{"role": "user", "content": "Solve x^2 - 5x + 6 = 0"}, {"role": "assistant", "content": THINK},
                      {"role": "user", "content": "And 3 + 3?"}],
}


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory):
    return {fam: write_tokenizer(fam, tmp_path_factory.mktemp(fam.replace(".", "_"))) for fam in FAMILIES}


def oracle_ids(hf, messages, gen, **kw):
    out = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen, **kw)
    if isinstance(out, dict) or hasattr(out, "keys"):  # transformers 5 returns a BatchEncoding
        out = out["input_ids"]
    return list(out)


def oracle_kwargs(family):
    # Llama 3.2's template dates the prompt with strftime_now (today); we fix the date, as 3.1's template does.
    return {"date_string": "26 Jul 2024"} if family == "llama-3.2" else {}


def mask_runs(ids, mask):
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


def expected_turns(family, fmt, messages, gen, hf_text=None):
    """Each rendered assistant turn's trained text: content (as the template prints it) + terminator."""
    if fmt == "qwen3":  # the template rewrites turns (think blocks): read them off the template's own output
        return re.findall(r"<\|im_start\|>assistant\n(.*?<\|im_end\|>)", hf_text, flags=re.S)
    lstrip = {t[0]: t[2] for t in FAMILIES[family]["tokens"]}.get(TERMINATOR[fmt], False)
    out = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        content = m["content"]
        if fmt == "llama3":
            content = content.strip()
        if fmt == "deepseek-r1" and "</think>" in content and (gen or i != len(messages) - 1):
            content = content.split("</think>")[-1]
        if lstrip:  # phi-4's <|im_end|> swallows the whitespace before it
            content = content.rstrip()
        out.append(content + TERMINATOR[fmt])
    return out


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_matches_transformers(family, tok_dirs):
    hf = transformers.AutoTokenizer.from_pretrained(tok_dirs[family])
    tok = Tokenizer.from_dir(tok_dirs[family])
    assert tok.chat_format == FAMILIES[family]["format"]
    kw = oracle_kwargs(family)
    for name, msgs in CONVERSATIONS.items():
        for gen in (False, True):
            if tok.chat_format == "deepseek-r1" and not gen and msgs[-1]["role"] == "assistant" \
                    and "</think>" in msgs[-1]["content"]:
                continue  # we keep the final turn's reasoning on purpose: test_r1_keeps_final_reasoning
            where = f"{family} / {name} / add_generation_prompt={gen}"
            text = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen, **kw)
            assert tok.render_chat(msgs, add_generation_prompt=gen) == text, where
            ids, mask = tok.encode_chat(msgs, add_generation_prompt=gen)
            assert ids == oracle_ids(hf, msgs, gen, **kw), where
            assert len(mask) == len(ids)
            # Special tokens that strip whitespace (rstrip/lstrip) swallow the edges of a turn, so compare
            # the decoded turn with its edges stripped; the inside must match exactly.
            got = [tok.decode(run).strip() for run in mask_runs(ids, mask)]
            want = expected_turns(family, tok.chat_format, msgs, gen, text)
            assert got == [t.strip() for t in want], where
            if tok.bos_id is not None:
                assert ids[:2] != [tok.bos_id] * 2, f"double BOS in {where}"  # SmolLM2's BOS is <|im_start|>


@pytest.mark.parametrize("family", ["r1-distill-qwen", "r1-distill-llama"])
def test_r1_keeps_final_reasoning(family, tok_dirs):
    """The R1 template strips every turn's reasoning; a training example's final turn keeps it."""
    hf = transformers.AutoTokenizer.from_pretrained(tok_dirs[family])
    tok = Tokenizer.from_dir(tok_dirs[family])
    msgs = CONVERSATIONS["multi_think"][:3]
    history = hf.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=False)
    eos = "<｜end▁of▁sentence｜>"
    assert tok.render_chat(msgs) == history + "<｜Assistant｜>" + THINK + eos
    ids, mask = tok.encode_chat(msgs)
    assert ids == hf(history + "<｜Assistant｜>" + THINK + eos, add_special_tokens=False)["input_ids"]
    assert [tok.decode(r) for r in mask_runs(ids, mask)] == [THINK + eos]
    assert tok.token_to_id("<think>") in ids  # the think tags are atomic tokens in R1 vocabularies
    # With a generation prompt every turn is history: stripped, and the prompt opens a think block.
    text = tok.render_chat(msgs, add_generation_prompt=True)
    assert "step by step" not in text and text.endswith("<｜Assistant｜><think>\n")


@pytest.mark.parametrize("family", ["llama-3.1", "r1-distill-llama"])
def test_no_double_bos(family, tok_dirs):
    tok = Tokenizer.from_dir(tok_dirs[family])
    hf = transformers.AutoTokenizer.from_pretrained(tok_dirs[family])
    assert hf("hi")["input_ids"][0] == tok.bos_id  # the post-processor would add BOS ...
    assert tok.bos_id not in tok.encode("hi")  # ... but encode never adds specials on its own
    assert tok.encode("hi", add_bos=True) == [tok.bos_id] + tok.encode("hi")
    with_bos = tok.bos_token + "hi"
    assert tok.encode(with_bos, add_bos=True) == tok.encode(with_bos) == [tok.bos_id] + tok.encode("hi")
    ids, _ = tok.encode_chat(CONVERSATIONS["system"], add_generation_prompt=True)
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_special_ids(family, tok_dirs):
    tok = Tokenizer.from_dir(tok_dirs[family])
    spec = FAMILIES[family]
    assert tok.eos_id == tok.token_to_id(spec["eos"])
    assert tok.bos_id == (tok.token_to_id(spec["bos"]) if spec["bos"] else None)
    assert tok.pad_id == (tok.token_to_id(spec["pad"]) if spec["pad"] else None)
    expected = [tok.eos_id] + [tok.token_to_id(t) for t in spec["gen_eos"]]
    assert tok.stop_ids == list(dict.fromkeys(expected))
    assert len(tok) == json.loads((tok_dirs[family] / "config.json").read_text())["vocab_size"]
    assert detect_chat_format(spec["template"]) == spec["format"]


def test_special_ids_fall_back_to_config(tmp_path):
    folder = write_tokenizer("qwen2.5", tmp_path)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    eos = cfg.pop("eos_token")
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = Tokenizer.from_dir(folder)
    assert tok.eos_id == json.loads((folder / "config.json").read_text())["eos_token_id"][0]
    assert tok.token_to_id(eos) in tok.stop_ids


def test_add_tokens_only_absent_and_atomic(tok_dirs):
    tok = Tokenizer.from_dir(tok_dirs["phi-4-mini"])
    n = len(tok)
    assert tok.token_to_id("<think>") is None  # Phi-4-mini writes <think> as plain BPE text
    assert len(tok.encode("<think>")) > 1
    assert tok.add_tokens(["<think>", "</think>", "<|end|>", "<think>"]) == ["<think>", "</think>"]
    assert tok.add_tokens(["<think>", "</think>"]) == []
    assert len(tok) == n + 2
    think, end_think = tok.token_to_id("<think>"), tok.token_to_id("</think>")
    ids = tok.encode("a<think>\nhmm\n</think>b")
    assert think in ids and end_think in ids
    assert tok.decode(ids, skip_special_tokens=True) == "a<think>\nhmm\n</think>b"  # not special: kept


@pytest.mark.parametrize("family", ["phi-4-mini-reasoning", "phi-3", "llama-3.2", "r1-distill-qwen"])
def test_save_round_trip(family, tok_dirs, tmp_path):
    tok = Tokenizer.from_dir(tok_dirs[family])
    added = tok.add_tokens(["<think>", "</think>", "<|extra|>"])
    tok.save(tmp_path)
    again = Tokenizer.from_dir(tmp_path)
    assert (again.chat_format, again.stop_ids, len(again)) == (tok.chat_format, tok.stop_ids, len(tok))
    assert (again.bos_id, again.eos_id, again.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    text = "x <think>\nhmm\n</think> y<|extra|>z"
    assert again.encode(text) == tok.encode(text)
    for msgs in CONVERSATIONS.values():
        assert again.encode_chat(msgs) == tok.encode_chat(msgs)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)  # other tools read the folder too
    msgs = CONVERSATIONS["multi_think"][:2]
    assert oracle_ids(hf, msgs, True, **oracle_kwargs(family)) == tok.encode_chat(msgs, True)[0]
    assert all(hf.convert_tokens_to_ids(t) == tok.token_to_id(t) for t in added)


def test_unknown_template_fails_clearly_and_can_be_forced(tmp_path):
    folder = write_tokenizer("smollm2", tmp_path)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    plain = Tokenizer.from_dir(folder)  # loads: plain text and prompt templates need no chat format
    assert plain.encode("hi there") == md.load_tokenizer(str(folder), chat_format="chatml").encode("hi there")
    with pytest.raises(ValueError, match="unrecognised chat template") as err:
        plain.encode_chat([{"role": "user", "content": "hi"}])
    assert all(name in str(err.value) for name in FORMATS) and "chat_format=" in str(err.value)
    assert "--template" in str(err.value)
    tok = md.load_tokenizer(str(folder), chat_format="chatml")
    assert tok.render_chat([{"role": "user", "content": "hi"}], True) == \
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(ValueError, match="unknown chat format 'vicuna'"):
        Tokenizer.from_dir(folder, chat_format="vicuna")
    with pytest.raises(ValueError, match="needs the tokens"):  # the vocabulary has no <|im_sep|>
        Tokenizer.from_dir(folder, chat_format="phi-4")


def test_bad_messages_fail_naming_the_message(tok_dirs):
    tok = Tokenizer.from_dir(tok_dirs["llama-3.1"])
    with pytest.raises(ValueError, match="message 1"):
        tok.encode_chat([{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="empty"):
        tok.encode_chat([])


# ---------------------------------------------------------------------------- qwen3

QWEN3_CASES = {
    "final_think": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": THINK}],
    "history_think": CONVERSATIONS["multi_think"] + [{"role": "user", "content": "Again?"},
                                                     {"role": "assistant", "content": THINK}],
    "reasoning_field": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"},
                        {"role": "assistant", "content": "\n\n4", "reasoning_content": "\nadd them\n\n"}],
    "tool_response_user": [{"role": "user", "content": "Look it up."}, {"role": "assistant", "content": THINK},
                           {"role": "user", "content": "<tool_response>\n42\n</tool_response>"},
                           {"role": "assistant", "content": "<think>\nIt says 42.\n</think>\n\n42."}],
    "two_after_query": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<think>\nhm\n</think>\nA"},
                        {"role": "assistant", "content": "B"}, {"role": "assistant", "content": "C"}],
    "late_system": [{"role": "user", "content": "Hi"}, {"role": "system", "content": "Mind the user."},
                    {"role": "assistant", "content": "Hello"}],
}


def test_qwen3_thinking_rules_match_transformers(tok_dirs):
    hf = transformers.AutoTokenizer.from_pretrained(tok_dirs["qwen3"])
    tok = Tokenizer.from_dir(tok_dirs["qwen3"])
    think, end_think = tok.token_to_id("<think>"), tok.token_to_id("</think>")
    for name, msgs in {**CONVERSATIONS, **QWEN3_CASES}.items():
        for gen in (False, True):
            for thinking in (True, False):
                where = f"{name} / add_generation_prompt={gen} / enable_thinking={thinking}"
                text = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen, enable_thinking=thinking)
                assert tok.render_chat(msgs, gen, enable_thinking=thinking) == text, where
                ids, mask = tok.encode_chat(msgs, gen, enable_thinking=thinking)
                assert ids == oracle_ids(hf, msgs, gen, enable_thinking=thinking), where
                runs = [tok.decode(r).strip() for r in mask_runs(ids, mask)]  # merged newlines: edges aside
                turns = expected_turns("qwen3", "qwen3", msgs, gen, text)
                if not thinking:  # the final turn's empty think block is prompt, as at inference
                    turns = [t.removeprefix("<think>\n\n</think>\n\n") if i == len(turns) - 1 else t
                             for i, t in enumerate(turns)]
                assert runs == [t.strip() for t in turns], where
    # History reasoning is dropped, the final answer's kept (as trained text, think tags atomic).
    text = tok.render_chat(QWEN3_CASES["history_think"])
    assert text.count("step by step") == 1 and text.endswith(f"<|im_start|>assistant\n{THINK}<|im_end|>\n")
    ids, mask = tok.encode_chat(QWEN3_CASES["history_think"])
    assert [m for i, m in zip(ids, mask) if i in (think, end_think)] == [True, True]
    # enable_thinking=False closes the generation prompt with an empty think block.
    prompt = tok.render_chat(CONVERSATIONS["single"], True, enable_thinking=False)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert tok.render_chat(CONVERSATIONS["single"], True).endswith("<|im_start|>assistant\n")
    forced = md.load_tokenizer(str(tok_dirs["qwen3"]), chat_format="qwen3-nothink")
    assert forced.render_chat(CONVERSATIONS["single"], True) == prompt


def test_thinking_switch_is_ignored_by_templates_without_one(tok_dirs):
    tok = Tokenizer.from_dir(tok_dirs["qwen2.5"])
    msgs = CONVERSATIONS["multi_think"]
    assert tok.encode_chat(msgs, enable_thinking=False) == tok.encode_chat(msgs)
    assert detect_chat_format(FAMILIES["qwen3"]["template"]) == "qwen3"
    assert detect_chat_format(FAMILIES["qwen2.5"]["template"]) == "qwen2.5"  # Qwen2.5 stays itself


def test_later_deepseek_templates_are_refused_not_misrendered():
    # DeepSeek-V3-0324-style templates (R1-0528 ...) keep `ns.is_last_user`; the R1-Distill layout is not theirs.
    later = FAMILIES["r1-distill-qwen"]["template"].replace(
        "system_prompt='') %}",
        "system_prompt='', is_first_sp=true, is_last_user=false) %}{%- set ns.is_last_user = true -%}")
    assert "ns.is_last_user" in later
    with pytest.raises(ValueError, match="unrecognised chat template.*chat_format=NAME"):
        detect_chat_format(later)
