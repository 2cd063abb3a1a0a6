"""`python -m minidistill.train`: LoRA / QLoRA fine-tuning on reasoning traces.

The command line is the TrainConfig (train_config.py): every field is a --flag, nested configs
included. With no arguments it runs the offline demo. The job itself is `trainer.train`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from .cli import add_config_flags, config_from_args, config_values, run
from .trainer import train
from .train_config import TrainConfig, check_config


DEMO_OUTPUT = "runs/demo"


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    return _parse(argv)[0]


def _parse(argv: list[str] | None) -> tuple[TrainConfig, bool]:
    """The config of these flags, and whether it is the offline demo's: flags without --model and
    --data change the demo's settings (e.g. `--dtype bf16 --max-steps 50`)."""
    p = argparse.ArgumentParser(prog="python -m minidistill.train", allow_abbrev=False,
                                description="LoRA/QLoRA fine-tuning on reasoning traces. No arguments: the offline "
                                            "demo; flags without --model and --data change its settings.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_flags(p, TrainConfig)

    def parse() -> TrainConfig:
        try:
            return config_from_args(TrainConfig, p.parse_args(argv))
        except ValueError as e:  # a nested config refusing its values
            p.error(str(e))
    cfg = parse()
    demo = cfg.model is None and cfg.data is None
    if demo:
        p.set_defaults(**config_values(demo_config()))
        cfg = parse()
    problems = check_config(cfg)
    if problems:
        p.error("; ".join(problems))
    return cfg, demo


def demo_config() -> TrainConfig:
    """The offline demo: a tiny random model and the bundled arithmetic reasoning data."""
    from .demo import demo_cache, demo_data_path
    from .lora import LoraConfig
    from .samples import DataConfig

    # "demo" (not its folder) is recorded in the adapter, so `--model demo --adapter ...` matches it
    return TrainConfig(model="demo", data=str(demo_data_path(demo_cache())), output=DEMO_OUTPUT,
                       max_steps=500, batch_size=8, grad_accum=1, lr=3e-3, min_lr=3e-4, warmup_steps=10,
                       grad_checkpointing=False, eval_split=0.02, eval_every=100, save_every=250,
                       sample_max_tokens=60, device="cpu", data_config=DataConfig(max_seq_len=128),
                       lora=LoraConfig(r=32, alpha=32, targets="all-linear"))


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    cfg, demo = _parse(argv)
    if demo:
        print("running the offline demo (a tiny random model learns arithmetic reasoning traces on CPU; "
              "see --help for a real run)")
        if cfg.output == DEMO_OUTPUT and not cfg.resume and Path(cfg.output).exists():
            shutil.rmtree(cfg.output)  # the demo's own folder starts fresh (unless resumed)
    summary = train(cfg)
    if demo:
        from .demo import demo_model_dir

        print(f"  demo model   {demo_model_dir()} (--model demo in every command), e.g.\n"
              f"    python -m minidistill.generate --model demo --adapter {cfg.output}/adapter "
              "--prompt 'Ana has 3 apples and buys 4 more. How many apples does Ana have?'")
    return summary


if __name__ == "__main__":
    run(main)
