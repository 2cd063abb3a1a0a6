"""Answer scoring, think-block checks, reference answers by schema, and prompt files."""

import json

import pytest

from minidistill.answers import prompt_starts_in_think, read_prompts, reference_answer, score_answer, think_stats


@pytest.mark.parametrize("pred, ref, ok", [
    ("so 6 - 5 = 1. The answer is 1.", "Gus has 1 cards. The answer is 1.", True),
    ("The answer is 2.", "The answer is 1.", False),
    ("first 3, then 12", "12", True),                      # the last number counts
    ("12, then 3", "12", False),
    ("It costs $1,234.", "1234", True),                    # commas stripped
    ("It costs 1234", "The total is 1,234.", True),
    ("The answer is -7.", "-7", True),                     # negative
    ("The answer is 7.", "-7", False),
    ("x = 2.50", "2.5", True),                             # decimals compare numerically
    ("x = 2.05", "2.5", False),
    ("The result is \\boxed{42}, not 41", "42", True),     # \boxed preferred
    ("no number here", "5", False),
    ("The capital is PARIS, France.", "Paris", True),      # normalised contains
    ("The capital is Parisian.", "Paris", False),          # whole words only
    ("anything", "", False),
])
def test_score_answer(pred, ref, ok):
    assert score_answer(pred, ref) is ok


def test_think_stats_shapes():
    st = think_stats("<think>\nadd 2 and 3\n</think>\nThe answer is 5.")
    assert (st.reasoning, st.answer, st.well_formed) == ("add 2 and 3", "The answer is 5.", True)
    st = think_stats("The answer is 5.")  # missing think block: scored on the whole text
    assert (st.reasoning, st.answer, st.well_formed) == (None, "The answer is 5.", False)
    st = think_stats("<think>still going")  # cut off: no answer
    assert (st.reasoning, st.answer, st.well_formed) == ("still going", "", False)
    assert not think_stats("<think></think>5").well_formed  # empty reasoning
    assert not think_stats("<think>a</think><think>b</think>5").well_formed  # two blocks
    assert not think_stats("hello <think>a</think>5").well_formed  # not first
    assert think_stats("<think>a</think>   ").answer == ""
    # R1 templates open the block in the prompt: a lone </think> is right, and without the flag it is not.
    st = think_stats("reason here\n</think>\n\nThe answer is 4.", started_in_think=True)
    assert (st.reasoning, st.answer, st.well_formed) == ("reason here", "The answer is 4.", True)
    assert not think_stats("reason here\n</think>4").well_formed
    st = think_stats("reason, never closed", started_in_think=True)
    assert (st.reasoning, st.answer) == ("reason, never closed", "")


def test_reference_answers_by_schema(tmp_path):
    assert reference_answer({"messages": [], "reasoning": "r", "answer": "A 3"}, "dolphin-r1") == "A 3"
    assert reference_answer({"Question": "q", "Complex_CoT": "c", "Response": "R"}, "medical-o1") == "R"
    assert reference_answer({"instruction": "i", "output": "o"}, "alpaca") == "o"
    msgs = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>x</think> 9"}]}
    assert reference_answer(msgs, "messages") == "9"
    assert reference_answer({"q": "x", "gold": 17}, None, field="gold") == "17"
    with pytest.raises(ValueError, match="no reference answer field 'gold'"):
        reference_answer({"answer": "1"}, "dolphin-r1", field="gold")


def test_read_prompts_schemas_and_text(tmp_path):
    f = tmp_path / "p.jsonl"
    rows = [{"messages": [{"role": "user", "content": "hi"}]},  # prompt only, no assistant turn
            {"id": "x7", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            {"bogus": 1},
            {"prompt": "plain"}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    prompts, bad = read_prompts(f)
    assert [p.id for p in prompts] == [0, "x7", 3]
    assert prompts[1].messages == [{"role": "user", "content": "q"}]
    assert prompts[2].messages == [{"role": "user", "content": "plain"}]
    assert len(bad) == 2 and "p.jsonl:3" in bad[0] and "p.jsonl:5" in bad[1]
    t = tmp_path / "p.txt"
    t.write_text("one\n\ntwo\n")
    prompts, _ = read_prompts(t, system="be brief")
    assert [p.id for p in prompts] == [0, 1]
    assert prompts[1].messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "two"}]


def test_read_prompts_limit_system_and_missing_file(tmp_path):
    f = tmp_path / "p.jsonl"
    rows = [{"id": 7, "instruction": "add 2 and 3", "output": "5"},
            {"messages": [{"role": "system", "content": "own"}, {"role": "user", "content": "q"}]},
            {"instruction": "never read", "output": "x"}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    prompts, bad = read_prompts(f, system="be brief", limit=2)
    assert bad == [] and [p.id for p in prompts] == [7, 1]
    assert (prompts[0].format, prompts[0].record) == ("alpaca", rows[0])
    assert prompts[0].messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "add 2 and 3"}]
    assert prompts[1].messages[0] == {"role": "system", "content": "own"}  # a record's own system message stays
    assert reference_answer(prompts[0].record, prompts[0].format) == "5"
    with pytest.raises(FileNotFoundError, match="nope.jsonl does not exist"):
        read_prompts(tmp_path / "nope.jsonl")


def test_prompt_starts_in_think_reads_the_template():
    class Tok:
        def __init__(self, text):
            self.text = text

        def render_chat(self, messages, add_generation_prompt=False):
            assert add_generation_prompt
            return self.text

    msgs = [{"role": "user", "content": "q"}]
    assert prompt_starts_in_think(Tok("<｜Assistant｜><think>\n"), msgs)
    assert not prompt_starts_in_think(Tok("<|im_start|>assistant\n"), msgs)
