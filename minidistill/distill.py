"""`python -m minidistill.distill`: offline-distillation commands (the library part is teacher_cache.py).

`python -m minidistill.distill cache-logits --teacher M --data D --top-k 32 --output DIR`
prepares the data exactly as training does (every DataConfig field is a flag), runs the
teacher once and writes its top-k log-probs per labelled position (`teacher_cache.cache_logits`);
train with `--teacher-cache DIR`. With `--tokenizer S` naming a student tokenizer that differs
from the teacher's, the cache holds the teacher's distributions mapped onto S's ids at the
aligned positions (cross-tokenizer KD, xkd.py); training reads it unchanged. With no
subcommand it lists the subcommands.
"""

from __future__ import annotations

import argparse
import json

from .cli import add_config_flags, config_from_args
from .loader import default_device, inference_dtype
from .samples import DataConfig
from .teacher_cache import STORE_DTYPES


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minidistill.distill", description="Offline distillation tools.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    c = sub.add_parser("cache-logits", help="cache a teacher's top-k log-probs on prepared training data",
                       description="Prepare the data as training does, run the teacher, store its top-k "
                                   "log-probs per labelled position (see minidistill/teacher_cache.py).")
    c.add_argument("--teacher", required=True, help="teacher: preset name, hub repo id or local folder")
    c.add_argument("--tokenizer", help="tokenizer the student trains with (default: the teacher's); when it differs "
                                       "from the teacher's, the teacher reads each conversation in its own chat "
                                       "format and the cache stores its top-k mapped onto the student's ids")
    c.add_argument("--data", required=True, help="data file, folder or hub dataset id, as given to training")
    c.add_argument("--top-k", type=int, default=32, help="teacher ids kept per position (default: %(default)s)")
    c.add_argument("--output", required=True, help="cache folder to write")
    c.add_argument("--batch-size", type=int, default=8, help="samples per teacher forward (default: %(default)s)")
    c.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="teacher weights dtype; auto: bf16 on GPU, fp32 on CPU")
    c.add_argument("--store-dtype", default="fp16", choices=sorted(STORE_DTYPES),
                   help="dtype of the stored log-probs (default: %(default)s)")
    c.add_argument("--temperature", type=float, default=1.0,
                   help="teacher temperature the log-probs are taken at; use the same in kd_from_topk")
    c.add_argument("--device", default=default_device(), help="default: %(default)s")
    # Every DataConfig field is a flag, so the data is prepared exactly as the training run prepares it.
    add_config_flags(c, DataConfig, help_suffix=" (as in training; default: %(default)s)")
    return p


def cache_logits_command(args: argparse.Namespace) -> None:
    """cache-logits: prepare the data, load the teacher, write the cache, print a summary."""
    from .loader import load_model
    from .samples import prepare_data
    from .teacher_cache import cache_logits
    from .tokenizer import load_tokenizer

    from .teacher import cross_plan, same_tokenizer

    tok = load_tokenizer(args.tokenizer or args.teacher)
    data_cfg = config_from_args(DataConfig, args)
    data = prepare_data(args.data, tok, data_cfg)
    plan, pad = None, 0
    if args.tokenizer:
        t_tok = load_tokenizer(args.teacher)
        if not same_tokenizer(tok, t_tok, [s.ids for s in data.samples[:3]]):
            plan = cross_plan(args.data, data_cfg, tok, t_tok, data, print)
            pad = t_tok.pad_id if t_tok.pad_id is not None else (t_tok.eos_id or 0)
    teacher = load_model(args.teacher, dtype=inference_dtype(args.dtype, args.device), device=args.device).eval()
    if plan is None and teacher.head_weight.shape[0] < len(tok):
        raise ValueError(f"teacher vocab {teacher.head_weight.shape[0]} < tokenizer size {len(tok)}: the teacher "
                         "cannot score every token of this data; use a teacher that shares the tokenizer")
    out = cache_logits(teacher, data, args.output, top_k=args.top_k, batch_size=args.batch_size,
                       dtype=args.store_dtype, temperature=args.temperature, teacher_name=args.teacher,
                       vocab_size=len(tok), progress=True, plan=plan, pad_id=pad)
    meta = json.loads((out / "meta.json").read_text())
    n = sum(s["num_positions"] for s in meta["shards"])
    mapped = (f"; mapped onto the student's vocabulary, {100 * meta['mapped']['coverage']:.1f}% of positions with "
              "a target") if "mapped" in meta else ""
    print(f"cached top-{args.top_k} of {args.teacher} for {meta['num_samples']:,} samples, {n:,} positions, "
          f"{len(meta['shards'])} shard(s) in {out} (fingerprint {meta['fingerprint']}){mapped}")


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and run the subcommand; with none, print the subcommands."""
    p = _parser()
    args = p.parse_args(argv)
    if args.command is None:
        p.print_help()
        return
    cache_logits_command(args)


if __name__ == "__main__":
    from .cli import run

    run(main)
