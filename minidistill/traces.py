"""Teacher reasoning traces: sample replies to a prompt file and keep them as training records.

`python -m minidistill.generate --prompts FILE --output traces.jsonl --num-samples K` runs
`write_traces`; `--verify FIELD` keeps only the samples whose final answer matches the
record's reference (rejection sampling, scored with `answers.score_answer`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from .answers import PromptRecord, iter_prompt_replies, reference_answer, score_answer, starts_in_think, think_stats
from .model import Transformer
from .progress import Progress
from .sampling import Completion


def _done_ids(output: Path) -> set[str]:
    """Prompt ids already handled: those with a record in the output, and those in the sidecar
    progress file (a prompt whose samples all failed --verify leaves no record)."""
    done: set[str] = set()
    for path in (output, output.with_name(output.name + ".progress")):
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    try:
                        done.add(json.dumps(json.loads(line)["prompt_id"]))
                    except (ValueError, KeyError, TypeError):
                        continue  # a line cut by a crash: its prompt runs again
    return done


def write_traces(model: Transformer, tok, prompts: list[PromptRecord], output: str | Path, *, num_samples: int = 1,
                 max_new_tokens: int = 512, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 batch_size: int = 16, verify: str | None = None, stop_strings: Sequence[str] = (),
                 progress: bool = True) -> dict:
    """Sample `num_samples` replies per prompt (`PromptRecord`s from `answers.read_prompts`) and
    append them to `output` as training records in the messages schema:
    {"messages": prompt + [{"role": "assistant", "content": answer}], "reasoning", "answer",
    "prompt_id", "sample"}. Reasoning is the text inside the think block (the generation may
    start inside it, as R1 templates do); replies whose reasoning never closes are dropped.

    All replies decode as one ragged batch of `batch_size` rows; a prompt's records are written
    once all its samples are done (so in the order prompts finish). Resumable: prompts already
    in the output (or its `.progress` sidecar) are skipped. Sample k of prompt j (its index in `prompts`) samples with seed
    `seed + j * num_samples + k`, so a resumed run draws what an uninterrupted one would.
    A prompt template's prompt (`PromptRecord.text`) is continued as plain text; its record holds
    that text as the user turn and, in `prompt_text`, exactly.
    verify: a record field with the reference answer; only replies whose answer scores as
    correct are kept. Returns counts: prompts, skipped (already done), generated, kept,
    unfinished (think block never closed), rejected, truncated (max_new_tokens reached)."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    done = _done_ids(output)
    todo = [(j, p) for j, p in enumerate(prompts) if json.dumps(p.id) not in done]
    stats = {"prompts": len(prompts), "skipped": len(prompts) - len(todo), "generated": 0, "kept": 0,
             "unfinished": 0, "rejected": 0, "truncated": 0}
    if not todo:
        return stats
    # Fail on a missing reference before generating anything.
    refs = [reference_answer(p.record, p.format, verify) for _, p in todo] if verify else None
    asked = [p for _, p in todo for _ in range(num_samples)]
    seeds = None if seed is None else [seed + j * num_samples + k for j, _ in todo for k in range(num_samples)]
    replies: dict[int, list[Completion | None]] = {}  # todo index -> its samples so far
    bar = Progress(len(asked), "traces", unit="sample") if progress else None
    try:
        with open(output, "a", encoding="utf-8") as out, \
                open(output.with_name(output.name + ".progress"), "a", encoding="utf-8") as prog:
            for c in iter_prompt_replies(model, tok, asked, max_new_tokens=max_new_tokens, temperature=temperature,
                                         top_p=top_p, seed=seeds, batch_size=batch_size, stop_strings=stop_strings,
                                         progress=bar):
                t = c.index // num_samples
                got = replies.setdefault(t, [None] * num_samples)
                got[c.index % num_samples] = c
                if any(x is None for x in got):
                    continue
                del replies[t]
                p = todo[t][1]
                r1 = starts_in_think(tok, p)
                for k, reply in enumerate(got):
                    stats["generated"] += 1
                    stats["truncated"] += reply.reason == "length"
                    st = think_stats(reply.text, started_in_think=r1)
                    if not st.answer:
                        stats["unfinished"] += 1
                        continue
                    rec = {"messages": p.messages + [{"role": "assistant", "content": st.answer}],
                           "reasoning": st.reasoning, "answer": st.answer, "prompt_id": p.id, "sample": k}
                    if p.text is not None:  # a template's prompt: the exact text the reply continues
                        rec["prompt_text"] = p.text
                    if refs is not None:
                        if not score_answer(st.answer, refs[t]):
                            stats["rejected"] += 1
                            continue
                        rec["reference"] = refs[t]
                    out.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    stats["kept"] += 1
                out.flush()  # the records first, then the progress line: a crash never loses a prompt's samples
                prog.write(json.dumps({"prompt_id": p.id}) + "\n")
                prog.flush()
    finally:
        if bar is not None:
            bar.close()
    return stats
