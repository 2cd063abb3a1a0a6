"""Answer accuracy and think-block health of a model on a set of prompts with reference answers.

For each record: the prompt (its messages without the final assistant turn, or a prompt
template's rendered prompt part, as plain text) is answered with greedy ragged batched
generation, the text after `</think>` (the whole text when there is no think block) is scored
against the record's reference answer with `answers.score_answer` (a templated record's: the
last field the template's response part names, unless `answer_field` is given), and the think
block is checked (`answers.think_stats`).
`python -m minidistill.eval` is the command-line layer over `evaluate`.
"""

from __future__ import annotations

from typing import Sequence

from .answers import PromptRecord, iter_prompt_replies, reference_answer, score_answer, starts_in_think, think_stats
from .model import Transformer
from .progress import Progress
from .records import BadRecord


def evaluate(model: Transformer, tok, prompts: list[PromptRecord], *, answer_field: str | None = None,
             max_new_tokens: int = 512, batch_size: int = 16, stop_strings: Sequence[str] = (),
             progress: bool = False) -> tuple[dict, list[dict]]:
    """Generate greedily for each prompt and score it. Returns (summary, per-sample rows).

    summary: n, accuracy, well_formed (share of well-formed think blocks), mean_think_tokens
    (over replies with a think block), truncated (replies that reached max_new_tokens: a cut
    reasoning trace is not a finished one), skipped (prompts without a usable reference)."""
    usable, refs, skipped = [], [], []
    for p in prompts:
        try:
            refs.append(reference_answer(p.record, p.format, answer_field or p.answer_field))
            usable.append(p)
        except BadRecord as e:
            skipped.append(f"prompt {p.id}: {e}")
    texts, cut = [""] * len(usable), [False] * len(usable)
    bar = Progress(len(usable), "eval") if progress else None
    try:
        for c in iter_prompt_replies(model, tok, usable, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                     stop_strings=stop_strings, progress=bar):
            texts[c.index], cut[c.index] = c.text, c.reason == "length"
    finally:
        if bar is not None:
            bar.close()
    rows = []
    for p, ref, text, truncated in zip(usable, refs, texts, cut):
        st = think_stats(text, starts_in_think(tok, p))
        rows.append({"id": p.id, "prompt": p.messages[-1]["content"], "output": text, "prediction": st.answer,
                     "reference": ref, "correct": score_answer(st.answer, ref), "well_formed": st.well_formed,
                     "think_tokens": None if st.reasoning is None else len(tok.encode(st.reasoning)),
                     "truncated": truncated})
    n = len(rows)
    thinks = [r["think_tokens"] for r in rows if r["think_tokens"] is not None]
    summary = {"n": n, "accuracy": sum(r["correct"] for r in rows) / max(n, 1),
               "well_formed": sum(r["well_formed"] for r in rows) / max(n, 1),
               "mean_think_tokens": sum(thinks) / len(thinks) if thinks else 0.0,
               "truncated": sum(r["truncated"] for r in rows), "skipped": len(skipped)}
    return summary, rows
