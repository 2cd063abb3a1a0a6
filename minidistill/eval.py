"""`python -m minidistill.eval`: score a model's answers on a dataset and report think-block health.

The command-line layer over `evaluation.evaluate` (scoring rule: `answers.score_answer`).
With `--template FILE` the prompts are the template's prompt part filled from each record, as
plain text; the reference answer is `--answer-field`, else the last field its response part names.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .answers import read_prompts
from .evaluation import evaluate
from .loader import default_device, load_for_inference
from .records import FORMATS


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minidistill.eval",
                                description="Score a model's answers (text after </think>) against reference answers, "
                                            "and report think-block health.")
    p.add_argument("--model", required=True, help="preset name, hub repo id or local folder")
    p.add_argument("--adapter", help="LoRA adapter folder (ours or PEFT's) to apply")
    p.add_argument("--data", required=True, help="JSONL / JSON / Parquet file of records with reference answers")
    p.add_argument("--format", default="auto", choices=["auto", *FORMATS], help="record schema (default: detect)")
    p.add_argument("--template", metavar="FILE", help="prompt template file (as train's --template): its prompt part, "
                                                      "filled from each record, is the prompt, as plain text")
    p.add_argument("--answer-field", help="record field holding the reference answer (default: by schema; with "
                                          "--template, the last field its response part names)")
    p.add_argument("--system-prompt", "--system", dest="system", help="system message added to prompts that have none")
    p.add_argument("--limit", type=int, help="evaluate only the first N records")
    p.add_argument("--max-new-tokens", type=int, default=512, help="default: %(default)s")
    p.add_argument("--batch-size", type=int, default=16, help="sequences decoded together, whatever their lengths "
                                                              "(default: %(default)s)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop a reply at this text (besides the model's stop tokens); repeatable")
    p.add_argument("--output", help="write one JSON row per sample here (JSONL)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--device", default=default_device(), help="default: %(default)s")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    prompts, bad = read_prompts(args.data, args.format, args.system, args.limit, template=args.template)
    if args.template and prompts:  # a reference field no record has would score nothing: say so now
        first, field = prompts[0], args.answer_field or prompts[0].answer_field
        if field is not None and field not in first.record:
            flag = "--answer-field" if args.answer_field else f"the last field of {args.template}'s response part"
            raise ValueError(f"reference answer field {field!r} ({flag}) is not in the first record (id {first.id!r}, "
                             f"keys {sorted(first.record)}); name the right one with --answer-field")
    model, tok = load_for_inference(args.model, args.adapter, args.dtype, args.device)  # after the data's checks
    for line in bad[:5]:
        print(f"skipping {line}", file=sys.stderr)
    summary, rows = evaluate(model, tok, prompts, answer_field=args.answer_field, max_new_tokens=args.max_new_tokens,
                             batch_size=args.batch_size, stop_strings=args.stop, progress=True)
    summary["skipped"] += len(bad)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"accuracy {summary['accuracy']:.3f} on {summary['n']} samples; well-formed think "
          f"{summary['well_formed']:.3f}; mean think {summary['mean_think_tokens']:.1f} tokens; "
          f"{summary['truncated']} reached --max-new-tokens; skipped {summary['skipped']}")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    from .cli import run

    run(main)
