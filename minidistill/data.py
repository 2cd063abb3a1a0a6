"""`python -m minidistill.data`: what a model would be trained on, without loading any weights.

Tokenizes a dataset with a model's tokenizer exactly as training does (`samples.prepare_data`,
chat formats, prompt templates and the `text` format alike), prints what `train` prints of it
(the bad records' reasons, a folder's skipped files, the data summary), then a few samples
with their trained tokens marked.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

import numpy as np

from .cli import add_config_flags
from .loss import IGNORE_INDEX
from .samples import DataConfig, Sample, prepare_data
from .spans import TokenText, think_mask
from .tokenizer import load_tokenizer

_COLOURS = {"think": "\033[33m", "answer": "\033[32m"}  # yellow reasoning, green answer
_RESET = "\033[0m"


def render_sample(sample: Sample, tok, colour: bool = False) -> str:
    """The sample's text with trained spans marked: colours on a terminal, `[[…]]` otherwise
    (one mark per span: the reasoning, `<think>…</think>`, and the answer are separate spans)."""
    ids = [int(i) for i in sample.ids]
    labels = np.asarray(sample.labels)
    trained = np.zeros(len(ids), dtype=bool)
    trained[1:] = labels[:-1] != IGNORE_INDEX  # token t is trained when position t-1 predicts it
    think = think_mask(ids, trained, TokenText(tok))
    kind = np.where(~trained, 0, np.where(think, 1, 2))
    out, start = [], 0
    for t in range(1, len(ids) + 1):
        if t == len(ids) or kind[t] != kind[start]:
            piece = tok.decode(ids[start:t])
            k = ("prompt", "think", "answer")[kind[start]]
            if k == "prompt":
                out.append(piece)
            elif colour:
                out.append(_COLOURS[k] + piece + _RESET)
            else:
                out.append(f"[[{piece}]]")
            start = t
    return "".join(out)


def span_legend(colour: bool) -> str:
    """What `render_sample`'s marks mean."""
    if colour:
        return f"{_COLOURS['think']}reasoning{_RESET} / {_COLOURS['answer']}answer{_RESET}"
    return "[[trained tokens]]"


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
    # What train prints of the data (DataSummary.notes, then the summary), by the same call.
    data = prepare_data(args.data, tok, cfg, log=print)
    colour = sys.stdout.isatty()
    legend = span_legend(colour)
    pick = np.random.default_rng(args.seed).permutation(len(data.samples))[: args.show]
    for i in sorted(pick.tolist()):
        s = data.samples[i]
        trained = int((np.asarray(s.labels) != IGNORE_INDEX).sum())
        print(f"--- sample {i} ({len(s.ids)} tokens, {trained} trained; {legend}) ---")
        print(render_sample(s, tok, colour))


if __name__ == "__main__":
    from .cli import run

    run(main)
