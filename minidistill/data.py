"""`python -m minidistill.data`: what a model would be trained on, without loading any weights.

Tokenizes a dataset with a model's tokenizer exactly as training does (`samples.prepare_data`),
prints a few samples with their trained tokens marked, then the data summary.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

import numpy as np

from .cli import add_config_flags
from .loss import IGNORE_INDEX
from .samples import DataConfig, prepare_data, render_sample, span_legend
from .tokenizer import load_tokenizer


def main(argv: list[str] | None = None) -> None:
    """`python -m minidistill.data`: tokenize a dataset with a model's tokenizer, show samples, summarise."""
    p = argparse.ArgumentParser(prog="python -m minidistill.data", description=main.__doc__)
    p.add_argument("--model", required=True, help="preset, hub repo id or folder (only the tokenizer is loaded)")
    p.add_argument("--data", required=True, help="JSONL/JSON/Parquet file, folder, or hub dataset org/name[:config]")
    p.add_argument("--show", type=int, default=3, help="samples to print with their trained tokens marked")
    p.add_argument("--seed", type=int, default=0, help="which samples --show picks (random, by this seed)")
    p.add_argument("--system-prompt", "--system", dest="system_prompt", default=None,
                   help="system message added to records that have none")
    add_config_flags(p, DataConfig, skip=("system_prompt",), help_suffix=" (default: %(default)s)")
    args = p.parse_args(argv)
    tok = load_tokenizer(args.model)
    cfg = DataConfig(**{f.name: getattr(args, f.name) for f in fields(DataConfig)})
    data = prepare_data(args.data, tok, cfg, log=lambda *a: None)
    colour = sys.stdout.isatty()
    legend = span_legend(colour)
    pick = np.random.default_rng(args.seed).permutation(len(data.samples))[: args.show]
    for i in sorted(pick.tolist()):
        s = data.samples[i]
        trained = int((np.asarray(s.labels) != IGNORE_INDEX).sum())
        print(f"--- sample {i} ({len(s.ids)} tokens, {trained} trained; {legend}) ---")
        print(render_sample(s, tok, colour))
    print("---")
    print(data.summary.format())


if __name__ == "__main__":
    from .cli import run

    run(main)
