"""`python -m minidistill.generate`: answer one prompt (streamed), or write reasoning traces.

`--prompt TEXT` streams the reply; `--prompts FILE --output traces.jsonl --num-samples K`
writes teacher traces in the messages schema, ready for training (`traces.write_traces`);
`--verify FIELD` keeps only the samples whose final answer matches the record's reference;
`--template FILE` renders each record's prompt with a prompt template's prompt part and
continues it as plain text (no chat template).
The library code lives in `sampling` (generation), `traces` and `answers` (prompt files).
"""

from __future__ import annotations

import argparse
import sys

from .answers import read_prompts
from .loader import default_device, load_for_inference
from .records import FORMATS
from .replies import generate
from .traces import write_traces


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minidistill.generate",
                                description="Answer a prompt with a model (and optionally a LoRA adapter), streaming "
                                            "tokens; or, with --prompts, write reasoning traces for a file of prompts.")
    p.add_argument("--model", required=True, help="preset name, hub repo id or local folder")
    p.add_argument("--adapter", help="LoRA adapter folder (ours or PEFT's) to apply")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the user message")
    src.add_argument("--prompts", help="file of prompts: JSONL/JSON/Parquet records in any schema the data readers "
                                       "know (or with a `prompt` string), or a text file with one prompt per line")
    p.add_argument("--system-prompt", "--system", dest="system",
                   help="optional system message (with --prompts: for records that have none)")
    p.add_argument("--output", help="with --prompts: traces JSONL to append to (required there; resumable)")
    p.add_argument("--num-samples", type=int, default=1, help="replies sampled per prompt (default: %(default)s)")
    p.add_argument("--verify", metavar="FIELD", help="keep only replies whose answer matches the record's reference "
                                                     "answer in FIELD (rejection sampling; minidistill.eval rule)")
    p.add_argument("--format", default="auto", choices=["auto", *FORMATS],
                   help="schema of the --prompts records (default: detect)")
    p.add_argument("--template", metavar="FILE", help="with --prompts: a prompt template file (as train's --template); "
                                                      "its prompt part, filled from each record, is the prompt, as "
                                                      "plain text without the chat template")
    p.add_argument("--batch-size", type=int, default=16, help="with --prompts: sequences decoded together, whatever "
                                                              "their lengths (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="default: %(default)s")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: %(default)s)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (reproducible whatever --batch-size)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop a reply at this text (besides the model's stop tokens); repeatable")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--device", default=default_device(), help="default: %(default)s")
    return p


def main(argv: list[str] | None = None) -> None:
    p = parser()
    args = p.parse_args(argv)
    if args.prompts and not args.output:
        p.error("--prompts needs --output FILE (the traces JSONL)")
    if args.template and not args.prompts:
        p.error("--template fills record fields: use it with --prompts FILE (records), not --prompt")
    if args.num_samples < 1:
        p.error(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.num_samples > 1 and args.temperature <= 0:
        print(f"note: {args.num_samples} greedy samples per prompt are identical; set --temperature", file=sys.stderr)

    # The prompt file first: a bad template or record is reported before any weights load.
    prompts, bad = read_prompts(args.prompts, args.format, args.system, template=args.template) if args.prompts \
        else ([], [])
    model, tok = load_for_inference(args.model, args.adapter, args.dtype, args.device)
    if args.prompts:
        for line in bad[:5]:
            print(f"skipping {line}", file=sys.stderr)
        stats = write_traces(model, tok, prompts, args.output, num_samples=args.num_samples,
                             max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                             seed=args.seed, batch_size=args.batch_size, verify=args.verify, stop_strings=args.stop)
        what = "verified" if args.verify else "finished"
        print(f"{stats['prompts']} prompts ({stats['skipped']} already done, {len(bad)} unusable records); kept "
              f"{stats['kept']}/{stats['generated']} {what} samples ({stats['unfinished']} unfinished, "
              f"{stats['rejected']} rejected; {stats['truncated']} reached --max-new-tokens) -> {args.output}")
        return

    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.prompt}]

    def stream(s: str) -> None:
        sys.stdout.write(s)
        sys.stdout.flush()

    generate(model, tok, messages, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
             top_p=args.top_p, seed=args.seed, stream=stream, stop_strings=args.stop)
    sys.stdout.write("\n")


if __name__ == "__main__":
    from .cli import run

    run(main)
